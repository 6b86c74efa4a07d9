// The console's shell: configuration, sign-in, the org switcher, navigation and the pages.
//
// Every rule (who may see or change what) is the API's; the console only leaves out what the
// caller's role cannot do, so that a viewer sees no button that would fail.

import { api, setUnauthorizedHandler } from './api.js';
import * as auth from './auth.js';
import { clear, errorBox, field, h, select } from './dom.js';
import { audit } from './pages/audit.js';
import { billing } from './pages/billing.js';
import { keys } from './pages/keys.js';
import { members } from './pages/members.js';
import { overview } from './pages/overview.js';
import { usage } from './pages/usage.js';

const PAGES = [
  { route: 'overview', title: 'Overview', render: overview },
  { route: 'usage', title: 'Usage', render: usage },
  { route: 'audit', title: 'Audit log', render: audit },
  { route: 'members', title: 'Members', render: members },
  { route: 'keys', title: 'Keys', render: keys },
  { route: 'billing', title: 'Billing', render: billing },
];

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const account = document.getElementById('account');
const toastRegion = document.getElementById('toast');

const state = { config: { supabase: null, checkout: false }, identity: null, org: null, cleanup: null, renders: 0 };

function toast(message) {
  toastRegion.textContent = message;
  setTimeout(() => { if (toastRegion.textContent === message) toastRegion.textContent = ''; }, 4000);
}

function currentRoute() {
  const match = /^#\/([a-z]+)/.exec(window.location.hash);
  const route = match ? match[1] : 'overview';
  return PAGES.some((p) => p.route === route) ? route : 'overview';
}

// --- identity -----------------------------------------------------------------------------------

async function loadIdentity() {
  const me = await api('/api/me');
  if (me.service_key) {
    const org = me.service_key.org;
    return {
      label: `Service key ${org ? `of ${org.slug}` : ''}`.trim(),
      userId: null,
      keyId: me.service_key.id,
      orgs: org ? [{ id: org.id, slug: org.slug, name: org.name, plan: org.plan, role: 'service' }] : [],
      contextOrg: org ? org.slug : null,
    };
  }
  const orgs = me.memberships.map((m) => ({ id: m.org_id, slug: m.slug, name: m.name, plan: m.plan, role: m.role }));
  let contextOrg = null;
  if (orgs.length > 1) {
    // The org this credential works in by default (the API key's org, else the default org).
    const status = await api('/billing/status');
    contextOrg = status.org ? status.org.slug : null;
  }
  return { label: me.email, userId: me.id, keyId: null, orgs, contextOrg };
}

function pickOrg(identity) {
  const wanted = [auth.rememberedOrg(), identity.contextOrg];
  for (const slug of wanted) {
    const org = identity.orgs.find((o) => o.slug === slug);
    if (org) return org;
  }
  return identity.orgs[0] || null;
}

// --- the shell ------------------------------------------------------------------------------------

function renderAccount() {
  const { identity, org } = state;
  const parts = [];
  if (identity.orgs.length > 1) {
    const switcher = select(identity.orgs.map((o) => [o.slug, `${o.name} (${o.role})`]), org.slug,
      { id: 'org-switcher', name: 'org' });
    switcher.addEventListener('change', () => {
      state.org = identity.orgs.find((o) => o.slug === switcher.value);
      auth.rememberOrg(state.org.slug);
      renderAccount();
      renderPage(false);
    });
    parts.push(h('div', { class: 'org-switcher' }, field('Organization', switcher)));
  } else if (org) {
    parts.push(h('span', { class: 'org-name' }, org.name));
  }
  if (org) parts.push(h('span', { class: 'badge role', title: 'Your role in this org' }, org.role));
  parts.push(h('span', { class: 'who' }, identity.label));
  parts.push(h('button', { type: 'button', class: 'secondary', on: { click: signOut } }, 'Sign out'));
  clear(account, parts);
}

function renderNav() {
  const route = currentRoute();
  nav.hidden = false;
  clear(nav, h('ul', {}, PAGES.map((p) => h('li', {},
    h('a', { href: `#/${p.route}`, 'aria-current': p.route === route ? 'page' : false }, p.title)))));
}

async function renderPage(focus) {
  if (state.cleanup) {
    state.cleanup();
    state.cleanup = null;
  }
  renderNav();
  const page = PAGES.find((p) => p.route === currentRoute());
  document.title = `${page.title} · upshift console`;
  const heading = h('h1', { tabindex: -1 }, page.title);
  const body = h('div', { class: 'page-body' });
  clear(main, heading, body);
  main.dataset.page = page.route;
  main.dataset.ready = 'false';
  if (focus) heading.focus();
  const token = ++state.renders;
  const ctx = {
    org: state.org,
    role: state.org.role,
    identity: state.identity,
    config: state.config,
    toast,
    alive: () => token === state.renders,
    onCleanup: (fn) => { state.cleanup = fn; },
    rerender: () => renderPage(false),
  };
  try {
    await page.render(body, ctx);
  } catch (err) {
    if (ctx.alive()) body.append(errorBox(err));
  }
  if (ctx.alive()) main.dataset.ready = 'true';
}

