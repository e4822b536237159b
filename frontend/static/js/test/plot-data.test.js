import assert from "node:assert/strict";
import { test } from "node:test";
import { toPlotData } from "../lib/plot-data.js";

const a = { x: [0, 2], value: [1, 3], min: [0, 2], max: [2, 4] };
const b = { x: [1, 2], value: [-1, 5], min: [-2, 4], max: [0, 6] };

test("one shared x, then line, band top, band bottom per series; gaps null", () => {
  assert.deepEqual(toPlotData([a, b]), [
    [0, 1, 2],
    [1, null, 3],
    [2, null, 4],
    [0, null, 2],
    [null, -1, 5],
    [null, 0, 6],
    [null, -2, 4],
  ]);
});

test("smoothing changes the line only: the band stays raw", () => {
  const [, line, hi, lo] = toPlotData([{ x: [0, 1], value: [1, 3], min: [1, 3], max: [1, 3] }], {
    smooth: 0.5,
  });
  assert.deepEqual(hi, [1, 3]);
  assert.deepEqual(lo, [1, 3]);
  assert.equal(line[0], 1);
  assert.ok(Math.abs(line[1] - 7 / 3) < 1e-12); // debiased EMA, see smoothing.test.js
});

test("log: values ≤ 0 become gaps in the line and the band", () => {
  const [, , , , line, hi, lo] = toPlotData([a, b], { log: true });
  assert.deepEqual(line, [null, null, 5]);
  assert.deepEqual(hi, [null, null, 6]);
  assert.deepEqual(lo, [null, null, 4]);
});

test("no series: just an empty x", () => {
  assert.deepEqual(toPlotData([]), [[]]);
});
