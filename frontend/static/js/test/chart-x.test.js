import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { formatX, toChartX, widenOrigins } from "../lib/chart-x.js";

const api = (run_id, step, time) => ({
  run_id,
  key: "k",
  step,
  time,
  value: step.map((s) => s / 10),
  min: step.map((s) => s / 10 - 1),
  max: step.map((s) => s / 10 + 1),
});

describe("formatX", () => {
  test("steps are whole numbers", () => {
    assert.equal(formatX(41.6, "step"), "42");
  });

  test("relative time is a duration", () => {
    assert.equal(formatX(125, "relative"), "2 m 05 s");
  });

  test("wall-clock time is a local date and time", () => {
    const text = formatX(Date.UTC(2024, 10, 30, 21, 42, 19) / 1000, "time");
    assert.match(text, /\d{2}:\d{2}/);
    assert.notEqual(text, "–");
  });

  test("no value is an en dash", () => {
    for (const v of [null, undefined, Number.NaN, Number.POSITIVE_INFINITY]) {
      assert.equal(formatX(v, "step"), "–");
    }
  });
});

describe("widenOrigins", () => {
  test("each run's earliest time; only ever moves earlier", () => {
    const origins = new Map();
    widenOrigins(origins, [api("a", [1, 2], [105, 110]), api("b", [], [])]);
    assert.deepEqual([...origins], [["a", 105]]);
    widenOrigins(origins, [api("a", [0, 1], [100, 105]), api("b", [3], [300])]);
    assert.deepEqual(
      [...origins],
      [
        ["a", 100],
        ["b", 300],
      ],
    );
    widenOrigins(origins, [api("a", [5], [200])]);
    assert.equal(origins.get("a"), 100);
  });
});

describe("toChartX", () => {
  const s = api("a", [0, 10], [100, 130]);
  const origins = new Map([["a", 90]]);

  test("step and time use the API's arrays; values pass through", () => {
    assert.deepEqual(toChartX(s, "step", origins), {
      x: [0, 10],
      value: s.value,
      min: s.min,
      max: s.max,
    });
    assert.deepEqual(toChartX(s, "time", origins).x, [100, 130]);
  });

  test("relative subtracts the run's origin (0 when unknown)", () => {
    assert.deepEqual(toChartX(s, "relative", origins).x, [10, 40]);
    assert.deepEqual(toChartX(s, "relative", new Map()).x, [100, 130]);
  });
});
