// The residents' page: pick a place, read its figures from the public API, show them in German or English.
import { LANGS, TEXT, UNITS } from "./i18n.js";
import { dataElement, dateTime } from "./format.js";
import { drawFlow } from "./flow.js";

const WINDOWS = ["today", "last_30_days", "this_year"];
const LOOPS = ["electricity", "heat", "water"];
const state = { lang: "de", cells: [], cell: null, summary: null, window: "today", error: null };
const $ = (sel) => document.querySelector(sel);

function t() {
  return TEXT[state.lang];
}

// a text with {placeholders} filled by strings or nodes
function fill(template, values) {
  const frag = document.createDocumentFragment();
  template.split(/(\{\w+\})/).forEach((part) => {
    const m = /^\{(\w+)\}$/.exec(part);
    const v = m ? values[m[1]] : part;
    if (v === undefined || v === null) return;
    frag.append(v instanceof Node ? v : document.createTextNode(String(v)));
  });
  return frag;
}

function figure(win, loop, name) {
  const w = state.summary && state.summary[win];
  const l = w && w[loop];
  return l ? l[name] : null;
}

function value(win, loop, name) {
  const v = figure(win, loop, name);
  return v === null || v === undefined ? null : dataElement(`${win}.${loop}.${name}`, v, UNITS[`${loop}.${name}`], state.lang);
}

function cellName() {
  return state.summary ? state.summary.name : (state.cells.find((c) => c.id === state.cell) || {}).name || "";
}

function renderStatic() {
  const tx = t();
  document.documentElement.lang = state.lang;
  document.title = cellName() ? fill(tx.title, { cell: cellName() }).textContent : tx.pageTitle;
  document.querySelectorAll("[data-i18n]").forEach((node) => {
    node.textContent = tx[node.dataset.i18n];
  });
  $("#title").textContent = cellName() ? fill(tx.title, { cell: cellName() }).textContent : tx.pageTitle;
  document.querySelectorAll("[data-lang]").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.lang === state.lang)));
  document.querySelectorAll("[data-window]").forEach((b) => {
    b.textContent = tx[b.dataset.window];
    b.setAttribute("aria-pressed", String(b.dataset.window === state.window));
  });
}

function card(title, big, explanation) {
  const art = document.createElement("article");
  art.className = "card";
  const h = document.createElement("h3");
  h.textContent = title;
  const p = document.createElement("p");
  p.className = "big";
  const e = document.createElement("p");
  e.className = "explain";
  if (big) {
    p.append(big);
    e.append(explanation);
  } else {
    p.textContent = "–";
    e.textContent = t().notAvailable;
  }
  art.append(h, p, e);
  return art;
}

function renderCards() {
  const tx = t();
  const cell = cellName();
  const box = $("#cards");
  box.replaceChildren();
  for (const [win, title, text] of [["today", tx.ssToday, tx.ssExplainToday], ["last_30_days", tx.ss30, tx.ssExplain30]]) {
    const pct = value(win, "electricity", "self_sufficiency_pct");
    box.append(card(title, pct, pct && fill(text, { cell, pct: value(win, "electricity", "self_sufficiency_pct"),
      imp: value(win, "electricity", "grid_import") })));
  }
  const heat = value("today", "heat", "local_share_pct");
  const imported = value("today", "heat", "imported");
  box.append(card(tx.heatShare, heat, heat && fill(imported ? tx.heatExplainImport : tx.heatExplainNoImport, {
    pct: value("today", "heat", "local_share_pct"), gen: value("today", "heat", "generation"), imp: imported })));
  const water = value("today", "water", "abstraction") || value("today", "water", "supply");
  const explain = document.createDocumentFragment();
  if (water) {
    const abstraction = value("today", "water", "abstraction");
    if (abstraction) explain.append(fill(tx.waterExplainAbstraction, { v: abstraction }), " ");
    const loss = value("today", "water", "non_revenue_pct");
    if (loss) explain.append(fill(tx.waterExplainLoss, { pct: loss, v: value("today", "water", "non_revenue") }), " ");
    const pumping = value("today", "water", "pumping_kwh_per_m3");
    if (pumping) explain.append(fill(tx.waterExplainPumping, { v: pumping }));
  }
  box.append(card(tx.water, water, explain));
}

function renderFlows() {
  const tx = t();
  const box = $("#flows");
  box.replaceChildren();
  const w = state.summary && state.summary[state.window];
  if (!w) return;
  if (!LOOPS.some((loop) => w.flows[loop])) {
    const p = document.createElement("p");
    p.className = "note";
    p.textContent = tx.notAvailable;
    box.append(p);
  }
  for (const loop of LOOPS) {
    const flows = w.flows[loop];
    if (!flows) continue;
    const fig = document.createElement("figure");
    fig.className = "flow-figure";
    const cap = document.createElement("figcaption");
    const h = document.createElement("h3");
    h.textContent = `${tx.loopTitle[loop]} – ${tx[state.window]}`;
    cap.append(h);
    fig.append(cap, drawFlow(loop, flows, tx, state.lang, `flows.${state.window}.${loop}`));
    if (flows.withheld) {
      const note = document.createElement("p");
      note.className = "note";
      note.textContent = tx.withheldFlow;
      fig.append(note);
    }
    box.append(fig);
  }
}

