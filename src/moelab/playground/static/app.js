// moelab playground page. It only shows what the JSON API returns (docs/playground.md):
// no number is computed here.
"use strict";

const $ = sel => document.querySelector(sel);
const $$ = sel => Array.from(document.querySelectorAll(sel));

async function api(method, path, body) {
  const r = await fetch(path, {method, headers: body ? {"Content-Type": "application/json"} : {},
    body: body ? JSON.stringify(body) : undefined});
  let data = null;
  try { data = await r.json(); } catch (e) { data = {error: {message: `${r.status} ${r.statusText}`}}; }
  if (!r.ok) {
    const err = new Error((data.error && data.error.message) || `${r.status}`);
    err.field = data.error && data.error.field; err.status = r.status;
    throw err;
  }
  return data;
}

// Errors next to their control: a span.err[data-for=FIELD] inside `scope`, else the panel's box.
function showError(scope, boxSel, err) {
  clearErrors(scope, boxSel);
  const span = err.field ? scope.querySelector(`.err[data-for="${err.field}"]`) : null;
  if (span) {
    span.textContent = err.message;
    const input = span.parentElement.querySelector("input,select,textarea");
    if (input) input.setAttribute("aria-invalid", "true");
  } else {
    $(boxSel).textContent = err.message;
  }
}
function clearErrors(scope, boxSel) {
  scope.querySelectorAll(".err").forEach(s => { s.textContent = ""; });
  scope.querySelectorAll("[aria-invalid]").forEach(i => i.removeAttribute("aria-invalid"));
  $(boxSel).textContent = "";
}
function debounce(fn, ms) {
  let t = null;
  return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); };
}

// --------------------------------------------------------------------- tabs
$$("#tabs button").forEach(b => b.addEventListener("click", () => {
  $$("#tabs button").forEach(x => x.classList.toggle("active", x === b));
  $$(".panel").forEach(p => p.classList.toggle("active", p.id === "panel-" + b.dataset.panel));
  if (b.dataset.panel === "compare") loadCompare();
  if (b.dataset.panel === "route") loadModels();
  if (b.dataset.panel === "break") redrawBreak();
}));

// --------------------------------------------------------------------- size
const size = {controls: [], presets: {}, seq: 0};

function controlValues() {
  const out = {};
  for (const c of size.controls) {
    const input = $(`#c-${c.name}`);
    out[c.name] = typeof c.default === "boolean" ? input.checked
      : (input.value.trim() === "" ? null : Number(input.value));
  }
  return out;
}
function settingValues() {
  return {dtype: $("#s-dtype").value, context: Number($("#s-context").value), batch: Number($("#s-batch").value),
    gpu_memory_gb: Number($("#s-gpu_memory_gb").value)};
}
function fillControls(values) {
  for (const c of size.controls) {
    if (!(c.name in values)) continue;
    const input = $(`#c-${c.name}`);
    if (typeof c.default === "boolean") input.checked = !!values[c.name]; else input.value = values[c.name];
  }
}

const CARDS = [["total", "total"], ["active per token", "active"], ["routed experts skipped", "experts skipped"],
  ["FFN compute saved", "FFN compute saved"], ["forward FLOPs", "FLOPs / token"], ["min GPUs", "min GPUs"]];

function showSize(r) {
  $("#size-source").textContent = `${r.name} — ${r.source}`;
  $("#size-headline").textContent = r.headline;
  const byLabel = {};
  const table = $("#size-table");
  table.innerHTML = "";
  for (const row of r.rows) {
    const tr = document.createElement("tr");
    if (row.section) {
      tr.className = "section";
      tr.innerHTML = `<th colspan="2"></th>`;
      tr.firstChild.textContent = row.section;
    } else {
      tr.dataset.label = row.label;
      const th = document.createElement("th"), td = document.createElement("td");
      th.textContent = row.label; td.textContent = row.value;
      tr.append(th, td);
      byLabel[row.label] = row.value;
    }
    table.appendChild(tr);
  }
  const cards = $("#size-cards");
  cards.innerHTML = "";
  for (const [label, name] of CARDS) {
    const key = Object.keys(byLabel).find(k => k === label || k.startsWith(label + " "));
    if (!key) continue;
    const d = document.createElement("div");
    d.className = "card"; d.dataset.label = label;
    d.innerHTML = `<div class="v"></div><div class="k"></div>`;
    d.querySelector(".v").textContent = byLabel[key];
    d.querySelector(".k").textContent = name;
    cards.appendChild(d);
  }
}

