// The public API, with the caller's own credential in the Authorization header (never in a URL).

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `The server answered ${status}.`);
    this.status = status;
    this.code = (body && body.error) || 'error';
    this.body = body || {};
  }
}

let tokenProvider = async () => null;
let onUnauthorized = () => {};

export function setTokenProvider(fn) {
  tokenProvider = fn;
}

export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

export function apiUrl(path, query) {
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value === undefined || value === null || value === '') continue;
    for (const v of Array.isArray(value) ? value : [value]) url.searchParams.append(name, String(v));
  }
  return url;
}

// JSON in, JSON out; `raw: true` returns the Response of a successful request (exports).
export async function api(path, { method = 'GET', query, body, raw = false, token } = {}) {
  const headers = { Accept: raw ? '*/*' : 'application/json' };
  const credential = token || (await tokenProvider());
  if (credential) headers.Authorization = `Bearer ${credential}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(apiUrl(path, query), {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store',
    credentials: 'omit',
    referrerPolicy: 'no-referrer',
  });
  if (raw && response.ok) return response;
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { error: 'invalid_response', message: `The server answered ${response.status} with something other than JSON.` };
  }
  if (!response.ok) {
    const err = new ApiError(response.status, data);
    if (response.status === 401 && !token) onUnauthorized(err);
    throw err;
  }
  return data;
}

export const orgPath = (org, rest = '') => `/api/orgs/${encodeURIComponent(org.slug)}${rest}`;
