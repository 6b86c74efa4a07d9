-- The usage job (20261125003500) no longer waits for autovacuum workers: they write no ledger rows, and one
-- vacuuming a large table for minutes held closed_through back that long (org_usage then read more of the ledger).

create or replace function private.running_transactions() returns text[]
language plpgsql volatile security definer set search_path = '' as $$
begin
  -- Every transaction of this database in progress now, but ours: its virtual transaction id (held from its first
  -- statement to its end, xid or not; released only after its commit is visible), and prepared transactions
  -- (which keep their rows pending with no backend). A backend of another database cannot write our ledger, nor can
  -- autovacuum; a backend whose database we cannot tell is kept.
  perform pg_catalog.pg_stat_clear_snapshot();
  return coalesce((
    select array_agg(x.id order by x.id) from (
      select l.virtualxid as id
      from pg_catalog.pg_locks l
      left join pg_catalog.pg_stat_activity s on s.pid = l.pid
      where l.locktype = 'virtualxid' and l.mode = 'ExclusiveLock' and l.granted
        and l.pid is distinct from pg_catalog.pg_backend_pid()
        and s.backend_type is distinct from 'autovacuum worker'
        and (s.datid is null or s.datid = (select d.oid from pg_catalog.pg_database d
                                           where d.datname = pg_catalog.current_database()))
      union all
      select 'xid:' || p.transaction::text from pg_catalog.pg_prepared_xacts p
      where p.database = pg_catalog.current_database()) x), '{}');
end $$;
comment on function private.running_transactions() is
  'The virtual transaction ids of this database''s transactions in progress (ours and autovacuum''s excepted), and '
  '"xid:N" for its prepared transactions.';
revoke all on function private.running_transactions() from public, anon, authenticated, service_role;
