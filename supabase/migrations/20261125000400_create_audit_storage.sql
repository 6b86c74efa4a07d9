-- Audit log storage: append-only, tamper-evident, per-scope gapless sequence and hash chain.
--
-- A scope is an org (org events) or a user (personal events). Each row's hash covers its
-- content and the previous row's hash, and rows enter the chain only under a per-scope lock,
-- so the chain cannot fork or skip.
--
-- Two ways in. private.audit_append writes into the chain at once: most events, whose callers
-- want the seq back. private.audit_append_pending writes the event into an outbox, in the
-- caller's transaction and without any lock: the spend path, so that a hot org's spends do not
-- queue on its chain as well as on its balance. The sealer (private.seal_audit_scope) moves a
-- scope's outbox into its chain, in (created_at, id) order; it runs before every synchronous
-- append, in every read of a log (public.audit_scope: queries, exports, verification, heads;
-- and the purge), and in the background (public.seal_audit_logs, a few times a second). So an event
-- exists if and only if its transaction committed, and every read sees every committed event.
--
-- UPDATE, DELETE and TRUNCATE are refused by triggers that fire always (also with
-- session_replication_role = replica); the one exception is the retention purge, which writes a
-- permit for its own transaction, leaves a checkpoint the chain verifies from and records an
-- audit_purged event.

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
  'Immutable audit log. scope_id = org_id for org events, else the user whose personal log it is. seq is gapless '
  'per scope; hash = sha256(content, prev_hash). Rows enter only through private.audit_append and the sealer.';
comment on column public.audit_logs.user_id is 'The user who acted (actor_kind = user).';
comment on column public.audit_logs.service_key_id is 'The org service key that acted (actor_kind = service_key: CI).';
comment on column public.audit_logs.client_timestamp is 'The timestamp the client sent (not trusted for ordering).';
comment on column public.audit_logs.created_at is 'Server time of the event (clock_timestamp); the outbox is sealed in its order.';
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

create table private.audit_outbox (
  id bigint generated always as identity primary key,
  event public.audit_logs not null
);
comment on table private.audit_outbox is
  'Events committed with their transaction but not yet in the chain (seq, prev_hash, hash unset): the sealer moves '
  'them into audit_logs within a second. Only a primary key, so that writing one is cheap on the spend path.';
revoke all on table private.audit_outbox from public, anon, authenticated, service_role;
revoke all on sequence private.audit_outbox_id_seq from public, anon, authenticated, service_role;

create table private.audit_permits (
  txid xid8 not null default pg_current_xact_id(),
  scope_id uuid not null,
  through_seq bigint not null,
  primary key (txid, scope_id)
);
comment on table private.audit_permits is
  'Written only by private.purge_audit_scope for its own transaction: which rows the delete trigger lets go.';
revoke all on table private.audit_permits from public, anon, authenticated, service_role;

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

create function private.audit_row(p_scope_id uuid, p_org_id uuid, p_event_type text, p_resource_type text,
                                  p_resource_id text, p_metadata jsonb, p_client_timestamp timestamptz)
returns public.audit_logs
language plpgsql volatile security definer set search_path = '' as $$
declare
  v public.audit_logs;
begin
  v.user_id := (select auth.uid());
  if v.user_id is null then
    select s.key_id into v.service_key_id from private.service_key() s;
  end if;
  v.actor_kind := case when v.user_id is not null then 'user' when v.service_key_id is not null then 'service_key'
                       else 'system' end;
  v.id := gen_random_uuid();
  v.scope_id := p_scope_id;
  v.org_id := p_org_id;
  v.event_type := p_event_type;
  v.resource_type := p_resource_type;
  v.resource_id := p_resource_id;
  v.metadata := coalesce(p_metadata, '{}'::jsonb);
  v.ip := private.request_ip();
  v.user_agent := private.request_user_agent();
  v.client_timestamp := p_client_timestamp;
  v.created_at := clock_timestamp();
  return v;
end $$;
comment on function private.audit_row(uuid, uuid, text, text, text, jsonb, timestamptz) is
  'An unsealed event: the actor from the request''s claims, IP and user agent from request.headers, the time now.';
revoke all on function private.audit_row(uuid, uuid, text, text, text, jsonb, timestamptz)
  from public, anon, authenticated, service_role;

