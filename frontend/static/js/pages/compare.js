// Compare page: one chart panel per selected metric with every run overlaid, the controls and the
// zoom kept in the URL (url-state.js), the config diff, live refresh while a run is active.
//   <main data-page="compare">
//     <form id="compare-controls"> smooth (range + output), x (select), log (checkbox),
//       key checkboxes (name="key") </form>
//     <ul id="compare-runs"><li data-run-id data-run-name data-status>
//       … <span id="run-<id>-status" data-status>…</span> (swapped by htmx over SSE) </li></ul>
//     <div id="compare-charts"></div>
//     <script type="application/json" id="compare-configs">[{"id","name","config"}]</script>
//     <div id="config-diff"></div>
import { mountSeriesChart } from "../charts/series-chart.js";
import { diffConfigs } from "../lib/config-diff.js";
import { decodeCompareState, encodeCompareState } from "../lib/url-state.js";
import "./common.js";

export const POLL_MS = 3000;
const LIVE = new Set(["queued", "starting", "running"]);

const main = document.querySelector('main[data-page="compare"]');

function readRuns() {
  return [...document.querySelectorAll("#compare-runs li[data-run-id]")].map((li) => ({
    id: li.dataset.runId,
    name: li.dataset.runName || li.dataset.runId,
    li,
  }));
}

/**
 * A run's status now: its `#run-<id>-status` badge, which the SSE listener swaps out of band
 * (the li's own data-status is the page's first render and stays so), else the li's.
 */
function statusOf(run) {
  const badge = document.getElementById(`run-${run.id}-status`);
  return badge?.dataset.status || run.li.dataset.status;
}

// ---- config diff ------------------------------------------------------------------------

function readConfigs() {
  const script = document.getElementById("compare-configs");
  if (!script) return null;
  try {
    const parsed = JSON.parse(script.textContent || "[]");
    return Array.isArray(parsed) ? parsed : null;
  } catch {
    return null;
  }
}

/**
 * How a config value reads in a cell; `undefined` (the run has no such field) is "—". In a
 * section's row (config-diff.js) null means the run has no such section: "none".
 */
export function cellText(value, section = false) {
  if (value === undefined) return "—";
  if (value === null) return section ? "none" : "null";
  return String(value);
}

function renderConfigDiff() {
  const target = document.getElementById("config-diff");
  const configs = readConfigs();
  if (!target || !configs) return;
  const groups = diffConfigs(configs.map((c) => ({ name: c.name, config: c.config })));
  if (groups.length === 0) {
    const p = document.createElement("p");
    p.className = "config-diff-none";
    p.textContent = "The runs' configs are identical";
    target.replaceChildren(p);
    return;
  }
  const table = document.createElement("table");
  table.className = "config-diff";
  table.createCaption().textContent = "Config differences";
  const head = table.createTHead().insertRow();
  const th = (row, text, scope) => {
    const cell = document.createElement("th");
    cell.scope = scope;
    cell.textContent = text;
    row.append(cell);
    return cell;
  };
  th(head, "Field", "col");
  for (const c of configs) th(head, c.name ?? c.id, "col");
  for (const { group, rows } of groups) {
    const body = table.createTBody();
    body.className = "config-group";
    const title = th(body.insertRow(), group, "rowgroup");
    title.colSpan = configs.length + 1;
    title.className = "config-group-title";
    for (const { path, values, section } of rows) {
      const row = body.insertRow();
      th(row, path, "row");
      for (const v of values) {
        const td = row.insertCell();
        td.textContent = cellText(v, section);
        if (v === undefined || (section && v === null)) td.className = "absent";
      }
    }
  }
  target.replaceChildren(table);
}

// ---- controls ⇄ state ----------------------------------------------------------------------

function controls() {
  const form = document.getElementById("compare-controls");
  const el = (name) => form?.elements.namedItem(name) ?? null;
  return {
    form,
    smooth: el("smooth"),
    x: el("x"),
    log: el("log"),
    keyBoxes: () => [...(form?.querySelectorAll('input[type="checkbox"][name="key"]') ?? [])],
  };
}

function smoothOutput(ctl) {
  const input = ctl.smooth;
  if (!input) return null;
  return (
    (input.id && document.querySelector(`output[for~="${CSS.escape(input.id)}"]`)) ||
    ctl.form?.querySelector('output[name="smooth"], output') ||
    null
  );
}

/** URL state wins; what the URL does not say comes from the server-rendered controls. */
function initialState(ctl, runs) {
  const state = decodeCompareState(location.search);
  state.runs = runs.map((r) => r.id);
  const boxes = ctl.keyBoxes();
  if (state.keys.length > 0) {
    const known = new Set(boxes.map((b) => b.value));
    // keep keys the picker lacks only when there is no picker at all
    if (boxes.length > 0) state.keys = state.keys.filter((k) => known.has(k));
  } else {
    state.keys = boxes.filter((b) => b.checked).map((b) => b.value);
  }
  return state;
}

function applyToControls(ctl, state) {
  if (ctl.smooth) ctl.smooth.value = String(state.smooth);
  const out = smoothOutput(ctl);
  if (out) out.textContent = state.smooth.toFixed(2);
  if (ctl.x) ctl.x.value = state.x;
  if (ctl.log) ctl.log.checked = state.log;
  const chosen = new Set(state.keys);
  for (const box of ctl.keyBoxes()) box.checked = chosen.has(box.value);
}