async function sizeRequest(body) {
  const seq = ++size.seq;
  const form = $("#size-form");
  try {
    const r = await api("POST", "/api/size", Object.assign({settings: settingValues()}, body));
    if (seq !== size.seq) return;  // a newer request is under way
    clearErrors(form, "#size-error");
    showSize(r);
    if (!body.model && r.controls) fillControls(r.controls);
    // A preset without a value for a control (the textbook model has no d_model): greyed out.
    for (const c of size.controls) {
      $(`#c-${c.name}`).closest(".field").classList.toggle("unset", !body.model && !(r.controls && c.name in r.controls));
    }
    $("#size-form").dataset.state = "ok";
  } catch (err) {
    if (seq !== size.seq) return;
    showError(form, "#size-error", err);
    $("#size-form").dataset.state = "error";
  }
}
function sizeCurrent() {
  const preset = $("#preset").value;
  return sizeRequest(preset ? {preset} : {model: controlValues()});
}
const sizeSoon = debounce(sizeCurrent, 150);

async function initSize() {
  const meta = await api("GET", "/api/presets");
  size.controls = meta.controls;
  const box = $("#size-controls");
  for (const c of meta.controls) {
    const div = document.createElement("div");
    div.className = "field";
    const isBool = typeof c.default === "boolean";
    div.innerHTML = `<label for="c-${c.name}"></label><input id="c-${c.name}" name="${c.name}" `
      + (isBool ? `type="checkbox">` : `type="number" min="0" step="1">`) + `<span class="err" data-for="${c.name}"></span>`;
    div.querySelector("label").textContent = c.label;
    box.appendChild(div);
    const input = div.querySelector("input");
    if (isBool) input.checked = c.default; else input.value = c.default;
    input.addEventListener("input", () => { $("#preset").value = ""; sizeSoon(); });
  }
  const sel = $("#preset");
  for (const p of meta.presets) {
    size.presets[p.name] = p;
    const o = document.createElement("option");
    o.value = p.name; o.textContent = `${p.name} — ${p.description}`;
    sel.appendChild(o);
  }
  sel.addEventListener("change", sizeCurrent);
  const dt = $("#s-dtype");
  for (const d of meta.dtypes) { const o = document.createElement("option"); o.value = o.textContent = d; dt.appendChild(o); }
  for (const [k, v] of Object.entries(meta.settings)) $(`#s-${k}`).value = v;
  $$("#size-settings input, #size-settings select").forEach(i => i.addEventListener("input", sizeSoon));
  $("#config-file").addEventListener("change", async ev => {
    const f = ev.target.files[0];
    if (!f) return;
    $("#preset").value = "";
    await sizeRequest({config_text: await f.text(), filename: f.name});
  });
  $("#size-download").addEventListener("click", async () => {
    try {
      const cfg = await api("POST", "/api/size/config.json", {model: controlValues()});
      const a = document.createElement("a");
      a.href = URL.createObjectURL(new Blob([JSON.stringify(cfg, null, 2)], {type: "application/json"}));
      a.download = "config.json";
      a.click();
      URL.revokeObjectURL(a.href);
    } catch (err) { showError($("#size-form"), "#size-error", err); }
  });
  $("#config-path-go").addEventListener("click", () => {
    $("#preset").value = "";
    sizeRequest({path: $("#config-path").value});
  });
  await sizeCurrent();
}

