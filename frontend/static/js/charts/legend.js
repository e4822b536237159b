// A chart's legend as an HTML table (readable by screen readers, unlike the canvas): one row per
// curve with its swatch, last/min/max/best, the x of the best, and the value under the cursor.
// Styles through the CSSOM only: the CSP forbids style="" attributes.

import { seriesStats } from "../lib/buckets.js";
import { formatValue } from "../lib/format.js";
import { seriesStyle } from "../lib/palette.js";

/**
 * The legend of one chart, drawn into `container`. Built on the first `update` (and again after
 * `reset`, e.g. when the colour scheme or the x mode changed).
 * @param {HTMLElement} container
 * @param {{entries: {run: string, key: string}[], runs: string[], keys: string[],
 *   runNames: Record<string, string>, xLabel: () => string, formatX: (v: number) => string,
 *   dark: () => boolean}} options  `entries` in the chart's series order
 */
export function createLegend(container, { entries, runs, keys, runNames, xLabel, formatX, dark }) {
  let cells = [];
  let cursorHeader = null;

  function build() {
    const isDark = dark();
    // the row header names the curve: the run, the metric, or both when both vary
    const showRun = runs.length > 1 || keys.length <= 1;
    const showKey = keys.length > 1;
    const table = document.createElement("table");
    table.className = "chart-legend-table";
    const head = table.createTHead().insertRow();
    const th = (text) => {
      const cell = document.createElement("th");
      cell.scope = "col";
      cell.textContent = text;
      head.append(cell);
      return cell;
    };
    if (showRun) th("Run");
    if (showKey) th("Metric");
    th("Last");
    th("Min");
    th("Max");
    th("Best");
    th(`Best at (${xLabel()})`);
    cursorHeader = th("Cursor");
    const body = table.createTBody();
    cells = entries.map((entry, i) => {
      const row = body.insertRow();
      const style = seriesStyle(i, isDark);
      const swatch = document.createElement("span");
      swatch.className = "chart-swatch";
      swatch.setAttribute("aria-hidden", "true");
      swatch.style.display = "inline-block";
      swatch.style.width = "1.6em";
      swatch.style.marginRight = "0.4em";
      swatch.style.verticalAlign = "middle";
      swatch.style.borderTop = `3px ${style.dash.length ? "dashed" : "solid"} ${style.stroke}`;
      const name = document.createElement("th");
      name.scope = "row";
      name.append(swatch, showRun ? (runNames[entry.run] ?? entry.run) : entry.key);
      row.append(name);
      if (showRun && showKey) row.insertCell().textContent = entry.key;
      const cell = () => {
        const td = row.insertCell();
        td.className = "num";
        return td;
      };
      return {
        tr: row,
        last: cell(),
        min: cell(),
        max: cell(),
        best: cell(),
        bestX: cell(),
        cursor: cell(),
      };
    });
    container.style.overflowX = "auto"; // a narrow panel scrolls the table, not the page
    container.replaceChildren(table);
  }

  /** The cursor column: each curve's value at uPlot's cursor, "–" with no cursor. */
  function cursor(u) {
    const idx = u.cursor.idx;
    if (cursorHeader) {
      cursorHeader.textContent =
        idx == null ? "Cursor" : `At ${xLabel()} ${formatX(u.data[0][idx])}`;
    }
    cells.forEach((row, i) => {
      const si = 1 + 3 * i; // the line of entry i (its band edges follow it)
      const j = idx == null ? null : (u.cursor.idxs?.[si] ?? idx);
      row.cursor.textContent = j == null ? "–" : formatValue(u.data[si][j]);
    });
  }

  return {
    /**
     * Writes each curve's figures; `shown` holds the chart series in entry order.
     * @param {{x: number[], value: unknown[], min: unknown[], max: unknown[]}[]} shown
     * @param {object|null} plot  the uPlot, for the cursor column (null before the first draw)
     */
    update(shown, plot) {
      if (cells.length === 0) build();
      shown.forEach((series, i) => {
        const row = cells[i];
        if (!row) return;
        const stats = seriesStats(series, entries[i].key);
        row.last.textContent = formatValue(stats.last);
        row.min.textContent = formatValue(stats.min);
        row.max.textContent = formatValue(stats.max);
        row.best.textContent = formatValue(stats.best);
        row.bestX.textContent = stats.bestX === null ? "–" : formatX(stats.bestX);
        // a run without this metric (the baseline has no teacher accuracy) gets no row
        row.tr.hidden = stats.min === null && stats.last === null;
      });
      if (plot) cursor(plot);
    },
    cursor,
    /** The next `update` builds the table anew (swatch colours, column titles). */
    reset() {
      cells = [];
    },
  };
}
