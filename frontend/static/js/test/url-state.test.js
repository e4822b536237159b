import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  decodeCompareState,
  defaultCompareState,
  encodeCompareState,
  roundZoom,
} from "../lib/url-state.js";

describe("decodeCompareState", () => {
  test("empty query gives the defaults", () => {
    const defaults = {
      experiment: null,
      runs: [],
      keys: [],
      x: "step",
      log: false,
      smooth: 0,
      xmin: null,
      xmax: null,
    };
    assert.deepEqual(decodeCompareState(""), defaults);
    assert.deepEqual(decodeCompareState("?"), defaults);
    assert.deepEqual(defaultCompareState(), defaults);
  });

  test("repeated keys and every field", () => {
    const state = decodeCompareState(
      "?run=a1&run=b2&key=train/loss_total&key=eval%2Faccuracy&x=time&log=1&smooth=0.6&xmin=10&xmax=20.5",
    );
    assert.deepEqual(state, {
      experiment: null,
      runs: ["a1", "b2"],
      keys: ["train/loss_total", "eval/accuracy"],
      x: "time",
      log: true,
      smooth: 0.6,
      xmin: 10,
      xmax: 20.5,
    });
  });

  test("comma lists, mixed with repeated keys, deduplicated in order", () => {
    const state = decodeCompareState("runs=a,b,,a&run=c&keys=k1,k2&key=k1");
    assert.deepEqual(state.runs, ["c", "a", "b"]); // `run` entries first, then `runs`
    assert.deepEqual(state.keys, ["k1", "k2"]);
  });

  test("invalid values fall back to the defaults", () => {
    const state = decodeCompareState(
      "x=bogus&log=maybe&smooth=2&xmin=abc&xmax=5&key=bad%20key&key=ok&run=%3Cscript%3E",
    );
    assert.deepEqual(state, {
      experiment: null,
      runs: [],
      keys: ["ok"],
      x: "step",
      log: false,
      smooth: 0,
      xmin: null,
      xmax: null,
    });
    assert.equal(decodeCompareState("smooth=-0.1").smooth, 0);
    assert.equal(decodeCompareState("smooth=NaN").smooth, 0);
    assert.equal(decodeCompareState("smooth=").smooth, 0);
    assert.equal(decodeCompareState("smooth=0.99").smooth, 0.99);
    assert.equal(decodeCompareState("smooth=0.999").smooth, 0); // out of range, not clamped
  });

  test("zoom needs both bounds, in order", () => {
    assert.equal(decodeCompareState("xmin=5").xmin, null);
    assert.equal(decodeCompareState("xmax=5").xmax, null);
    assert.deepEqual(
      [decodeCompareState("xmin=5&xmax=5").xmin, decodeCompareState("xmin=9&xmax=5").xmin],
      [null, null],
    );
    const state = decodeCompareState("xmin=-1.5e3&xmax=1e4");
    assert.deepEqual([state.xmin, state.xmax], [-1500, 10000]);
  });

  test("log spellings and relative x", () => {
    for (const on of ["1", "true", "on", "yes", "TRUE"])
      assert.equal(decodeCompareState(`log=${on}`).log, true);
    for (const off of ["0", "false", ""]) assert.equal(decodeCompareState(`log=${off}`).log, false);
    assert.equal(decodeCompareState("x=relative").x, "relative");
  });
});

