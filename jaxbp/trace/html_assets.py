"""The inline CSS and JavaScript of :mod:`jaxbp.trace.html`'s pages.

Kept as Python strings so a page is one file with nothing to fetch. The script reads the
page's own ``<script id="page-data">`` JSON; every number it shows was written by Python (the
trace's own formatting), so the page never formats a number differently from the text.
"""

from __future__ import annotations

__all__ = ["PAGE_STYLE", "PAGE_SCRIPT"]

PAGE_STYLE = """
:root { --fg: #1b1f24; --bg: #fff; --muted: #57606a; --line: #8c959f; --focus: #b35900;
  --touch: #0b5cad; --ok: #116329; --bad: #a40e26; --panel: #f6f8fa; }
* { box-sizing: border-box; }
body { font: 16px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
  background: var(--bg); margin: 0 auto; max-width: 1200px; padding: 0 12px 24px; }
h1 { font-size: 1.5rem; margin: 16px 0 4px; }
h2 { font-size: 1.15rem; margin: 18px 0 6px; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.9rem; }
pre { background: var(--panel); padding: 8px; overflow-x: auto; white-space: pre-wrap;
  word-break: break-word; }
.summary { background: var(--panel); padding: 6px 10px; border-left: 4px solid var(--line); }
.stage { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { flex: 3 1 520px; margin: 0; min-width: 0; }
#explain { flex: 2 1 320px; min-width: 0; }
#picture { width: 100%; height: auto; border: 1px solid #d0d7de; border-radius: 6px; }
figcaption { font-size: 0.85rem; color: var(--muted); }
.key { padding: 0 4px; }
.focus-key { border: 3px solid var(--focus); }
.touch-key { border: 2px dashed var(--touch); }
.node rect, .node circle { fill: #fff; stroke: var(--line); stroke-width: 1.5; }
.node text, .edge text, .caption { font: 13px ui-monospace, "DejaVu Sans Mono", monospace;
  text-anchor: middle; fill: var(--fg); }
.node .name { font-weight: bold; }
.val.in { fill: var(--muted); font-size: 11px; text-anchor: middle; }
.caption { fill: var(--muted); font-size: 12px; }
.caption.start { text-anchor: start; }
.edge line { stroke: var(--line); stroke-width: 1.4; }
.edge .wlabel { font-size: 11px; paint-order: stroke; stroke: #fff; stroke-width: 3px; }
.edge.back line { stroke: var(--touch); stroke-dasharray: 5 3; }
.node.masked rect { fill: #eee; stroke-dasharray: 3 3; }
.node.jac rect { fill: none; stroke: none; }
/* the highlight: colour, and also a thicker or dashed outline (colour is not the only sign) */
.node.touch rect, .node.touch circle { stroke: var(--touch); stroke-width: 3;
  stroke-dasharray: 6 3; fill: #eef5fd; }
.edge.touch line { stroke: var(--touch); stroke-width: 3; stroke-dasharray: 6 3; }
.node.focus rect, .node.focus circle { stroke: var(--focus); stroke-width: 5;
  stroke-dasharray: none; fill: #fff4e5; }
.node.jac.focus rect { fill: none; stroke: var(--focus); stroke-width: 4; }
.edge.focus line { stroke: var(--focus); stroke-width: 5; stroke-dasharray: none; }
.edge.focus .wlabel { font-weight: bold; }
.controls { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; }
button { font: inherit; padding: 6px 10px; min-width: 44px; min-height: 40px;
  border: 1px solid var(--line); border-radius: 6px; background: var(--panel); cursor: pointer; }
button:focus-visible, input:focus-visible { outline: 3px solid var(--focus); outline-offset: 2px; }
button:disabled { opacity: 0.45; cursor: default; }
#slider { flex: 1 1 120px; }
#counter { color: var(--muted); }
#step-line { font-size: 0.95rem; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left;
  font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.88rem; }
.scroll { overflow-x: auto; }
.ok { color: var(--ok); }
.bad { color: var(--bad); font-weight: bold; }
tr.bad td, tr.bad th { background: #fff0f0; }
.verdict { border: 2px solid currentColor; padding: 4px 8px; border-radius: 6px; margin: 6px 0;
  display: inline-block; }
#curve { width: 100%; max-width: 420px; height: auto; }
#curve .curve { fill: none; stroke: var(--touch); stroke-width: 2; }
#curve-dot { fill: var(--focus); }
.visually-hidden { position: absolute; width: 1px; height: 1px; overflow: hidden;
  clip: rect(0 0 0 0); white-space: nowrap; }
@media (max-width: 600px) { body { font-size: 15px; } figure, #explain { flex-basis: 100%; } }
"""