// --------------------------------------------------------------------- route
// Up to 16 experts: the charts' categorical palette, light enough to read text on; more:
// hues spread round the wheel, alternating lightness so that neighbours differ.
function expertColor(e, E) {
  if (E <= PALETTE.length) {
    const h = PALETTE[e];
    return `rgba(${parseInt(h.slice(1, 3), 16)}, ${parseInt(h.slice(3, 5), 16)}, ${parseInt(h.slice(5, 7), 16)}, 0.45)`;
  }
  return `hsl(${(e * 360 / E).toFixed(0)}, 75%, ${e % 2 ? 70 : 82}%)`;
}
let routed = null;

async function loadModels() {
  const sel = $("#route-model");
  const keep = sel.value;
  const {models} = await api("GET", "/api/models");
  sel.innerHTML = "";
  for (const m of models) {
    const o = document.createElement("option");
    o.value = m.path; o.textContent = `${m.name} (${m.kind}) — ${m.path}`;
    sel.appendChild(o);
  }
  if (!models.length) {
    const o = document.createElement("option");
    o.value = ""; o.textContent = "no model under the served folders (start with --models DIR, or train a Break run)";
    sel.appendChild(o);
  }
  if (keep && models.some(m => m.path === keep)) sel.value = keep;
}

function tokenSpan(t, layer, E, i) {
  const s = document.createElement("span");
  const r = t.layers[layer];
  s.className = "tok";
  s.textContent = t.text;
  s.dataset.index = i;
  s.dataset.expert = r.experts[0];
  s.style.background = expertColor(r.experts[0], E);
  s.title = routed.layers.map(l => `layer ${l}: ` + t.layers[l].experts.map((e, j) =>
    `e${e} ${t.layers[l].weights[j].toFixed(2)}`).join(", ")).join("\n");
  const show = () => { $$(".tok.picked").forEach(x => x.classList.remove("picked")); s.classList.add("picked");
    $("#route-detail").textContent = `token ${JSON.stringify(t.text)} (id ${t.id})\n${s.title}`; };
  s.addEventListener("mouseenter", show); s.addEventListener("click", show);
  return s;
}

function drawTokens() {
  const box = $("#route-tokens"), legend = $("#route-legend");
  box.innerHTML = ""; legend.innerHTML = "";
  if (!routed) return;
  const chosen = $("#route-layer").value;
  const E = routed.num_experts;
  // One line per MoE layer ("all", as Mixtral's Figure 8 sets layers side by side), or one layer.
  const layers = chosen === "all" ? routed.layers.map(String) : [chosen];
  for (const layer of layers) {
    const line = document.createElement("div");
    line.className = "tokline";
    if (layers.length > 1) {
      const label = document.createElement("span");
      label.className = "toklabel"; label.textContent = `layer ${layer}`;
      line.appendChild(label);
    }
    routed.tokens.forEach((t, i) => line.appendChild(tokenSpan(t, layer, E, i)));
    box.appendChild(line);
  }
  for (let e = 0; e < E; e++) {
    const s = document.createElement("span");
    s.textContent = `expert ${e}`; s.style.background = expertColor(e, E);
    legend.appendChild(s);
  }
}

