import assert from "node:assert/strict";
import { afterEach, describe, test } from "node:test";
import { compareUrl, detailMessage, fetchCompare } from "../charts/api.js";

const query = (url) => Object.fromEntries(new URL(url, "http://x").searchParams);

describe("compareUrl", () => {
  test("comma lists, max_points, x", () => {
    const url = compareUrl({
      runs: ["a", "b"],
      keys: ["train/loss_total", "eval/acc"],
      maxPoints: 640,
    });
    assert.ok(url.startsWith("/api/compare?"));
    assert.deepEqual(query(url), {
      runs: "a,b",
      keys: "train/loss_total,eval/acc",
      max_points: "640",
      x: "step",
    });
  });

  test("step range widened to whole steps, never negative", () => {
    const q = query(compareUrl({ runs: ["a"], keys: ["k"], range: { min: -3.2, max: 99.1 } }));
    assert.equal(q.min_step, "0");
    assert.equal(q.max_step, "100");
    assert.equal(q.min_time, undefined);
    const q2 = query(compareUrl({ runs: ["a"], keys: ["k"], range: { min: 10.7, max: 20 } }));
    assert.deepEqual([q2.min_step, q2.max_step], ["10", "20"]);
  });

  test("time range in seconds, as given", () => {
    const q = query(
      compareUrl({
        runs: ["a"],
        keys: ["k"],
        x: "time",
        range: { min: 1733046000.5, max: 1733046100.25 },
      }),
    );
    assert.deepEqual(
      [q.x, q.min_time, q.max_time, q.min_step],
      ["time", "1733046000.5", "1733046100.25", undefined],
    );
  });

  test("max_points clamped to 1..10000", () => {
    assert.equal(
      query(compareUrl({ runs: ["a"], keys: ["k"], maxPoints: 50000 })).max_points,
      "10000",
    );
    assert.equal(query(compareUrl({ runs: ["a"], keys: ["k"], maxPoints: 0 })).max_points, "1");
  });
});

describe("detailMessage", () => {
  test("string detail, 422 list, anything else", () => {
    assert.equal(detailMessage({ detail: "run not found" }), "run not found");
    assert.equal(
      detailMessage({
        detail: [
          { loc: ["query", "max_points"], msg: "must be at most 10000" },
          { loc: ["query", "keys"], msg: "keys must name at least one item" },
        ],
      }),
      "must be at most 10000; keys must name at least one item",
    );
    assert.equal(detailMessage({ detail: [] }), null);
    assert.equal(detailMessage(null), null);
    assert.equal(detailMessage("oops"), null);
  });
});

describe("fetchCompare", () => {
  const realFetch = globalThis.fetch;
  afterEach(() => {
    globalThis.fetch = realFetch;
  });

  test("sends cookies and the signal, returns the JSON", async () => {
    let seen;
    globalThis.fetch = async (url, init) => {
      seen = { url, init };
      return new Response(JSON.stringify({ series: [] }), { status: 200 });
    };
    const controller = new AbortController();
    const body = await fetchCompare({
      runs: ["a"],
      keys: ["k"],
      maxPoints: 100,
      signal: controller.signal,
    });
    assert.deepEqual(body, { series: [] });
    assert.equal(seen.init.credentials, "same-origin");
    assert.equal(seen.init.signal, controller.signal);
    assert.equal(query(seen.url).max_points, "100");
  });

  test("a 422 throws the joined messages, with the status", async () => {
    globalThis.fetch = async () =>
      new Response(
        JSON.stringify({
          detail: [{ loc: ["query", "x"], msg: "Input should be 'step' or 'time'" }],
        }),
        {
          status: 422,
        },
      );
    await assert.rejects(fetchCompare({ runs: ["a"], keys: ["k"] }), (error) => {
      assert.equal(error.message, "Input should be 'step' or 'time'");
      assert.equal(error.status, 422);
      return true;
    });
  });

  test("a 404 with a string detail; a non-JSON 502", async () => {
    globalThis.fetch = async () =>
      new Response(JSON.stringify({ detail: "run zz not found" }), { status: 404 });
    await assert.rejects(fetchCompare({ runs: ["zz"], keys: ["k"] }), {
      message: "run zz not found",
      status: 404,
    });
    globalThis.fetch = async () =>
      new Response("<html>bad gateway</html>", { status: 502, statusText: "Bad Gateway" });
    await assert.rejects(fetchCompare({ runs: ["a"], keys: ["k"] }), {
      message: "502 Bad Gateway",
    });
  });
});
