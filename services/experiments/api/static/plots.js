/* clickloop's small SVG plotting: line charts with bands, markers and reference
   lines, and the Beta density. No dependencies (the dashboard loads nothing from
   outside the service). Every series path carries data-arm / data-series so a
   test (or a person) can find which line is which. */
(function (g) {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#2458b3", "#d9622b", "#2a9d5c", "#8e44ad", "#c0392b", "#16a2b8", "#7f8c8d", "#b8860b"];
  const W = 440, H = 230, M = { l: 48, r: 24, t: 10, b: 28 };

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }

  // log Γ(x), Lanczos (g = 7, n = 9): ~15 digits for x > 0.
  const LC = [0.99999999999980993, 676.5203681218851, -1259.1392167224028, 771.32342877765313,
    -176.61502916214059, 12.507343278686905, -0.13857109526572012, 9.9843695780195716e-6,
    1.5056327351493116e-7];
  function lgamma(x) {
    if (x < 0.5) return Math.log(Math.PI / Math.abs(Math.sin(Math.PI * x))) - lgamma(1 - x);
    x -= 1;
    let a = LC[0];
    const t = x + 7.5;
    for (let i = 1; i < 9; i++) a += LC[i] / (x + i);
    return 0.5 * Math.log(2 * Math.PI) + (x + 0.5) * Math.log(t) - t + Math.log(a);
  }
  function betaPdf(x, a, b) {
    if (x <= 0 || x >= 1) return 0;
    return Math.exp((a - 1) * Math.log(x) + (b - 1) * Math.log1p(-x) + lgamma(a + b) - lgamma(a) - lgamma(b));
  }
  // Where a Beta(a, b) has its mass: mean ± 6 sd, inside [0, 1].
  function betaRange(a, b) {
    const m = a / (a + b), sd = Math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)));
    return [Math.max(0, m - 6 * sd), Math.min(1, m + 6 * sd)];
  }

  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) return [lo];
    const step0 = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const step = [1, 2, 2.5, 5, 10].map(s => s * mag).find(s => s >= step0) || step0;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  function fmt(v) {
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e4 || a < 1e-3) return v.toExponential(0);
    return +v.toPrecision(3) + "";
  }

  /* chart(container, {series, bands, refs, xDomain, yDomain, xLabels, logY, yLabel})
     series: [{name, points: [[x, y], ...], color, arm}]   bands: [{lower, upper, color, arm}]
     refs: [{y, label}]   xLabels: [[x, text], ...] (else numeric ticks). */
  function chart(container, o) {
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img",
      "data-plot": o.id || "" });
    const pts = [].concat(...(o.series || []).map(s => s.points),
      ...(o.bands || []).map(b => b.lower.concat(b.upper)));
    const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]).filter(v => isFinite(v));
    let [x0, x1] = o.xDomain || [Math.min(...xs), Math.max(...xs)];
    if (!(x1 > x0)) { x0 -= 0.5; x1 += 0.5; }
    let [y0, y1] = o.yDomain || [Math.min(0, ...ys), Math.max(...ys, 1e-12)];
    if (!(y1 > y0)) { y1 = y0 + 1; }
    const tf = o.logY ? (v => Math.log10(Math.max(v, 1e-300))) : (v => v);
    const ty0 = tf(y0), ty1 = tf(y1);
    const X = v => M.l + (v - x0) / (x1 - x0) * (W - M.l - M.r);
    const Y = v => H - M.b - (Math.min(Math.max(tf(v), ty0), ty1) - ty0) / (ty1 - ty0) * (H - M.t - M.b);
    const yt = o.logY ? niceTicks(ty0, ty1, 5).filter(Number.isInteger).map(e => Math.pow(10, e))
      : niceTicks(y0, y1, 5);
    for (const v of yt) {
      el("line", { x1: M.l, x2: W - M.r, y1: Y(v), y2: Y(v), class: "grid-line" }, svg);
      el("text", { x: M.l - 4, y: Y(v) + 3, "text-anchor": "end" }, svg).textContent = fmt(v);
    }
    const xl = o.xLabels || niceTicks(x0, x1, 6).map(v => [v, fmt(v)]);
    const every = Math.max(1, Math.ceil(xl.length / 7));
    xl.forEach(([v, t], i) => {
      if (i % every) return;
      el("text", { x: X(v), y: H - M.b + 14, "text-anchor": "middle" }, svg).textContent = t;
    });
    el("line", { x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b, class: "axis" }, svg);
    el("line", { x1: M.l, x2: M.l, y1: M.t, y2: H - M.b, class: "axis" }, svg);
    for (const b of o.bands || []) {
      const d = b.upper.map((p, i) => (i ? "L" : "M") + X(p[0]).toFixed(2) + " " + Y(p[1]).toFixed(2)).join(" ")
        + " " + b.lower.slice().reverse().map(p => "L" + X(p[0]).toFixed(2) + " " + Y(p[1]).toFixed(2)).join(" ") + " Z";
      el("path", { d, class: "band", fill: b.color, "data-arm": b.arm || "", "data-series": "band" }, svg);
    }
    for (const r of o.refs || []) {
      el("line", { x1: M.l, x2: W - M.r, y1: Y(r.y), y2: Y(r.y), class: "ref" }, svg);
      el("text", { x: W - M.r - 2, y: Y(r.y) - 3, "text-anchor": "end" }, svg).textContent = r.label;
    }
    for (const s of o.series || []) {
      const good = s.points.filter(p => isFinite(p[1]));
      const d = good.map((p, i) => (i ? "L" : "M") + X(p[0]).toFixed(2) + " " + Y(p[1]).toFixed(2)).join(" ");
      el("path", { d, class: "series", stroke: s.color, "data-arm": s.arm || "", "data-series": s.name }, svg);
      if (good.length <= 40 && !s.noMarkers)
        for (const p of good) el("circle", { cx: X(p[0]), cy: Y(p[1]), r: 2.5, fill: s.color }, svg);
    }
    container.appendChild(svg);
    if ((o.series || []).length > 1 || o.legend) {
      const lg = document.createElement("div");
      lg.className = "legend";
      for (const s of o.series) {
        const sp = document.createElement("span");
        sp.innerHTML = `<i style="background:${s.color}"></i>`;
        sp.appendChild(document.createTextNode(s.name));
        lg.appendChild(sp);
      }
      container.appendChild(lg);
    }
    return svg;
  }

  g.plots = { chart, betaPdf, betaRange, lgamma, COLORS };
})(window);