// Typing routes too (debounced), so requests can overlap: only the latest one's answer is
// drawn, or an earlier, slower answer would redraw the tokens of text no longer there.
let routeSeq = 0;
async function routeGo() {
  const panel = $("#panel-route"), seq = ++routeSeq;
  $("#route-tokens").dataset.state = "busy";
  try {
    const answer = await api("POST", "/api/route", {model: $("#route-model").value, text: $("#route-text").value});
    if (seq !== routeSeq) return;
    routed = answer;
    clearErrors(panel, "#route-error");
    const sel = $("#route-layer"), keep = sel.value;
    sel.innerHTML = "";
    for (const l of routed.layers) { const o = document.createElement("option"); o.value = o.textContent = l; sel.appendChild(o); }
    const all = document.createElement("option");
    all.value = "all"; all.textContent = "all layers";
    sel.appendChild(all);
    if (keep === "all" || routed.layers.map(String).includes(keep)) sel.value = keep;
    $("#route-info").textContent = `${routed.tokens.length} tokens, ${routed.num_experts} experts, top-${routed.top_k}`;
    drawTokens();
    $("#route-tokens").dataset.state = "ok";
  } catch (err) {
    if (seq !== routeSeq) return;
    showError(panel, "#route-error", err);
    $("#route-tokens").dataset.state = "error";
  }
}
$("#route-go").addEventListener("click", routeGo);
$("#route-text").addEventListener("input", debounce(() => { if ($("#route-model").value) routeGo(); }, 400));
$("#route-layer").addEventListener("change", drawTokens);

// --------------------------------------------------------------------- break
const brk = {meta: null, selected: null, source: null, series: {}, load: {}, points: 0, E: 8, runs: []};

function knobInputs(scale) {
  const box = $("#break-knobs");
  box.innerHTML = "<legend>knobs</legend>";
  const defaults = brk.meta.scales[scale];
  for (const k of brk.meta.experiment_knobs[$("#b-experiment").value]) {
    const div = document.createElement("div");
    div.className = "field";
    div.innerHTML = `<label for="k-${k}"></label><input id="k-${k}" type="text"><span class="err" data-for="${k}"></span>`;
    div.querySelector("label").textContent = k.replace(/_/g, " ");
    const v = defaults[k];
    div.querySelector("input").value = Array.isArray(v) ? v.map(x => x === null ? "none" : x).join(", ") : v;
    box.appendChild(div);
  }
}
function knobValues() {
  const defaults = brk.meta.scales[$("#b-scale").value], out = {};
  for (const k of brk.meta.experiment_knobs[$("#b-experiment").value]) {
    const raw = $(`#k-${k}`).value.trim();
    let v;
    if (k === "capacity_factors") {
      v = raw.split(",").map(s => s.trim()).filter(s => s).map(s => (s === "none" || s === "null") ? null : Number(s));
    } else { v = raw === "" ? null : Number(raw); }
    if (JSON.stringify(v) !== JSON.stringify(defaults[k])) out[k] = v;
  }
  return out;
}

async function refreshRuns() {
  const d = await api("GET", "/api/runs");
  brk.runs = d.runs;
  const t = $("#break-runs");
  t.innerHTML = "<tr><th>run</th><th>state</th><th>queue</th></tr>";
  for (const r of d.runs.slice().reverse()) {
    const tr = document.createElement("tr");
    tr.className = "clickable" + (r.id === brk.selected ? " selected" : "");
    tr.dataset.id = r.id;
    tr.innerHTML = "<th></th><td></td><td></td>";
    tr.children[0].textContent = r.id;
    tr.children[1].innerHTML = `<span class="state ${r.state}"></span>`;
    tr.children[1].firstChild.textContent = r.state;
    tr.children[2].textContent = r.queue_position ? `#${r.queue_position}` : "";
    tr.addEventListener("click", () => watch(r.id));
    t.appendChild(tr);
  }
  const sel = d.runs.find(r => r.id === brk.selected);
  $("#break-stop").disabled = !sel || !["queued", "running"].includes(sel.state);
  $("#break-resume").disabled = !sel || sel.state !== "stopped";
}

