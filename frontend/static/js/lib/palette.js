// Series colours: the Okabe–Ito palette (distinguishable with the common colour-vision
// deficiencies), adjusted so that no colour vanishes into the page background. Pure: no DOM.

export const OKABE_ITO = [
  "#E69F00", // orange
  "#56B4E9", // sky blue
  "#009E73", // bluish green
  "#F0E442", // yellow
  "#0072B2", // blue
  "#D55E00", // vermillion
  "#CC79A7", // reddish purple
  "#000000", // black
];

/** Replaces black on dark backgrounds (black on near-black is invisible). */
export const DARK_BLACK = "#BBBBBB";

/**
 * Replaces the yellow on light backgrounds. #F0E442 has a contrast of 1.3:1 on white: a thicker
 * line would still be hard to see, and the legend swatch and band fill would stay pale, so the
 * yellow is SWAPPED for a darker variant (2.6:1, about the contrast of the palette's orange and
 * sky blue) rather than drawn thicker. Widths stay equal for every series.
 */
export const LIGHT_YELLOW = "#B5A300";

/** Dash patterns per trip round the palette: solid first, then dashed, dotted, dash-dot… */
export const DASHES = [[], [6, 4], [2, 3], [8, 3, 2, 3], [1, 4]];

/** Line width in CSS pixels for every series. */
export const LINE_WIDTH = 1.5;

/**
 * The stroke of series `index` (0-based): colours cycle every 8 series, and from the 9th series
 * on a dash pattern tells the repeats apart ([6, 4] for series 8–15, [2, 3] for 16–23, …).
 * @param {number} index
 * @param {boolean} dark  the page has a dark background
 * @returns {{stroke: string, dash: number[], width: number}}
 */
export function seriesStyle(index, dark) {
  const i = Math.max(0, Math.trunc(index) || 0);
  let stroke = OKABE_ITO[i % OKABE_ITO.length];
  if (dark && stroke === "#000000") stroke = DARK_BLACK;
  if (!dark && stroke === "#F0E442") stroke = LIGHT_YELLOW;
  const round = Math.floor(i / OKABE_ITO.length);
  const dash = round === 0 ? [] : DASHES[1 + ((round - 1) % (DASHES.length - 1))];
  return { stroke, dash: [...dash], width: LINE_WIDTH };
}

/**
 * `#RRGGBB` with an alpha, as `rgba(r, g, b, a)` — the translucent band fill of a line colour.
 * @param {string} hex
 * @param {number} alpha 0..1
 */
export function withAlpha(hex, alpha) {
  const m = /^#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(hex);
  if (!m) return hex;
  const [r, g, b] = m.slice(1).map((h) => Number.parseInt(h, 16));
  return `rgba(${r}, ${g}, ${b}, ${alpha})`;
}
