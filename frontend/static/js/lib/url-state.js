// The compare view's state ⇄ the URL query, so a reload or a shared link shows the same view.
// Pure: no DOM (takes and returns strings).
//
//   ?run=a&run=b&key=train/loss_total&key=eval/acc&x=time&log=1&smooth=0.6&xmin=100&xmax=250
//   ?experiment=demo-digits&key=eval/student_acc   (every run of an experiment, as it grows)
//
// Flat readable keys in a fixed order, defaults omitted, floats rounded. Decoding also accepts
// comma lists (`runs=a,b`, `keys=k1,k2`, as /api/compare takes them) and drops invalid values.

export const X_MODES = ["step", "time", "relative"];
export const MAX_SMOOTH = 0.99;
/** Experiment names: 1–200 characters (worker/config.py ExperimentName). */
const MAX_EXPERIMENT = 200;

/** Metric keys as the backend stores them (backend/schemas/metrics.py KEY_PATTERN). */
const KEY_PATTERN = /^[A-Za-z0-9_./~-]{1,250}$/;
/** Run ids are 16 hex digits today; accept any short id-like token. */
const RUN_PATTERN = /^[A-Za-z0-9_.:-]{1,64}$/;

/**
 * @typedef {{experiment: string|null, runs: string[], keys: string[],
 *   x: "step"|"time"|"relative", log: boolean, smooth: number, xmin: number|null,
 *   xmax: number|null}} CompareState
 */

/** @returns {CompareState} */
export function defaultCompareState() {
  return {
    experiment: null,
    runs: [],
    keys: [],
    x: "step",
    log: false,
    smooth: 0,
    xmin: null,
    xmax: null,
  };
}

function list(params, single, plural, pattern) {
  const items = [
    ...params.getAll(single),
    ...params.getAll(plural).flatMap((value) => value.split(",")),
  ];
  const out = [];
  for (const raw of items) {
    const item = raw.trim();
    if (item && pattern.test(item) && !out.includes(item)) out.push(item);
  }
  return out;
}

function number(text) {
  if (text == null || text.trim() === "") return null;
  const n = Number(text);
  return Number.isFinite(n) ? n : null;
}

/** Smoothing weight rounded to 2 decimals; null when not a weight in [0, 0.99]. */
function smoothOf(value) {
  if (!Number.isFinite(value) || value < 0 || value > MAX_SMOOTH) return null;
  return Math.round(value * 100) / 100;
}

/**
 * @param {string} search  `location.search`, with or without the leading "?"
 * @returns {CompareState}
 */
export function decodeCompareState(search) {
  const params = new URLSearchParams(search ?? "");
  const state = defaultCompareState();
  const experiment = (params.get("experiment") ?? "").trim();
  if (experiment && experiment.length <= MAX_EXPERIMENT) state.experiment = experiment;
  state.runs = list(params, "run", "runs", RUN_PATTERN);
  state.keys = list(params, "key", "keys", KEY_PATTERN);
  const x = params.get("x");
  if (X_MODES.includes(x)) state.x = x;
  state.log = ["1", "true", "yes", "on"].includes((params.get("log") ?? "").toLowerCase());
  state.smooth = smoothOf(number(params.get("smooth"))) ?? 0;
  const xmin = number(params.get("xmin"));
  const xmax = number(params.get("xmax"));
  if (xmin !== null && xmax !== null && xmin < xmax) {
    state.xmin = xmin;
    state.xmax = xmax;
  }
  return state;
}

/**
 * Rounds a zoom bound to 6 significant digits *of the zoom's width* (the step is
 * 10^(floor(log10(width)) − 5)). Six significant digits of the bound itself would move a
 * wall-clock zoom (Unix seconds ≈ 1.7e9) by hours; relative to the width the error stays below
 * 1/10 000 of the window whatever the axis, and a bound never collapses onto the other.
 * @param {number} value
 * @param {number} width  xmax − xmin, > 0
 */
export function roundZoom(value, width) {
  const exponent = Math.floor(Math.log10(width)) - 5;
  if (exponent >= 0) {
    const step = 10 ** exponent;
    return Math.round(value / step) * step;
  }
  // divide by an exact power of ten rather than multiply by an inexact 10^-k
  const scale = 10 ** -exponent;
  return Math.round(value * scale) / scale;
}

// encodeURIComponent, but "/" stays readable in `key=train/loss_total` (legal in a query)
const enc = (text) => encodeURIComponent(text).replace(/%2F/gi, "/");

/**
 * The query string (no leading "?"; "" for the default view) in the fixed order
 * experiment or run…, key…, x, log, smooth, xmin, xmax — defaults omitted. An experiment
 * stands for its runs (the server lists them), so a link keeps showing runs added later.
 * @param {Partial<CompareState>} state
 * @returns {string}
 */
export function encodeCompareState(state) {
  const parts = [];
  if (state.experiment) parts.push(`experiment=${enc(state.experiment)}`);
  else for (const run of state.runs ?? []) parts.push(`run=${enc(run)}`);
  for (const key of state.keys ?? []) parts.push(`key=${enc(key)}`);
  if (X_MODES.includes(state.x) && state.x !== "step") parts.push(`x=${state.x}`);
  if (state.log) parts.push("log=1");
  const smooth = smoothOf(state.smooth);
  if (smooth) parts.push(`smooth=${smooth}`);
  const { xmin, xmax } = state;
  if (Number.isFinite(xmin) && Number.isFinite(xmax) && xmin < xmax) {
    const width = xmax - xmin;
    // enc: an exponent's "+" would read back as a space
    parts.push(`xmin=${enc(String(roundZoom(xmin, width)))}`);
    parts.push(`xmax=${enc(String(roundZoom(xmax, width)))}`);
  }
  return parts.join("&");
}
