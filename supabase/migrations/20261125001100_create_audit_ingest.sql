-- Audit ingest: the events clients post (the upshift CLI's upgrade / fix / scan_upload, or any
-- type of their own), checked here field by field, recorded all or nothing, idempotent per actor
-- and key. Types the platform writes itself (and anything that looks like them) are refused.

create function private.platform_event_types() returns text[]
language sql immutable set search_path = '' as $$
  select array['org_created', 'org_updated', 'member_added', 'member_removed', 'member_role_changed',
               'invite_created', 'invite_revoked', 'invite_accepted', 'api_key_created', 'api_key_revoked',
               'credit_debit', 'credits_granted', 'credits_purchased', 'credits_refunded', 'credits_restored',
               'plan_changed', 'audit_export', 'audit_purged']
$$;
comment on function private.platform_event_types() is
  'Event types only the platform writes; clients cannot post them.';
revoke all on function private.platform_event_types() from public, anon, authenticated, service_role;

create function private.reserved_event_type(p_type text) returns boolean
language plpgsql immutable set search_path = '' as $$
begin
  -- A platform type, a variant of one (credits_granted.manual), or any type that begins with the name of
  -- a family the platform writes or will write (credit..., member..., webhook..., ...): a client event
  -- must never pass for one.
  return p_type = any (private.platform_event_types())
      or split_part(p_type, '.', 1) = any (private.platform_event_types())
      or p_type ~ ('^(credit|audit|api_?key|member|invite|org|plan|spend_limit|hold|webhook|stripe'
                   '|subscription|topup|balance|platform|upshift)');
end $$;
comment on function private.reserved_event_type(text) is
  'Is this event type reserved for the platform (a platform type, a dotted variant of one, or a reserved family)?';
revoke all on function private.reserved_event_type(text) from public, anon, authenticated, service_role;

create table public.audit_ingest_keys (
  actor_id uuid not null,
  idempotency_key text not null,
  request_hash text not null,
  result jsonb not null,
  created_at timestamptz not null default now(),
  primary key (actor_id, idempotency_key),
  constraint audit_ingest_keys_key_length check (length(idempotency_key) between 1 and 200)
);
comment on table public.audit_ingest_keys is
  'Idempotency keys of audit ingest requests (per actor: user or service key) and what they returned.';
alter table public.audit_ingest_keys enable row level security;
revoke all on table public.audit_ingest_keys from anon, authenticated, service_role;
grant select on table public.audit_ingest_keys to service_role;

-- Ingest -----------------------------------------------------------------------------------

create function private.ingest_error(p_status integer, p_code text, p_index integer, p_field text, p_message text)
returns void
language plpgsql set search_path = '' as $$
begin
  perform private.err(p_status, p_code, format('events[%s].%s: %s', p_index, p_field, p_message),
    jsonb_build_object('field', format('events[%s].%s', p_index, p_field), 'index', p_index));
end $$;
revoke all on function private.ingest_error(integer, text, integer, text, text) from public, anon, authenticated, service_role;

create function private.is_count(v jsonb) returns boolean
language plpgsql immutable set search_path = '' as $$
begin
  return coalesce(jsonb_typeof(v) = 'number' and (v::text)::numeric between 0 and 1000000
                  and (v::text)::numeric = trunc((v::text)::numeric), false);  -- missing: not a count
end $$;
comment on function private.is_count(jsonb) is 'Is this JSON value a whole number from 0 to 1000000 (a count)?';
revoke all on function private.is_count(jsonb) from public, anon, authenticated, service_role;

create function private.check_audit_event(e jsonb, i integer) returns void
language plpgsql set search_path = '' as $$
declare
  v_type text := e ->> 'event_type';
  m jsonb := coalesce(e -> 'metadata', '{}'::jsonb);
  f text;
