import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { OKABE_ITO, seriesStyle, withAlpha } from "../lib/palette.js";

describe("seriesStyle", () => {
  test("the eight Okabe–Ito colours in order, solid", () => {
    assert.deepEqual(OKABE_ITO, [
      "#E69F00",
      "#56B4E9",
      "#009E73",
      "#F0E442",
      "#0072B2",
      "#D55E00",
      "#CC79A7",
      "#000000",
    ]);
    const dark = [0, 1, 2, 3, 4, 5, 6].map((i) => seriesStyle(i, true).stroke);
    assert.deepEqual(dark, [
      "#E69F00",
      "#56B4E9",
      "#009E73",
      "#F0E442",
      "#0072B2",
      "#D55E00",
      "#CC79A7",
    ]);
    for (let i = 0; i < 8; i++) assert.deepEqual(seriesStyle(i, false).dash, []);
  });

  test("no black on dark backgrounds", () => {
    assert.equal(seriesStyle(7, true).stroke, "#BBBBBB");
    assert.equal(seriesStyle(7, false).stroke, "#000000");
  });

  test("no pale yellow on light backgrounds: a darker variant, same width", () => {
    const light = seriesStyle(3, false);
    const dark = seriesStyle(3, true);
    assert.notEqual(light.stroke, "#F0E442");
    assert.equal(dark.stroke, "#F0E442");
    assert.equal(light.width, seriesStyle(0, false).width);
    // relative luminance well below the original's 0.74 (WCAG formula, computed by hand: 0.36)
    const lum = (hex) => {
      const c = [1, 3, 5].map((i) => Number.parseInt(hex.slice(i, i + 2), 16) / 255);
      const lin = c.map((v) => (v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4));
      return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2];
    };
    assert.ok(lum(light.stroke) < 0.4, `luminance ${lum(light.stroke)}`);
  });

  test("past eight series the colours repeat with a dash pattern", () => {
    assert.equal(seriesStyle(8, false).stroke, "#E69F00");
    assert.deepEqual(seriesStyle(8, false).dash, [6, 4]);
    assert.deepEqual(seriesStyle(15, true).dash, [6, 4]);
    assert.equal(seriesStyle(15, true).stroke, "#BBBBBB");
    assert.deepEqual(seriesStyle(16, false).dash, [2, 3]);
    assert.equal(seriesStyle(17, false).stroke, "#56B4E9");
  });

  test("returns fresh dash arrays (callers may keep them)", () => {
    const a = seriesStyle(8, false);
    a.dash.push(99);
    assert.deepEqual(seriesStyle(8, false).dash, [6, 4]);
  });
});

test("withAlpha", () => {
  assert.equal(withAlpha("#E69F00", 0.2), "rgba(230, 159, 0, 0.2)");
  assert.equal(withAlpha("#56b4e9", 1), "rgba(86, 180, 233, 1)");
  assert.equal(withAlpha("red", 0.5), "red");
});
