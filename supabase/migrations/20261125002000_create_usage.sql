-- Usage: what an org's pool was spent on, summed per day and per actor (a member or a key), for the
-- console's charts and its usage page. It reads the ledger (credit_transactions) under the ledger's
-- own rule: an org's admins and viewers see every spend; a member sees the spends they made; an
-- org service key the spends it made. A spend is a ledger row with a negative amount: the actions
-- members and keys paid for, and the platform's take-backs (refunds, disputes: no actor, "system").
--
-- The covering partial index below holds exactly what the aggregate reads (the org, the time, the
-- amount, who), so a 30-day range is an index-only range scan however long the ledger grows
-- (bench/usage.py: 1,000,000 rows, docs/benchmarks.md).

create index credit_transactions_spends_idx on public.credit_transactions (account_id, created_at)
  include (amount, actor_user_id, service_key_id) where amount < 0;

create function public.org_usage(org text, since timestamptz default null, until timestamptz default null,
                                 group_by text default 'day,actor')
returns jsonb
language plpgsql stable security definer set search_path = '' as $$
declare
  c private.org_context := private.context(org_usage.org, array['admin', 'viewer', 'member', 'service'],
                                           'forbidden', 'read its usage', true);
  v_until timestamptz := coalesce(org_usage.until, now());
  v_since timestamptz := coalesce(org_usage.since, coalesce(org_usage.until, now()) - interval '30 days');
  v_group text[] := string_to_array(replace(coalesce(org_usage.group_by, 'day,actor'), ' ', ''), ',');
  v_day boolean;
  v_actor boolean;
  v_all boolean := c.role in ('admin', 'viewer');
  v_uid uuid := (select auth.uid());
  v_key uuid := (select s.key_id from private.service_key() s);
  v_rows jsonb;
begin
  if exists (select 1 from unnest(v_group) g where g not in ('day', 'actor')) then
    perform private.err(400, 'invalid_group_by',
                        'group_by is a comma-separated list of day and actor (or empty: one total).',
                        jsonb_build_object('field', 'group_by', 'allowed', jsonb_build_array('day', 'actor')));
  end if;
  if v_since >= v_until then
    perform private.err(400, 'invalid_range', 'from must be before to.', '{"field": "from"}');
  end if;
  if v_until - v_since > interval '366 days' then
    perform private.err(400, 'invalid_range', 'A usage range is at most 366 days.', '{"field": "from"}');
  end if;
  v_day := 'day' = any (v_group);
  v_actor := 'actor' = any (v_group);

  -- Summed per day and actor first (a hash aggregate over the index-only range scan: at most days x actors
  -- groups), then rolled up to what was asked for.
  with fine as (
    select (t.created_at at time zone 'UTC')::date as day, t.actor_user_id as user_id, t.service_key_id,
           -sum(t.amount) as spent, count(*) as spends
    from public.credit_transactions t
    where t.account_id = c.org_id and t.amount < 0
      and t.created_at >= v_since and t.created_at < v_until
      and (v_all
           or (c.role = 'member' and t.actor_user_id = v_uid)
           or (c.role = 'service' and t.actor_user_id is null and t.service_key_id = v_key))
    group by 1, 2, 3
  ), rolled as (
    select case when v_day then f.day end as day,
           case when v_actor then f.user_id end as user_id,
           case when v_actor then f.service_key_id end as service_key_id,
           sum(f.spent)::bigint as spent, sum(f.spends)::bigint as spends
    from fine f
    group by 1, 2, 3
  )
  select coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
           'day', r.day,
           'actor_kind', case when not v_actor then null
                              when r.user_id is not null then 'user'
                              when r.service_key_id is not null then 'service_key'
                              else 'system' end,
           'user_id', r.user_id, 'service_key_id', r.service_key_id, 'spent', r.spent, 'spends', r.spends))
           order by r.day, r.spent desc, r.user_id, r.service_key_id), '[]'::jsonb)
  into v_rows
  from rolled r;

  return jsonb_build_object(
    'org_id', c.org_id, 'org_slug', c.slug, 'role', c.role,
    'scope', case when v_all then 'org' else 'own' end,
    'from', v_since, 'to', v_until,
    'group_by', to_jsonb(array(select g from unnest(array['day', 'actor']) g where g = any (v_group))),
    'total_spent', coalesce((select sum((r ->> 'spent')::bigint) from jsonb_array_elements(v_rows) r), 0),
    'data', v_rows,
    -- Who the ids are: the members among them (email) and the org's keys (name); a former member has no entry.
    'actors', coalesce((
      select jsonb_agg(a order by a ->> 'kind', a ->> 'label')
      from (
        select jsonb_build_object('kind', 'user', 'id', m.user_id, 'label', u.email, 'role', m.role) as a
        from public.org_members m join auth.users u on u.id = m.user_id
        where m.org_id = c.org_id
          and m.user_id in (select (r ->> 'user_id')::uuid from jsonb_array_elements(v_rows) r)
        union all
        select jsonb_build_object('kind', 'service_key', 'id', k.id, 'label', k.name, 'prefix', k.key_prefix,
                                  'revoked', k.revoked_at is not null)
        from public.api_keys k
        where k.org_id = c.org_id and k.kind = 'service'
          and k.id in (select (r ->> 'service_key_id')::uuid from jsonb_array_elements(v_rows) r)
      ) s), '[]'::jsonb));
end $$;
comment on function public.org_usage(text, timestamptz, timestamptz, text) is
  'Credits spent from an org''s pool in [since, until) (default: the last 30 days; at most 366 days), summed per '
  'UTC day and/or per actor (group_by: "day,actor", "day", "actor", or "" for one total). Admins and viewers see '
  'every spend; a member the spends they made; an org service key its own. Returns {org_id, org_slug, role, '
  'scope: org|own, from, to, group_by, total_spent, data: [{day, actor_kind: user|service_key|system, user_id, '
  'service_key_id, spent, spends}], actors: [{kind, id, label, ...}]}.';
revoke all on function public.org_usage(text, timestamptz, timestamptz, text)
  from public, anon, authenticated, service_role;
grant execute on function public.org_usage(text, timestamptz, timestamptz, text) to authenticated;