begin
  if jsonb_typeof(e) is distinct from 'object' then
    perform private.err(400, 'invalid_event', format('events[%s] is not an object.', i),
                        jsonb_build_object('field', format('events[%s]', i), 'index', i));
  end if;
  if jsonb_typeof(e -> 'event_type') is distinct from 'string' then
    perform private.ingest_error(400, 'invalid_event', i, 'event_type', 'required, a string.');
  elsif v_type !~ '^[a-z][a-z0-9_.]{0,63}$' then
    perform private.ingest_error(400, 'invalid_event_type', i, 'event_type',
      'must match ^[a-z][a-z0-9_.]{0,63}$.');
  elsif private.reserved_event_type(v_type) then
    perform private.ingest_error(400, 'reserved_event_type', i, 'event_type',
      format('%s is reserved: types that begin with credit, audit, api_key, member, invite, org, plan, spend_limit, '
             'hold, webhook, stripe, subscription, topup, balance, platform or upshift are the platform''s own.',
             v_type));
  end if;
  if jsonb_typeof(e -> 'resource_type') is distinct from 'string'
     or length(e ->> 'resource_type') not between 1 and 64 then
    perform private.ingest_error(400, 'invalid_event', i, 'resource_type', 'required, a string of 1-64 characters.');
  end if;
  if e ? 'resource_id' and jsonb_typeof(e -> 'resource_id') not in ('string', 'null') then
    perform private.ingest_error(400, 'invalid_event', i, 'resource_id', 'a string.');
  elsif length(e ->> 'resource_id') > 512 then
    perform private.ingest_error(400, 'invalid_event', i, 'resource_id', 'at most 512 characters.');
  end if;
  if jsonb_typeof(m) <> 'object' then
    perform private.ingest_error(400, 'invalid_event', i, 'metadata', 'a JSON object.');
  elsif length(m::text) > 16384 then
    perform private.ingest_error(413, 'metadata_too_large', i, 'metadata', 'larger than 16 KB.');
  end if;
  if e ? 'timestamp' and jsonb_typeof(e -> 'timestamp') <> 'null' and (
       jsonb_typeof(e -> 'timestamp') <> 'string'
       or e ->> 'timestamp' !~ '^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?(Z|z|[+-]\d{2}(:?\d{2})?)?$') then
    perform private.ingest_error(400, 'invalid_timestamp', i, 'timestamp', 'an ISO 8601 date-time.');
  end if;
  if e ? 'org_id' and jsonb_typeof(e -> 'org_id') not in ('string', 'null') then
    perform private.ingest_error(400, 'invalid_event', i, 'org_id', 'an org id or slug (a string).');
  end if;
  -- The upshift CLI's own event types have their metadata checked.
  if v_type = 'upgrade' then
    foreach f in array array['to_version', 'outcome'] loop
      if jsonb_typeof(m -> f) is distinct from 'string' then
        perform private.ingest_error(400, 'invalid_metadata', i, 'metadata.' || f, 'required for upgrade, a string.');
      end if;
    end loop;
    if jsonb_typeof(m -> 'from_version') not in ('string', 'null') or not m ? 'from_version' then
      perform private.ingest_error(400, 'invalid_metadata', i, 'metadata.from_version',
        'required for upgrade, a string or null.');
    end if;
  elsif v_type = 'fix' then
    if jsonb_typeof(m -> 'applied') is distinct from 'boolean' then
      perform private.ingest_error(400, 'invalid_metadata', i, 'metadata.applied', 'required for fix, a boolean.');
    end if;
    if not private.is_count(m -> 'fix_count') then
      perform private.ingest_error(400, 'invalid_metadata', i, 'metadata.fix_count',
        'required for fix, a whole number from 0 to 1000000.');
    end if;
    foreach f in array array['from_version', 'to_version'] loop
      if m ? f and jsonb_typeof(m -> f) not in ('string', 'null') then
        perform private.ingest_error(400, 'invalid_metadata', i, 'metadata.' || f, 'a string or null.');
      end if;
    end loop;
  elsif v_type = 'scan_upload' then
    if not private.is_count(m -> 'outdated_count') then
      perform private.ingest_error(400, 'invalid_metadata', i, 'metadata.outdated_count',
        'required for scan_upload, a whole number from 0 to 1000000.');
    end if;
    if jsonb_typeof(m -> 'cwd') is distinct from 'string' then
      perform private.ingest_error(400, 'invalid_metadata', i, 'metadata.cwd', 'required for scan_upload, a string.');
    end if;
  end if;
end $$;
revoke all on function private.check_audit_event(jsonb, integer) from public, anon, authenticated, service_role;

create function public.record_audit_events(events jsonb, org text default null, idempotency_key text default null)
returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_uid uuid := (select auth.uid());
  v_key uuid;
  v_actor uuid;
  v_hash text;
  v_prev public.audit_ingest_keys;
  v_n integer;
  v_i integer := 0;
  v_e jsonb;
  v_org_text text;
  v_last_org_text text := chr(1);
  v_scope uuid;
  v_org uuid;
  v_row public.audit_logs;
  v_out jsonb := '[]'::jsonb;
  v_result jsonb;