create function private.chain_head(p_scope_id uuid, out seq bigint, out hash bytea)
language plpgsql stable security definer set search_path = '' as $$
begin
  select l.seq, l.hash into seq, hash from public.audit_logs l where l.scope_id = p_scope_id order by l.seq desc limit 1;
  if seq is null then
    select c.seq, c.hash into seq, hash from public.audit_checkpoints c where c.scope_id = p_scope_id;
  end if;
  seq := coalesce(seq, 0);
  hash := coalesce(hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
end $$;
comment on function private.chain_head(uuid) is
  'The last seq and hash of a scope''s chain (its retention checkpoint, or 0 and the zero hash, when empty).';
revoke all on function private.chain_head(uuid) from public, anon, authenticated, service_role;

create function private.seal_audit_scope(p_scope_id uuid, p_wait boolean default true) returns integer
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_head record;
  v_events public.audit_logs[];
  v_rows public.audit_logs[] := '{}'::public.audit_logs[];
  r public.audit_logs;
begin
  -- One writer per scope at a time: the chain cannot fork, the sequence has no gaps. p_wait false: a
  -- background sealer leaves a scope to whoever holds it right now (they seal it).
  if p_wait then
    perform pg_advisory_xact_lock(hashtextextended('audit:' || p_scope_id::text, 0));
  elsif not pg_try_advisory_xact_lock(hashtextextended('audit:' || p_scope_id::text, 0)) then
    return 0;
  end if;
  -- A spend's credit_debit event is written before its balance is taken: its balance_after is its ledger row's.
  -- (Until that row exists, which only the spend's own transaction can see happen, the event waits.)
  with moved as (
    delete from private.audit_outbox o
    where (o.event).scope_id = p_scope_id
      and case when (o.event).event_type = 'credit_debit' and not (o.event).metadata ? 'balance_after'
               then exists (select 1 from public.credit_transactions t where t.id = (o.event).resource_id::uuid)
               else true end
    returning o.event)
  select array_agg(case when t.id is null then m.event else jsonb_populate_record(m.event, jsonb_build_object(
                     'metadata', (m.event).metadata || jsonb_build_object('balance_after', t.balance_after))) end
                   order by (m.event).created_at, (m.event).id)
  into v_events
  from moved m
  left join public.credit_transactions t
    on (m.event).event_type = 'credit_debit' and not (m.event).metadata ? 'balance_after'
   and t.id = case when (m.event).event_type = 'credit_debit' then (m.event).resource_id::uuid end;
  if v_events is null then
    return 0;
  end if;
  v_head := private.chain_head(p_scope_id);
  foreach r in array v_events loop
    r.seq := v_head.seq + 1;
    r.prev_hash := v_head.hash;
    r.hash := private.audit_hash(r);
    v_head.seq := r.seq;
    v_head.hash := r.hash;
    v_rows := v_rows || r;
  end loop;
  insert into public.audit_logs select * from unnest(v_rows);
  return cardinality(v_rows);
end $$;
comment on function private.seal_audit_scope(uuid, boolean) is
  'Move a scope''s outbox into its chain, in (created_at, id) order, under the scope''s lock (p_wait false: skip '
  'if someone holds it). Returns how many events were sealed.';
revoke all on function private.seal_audit_scope(uuid, boolean) from public, anon, authenticated, service_role;

create function private.audit_append(p_scope_id uuid, p_org_id uuid, p_event_type text, p_resource_type text,
                                     p_resource_id text, p_metadata jsonb, p_client_timestamp timestamptz default null)
returns public.audit_logs
language plpgsql volatile security definer set search_path = '' as $$
declare
  v public.audit_logs := private.audit_row(p_scope_id, p_org_id, p_event_type, p_resource_type, p_resource_id,
                                           p_metadata, p_client_timestamp);
  v_head record;
begin
  -- Under the scope's lock, with the outbox sealed first: this event goes at the head.
  perform private.seal_audit_scope(p_scope_id);
  v_head := private.chain_head(p_scope_id);
  v.seq := v_head.seq + 1;
  v.prev_hash := v_head.hash;
  v.created_at := clock_timestamp();
  v.hash := private.audit_hash(v);
  insert into public.audit_logs values (v.*);
  return v;
end $$;
comment on function private.audit_append(uuid, uuid, text, text, text, jsonb, timestamptz) is
  'Append one event to a scope''s chain at once (its seq comes back). Rows enter audit_logs only here and through '
  'the sealer.';
revoke all on function private.audit_append(uuid, uuid, text, text, text, jsonb, timestamptz)
  from public, anon, authenticated, service_role;

create function private.audit_append_pending(p_scope_id uuid, p_org_id uuid, p_event_type text, p_resource_type text,
                                             p_resource_id text, p_metadata jsonb) returns uuid
language plpgsql volatile security definer set search_path = '' as $$
declare
  v public.audit_logs := private.audit_row(p_scope_id, p_org_id, p_event_type, p_resource_type, p_resource_id,
                                           p_metadata, null);
begin
  insert into private.audit_outbox (event) values (v);
  return v.id;
end $$;
comment on function private.audit_append_pending(uuid, uuid, text, text, text, jsonb) is
  'Write one event into the outbox, with no lock: committed with the caller''s transaction, sealed within a second.';
revoke all on function private.audit_append_pending(uuid, uuid, text, text, text, jsonb)
  from public, anon, authenticated, service_role;

-- Append-only ------------------------------------------------------------------------------

create function private.audit_logs_guard() returns trigger
language plpgsql security definer set search_path = '' as $$
begin
  if tg_op = 'DELETE' and exists (
      select 1 from private.audit_permits p
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
