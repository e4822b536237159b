// One chart panel: every (run, key) series of /api/compare as a line plus its bucket min/max band,
// drag-to-zoom that refetches finer buckets (zoom.js, series-data.js), and an HTML legend with
// last/min/max/best (legend.js); uPlot's options come from plot-options.js, colours that follow
// the colour scheme from theme.js.
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
import { formatX, X_LABELS, X_MODES } from "../lib/chart-x.js";
import { CURSOR_KEYS, cursorIndexForKey } from "../lib/cursor-keys.js";
import { toPlotData } from "../lib/plot-data.js";
import { pointsForWidth, validZoom } from "../lib/zoom-window.js";
import { fetchCompare } from "./api.js";
import { createLegend } from "./legend.js";
import { plotOptions } from "./plot-options.js";
import { createSeriesData } from "./series-data.js";
import { ensureStylesheet, isDark, onColorSchemeChange } from "./theme.js";
import { dragZoom } from "./zoom.js";

const DEFAULT_HEIGHT = 260;

function parseJson(text, fallback) {
  if (!text) return fallback;
  try {
    return JSON.parse(text);
  } catch {
    return fallback;
  }
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
  const legendBox = part(".chart-legend", "div", "chart-legend");
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

  const series = createSeriesData({ runs, keys, fetcher: options.fetchCompare ?? fetchCompare });
  const { entries } = series;
  const xText = (v) => formatX(v, view.x);
  const legend = createLegend(legendBox, {
    entries,
    runs,
    keys,
    runNames,
    xLabel: () => X_LABELS[view.x],
    formatX: xText,
    dark: isDark,
  });
  const zoomUi = dragZoom({
    onZoom: (xmin, xmax) => zoomTo(xmin, xmax, true),
    onReset: () => resetZoom(true),
  });

  let plot = null;
  let inflight = null;
  const listeners = new Set();
  let destroyed = false;
  let fetchedWidth = 0; // max_points of the last request
  let markReady;
  const ready = new Promise((resolve) => {
    markReady = resolve;
  });

  // ---- data ---------------------------------------------------------------------------

  function plotWidth() {
    const css = plot
      ? plot.bbox.width / (globalThis.devicePixelRatio || 1)
      : canvas.clientWidth - 60;
    return pointsForWidth(css);
  }

  function pointsToAsk() {
    fetchedWidth = plotWidth();
    return fetchedWidth;
  }

  /** Fetches the current window (whole range, or the zoom) and draws it. */
  function load() {
    const win = zoom;
    if (runs.length === 0 || keys.length === 0) {
      series.stop();
      say("Nothing to show: no runs or no metrics selected");
      markReady();
      return Promise.resolve();
    }
    const task = series
      .load(win, view.x, pointsToAsk)
      .then(
        (answer) => {
          if (answer === null || destroyed) return; // superseded by a newer load
          render();
          describe(answer, win);
          markReady();
        },
        (error) => {
          if (destroyed) return;
          say(`Could not load the chart: ${error.message}`);
          markReady();
        },
      )
      .finally(() => {
        if (inflight === task) inflight = null;
      });
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
    const where = win ? ` between ${xText(win.xmin)} and ${xText(win.xmax)}` : "";
    say(`showing ${buckets} of ${points} points${where}`);
  }

  /** The note is aria-live: only a changed text is written (and so announced). */
  function say(text) {
    if (note.textContent !== text) note.textContent = text;
  }

  // ---- drawing --------------------------------------------------------------------------

  function label(entry) {
    const name = runNames[entry.run] ?? entry.run;
    return keys.length > 1 ? `${name} · ${entry.key}` : name;
  }

  function newPlot(d) {
    const options = plotOptions({
      width: Math.max(canvas.clientWidth, 200),
      height,
      names: entries.map(label),
      dark: isDark(),
      view,
      cursor: zoomUi.cursor,
      hooks: {
        setSelect: [zoomUi.onSelect],
        setCursor: [(u) => legend.cursor(u)],
      },
    });
    const made = new uPlot(options, d, canvas);
    zoomUi.attach(made);
    return made;
  }

  function render() {
    if (destroyed) return;
    const shown = series.series(zoom, view.x);
    // no plot until there is a point: an empty frame says less than the note's "No points yet"
    if (!plot && shown.every((s) => s.x.length === 0)) {
      legend.update(shown, null);
      return;
    }
    const d = toPlotData(shown, view); // smoothing on the line only: the band stays raw
    if (!plot) {
      plot = newPlot(d);
      if (zoom) plot.setScale("x", { min: zoom.xmin, max: zoom.xmax });
    } else if (zoom) {
      // keep the zoom; re-setting the x scale re-ranges y to the window and recomputes the
      // visible index range, which a bare redraw() would leave stale when array lengths change
      plot.setData(d, false);
      plot.setScale("x", { min: zoom.xmin, max: zoom.xmax });
    } else {
      plot.setData(d);
    }
    legend.update(shown, plot);
  }

  function dropPlot() {
    legend.reset(); // swatch colours, column titles
    if (plot) {
      plot.destroy();
      plot = null;
    }
  }

  /** Theme, log scale or band edges changed: a new uPlot with the same data. */
  function rebuild() {
    dropPlot();
    if (series.loaded) render();
  }

  // ---- zoom -----------------------------------------------------------------------------

  function emit() {
    const state = { xmin: zoom?.xmin ?? null, xmax: zoom?.xmax ?? null };
    for (const cb of listeners) cb(state);
  }

  function zoomTo(xmin, xmax, fromUser = false) {
    const next = validZoom({ xmin, xmax });
    if (!next) return Promise.resolve();
    zoom = next;
    series.dropZoom();
    if (plot) plot.setScale("x", { min: zoom.xmin, max: zoom.xmax }); // at once, coarse
    if (fromUser) emit();
    return load();
  }

  function resetZoom(fromUser = false) {
    if (!zoom) return Promise.resolve();
    zoom = null;
    series.dropZoom();
    if (series.loaded) render();
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
    if (!plot || !CURSOR_KEYS.includes(event.key)) return;
    const xs = plot.data[0];
    if (xs.length === 0) return;
    event.preventDefault();
    const lo = plot.valToIdx?.(plot.scales.x.min) ?? 0;
    const hi = plot.valToIdx?.(plot.scales.x.max) ?? xs.length - 1;
    const idx = cursorIndexForKey(event.key, plot.cursor.idx, lo, hi, event.shiftKey);
    const top =
      plot.cursor.top >= 0
        ? plot.cursor.top
        : plot.bbox.height / (globalThis.devicePixelRatio || 1) / 2;
    plot.setCursor({ left: plot.valToPos(xs[idx], "x"), top });
  }
  panel.addEventListener("keydown", onKey);

  // ---- environment ----------------------------------------------------------------------

  const stopTheme = onColorSchemeChange(() => rebuild());

  let lastWidth = 0;
  const resizer =
    typeof ResizeObserver === "function"
      ? new ResizeObserver(() => {
          const width = canvas.clientWidth;
          if (!plot || width === lastWidth || width < 100) return;
          lastWidth = width;
          plot.setSize({ width, height });
          // much wider than the buckets were asked for (e.g. mounted while hidden): refetch
          if (plotWidth() > fetchedWidth * 1.5 && series.loaded) load();
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
      else if (series.loaded) render();
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
      series.clear();
      dropPlot();
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
      series.stop();
      resizer?.disconnect();
      stopTheme();
      panel.removeEventListener("keydown", onKey);
      plot?.destroy();
      plot = null;
      listeners.clear();
    },
  };
}