function redrawBreak() {
  const names = Object.keys(brk.series);
  const line = key => names.map(n => ({name: n, points: brk.series[n].map(p => [p.step, p[key]])}));
  lineChart($("#chart-loss"), line("loss"));
  lineChart($("#chart-share"), line("busiest_expert_share"), {hline: 1 / brk.E, ymin: 0});
  lineChart($("#chart-logit"), line("max_router_logit"));
  // The load chart shows the run picked under it (by default the latest one with a router:
  // a dense run has no expert load).
  const sel = $("#load-run");
  const routed = names.filter((n) => brk.load[n]);
  if (sel.options.length !== routed.length) {
    const keep = sel.value;
    sel.innerHTML = "";
    for (const n of routed) { const o = document.createElement("option"); o.value = o.textContent = n; sel.appendChild(o); }
    sel.value = routed.includes(keep) && sel.dataset.picked ? keep : (routed[routed.length - 1] || "");
  }
  const shown = sel.value;
  barChart($("#chart-load"), shown && brk.load[shown] ? brk.load[shown] : [], {hline: 1 / brk.E});
}
const redrawSoon = (() => { let queued = false; return () => { if (queued) return; queued = true;
  requestAnimationFrame(() => { queued = false; redrawBreak(); }); }; })();

function showVerdict(v) {
  const box = $("#break-verdict");
  box.innerHTML = "";
  if (!v) return;
  const h = document.createElement("p");
  h.className = v.passed ? "ok" : "bad";
  h.id = "verdict-headline";
  h.textContent = v.passed ? "verdict: effect shown as claimed" : "verdict: effect NOT shown at this scale";
  const ul = document.createElement("ul");
  for (const line of v.verdicts) { const li = document.createElement("li"); li.textContent = line; ul.appendChild(li); }
  box.append(h, ul);
}

function watch(id) {
  if (brk.source) brk.source.close();
  brk.selected = id; brk.series = {}; brk.load = {}; brk.points = 0;
  delete $("#load-run").dataset.picked;
  $("#break-title").textContent = id;
  $("#break-points").textContent = "";
  showVerdict(null);
  redrawBreak();
  const src = new EventSource(`/api/runs/${encodeURIComponent(id)}/events`);
  brk.source = src;
  const setState = s => { const e = $("#break-state"); e.className = "state " + s; e.textContent = s; };
  src.addEventListener("status", ev => {
    const r = JSON.parse(ev.data);
    setState(r.state + (r.queue_position ? ` (#${r.queue_position} in queue)` : ""));
    refreshRuns();
  });
  src.addEventListener("point", ev => {
    const p = JSON.parse(ev.data);
    (brk.series[p.run] = brk.series[p.run] || []).push(p);
    if (p.load && p.load.length) { brk.load[p.run] = p.load; brk.E = p.load.length; }
    brk.points += 1;
    $("#break-points").textContent = `${brk.points} points`;
    $("#break-points").dataset.count = brk.points;
    redrawSoon();
  });
  src.addEventListener("stop", ev => {
    const p = JSON.parse(ev.data);
    $("#break-error").textContent = `${p.run} stopped by the trainer at step ${p.step}: ${p.reason}`;
  });
  src.addEventListener("verdict", ev => showVerdict(JSON.parse(ev.data)));
  src.addEventListener("end", ev => {
    const r = JSON.parse(ev.data);
    setState(r.state);
    if (r.state === "failed") $("#break-error").textContent = r.error || "the run failed";
    src.close();
    refreshRuns();
  });
  refreshRuns();
}

async function initBreak() {
  brk.meta = await api("GET", "/api/runs");
  const ex = $("#b-experiment"), sc = $("#b-scale");
  for (const e of brk.meta.experiments) { const o = document.createElement("option"); o.value = o.textContent = e; ex.appendChild(o); }
  for (const s of Object.keys(brk.meta.scales)) { const o = document.createElement("option"); o.value = o.textContent = s; sc.appendChild(o); }
  knobInputs(sc.value);
  sc.addEventListener("change", () => knobInputs(sc.value));
  ex.addEventListener("change", () => knobInputs(sc.value));
  $("#break-run").addEventListener("click", async () => {
    const form = $("#break-form");
    try {
      const r = await api("POST", "/api/runs", {experiment: ex.value, scale: sc.value, knobs: knobValues()});
      clearErrors(form, "#break-error");
      watch(r.id);
    } catch (err) { showError(form, "#break-error", err); }
  });
  $("#break-stop").addEventListener("click", async () => {
    if (brk.selected) { await api("POST", `/api/runs/${brk.selected}/stop`); refreshRuns(); }
  });
  $("#break-resume").addEventListener("click", async () => {
    if (brk.selected) { await api("POST", `/api/runs/${brk.selected}/resume`); watch(brk.selected); }
  });
  await refreshRuns();
}

