"""A self-contained HTML page showing every layer's and head's attention (like BertViz's head view).

The page embeds the weights as base64 little-endian float32 [L, H, T, T] (exact, compact) and the
token strings as JSON; its inline JavaScript draws, for the selected layer and heads, a line from
each query token (left column) to each key token it attends to (right column) with opacity equal
to the weight. Hovering a token keeps only its lines. No CDN, no network: it works from file://.

URL-hash parameters set the initial view (handy for headless screenshots):
  attention.html#layer=3&heads=0,5&hover=q7      (hover=q<i> a query token, k<j> a key token)
The page publishes `window.attentionView` (weights, tokens, state) for inspection and tests.
"""

from __future__ import annotations

import base64
import html
import json

import numpy as np

# Lines for weights below this are not drawn (they would be invisible at this opacity anyway).
MIN_WEIGHT = 1e-3


def encode_weights(probs: np.ndarray) -> str:
  """base64 of the weights as little-endian float32 in C order, as the page's JS decodes them."""
  return base64.b64encode(np.ascontiguousarray(probs, dtype="<f4").tobytes()).decode("ascii")


def render_html(tokens: list[str], probs: np.ndarray, *, title: str, source: str) -> str:
  """The page for `probs` float32 [L, H, T, T] (query x key) over the `tokens` (T strings)."""
  probs = np.asarray(probs, np.float32)
  if probs.ndim != 4 or probs.shape[2] != probs.shape[3] or probs.shape[2] != len(tokens):
    raise ValueError(f"attention weights of shape {probs.shape} do not match {len(tokens)} tokens")
  n_layer, n_head, n_tok, _ = probs.shape
  data = {"tokens": tokens, "n_layer": n_layer, "n_head": n_head, "n_tok": n_tok,
          "min_weight": MIN_WEIGHT, "weights": encode_weights(probs), "source": source}
  # "<" escaped so that a token like "</script>" cannot end the data block early.
  payload = json.dumps(data).replace("<", "\\u003c")
  return (_TEMPLATE.replace("%TITLE%", html.escape(title)).replace("%SOURCE%", html.escape(source))
          .replace("%DATA%", payload))


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>%TITLE%</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 16px; color: #222; background: #fff; }
  h1 { font-size: 18px; margin: 0 0 4px; }
  .source { color: #666; font-size: 13px; margin-bottom: 10px; }
  .controls { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin-bottom: 10px; }
  .head-toggle { display: inline-flex; align-items: center; gap: 2px; font-size: 12px; cursor: pointer;
                 border: 1px solid #ccc; border-radius: 4px; padding: 1px 4px; user-select: none; }
  .head-toggle .swatch { width: 12px; height: 12px; display: inline-block; border-radius: 2px; }
  svg text { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre; cursor: default; }
  svg text.active { font-weight: bold; fill: #000; }
  .edge.hidden { display: none; }
  .tokbg { fill: #eee; opacity: 0; }
  .tokbg.active { opacity: 1; }
</style>
</head>
<body>
<h1>%TITLE%</h1>
<div class="source">%SOURCE%</div>
<div class="controls">
  <label>Layer <select id="layer"></select></label>
  <span>Heads:</span><span id="heads"></span>
  <button id="all-heads" type="button">all</button><button id="no-heads" type="button">none</button>
</div>
<svg id="view" xmlns="http://www.w3.org/2000/svg"></svg>
<script type="application/json" id="attention-data">%DATA%</script>
<script>
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("attention-data").textContent);
  const L = D.n_layer, H = D.n_head, T = D.n_tok;
  const bin = atob(D.weights);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const W = new Float32Array(bytes.buffer);  // little-endian on every browser platform
  const weight = (l, h, q, k) => W[((l * H + h) * T + q) * T + k];
  const color = h => `hsl(${Math.round(h * 360 / H)}, 75%, 42%)`;
  const state = { layer: 0, heads: new Set([...Array(H).keys()]), hover: null };
  const NS = "http://www.w3.org/2000/svg", ROW = 20, TOK_W = 150, GAP = 220;
  const svg = document.getElementById("view");
  svg.setAttribute("width", 2 * TOK_W + GAP + 20);
  svg.setAttribute("height", T * ROW + 20);

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (parent) parent.appendChild(e);
    return e;
  }
  const edges = el("g", { id: "edges" }, svg);
  const tokenRow = (side, i) => {
    const x = side === "q" ? TOK_W : TOK_W + GAP;
    const y = 10 + i * ROW + ROW / 2;
    el("rect", { class: "tokbg", id: `bg-${side}${i}`, x: side === "q" ? 0 : x, y: y - ROW / 2,
                 width: TOK_W, height: ROW }, svg);
    const t = el("text", { class: `token ${side}`, id: `tok-${side}${i}`, "data-i": i, y: y + 4,
                           x: side === "q" ? x - 6 : x + 6,
                           "text-anchor": side === "q" ? "end" : "start" }, svg);
    t.textContent = D.tokens[i];
    t.addEventListener("mouseenter", () => setHover(side + i));
    t.addEventListener("mouseleave", () => setHover(null));
  };
  for (let i = 0; i < T; i++) { tokenRow("q", i); tokenRow("k", i); }

  const select = document.getElementById("layer");
  for (let l = 0; l < L; l++) select.add(new Option(`Layer ${l}`, l));
  select.addEventListener("change", () => { state.layer = +select.value; draw(); });
  const headBox = document.getElementById("heads");
  for (let h = 0; h < H; h++) {
    const label = document.createElement("label");
    label.className = "head-toggle";
    label.innerHTML = `<input type="checkbox" data-head="${h}" checked>` +
                      `<span class="swatch" style="background:${color(h)}"></span>${h}`;
    label.querySelector("input").addEventListener("change", e => {
      e.target.checked ? state.heads.add(h) : state.heads.delete(h);
      draw();
    });
    headBox.appendChild(label);
  }
  const setHeads = hs => {
    state.heads = new Set(hs);
    headBox.querySelectorAll("input").forEach(i => { i.checked = state.heads.has(+i.dataset.head); });
    draw();
  };
  document.getElementById("all-heads").onclick = () => setHeads([...Array(H).keys()]);
  document.getElementById("no-heads").onclick = () => setHeads([]);

  function draw() {
    edges.replaceChildren();
    const x1 = TOK_W, x2 = TOK_W + GAP, y = i => 10 + i * ROW + ROW / 2;
    for (const h of [...state.heads].sort((a, b) => a - b)) {
      for (let q = 0; q < T; q++) {
        for (let k = 0; k <= q; k++) {
          const w = weight(state.layer, h, q, k);
          if (w < D.min_weight) continue;
          el("line", { class: "edge", x1, y1: y(q), x2, y2: y(k), stroke: color(h),
                       "stroke-width": 3, "stroke-opacity": w, "data-head": h, "data-q": q,
                       "data-k": k }, edges);
        }
      }
    }
    applyHover();
  }
  function setHover(h) { state.hover = h; applyHover(); }
  function applyHover() {
    const hv = state.hover, side = hv && hv[0], i = hv && hv.slice(1);
    for (const e of edges.children) {
      e.classList.toggle("hidden", !!hv && e.dataset[side] !== i);
    }
    svg.querySelectorAll(".token, .tokbg").forEach(t => t.classList.remove("active"));
    if (!hv) return;
    const other = side === "q" ? "k" : "q";
    document.getElementById(`tok-${hv}`).classList.add("active");
    document.getElementById(`bg-${hv}`).classList.add("active");
    for (const e of edges.children) {
      if (e.dataset[side] === i) document.getElementById(`tok-${other}${e.dataset[other]}`).classList.add("active");
    }
  }
  function fromHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    if (p.has("layer")) state.layer = Math.min(L - 1, Math.max(0, +p.get("layer") || 0));
    select.value = state.layer;
    if (p.has("heads")) {
      const hs = p.get("heads").split(",").filter(s => s !== "").map(Number).filter(h => h >= 0 && h < H);
      setHeads(hs);
    } else {
      draw();
    }
    state.hover = /^[qk]\d+$/.test(p.get("hover") || "") && +p.get("hover").slice(1) < T ? p.get("hover") : null;
    applyHover();
  }
  window.addEventListener("hashchange", fromHash);
  fromHash();
  window.attentionView = { weight, tokens: D.tokens, shape: [L, H, T, T], state, draw };
  document.body.dataset.ready = "1";
})();
</script>
</body>
</html>
"""
