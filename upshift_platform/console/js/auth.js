// Who is signed in: a platform API key (kept in this tab's sessionStorage only) or, when the
// deployment configures it, a Supabase Auth session (magic link or GitHub, PKCE flow, kept by
// supabase-js). Either way the API receives it as a Bearer token; it never goes into a URL.

import { api, setTokenProvider } from './api.js';
import { loadVendor } from './vendor.js';

const KEY_STORAGE = 'upshift.console.api-key';
const ORG_STORAGE = 'upshift.console.org';
const KEY_FORMAT = /^(upk|ups)_[A-Za-z0-9_-]{8,200}$/;

let supabaseClient = null;

export function storedKey() {
  return window.sessionStorage.getItem(KEY_STORAGE);
}

export function keyPrefix() {
  const key = storedKey();
  return key ? key.slice(0, 12) : null;
}

export function checkKeyFormat(key) {
  if (!KEY_FORMAT.test(key)) {
    return 'An API key starts with upk_ (personal) or ups_ (an org service key).';
  }
  return null;
}

// Try the key against the API before keeping it.
export async function signInWithKey(key) {
  const me = await api('/api/me', { token: key });
  window.sessionStorage.setItem(KEY_STORAGE, key);
  useKey();
  return me;
}

export function useKey() {
  setTokenProvider(async () => storedKey());
}

export async function initSupabase(config) {
  if (!config.supabase) return null;
  const lib = await loadVendor('supabase');
  supabaseClient = lib.createClient(config.supabase.url, config.supabase.anon_key, {
    auth: { flowType: 'pkce', detectSessionInUrl: true, persistSession: true, autoRefreshToken: true },
  });
  const { data } = await supabaseClient.auth.getSession();
  // After the redirect back, the one-time code has been exchanged: take it out of the address bar.
  const url = new URL(window.location.href);
  if (url.searchParams.has('code') || url.searchParams.has('error_description')) {
    window.history.replaceState(null, '', `${url.pathname}${url.hash}`);
  }
  return data && data.session ? data.session : null;
}

export function useSupabase() {
  setTokenProvider(async () => {
    const { data } = await supabaseClient.auth.getSession();
    return data && data.session ? data.session.access_token : null;
  });
}

export function redirectUrl() {
  return `${window.location.origin}/console`;
}

export async function sendMagicLink(email) {
  const { error } = await supabaseClient.auth.signInWithOtp({
    email,
    options: { emailRedirectTo: redirectUrl(), shouldCreateUser: true },
  });
  if (error) throw error;
}

export async function signInWithGitHub() {
  const { error } = await supabaseClient.auth.signInWithOAuth({
    provider: 'github',
    options: { redirectTo: redirectUrl() },
  });
  if (error) throw error;
}

export async function signOut() {
  window.sessionStorage.removeItem(KEY_STORAGE);
  window.sessionStorage.removeItem(ORG_STORAGE);
  setTokenProvider(async () => null);
  if (supabaseClient) {
    try {
      await supabaseClient.auth.signOut({ scope: 'local' });
    } catch {
      // Signed out locally either way.
    }
  }
}

export function rememberOrg(slug) {
  window.sessionStorage.setItem(ORG_STORAGE, slug);
}

export function rememberedOrg() {
  return window.sessionStorage.getItem(ORG_STORAGE);
}
