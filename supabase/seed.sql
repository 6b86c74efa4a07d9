-- Demo data for `supabase db reset` (and for any database the migrations were applied to):
-- org acme on the Team plan with 500 credits, an admin, a member and a viewer. Idempotent.
-- API keys are not seeded (their secrets must not live in the repository): create them with
--   upshift-platform keys create --email member@acme.test --org acme
-- Locally, `upshift-platform demo` does all of this and also mints keys.

insert into auth.users (id, email, raw_app_meta_data, raw_user_meta_data, created_at, updated_at)
values
  ('00000000-0000-4000-8000-00000000ad01', 'admin@acme.test', '{"provider": "seed"}', '{}', now(), now()),
  ('00000000-0000-4000-8000-00000000ad02', 'member@acme.test', '{"provider": "seed"}', '{}', now(), now()),
  ('00000000-0000-4000-8000-00000000ad03', 'viewer@acme.test', '{"provider": "seed"}', '{}', now(), now())
on conflict (id) do nothing;

select public.admin_create_org('Acme', 'acme', 'team', '00000000-0000-4000-8000-00000000ad01')
where not exists (select 1 from public.orgs where slug = 'acme');

select public.admin_add_member('acme', m.user_id, m.role)
from (values ('00000000-0000-4000-8000-00000000ad02'::uuid, 'member'),
             ('00000000-0000-4000-8000-00000000ad03'::uuid, 'viewer')) as m (user_id, role)
where not exists (select 1 from public.org_members om join public.orgs o on o.id = om.org_id
                  where o.slug = 'acme' and om.user_id = m.user_id);

select public.grant_credits(500, 'admin_grant', 'acme', null, 'demo:acme:initial-credits', '{"via": "seed"}');