PAGE_SCRIPT = r"""
(function () {
  "use strict";
  var page = JSON.parse(document.getElementById("page-data").textContent);
  var steps = page.steps;
  var current = 0;
  var byNode = {};
  document.querySelectorAll("[data-node]").forEach(function (element) {
    element.getAttribute("data-node").split(" ").forEach(function (name) {
      if (name) { (byNode[name] = byNode[name] || []).push(element); }
    });
  });
  function $(id) { return document.getElementById(id); }
  function make(tag, text, className) {
    var element = document.createElement(tag);
    if (text !== undefined && text !== null) { element.textContent = text; }
    if (className) { element.className = className; }
    return element;
  }
  function clear(element) {
    while (element.firstChild) { element.removeChild(element.firstChild); }
  }
  function mark(names, className) {
    names.forEach(function (name) {
      (byNode[name] || []).forEach(function (element) { element.classList.add(className); });
    });
  }
  function row(table, cells, header) {
    var tr = make("tr");
    cells.forEach(function (cell, index) {
      var td = make(index === 0 && header ? "th" : "td", cell);
      if (index === 0 && header) { td.setAttribute("scope", "row"); }
      tr.appendChild(td);
    });
    table.appendChild(tr);
  }
  function factors(step) {
    var box = $("step-factors");
    clear(box);
    if (!step.factors) { return; }
    box.appendChild(make("p", step.lhs + " = the product of its chain-rule factors:"));
    var table = make("table");
    table.id = "factor-table";
    step.factors.forEach(function (f) { row(table, [f.symbol, f.text], true); });
    row(table, [step.lhs + " (product)", step.product], true);
    box.appendChild(table);
  }
  function check(step) {
    var box = $("step-check");
    clear(box);
    if (!step.check) { return; }
    var c = step.check;
    var table = make("table");
    table.id = "check-table";
    row(table, ["manual (chain rule)", c.manual_text], true);
    row(table, ["jax.grad", c.autodiff_text], true);
    row(table, ["|manual - jax.grad|", c.diff_text], true);
    box.appendChild(table);
    var verdict = make("p", c.agree ? "\u2713 agree" : "\u2717 DISAGREE",
                       "verdict " + (c.agree ? "ok" : "bad"));
    verdict.id = "verdict";
    box.appendChild(verdict);
  }
  function update(step) {
    var box = $("step-update");
    clear(box);
    if (!step.update) { return; }
    var u = step.update;
    var p = make("p");
    p.id = "update-loss";
    p.appendChild(document.createTextNode("loss before the update "));
    p.appendChild(make("strong", u.before_text, "loss-before"));
    p.appendChild(document.createTextNode(", after "));
    p.appendChild(make("strong", u.after_text, "loss-after"));
    var lower = u.loss_after < u.loss_before;
    p.appendChild(make("span", lower ? " (\u2193 lower)" : " (\u2191 not lower)",
                       lower ? "ok" : "bad"));
    box.appendChild(p);
  }
  function errata(step) {
    var box = $("step-erratum");
    clear(box);
    (step.errata || []).forEach(function (e) {
      box.appendChild(make("span", "Erratum: the tutorial printed " + e.quantity + " = " +
                           e.seed_text + "; the right value is " + e.correct_text + ". ", "bad"));
    });
  }
  function show(index) {
    current = Math.max(0, Math.min(steps.length - 1, index));
    var step = steps[current];
    document.querySelectorAll(".focus, .touch").forEach(function (element) {
      element.classList.remove("focus", "touch");
    });
    mark(step.touch, "touch");
    mark(step.focus, "focus");
    $("step-title").textContent = step.section;
    $("step-note").textContent = step.note;
    $("step-line").textContent = step.line;
    factors(step);
    check(step);
    update(step);
    errata(step);
    $("counter").textContent = "step " + (current + 1) + " of " + steps.length;
    $("slider").value = String(current);
    $("first").disabled = $("prev").disabled = current === 0;
    $("last").disabled = $("next").disabled = current === steps.length - 1;
    document.body.setAttribute("data-step", String(current));
  }
  $("first").addEventListener("click", function () { show(0); });
  $("prev").addEventListener("click", function () { show(current - 1); });
  $("next").addEventListener("click", function () { show(current + 1); });
  $("last").addEventListener("click", function () { show(steps.length - 1); });
  $("slider").addEventListener("input", function (event) { show(Number(event.target.value)); });
  document.addEventListener("keydown", function (event) {
    // a focused slider moves itself with the arrows (and reports it through "input")
    if (event.target.tagName === "INPUT" || event.altKey || event.ctrlKey || event.metaKey) {
      return;
    }
    var moves = { ArrowRight: current + 1, ArrowDown: current + 1, ArrowLeft: current - 1,
                  ArrowUp: current - 1, Home: 0, End: steps.length - 1 };
    if (event.key in moves) { event.preventDefault(); show(moves[event.key]); }
  });
  var training = page.training;
  if (training) {
    var slider = $("train-slider");
    var n = training.history.length - 1;
    var low = Math.min.apply(null, training.history);
    var high = Math.max.apply(null, training.history);
    var span = (high - low) || 1;
    var showTraining = function () {
      var s = Number(slider.value);
      $("train-out").textContent = (s === 0 ? "before training" : "after step " + s) +
        ": E_total = " + training.history_text[s];
      $("curve-dot").setAttribute("cx", String(10 + 380 * s / Math.max(n, 1)));
      $("curve-dot").setAttribute("cy", String(10 + 100 * (high - training.history[s]) / span));
    };
    slider.addEventListener("input", showTraining);
    showTraining();
  }
  show(0);
})();
"""
