// Drag-to-zoom on a uPlot: a horizontal drag selects an x range, which the chart then fetches
// finer buckets for (uPlot does not rescale by itself: setScale false); a double-click resets.

import { selectionRange } from "../lib/zoom-window.js";

/**
 * The uPlot cursor options, hook and wiring of drag-to-zoom.
 * @param {{onZoom: (xmin: number, xmax: number) => void, onReset: () => void}} handlers
 */
export function dragZoom({ onZoom, onReset }) {
  return {
    /** Spread into uPlot's `cursor` options. */
    cursor: {
      drag: { x: true, y: false, setScale: false },
      bind: { dblclick: () => null }, // ours resets the zoom (uPlot's would only rescale)
    },
    /** uPlot's `setSelect` hook: reads the selected range, clears the selection, zooms. */
    onSelect(u) {
      const range = selectionRange(u.select.left, u.select.width, (px) => u.posToVal(px, "x"));
      if (!range) return; // a click, not a drag
      u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
      onZoom(range.xmin, range.xmax);
    },
    /** Once per new uPlot: double-click on the plot resets the zoom. */
    attach(plot) {
      plot.over.addEventListener("dblclick", () => onReset());
    },
  };
}
