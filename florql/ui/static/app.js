// florql ui: the runs page, a run's page, run comparison and the query box.
// Every value from the store reaches the page through textContent, never as HTML.
"use strict";

const LOGGED = ["#1f6fb4", "#2a9d4b", "#7b4fb0", "#17908f", "#555555"];
const REPLAYED = ["#e0701a", "#c7402d", "#b8860b", "#d94f9b"];
window.florqlCharts = {}; // chart id -> uPlot instance (tests read their data)

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const payload = await response.json();
  if (!response.ok) {
    const error = new Error(payload.error || response.statusText);
    error.sqlstate = payload.sqlstate;
    throw error;
  }
  return payload;
}

function showError(target, error) {
  target.textContent = error.sqlstate ? `${error.message}  (SQLSTATE ${error.sqlstate})` : error.message;
}

function fmt(value) {
  if (value === null || value === undefined) return "NULL";
  if (typeof value === "number" && !Number.isInteger(value)) return value.toPrecision(6).replace(/\.?0+$/, "");
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function table(columns, rows) {
  const head = el("tr", {}, ...columns.map((c) => el("th", {}, c)));
  const body = rows.map((row) => el("tr", {}, ...row.map((v) => el("td", { class: typeof v === "number" ? "num" : "" }, fmt(v)))));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...body));
}

// ---- charts ------------------------------------------------------------------------------------
function drawChart(parent, chart, id) {
  const box = el("div", { class: "chart", id: `chart-${id}`, "data-chart": id });
  box.append(el("div", { class: "title" }, chart.title));
  parent.append(box);
  let logged = 0, replayed = 0;
  const series = [{
    label: chart.x_label,
    value: (u, v) => (v === null ? "" : chart.x_labels ? chart.x_labels[v] : fmt(v)),
  }];
  for (const s of chart.series) {
    const colour = s.replayed ? REPLAYED[replayed++ % REPLAYED.length] : LOGGED[logged++ % LOGGED.length];
    series.push({
      label: s.replayed ? `${s.label} (replayed)` : s.label,
      stroke: colour,
      width: 1.5,
      dash: s.replayed ? [6, 3] : undefined,
      spanGaps: true,
      points: { show: chart.x.length <= 200, size: 5, fill: colour },
      value: (u, v) => (v === null ? "–" : fmt(v)),
    });
  }
  const opts = {
    width: Math.max(360, Math.min(parent.clientWidth - 20, 640)),
    height: 260,
    series,
    scales: { x: { time: false } },
    axes: [
      { label: chart.x_label, values: chart.x_labels ? (u, ticks) => ticks.map((t) => chart.x_labels[t] ?? "") : undefined },
      {},
    ],
  };
  const plot = new uPlot(opts, [chart.x, ...chart.series.map((s) => s.values)], box);
  for (const note of chart.notes || []) box.append(el("div", { class: "note" }, note));
  if (window.florqlCharts[id]) window.florqlCharts[id].destroy();
  window.florqlCharts[id] = plot;
  return box;
}

