// Debiased exponential moving average, as TensorBoard's smoothing slider. Pure: no DOM.

/** Largest weight accepted; at 1 the average never moves (and the debias divides by 0). */
export const MAX_WEIGHT = 0.999;

/**
 * Smooths `values` with weight `w`:
 *   last = last * w + (1 - w) * v;  smoothed_i = last / (1 - w ** count)
 * where `count` is the number of finite values seen so far (the division removes the bias
 * towards the initial 0). Null, undefined, NaN and ±Infinity come out as null and do not advance
 * the average, so gaps from aligning several series leave each curve's smoothing unchanged.
 * `w` is clamped to [0, 0.999]; at `w = 0` the input array itself is returned.
 * @param {(number|null|undefined)[]} values
 * @param {number} w
 * @returns {(number|null)[]}
 */
export function ema(values, w) {
  const weight = Number.isFinite(w) ? Math.min(Math.max(w, 0), MAX_WEIGHT) : 0;
  if (weight === 0) return values;
  const out = new Array(values.length);
  let last = 0;
  let count = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (typeof v !== "number" || !Number.isFinite(v)) {
      out[i] = null;
      continue;
    }
    last = last * weight + (1 - weight) * v;
    count += 1;
    out[i] = last / (1 - weight ** count);
  }
  return out;
}
