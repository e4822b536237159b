import assert from "node:assert/strict";
import { test } from "node:test";
import { ema } from "../lib/smoothing.js";

const close = (actual, expected) => {
  assert.equal(actual.length, expected.length);
  actual.forEach((a, i) => {
    if (expected[i] === null) assert.equal(a, null, `index ${i}`);
    else assert.ok(Math.abs(a - expected[i]) < 1e-12, `index ${i}: ${a} ≠ ${expected[i]}`);
  });
};

test("hand-computed debiased EMA, w = 0.5", () => {
  // last: 0.5·1 = 0.5 → 0.5·0.5 + 0.5·3 = 1.75 → 0.5·1.75 + 0.5·4 = 2.875
  // debias by 1 − 0.5^n: 0.5/0.5 = 1, 1.75/0.75 = 7/3, 2.875/0.875 = 23/7
  close(ema([1, 3, 4], 0.5), [1, 7 / 3, 23 / 7]);
});

test("the first smoothed value is the first value (debiasing)", () => {
  close(ema([10, 10, 10], 0.9), [10, 10, 10]);
  close(ema([7], 0.99), [7]);
});

test("non-finite values pass through as null and do not advance the EMA", () => {
  // same as [1, 3, 4] with gaps: the count only counts finite values
  close(ema([null, 1, Number.NaN, 3, undefined, Number.POSITIVE_INFINITY, 4], 0.5), [
    null,
    1,
    null,
    7 / 3,
    null,
    null,
    23 / 7,
  ]);
});

test("w = 0.6 against the closed form Σ w^(n-i)(1-w)v_i / (1 - w^n)", () => {
  const values = [2, -1, 5, 0.5, 3];
  const w = 0.6;
  const expected = values.map((_, n) => {
    let sum = 0;
    for (let i = 0; i <= n; i++) sum += w ** (n - i) * (1 - w) * values[i];
    return sum / (1 - w ** (n + 1));
  });
  close(ema(values, w), expected);
});

test("w = 0 returns the input itself", () => {
  const values = [1, null, 3];
  assert.equal(ema(values, 0), values);
  assert.equal(ema(values, Number.NaN), values);
  assert.equal(ema(values, -1), values);
});

test("w ≥ 1 is clamped, never divides by zero", () => {
  const out = ema([1, 2, 3], 1);
  for (const v of out) assert.ok(Number.isFinite(v));
  // w = 0.999: the second value barely moves the debiased mean: (0.999·0.001 + 0.002)/(1 − 0.999²)
  const second = (0.999 * 0.001 * 1 + 0.001 * 2) / (1 - 0.999 ** 2);
  assert.ok(Math.abs(out[1] - second) < 1e-9);
});