describe("encodeCompareState", () => {
  test("defaults omitted", () => {
    assert.equal(encodeCompareState(defaultCompareState()), "");
    assert.equal(encodeCompareState({}), "");
    assert.equal(encodeCompareState({ runs: ["a"], x: "step", log: false, smooth: 0 }), "run=a");
  });

  test("fixed order run…, key…, x, log, smooth, xmin, xmax — whatever the object's order", () => {
    const query = encodeCompareState({
      xmax: 200,
      xmin: 100,
      smooth: 0.6,
      log: true,
      x: "relative",
      keys: ["train/loss_total", "eval/acc"],
      runs: ["r1", "r2"],
    });
    assert.equal(
      query,
      "run=r1&run=r2&key=train/loss_total&key=eval/acc&x=relative&log=1&smooth=0.6&xmin=100&xmax=200",
    );
  });

  test("smooth rounded to two decimals", () => {
    assert.equal(encodeCompareState({ smooth: 0.6049 }), "smooth=0.6");
    assert.equal(encodeCompareState({ smooth: 0.125 }), "smooth=0.13");
    assert.equal(encodeCompareState({ smooth: 0.004 }), ""); // rounds to the default 0
    assert.equal(encodeCompareState({ smooth: 5 }), ""); // invalid: dropped
  });

  test("zoom rounded to six significant digits of the window width", () => {
    // width 11111 → step 0.1
    assert.equal(
      encodeCompareState({ xmin: 12345.678, xmax: 23456.789 }),
      "xmin=12345.7&xmax=23456.8",
    );
    // Unix seconds, width 3600.33 → step 0.01: still sub-second, not hours off
    assert.equal(
      encodeCompareState({ xmin: 1733046000.123456, xmax: 1733049600.456789 }),
      "xmin=1733046000.12&xmax=1733049600.46",
    );
    // width 2e6 → step 10
    assert.equal(encodeCompareState({ xmin: 4, xmax: 2000004 }), "xmin=0&xmax=2000000");
    assert.equal(encodeCompareState({ xmin: 5, xmax: null }), "");
    assert.equal(encodeCompareState({ xmin: 5, xmax: 1 }), "");
  });

  test("roundZoom", () => {
    assert.equal(roundZoom(0.1234567, 0.5), 0.123457); // width 0.5 → step 1e-6
    assert.equal(roundZoom(987654321, 1e9), 987650000); // width 1e9 → step 1e4
  });

  test("escaping: keys keep their slashes, other characters are encoded", () => {
    assert.equal(
      encodeCompareState({ keys: ["train/kd/output~output"] }),
      "key=train/kd/output~output",
    );
    assert.equal(encodeCompareState({ runs: ["a b&c"] }), "run=a%20b%26c");
    assert.equal(encodeCompareState({ xmin: 1e21, xmax: 3e21 }), "xmin=1e%2B21&xmax=3e%2B21");
  });
});

describe("experiment views", () => {
  test("an experiment stands for its runs in the URL", () => {
    const state = decodeCompareState("?experiment=demo-digits&key=eval/student_acc");
    assert.equal(state.experiment, "demo-digits");
    state.runs = ["r1", "r2"]; // the page lists the experiment's runs
    assert.equal(encodeCompareState(state), "experiment=demo-digits&key=eval/student_acc");
  });

  test("a blank or overlong experiment is ignored", () => {
    assert.equal(decodeCompareState("?experiment=%20").experiment, null);
    assert.equal(decodeCompareState(`?experiment=${"x".repeat(201)}`).experiment, null);
    assert.equal(encodeCompareState({ experiment: null, runs: ["a"] }), "run=a");
  });
});

describe("round trip", () => {
  const states = [
    defaultCompareState(),
    {
      experiment: null,
      runs: ["0123456789abcdef", "fedcba9876543210"],
      keys: ["train/loss_total", "train/kd/output~output"],
      x: "time",
      log: true,
      smooth: 0.95,
      xmin: 1733046000.12,
      xmax: 1733049600.46,
    },
    {
      experiment: null,
      runs: ["a"],
      keys: [],
      x: "relative",
      log: false,
      smooth: 0.01,
      xmin: 0,
      xmax: 90.5,
    },
    {
      experiment: null,
      runs: [],
      keys: ["k"],
      x: "step",
      log: false,
      smooth: 0,
      xmin: 1e21,
      xmax: 3e21,
    },
  ];
  for (const state of states) {
    test(`decode(encode(s)) = s for ${JSON.stringify(state)}`, () => {
      assert.deepEqual(decodeCompareState(encodeCompareState(state)), state);
    });
  }

  test("encode(decode(q)) normalises a hand-written query", () => {
    const query = "keys=b,a&x=step&smooth=0.50&runs=r2,r1&log=true&xmax=20&xmin=10";
    assert.equal(
      encodeCompareState(decodeCompareState(query)),
      "run=r2&run=r1&key=b&key=a&log=1&smooth=0.5&xmin=10&xmax=20",
    );
  });

  test("encoding is idempotent after rounding", () => {
    const once = encodeCompareState({ smooth: 0.333, xmin: 1 / 3, xmax: 2 / 3 });
    assert.equal(once, "smooth=0.33&xmin=0.333333&xmax=0.666667");
    assert.equal(encodeCompareState(decodeCompareState(once)), once);
  });
});
