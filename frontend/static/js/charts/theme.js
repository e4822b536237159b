// How the charts look where CSS cannot reach: the canvas reads its colours from CSS custom
// properties at draw time, and the charts are redrawn when prefers-color-scheme changes.

const STYLESHEET = new URL("../../vendor/uPlot-1.6.32.min.css", import.meta.url).href;

const darkQuery =
  typeof matchMedia === "function" ? matchMedia("(prefers-color-scheme: dark)") : null;

/** Whether the reader's system asks for a dark scheme now. */
export const isDark = () => darkQuery?.matches ?? false;

/**
 * Calls `cb` whenever prefers-color-scheme changes; returns the function that stops it.
 * @param {() => void} cb
 * @returns {() => void}
 */
export function onColorSchemeChange(cb) {
  darkQuery?.addEventListener("change", cb);
  return () => darkQuery?.removeEventListener("change", cb);
}

/** A CSS custom property of :root, read at draw time (the canvas cannot use CSS itself). */
function cssVar(name, fallback) {
  const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return value || fallback;
}

/** The axis and grid colours of the current scheme: app.css's variables, else defaults. */
export function colours() {
  const dark = isDark();
  return {
    fg: cssVar("--fg", dark ? "#e6e6e6" : "#1a1a1a"),
    muted: cssVar("--muted", dark ? "#a0a0a0" : "#595959"),
    grid: cssVar("--grid", dark ? "rgba(255, 255, 255, 0.12)" : "rgba(0, 0, 0, 0.1)"),
  };
}

/** uPlot's own stylesheet (cursor, selection, overlay positioning), once per document. */
export function ensureStylesheet() {
  if (document.querySelector('link[rel="stylesheet"][href*="uPlot-"]')) return;
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = STYLESHEET;
  document.head.append(link);
}