// --------------------------------------------------------------------- compare
const cmp = {runs: [], picked: new Set()};

async function drawPair(picked) {
  // One MoE and one dense run ticked: `moelab compare`'s steps-to-dense-loss figure.
  const moe = picked.filter(r => r.kind === "MoE"), dense = picked.filter(r => r.kind === "dense");
  const box = $("#compare-pair");
  box.textContent = "";
  if (moe.length !== 1 || dense.length !== 1) {
    box.textContent = "Tick one MoE and one dense run for the steps the MoE needs to reach the dense run's loss.";
    return;
  }
  try {
    const d = await api("POST", "/api/compare/pair", {moe: moe[0].path, dense: dense[0].path});
    box.textContent = d.sentence;
  } catch (err) { box.textContent = err.message; }
}

function drawCompare() {
  const picked = cmp.runs.filter(r => cmp.picked.has(r.path));
  drawPair(picked);
  lineChart($("#chart-cmp-val"), picked.map(r => ({name: r.name, points: r.val_curve})), {empty: "tick runs above"});
  lineChart($("#chart-cmp-train"), picked.map(r => ({name: r.name, points: r.train_curve})), {empty: "tick runs above"});
}
async function loadCompare() {
  const {runs} = await api("GET", "/api/compare");
  cmp.runs = runs;
  const t = $("#compare-table");
  t.innerHTML = "<tr><th></th><th>run</th><th>kind</th><th>total</th><th>active</th><th>steps</th>"
    + "<th>train loss</th><th>val loss</th><th>busiest share</th></tr>";
  const f = (v, d) => v === null || v === undefined ? "-" : v.toFixed(d);
  for (const r of runs) {
    const tr = document.createElement("tr");
    tr.innerHTML = "<td><input type=checkbox></td>" + "<td></td>".repeat(8);
    const cells = [r.name, r.kind, r.total, r.active, String(r.steps), f(r.train_loss, 3), f(r.val_loss, 3),
      f(r.busiest_expert_share, 3)];
    cells.forEach((c, i) => { tr.children[i + 1].textContent = c; });
    tr.children[1].style.textAlign = "left";
    const box = tr.querySelector("input");
    box.checked = cmp.picked.has(r.path);
    box.addEventListener("change", () => { if (box.checked) cmp.picked.add(r.path); else cmp.picked.delete(r.path); drawCompare(); });
    t.appendChild(tr);
  }
  if (!runs.length) t.insertAdjacentHTML("beforeend", "<tr><td colspan=9>no runs yet: start one in Break</td></tr>");
  if (!cmp.picked.size) runs.slice(0, 4).forEach(r => cmp.picked.add(r.path));
  t.querySelectorAll("tr").forEach((tr, i) => { const b = tr.querySelector("input"); if (b && runs[i - 1]) b.checked = cmp.picked.has(runs[i - 1].path); });
  drawCompare();
}
$("#compare-refresh").addEventListener("click", loadCompare);
$("#load-run").addEventListener("change", () => { $("#load-run").dataset.picked = "1"; redrawBreak(); });

window.addEventListener("resize", debounce(() => { redrawBreak(); drawCompare(); }, 200));
Promise.all([initSize(), initBreak(), loadModels()]).then(() => { document.body.dataset.ready = "1"; })
  .catch(err => { document.body.dataset.ready = "error"; $("#size-error").textContent = String(err); });