function writeUrl(state) {
  const query = encodeCompareState(state);
  const url = `${location.pathname}${query ? `?${query}` : ""}${location.hash}`;
  if (url !== `${location.pathname}${location.search}${location.hash}`) {
    history.replaceState(history.state, "", url);
  }
}

// ---- charts ------------------------------------------------------------------------------

let panelCount = 0;

function makePanel(key, runs) {
  const id = `compare-chart-${++panelCount}`;
  const panel = document.createElement("section");
  panel.className = "chart-panel";
  panel.dataset.chart = "";
  panel.dataset.key = key;
  panel.dataset.runs = JSON.stringify(runs.map((r) => r.id));
  panel.dataset.keys = JSON.stringify([key]);
  panel.dataset.runNames = JSON.stringify(Object.fromEntries(runs.map((r) => [r.id, r.name])));
  panel.setAttribute("aria-labelledby", id);
  const title = document.createElement("h3");
  title.id = id;
  title.textContent = key;
  const canvas = document.createElement("div");
  canvas.className = "chart-canvas";
  const note = document.createElement("p");
  note.className = "chart-note";
  note.setAttribute("aria-live", "polite");
  const legend = document.createElement("div");
  legend.className = "chart-legend";
  panel.append(title, canvas, note, legend);
  return panel;
}

function start() {
  const area = document.getElementById("compare-charts");
  renderConfigDiff();
  if (!area) return; // the page without runs: a plain form picks them
  const runs = readRuns();
  const ctl = controls();
  const state = initialState(ctl, runs);
  applyToControls(ctl, state);
  writeUrl(state);

  /** key → chart controller, in the order of `state.keys` */
  const charts = new Map();
  let emptyNote = null;

  const onZoom = (source) => (range) => {
    state.xmin = range.xmin;
    state.xmax = range.xmax;
    for (const [, chart] of charts) {
      if (chart !== source) chart.setZoom(range.xmin, range.xmax);
    }
    writeUrl(state);
  };

  function syncPanels() {
    const wanted = runs.length > 0 ? state.keys : [];
    for (const [key, chart] of charts) {
      if (!wanted.includes(key)) {
        chart.destroy();
        chart.panel.remove();
        charts.delete(key);
      }
    }
    if (wanted.length === 0) {
      emptyNote ??= document.createElement("p");
      emptyNote.className = "compare-empty";
      emptyNote.textContent =
        runs.length === 0
          ? "No runs to compare: pick runs on the runs page."
          : "Pick at least one metric to draw.";
      area.replaceChildren(emptyNote);
      return;
    }
    emptyNote?.remove();
    for (const key of wanted) {
      let chart = charts.get(key);
      if (chart) {
        area.append(chart.panel); // moves it: panels follow the picker's order
        continue;
      }
      const panel = makePanel(key, runs);
      area.append(panel); // in the document first: the chart sizes itself from its width
      chart = mountSeriesChart(panel, {
        x: state.x,
        log: state.log,
        smooth: state.smooth,
        zoom: state.xmin === null ? null : { xmin: state.xmin, xmax: state.xmax },
      });
      chart.panel = panel;
      chart.onStateChange(onZoom(chart));
      charts.set(key, chart);
    }
  }

  ctl.form?.addEventListener("submit", (event) => {
    // everything applies at once; a submit would only reload the same view
    event.preventDefault();
  });

  ctl.smooth?.addEventListener("input", () => {
    state.smooth = Math.min(Math.max(Number(ctl.smooth.value) || 0, 0), 0.99);
    const out = smoothOutput(ctl);
    if (out) out.textContent = state.smooth.toFixed(2);
    for (const [, chart] of charts) chart.setSmooth(state.smooth);
    writeUrl(state);
  });

  ctl.x?.addEventListener("change", () => {
    const x = ctl.x.value;
    if (!["step", "time", "relative"].includes(x) || x === state.x) return;
    state.x = x;
    state.xmin = null; // a zoom in other units means nothing now
    state.xmax = null;
    for (const [, chart] of charts) chart.setX(x);
    writeUrl(state);
  });

  ctl.log?.addEventListener("change", () => {
    state.log = ctl.log.checked;
    for (const [, chart] of charts) chart.setLog(state.log);
    writeUrl(state);
  });

  ctl.form?.addEventListener("change", (event) => {
    const box = event.target;
    if (!(box instanceof HTMLInputElement) || box.name !== "key") return;
    state.keys = ctl
      .keyBoxes()
      .filter((b) => b.checked)
      .map((b) => b.value);
    syncPanels();
    writeUrl(state);
  });

  syncPanels();

  // live runs keep appending: refresh while any is queued/starting/running, then once more
  const anyLive = () => readRuns().some((r) => LIVE.has(statusOf(r)));
  if (anyLive()) {
    const timer = setInterval(() => {
      if (document.hidden) return;
      const live = anyLive();
      for (const [, chart] of charts) chart.refresh();
      if (!live) clearInterval(timer);
    }, POLL_MS);
  }
}

if (main) start();
