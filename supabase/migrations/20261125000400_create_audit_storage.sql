-- Audit log storage: append-only, tamper-evident, per-scope gapless sequence and hash chain.
--
-- A scope is an org (org events) or a user (personal events). Each row's hash covers its
-- content and the previous row's hash; rows are appended only by private.audit_append, under
-- a per-scope lock, so concurrent appends cannot fork a chain. UPDATE, DELETE and TRUNCATE are
-- refused by triggers that fire always (also with session_replication_role = replica); the
-- retention purge (private.purge_audit_scope) is the one deletion path: it writes a permit for
-- its own transaction that the delete trigger checks, leaves a checkpoint the chain verifies
-- from, and records an audit_purged event.

alter table public.orgs add column audit_retention_days integer
  constraint orgs_audit_retention_days_check check (audit_retention_days between 1 and 3650);
comment on column public.orgs.audit_retention_days is
  'Audit log retention set by the platform operator; null = by plan (pro 90 days, team 365).';

create table public.audit_logs (
  id uuid primary key default gen_random_uuid(),
  scope_id uuid not null,
  seq bigint not null,
  org_id uuid,
  user_id uuid,
  actor_kind text not null,
  service_key_id uuid,
  event_type text not null,
  resource_type text not null,
  resource_id text,
  metadata jsonb not null default '{}'::jsonb,
  ip inet,
  user_agent text,
  client_timestamp timestamptz,
  created_at timestamptz not null,
  prev_hash bytea not null,
  hash bytea not null,
  constraint audit_logs_scope_seq_key unique (scope_id, seq),
  constraint audit_logs_seq_positive check (seq > 0),
  constraint audit_logs_scope_matches_org check (org_id is null or scope_id = org_id),
  constraint audit_logs_actor_kind_check check (actor_kind in ('user', 'service_key', 'system')),
  constraint audit_logs_actor_consistent check (
    (actor_kind = 'user' and user_id is not null and service_key_id is null)
    or (actor_kind = 'service_key' and service_key_id is not null and user_id is null)
    or (actor_kind = 'system' and user_id is null and service_key_id is null)),
  constraint audit_logs_event_type_format check (event_type ~ '^[a-z][a-z0-9_.]{0,63}$'),
  constraint audit_logs_resource_type_length check (length(resource_type) between 1 and 64),
  constraint audit_logs_resource_id_length check (length(resource_id) <= 512),
  constraint audit_logs_metadata_object check (jsonb_typeof(metadata) = 'object'),
  constraint audit_logs_user_agent_length check (length(user_agent) <= 512)
);
create index audit_logs_scope_created_idx on public.audit_logs (scope_id, created_at desc, id desc);
create index audit_logs_scope_event_created_idx on public.audit_logs (scope_id, event_type, created_at desc, id desc);
comment on table public.audit_logs is
  'Immutable audit log. scope_id = org_id for org events, else the user whose personal log it is. '
  'seq is gapless per scope; hash = sha256(content, prev_hash). Append with private.audit_append only.';
comment on column public.audit_logs.user_id is 'The user who acted (actor_kind = user).';
comment on column public.audit_logs.service_key_id is 'The org service key that acted (actor_kind = service_key: CI).';
comment on column public.audit_logs.client_timestamp is 'The timestamp the client sent (not trusted for ordering).';
comment on column public.audit_logs.created_at is 'Server time of the append (clock_timestamp under the scope lock).';
alter table public.audit_logs enable row level security;
revoke all on table public.audit_logs from anon, authenticated, service_role;
grant select on table public.audit_logs to authenticated, service_role;

create table public.audit_checkpoints (
  scope_id uuid primary key,
  seq bigint not null,
  hash bytea not null,
  purged_rows bigint not null default 0,
  purged_at timestamptz not null default now()
);
comment on table public.audit_checkpoints is
  'Where a purged scope''s chain now starts: the seq and hash of the last purged row.';
alter table public.audit_checkpoints enable row level security;
revoke all on table public.audit_checkpoints from anon, authenticated, service_role;
grant select on table public.audit_checkpoints to authenticated, service_role;

create table private.audit_purge_permits (
  txid xid8 not null default pg_current_xact_id(),
  scope_id uuid not null,
  through_seq bigint not null,
  primary key (txid, scope_id)
);
comment on table private.audit_purge_permits is
  'Written only by private.purge_audit_scope for its own transaction: which rows the delete trigger lets go.';
revoke all on table private.audit_purge_permits from public, anon, authenticated, service_role;

-- Hashing ----------------------------------------------------------------------------------