// --- sign-in --------------------------------------------------------------------------------------

function renderSignIn(message) {
  nav.hidden = true;
  clear(nav);
  clear(account);
  document.title = 'Sign in · upshift console';
  const keyInput = h('input', {
    type: 'password', name: 'api-key', autocomplete: 'off', spellcheck: 'false', required: true,
    autocapitalize: 'off',
  });
  const status = h('div', { class: 'form-status', 'aria-live': 'polite' });
  if (message) status.append(errorBox(message));
  const form = h('form', { class: 'card signin' },
    field('API key', keyInput, 'upk_… (yours) or ups_… (an org service key). Kept in this tab only.'),
    h('button', { type: 'submit' }, 'Sign in'),
    status);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const key = keyInput.value.trim();
    const problem = auth.checkKeyFormat(key);
    clear(status);
    if (problem) {
      status.append(errorBox(problem));
      keyInput.focus();
      return;
    }
    form.setAttribute('aria-busy', 'true');
    try {
      await auth.signInWithKey(key);
      keyInput.value = '';
      await start();
    } catch (err) {
      status.append(errorBox(err.status === 401 ? `That key was not accepted: ${err.message}` : err));
      keyInput.focus();
    } finally {
      form.removeAttribute('aria-busy');
    }
  });
  const sections = [h('h1', { tabindex: -1 }, 'Sign in'), form];
  if (state.config.supabase) sections.push(supabaseSignIn());
  clear(main, sections);
  main.dataset.page = 'signin';
  main.dataset.ready = 'true';
  keyInput.focus();
}

function supabaseSignIn() {
  const email = h('input', { type: 'email', name: 'email', autocomplete: 'email', required: true });
  const status = h('div', { class: 'form-status', 'aria-live': 'polite' });
  const form = h('form', { class: 'card signin', 'aria-label': 'Sign in with Supabase' },
    h('h2', {}, 'Or sign in with your account'),
    field('Email', email),
    h('button', { type: 'submit' }, 'Email me a sign-in link'),
    status);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    clear(status);
    try {
      await auth.sendMagicLink(email.value.trim());
      status.append(h('p', { class: 'ok' }, `Check ${email.value.trim()} for a sign-in link.`));
    } catch (err) {
      status.append(errorBox(err));
    }
  });
  const github = h('button', { type: 'button', class: 'secondary' }, 'Sign in with GitHub');
  github.addEventListener('click', async () => {
    clear(status);
    try {
      await auth.signInWithGitHub();
    } catch (err) {
      status.append(errorBox(err));
    }
  });
  form.append(h('p', {}, github));
  return form;
}

async function signOut() {
  if (state.cleanup) state.cleanup();
  state.cleanup = null;
  state.identity = null;
  state.org = null;
  state.renders += 1;
  await auth.signOut();
  renderSignIn();
}

// --- start ----------------------------------------------------------------------------------------

async function start() {
  try {
    state.identity = await loadIdentity();
  } catch (err) {
    await auth.signOut();
    renderSignIn(err.status === 401 ? `Please sign in again: ${err.message}` : err);
    return;
  }
  state.org = pickOrg(state.identity);
  if (!state.org) {
    renderAccount();
    clear(main, h('h1', { tabindex: -1 }, 'No organization'),
      h('p', {}, 'You are not a member of any org yet. Ask an org admin for an invite.'));
    main.dataset.ready = 'true';
    return;
  }
  auth.rememberOrg(state.org.slug);
  renderAccount();
  await renderPage(false);
}

async function boot() {
  setUnauthorizedHandler((err) => {
    if (state.identity) {
      state.identity = null;
      auth.signOut().then(() => renderSignIn(`Please sign in again: ${err.message}`));
    }
  });
  window.addEventListener('hashchange', () => {
    if (!/^#\//.test(window.location.hash)) return;  // in-page anchors (the skip link)
    if (state.identity && state.org) renderPage(true);
  });
  try {
    state.config = await api('/console/config.json');
  } catch {
    state.config = { supabase: null, checkout: false };
  }
  let supabaseSession = null;
  if (state.config.supabase) {
    try {
      supabaseSession = await auth.initSupabase(state.config);
    } catch (err) {
      renderSignIn(`Supabase sign-in is unavailable: ${err.message}`);
      return;
    }
  }
  if (supabaseSession) {
    auth.useSupabase();
    await start();
  } else if (auth.storedKey()) {
    auth.useKey();
    await start();
  } else {
    renderSignIn();
  }
}

boot();
