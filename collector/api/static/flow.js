// One loop's flows as an inline SVG: sources on the left, through the network in the middle, to their
// uses on the right; each band as wide as its amount. Labels carry the exact values (data-value).
import { withUnit } from "./format.js";

const NS = "http://www.w3.org/2000/svg";
const W = 320;          // viewBox width: on a 360 px phone one unit is about one pixel
const LABEL_W = 100;    // label column on each side
const BAR = 8;
const HUB_W = 24;
const FLOW_H = 170;     // height of the larger side's bands together
const GAP = 6;
const FONT = 12;
const LINE = 14;
const TOP = 34;         // room for the hub's name
const COLORS = { local: "#2e7d32", imported: "#546e7a", unknown: "#8d8d8d", use: "#1565c0", loss: "#e65100", hub: "#37474f" };
const LOSSES = new Set(["network_loss", "losses", "treatment", "plant"]);

function el(name, attrs = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// the width of a label's text, measured with the page's own font
let ctx = null;
function measure(text, weight) {
  if (!ctx) ctx = document.createElement("canvas").getContext("2d");
  ctx.font = `${weight} ${FONT}px ${getComputedStyle(document.body).fontFamily}`;
  return ctx.measureText(text).width;
}

// lines no wider than maxWidth: breaks at spaces, in long words at their soft hyphens (shown as "-"),
// and only as a last resort anywhere
function wrap(text, maxWidth, weight) {
  const fits = (s) => measure(s, weight) <= maxWidth;
  const pieces = [];  // [text, joiner before it: " " between words, "" within a word]
  text.split(" ").forEach((word, i) => {
    const plain = word.replaceAll("\u00ad", "");
    const parts = fits(plain) ? [plain] : word.split("\u00ad");
    parts.forEach((part, k) => {
      let rest = part;
      let first = true;
      while (!fits(rest) && rest.length > 2) {  // a syllable wider than the column: cut it
        let n = rest.length - 1;
        while (n > 1 && !fits(rest.slice(0, n) + "-")) n -= 1;
        pieces.push([rest.slice(0, n), first ? (k ? "" : i ? " " : "") : ""]);
        rest = rest.slice(n);
        first = false;
      }
      pieces.push([rest, first ? (k ? "" : i ? " " : "") : ""]);
    });
  });
  const lines = [];
  let line = "";
  for (const [piece, joiner] of pieces) {
    const candidate = line + (line ? joiner : "") + piece;
    if (line && !fits(joiner === "" ? candidate + "-" : candidate)) {
      lines.push(joiner === "" ? line + "-" : line);
      line = piece;
    } else {
      line = candidate;
    }
  }
  if (line) lines.push(line);
  return lines;
}

function stack(items, scale, top) {
  let y = top;
  return items.map((it) => {
    const h = Math.max(0, it.value) * scale;
    const node = { ...it, y, h };
    y += h + GAP;
    return node;
  });
}

// label blocks near their nodes' centres, pushed apart so they never overlap
function placeLabels(nodes, blockHeight) {
  let next = 0;
  return nodes.map((n) => {
    const want = n.y + n.h / 2 - blockHeight(n) / 2;
    const y = Math.max(want, next);
    next = y + blockHeight(n) + 4;
    return y;
  });
}

function band(x0, y0, x1, y1, h, color) {
  const xm = (x0 + x1) / 2;
  const d = `M${x0},${y0} C${xm},${y0} ${xm},${y1} ${x1},${y1} L${x1},${y1 + h} C${xm},${y1 + h} ${xm},${y0 + h} ${x0},${y0 + h} Z`;
  return el("path", { d, fill: color, "fill-opacity": 0.45 });
}

/**
 * @param {string} loop electricity | heat | water
 * @param {{unit: string, sources: {key: string, value: number, local: boolean|null}[], uses: {key: string, value: number}[]}} flows
 * @param {object} t the texts of the page's language
 * @param {string} lang
 * @param {string} keyPrefix data-key prefix, e.g. "flows.today.electricity"
 */
export function drawFlow(loop, flows, t, lang, keyPrefix) {
  const id = `flow-${loop}`;
  const svg = el("svg", { viewBox: `0 0 ${W} 100`, role: "img", "aria-labelledby": `${id}-title ${id}-desc`, class: "flow" });
  const title = el("title", { id: `${id}-title` }, t.loopTitle[loop]);
  const nameOf = (names, key) => (names[`${loop}.${key}`] || names[key] || key).replaceAll("\u00ad", "");
  const describe = (items, names) => items.map((i) => `${nameOf(names, i.key)}: ${withUnit(i.value, flows.unit, lang)}`).join("; ");
  const desc = el("desc", { id: `${id}-desc` },
    `${describe(flows.sources, t.sources)}. → ${describe(flows.uses, t.uses)}.`);
  svg.append(title, desc);

  const totalIn = flows.sources.reduce((s, i) => s + Math.max(0, i.value), 0);
  const totalOut = flows.uses.reduce((s, i) => s + Math.max(0, i.value), 0);
  const total = Math.max(totalIn, totalOut);
  const scale = total > 0 ? FLOW_H / total : 0;
  const hubH = total * scale;
  const srcH = totalIn * scale + GAP * Math.max(0, flows.sources.length - 1);
  const useH = totalOut * scale + GAP * Math.max(0, flows.uses.length - 1);
  const colH = Math.max(hubH, srcH, useH);
  const sources = stack(flows.sources, scale, TOP + (colH - srcH) / 2);
  const uses = stack(flows.uses, scale, TOP + (colH - useH) / 2);
  const hubX = (W - HUB_W) / 2;
  const hubY = TOP + (colH - hubH) / 2;
  const srcX = LABEL_W;
  const useX = W - LABEL_W - BAR;
  const colorOf = (s) => (s.local === true ? COLORS.local : s.local === false ? COLORS.imported : COLORS.unknown);

  // bands into the hub, stacked in the order of the sources, and out of it in the order of the uses
  let yIn = hubY + (hubH - totalIn * scale) / 2;
  for (const s of sources) {
    svg.append(band(srcX + BAR, s.y, hubX, yIn, s.h, colorOf(s)));
    svg.append(el("rect", { x: srcX, y: s.y, width: BAR, height: Math.max(s.h, 1), fill: colorOf(s) }));
    yIn += s.h;
  }
  let yOut = hubY + (hubH - totalOut * scale) / 2;
  for (const u of uses) {
    const color = LOSSES.has(u.key) ? COLORS.loss : COLORS.use;
    svg.append(band(hubX + HUB_W, yOut, useX, u.y, u.h, color));
    svg.append(el("rect", { x: useX, y: u.y, width: BAR, height: Math.max(u.h, 1), fill: color }));
    yOut += u.h;
  }
  svg.append(el("rect", { x: hubX, y: hubY, width: HUB_W, height: Math.max(hubH, 2), fill: COLORS.hub, rx: 3 }));
  svg.append(el("text", { x: W / 2, y: TOP - 12, "text-anchor": "middle", class: "hub" }, t.hub[loop]));

  const lines = (n, names) => wrap(names[`${loop}.${n.key}`] || names[n.key] || n.key, LABEL_W - 6, 600);
  const blockH = (names, withOrigin) => (n) => (lines(n, names).length + 1 + (withOrigin ? 1 : 0)) * LINE;
  let bottom = TOP + colH;
  const label = (nodes, names, x, anchor, kind) => {
    const ys = placeLabels(nodes, blockH(names, kind === "sources"));
    nodes.forEach((n, i) => {
      const text = el("text", { x, y: ys[i] + FONT, "text-anchor": anchor });
      lines(n, names).forEach((line, k) => text.append(el("tspan", { x, dy: k ? LINE : 0, class: "name" }, line)));
      text.append(el("tspan", {
        x, dy: LINE, class: "value", "data-key": `${keyPrefix}.${kind}.${n.key}`, "data-value": n.value,
        "data-unit": flows.unit,
      }, withUnit(n.value, flows.unit, lang)));
      if (kind === "sources") {
        const origin = n.local === true ? t.local : n.local === false ? t.imported : "";
        if (origin) text.append(el("tspan", { x, dy: LINE, class: "origin" }, origin));
      }
      svg.append(text);
      bottom = Math.max(bottom, ys[i] + blockH(names, kind === "sources")(n));
    });
  };
  label(sources, t.sources, srcX - 4, "end", "sources");
  label(uses, t.uses, useX + BAR + 4, "start", "uses");
  svg.setAttribute("viewBox", `0 0 ${W} ${Math.ceil(bottom + 6)}`);
  return svg;
}
