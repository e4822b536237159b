// Moving a chart's cursor from the keyboard: ←/→ one point (Shift: ten), Home/End the first or
// last visible point. Pure: no DOM.

export const CURSOR_KEYS = ["ArrowLeft", "ArrowRight", "Home", "End"];

/**
 * The data index the cursor moves to for `key`, within the visible indices [lo, hi]. With no
 * cursor yet (`idx` null), ← starts at the last point and → at the first. Null for other keys.
 * @param {string} key
 * @param {number|null|undefined} idx  the cursor's index now
 * @param {number} lo
 * @param {number} hi
 * @param {boolean} [shift]
 * @returns {number|null}
 */
export function cursorIndexForKey(key, idx, lo, hi, shift = false) {
  if (!CURSOR_KEYS.includes(key)) return null;
  const step = shift ? 10 : 1;
  let next;
  if (key === "Home") next = lo;
  else if (key === "End") next = hi;
  else if (idx == null) next = key === "ArrowLeft" ? hi : lo;
  else next = idx + (key === "ArrowLeft" ? -step : step);
  return Math.min(Math.max(next, lo), hi);
}
