-- Audit log verification and retention: recomputing a scope's chain, and the retention purge,
-- the one path by which audit rows are ever deleted (it leaves a checkpoint the chain verifies
-- from, and records the purge itself as an audit_purged event).

create function private.verify_audit_scope(p_scope_id uuid) returns jsonb
language plpgsql stable security definer set search_path = '' as $$
declare
  v_cp public.audit_checkpoints;
  v_expected bigint;
  v_prev bytea;
  v_checked bigint := 0;
  r public.audit_logs;
begin
  select * into v_cp from public.audit_checkpoints c where c.scope_id = p_scope_id;
  v_expected := coalesce(v_cp.seq, 0) + 1;
  v_prev := coalesce(v_cp.hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
  for r in select * from public.audit_logs l where l.scope_id = p_scope_id order by l.seq loop
    if r.seq <> v_expected then
      return jsonb_build_object('ok', false, 'scope_id', p_scope_id, 'checked', v_checked,
        'first_bad_seq', v_expected, 'reason', 'missing',
        'message', format('Sequence number %s is missing (next present: %s).', v_expected, r.seq));
    end if;
    if r.prev_hash <> v_prev then
      return jsonb_build_object('ok', false, 'scope_id', p_scope_id, 'checked', v_checked,
        'first_bad_seq', r.seq, 'reason', 'broken_link',
        'message', format('Row %s does not follow row %s (prev_hash differs).', r.seq, r.seq - 1));
    end if;
    if r.hash <> private.audit_hash(r) then
      return jsonb_build_object('ok', false, 'scope_id', p_scope_id, 'checked', v_checked,
        'first_bad_seq', r.seq, 'reason', 'content_mismatch',
        'message', format('Row %s was changed after it was written (hash differs).', r.seq));
    end if;
    v_prev := r.hash;
    v_expected := v_expected + 1;
    v_checked := v_checked + 1;
  end loop;
  return jsonb_build_object('ok', true, 'scope_id', p_scope_id, 'checked', v_checked,
    'first_seq', case when v_checked > 0 then coalesce(v_cp.seq, 0) + 1 end,
    'head_seq', v_expected - 1, 'head_hash', encode(v_prev, 'hex'),
    'checkpoint', case when v_cp.scope_id is not null then
      jsonb_build_object('seq', v_cp.seq, 'hash', encode(v_cp.hash, 'hex'), 'purged_at', v_cp.purged_at) end);
end $$;
comment on function private.verify_audit_scope(uuid) is
  'Recompute a scope''s chain from its checkpoint: ok, or the first missing or broken sequence number (callers '
  'seal the outbox first).';
revoke all on function private.verify_audit_scope(uuid) from public, anon, authenticated, service_role;

create function private.audit_retention_days(p_scope_id uuid) returns integer
language sql stable security definer set search_path = '' as $$
  select coalesce(
    (select coalesce(o.audit_retention_days, case o.plan when 'team' then 365 else 90 end)
       from public.orgs o where o.id = p_scope_id),
    90)
$$;
comment on function private.audit_retention_days(uuid) is
  'Retention of a scope: the org''s operator setting, else by plan (team 365, pro 90); personal logs 90.';
revoke all on function private.audit_retention_days(uuid) from public, anon, authenticated, service_role;

create function private.purge_audit_scope(p_scope_id uuid, p_now timestamptz) returns bigint
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_cutoff timestamptz := p_now - make_interval(days => private.audit_retention_days(p_scope_id));
  v_last bigint;
  v_hash bytea;
  v_deleted bigint;
begin
  perform private.seal_audit_scope(p_scope_id);  -- takes the scope's lock; the chain is whole below
  -- A prefix of the chain: everything before the first row still inside the retention (pending rows are
  -- sealed in created_at order, but a sealed row may have been created a little after a later one).
  select coalesce((select min(l.seq) - 1 from public.audit_logs l where l.scope_id = p_scope_id
                   and l.created_at >= v_cutoff),
                  (select max(l.seq) from public.audit_logs l where l.scope_id = p_scope_id))
    into v_last;
  if v_last is null or v_last <= coalesce((select c.seq from public.audit_checkpoints c where c.scope_id = p_scope_id), 0)
  then
    return 0;
  end if;
  select l.hash into v_hash from public.audit_logs l where l.scope_id = p_scope_id and l.seq = v_last;
  insert into private.audit_permits (scope_id, through_seq) values (p_scope_id, v_last);
  delete from public.audit_logs l where l.scope_id = p_scope_id and l.seq <= v_last;
  get diagnostics v_deleted = row_count;
  delete from private.audit_permits p where p.txid = pg_current_xact_id() and p.scope_id = p_scope_id;
  insert into public.audit_checkpoints as c (scope_id, seq, hash, purged_rows, purged_at)
  values (p_scope_id, v_last, v_hash, v_deleted, now())
  on conflict (scope_id) do update
    set seq = excluded.seq, hash = excluded.hash, purged_rows = c.purged_rows + excluded.purged_rows,
        purged_at = excluded.purged_at;
  -- The purge itself is evidence: the chain goes on from the checkpoint with this event.
  perform private.audit_append(p_scope_id, (select o.id from public.orgs o where o.id = p_scope_id), 'audit_purged',
    'audit_log', p_scope_id::text, jsonb_build_object('deleted', v_deleted, 'through_seq', v_last,
      'through_hash', encode(v_hash, 'hex'), 'cutoff', v_cutoff, 'as_of', p_now,
      'retention_days', private.audit_retention_days(p_scope_id)));
  return v_deleted;
end $$;
comment on function private.purge_audit_scope(uuid, timestamptz) is
  'Retention: delete a scope''s rows older than its retention (a prefix of the chain), keep a checkpoint and '
  'record audit_purged. The only path by which audit rows are ever deleted.';
revoke all on function private.purge_audit_scope(uuid, timestamptz) from public, anon, authenticated, service_role;

