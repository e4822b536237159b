// The uPlot options of a chart: per curve a line and its two band edges (Okabe–Ito colours, dash
// patterns past 8 curves, palette.js), the min–max band fills, and the axes, whose colours are
// read from CSS variables at draw time (theme.js).

import { X_LABELS } from "../lib/chart-x.js";
import { formatDuration, formatValue } from "../lib/format.js";
import { seriesStyle, withAlpha } from "../lib/palette.js";
import { colours } from "./theme.js";

/** Tick spacings for x = relative (seconds): whole seconds, minutes, hours, days. */
const DURATION_INCRS = [
  1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800,
  604800,
];

/** Tick spacings for x = step: whole steps only (1, 2, 5 × 10ᵏ), never 27.5. */
const STEP_INCRS = Array.from({ length: 13 }, (_, k) => [1, 2, 5].map((m) => m * 10 ** k)).flat();

/** uPlot passes null for ticks it leaves unlabelled (a log axis's minor ticks). */
const tick = (format) => (v) => (v == null ? "" : format(v));

/** uPlot styles and moves the dot under the cursor; lines get one, band edges none. */
function cursorPoint(_u, si) {
  return si % 3 === 1 ? document.createElement("div") : null;
}

/**
 * @param {{width: number, height: number, names: string[], dark: boolean,
 *   view: {x: "step"|"time"|"relative", log: boolean, smooth: number},
 *   cursor: object, hooks: object}} options  `names`: the curves' labels in series order;
 *   `cursor` is merged into uPlot's cursor options (drag-to-zoom), `hooks` are uPlot's
 * @returns {object} uPlot options, for data laid out as lib/plot-data.js's toPlotData does
 */
export function plotOptions({ width, height, names, dark, view, cursor, hooks }) {
  const axisStroke = () => colours().muted;
  const gridStroke = () => colours().grid;
  const series = [{ label: X_LABELS[view.x] }];
  const bands = [];
  names.forEach((name, i) => {
    const style = seriesStyle(i, dark);
    // Band edges: width 0 (the fill alone shows the bucket's range) — except while smoothing,
    // when they are drawn thin and faint: the raw curve behind the smoothed one, so a
    // one-step spike stays visible even where a bucket holds a single point (min = max).
    const edge = (which) => ({
      label: `${name} ${which}`,
      stroke: withAlpha(style.stroke, dark ? 0.45 : 0.35),
      width: view.smooth > 0 ? 1 : 0,
      points: { show: false },
      spanGaps: true,
    });
    series.push(
      { label: name, stroke: style.stroke, width: style.width, dash: style.dash, spanGaps: true },
      edge("max"),
      edge("min"),
    );
    const top = 2 + 3 * i;
    bands.push({ series: [top, top + 1], fill: withAlpha(style.stroke, dark ? 0.28 : 0.2) });
  });
  const axis = {
    stroke: axisStroke,
    grid: { stroke: gridStroke, width: 1 },
    ticks: { stroke: gridStroke, width: 1 },
  };
  return {
    width,
    height,
    series,
    bands,
    legend: { show: false },
    scales: {
      x: { time: view.x === "time" },
      y: view.log ? { distr: 3 } : {},
    },
    axes: [
      {
        ...axis,
        label: X_LABELS[view.x],
        labelSize: 20,
        labelFont: "12px system-ui, sans-serif",
        ...(view.x === "relative"
          ? { incrs: DURATION_INCRS, values: (_u, splits) => splits.map(tick(formatDuration)) }
          : {}),
        ...(view.x === "step" ? { incrs: STEP_INCRS } : {}),
      },
      { ...axis, size: 56, values: (_u, splits) => splits.map(tick(formatValue)) },
    ],
    cursor: {
      ...cursor,
      points: { show: cursorPoint },
      // the cursor's per-series index skips the gaps of alignment (null here), so a run logged
      // every other step still reads a value between its points
      hover: { skip: [null, undefined] },
    },
    hooks,
  };
}
