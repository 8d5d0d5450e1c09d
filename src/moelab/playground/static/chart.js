// Small hand-written SVG charts: lines over steps and bars per expert. Drawing only; the
// numbers are the API's.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
// Tableau 10 (distinct in hue and lightness), then six more for up to 16 experts.
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
  "#9c755f", "#bab0ac", "#17becf", "#393b79", "#bcbd22", "#8c564b", "#637939", "#7f7f7f"];

function el(tag, attrs, parent) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function niceTicks(lo, hi, n) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9 * step; v += step) out.push(+v.toPrecision(12));
  return out;
}

function fmtTick(v) {
  const a = Math.abs(v);
  if (a >= 1000) return (v / 1000).toFixed(a >= 10000 ? 0 : 1) + "k";
  if (a === 0) return "0";
  if (a < 0.01) return v.toExponential(0);
  return String(+v.toPrecision(3));
}

// series: [{name, points: [[x, y], ...], color, dashed}]; opts: {hline, hlineLabel, ymin}
// Clear `svg` and size its viewBox to the element; with no data, say so in the middle.
function frame(svg, hasData, empty) {
  svg.innerHTML = "";
  const W = svg.clientWidth || 400, H = svg.clientHeight || 190;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  if (!hasData) el("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, svg).textContent = empty || "no points yet";
  return [W, H];
}

function lineChart(svg, series, opts) {
  opts = opts || {};
  const pts = series.flatMap(s => s.points.filter(p => Number.isFinite(p[1])));
  const [W, H] = frame(svg, pts.length > 0, opts.empty);
  if (!pts.length) return;
  const m = {l: 42, r: 8, t: 8, b: 34};
  let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
  let y0 = Math.min(...pts.map(p => p[1])), y1 = Math.max(...pts.map(p => p[1]));
  if (opts.hline !== undefined) { y0 = Math.min(y0, opts.hline); y1 = Math.max(y1, opts.hline); }
  if (opts.ymin !== undefined) y0 = Math.min(y0, opts.ymin);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 = y0 + Math.abs(y0 || 1) * 0.1; y0 = y0 - Math.abs(y0 || 1) * 0.1; }
  const pad = (y1 - y0) * 0.06; y0 -= pad; y1 += pad;
  const X = x => m.l + (x - x0) / (x1 - x0) * (W - m.l - m.r);
  const Y = y => H - m.b - (y - y0) / (y1 - y0) * (H - m.t - m.b);
  for (const t of niceTicks(y0, y1, 4)) {
    el("line", {x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t), class: "grid"}, svg);
    el("text", {x: m.l - 4, y: Y(t) + 4, "text-anchor": "end"}, svg).textContent = fmtTick(t);
  }
  for (const t of niceTicks(x0, x1, Math.max(2, Math.floor(W / 90)))) {
    el("text", {x: X(t), y: H - m.b + 14, "text-anchor": "middle"}, svg).textContent = fmtTick(t);
  }
  el("line", {x1: m.l, x2: m.l, y1: m.t, y2: H - m.b, class: "axis"}, svg);
  el("line", {x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "axis"}, svg);
  if (opts.hline !== undefined) {
    el("line", {x1: m.l, x2: W - m.r, y1: Y(opts.hline), y2: Y(opts.hline), stroke: "#868e96",
      "stroke-dasharray": "4 3"}, svg);
  }
  let lx = m.l;
  series.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    const good = s.points.filter(p => Number.isFinite(p[1]));
    if (good.length) {
      const d = good.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
      el("path", {d, fill: "none", stroke: color, "stroke-width": 1.8,
        "stroke-dasharray": s.dashed ? "5 3" : "", class: "series", "data-name": s.name}, svg);
      if (good.length === 1) el("circle", {cx: X(good[0][0]), cy: Y(good[0][1]), r: 3, fill: color}, svg);
    }
    const label = el("text", {x: lx + 12, y: H - 6}, svg);
    label.textContent = s.name;
    el("rect", {x: lx, y: H - 14, width: 9, height: 9, fill: color}, svg);
    lx += 22 + 6.5 * s.name.length;
  });
}

// values: one bar per expert (shares); opts: {hline}
function barChart(svg, values, opts) {
  opts = opts || {};
  const [W, H] = frame(svg, values.length > 0);
  if (!values.length) return;
  const m = {l: 42, r: 8, t: 8, b: 22};
  const top = Math.max(...values, opts.hline || 0) * 1.1 || 1;
  const Y = y => H - m.b - y / top * (H - m.t - m.b);
  for (const t of niceTicks(0, top, 4)) {
    el("line", {x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t), class: "grid"}, svg);
    el("text", {x: m.l - 4, y: Y(t) + 4, "text-anchor": "end"}, svg).textContent = fmtTick(t);
  }
  const bw = (W - m.l - m.r) / values.length;
  values.forEach((v, i) => {
    el("rect", {x: m.l + i * bw + 2, y: Y(v), width: Math.max(1, bw - 4), height: H - m.b - Y(v),
      fill: PALETTE[i % PALETTE.length], class: "bar"}, svg);
    el("text", {x: m.l + (i + 0.5) * bw, y: H - 6, "text-anchor": "middle"}, svg).textContent = "e" + i;
  });
  el("line", {x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "axis"}, svg);
  if (opts.hline !== undefined) {
    el("line", {x1: m.l, x2: W - m.r, y1: Y(opts.hline), y2: Y(opts.hline), stroke: "#868e96",
      "stroke-dasharray": "4 3"}, svg);
  }
}
