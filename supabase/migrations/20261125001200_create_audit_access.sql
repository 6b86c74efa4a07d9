-- Reading the audit log: who may (private.context: an org's admins and viewers on the Team
-- plan, or the caller's personal log when the request has no org context), recording exports,
-- verifying the chain, the head that signed checkpoints cover, and the retention purge.
--
-- Tail truncation: the hash chain shows that no row inside the log was changed or removed, but a
-- log whose newest rows were deleted is a shorter chain that still verifies. So a caller takes
-- signed checkpoints of the head (public.audit_head; the audit function signs it with a key the
-- database does not hold) and keeps them outside the platform; later,
-- public.verify_audit_checkpoint says whether the log still holds that row with that hash.

create function public.audit_scope(org text default null) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  c private.org_context := private.context(audit_scope.org, array['admin', 'viewer'], 'audit_role_required',
                                           'read its audit log');
  v_plan text;
begin
  if c.org_id is null then
    if (select auth.uid()) is null then
      perform private.err(403, 'user_required', 'Reading audit logs needs a signed-in user.');
    end if;
    perform private.seal_audit_scope((select auth.uid()));  -- a read sees every committed event
    return jsonb_build_object('scope_id', (select auth.uid()), 'org_id', null, 'kind', 'user');
  end if;
  select o.plan into v_plan from public.orgs o where o.id = c.org_id;
  if v_plan <> 'team' then
    perform private.err(403, 'team_plan_required',
      format('Org audit logs are a Team plan feature; %s is on the %s plan.', c.slug, v_plan),
      jsonb_build_object('org', c.slug, 'plan', v_plan));
  end if;
  perform private.seal_audit_scope(c.org_id);  -- a read sees every committed event
  return jsonb_build_object('scope_id', c.org_id, 'org_id', c.org_id, 'kind', 'org', 'role', c.role);
end $$;
comment on function public.audit_scope(text) is
  'Whose audit log the caller may read (the org context''s, or theirs), with its outbox sealed into the chain.';
revoke all on function public.audit_scope(text) from public, anon, authenticated, service_role;
grant execute on function public.audit_scope(text) to authenticated;

create function public.record_audit_export(org text default null, format text default 'ndjson',
                                           filters jsonb default '{}') returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_scope jsonb := public.audit_scope(record_audit_export.org);
  v_filters jsonb := coalesce(record_audit_export.filters, '{}'::jsonb);
  v_row public.audit_logs;
begin
  -- What goes into the immutable log is only what an export can be asked for: a known format and the
  -- query's own filters, of their own types and sizes.
  perform private.check_in(record_audit_export.format, array['csv', 'ndjson'], 'format');
  if jsonb_typeof(v_filters) <> 'object' or length(v_filters::text) > 4096
     or exists (select 1 from jsonb_each(v_filters) f
                where f.key not in ('since', 'until', 'event_type', 'actor', 'resource_type', 'resource_id')
                   or (f.key = 'event_type' and (jsonb_typeof(f.value) <> 'array' or jsonb_array_length(f.value) > 20
                       or exists (select 1 from jsonb_array_elements(f.value) e where jsonb_typeof(e) <> 'string')))
                   or (f.key <> 'event_type' and jsonb_typeof(f.value) <> 'string')) then
    perform private.err(400, 'invalid_filters',
      'filters is an object of since, until, event_type (a list of at most 20), actor, resource_type, resource_id '
      '(at most 4 KB).', '{"field": "filters"}');
  end if;
  v_row := private.audit_append((v_scope ->> 'scope_id')::uuid, (v_scope ->> 'org_id')::uuid, 'audit_export',
    'audit_log', v_scope ->> 'scope_id',
    jsonb_build_object('format', record_audit_export.format, 'filters', v_filters));
  return v_scope || jsonb_build_object('export_event_id', v_row.id, 'export_event_seq', v_row.seq);
end $$;
comment on function public.record_audit_export(text, text, jsonb) is
  'Check export access and record the export itself as an audit event (before the rows are streamed).';
revoke all on function public.record_audit_export(text, text, jsonb) from public, anon, authenticated, service_role;
grant execute on function public.record_audit_export(text, text, jsonb) to authenticated;

create function public.verify_audit_log(org text default null) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_scope jsonb := public.audit_scope(verify_audit_log.org);
begin
  return private.verify_audit_scope((v_scope ->> 'scope_id')::uuid) || jsonb_build_object('org_id', v_scope -> 'org_id');
end $$;
comment on function public.verify_audit_log(text) is
  'Recompute the caller''s (or an org''s, admin/viewer, Team) audit chain: ok, or the first bad sequence number.';
revoke all on function public.verify_audit_log(text) from public, anon, authenticated, service_role;
grant execute on function public.verify_audit_log(text) to authenticated;

create function public.audit_head(org text default null) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_scope jsonb := public.audit_scope(audit_head.org);
  v_scope_id uuid := (v_scope ->> 'scope_id')::uuid;
  v_seq bigint;
  v_hash bytea;
begin
  -- audit_scope sealed the outbox; appends are serialised per scope and commit in seq order, so the
  -- snapshot now holds a prefix of the chain: its last row is the head (or the retention checkpoint, or 0).
  select h.seq, h.hash into v_seq, v_hash from private.chain_head(v_scope_id) h;
  return jsonb_build_object(
    'scope_id', v_scope_id,
    'org_id', v_scope -> 'org_id',
    'seq', coalesce(v_seq, 0),
    'hash', encode(coalesce(v_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea),
                   'hex'));
end $$;
revoke all on function public.audit_head(text) from public, anon, authenticated, service_role;
grant execute on function public.audit_head(text) to authenticated;
comment on function public.audit_head(text) is
  'The head (seq, hex hash) of the caller''s audit log, or an org''s (admin/viewer, Team plan): what a signed '
  'checkpoint covers. An empty log: the retention checkpoint''s head, else seq 0 and the zero hash.';

create function public.verify_audit_checkpoint(checkpoint_seq bigint, checkpoint_hash text, org text default null)
returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_zero constant bytea := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
  v_scope jsonb;
  v_scope_id uuid;
  v_hash bytea;
  v_cp public.audit_checkpoints;
  v_row_hash bytea;
  v_found boolean := false;
  v_head bigint;
  v_status text;
  v_message text;
  v_check jsonb;
  v_result jsonb;
begin
  if verify_audit_checkpoint.checkpoint_seq is null or verify_audit_checkpoint.checkpoint_hash is null then
    perform private.err(400, 'checkpoint_incomplete',
      'Give both checkpoint_seq and checkpoint_hash (or neither, for a plain verification).',
      jsonb_build_object('field', case when verify_audit_checkpoint.checkpoint_seq is null
                                       then 'checkpoint_seq' else 'checkpoint_hash' end));
  end if;
  if verify_audit_checkpoint.checkpoint_seq < 0 then
    perform private.err(400, 'invalid_checkpoint_seq', 'checkpoint_seq is a whole number >= 0.',
                        '{"field": "checkpoint_seq"}');
  end if;
  if verify_audit_checkpoint.checkpoint_hash !~ '^[0-9A-Fa-f]{64}$' then
    perform private.err(400, 'invalid_checkpoint_hash', 'checkpoint_hash is 64 hex digits (a sha256).',
                        '{"field": "checkpoint_hash"}');
  end if;
  v_hash := decode(verify_audit_checkpoint.checkpoint_hash, 'hex');
  v_scope := public.audit_scope(verify_audit_checkpoint.org);
  v_scope_id := (v_scope ->> 'scope_id')::uuid;
  v_result := private.verify_audit_scope(v_scope_id) || jsonb_build_object('org_id', v_scope -> 'org_id');
  select * into v_cp from public.audit_checkpoints c where c.scope_id = v_scope_id;

  if v_cp.scope_id is not null and verify_audit_checkpoint.checkpoint_seq < v_cp.seq then
    v_status := 'purged';
    v_message := format('Checkpoint seq %s is older than the retention purge (rows up to seq %s were deleted at %s): '
                        'it can no longer be confirmed or refuted.',
                        verify_audit_checkpoint.checkpoint_seq, v_cp.seq, v_cp.purged_at);
  else
    if v_cp.scope_id is not null and verify_audit_checkpoint.checkpoint_seq = v_cp.seq then
      v_found := true;  -- the row itself was purged; the retention checkpoint kept its hash
      v_row_hash := v_cp.hash;
    elsif verify_audit_checkpoint.checkpoint_seq = 0 then
      v_found := true;  -- the empty log
      v_row_hash := v_zero;
    else
      select l.hash into v_row_hash from public.audit_logs l
      where l.scope_id = v_scope_id and l.seq = verify_audit_checkpoint.checkpoint_seq;
      v_found := found;
    end if;
    if not v_found then
      v_status := 'missing';
      select coalesce(max(l.seq), v_cp.seq, 0) into v_head from public.audit_logs l where l.scope_id = v_scope_id;
      if v_head < verify_audit_checkpoint.checkpoint_seq then
        v_message := format('The log no longer holds row %s of the checkpoint: its head is now seq %s, so rows from '
                            'seq %s on were removed.', verify_audit_checkpoint.checkpoint_seq, v_head, v_head + 1);
      else
        v_message := format('The log no longer holds row %s of the checkpoint (its head is seq %s): the row was '
                            'removed.', verify_audit_checkpoint.checkpoint_seq, v_head);
      end if;
    elsif v_row_hash <> v_hash then
      v_status := 'mismatch';
      v_message := format('Row %s no longer has the checkpoint''s hash: it was changed or replaced after the '
                          'checkpoint was taken.', verify_audit_checkpoint.checkpoint_seq);
    else
      v_status := 'confirmed';
      v_message := format('The log still holds row %s with the checkpoint''s hash.',
                          verify_audit_checkpoint.checkpoint_seq);
    end if;
  end if;

  v_check := jsonb_build_object('status', v_status, 'seq', verify_audit_checkpoint.checkpoint_seq,
                                'hash', lower(verify_audit_checkpoint.checkpoint_hash), 'message', v_message);
  if v_status = 'purged' then
    v_check := v_check || jsonb_build_object('purged_through', v_cp.seq, 'purged_at', v_cp.purged_at);
  elsif v_status = 'mismatch' then
    v_check := v_check || jsonb_build_object('found_hash', encode(v_row_hash, 'hex'));
  end if;
  -- verify_audit_scope's "checkpoint" is the retention checkpoint; here "checkpoint" is the caller's.
  v_result := (v_result - 'checkpoint')
    || jsonb_build_object('retention_checkpoint', v_result -> 'checkpoint', 'checkpoint', v_check);
  if v_status in ('missing', 'mismatch') then
    if (v_result ->> 'ok')::boolean then
      v_result := v_result || jsonb_build_object('first_bad_seq',
        case when v_status = 'missing' then least(v_head + 1, verify_audit_checkpoint.checkpoint_seq)
             else verify_audit_checkpoint.checkpoint_seq end);
    else
      -- The chain is broken as well: its finding stays, under chain_reason / chain_message.
      v_result := v_result || jsonb_build_object('chain_reason', v_result -> 'reason',
                                                 'chain_message', v_result -> 'message');
    end if;
    v_result := v_result || jsonb_build_object('ok', false, 'reason', 'checkpoint_' || v_status,
                                               'message', v_message);
  end if;
  return v_result;
end $$;
revoke all on function public.verify_audit_checkpoint(bigint, text, text) from public, anon, authenticated, service_role;
grant execute on function public.verify_audit_checkpoint(bigint, text, text) to authenticated;
comment on function public.verify_audit_checkpoint(bigint, text, text) is
  'Verify the caller''s (or an org''s, admin/viewer, Team) audit chain and that it still holds the checkpoint row '
  '(seq, hex hash) taken earlier: ok false with reason checkpoint_missing / checkpoint_mismatch when rows at or after '
  'it were removed or changed; a checkpoint older than the retention purge is reported as purged.';

create function public.purge_audit_logs(as_of timestamptz default now()) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  r record;
  v_deleted bigint;
  v_total bigint := 0;
  v_scopes integer := 0;
  v_as_of timestamptz;
begin
  perform private.require_backend('purge_audit_logs');
  if purge_audit_logs.as_of > clock_timestamp() then
    perform private.err(400, 'invalid_as_of',
      'as_of cannot be in the future: a purge never deletes events that are still inside their retention.',
      '{"field": "as_of"}');
  end if;
  v_as_of := coalesce(purge_audit_logs.as_of, now());
  for r in
    select l.scope_id, min(l.created_at) as oldest from public.audit_logs l group by l.scope_id
  loop
    if r.oldest < v_as_of - make_interval(days => private.audit_retention_days(r.scope_id)) then
      v_deleted := private.purge_audit_scope(r.scope_id, v_as_of);
      if v_deleted > 0 then
        v_total := v_total + v_deleted;
        v_scopes := v_scopes + 1;
      end if;
    end if;
  end loop;
  return jsonb_build_object('scopes', v_scopes, 'deleted', v_total, 'as_of', v_as_of);
end $$;
comment on function public.purge_audit_logs(timestamptz) is
  'Operator (service_role): delete audit rows older than each scope''s retention, keeping a checkpoint so the '
  'remaining chain still verifies.';
revoke all on function public.purge_audit_logs(timestamptz) from public, anon, authenticated, service_role;
grant execute on function public.purge_audit_logs(timestamptz) to service_role;  -- backend only

create function public.seal_audit_logs(max_scopes integer default 1000) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_scopes integer := 0;
  v_sealed bigint := 0;
  v_n integer;
  r record;
begin
  perform private.require_backend('seal_audit_logs');
  for r in select distinct (o.event).scope_id from private.audit_outbox o limit greatest(max_scopes, 1) loop
    v_n := private.seal_audit_scope(r.scope_id, false);  -- a scope someone is sealing right now is theirs
    if v_n > 0 then
      v_scopes := v_scopes + 1;
      v_sealed := v_sealed + v_n;
    end if;
  end loop;
  return jsonb_build_object('scopes', v_scopes, 'sealed', v_sealed);
end $$;
comment on function public.seal_audit_logs(integer) is
  'Backend (the background sealer): move every scope''s outbox that nobody is sealing right now into its chain.';
revoke all on function public.seal_audit_logs(integer) from public, anon, authenticated, service_role;
grant execute on function public.seal_audit_logs(integer) to service_role;  -- backend only
