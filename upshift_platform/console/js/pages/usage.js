// Usage: per member and per key, what was spent in the current period (this UTC month), and its limit.
// Spend limits do not exist yet: their column and the admins' editing place say so.

import { api, orgPath } from '../api.js';
import { h, notYet, table } from '../dom.js';
import { fmtInt, monthName, startOfMonthUtc } from '../format.js';
import { actorKey, actorKinds, actorNames, isAdmin, scopeNote, usageFor } from './shared.js';

export async function usage(body, ctx) {
  const { org, role } = ctx;
  const from = startOfMonthUtc();
  const to = new Date();
  const everyone = role === 'admin' || role === 'viewer';
  const [spend, members, keys] = await Promise.all([
    usageFor(org, { from, to, groupBy: 'actor' }),
    everyone ? api(orgPath(org, '/members')) : Promise.resolve({ data: [] }),
    isAdmin(role) ? api('/api/api-keys') : Promise.resolve({ data: [] }),
  ]);
  if (!ctx.alive()) return;
  const name = actorNames(spend);
  const kind = actorKinds(spend);
  const byActor = new Map(spend.data.map((row) => [actorKey(row), row]));

  // Everyone who could spend, with 0 for those who did not: members, then the org's live service keys.
  const rows = [];
  for (const m of members.data) {
    if (m.role === 'viewer') continue;  // viewers cannot spend
    rows.push({ ...(byActor.get(m.user_id) || { actor_kind: 'user', user_id: m.user_id, spent: 0, spends: 0 }),
      email: m.email, role: m.role });
    byActor.delete(m.user_id);
  }
  for (const k of keys.data.filter((k) => k.kind === 'service' && k.org_id === org.id && !k.revoked_at)) {
    rows.push(byActor.get(k.id) || { actor_kind: 'service_key', service_key_id: k.id, spent: 0, spends: 0, keyName: k.name });
    byActor.delete(k.id);
  }
  rows.push(...byActor.values());
  rows.sort((a, b) => b.spent - a.spent);
  const label = (row) => row.email || (row.keyName ? `${row.keyName} (key)` : name(row));

  body.append(h('section', { class: 'card', 'aria-labelledby': 'period-title' },
    h('h2', { id: 'period-title' }, `This period: ${monthName(from)} (UTC)`),
    h('p', { class: 'muted' }, scopeNote(spend, org), ` ${fmtInt(spend.total_spent)} credits spent so far.`),
    rows.length
      ? table('Spend per member and key this period', ['Who', 'Kind', 'Spent', 'Spends', 'Limit'],
        rows.map((row) => h('tr', {},
          h('td', {}, label(row)), h('td', {}, kind(row)),
          h('td', { class: 'num' }, fmtInt(row.spent)), h('td', { class: 'num' }, fmtInt(row.spends)),
          h('td', { class: 'na', dataset: { feature: 'spend-limits' } }, 'Not available yet'))))
      : h('p', {}, 'Nothing was spent this period.')));

  if (isAdmin(role)) {
    body.append(notYet('spend-limits', 'Spend limits',
      'Admins will set a limit per member and per key here once spend controls exist.'));
  }
}
