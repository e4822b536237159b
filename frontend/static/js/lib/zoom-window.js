// What a chart asks /api/compare for: how many buckets (the plot's width in CSS pixels), and
// which x range (the whole run, or the window a drag selected). Pure: no DOM, no uPlot.

/** max_points bounds: a bucket per CSS pixel of plot width, within these. */
export const MIN_POINTS = 50;
export const MAX_POINTS = 4000;
/** A selection narrower than this (CSS pixels) is a click, not a drag. */
export const MIN_DRAG_PX = 3;

const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);

/**
 * max_points for a plot `cssWidth` pixels wide: its rounded width within [MIN_POINTS,
 * MAX_POINTS]; a missing or NaN width asks for MIN_POINTS.
 * @param {number} cssWidth
 * @returns {number}
 */
export function pointsForWidth(cssWidth) {
  return clamp(Math.round(cssWidth || 0), MIN_POINTS, MAX_POINTS);
}

/**
 * `{xmin, xmax}` when both are finite and xmin < xmax, else null (no zoom).
 * @param {{xmin: number, xmax: number}|null|undefined} zoom
 * @returns {{xmin: number, xmax: number}|null}
 */
export function validZoom(zoom) {
  if (!zoom) return null;
  const { xmin, xmax } = zoom;
  return Number.isFinite(xmin) && Number.isFinite(xmax) && xmin < xmax ? { xmin, xmax } : null;
}

/**
 * The x range of a drag selection `left`…`left + width` (CSS pixels over the plot), in either
 * drag direction; null for a click (narrower than MIN_DRAG_PX). Not validated: see validZoom.
 * @param {number} left
 * @param {number} width
 * @param {(px: number) => number} posToVal  pixel → x (uPlot's `u.posToVal(px, "x")`)
 * @returns {{xmin: number, xmax: number}|null}
 */
export function selectionRange(left, width, posToVal) {
  if (!(width >= MIN_DRAG_PX)) return null;
  const a = posToVal(left);
  const b = posToVal(left + width);
  return { xmin: Math.min(a, b), xmax: Math.max(a, b) };
}

/**
 * The /api/compare requests that fetch window `win` (null: the whole range) in x mode `mode`.
 * The API knows steps and wall-clock times: x = time and x = relative both ask for `time`. A
 * relative window becomes one wall-clock window per run (each run has its own origin); a run
 * whose origin is not known yet is not asked (it has no points to show).
 * @param {{xmin: number, xmax: number}|null} win
 * @param {"step"|"time"|"relative"} mode
 * @param {string[]} runs
 * @param {Map<string, number>} origins  run id → its first time (seconds)
 * @returns {{x: "step"|"time", requests: {runs: string[], range: {min: number, max: number}|null}[]}}
 */
export function fetchPlan(win, mode, runs, origins) {
  const x = mode === "step" ? "step" : "time";
  if (!win) return { x, requests: [{ runs, range: null }] };
  if (mode !== "relative")
    return { x, requests: [{ runs, range: { min: win.xmin, max: win.xmax } }] };
  const requests = [];
  for (const run of runs) {
    const t0 = origins.get(run);
    if (t0 === undefined) continue;
    requests.push({ runs: [run], range: { min: t0 + win.xmin, max: t0 + win.xmax } });
  }
  return { x, requests };
}
