// Overview: balance, plan, the last 30 days of spending per day stacked by member and key, top spenders.

import { api, orgPath } from '../api.js';
import { h, table } from '../dom.js';
import { fmtInt, lastDays } from '../format.js';
import { loadVendor } from '../vendor.js';
import { actorKey, actorKinds, actorNames, scopeNote, usageFor } from './shared.js';

const COLORS = ['#1f4fd1', '#d1491f', '#1f9d55', '#8e44ad', '#c49000', '#0f7c8c', '#b0306a', '#5b6b7a', '#7a4f1f'];
const MAX_SERIES = 8;

function stat(label, value, note, notYet = false) {
  return h('div', { class: notYet ? 'stat not-yet' : 'stat', dataset: notYet ? { feature: notYet } : undefined },
    h('span', { class: 'stat-label' }, label),
    h('span', { class: 'stat-value' }, value),
    note ? h('span', { class: 'stat-note' }, note) : null);
}

export async function overview(body, ctx) {
  const { org } = ctx;
  const to = new Date();
  const from = new Date(to.getTime() - 30 * 86400000);
  const [info, spend] = await Promise.all([api(orgPath(org)), usageFor(org, { from, to, groupBy: 'day,actor' })]);
  if (!ctx.alive()) return;

  body.append(h('section', { class: 'stats', 'aria-label': 'Balance and plan' },
    stat('Balance', fmtInt(info.credit_balance), 'credits'),
    stat('Available after holds', 'Not available yet', 'holds arrive with spend controls', 'holds'),
    stat('Expiring within 7 days', 'Not available yet', 'expiring credits arrive with spend controls', 'credit-expiry'),
    stat('Plan', info.plan)));

  const name = actorNames(spend);
  const kind = actorKinds(spend);
  const days = lastDays(30).filter((d) => d >= spend.from.slice(0, 10));
  const totals = new Map();
  for (const row of spend.data) {
    const key = actorKey(row);
    const t = totals.get(key) || { row, spent: 0, spends: 0 };
    t.spent += row.spent;
    t.spends += row.spends;
    totals.set(key, t);
  }
  const ranked = [...totals.entries()].sort((a, b) => b[1].spent - a[1].spent);

  const chartSection = h('section', { class: 'card', 'aria-labelledby': 'chart-title' },
    h('h2', { id: 'chart-title' }, 'Credits spent per day, last 30 days'),
    h('p', { class: 'muted' }, scopeNote(spend, org), ' Days are UTC.'));
  body.append(chartSection);
  if (!spend.data.length) {
    chartSection.append(h('p', {}, 'Nothing was spent in the last 30 days.'));
  } else {
    const canvas = h('canvas', {
      role: 'img', id: 'spend-chart',
      'aria-label': `Stacked bar chart of credits spent per day over the last 30 days, by member and key; `
        + `${fmtInt(spend.total_spent)} credits in all.`,
    });
    chartSection.append(h('div', { class: 'chart-box' }, canvas));
    // The same figures as a table, for screen readers and for copying.
    const rows = [];
    for (const day of days) {
      for (const row of spend.data.filter((r) => r.day === day)) {
        rows.push(h('tr', {}, h('td', {}, day), h('td', {}, name(row)), h('td', { class: 'num' }, fmtInt(row.spent))));
      }
    }
    chartSection.append(h('details', {}, h('summary', {}, 'Show the figures as a table'),
      table('Credits spent per day and actor', ['Day (UTC)', 'Who', 'Credits'], rows)));
    const Chart = await loadVendor('chart');
    if (!ctx.alive()) return;
    const series = ranked.slice(0, MAX_SERIES).map(([key]) => key);
    const datasets = series.map((key, i) => ({
      label: name(totals.get(key).row),
      backgroundColor: COLORS[i % COLORS.length],
      data: days.map((day) => spend.data.filter((r) => r.day === day && actorKey(r) === key)
        .reduce((sum, r) => sum + r.spent, 0)),
    }));
    if (ranked.length > MAX_SERIES) {
      const rest = new Set(ranked.slice(MAX_SERIES).map(([key]) => key));
      datasets.push({
        label: `${ranked.length - MAX_SERIES} others`,
        backgroundColor: COLORS[COLORS.length - 1],
        data: days.map((day) => spend.data.filter((r) => r.day === day && rest.has(actorKey(r)))
          .reduce((sum, r) => sum + r.spent, 0)),
      });
    }
    const chart = new Chart(canvas, {
      type: 'bar',
      data: { labels: days.map((d) => d.slice(5)), datasets },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        scales: {
          x: { stacked: true },
          y: { stacked: true, beginAtZero: true, ticks: { precision: 0 }, title: { display: true, text: 'credits' } },
        },
        plugins: { legend: { position: 'bottom' } },
      },
    });
    ctx.onCleanup(() => chart.destroy());
  }

  const top = ranked.slice(0, 10).map(([, t], i) => h('tr', {},
    h('td', { class: 'num' }, String(i + 1)), h('td', {}, name(t.row)), h('td', {}, kind(t.row)),
    h('td', { class: 'num' }, fmtInt(t.spent)), h('td', { class: 'num' }, fmtInt(t.spends))));
  body.append(h('section', { class: 'card', 'aria-labelledby': 'top-title' },
    h('h2', { id: 'top-title' }, 'Top spenders, last 30 days'),
    top.length ? table('Top spenders', ['#', 'Who', 'Kind', 'Credits', 'Spends'], top)
      : h('p', {}, 'Nobody has spent credits in the last 30 days.')));
}
