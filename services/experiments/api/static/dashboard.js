/* The dashboard: the experiment list, and one experiment's results drawn as SVG
   from GET /v1/experiments/{id}/results (every figure comes from the service;
   the page only computes the Beta densities to draw them). */
(function (g) {
  "use strict";
  const pct = v => v == null ? "–" : (100 * v).toFixed(2) + "%";
  const num = (v, d = 3) => v == null ? "–" : (+v).toPrecision(d);
  const day = ms => ms == null ? "–" : new Date(ms).toISOString().slice(0, 16).replace("T", " ");
  const text = s => document.createTextNode(s == null ? "" : String(s));

  function cell(row, content) {
    const td = document.createElement("td");
    if (content instanceof Node) td.appendChild(content); else td.appendChild(text(content));
    row.appendChild(td);
    return td;
  }
  function badge(status) {
    const s = document.createElement("span");
    s.className = "status status-" + status;
    s.textContent = status;
    return s;
  }
  async function getJSON(url) {
    const r = await fetch(url, { headers: { Accept: "application/json" } });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  }
  function fail(e) { document.getElementById("error").textContent = "error: " + e.message; }

  async function listPage() {
    const sel = document.getElementById("filter");
    const params = new URLSearchParams(location.search);
    sel.value = params.get("status") || "";
    sel.onchange = () => { location.search = sel.value ? "status=" + sel.value : ""; };
    try {
      const q = sel.value ? "?status=" + encodeURIComponent(sel.value) : "";
      const { experiments } = await getJSON("/v1/experiments" + q);
      const tbody = document.querySelector("#experiments tbody");
      for (const e of experiments) {
        const tr = document.createElement("tr");
        tr.dataset.experiment = e.id;
        tr.dataset.status = e.status;
        const a = document.createElement("a");
        a.href = "/experiments/" + encodeURIComponent(e.id);
        a.textContent = e.id;
        cell(tr, a); cell(tr, e.name); cell(tr, badge(e.status)); cell(tr, e.kind); cell(tr, e.surface);
        cell(tr, e.arms.map(x => x.name + " (" + x.weight + ")").join(", ")); cell(tr, e.owner);
        cell(tr, day(e.start)); cell(tr, day(e.ended != null ? e.ended : e.planned_end));
        tbody.appendChild(tr);
      }
      if (!experiments.length) document.getElementById("error").textContent = "no experiments yet";
      document.body.dataset.loaded = "true";
    } catch (e) { fail(e); }
  }

  function densityPlot(r) {
    const C = plots.COLORS;
    let lo = 1, hi = 0;
    for (const a of r.arms) {
      const [l, h] = plots.betaRange(a.posterior.alpha, a.posterior.beta);
      lo = Math.min(lo, l); hi = Math.max(hi, h);
    }
    const N = 200, series = r.arms.map((a, i) => {
      const pts = [];
      for (let k = 0; k <= N; k++) {
        const x = lo + (hi - lo) * k / N;
        pts.push([x, plots.betaPdf(x, a.posterior.alpha, a.posterior.beta)]);
      }
      return { name: a.name, arm: a.name, color: C[i % C.length], points: pts, noMarkers: true };
    });
    plots.chart(document.getElementById("plot-density"), { id: "density", series, legend: true });
  }

  // One reference line per distinct planned share (50:50 is one line, not two).
  function plannedShares(r) {
    const total = r.arms.reduce((s, x) => s + x.weight, 0), byShare = new Map();
    for (const a of r.arms) {
      const y = +(a.weight / total).toFixed(6);
      byShare.set(y, (byShare.has(y) ? byShare.get(y) + ", " : "planned ") + a.name);
    }
    return [...byShare].map(([y, label]) => ({ y, label }));
  }

  function historyPlots(r) {
    const C = plots.COLORS, h = r.history;
    const labels = h.map((d, i) => [i, d.day.slice(5)]);
    if (!h.length) {
      for (const id of ["share", "regret", "pvalue", "interval", "rates"])
        document.getElementById("plot-" + id).textContent = "no daily history in the snapshot yet";
      return;
    }
    plots.chart(document.getElementById("plot-share"), {
      id: "share", xLabels: labels, yDomain: [0, 1], legend: true,
      series: r.arms.map((a, i) => ({ name: a.name, arm: a.name, color: C[i % C.length],
        points: h.map((d, k) => [k, d.arms[i].share == null ? NaN : d.arms[i].share]) })),
      refs: r.kind === "ab" ? plannedShares(r) : [] });
    plots.chart(document.getElementById("plot-regret"), {
      id: "regret", xLabels: labels,
      series: [{ name: "regret", arm: "", color: C[4], points: h.map((d, k) => [k, d.regret]) }] });
    const comps = r.comparisons.map(c => c.treatment);
    const minP = Math.min(1e-3, ...h.flatMap(d => d.comparisons.map(c => c.p_value_two_sided)).filter(p => p > 0));
    plots.chart(document.getElementById("plot-pvalue"), {
      id: "pvalue", xLabels: labels, logY: true, yDomain: [Math.pow(10, Math.floor(Math.log10(minP))), 1],
      refs: [{ y: r.alpha, label: "alpha " + r.alpha }].concat(
        h[0].srm_p_value != null ? [{ y: 0.01, label: "SRM warn" }] : []),
      series: comps.map((t, j) => ({ name: "p " + t + " vs " + r.arms[0].name, arm: t,
        color: C[(j + 1) % C.length], points: h.map((d, k) => [k, d.comparisons[j].p_value_two_sided]) }))
        .concat(h[0].srm_p_value != null ? [{ name: "SRM p", arm: "", color: "#999",
          points: h.map((d, k) => [k, d.srm_p_value]) }] : []) });
    plots.chart(document.getElementById("plot-interval"), {
      id: "interval", xLabels: labels, refs: [{ y: 0, label: "no difference" }],
      bands: comps.map((t, j) => ({ arm: t, color: C[(j + 1) % C.length],
        lower: h.map((d, k) => [k, d.comparisons[j].ci_difference[0]]),
        upper: h.map((d, k) => [k, d.comparisons[j].ci_difference[1]]) })),
      series: comps.map((t, j) => ({ name: t + " − " + r.arms[0].name, arm: t, color: C[(j + 1) % C.length],
        points: h.map((d, k) => [k, d.comparisons[j].difference]) })), legend: true });
    plots.chart(document.getElementById("plot-rates"), {
      id: "rates", xLabels: labels, legend: true,
      bands: r.arms.map((a, i) => ({ arm: a.name, color: C[i % C.length],
        lower: h.map((d, k) => [k, d.arms[i].ci[0]]), upper: h.map((d, k) => [k, d.arms[i].ci[1]]) })),
      series: r.arms.map((a, i) => ({ name: a.name, arm: a.name, color: C[i % C.length],
        points: h.map((d, k) => [k, d.arms[i].rate]) })) });
  }

  function tables(r) {
    const arms = document.querySelector("#arms tbody");
    r.arms.forEach((a, i) => {
      const tr = document.createElement("tr");
      tr.dataset.arm = a.name;
      cell(tr, a.name); cell(tr, a.weight); cell(tr, a.exposures.toLocaleString("en"));
      cell(tr, a.clicks.toLocaleString("en")); cell(tr, pct(a.rate));
      cell(tr, "[" + pct(a.ci[0]) + ", " + pct(a.ci[1]) + "]");
      cell(tr, "Beta(" + num(a.posterior.alpha, 6) + ", " + num(a.posterior.beta, 6) + ")");
      cell(tr, "[" + pct(a.credible[0]) + ", " + pct(a.credible[1]) + "]");
      cell(tr, r.bandit.prob_best[i] == null ? "–" : r.bandit.prob_best[i].toFixed(4));
      arms.appendChild(tr);
    });
    const comps = document.querySelector("#comparisons tbody");
    for (const c of r.comparisons) {
      const tr = document.createElement("tr");
      cell(tr, c.treatment); cell(tr, pct(c.difference));
      cell(tr, "[" + pct(c.ci_difference[0]) + ", " + pct(c.ci_difference[1]) + "]");
      cell(tr, num(c.z)); cell(tr, num(c.p_value_two_sided)); cell(tr, num(c.p_value_one_sided));
      cell(tr, num(c.prob_b_beats_a, 4)); cell(tr, num(c.expected_loss_a) + " / " + num(c.expected_loss_b));
      cell(tr, c.sample_size_per_arm == null ? "–" : c.sample_size_per_arm.toLocaleString("en"));
      cell(tr, (c.stop ? "stop: choose " + c.winner : "continue") + " (" + c.decision + ")");
      comps.appendChild(tr);
    }
    const b = r.bandit;
    document.getElementById("bandit").textContent = "Bandit: value remaining " + pct(b.value_remaining)
      + " (95th percentile; stops below " + pct(b.threshold) + ") → " + (b.stop ? "stop" : "continue")
      + "; P(best) " + (b.source === "snapshot" ? "from the posterior snapshot" : "computed from the posteriors")
      + (r.snapshot.present ? "; snapshot version " + r.snapshot.version : "; no posterior snapshot yet");
  }

  function srmBanner(r) {
    const s = r.srm, box = document.getElementById("srm");
    if (!s.checked || !s.warning) return;
    const div = document.createElement("div");
    div.id = "srm-banner";
    div.className = "banner srm-warning" + (s.level === "alert" ? " srm-alert" : "");
    div.dataset.level = s.level;
    div.textContent = "Sample ratio mismatch (" + s.level + "): exposures per arm do not fit the planned "
      + "weights " + s.planned_weights.join(":") + " (chi-square p = " + num(s.p_value) + " < 0.01). "
      + "Allocation or logging is broken; do not trust these results until it is fixed.";
    box.appendChild(div);
  }

  async function experimentPage() {
    const id = decodeURIComponent(location.pathname.split("/").pop());
    try {
      const r = await getJSON("/v1/experiments/" + encodeURIComponent(id) + "/results");
      const e = r.experiment_record;
      document.title = e.id + " · clickloop";
      const t = document.getElementById("title");
      t.textContent = e.name + " ";
      t.appendChild(badge(e.status));
      document.getElementById("meta").textContent = e.id + " · " + e.kind + " on " + e.surface
        + " · unit " + e.unit + " · owner " + e.owner + " · started " + day(e.start)
        + (e.ended != null ? " · stopped " + day(e.ended) : " · planned end " + day(e.planned_end))
        + " · " + e.hypothesis;
      srmBanner(r); tables(r); densityPlot(r); historyPlots(r);
      document.body.dataset.loaded = "true";
    } catch (err) { fail(err); }
  }

  g.clickloop = { listPage, experimentPage };
})(window);
