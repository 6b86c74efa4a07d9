-- Every org and every user gets a credit account when it is created (users with the signup bonus).

create function private.open_account() returns trigger
language plpgsql security definer set search_path = '' as $$
begin
  insert into public.credit_accounts (id, org_id) values (new.id, case when tg_table_name = 'orgs' then new.id end)
  on conflict (id) do nothing;
  if tg_table_name = 'profiles' then
    -- New users start with 10 credits: a ledger row like any other grant.
    perform private.apply_credit_change(new.id, 10, 'signup_bonus', 'signup:' || new.id::text, true, '{}'::jsonb,
                                        p_audit => false);
  end if;
  return new;
end $$;
comment on function private.open_account() is
  'Trigger on orgs and profiles: every org and every user gets a credit account (users with a 10-credit bonus).';
revoke all on function private.open_account() from public, anon, authenticated, service_role;

create trigger orgs_open_account after insert on public.orgs
  for each row execute function private.open_account();
create trigger profiles_open_account after insert on public.profiles
  for each row execute function private.open_account();