create function private.audit_hash(l public.audit_logs) returns bytea
language plpgsql immutable set search_path = '' as $$
begin
  return sha256(convert_to(jsonb_build_array(
    l.scope_id, l.seq, l.org_id, l.user_id, l.actor_kind, l.service_key_id, l.event_type, l.resource_type,
    l.resource_id, l.metadata, l.ip::text, l.user_agent,
    to_char(l.client_timestamp at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    to_char(l.created_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    encode(l.prev_hash, 'hex'))::text, 'UTF8'));
end $$;
comment on function private.audit_hash(public.audit_logs) is
  'sha256 over a canonical JSON array of the row''s content and prev_hash.';
revoke all on function private.audit_hash(public.audit_logs) from public, anon, authenticated, service_role;

-- Appending --------------------------------------------------------------------------------

create function private.audit_append(p_scope_id uuid, p_org_id uuid, p_event_type text, p_resource_type text,
                                     p_resource_id text, p_metadata jsonb, p_client_timestamp timestamptz default null)
returns public.audit_logs
language plpgsql volatile security definer set search_path = '' as $$
declare
  v public.audit_logs;
  v_key uuid;
begin
  v.user_id := (select auth.uid());
  if v.user_id is null then
    select s.key_id into v_key from private.service_key() s;
  end if;
  v.actor_kind := case when v.user_id is not null then 'user' when v_key is not null then 'service_key'
                       else 'system' end;
  v.service_key_id := v_key;
  -- One writer per scope at a time: the chain cannot fork, the sequence has no gaps.
  perform pg_advisory_xact_lock(hashtextextended('audit:' || p_scope_id::text, 0));
  select l.seq, l.hash into v.seq, v.prev_hash from public.audit_logs l
  where l.scope_id = p_scope_id order by l.seq desc limit 1;
  if v.seq is null then
    select c.seq, c.hash into v.seq, v.prev_hash from public.audit_checkpoints c where c.scope_id = p_scope_id;
  end if;
  v.id := gen_random_uuid();
  v.scope_id := p_scope_id;
  v.seq := coalesce(v.seq, 0) + 1;
  v.prev_hash := coalesce(v.prev_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
  v.org_id := p_org_id;
  v.event_type := p_event_type;
  v.resource_type := p_resource_type;
  v.resource_id := p_resource_id;
  v.metadata := coalesce(p_metadata, '{}'::jsonb);
  v.ip := private.request_ip();
  v.user_agent := private.request_user_agent();
  v.client_timestamp := p_client_timestamp;
  v.created_at := clock_timestamp();
  v.hash := private.audit_hash(v);
  insert into public.audit_logs values (v.*);
  return v;
end $$;
comment on function private.audit_append(uuid, uuid, text, text, text, jsonb, timestamptz) is
  'Append one event to a scope''s chain; the actor comes from the request''s claims, IP and user agent from '
  'request.headers. The only way rows enter audit_logs.';
revoke all on function private.audit_append(uuid, uuid, text, text, text, jsonb, timestamptz) from public, anon, authenticated, service_role;

-- Append-only ------------------------------------------------------------------------------

create function private.audit_logs_guard() returns trigger
language plpgsql security definer set search_path = '' as $$
begin
  if tg_op = 'DELETE' and exists (
      select 1 from private.audit_purge_permits p
      where p.txid = pg_current_xact_id() and p.scope_id = old.scope_id and old.seq <= p.through_seq) then
    return old;  -- private.purge_audit_scope, the retention purge, in this very transaction
  end if;
  perform private.err(403, 'append_only', format('audit_logs is append-only: %s is not allowed', tg_op));
  return null;
end $$;
comment on function private.audit_logs_guard() is
  'Trigger: refuse UPDATE, DELETE and TRUNCATE on audit_logs, except the retention purge''s own deletes.';
revoke all on function private.audit_logs_guard() from public, anon, authenticated, service_role;

create trigger audit_logs_no_update before update on public.audit_logs
  for each row execute function private.audit_logs_guard();
create trigger audit_logs_no_delete before delete on public.audit_logs
  for each row execute function private.audit_logs_guard();
create trigger audit_logs_no_truncate before truncate on public.audit_logs
  for each statement execute function private.audit_logs_guard();
alter table public.audit_logs enable always trigger audit_logs_no_update;
alter table public.audit_logs enable always trigger audit_logs_no_delete;
alter table public.audit_logs enable always trigger audit_logs_no_truncate;

-- Verification and retention ---------------------------------------------------------------

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
  'Recompute a scope''s chain from its checkpoint: ok, or the first missing or broken sequence number.';
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
  perform pg_advisory_xact_lock(hashtextextended('audit:' || p_scope_id::text, 0));
  -- created_at grows with seq within a scope (taken under the lock), so this is a prefix.
  select max(l.seq) into v_last from public.audit_logs l where l.scope_id = p_scope_id and l.created_at < v_cutoff;
  if v_last is null then
    return 0;
  end if;
  select l.hash into v_hash from public.audit_logs l where l.scope_id = p_scope_id and l.seq = v_last;
  insert into private.audit_purge_permits (scope_id, through_seq) values (p_scope_id, v_last);
  delete from public.audit_logs l where l.scope_id = p_scope_id and l.seq <= v_last;
  get diagnostics v_deleted = row_count;
  delete from private.audit_purge_permits p where p.txid = pg_current_xact_id() and p.scope_id = p_scope_id;
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

-- RLS ---------------------------------------------------------------------------------------

create function private.can_read_org_audit(p_org_id uuid) returns boolean
language sql stable security definer set search_path = '' as $$
  select exists (
    select 1 from public.org_members m join public.orgs o on o.id = m.org_id
    where m.org_id = p_org_id and m.user_id = (select auth.uid()) and m.role in ('admin', 'viewer')
      and o.plan = 'team')
$$;
comment on function private.can_read_org_audit(uuid) is
  'May the calling user read the org''s audit log (admin or viewer, Team plan)?';
revoke all on function private.can_read_org_audit(uuid) from public, anon, authenticated, service_role;
grant execute on function private.can_read_org_audit(uuid) to authenticated;  -- RLS policies

create policy audit_logs_select on public.audit_logs for select to authenticated
  using (
    case when org_id is null
      then scope_id = (select auth.uid())
      else (select private.can_read_org_audit(org_id))
    end
  );
create policy audit_checkpoints_select on public.audit_checkpoints for select to authenticated
  using (scope_id = (select auth.uid()) or (select private.can_read_org_audit(scope_id)));