function renderNumbers() {
  const tx = t();
  const table = $("#numbers");
  table.replaceChildren();
  const caption = document.createElement("caption");
  caption.textContent = fill(tx.numbersCaption, { cell: cellName() }).textContent;
  // explicit roles: on phones the rows are laid out as grids, which would drop the table's semantics
  table.setAttribute("role", "table");
  const head = document.createElement("thead");
  head.setAttribute("role", "rowgroup");
  const hr = document.createElement("tr");
  hr.setAttribute("role", "row");
  for (const label of [tx.figure, ...WINDOWS.map((w) => tx[w])]) {
    const th = document.createElement("th");
    th.scope = "col";
    th.setAttribute("role", "columnheader");
    th.textContent = label;
    hr.append(th);
  }
  head.append(hr);
  const body = document.createElement("tbody");
  body.setAttribute("role", "rowgroup");
  for (const [key, [name, explanation]] of Object.entries(tx.rows)) {
    const [loop, fig] = key.split(".");
    const tr = document.createElement("tr");
    tr.setAttribute("role", "row");
    const th = document.createElement("th");
    th.scope = "row";
    th.setAttribute("role", "rowheader");
    const n = document.createElement("span");
    n.className = "name";
    n.textContent = name;
    const e = document.createElement("span");
    e.className = "explain";
    e.textContent = explanation;
    th.append(n, e);
    tr.append(th);
    for (const win of WINDOWS) {
      const td = document.createElement("td");
      td.setAttribute("role", "cell");
      td.dataset.label = tx[win];
      const w = state.summary[win];
      const v = value(win, loop, fig);
      if (v) td.append(v);
      else td.textContent = w.withheld.includes(key) ? tx.withheld : tx.notMetered;
      tr.append(td);
    }
    body.append(tr);
  }
  table.append(caption, head, body);
}

function renderFooter() {
  const tx = t();
  const s = state.summary;
  const asOf = $("#as-of");
  asOf.replaceChildren();
  const cover = $("#coverage");
  cover.replaceChildren();
  if (s) {
    asOf.textContent = fill(tx.asOf, { time: dateTime(s.today.until_ms, s.timezone, state.lang) }).textContent;
    const pct = Math.min(...Object.values(s.today.coverage_pct));
    if (Number.isFinite(pct)) cover.append(fill(tx.coverage, { pct: dataElement("today.coverage_pct.min", pct, "%", state.lang) }));
  }
  $("#privacy").textContent = fill(tx.privacy, { k: s ? s.k_min : 3 }).textContent;
}

function setStatus(text) {
  $("#status").textContent = text || "";
}

function render() {
  renderStatic();
  if (state.error) {
    setStatus(state.error);
  } else if (!state.summary) {
    setStatus(state.cells.length || state.cell ? t().loading : t().noCells);
  } else {
    setStatus("");
  }
  const ready = Boolean(state.summary) && !state.error;
  $("#content").hidden = !ready;
  if (ready) {
    renderCards();
    renderFlows();
    renderNumbers();
  }
  renderFooter();
}

async function getJSON(url) {
  const r = await fetch(url, { headers: { Accept: "application/json" } });
  if (r.status === 429) throw new Error("tooMany");
  if (!r.ok) throw new Error("error");
  return r.json();
}

function remember() {
  const url = new URL(window.location.href);
  url.searchParams.set("lang", state.lang);
  if (state.cell) url.searchParams.set("cell", state.cell);
  window.history.replaceState(null, "", url);
  try {
    window.localStorage.setItem("kwwk.lang", state.lang);
  } catch {
    // private mode: the URL keeps the choice
  }
}

async function loadCell(cell) {
  state.cell = cell;
  state.summary = null;
  state.error = null;
  $("#cell").value = cell;
  remember();
  document.body.setAttribute("aria-busy", "true");
  render();
  try {
    const summary = await getJSON(`/api/public/cells/${encodeURIComponent(cell)}/summary`);
    if (state.cell === cell) state.summary = summary;
  } catch (err) {
    if (state.cell === cell) state.error = t()[err.message] || t().error;
  }
  document.body.removeAttribute("aria-busy");
  document.body.dataset.loaded = state.cell || "";
  render();
}

function setLang(lang) {
  state.lang = LANGS.includes(lang) ? lang : "de";
  remember();
  if (state.error) state.error = t().error;
  render();
}

function initialLang(params) {
  const asked = params.get("lang");
  if (LANGS.includes(asked)) return asked;
  try {
    const saved = window.localStorage.getItem("kwwk.lang");
    if (LANGS.includes(saved)) return saved;
  } catch {
    // no storage
  }
  for (const l of navigator.languages || [navigator.language || "de"]) {
    const base = l.slice(0, 2).toLowerCase();
    if (LANGS.includes(base)) return base;
  }
  return "de";
}

async function main() {
  const params = new URLSearchParams(window.location.search);
  state.lang = initialLang(params);
  document.querySelectorAll("[data-lang]").forEach((b) => b.addEventListener("click", () => setLang(b.dataset.lang)));
  document.querySelectorAll("[data-window]").forEach((b) => b.addEventListener("click", () => {
    state.window = b.dataset.window;
    render();
  }));
  const select = $("#cell");
  select.addEventListener("change", () => loadCell(select.value));
  render();
  try {
    state.cells = await getJSON("/api/public/cells");
  } catch (err) {
    state.error = t()[err.message] || t().error;
    render();
    return;
  }
  select.replaceChildren(...state.cells.map((c) => new Option(c.name, c.id)));
  const wanted = params.get("cell");
  const first = state.cells.find((c) => c.id === wanted) || state.cells[0];
  if (first) await loadCell(first.id);
  else render();
}

main();
