// The vendored libraries (see ../vendor/README.md), loaded on first use.
//
// The page's Content-Security-Policy requires Trusted Types for every script sink and allows one
// policy, this one: it turns exactly these URLs into script URLs and nothing else.

const VENDOR = {
  chart: '/console/vendor/chart.js-4.6.1/chart.umd.min.js',
  supabase: '/console/vendor/supabase-js-2.119.1/supabase.js',
};
const GLOBALS = { chart: 'Chart', supabase: 'supabase' };
const URLS = new Set(Object.values(VENDOR));

const policy = window.trustedTypes
  ? window.trustedTypes.createPolicy('upshift-console', {
    createScriptURL(url) {
      if (!URLS.has(url)) throw new TypeError(`not a vendored script: ${url}`);
      return url;
    },
  })
  : null;

const loading = {};

export function loadVendor(name) {
  if (!loading[name]) {
    loading[name] = new Promise((resolve, reject) => {
      const script = document.createElement('script');
      script.src = policy ? policy.createScriptURL(VENDOR[name]) : VENDOR[name];
      script.async = true;
      script.addEventListener('load', () => resolve(window[GLOBALS[name]]));
      script.addEventListener('error', () => {
        delete loading[name];
        reject(new Error(`Could not load ${VENDOR[name]}.`));
      });
      document.head.append(script);
    });
  }
  return loading[name];
}
