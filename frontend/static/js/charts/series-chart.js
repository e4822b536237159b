// One chart panel: every (run, key) series of /api/compare as a line plus its bucket min/max band,
// drag-to-zoom that refetches finer buckets, and an HTML legend with last/min/max/best.
//
// DOM contract (rendered by the server, or by compare.js):
//   <section class="chart-panel" data-chart data-runs='["id1"]' data-keys='["train/loss_total"]'
//            data-run-names='{"id1": "name"}' data-x="step" aria-labelledby="h">
//     <h3 id="h">…</h3><div class="chart-canvas"></div>
//     <p class="chart-note" aria-live="polite"></p><div class="chart-legend"></div>
//   </section>
// Styles are set through the CSSOM (element.style.x = …) or classes only: the CSP forbids
// style="" attributes.

import uPlot from "../../vendor/uPlot-1.6.32.esm.js";
import { alignSeries, mergeZoom, seriesStats } from "../lib/buckets.js";
import { formatDuration, formatValue } from "../lib/format.js";
import { seriesStyle, withAlpha } from "../lib/palette.js";
import { ema } from "../lib/smoothing.js";
import { fetchCompare } from "./api.js";

export const MIN_POINTS = 50;
export const MAX_POINTS = 4000;
const DEFAULT_HEIGHT = 260;
const X_MODES = ["step", "time", "relative"];
const X_LABELS = { step: "step", time: "time", relative: "time since start" };
/** Wall-clock x in the legend and notes: "Nov 30, 21:42:19" in the reader's locale. */
const TIME_FORMAT = {
  month: "short",
  day: "numeric",
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
};
/** Tick spacings for x = relative (seconds): whole seconds, minutes, hours, days. */
const DURATION_INCRS = [
  1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800,
  604800,
];
const STYLESHEET = new URL("../../vendor/uPlot-1.6.32.min.css", import.meta.url).href;

const darkQuery =
  typeof matchMedia === "function" ? matchMedia("(prefers-color-scheme: dark)") : null;
const isDark = () => darkQuery?.matches ?? false;

/** uPlot's own stylesheet (cursor, selection, overlay positioning), once per document. */
function ensureStylesheet() {
  if (document.querySelector('link[rel="stylesheet"][href*="uPlot-"]')) return;
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = STYLESHEET;
  document.head.append(link);
}

function parseJson(text, fallback) {
  if (!text) return fallback;
  try {
    return JSON.parse(text);
  } catch {
    return fallback;
  }
}

/** A CSS custom property of :root, read at draw time (the canvas cannot use CSS itself). */
function cssVar(name, fallback) {
  const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return value || fallback;
}

const colours = () => {
  const dark = isDark();
  return {
    fg: cssVar("--fg", dark ? "#e6e6e6" : "#1a1a1a"),
    muted: cssVar("--muted", dark ? "#a0a0a0" : "#595959"),
    grid: cssVar("--grid", dark ? "rgba(255, 255, 255, 0.12)" : "rgba(0, 0, 0, 0.1)"),
  };
};

/** uPlot passes null for ticks it leaves unlabelled (a log axis's minor ticks). */
const tick = (format) => (v) => (v == null ? "" : format(v));
const positive = (values) => values.map((v) => (v != null && v > 0 ? v : null));
const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
const emptyApiSeries = (run, key) => ({
  run_id: run,
  key,
  step: [],
  time: [],
  value: [],
  min: [],
  max: [],
  points: 0,
});

function validZoom(zoom) {
  if (!zoom) return null;
  const { xmin, xmax } = zoom;
  return Number.isFinite(xmin) && Number.isFinite(xmax) && xmin < xmax ? { xmin, xmax } : null;
}

/**
 * Draws the chart in `panel` and returns its controller.
 * @param {HTMLElement} panel  a `[data-chart]` section (see the contract above)
 * @param {{runs?: string[], keys?: string[], runNames?: Record<string, string>,
 *   x?: "step"|"time"|"relative", log?: boolean, smooth?: number,
 *   zoom?: {xmin: number, xmax: number}|null, height?: number,
 *   fetchCompare?: typeof fetchCompare}} [options]  anything not given is read from the panel's
 *   data attributes; `fetchCompare` replaces the network call (tests, harnesses)
 */