begin
  if v_uid is null then
    select s.key_id into v_key from private.service_key() s;
    if v_key is null then
      perform private.err(403, 'no_actor', 'Recording events needs a signed-in user or an active org service key.');
    end if;
  end if;
  v_actor := coalesce(v_uid, v_key);
  if jsonb_typeof(record_audit_events.events) is distinct from 'array' then
    perform private.err(400, 'invalid_request', 'events must be a JSON array.', '{"field": "events"}');
  end if;
  v_n := jsonb_array_length(record_audit_events.events);
  if v_n = 0 then
    perform private.err(400, 'invalid_request', 'events is empty.', '{"field": "events"}');
  elsif v_n > 500 then
    perform private.err(400, 'too_many_events', format('At most 500 events at once (got %s).', v_n),
                        '{"field": "events"}');
  end if;
  if record_audit_events.idempotency_key is not null then
    if length(record_audit_events.idempotency_key) not between 1 and 200 then
      perform private.err(400, 'invalid_idempotency_key', 'idempotency_key is 1-200 characters.',
                          '{"field": "idempotency_key"}');
    end if;
    v_hash := encode(sha256(convert_to(jsonb_build_array(record_audit_events.events, record_audit_events.org)::text,
                                       'UTF8')), 'hex');
    perform pg_advisory_xact_lock(hashtextextended('audit-ingest:' || v_actor::text || '/'
                                                   || record_audit_events.idempotency_key, 0));
    select * into v_prev from public.audit_ingest_keys k
    where k.actor_id = v_actor and k.idempotency_key = record_audit_events.idempotency_key;
    if v_prev.actor_id is not null then
      if v_prev.request_hash <> v_hash then
        perform private.err(409, 'idempotency_conflict',
          format('Idempotency key %s was already used with a different body.', record_audit_events.idempotency_key),
          jsonb_build_object('idempotency_key', record_audit_events.idempotency_key));
      end if;
      return v_prev.result || '{"replayed": true}'::jsonb;
    end if;
  end if;

  for v_e in select value from jsonb_array_elements(record_audit_events.events) loop
    perform private.check_audit_event(v_e, v_i);
    v_org_text := coalesce(nullif(btrim(v_e ->> 'org_id'), ''), nullif(btrim(record_audit_events.org), ''));
    if v_org_text is distinct from v_last_org_text then
      v_org := (private.context(v_org_text, array['admin', 'member', 'service'], 'cannot_write_audit',
                                'record events')).org_id;
      v_scope := coalesce(v_org, v_uid);
      if v_scope is null then
        perform private.err(403, 'org_required', 'A service key records events in its org only.');
      end if;
      v_last_org_text := v_org_text;
    end if;
    v_row := private.audit_append(v_scope, v_org, v_e ->> 'event_type', v_e ->> 'resource_type',
      v_e ->> 'resource_id', coalesce(v_e -> 'metadata', '{}'::jsonb),
      (nullif(v_e ->> 'timestamp', ''))::timestamptz);
    v_out := v_out || jsonb_build_array(jsonb_build_object('id', v_row.id, 'seq', v_row.seq,
      'scope_id', v_row.scope_id, 'org_id', v_row.org_id, 'event_type', v_row.event_type,
      'created_at', v_row.created_at));
    v_i := v_i + 1;
  end loop;

  v_result := jsonb_build_object('events', v_out, 'count', v_n);
  if record_audit_events.idempotency_key is not null then
    insert into public.audit_ingest_keys (actor_id, idempotency_key, request_hash, result)
    values (v_actor, record_audit_events.idempotency_key, v_hash, v_result);
  end if;
  return v_result || '{"replayed": false}'::jsonb;
end $$;
comment on function public.record_audit_events(jsonb, text, text) is
  'Record client events (the upshift CLI''s upgrade / fix / scan_upload, or any a-z0-9_. type that is not a '
  'platform type). Scope: the event''s org_id, else org, else the key''s org, else the default org, else '
  'the caller''s personal log; the caller must be admin or member there. All or nothing.';
revoke all on function public.record_audit_events(jsonb, text, text) from public, anon, authenticated, service_role;
grant execute on function public.record_audit_events(jsonb, text, text) to authenticated;
