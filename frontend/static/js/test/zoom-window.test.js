import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  fetchPlan,
  MAX_POINTS,
  MIN_POINTS,
  pointsForWidth,
  selectionRange,
  validZoom,
} from "../lib/zoom-window.js";

describe("pointsForWidth", () => {
  test("a bucket per CSS pixel, rounded", () => {
    assert.equal(pointsForWidth(812.4), 812);
    assert.equal(pointsForWidth(812.5), 813);
  });

  test("clamped to [MIN_POINTS, MAX_POINTS]; no width asks for the minimum", () => {
    assert.equal(pointsForWidth(10), MIN_POINTS);
    assert.equal(pointsForWidth(-60), MIN_POINTS);
    assert.equal(pointsForWidth(99999), MAX_POINTS);
    assert.equal(pointsForWidth(Number.NaN), MIN_POINTS);
    assert.equal(pointsForWidth(undefined), MIN_POINTS);
  });
});

describe("validZoom", () => {
  test("finite and increasing", () => {
    assert.deepEqual(validZoom({ xmin: 1, xmax: 2, extra: 3 }), { xmin: 1, xmax: 2 });
  });

  test("anything else is no zoom", () => {
    for (const z of [
      null,
      undefined,
      { xmin: 2, xmax: 2 },
      { xmin: 3, xmax: 2 },
      { xmin: Number.NaN, xmax: 2 },
      { xmin: 0, xmax: Number.POSITIVE_INFINITY },
      { xmin: null, xmax: 5 },
    ]) {
      assert.equal(validZoom(z), null, JSON.stringify(z));
    }
  });
});

describe("selectionRange", () => {
  const posToVal = (px) => px * 10; // 1 px = 10 steps

  test("the selected pixels' x range", () => {
    assert.deepEqual(selectionRange(20, 30, posToVal), { xmin: 200, xmax: 500 });
  });

  test("ordered even where pixels and x run opposite ways", () => {
    assert.deepEqual(
      selectionRange(20, 30, (px) => -px),
      { xmin: -50, xmax: -20 },
    );
  });

  test("a click (narrower than 3 px) is no selection", () => {
    assert.equal(selectionRange(20, 2.9, posToVal), null);
    assert.equal(selectionRange(20, 0, posToVal), null);
    assert.deepEqual(selectionRange(20, 3, posToVal), { xmin: 200, xmax: 230 });
  });
});

describe("fetchPlan", () => {
  const runs = ["a", "b"];
  const origins = new Map([["a", 1000]]);

  test("the whole range: one request for every run, no range", () => {
    for (const mode of ["step", "time", "relative"]) {
      assert.deepEqual(fetchPlan(null, mode, runs, origins), {
        x: mode === "step" ? "step" : "time",
        requests: [{ runs, range: null }],
      });
    }
  });

  test("a step or wall-clock window: one request with that range", () => {
    const win = { xmin: 10, xmax: 20 };
    assert.deepEqual(fetchPlan(win, "step", runs, origins), {
      x: "step",
      requests: [{ runs, range: { min: 10, max: 20 } }],
    });
    assert.deepEqual(fetchPlan(win, "time", runs, origins).requests, [
      { runs, range: { min: 10, max: 20 } },
    ]);
  });

  test("a relative window: a wall-clock window per run from its origin; unknown ones skipped", () => {
    const win = { xmin: 5, xmax: 60 };
    assert.deepEqual(fetchPlan(win, "relative", runs, origins), {
      x: "time",
      requests: [{ runs: ["a"], range: { min: 1005, max: 1060 } }],
    });
    const both = new Map([...origins, ["b", 2000]]);
    assert.deepEqual(fetchPlan(win, "relative", runs, both).requests, [
      { runs: ["a"], range: { min: 1005, max: 1060 } },
      { runs: ["b"], range: { min: 2005, max: 2060 } },
    ]);
  });
});
