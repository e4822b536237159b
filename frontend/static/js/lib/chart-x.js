// The charts' x modes: the step, the wall-clock time, or the time since the run's first point.
// Pure: no DOM, no uPlot.
import { formatDuration } from "./format.js";

export const X_MODES = ["step", "time", "relative"];
export const X_LABELS = { step: "step", time: "time", relative: "time since start" };

/** Wall-clock x in the legend and notes: "Nov 30, 21:42:19" in the reader's locale. */
const TIME_FORMAT = {
  month: "short",
  day: "numeric",
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
};

/**
 * An x value as the legend and notes write it: a whole step, a local date and time (x = time,
 * in seconds since the epoch) or a duration (x = relative); "–" when not a finite number.
 * @param {number|null|undefined} v
 * @param {"step"|"time"|"relative"} mode
 * @returns {string}
 */
export function formatX(v, mode) {
  if (v == null || !Number.isFinite(v)) return "–";
  if (mode === "time") return new Date(v * 1000).toLocaleString(undefined, TIME_FORMAT);
  if (mode === "relative") return formatDuration(v);
  return String(Math.round(v));
}

/**
 * Records each run's earliest time in `origins` (run id → seconds), the zero of x = relative.
 * An origin only moves earlier: the first bucket of a live run widens as the run grows.
 * @param {Map<string, number>} origins  updated in place
 * @param {{run_id: string, time: number[]}[]} apiSeries
 */
export function widenOrigins(origins, apiSeries) {
  for (const s of apiSeries) {
    let first = Number.POSITIVE_INFINITY;
    for (const t of s.time) if (t < first) first = t;
    if (first === Number.POSITIVE_INFINITY) continue;
    const known = origins.get(s.run_id);
    if (known === undefined || first < known) origins.set(s.run_id, first);
  }
}

/**
 * One /api/compare series on the chart's x: its steps, its times, or its times minus the run's
 * origin (0 when the origin is unknown).
 * @param {{run_id: string, step: number[], time: number[], value: unknown[], min: unknown[],
 *   max: unknown[]}} s
 * @param {"step"|"time"|"relative"} mode
 * @param {Map<string, number>} origins
 * @returns {{x: number[], value: unknown[], min: unknown[], max: unknown[]}}
 */
export function toChartX(s, mode, origins) {
  let x = s.step;
  if (mode === "time") x = s.time;
  if (mode === "relative") {
    const t0 = origins.get(s.run_id) ?? 0;
    x = s.time.map((t) => t - t0);
  }
  return { x, value: s.value, min: s.min, max: s.max };
}