export function mountSeriesChart(panel, options = {}) {
  ensureStylesheet();
  const data = panel.dataset;
  const runs = options.runs ?? parseJson(data.runs, []);
  const keys = options.keys ?? parseJson(data.keys, []);
  const runNames = options.runNames ?? parseJson(data.runNames, {});
  const fetcher = options.fetchCompare ?? fetchCompare;
  const view = {
    x: X_MODES.includes(options.x ?? data.x) ? (options.x ?? data.x) : "step",
    log: Boolean(options.log),
    smooth: Number(options.smooth) || 0,
  };
  let zoom = validZoom(options.zoom);

  const part = (selector, tag, className) => {
    let el = panel.querySelector(selector);
    if (!el) {
      el = document.createElement(tag);
      el.className = className;
      panel.append(el);
    }
    return el;
  };
  const canvas = part(".chart-canvas", "div", "chart-canvas");
  const note = part(".chart-note", "p", "chart-note");
  const legend = part(".chart-legend", "div", "chart-legend");
  if (!note.hasAttribute("aria-live")) note.setAttribute("aria-live", "polite");
  if (!panel.hasAttribute("tabindex")) panel.tabIndex = 0;
  canvas.setAttribute("role", "img");
  canvas.setAttribute(
    "aria-label",
    `Chart of ${keys.join(", ")}; the table below lists each curve's values. ` +
      "Drag to zoom, double-click or Escape to reset, arrow keys move the cursor.",
  );
  const height =
    options.height ?? (canvas.clientHeight >= 120 ? canvas.clientHeight : DEFAULT_HEIGHT);

  // one entry per (run, key), runs outer and keys inner: the order /api/compare answers in
  const entries = runs.flatMap((run) => keys.map((key) => ({ run, key })));
  const entryIndex = new Map(entries.map((e, i) => [`${e.run}\u0000${e.key}`, i]));

  let coarseRaw = null; // API series of the whole range (the last full fetch)
  let fineRaw = null; // API series of the zoom window
  const origin = new Map(); // run → first time seen, for x = relative
  let plot = null;
  let shown = entries.map(() => ({ x: [], value: [], min: [], max: [] }));
  let controller = null;
  let inflight = null;
  let generation = 0;
  const listeners = new Set();
  let legendCells = [];
  let cursorHeader = null;
  let destroyed = false;
  let fetchedWidth = 0; // max_points of the last request
  let markReady;
  const ready = new Promise((resolve) => {
    markReady = resolve;
  });

  // ---- data ---------------------------------------------------------------------------

  /** API series in entry order (missing ones empty), converted to the chart's x. */
  function toChart(apiSeries) {
    const byEntry = entries.map((e) => emptyApiSeries(e.run, e.key));
    for (const s of apiSeries ?? []) {
      const i = entryIndex.get(`${s.run_id}\u0000${s.key}`);
      if (i !== undefined) byEntry[i] = s;
    }
    return byEntry.map((s) => {
      let x = s.step;
      if (view.x === "time") x = s.time;
      if (view.x === "relative") {
        const t0 = origin.get(s.run_id) ?? 0;
        x = s.time.map((t) => t - t0);
      }
      return { x, value: s.value, min: s.min, max: s.max };
    });
  }

  function remember(apiSeries) {
    // a run's origin only moves earlier: the first bucket of a live run widens as it grows
    for (const s of apiSeries) {
      let first = Number.POSITIVE_INFINITY;
      for (const t of s.time) if (t < first) first = t;
      if (first === Number.POSITIVE_INFINITY) continue;
      const known = origin.get(s.run_id);
      if (known === undefined || first < known) origin.set(s.run_id, first);
    }
  }

  function currentSeries() {
    const coarse = toChart(coarseRaw);
    if (!zoom || !fineRaw) return coarse;
    const fine = toChart(fineRaw);
    return coarse.map((s, i) => mergeZoom(s, fine[i], zoom.xmin, zoom.xmax));
  }

  function plotData(list) {
    const { x, series } = alignSeries(list);
    const out = [x];
    for (const col of series) {
      let line = ema(col.value, view.smooth); // the line only: the band stays raw
      let lo = col.min;
      let hi = col.max;
      if (view.log) {
        line = positive(line);
        lo = positive(lo);
        hi = positive(hi);
      }
      out.push(line, hi, lo);
    }
    return out;
  }

  function plotWidth() {
    const css = plot
      ? plot.bbox.width / (globalThis.devicePixelRatio || 1)
      : canvas.clientWidth - 60;
    return clamp(Math.round(css || 0), MIN_POINTS, MAX_POINTS);
  }

  async function request(win, signal) {
    const maxPoints = plotWidth();
    fetchedWidth = maxPoints;
    const x = view.x === "step" ? "step" : "time";
    if (!win || view.x !== "relative") {
      const range = win ? { min: win.xmin, max: win.xmax } : null;
      const answer = await fetcher({ runs, keys, x, maxPoints, range, signal });
      return answer.series ?? [];
    }
    // relative time: each run has its own origin, so its own wall-clock window
    const parts = await Promise.all(
      runs.map(async (run) => {
        const t0 = origin.get(run);
        if (t0 === undefined) return keys.map((key) => emptyApiSeries(run, key));
        const range = { min: t0 + win.xmin, max: t0 + win.xmax };
        const answer = await fetcher({ runs: [run], keys, x, maxPoints, range, signal });
        return answer.series ?? [];
      }),
    );
    return parts.flat();
  }

  /** Fetches the current window (whole range, or the zoom) and draws it. */
  function load() {
    controller?.abort();
    const own = new AbortController();
    controller = own;
    const gen = ++generation;
    const win = zoom;
    if (runs.length === 0 || keys.length === 0) {
      say("Nothing to show: no runs or no metrics selected");
      markReady();
      return Promise.resolve();
    }
    const task = (async () => {
      try {
        if (win && !coarseRaw) {
          // a zoom needs the whole range first: context outside it, and x = relative's origins
          const full = await request(null, own.signal);
          if (gen !== generation || destroyed) return;
          remember(full);
          coarseRaw = full;
        }
        const answer = await request(win, own.signal);
        if (gen !== generation || destroyed) return;
        if (win) fineRaw = answer;
        else {
          remember(answer);
          coarseRaw = answer;
        }
        render();
        describe(answer, win);
        markReady();
      } catch (error) {
        if (error?.name === "AbortError" || gen !== generation || destroyed) return;
        say(`Could not load the chart: ${error.message}`);
        markReady();
      } finally {
        if (gen === generation) {
          controller = null;
          inflight = null;
        }
      }
    })();
    inflight = task;
    return task;
  }

  function describe(answer, win) {
    const buckets = answer.reduce((n, s) => n + s.value.length, 0);
    if (!win && buckets === 0) {
      say("No points yet");
      return;
    }
    // an answer without `points` (or an implausible one) counts its buckets
    const points = answer.reduce((n, s) => n + Math.max(s.points ?? 0, s.value.length), 0);
    const where = win ? ` between ${formatX(win.xmin)} and ${formatX(win.xmax)}` : "";
    say(`showing ${buckets} of ${points} points${where}`);
  }

  /** The note is aria-live: only a changed text is written (and so announced). */
  function say(text) {
    if (note.textContent !== text) note.textContent = text;
  }

  // ---- drawing --------------------------------------------------------------------------

  function formatX(v) {
    if (v == null || !Number.isFinite(v)) return "–";
    if (view.x === "time") return new Date(v * 1000).toLocaleString(undefined, TIME_FORMAT);
    if (view.x === "relative") return formatDuration(v);
    return String(Math.round(v));
  }

  function label(entry) {
    const name = runNames[entry.run] ?? entry.run;
    return keys.length > 1 ? `${name} · ${entry.key}` : name;
  }

  /** uPlot styles and moves the dot under the cursor; lines get one, band edges none. */
  function cursorPoint(_u, si) {
    return si % 3 === 1 ? document.createElement("div") : null;
  }

  function plotOptions(width) {
    const dark = isDark();
    const axisStroke = () => colours().muted;
    const gridStroke = () => colours().grid;
    const series = [{ label: X_LABELS[view.x] }];
    const bands = [];
    entries.forEach((entry, i) => {
      const style = seriesStyle(i, dark);
      const name = label(entry);
      // Band edges: width 0 (the fill alone shows the bucket's range) — except while smoothing,
      // when they are drawn thin and faint: the raw curve behind the smoothed one, so a
      // one-step spike stays visible even where a bucket holds a single point (min = max).
      const edge = (which) => ({
        label: `${name} ${which}`,
        stroke: withAlpha(style.stroke, dark ? 0.45 : 0.35),
        width: view.smooth > 0 ? 1 : 0,
        points: { show: false },
        spanGaps: true,
      });
      series.push(
        { label: name, stroke: style.stroke, width: style.width, dash: style.dash, spanGaps: true },
        edge("max"),
        edge("min"),
      );
      const top = 2 + 3 * i;
      bands.push({ series: [top, top + 1], fill: withAlpha(style.stroke, dark ? 0.28 : 0.2) });
    });
    const axis = {
      stroke: axisStroke,
      grid: { stroke: gridStroke, width: 1 },
      ticks: { stroke: gridStroke, width: 1 },
    };
    return {
      width,
      height,
      series,
      bands,
      legend: { show: false },
      scales: {
        x: { time: view.x === "time" },
        y: view.log ? { distr: 3 } : {},
      },
      axes: [
        {
          ...axis,
          label: X_LABELS[view.x],
          labelSize: 20,
          labelFont: "12px system-ui, sans-serif",
          ...(view.x === "relative"
            ? { incrs: DURATION_INCRS, values: (_u, splits) => splits.map(tick(formatDuration)) }
            : {}),
        },
        { ...axis, size: 56, values: (_u, splits) => splits.map(tick(formatValue)) },
      ],
      cursor: {
        drag: { x: true, y: false, setScale: false },
        bind: { dblclick: () => null }, // ours resets the zoom (uPlot's would only rescale)
        points: { show: cursorPoint },
        // the cursor's per-series index skips the gaps of alignment (null here), so a run logged
        // every other step still reads a value between its points
        hover: { skip: [null, undefined] },
      },
      hooks: {
        setSelect: [onSelect],
        setCursor: [(u) => showCursor(u)],
      },
    };
  }

  function render() {
    if (destroyed) return;
    shown = currentSeries();
    if (legendCells.length === 0) buildLegend();
    // no plot until there is a point: an empty frame says less than the note's "No points yet"
    if (!plot && shown.every((series) => series.x.length === 0)) {
      updateLegend();
      return;
    }
    const d = plotData(shown);
    if (!plot) {
      plot = new uPlot(plotOptions(Math.max(canvas.clientWidth, 200)), d, canvas);
      plot.over.addEventListener("dblclick", () => resetZoom(true));
      if (zoom) plot.setScale("x", { min: zoom.xmin, max: zoom.xmax });
    } else if (zoom) {
      // keep the zoom; re-setting the x scale re-ranges y to the window and recomputes the
      // visible index range, which a bare redraw() would leave stale when array lengths change
      plot.setData(d, false);
      plot.setScale("x", { min: zoom.xmin, max: zoom.xmax });
    } else {
      plot.setData(d);
    }
    updateLegend();
  }

  /** Theme, log scale or x mode changed: a new uPlot with the same data. */
  function rebuild() {
    legendCells = []; // swatch colours, column titles
    if (plot) {
      plot.destroy();
      plot = null;
    }
    if (coarseRaw) render();
  }

  // ---- legend ---------------------------------------------------------------------------

  function buildLegend() {
    const dark = isDark();
    // the row header names the curve: the run, the metric, or both when both vary
    const showRun = runs.length > 1 || keys.length <= 1;
    const showKey = keys.length > 1;
    const table = document.createElement("table");
    table.className = "chart-legend-table";
    const head = table.createTHead().insertRow();
    const th = (text) => {
      const cell = document.createElement("th");
      cell.scope = "col";
      cell.textContent = text;
      head.append(cell);
      return cell;
    };
    if (showRun) th("Run");
    if (showKey) th("Metric");
    th("Last");
    th("Min");
    th("Max");
    th("Best");
    th(`Best at (${X_LABELS[view.x]})`);
    cursorHeader = th("Cursor");
    const body = table.createTBody();
    legendCells = entries.map((entry, i) => {
      const row = body.insertRow();
      const style = seriesStyle(i, dark);
      const swatch = document.createElement("span");
      swatch.className = "chart-swatch";
      swatch.setAttribute("aria-hidden", "true");
      swatch.style.display = "inline-block";
      swatch.style.width = "1.6em";
      swatch.style.marginRight = "0.4em";
      swatch.style.verticalAlign = "middle";
      swatch.style.borderTop = `3px ${style.dash.length ? "dashed" : "solid"} ${style.stroke}`;
      const name = document.createElement("th");
      name.scope = "row";
      name.append(swatch, showRun ? (runNames[entry.run] ?? entry.run) : entry.key);
      row.append(name);
      if (showRun && showKey) row.insertCell().textContent = entry.key;
      const cell = () => {
        const td = row.insertCell();
        td.className = "num";
        return td;
      };
      return {
        last: cell(),
        min: cell(),
        max: cell(),
        best: cell(),
        bestX: cell(),
        cursor: cell(),
      };
    });
    legend.style.overflowX = "auto"; // a narrow panel scrolls the table, not the page
    legend.replaceChildren(table);
  }

  function updateLegend() {
    shown.forEach((series, i) => {
      const cells = legendCells[i];
      if (!cells) return;
      const stats = seriesStats(series, entries[i].key);
      cells.last.textContent = formatValue(stats.last);
      cells.min.textContent = formatValue(stats.min);
      cells.max.textContent = formatValue(stats.max);
      cells.best.textContent = formatValue(stats.best);
      cells.bestX.textContent = stats.bestX === null ? "–" : formatX(stats.bestX);
    });
    if (plot) showCursor(plot);
  }

  function showCursor(u) {
    const idx = u.cursor.idx;
    if (cursorHeader) {
      cursorHeader.textContent =
        idx == null ? "Cursor" : `At ${X_LABELS[view.x]} ${formatX(u.data[0][idx])}`;
    }
    legendCells.forEach((cells, i) => {
      const si = 1 + 3 * i;
      const j = idx == null ? null : (u.cursor.idxs?.[si] ?? idx);
      cells.cursor.textContent = j == null ? "–" : formatValue(u.data[si][j]);
    });
  }

  // ---- zoom -----------------------------------------------------------------------------

  function onSelect(u) {
    const { left, width } = u.select;
    if (width < 3) return; // a click, not a drag
    const a = u.posToVal(left, "x");
    const b = u.posToVal(left + width, "x");
    u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
    zoomTo(Math.min(a, b), Math.max(a, b), true);
  }

  function emit() {
    const state = { xmin: zoom?.xmin ?? null, xmax: zoom?.xmax ?? null };
    for (const cb of listeners) cb(state);
  }

  function zoomTo(xmin, xmax, fromUser = false) {
    const next = validZoom({ xmin, xmax });
    if (!next) return Promise.resolve();
    zoom = next;
    fineRaw = null;
    if (plot) plot.setScale("x", { min: zoom.xmin, max: zoom.xmax }); // at once, coarse
    if (fromUser) emit();
    return load();
  }

  function resetZoom(fromUser = false) {
    if (!zoom) return Promise.resolve();
    zoom = null;
    fineRaw = null;
    if (coarseRaw) render();
    if (fromUser) emit();
    return load(); // the whole range again, fresh (a live run has grown meanwhile)
  }

  // ---- keyboard -------------------------------------------------------------------------

  function onKey(event) {
    if (event.target !== panel) return;
    if (event.key === "Escape" && zoom) {
      event.preventDefault();
      resetZoom(true);
      return;
    }
    if (!plot || !["ArrowLeft", "ArrowRight", "Home", "End"].includes(event.key)) return;
    const xs = plot.data[0];
    if (xs.length === 0) return;
    event.preventDefault();
    const lo = plot.valToIdx?.(plot.scales.x.min) ?? 0;
    const hi = plot.valToIdx?.(plot.scales.x.max) ?? xs.length - 1;
    const step = event.shiftKey ? 10 : 1;
    let idx = plot.cursor.idx;
    if (event.key === "Home") idx = lo;
    else if (event.key === "End") idx = hi;
    else if (idx == null) idx = event.key === "ArrowLeft" ? hi : lo;
    else idx += event.key === "ArrowLeft" ? -step : step;
    idx = clamp(idx, lo, hi);
    const top =
      plot.cursor.top >= 0
        ? plot.cursor.top
        : plot.bbox.height / (globalThis.devicePixelRatio || 1) / 2;
    plot.setCursor({ left: plot.valToPos(xs[idx], "x"), top });
  }
  panel.addEventListener("keydown", onKey);

  // ---- environment ----------------------------------------------------------------------

  const onTheme = () => rebuild();
  darkQuery?.addEventListener("change", onTheme);

  let lastWidth = 0;
  const resizer =
    typeof ResizeObserver === "function"
      ? new ResizeObserver(() => {
          const width = canvas.clientWidth;
          if (!plot || width === lastWidth || width < 100) return;
          lastWidth = width;
          plot.setSize({ width, height });
          // much wider than the buckets were asked for (e.g. mounted while hidden): refetch
          if (plotWidth() > fetchedWidth * 1.5 && coarseRaw) load();
        })
      : null;
  resizer?.observe(canvas);

  // ---- start ----------------------------------------------------------------------------

  say("Loading…");
  load();

  return {
    /** Resolves once the first answer (the zoom's, when mounted zoomed) is drawn, or failed. */
    ready,
    /** Refetches the current window (whole range, or the zoom); skipped while a fetch runs. */
    refresh() {
      return inflight ?? load();
    },
    /** Zooms x to [xmin, xmax] (chart units) and fetches finer buckets; no state callback. */
    setZoom(xmin, xmax) {
      if (xmin == null || xmax == null) return resetZoom(false);
      return zoomTo(xmin, xmax, false);
    },
    resetZoom: () => resetZoom(false),
    get zoom() {
      return zoom ? { ...zoom } : null;
    },
    setSmooth(w) {
      const next = Number(w) || 0;
      const edgesChange = next > 0 !== view.smooth > 0;
      view.smooth = next;
      if (edgesChange) rebuild();
      else if (coarseRaw) render();
    },
    setLog(on) {
      if (view.log === Boolean(on)) return;
      view.log = Boolean(on);
      rebuild();
    },
    /** A new x mode: the zoom is dropped (its units change) and everything is refetched. */
    setX(mode) {
      if (!X_MODES.includes(mode) || mode === view.x) return Promise.resolve();
      view.x = mode;
      zoom = null;
      coarseRaw = null;
      fineRaw = null;
      origin.clear();
      legendCells = [];
      if (plot) {
        plot.destroy();
        plot = null;
      }
      return load();
    },
    /** `cb({xmin, xmax})` after the user zooms (nulls after a reset); returns an unsubscribe. */
    onStateChange(cb) {
      listeners.add(cb);
      return () => listeners.delete(cb);
    },
    get plot() {
      return plot;
    },
    destroy() {
      destroyed = true;
      controller?.abort();
      resizer?.disconnect();
      darkQuery?.removeEventListener("change", onTheme);
      panel.removeEventListener("keydown", onKey);
      plot?.destroy();
      plot = null;
      listeners.clear();
    },
  };
}
