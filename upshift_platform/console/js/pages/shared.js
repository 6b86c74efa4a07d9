// What several pages share: the usage call, actor names, role checks.

import { api, orgPath } from '../api.js';

export const canReadAudit = (role) => role === 'admin' || role === 'viewer';
export const isAdmin = (role) => role === 'admin';

export async function usageFor(org, { from, to, groupBy }) {
  return api(orgPath(org, '/usage'), {
    query: { from: from && from.toISOString(), to: to && to.toISOString(), group_by: groupBy },
  });
}

export function actorKey(row) {
  return row.user_id || row.service_key_id || 'system';
}

// A readable name for each actor id in a usage answer (members by email, keys by name).
export function actorNames(usage) {
  const names = new Map();
  for (const a of usage.actors || []) {
    names.set(a.id, a.kind === 'service_key' ? `${a.label} (key${a.revoked ? ', revoked' : ''})` : a.label);
  }
  return (row) => {
    if (row.user_id) return names.get(row.user_id) || `former member ${row.user_id.slice(0, 8)}`;
    if (row.service_key_id) return names.get(row.service_key_id) || `key ${row.service_key_id.slice(0, 8)}`;
    return 'Stripe take-backs (refunds, disputes)';
  };
}

// What kind of actor each row's is: the member's role, a service key, or the platform.
export function actorKinds(usage) {
  const roles = new Map((usage.actors || []).filter((a) => a.kind === 'user').map((a) => [a.id, a.role]));
  return (row) => {
    if (row.actor_kind === 'service_key') return 'service key';
    if (row.actor_kind === 'system') return 'platform';
    return row.role || roles.get(row.user_id) || 'former member';
  };
}

export function scopeNote(usage, org) {
  return usage.scope === 'own'
    ? `Your own spends from ${org.name}'s pool (your role, ${usage.role}, sees only those).`
    : `Every spend from ${org.name}'s pool.`;
}
