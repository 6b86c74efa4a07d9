// Building the page without HTML strings: every value from the API becomes a text node.
//
// h('p', {class: 'x', on: {click: fn}}, 'text', child) creates an element; strings become text
// nodes (never parsed as HTML). Event handler attributes, inline styles and HTML sinks are refused,
// and the page's Trusted Types policy would refuse an HTML string anyway.

const REFUSED = /^(on|style$|innerhtml$|outerhtml$|srcdoc$)/i;

export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'on') {
      for (const [event, fn] of Object.entries(value)) el.addEventListener(event, fn);
    } else if (name === 'class') {
      el.className = value;
    } else if (name === 'dataset') {
      Object.assign(el.dataset, value);
    } else if (REFUSED.test(name)) {
      throw new Error(`refusing to set ${name}`);
    } else if (name === 'value' && 'value' in el) {
      el.value = value;
    } else {
      el.setAttribute(name, value === true ? '' : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function clear(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

let ids = 0;
export function uid(prefix = 'id') {
  ids += 1;
  return `${prefix}-${ids}`;
}

// A labelled form control: <div class="field"><label for=id>text</label><control id=id></div>.
export function field(label, control, hint) {
  const id = control.id || uid('f');
  control.id = id;
  const parts = [h('label', { for: id }, label), control];
  if (hint) {
    const hintId = `${id}-hint`;
    control.setAttribute('aria-describedby', hintId);
    parts.push(h('span', { class: 'hint', id: hintId }, hint));
  }
  return h('div', { class: 'field' }, parts);
}

export function select(options, value, props = {}) {
  return h('select', props, options.map(([v, text]) => h('option', { value: v, selected: v === value }, text)));
}

// A table in a horizontally scrolling region (readable at 375 px).
export function table(caption, headers, rows, props = {}) {
  return h('div', { class: 'table-wrap', role: 'region', 'aria-label': `${caption}, table`, tabindex: 0 },
    h('table', props,
      h('caption', { class: 'visually-hidden' }, caption),
      h('thead', {}, h('tr', {}, headers.map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', {}, rows)));
}

// "Not available yet": a marked place for a feature the platform does not have yet.
export function notYet(feature, title, text) {
  return h('section', { class: 'card not-yet', dataset: { feature }, 'aria-label': title },
    h('h2', {}, title),
    h('p', {}, h('strong', { class: 'badge' }, 'Not available yet'), ' ', text));
}

export function errorBox(err) {
  const message = err && err.message ? err.message : String(err);
  return h('p', { class: 'error', role: 'alert' }, message);
}

export function copyButton(getText, label = 'Copy') {
  const button = h('button', { type: 'button', class: 'secondary' }, label);
  button.addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(getText());
      button.textContent = 'Copied';
    } catch {
      button.textContent = 'Select and copy it by hand';
    }
    setTimeout(() => { button.textContent = label; }, 2500);
  });
  return button;
}