// ---- the query box -----------------------------------------------------------------------------
function queryBox(parent, initialSql) {
  const sql = el("textarea", { id: "sql", spellcheck: "false" });
  sql.value = initialSql;
  const plan = el("div", { id: "plan" });
  const progress = el("div", { id: "progress", class: "progress" });
  const error = el("div", { id: "query-error", class: "error", role: "alert" });
  const answer = el("div", { id: "answer" });
  const runButton = el("button", { id: "run", onclick: () => ask(false) }, "Run");
  const explainButton = el("button", { id: "explain", onclick: () => ask(true) }, "Explain");
  parent.append(
    el("h2", {}, "Ask in SQL"),
    el("div", { class: "muted" }, "Values never logged are replayed from checkpoints; the plan and its estimate show before a replay runs."),
    sql, el("div", {}, runButton, explainButton), error, plan, progress, answer,
  );

  async function ask(explainOnly) {
    error.textContent = ""; plan.replaceChildren(); progress.textContent = ""; answer.replaceChildren();
    let explained;
    try {
      explained = await api("/api/explain", { sql: sql.value });
    } catch (e) { showError(error, e); return; }
    if (explained.jobs === 0 && !explainOnly) { run(); return; }
    plan.append(el("pre", { id: "plan-text" }, explained.plan));
    if (explained.jobs > 0) {
      const over = explained.budget_s !== null && explained.est_s > explained.budget_s;
      plan.append(el("div", {},
        `This query replays ${explained.jobs} job(s), about ${explained.est_s} s (retraining: ${explained.retrain_s} s).`,
        over ? ` That is over this server's replay budget of ${explained.budget_s} s.` : ""));
      if (!over) plan.append(el("button", { id: "confirm-replay", onclick: run }, `Replay and answer (~${explained.est_s} s)`));
    }
  }

  async function run() {
    error.textContent = ""; answer.replaceChildren();
    const confirm = document.getElementById("confirm-replay");
    if (confirm) confirm.disabled = true;
    let task;
    try {
      task = await api("/api/query", { sql: sql.value });
      while (task.state === "running") {
        progress.textContent = task.jobs_total
          ? `replaying: ${task.jobs_done}/${task.jobs_total} job(s) done, ${task.seconds} s`
          : `answering… ${task.seconds} s`;
        await new Promise((resolve) => setTimeout(resolve, 300));
        task = await api(`/api/tasks/${task.id}`);
      }
    } catch (e) { showError(error, e); return; }
    progress.textContent = task.jobs_total ? `replayed ${task.jobs_total} job(s) in ${task.seconds} s` : `answered in ${task.seconds} s`;
    if (task.state === "error") { showError(error, { message: task.error.error, sqlstate: task.error.sqlstate }); return; }
    const a = task.answer;
    if (a.chart) drawChart(answer, a.chart, "answer");
    if (a.replayed) answer.append(el("details", {}, el("summary", {}, "what was replayed"), el("pre", {}, a.replayed)));
    for (const w of a.warnings) answer.append(el("div", { class: "muted" }, `warning: ${w}`));
    answer.append(table(a.columns, a.rows), el("div", { class: "muted", id: "row-count" },
      a.row_count > a.rows.length ? `${a.rows.length} of ${a.row_count} rows` : `${a.row_count} row(s)`));
  }

  return { sql, ask };
}

// ---- the runs page -----------------------------------------------------------------------------
async function runsPage(content) {
  const { runs } = await api("/api/runs");
  document.getElementById("crumb").textContent = `${runs.length} run(s)`;
  const checks = new Map();
  const rows = runs.map((r) => {
    const box = el("input", { type: "checkbox", class: "compare", value: r.run_id, onchange: refreshNames });
    checks.set(r.run_id, box);
    return el("tr", { "data-run": r.run_id },
      el("td", {}, box),
      el("td", {}, el("a", { href: `/runs/${r.run_id}` }, `run ${r.run_id}`)),
      el("td", {}, r.script), el("td", {}, r.status), el("td", {}, fmt(r.started_at)),
      el("td", { class: "num" }, r.duration_s === null ? "" : `${r.duration_s.toFixed(1)} s`),
      el("td", { class: "num" }, `${r.outer_completed ?? ""}/${r.outer_planned ?? "?"}`),
      el("td", {}, Object.entries(r.args).map(([k, v]) => `${k}=${v}`).join(" ")),
      el("td", { class: "num" }, r.checkpoints_taken ?? ""),
      el("td", { class: "num" }, r.checkpoint_overhead === null ? "" : `${(100 * r.checkpoint_overhead).toFixed(2)} %`));
  });
  const head = ["compare", "run", "script", "status", "started", "duration", "iterations", "args", "checkpoints", "checkpoint overhead"];
  content.append(el("h2", {}, "Runs"), el("table", { id: "runs" },
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))), el("tbody", {}, ...rows)));

  const name = el("select", { id: "compare-name" });
  const out = el("div", { class: "charts", id: "compare-chart" });
  const error = el("div", { class: "error", id: "compare-error" });
  content.append(el("h2", {}, "Compare runs"),
    el("div", {}, "Tick runs above, pick a name: ", name,
      el("button", { id: "compare", onclick: compare }, "Compare")), error, out);

  function refreshNames() {
    const picked = runs.filter((r) => checks.get(r.run_id).checked);
    const names = [...new Set(picked.flatMap((r) => r.names))].sort();
    name.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
  }
  async function compare() {
    error.textContent = ""; out.replaceChildren();
    const ids = runs.filter((r) => checks.get(r.run_id).checked).map((r) => r.run_id);
    try {
      const { chart } = await api(`/api/compare?runs=${ids.join(",")}&name=${encodeURIComponent(name.value)}`);
      drawChart(out, chart, "compare");
    } catch (e) { showError(error, e); }
  }
  const first = runs.length ? runs[runs.length - 1].run_id : 1;
  queryBox(content, `SELECT * FROM run_${first} LIMIT 100`);
}

