-- An API key's request claims in one call, so that a request authenticated by a key needs no round
-- trip of its own: the functions send the key lookup, the role switch and the RPC the request makes
-- as one message (upshift_platform/db.py), and the lookup must stop that message itself when the key
-- is not active.
--
-- The same lookup as authenticate_api_key (which stays, for the callers that want the key's status as
-- data): an unknown, revoked or expired key raises PT401, which ends the transaction before anything
-- else in it runs; an active key answers the claims the request then acts with (what PostgREST would
-- take from a JWT): a personal key as its user (`sub`), a service key as "key X of org Y" with no `sub`.

create function public.api_key_claims(p_key_hash text) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_key jsonb;
  v_claims jsonb;
begin
  perform private.require_backend('api_key_claims');
  if p_key_hash is null or p_key_hash !~ '^[0-9a-f]{64}$' then
    perform private.err(401, 'unauthenticated', 'Unknown API key.');
  end if;
  v_key := public.authenticate_api_key(p_key_hash);
  if v_key ->> 'status' = 'unknown' then
    perform private.err(401, 'unauthenticated', 'Unknown API key.');
  elsif v_key ->> 'status' <> 'active' then
    perform private.err(401, 'unauthenticated', format('API key is %s.', v_key ->> 'status'));
  end if;
  v_claims := jsonb_build_object(
    'role', 'authenticated', 'aud', 'authenticated',
    'upshift', jsonb_build_object('key_id', v_key -> 'key_id', 'kind', v_key -> 'kind', 'org_id', v_key -> 'org_id'));
  if v_key ->> 'kind' = 'personal' then
    v_claims := v_claims || jsonb_build_object('sub', v_key -> 'user_id');
  end if;
  return v_claims;
end $$;
comment on function public.api_key_claims(text) is
  'Backend only (service_role): the claims a request authenticated by the key with this SHA-256 acts with '
  '({role, aud, sub (personal keys), upshift: {key_id, kind, org_id}}); PT401 unauthenticated when the key is '
  'unknown, revoked or expired. Touches last_used_at at most once a minute, as authenticate_api_key does.';
revoke all on function public.api_key_claims(text) from public, anon, authenticated, service_role;
grant execute on function public.api_key_claims(text) to service_role;  -- backend only
