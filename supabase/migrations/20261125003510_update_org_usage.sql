-- org_usage reads the usage rollup (20261125003500) for the closed part of the range and the ledger for the rest.
-- Same signature, same answer, same access rule (admins and viewers: every spend; a member or a service key:
-- their own); only where the sums come from changes.

create or replace function public.org_usage(org text, since timestamptz default null, until timestamptz default null,
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
  -- (A stable function reads every statement in one snapshot: W and the rollup agree with the ledger.)
  v_w timestamptz := (select s.closed_through from private.usage_state s);
  v_lo timestamptz;      -- the rollup covers [v_lo, v_hi): whole hours (and the bucket that ends at W)
  v_hi timestamptz;
  v_dlo timestamptz;     -- of which whole days (and the day bucket that ends at W) come from usage_days
  v_dhi timestamptz;
  v_rows jsonb;
  v_total bigint;
  v_users uuid[];
  v_keys uuid[];
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

  -- Which part comes from the rollup. It holds the rows before W; its buckets are UTC hours and days, and the
  -- bucket that contains W holds exactly [its start, W). So: from the first whole hour at or after `from` up to W
  -- (when `to` is at or after W) or up to the last whole hour before `to`; the ledger gives the rest:
  -- [from, v_lo) and [v_hi, to). No usable bucket: the ledger gives all of [from, to).
  if v_since < v_w then
    v_lo := date_trunc('hour', v_since, 'UTC');
    if v_lo < v_since then
      v_lo := v_lo + interval '1 hour';
    end if;
    v_hi := case when v_until >= v_w then v_w else date_trunc('hour', v_until, 'UTC') end;
  end if;
  if v_lo is null or v_lo >= v_hi then
    v_lo := v_until;
    v_hi := v_until;
  end if;
  v_dlo := date_trunc('day', v_lo, 'UTC');
  if v_dlo < v_lo then
    v_dlo := v_dlo + interval '1 day';
  end if;
  v_dhi := case when v_hi = v_w then v_w else date_trunc('day', v_hi, 'UTC') end;
  if v_dlo >= v_dhi then  -- no whole day: hours only
    v_dlo := v_hi;
    v_dhi := v_hi;
  end if;

  -- Summed per UTC day and actor first (at most days x actors groups), then rolled up to what was asked for.
  with src as (
    -- days [v_dlo, v_dhi)
    select (d.day at time zone 'UTC')::date as day, d.actor_user_id as user_id, d.service_key_id,
           d.spent, d.spends
    from private.usage_days d
    where d.account_id = c.org_id and d.day >= v_dlo and d.day < v_dhi
    union all
    -- hours [v_lo, v_dlo) and [v_dhi, v_hi)
    select (h.hour at time zone 'UTC')::date, h.actor_user_id, h.service_key_id, h.spent, h.spends
    from private.usage_hours h
    where h.account_id = c.org_id
      and ((h.hour >= v_lo and h.hour < v_dlo) or (h.hour >= v_dhi and h.hour < v_hi))
    union all
    -- the ledger: [from, v_lo) and [v_hi, to)
    select (t.created_at at time zone 'UTC')::date, t.actor_user_id, t.service_key_id, -t.amount, 1
    from public.credit_transactions t
    where t.account_id = c.org_id and t.amount < 0
      and ((t.created_at >= v_since and t.created_at < v_lo) or (t.created_at >= v_hi and t.created_at < v_until))
  ), fine as (
    select s.day, s.user_id, s.service_key_id, sum(s.spent) as spent, sum(s.spends) as spends
    from src s
    where v_all
       or (c.role = 'member' and s.user_id = v_uid)
       or (c.role = 'service' and s.user_id is null and s.service_key_id = v_key)
    group by 1, 2, 3
  ), rolled as (
    select case when v_day then f.day end as day,
           case when v_actor then f.user_id end as user_id,
           case when v_actor then f.service_key_id end as service_key_id,
           sum(f.spent)::bigint as spent, sum(f.spends)::bigint as spends
    from fine f
    group by 1, 2, 3
  )
  -- The rows, their total and the ids the actors list names, in one pass over the groups.
  select coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
           'day', r.day,
           'actor_kind', case when not v_actor then null
                              when r.user_id is not null then 'user'
                              when r.service_key_id is not null then 'service_key'
                              else 'system' end,
           'user_id', r.user_id, 'service_key_id', r.service_key_id, 'spent', r.spent, 'spends', r.spends))
           order by r.day, r.spent desc, r.user_id, r.service_key_id), '[]'::jsonb),
         coalesce(sum(r.spent), 0),
         array_agg(r.user_id) filter (where r.user_id is not null),
         array_agg(r.service_key_id) filter (where r.service_key_id is not null)
  into v_rows, v_total, v_users, v_keys
  from rolled r;

  return jsonb_build_object(
    'org_id', c.org_id, 'org_slug', c.slug, 'role', c.role,
    'scope', case when v_all then 'org' else 'own' end,
    'from', v_since, 'to', v_until,
    'group_by', to_jsonb(array(select g from unnest(array['day', 'actor']) g where g = any (v_group))),
    'total_spent', v_total,
    'data', v_rows,
    -- Who the ids are: the members among them (email) and the org's keys (name); a former member has no entry.
    'actors', coalesce((
      select jsonb_agg(a order by a ->> 'kind', a ->> 'label')
      from (
        select jsonb_build_object('kind', 'user', 'id', m.user_id, 'label', u.email, 'role', m.role) as a
        from public.org_members m join auth.users u on u.id = m.user_id
        where m.org_id = c.org_id and m.user_id = any (v_users)
        union all
        select jsonb_build_object('kind', 'service_key', 'id', k.id, 'label', k.name, 'prefix', k.key_prefix,
                                  'revoked', k.revoked_at is not null)
        from public.api_keys k
        where k.org_id = c.org_id and k.kind = 'service' and k.id = any (v_keys)
      ) s), '[]'::jsonb));
end $$;
comment on function public.org_usage(text, timestamptz, timestamptz, text) is
  'Credits spent from an org''s pool in [since, until) (default: the last 30 days; at most 366 days), summed per '
  'UTC day and/or per actor (group_by: "day,actor", "day", "actor", or "" for one total). Admins and viewers see '
  'every spend; a member the spends they made; an org service key its own. Exact: closed hours and days come from '
  'the usage rollup (public.usage_rollup), the rest from the ledger. Returns {org_id, org_slug, role, scope: '
  'org|own, from, to, group_by, total_spent, data: [{day, actor_kind: user|service_key|system, user_id, '
  'service_key_id, spent, spends}], actors: [{kind, id, label, ...}]}.';
revoke all on function public.org_usage(text, timestamptz, timestamptz, text)
  from public, anon, authenticated, service_role;
grant execute on function public.org_usage(text, timestamptz, timestamptz, text) to authenticated;
