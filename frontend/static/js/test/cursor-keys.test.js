import assert from "node:assert/strict";
import { test } from "node:test";
import { cursorIndexForKey } from "../lib/cursor-keys.js";

test("arrows move one point, Shift ten, within [lo, hi]", () => {
  assert.equal(cursorIndexForKey("ArrowRight", 5, 0, 20), 6);
  assert.equal(cursorIndexForKey("ArrowLeft", 5, 0, 20), 4);
  assert.equal(cursorIndexForKey("ArrowRight", 5, 0, 20, true), 15);
  assert.equal(cursorIndexForKey("ArrowRight", 15, 0, 20, true), 20);
  assert.equal(cursorIndexForKey("ArrowLeft", 3, 2, 20, true), 2);
});

test("Home and End jump to the first and last visible point", () => {
  assert.equal(cursorIndexForKey("Home", 9, 4, 12), 4);
  assert.equal(cursorIndexForKey("End", 9, 4, 12), 12);
  assert.equal(cursorIndexForKey("End", null, 4, 12), 12);
});

test("no cursor yet: ← starts at the end, → at the start", () => {
  assert.equal(cursorIndexForKey("ArrowLeft", null, 4, 12), 12);
  assert.equal(cursorIndexForKey("ArrowRight", undefined, 4, 12), 4);
});

test("a cursor outside the visible range is brought back into it", () => {
  assert.equal(cursorIndexForKey("ArrowRight", 30, 4, 12), 12);
});

test("other keys: null", () => {
  assert.equal(cursorIndexForKey("Enter", 3, 0, 9), null);
  assert.equal(cursorIndexForKey("ArrowUp", 3, 0, 9), null);
});
