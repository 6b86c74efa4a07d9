// Keys: your personal keys and (admins) the org's service keys; create one (its secret is shown
// once, with a copy button) and revoke. Viewers and service keys get the list only.

import { api } from '../api.js';
import { keyPrefix } from '../auth.js';
import { clear, copyButton, errorBox, field, h, select, table } from '../dom.js';
import { fmtDate, fmtTime } from '../format.js';
import { isAdmin } from './shared.js';

function status(k) {
  if (k.revoked_at) return `revoked ${fmtDate(k.revoked_at)}`;
  if (k.expires_at && new Date(k.expires_at) <= new Date()) return 'expired';
  return 'active';
}

export async function keys(body, ctx) {
  const { org, role, identity } = ctx;
  const admin = isAdmin(role);
  const canCreate = (role === 'admin' || role === 'member') && identity.userId;
  const list = await api('/api/api-keys');
  if (!ctx.alive()) return;
  const mine = keyPrefix();
  const relevant = list.data.filter((k) => (k.kind === 'personal' && k.user_id === identity.userId)
    || (k.kind === 'service' && k.org_id === org.id));
  const orgLabel = (k) => (k.org_id === org.id ? org.slug : (k.org_id ? 'another org' : 'none (personal)'));
  const canRevoke = (k) => !k.revoked_at && ((k.kind === 'personal' && k.user_id === identity.userId && canCreate)
    || (k.kind === 'service' && admin));
  const listStatus = h('div', { 'aria-live': 'polite' });

  const rows = relevant.map((k) => {
    const cells = [
      h('td', {}, k.name, k.prefix === mine ? h('span', { class: 'muted' }, ' (this session)') : null),
      h('td', {}, k.kind), h('td', { class: 'mono' }, `${k.prefix}…`), h('td', {}, orgLabel(k)),
      h('td', {}, fmtDate(k.created_at)), h('td', {}, k.last_used_at ? fmtTime(k.last_used_at) : 'never'),
      h('td', {}, k.expires_at ? fmtDate(k.expires_at) : 'never'), h('td', {}, status(k)),
    ];
    if (canCreate || admin) {
      const cell = h('td', {});
      if (canRevoke(k)) {
        const revoke = h('button', { type: 'button', class: 'danger', 'aria-label': `Revoke ${k.name}` }, 'Revoke');
        revoke.addEventListener('click', () => {
          const yes = h('button', { type: 'button', class: 'danger' },
            k.prefix === mine ? `Revoke ${k.name} and sign out` : `Revoke ${k.name}`);
          const no = h('button', { type: 'button', class: 'secondary' }, 'Cancel');
          yes.addEventListener('click', async () => {
            try {
              await api(`/api/api-keys/${k.id}`, { method: 'DELETE' });
              ctx.toast(`${k.name} was revoked.`);
              ctx.rerender();
            } catch (err) {
              listStatus.append(errorBox(err));
            }
          });
          no.addEventListener('click', () => { clear(cell, revoke); revoke.focus(); });
          clear(cell, yes, no);
          yes.focus();
        });
        cell.append(revoke);
      }
      cells.push(cell);
    }
    return h('tr', {}, cells);
  });
  const headers = ['Name', 'Kind', 'Prefix', 'Org', 'Created', 'Last used', 'Expires', 'Status'];
  if (canCreate || admin) headers.push('Actions');
  body.append(h('section', { class: 'card', 'aria-labelledby': 'keys-title' },
    h('h2', { id: 'keys-title' }, admin ? `Your keys and ${org.name}'s service keys` : 'Your keys'),
    listStatus,
    rows.length ? table('API keys', headers, rows) : h('p', {}, 'No keys you can see here.')));

  if (!canCreate) return;

  const name = h('input', { type: 'text', name: 'name', required: true, maxlength: 100, autocomplete: 'off' });
  const kind = admin
    ? select([['personal', 'personal (acts as you)'], ['service', `service (CI key of ${org.slug})`]], 'personal',
      { name: 'kind' })
    : null;
  const expires = h('input', { type: 'date', name: 'expires' });
  const result = h('div', { 'aria-live': 'polite' });
  const form = h('form', { class: 'card', 'aria-labelledby': 'create-key-title' },
    h('h2', { id: 'create-key-title' }, 'Create a key'),
    h('div', { class: 'inline-fields' },
      field('Key name', name),
      kind ? field('Kind', kind) : null,
      field('Expires (optional)', expires)),
    h('p', { class: 'muted' }, `A personal key is bound to ${org.slug}: it acts as you, in ${org.slug} by default.`),
    h('button', { type: 'submit' }, 'Create key'), result);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    clear(result);
    try {
      const created = await api('/api/api-keys', {
        method: 'POST',
        body: {
          name: name.value.trim(),
          kind: kind ? kind.value : 'personal',
          org_id: org.slug,
          expires_at: expires.value ? new Date(`${expires.value}T23:59:59Z`).toISOString() : null,
        },
      });
      const secret = h('input', { type: 'text', readonly: true, value: created.secret, class: 'mono secret' });
      const done = h('button', { type: 'button', class: 'secondary' }, 'Done');
      done.addEventListener('click', () => ctx.rerender());
      clear(result,
        h('p', { class: 'ok', role: 'status' },
          `${created.name} created. Copy its secret now: it is shown only once and cannot be recovered.`),
        h('div', { class: 'secret-row' }, field('New key secret', secret), copyButton(() => secret.value, 'Copy secret'),
          done));
      name.value = '';
      secret.select();
    } catch (err) {
      result.append(errorBox(err));
    }
  });
  body.append(form);
}
