import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { formatDuration, formatValue } from "../lib/format.js";

describe("formatValue", () => {
  test("missing values are an en dash", () => {
    assert.equal(formatValue(null), "–");
    assert.equal(formatValue(undefined), "–");
    assert.equal(formatValue(Number.NaN), "–");
  });

  test("at most four significant digits, trailing zeros dropped", () => {
    assert.equal(formatValue(0), "0");
    assert.equal(formatValue(0.123456), "0.1235");
    assert.equal(formatValue(2.5), "2.5");
    assert.equal(formatValue(1234.5), "1235"); // 1234.5 → 4 digits, rounds half up
    assert.equal(formatValue(12345), "12350");
    assert.equal(formatValue(-0.98765), "-0.9877");
    assert.equal(formatValue(1), "1");
    assert.equal(formatValue(0.001), "0.001");
  });

  test("exponent for tiny and huge magnitudes", () => {
    assert.equal(formatValue(0.000123456), "1.235e-4");
    assert.equal(formatValue(0.0002), "2e-4");
    assert.equal(formatValue(123456), "1.235e5");
    assert.equal(formatValue(-3e9), "-3e9");
    assert.equal(formatValue(1e5), "1e5");
  });

  test("infinities", () => {
    assert.equal(formatValue(Number.POSITIVE_INFINITY), "∞");
    assert.equal(formatValue(Number.NEGATIVE_INFINITY), "-∞");
  });
});

describe("formatDuration", () => {
  test("hours and zero-padded minutes", () => {
    assert.equal(formatDuration(3720), "1 h 02 m"); // 3600 + 2·60
    assert.equal(formatDuration(3600 * 25 + 59), "25 h 00 m"); // seconds are dropped
  });

  test("minutes and zero-padded seconds", () => {
    assert.equal(formatDuration(185), "3 m 05 s"); // 3·60 + 5
    assert.equal(formatDuration(60), "1 m 00 s");
  });

  test("seconds only", () => {
    assert.equal(formatDuration(42), "42 s");
    assert.equal(formatDuration(0), "0 s");
    assert.equal(formatDuration(0.4), "0 s");
  });

  test("rounds to whole seconds before splitting", () => {
    assert.equal(formatDuration(59.6), "1 m 00 s");
    assert.equal(formatDuration(3599.6), "1 h 00 m");
  });

  test("negative and missing", () => {
    assert.equal(formatDuration(-185), "-3 m 05 s");
    assert.equal(formatDuration(null), "–");
    assert.equal(formatDuration(Number.NaN), "–");
  });
});
