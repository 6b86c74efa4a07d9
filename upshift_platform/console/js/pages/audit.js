// Audit log: filters, keyset "load more", a live tail, exports, chain verification, and each
// event's full metadata, IP and user agent. Every value is shown as text.

import { api, orgPath } from '../api.js';
import { append, clear, errorBox, field, h, select, uid } from '../dom.js';
import { fmtInt, fmtTime } from '../format.js';
import { canReadAudit, isAdmin } from './shared.js';

const PAGE_SIZE = 100;
const TAIL_EVERY_MS = 3000;
const TAIL_OVERLAP_MS = 60000;  // a spend's event is sealed just after commit: look back a minute, skip what is shown
const KNOWN_TYPES = ['upgrade', 'fix', 'scan_upload', 'credit_debit', 'credits_granted', 'member_added', 'member_removed',
  'member_role_changed', 'invite_created', 'invite_accepted', 'invite_revoked', 'api_key_created', 'api_key_revoked',
  'org_created', 'org_updated', 'audit_export', 'audit_purged'];

function localInputToIso(value) {
  if (!value) return undefined;
  const d = new Date(value);
  return Number.isNaN(d.getTime()) ? undefined : d.toISOString();
}

export async function audit(body, ctx) {
  const { org, role } = ctx;
  if (!canReadAudit(role)) {
    body.append(h('p', { class: 'notice' }, role === 'service'
      ? `A service key cannot read ${org.name}'s audit log; its admins and viewers can.`
      : `Your role in ${org.name} (${role}) cannot read its audit log; its admins and viewers can.`));
    return;
  }
  const [membersList, keysList] = await Promise.all([
    api(orgPath(org, '/members')),
    isAdmin(role) ? api('/api/api-keys') : Promise.resolve({ data: [] }),
  ]);
  if (!ctx.alive()) return;
  const actors = new Map();
  for (const m of membersList.data) actors.set(m.user_id, m.email);
  for (const k of keysList.data) actors.set(k.id, `${k.name} (${k.kind} key)`);
  const actorName = (e) => {
    const id = e.user_id || e.service_key_id;
    if (!id) return e.actor_kind || 'system';
    return actors.get(id) || `${e.service_key_id ? 'key' : 'user'} ${id.slice(0, 8)}`;
  };

  // --- filters ---
  const since = h('input', { type: 'datetime-local', name: 'since' });
  const until = h('input', { type: 'datetime-local', name: 'until' });
  const listId = uid('event-types');
  const eventType = h('input', { type: 'text', name: 'event_type', list: listId, autocomplete: 'off',
    placeholder: 'any' });
  const actor = select([['', 'Anyone'], ...[...actors.entries()].map(([id, label]) => [id, label])], '',
    { name: 'actor' });
  const resourceType = h('input', { type: 'text', name: 'resource_type', autocomplete: 'off', placeholder: 'any' });
  const resourceId = h('input', { type: 'text', name: 'resource_id', autocomplete: 'off', placeholder: 'any' });
  const filters = h('form', { class: 'filters', 'aria-label': 'Filter the audit log' },
    h('div', { class: 'filter-grid' },
      field('From', since, 'Your local time'), field('Until', until, 'Your local time'),
      field('Event type', eventType, 'One type, or several separated by commas'),
      field('Actor', actor), field('Resource type', resourceType), field('Resource id', resourceId)),
    h('datalist', { id: listId }, KNOWN_TYPES.map((t) => h('option', { value: t }))),
    h('div', { class: 'actions' },
      h('button', { type: 'submit' }, 'Apply filters'),
      h('button', { type: 'reset', class: 'secondary' }, 'Clear')));

  const query = () => ({
    org_id: org.slug,
    since: localInputToIso(since.value),
    until: localInputToIso(until.value),
    event_type: eventType.value.split(',').map((t) => t.trim()).filter(Boolean),
    actor: actor.value || undefined,
    resource_type: resourceType.value.trim() || undefined,
    resource_id: resourceId.value.trim() || undefined,
  });

  // --- tools: verify, export, live tail ---
  const verifyResult = h('div', { class: 'verify-result', 'aria-live': 'polite' });
  const verifyButton = h('button', { type: 'button' }, 'Verify');
  verifyButton.addEventListener('click', async () => {
    clear(verifyResult, h('p', { class: 'muted' }, 'Verifying the chain…'));
    verifyButton.disabled = true;
    try {
      const v = await api('/api/audit-logs/verify', { query: { org_id: org.slug } });
      if (v.ok) {
        clear(verifyResult, h('p', { class: 'ok verify-ok' }, `Chain verified: ${fmtInt(v.checked)} events`),
          h('p', { class: 'mono' }, `Head: seq ${v.head_seq}, hash ${v.head_hash}`));
      } else {
        clear(verifyResult, h('p', { class: 'error verify-broken', role: 'alert' },
          `Chain broken at seq ${v.first_bad_seq} (${v.reason}): ${v.message}`),
        h('p', { class: 'muted' }, `${fmtInt(v.checked)} events checked before it.`));
      }
    } catch (err) {
      clear(verifyResult, errorBox(err));
    } finally {
      verifyButton.disabled = false;
    }
  });

  const exportStatus = h('span', { class: 'muted', 'aria-live': 'polite' });
  const exportButton = (format, label) => {
    const button = h('button', { type: 'button', class: 'secondary' }, label);
    button.addEventListener('click', async () => {
      button.disabled = true;
      exportStatus.textContent = `Exporting ${format.toUpperCase()}…`;
      try {
        // Through fetch, with the Authorization header: a download link would need the credential in its URL.
        const response = await api('/api/audit-logs/export', { raw: true, query: { ...query(), format } });
        const blob = await response.blob();
        const link = h('a', { href: URL.createObjectURL(blob), download: `audit-log-${org.slug}.${format}` });
        document.body.append(link);
        link.click();
        link.remove();
        setTimeout(() => URL.revokeObjectURL(link.href), 10000);
        exportStatus.textContent = `Exported ${format.toUpperCase()} (recorded in the log as an audit_export event).`;
      } catch (err) {
        exportStatus.textContent = `Export failed: ${err.message}`;
      } finally {
        button.disabled = false;
      }
    });
    return button;
  };

  const tail = h('input', { type: 'checkbox', name: 'live' });
  const tailId = uid('tail');
  tail.id = tailId;
  const tailStatus = h('span', { class: 'muted', 'aria-live': 'polite' });

  // Open on wide screens; one line on a phone until it is needed.
  const filterBox = h('details', { class: 'card filter-box', open: window.matchMedia('(min-width: 601px)').matches },
    h('summary', {}, 'Filters'), filters);
  body.append(filterBox, h('section', { class: 'card tools', 'aria-label': 'Audit log tools' },
    h('div', { class: 'actions' },
      verifyButton, exportButton('csv', 'Export CSV'), exportButton('ndjson', 'Export NDJSON'),
      h('span', { class: 'check' }, tail, h('label', { for: tailId }, 'Live tail')), tailStatus),
    exportStatus, verifyResult));

  // --- the table ---
  const tbody = h('tbody', {});
  const summary = h('p', { class: 'muted', 'aria-live': 'polite' });
  const more = h('button', { type: 'button', class: 'secondary', hidden: true }, 'Load more');
  const wrap = h('div', { class: 'table-wrap', role: 'region', 'aria-label': 'Audit events, table', tabindex: 0 },
    h('table', { class: 'audit-table' },
      h('caption', { class: 'visually-hidden' }, 'Audit events, newest first'),
      h('thead', {}, h('tr', {}, ['', 'Time (UTC)', 'Event', 'Actor', 'Resource', 'Seq'].map((c, i) =>
        h('th', { scope: 'col' }, i === 0 ? h('span', { class: 'visually-hidden' }, 'Details') : c)))),
      tbody));
  const listStatus = h('div', {});
  body.append(h('section', { class: 'card', 'aria-label': 'Audit events' }, summary, listStatus, wrap, more));

  const shown = new Map();  // id -> event
  let cursor = null;

  const row = (e) => {
    const detailId = uid('event');
    const toggle = h('button', { type: 'button', class: 'link', 'aria-expanded': 'false', 'aria-controls': detailId,
      'aria-label': `Details of ${e.event_type} at ${fmtTime(e.created_at)}` }, 'Details');
    const detail = h('tr', { id: detailId, class: 'detail', hidden: true },
      h('td', { colspan: 6 }, h('dl', { class: 'event-detail' },
        h('dt', {}, 'Event id'), h('dd', { class: 'mono' }, e.id),
        h('dt', {}, 'Actor'), h('dd', {}, `${actorName(e)} (${e.actor_kind})`),
        h('dt', {}, 'IP'), h('dd', { class: 'mono' }, e.ip || '—'),
        h('dt', {}, 'User agent'), h('dd', {}, e.user_agent || '—'),
        h('dt', {}, 'Client time'), h('dd', {}, e.client_timestamp || '—'),
        h('dt', {}, 'Metadata'), h('dd', {}, h('pre', { class: 'metadata' }, JSON.stringify(e.metadata, null, 2))))));
    toggle.addEventListener('click', () => {
      const open = toggle.getAttribute('aria-expanded') !== 'true';
      toggle.setAttribute('aria-expanded', String(open));
      detail.hidden = !open;
    });
    const resource = [e.resource_type, e.resource_id].filter((x) => x !== null && x !== undefined && x !== '').join(': ');
    const main = h('tr', { class: 'event', dataset: { id: e.id } },
      h('td', { class: 'toggle' }, toggle),
      h('td', { class: 'nowrap', dataset: { label: 'Time' } }, fmtTime(e.created_at)),
      h('td', { dataset: { label: 'Event' } }, e.event_type),
      h('td', { dataset: { label: 'Actor' } }, actorName(e)),
      h('td', { class: 'resource', dataset: { label: 'Resource' } }, resource),
      h('td', { class: 'num', dataset: { label: 'Seq' } }, e.seq === null ? 'pending' : String(e.seq)));
    return [main, detail];
  };

  const updateSummary = () => {
    summary.textContent = `${fmtInt(shown.size)} event${shown.size === 1 ? '' : 's'} shown, newest first.`;
  };

  const load = async (reset) => {
    clear(listStatus);
    if (reset) {
      cursor = null;
      shown.clear();
      clear(tbody);
    }
    more.disabled = true;
    try {
      const page = await api('/api/audit-logs', { query: { ...query(), limit: PAGE_SIZE, cursor: cursor || undefined } });
      if (!ctx.alive()) return;
      const fresh = page.data.filter((e) => !shown.has(e.id));
      for (const e of fresh) shown.set(e.id, e);
      append(tbody, fresh.map(row));
      cursor = page.next_cursor;
      more.hidden = !cursor;
      if (!shown.size) listStatus.append(h('p', {}, 'No events match.'));
      updateSummary();
    } catch (err) {
      if (ctx.alive()) listStatus.append(errorBox(err));
    } finally {
      more.disabled = false;
    }
  };

  const poll = async () => {
    const newest = [...shown.values()].reduce((a, e) => (!a || e.created_at > a ? e.created_at : a), null);
    const q = query();
    if (newest) {
      const sinceTail = new Date(new Date(newest).getTime() - TAIL_OVERLAP_MS).toISOString();
      if (!q.since || sinceTail > q.since) q.since = sinceTail;
    }
    try {
      const page = await api('/api/audit-logs', { query: { ...q, limit: PAGE_SIZE } });
      if (!ctx.alive() || !tail.checked) return;
      const fresh = page.data.filter((e) => !shown.has(e.id)).reverse();  // oldest first: each goes on top
      for (const e of fresh) {
        shown.set(e.id, e);
        const [main, detail] = row(e);
        main.classList.add('new');
        tbody.prepend(main, detail);
      }
      if (fresh.length) {
        clear(listStatus);
        updateSummary();
      }
      tailStatus.textContent = `Live: checked ${fmtTime(new Date().toISOString())}`;
    } catch (err) {
      tailStatus.textContent = `Live tail paused: ${err.message}`;
    }
  };

  let timer = null;
  const stopTail = () => {
    if (timer) clearInterval(timer);
    timer = null;
  };
  tail.addEventListener('change', () => {
    stopTail();
    if (tail.checked) {
      poll();
      timer = setInterval(poll, TAIL_EVERY_MS);
    } else {
      tailStatus.textContent = '';
    }
  });
  ctx.onCleanup(stopTail);

  more.addEventListener('click', () => load(false));
  filters.addEventListener('submit', (event) => {
    event.preventDefault();
    load(true);
  });
  filters.addEventListener('reset', () => setTimeout(() => load(true), 0));

  await load(true);
}
