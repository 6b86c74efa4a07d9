// Members: the list for everyone in the org; inviting, changing roles, removing and revoking
// invites for its admins only.

import { api, orgPath } from '../api.js';
import { clear, copyButton, errorBox, field, h, select, table } from '../dom.js';
import { fmtDate } from '../format.js';
import { isAdmin } from './shared.js';

const ROLES = [['admin', 'admin'], ['member', 'member'], ['viewer', 'viewer']];

// A button that asks once more in place (no browser dialog) before it acts.
function confirmButton(label, accessibleName, confirmLabel, action) {
  const holder = h('span', { class: 'confirm' });
  const start = h('button', { type: 'button', class: 'danger', 'aria-label': accessibleName }, label);
  const reset = () => clear(holder, start);
  start.addEventListener('click', () => {
    const yes = h('button', { type: 'button', class: 'danger' }, confirmLabel);
    const no = h('button', { type: 'button', class: 'secondary' }, 'Cancel');
    yes.addEventListener('click', async () => {
      yes.disabled = true;
      try {
        await action();
      } finally {
        yes.disabled = false;
      }
    });
    no.addEventListener('click', () => { reset(); start.focus(); });
    clear(holder, yes, no);
    yes.focus();
  });
  reset();
  return holder;
}

export async function members(body, ctx) {
  const { org, role, identity } = ctx;
  const admin = isAdmin(role);
  const [list, invites] = await Promise.all([
    api(orgPath(org, '/members')),
    admin ? api(orgPath(org, '/invites')) : Promise.resolve({ data: [] }),
  ]);
  if (!ctx.alive()) return;
  const status = h('div', { class: 'form-status', 'aria-live': 'polite' });

  const rows = list.data.map((m) => {
    const you = m.user_id === identity.userId;
    const cells = [h('td', {}, m.email, you ? h('span', { class: 'muted' }, ' (you)') : null)];
    if (admin) {
      const roleSelect = select(ROLES, m.role, { 'aria-label': `Role of ${m.email}` });
      roleSelect.addEventListener('change', async () => {
        clear(status);
        try {
          await api(orgPath(org, `/members/${m.user_id}`), { method: 'PATCH', body: { role: roleSelect.value } });
          ctx.toast(`${m.email} is now ${roleSelect.value}.`);
          if (you) window.location.reload();  // your own role changed: read who you are again
          else ctx.rerender();
        } catch (err) {
          roleSelect.value = m.role;
          status.append(errorBox(err));
        }
      });
      cells.push(h('td', {}, roleSelect));
    } else {
      cells.push(h('td', {}, m.role));
    }
    cells.push(h('td', {}, fmtDate(m.created_at)));
    if (admin) {
      cells.push(h('td', {}, confirmButton('Remove', `Remove ${m.email}`, `Remove ${m.email}`, async () => {
        clear(status);
        try {
          const result = await api(orgPath(org, `/members/${m.user_id}`), { method: 'DELETE' });
          const revoked = (result && result.revoked_api_keys ? result.revoked_api_keys.length : 0);
          ctx.toast(`${m.email} was removed${revoked ? `; ${revoked} service key(s) they created were revoked` : ''}.`);
          if (you) window.location.reload();  // you left the org
          else ctx.rerender();
        } catch (err) {
          status.append(errorBox(err));
        }
      })));
    }
    return h('tr', {}, cells);
  });
  const headers = admin ? ['Email', 'Role', 'Joined', 'Actions'] : ['Email', 'Role', 'Joined'];
  body.append(h('section', { class: 'card', 'aria-labelledby': 'members-title' },
    h('h2', { id: 'members-title' }, `Members of ${org.name}`), status,
    table('Members', headers, rows)));

  if (!admin) return;

  // --- invite ---
  const email = h('input', { type: 'email', name: 'email', required: true, autocomplete: 'off' });
  const inviteRole = select(ROLES, 'member', { name: 'role' });
  const inviteResult = h('div', { 'aria-live': 'polite' });
  const inviteForm = h('form', { class: 'card', 'aria-labelledby': 'invite-title' },
    h('h2', { id: 'invite-title' }, 'Invite someone'),
    h('div', { class: 'inline-fields' }, field('Email', email), field('Role', inviteRole)),
    h('button', { type: 'submit' }, 'Send invite'), inviteResult);
  inviteForm.addEventListener('submit', async (event) => {
    event.preventDefault();
    clear(inviteResult);
    try {
      const invite = await api(orgPath(org, '/invites'), {
        method: 'POST', body: { email: email.value.trim(), role: inviteRole.value },
      });
      const token = h('input', { type: 'text', readonly: true, value: invite.token, class: 'mono secret' });
      clear(inviteResult,
        h('p', { class: 'ok' }, `Invite for ${invite.email || email.value.trim()} created. Send them this token; `
          + 'it is shown only once. They join with POST /api/invites/accept.'),
        h('div', { class: 'secret-row' }, field('Invite token', token), copyButton(() => token.value, 'Copy token')));
      email.value = '';
      refreshInvites();
    } catch (err) {
      inviteResult.append(errorBox(err));
    }
  });
  body.append(inviteForm);

  // --- pending invites ---
  const invitesSection = h('section', { class: 'card', 'aria-labelledby': 'invites-title' });
  const renderInvites = (data) => {
    const pending = data.filter((i) => !i.accepted_at && !i.revoked_at);
    clear(invitesSection, h('h2', { id: 'invites-title' }, 'Pending invites'),
      pending.length
        ? table('Pending invites', ['Email', 'Role', 'Expires', 'Actions'], pending.map((i) => h('tr', {},
          h('td', {}, i.email), h('td', {}, i.role), h('td', {}, fmtDate(i.expires_at)),
          h('td', {}, confirmButton('Revoke', `Revoke the invite for ${i.email}`, 'Revoke invite', async () => {
            try {
              await api(orgPath(org, `/invites/${i.id}`), { method: 'DELETE' });
              ctx.toast(`The invite for ${i.email} was revoked.`);
              refreshInvites();
            } catch (err) {
              invitesSection.append(errorBox(err));
            }
          })))))
        : h('p', {}, 'No pending invites.'));
  };
  const refreshInvites = async () => {
    try {
      renderInvites((await api(orgPath(org, '/invites'))).data);
    } catch (err) {
      invitesSection.append(errorBox(err));
    }
  };
  renderInvites(invites.data);
  body.append(invitesSection);
}
