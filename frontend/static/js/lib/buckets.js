// Bucketed series as /api/compare returns them (one x per bucket, its mean, exact min and max),
// merged and aligned the way the charts draw them. Pure: no DOM, no uPlot.

/**
 * @typedef {{x: number[], value: (number|null)[], min: (number|null)[], max: (number|null)[]}} Series
 */

const empty = () => ({ x: [], value: [], min: [], max: [] });

/**
 * What a chart shows after a zoom refetch: the coarse buckets outside [xmin, xmax] (so panning
 * or zooming out still has context) and the fine buckets inside it, sorted by x. A null bound is
 * open (−∞ or +∞). Coarse buckets inside the window are dropped, fine ones outside it too.
 * @param {Series} coarse
 * @param {Series} fine
 * @param {number|null} xmin
 * @param {number|null} xmax
 * @returns {Series}
 */
export function mergeZoom(coarse, fine, xmin, xmax) {
  const lo = xmin ?? Number.NEGATIVE_INFINITY;
  const hi = xmax ?? Number.POSITIVE_INFINITY;
  const rows = [];
  const take = (series, inside) => {
    if (!series) return;
    for (let i = 0; i < series.x.length; i++) {
      const x = series.x[i];
      if (x >= lo && x <= hi ? inside : !inside) {
        rows.push([x, series.value[i], series.min[i], series.max[i], inside ? 1 : 0]);
      }
    }
  };
  take(coarse, false);
  take(fine, true);
  // by x; at an equal x (impossible with proper inputs) coarse first, each in its own order
  rows.sort((a, b) => a[0] - b[0] || a[4] - b[4]);
  const out = empty();
  for (const [x, value, min, max] of rows) {
    out.x.push(x);
    out.value.push(value);
    out.min.push(min);
    out.max.push(max);
  }
  return out;
}

/**
 * Joins series with different x arrays onto one sorted union of their x values (uPlot's data
 * layout): per series `value`/`min`/`max` arrays as long as `x`, null where the series has no
 * bucket. A series repeating an x keeps its last bucket there.
 * @param {Series[]} seriesList
 * @returns {{x: number[], series: {value: (number|null)[], min: (number|null)[], max: (number|null)[]}[]}}
 */
export function alignSeries(seriesList) {
  const all = new Set();
  for (const s of seriesList) for (const x of s.x) if (Number.isFinite(x)) all.add(x);
  const x = [...all].sort((a, b) => a - b);
  const index = new Map(x.map((v, i) => [v, i]));
  const series = seriesList.map((s) => {
    const value = new Array(x.length).fill(null);
    const min = new Array(x.length).fill(null);
    const max = new Array(x.length).fill(null);
    for (let i = 0; i < s.x.length; i++) {
      const j = index.get(s.x[i]);
      if (j === undefined) continue;
      value[j] = s.value[i] ?? null;
      min[j] = s.min[i] ?? null;
      max[j] = s.max[i] ?? null;
    }
    return { value, min, max };
  });
  return { x, series };
}

/** Keys where higher is better (accuracy, agreement). */
export const HIGHER_IS_BETTER = /acc|agreement/i;
/** Keys where lower is better (losses, KL, KD terms); other metrics (lr, grad norm, step time)
 * have no "best", so the legend shows none for them. */
export const LOWER_IS_BETTER = /loss|kl|(^|\/)kd(_weighted)?\//i;

const finite = (v) => typeof v === "number" && Number.isFinite(v);

/**
 * Legend figures of one series: `last` bucket mean, overall `min`/`max` (exact: taken from the
 * buckets' min/max arrays), `best` (the max for accuracy-like keys, the min for loss-like ones,
 * null for the rest) and `bestX`, the x of the (first) bucket holding it. Nulls are skipped;
 * all null when empty.
 * @param {Series} series
 * @param {string} key
 * @returns {{last: number|null, min: number|null, max: number|null, best: number|null, bestX: number|null}}
 */
export function seriesStats(series, key) {
  let last = null;
  let min = null;
  let max = null;
  let minX = null;
  let maxX = null;
  for (let i = 0; i < series.x.length; i++) {
    if (finite(series.value[i])) last = series.value[i];
    const lo = series.min[i];
    const hi = series.max[i];
    if (finite(lo) && (min === null || lo < min)) {
      min = lo;
      minX = series.x[i];
    }
    if (finite(hi) && (max === null || hi > max)) {
      max = hi;
      maxX = series.x[i];
    }
  }
  if (HIGHER_IS_BETTER.test(key)) return { last, min, max, best: max, bestX: maxX };
  if (LOWER_IS_BETTER.test(key)) return { last, min, max, best: min, bestX: minX };
  return { last, min, max, best: null, bestX: null };
}