// ---- a run's page ------------------------------------------------------------------------------
async function runPage(content, runId) {
  document.getElementById("crumb").textContent = `run ${runId}`;
  const detail = await api(`/api/runs/${runId}`);
  const r = detail.run;
  const charts = el("div", { class: "charts", id: "charts" });
  content.append(
    el("h2", {}, `Run ${runId}: ${r.script_rel} — ${r.status}`),
    el("div", { class: "muted" }, `started ${fmt(r.started_at)}, ${r.duration_s === null ? "?" : r.duration_s.toFixed(1)} s, `
      + `${r.outer_completed ?? "?"}/${r.outer_planned ?? "?"} ${r.outer_loop || "iterations"}, on ${r.device || "?"} (torch ${r.torch || "?"})`),
    el("h2", {}, "Charts"),
    el("div", { class: "muted" }, "Solid: logged by the run. Dashed: replayed in hindsight. Hover for values."),
    charts);
  const drawAll = (d) => {
    charts.replaceChildren();
    d.charts.forEach((c) => drawChart(charts, c, c.title));
  };
  drawAll(detail);

  const box = el("div", { id: "query" });
  const loggable = detail.names.filter((n) => n.kind === "loggable");
  content.append(el("h2", {}, "Names"), el("div", { id: "names" }, ...detail.names.map((n) => el("div", {},
    el("span", { class: `tag ${n.kind}` }, n.kind), n.name, el("span", { class: "muted" }, `  per ${n.loop_path.join(" / ") || "run"}`),
    n.kind === "loggable" ? el("button", { class: "hindsight", "data-name": n.name, onclick: () => hindsight(n) }, "chart it in hindsight") : null))));
  if (!loggable.length) content.append(el("div", { class: "muted" }, "No loggable-but-unlogged names: add florql.log(\"name\", value) to the script, then ask for it here."));

  content.append(el("h2", {}, "Args"), table(["name", "value"], Object.entries(detail.args)));
  content.append(el("h2", {}, "Checkpoints"), table(["outer index", "kind", "name", "bytes", "stall ms", "persist ms"],
    detail.checkpoints.map((c) => [c.outer_index, c.kind, c.name, c.bytes, c.stall_ms, c.persist_ms])));
  const code = detail.code;
  content.append(el("h2", {}, `Code version ${code.version || "?"}`),
    el("details", {}, el("summary", {}, `recorded ${code.script}`), el("pre", { id: "recorded" }, code.recorded)),
    el("details", { open: "" }, el("summary", {}, "changes since (recorded → current)"),
      el("pre", { id: "diff" }, code.diff === null ? "the script is not at its recorded path any more" : code.diff || "no changes")));
  content.append(box);
  const query = queryBox(box, `SELECT * FROM run_${runId} LIMIT 100`);

  function hindsight(n) {
    const loops = n.loop_path.map((l) => `"${l}"`).join(", ");
    query.sql.value = `SELECT ${loops}, "${n.name}" FROM run_${runId} ORDER BY ${loops}`;
    query.sql.scrollIntoView();
    query.ask(false);
  }
  if (r.status === "running") { // live: new records land at least every second
    const timer = setInterval(async () => {
      try {
        const fresh = await api(`/api/runs/${runId}`);
        drawAll(fresh);
        if (fresh.run.status !== "running") clearInterval(timer);
      } catch (e) { clearInterval(timer); }
    }, 2000);
  }
}

async function main() {
  const page = document.body.dataset.page;
  const content = document.getElementById("content");
  try {
    if (page === "runs") await runsPage(content);
    else if (page === "run") await runPage(content, document.body.dataset.run);
  } catch (e) {
    showError(document.getElementById("message"), e);
  }
  document.body.dataset.ready = "1";
}

main();
