// What a chart draws: the /api/compare buckets of the whole range, and once zoomed the finer
// buckets of the window merged into them; each load aborts the previous one and an answer that
// arrives after a newer load started is dropped.

import { mergeZoom } from "../lib/buckets.js";
import { toChartX, widenOrigins } from "../lib/chart-x.js";
import { fetchPlan } from "../lib/zoom-window.js";

const emptyApiSeries = (run, key) => ({
  run_id: run,
  key,
  step: [],
  time: [],
  value: [],
  min: [],
  max: [],
  points: 0,
});

/**
 * @param {{runs: string[], keys: string[], fetcher: Function}} options  `fetcher` is
 *   charts/api.js's fetchCompare or a stand-in with its signature
 */
export function createSeriesData({ runs, keys, fetcher }) {
  // one entry per (run, key), runs outer and keys inner: the order /api/compare answers in
  const entries = runs.flatMap((run) => keys.map((key) => ({ run, key })));
  const entryIndex = new Map(entries.map((e, i) => [`${e.run}\u0000${e.key}`, i]));
  let coarseRaw = null; // API series of the whole range (the last full fetch)
  let fineRaw = null; // API series of the zoom window
  const origins = new Map(); // run → first time seen, for x = relative
  let controller = null;
  let generation = 0;

  /** API series in entry order (missing ones empty), converted to the chart's x. */
  function toChart(apiSeries, mode) {
    const byEntry = entries.map((e) => emptyApiSeries(e.run, e.key));
    for (const s of apiSeries ?? []) {
      const i = entryIndex.get(`${s.run_id}\u0000${s.key}`);
      if (i !== undefined) byEntry[i] = s;
    }
    return byEntry.map((s) => toChartX(s, mode, origins));
  }

  async function request(win, mode, maxPoints, signal) {
    const { x, requests } = fetchPlan(win, mode, runs, origins);
    const points = maxPoints();
    const parts = await Promise.all(
      requests.map(async ({ runs: asked, range }) => {
        const answer = await fetcher({ runs: asked, keys, x, maxPoints: points, range, signal });
        return answer.series ?? [];
      }),
    );
    return parts.flat();
  }

  return {
    entries,
    /** Whether the whole range has been fetched (there is something to draw). */
    get loaded() {
      return coarseRaw !== null;
    },
    /**
     * Fetches window `win` (null: the whole range; a zoom fetches the whole range first when it
     * has none yet). Resolves to the window's API series, or null when a newer load or `stop`
     * superseded it; rejects with the fetch's error otherwise.
     * @param {{xmin: number, xmax: number}|null} win
     * @param {"step"|"time"|"relative"} mode
     * @param {() => number} maxPoints  asked once per request (the whole range's, the window's)
     */
    async load(win, mode, maxPoints) {
      controller?.abort();
      const own = new AbortController();
      controller = own;
      const gen = ++generation;
      try {
        if (win && !coarseRaw) {
          // a zoom needs the whole range first: context outside it, and x = relative's origins
          const full = await request(null, mode, maxPoints, own.signal);
          if (gen !== generation) return null;
          widenOrigins(origins, full);
          coarseRaw = full;
        }
        const answer = await request(win, mode, maxPoints, own.signal);
        if (gen !== generation) return null;
        if (win) fineRaw = answer;
        else {
          widenOrigins(origins, answer);
          coarseRaw = answer;
        }
        return answer;
      } catch (error) {
        if (error?.name === "AbortError" || gen !== generation) return null;
        throw error;
      } finally {
        if (gen === generation) controller = null;
      }
    },
    /**
     * The chart series in entry order: the whole range's buckets, and inside `zoom` the zoom
     * window's finer ones once they have arrived.
     * @param {{xmin: number, xmax: number}|null} zoom
     * @param {"step"|"time"|"relative"} mode
     */
    series(zoom, mode) {
      const coarse = toChart(coarseRaw, mode);
      if (!zoom || !fineRaw) return coarse;
      const fine = toChart(fineRaw, mode);
      return coarse.map((s, i) => mergeZoom(s, fine[i], zoom.xmin, zoom.xmax));
    },
    /** Drops the zoom window's buckets (the zoom changed or was reset). */
    dropZoom() {
      fineRaw = null;
    },
    /** Forgets everything fetched (the x mode changed: other units, other origins). */
    clear() {
      coarseRaw = null;
      fineRaw = null;
      origins.clear();
    },
    /** Aborts the load in flight; its promise resolves to null. */
    stop() {
      generation++;
      controller?.abort();
      controller = null;
    },
  };
}
