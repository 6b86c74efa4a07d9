// Billing: buy a credit pack or subscribe to Team (Stripe Checkout, admins), and the places for
// alerts and auto top-up, which do not exist yet.

import { api, orgPath } from '../api.js';
import { clear, errorBox, h, notYet } from '../dom.js';
import { fmtInt } from '../format.js';
import { isAdmin } from './shared.js';

const PACKS = [['small', 'Small'], ['medium', 'Medium'], ['large', 'Large']];

function goToCheckout(url) {
  const target = new URL(url);
  if (target.protocol !== 'https:' && target.protocol !== 'http:') throw new Error('Unexpected checkout address.');
  window.location.assign(target.href);
}

export async function billing(body, ctx) {
  const { org, role, config } = ctx;
  const info = await api(orgPath(org));
  if (!ctx.alive()) return;
  body.append(h('section', { class: 'stats', 'aria-label': 'Plan and balance' },
    h('div', { class: 'stat' }, h('span', { class: 'stat-label' }, 'Plan'), h('span', { class: 'stat-value' }, info.plan)),
    h('div', { class: 'stat' }, h('span', { class: 'stat-label' }, 'Balance'),
      h('span', { class: 'stat-value' }, fmtInt(info.credit_balance)), h('span', { class: 'stat-note' }, 'credits'))));

  const buy = h('section', { class: 'card', 'aria-labelledby': 'buy-title' }, h('h2', { id: 'buy-title' }, 'Buy credits'));
  body.append(buy);
  if (!isAdmin(role)) {
    buy.append(h('p', {}, `Only admins of ${org.name} can buy credits or change its plan; your role is ${role}.`));
  } else if (!config.checkout) {
    buy.append(h('p', {}, 'Stripe Checkout is not configured on this deployment (STRIPE_SECRET_KEY and the price ids).'));
  } else {
    const status = h('div', { 'aria-live': 'polite' });
    const checkout = async (button, path, payload) => {
      clear(status, h('p', { class: 'muted' }, 'Opening Stripe Checkout…'));
      button.disabled = true;
      try {
        const session = await api(path, { method: 'POST', body: { ...payload, org_id: org.slug } });
        goToCheckout(session.url);
      } catch (err) {
        clear(status, errorBox(err));
        button.disabled = false;
      }
    };
    const packs = h('div', { class: 'actions' }, PACKS.map(([pack, label]) => {
      const credits = config.packs && config.packs[pack];
      const button = h('button', { type: 'button' },
        `Buy ${label.toLowerCase()} pack${credits ? ` (${fmtInt(credits)} credits)` : ''}`);
      button.addEventListener('click', () => checkout(button, '/billing/checkout/credits', { pack }));
      return button;
    }));
    buy.append(h('p', {}, `Credits go to ${org.name}'s pool once Stripe confirms the payment.`), packs, status);
    const plan = h('section', { class: 'card', 'aria-labelledby': 'plan-title' }, h('h2', { id: 'plan-title' }, 'Plan'));
    if (info.plan === 'team') {
      plan.append(h('p', {}, `${org.name} is on the Team plan.`));
    } else {
      const subscribe = h('button', { type: 'button' }, 'Subscribe to Team');
      subscribe.addEventListener('click', () => checkout(subscribe, '/billing/checkout/subscription', { tier: 'team' }));
      plan.append(h('p', {}, 'Team adds org audit logs and monthly plan credits.'), subscribe);
    }
    body.append(plan);
  }

  body.append(notYet('alerts', 'Low-balance alerts',
    'Alerts when the balance runs low will be set here once notifications exist.'));
  body.append(notYet('auto-top-up', 'Auto top-up',
    'Buying a pack automatically when the balance runs low will be set here once it exists.'));
}
