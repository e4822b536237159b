import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { alignSeries, mergeZoom, seriesStats } from "../lib/buckets.js";

const series = (rows) => ({
  x: rows.map((r) => r[0]),
  value: rows.map((r) => r[1]),
  min: rows.map((r) => r[2] ?? r[1]),
  max: rows.map((r) => r[3] ?? r[1]),
});

describe("mergeZoom", () => {
  // coarse: buckets at 0, 100, 200, 300, 400; fine: the raw points 150..250 every 25
  const coarse = series([
    [0, 5, 4, 6],
    [100, 4, 3, 5],
    [200, 3, 1, 9],
    [300, 2, 1.5, 2.5],
    [400, 1, 0.5, 1.5],
  ]);
  const fine = series([
    [150, 3.5],
    [175, 3.2],
    [200, 9],
    [225, 1],
    [250, 2.9],
  ]);

  test("coarse outside the window, fine inside, sorted by x", () => {
    const merged = mergeZoom(coarse, fine, 150, 250);
    assert.deepEqual(merged.x, [0, 100, 150, 175, 200, 225, 250, 300, 400]);
    assert.deepEqual(merged.value, [5, 4, 3.5, 3.2, 9, 1, 2.9, 2, 1]);
    assert.deepEqual(merged.min, [4, 3, 3.5, 3.2, 9, 1, 2.9, 1.5, 0.5]);
    assert.deepEqual(merged.max, [6, 5, 3.5, 3.2, 9, 1, 2.9, 2.5, 1.5]);
  });

  test("the window bounds are inclusive for fine and exclusive for coarse", () => {
    const merged = mergeZoom(coarse, fine, 100, 300);
    // coarse 100, 200, 300 are inside [100, 300] and dropped
    assert.deepEqual(merged.x, [0, 150, 175, 200, 225, 250, 400]);
  });

  test("fine buckets outside the window are dropped", () => {
    const merged = mergeZoom(coarse, fine, 160, 210);
    assert.deepEqual(merged.x, [0, 100, 175, 200, 300, 400]);
  });

  test("open bounds and a missing fine series", () => {
    assert.deepEqual(mergeZoom(coarse, fine, null, 160).x, [150, 200, 300, 400]);
    assert.deepEqual(mergeZoom(coarse, null, 150, 250).x, [0, 100, 300, 400]);
    assert.deepEqual(mergeZoom(series([]), series([]), 0, 1), {
      x: [],
      value: [],
      min: [],
      max: [],
    });
  });
});

describe("alignSeries", () => {
  test("union of x values, null where a series has no bucket", () => {
    const a = series([
      [0, 1],
      [2, 3, 2, 4],
      [4, 5],
    ]);
    const b = series([
      [1, 10],
      [2, 20],
      [5, 50, 40, 60],
    ]);
    const { x, series: cols } = alignSeries([a, b]);
    assert.deepEqual(x, [0, 1, 2, 4, 5]);
    assert.deepEqual(cols[0], {
      value: [1, null, 3, 5, null],
      min: [1, null, 2, 5, null],
      max: [1, null, 4, 5, null],
    });
    assert.deepEqual(cols[1], {
      value: [null, 10, 20, null, 50],
      min: [null, 10, 20, null, 40],
      max: [null, 10, 20, null, 60],
    });
  });

  test("numeric sort (not lexicographic) and unsorted inputs", () => {
    const a = series([
      [10, 1],
      [9, 2],
      [100, 3],
    ]);
    const { x, series: cols } = alignSeries([a]);
    assert.deepEqual(x, [9, 10, 100]);
    assert.deepEqual(cols[0].value, [2, 1, 3]);
  });

  test("no series, empty series", () => {
    assert.deepEqual(alignSeries([]), { x: [], series: [] });
    assert.deepEqual(alignSeries([series([])]), {
      x: [],
      series: [{ value: [], min: [], max: [] }],
    });
  });
});

describe("seriesStats", () => {
  // value is the bucket mean; min/max exact. The spike at x=20 only shows in max.
  const loss = series([
    [10, 2.0, 1.8, 2.4],
    [20, 1.5, 0.9, 7.0],
    [30, 1.2, 1.0, 1.4],
    [40, 1.1, 1.05, 1.15],
  ]);

  test("loss: best is the minimum of the bucket minima", () => {
    assert.deepEqual(seriesStats(loss, "train/loss_total"), {
      last: 1.1,
      min: 0.9,
      max: 7.0,
      best: 0.9,
      bestX: 20,
    });
  });

  test("accuracy and agreement: best is the maximum of the bucket maxima", () => {
    const acc = series([
      [1, 0.5, 0.4, 0.6],
      [2, 0.7, 0.65, 0.9],
      [3, 0.8, 0.75, 0.85],
    ]);
    assert.deepEqual(seriesStats(acc, "eval/accuracy"), {
      last: 0.8,
      min: 0.4,
      max: 0.9,
      best: 0.9,
      bestX: 2,
    });
    assert.equal(seriesStats(acc, "eval/teacher_agreement").bestX, 2);
    assert.equal(seriesStats(acc, "eval/top1_acc").best, 0.9);
    assert.equal(seriesStats(acc, "train/kl").best, 0.4);
    assert.equal(seriesStats(acc, "train/kd/output~output").best, 0.4);
    assert.equal(seriesStats(acc, "train/kd_weighted/features~features").bestX, 1);
    // no "best" for metrics that are neither a score nor a loss
    assert.equal(seriesStats(acc, "sys/step_time_ms").best, null);
    assert.equal(seriesStats(acc, "train/lr").bestX, null);
  });

  test("nulls are skipped; last is the last finite mean", () => {
    const gappy = {
      x: [1, 2, 3, 4],
      value: [3, null, 2, null],
      min: [3, null, 2, null],
      max: [3, null, 2, null],
    };
    assert.deepEqual(seriesStats(gappy, "loss"), { last: 2, min: 2, max: 3, best: 2, bestX: 3 });
  });

  test("ties keep the first bucket", () => {
    const flat = series([
      [5, 1],
      [6, 1],
    ]);
    assert.equal(seriesStats(flat, "loss").bestX, 5);
  });

  test("empty series", () => {
    assert.deepEqual(seriesStats(series([]), "loss"), {
      last: null,
      min: null,
      max: null,
      best: null,
      bestX: null,
    });
  });
});
