// Chart series → uPlot's data layout: one shared x, then per series its line, band top and band
// bottom. Pure: no DOM, no uPlot.
import { alignSeries } from "./buckets.js";
import { ema } from "./smoothing.js";

/** A log scale cannot draw 0 or negatives: they become gaps. */
const positive = (values) => values.map((v) => (v != null && v > 0 ? v : null));

/**
 * `[x, line₀, max₀, min₀, line₁, max₁, min₁, …]`: the series aligned on the union of their x
 * (gaps null), the line smoothed with a debiased EMA of weight `smooth` (the min–max band stays
 * raw), and with `log` every value ≤ 0 nulled.
 * @param {{x: number[], value: (number|null)[], min: (number|null)[], max: (number|null)[]}[]} list
 * @param {{smooth?: number, log?: boolean}} [view]
 * @returns {(number|null)[][]}
 */
export function toPlotData(list, { smooth = 0, log = false } = {}) {
  const { x, series } = alignSeries(list);
  const out = [x];
  for (const col of series) {
    let line = ema(col.value, smooth);
    let lo = col.min;
    let hi = col.max;
    if (log) {
      line = positive(line);
      lo = positive(lo);
      hi = positive(hi);
    }
    out.push(line, hi, lo);
  }
  return out;
}
