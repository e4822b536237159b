// Run detail page: a chart per panel, live polling while the run is active, the log tail kept
// scrolled to the bottom, copy buttons (common.js).
//   <main data-page="run" data-run-id="…" data-live="true|false">
//     <span id="run-status" data-status="running">…</span>   (swapped by htmx over SSE)
//     <section class="chart-panel" data-chart …>…</section> …
//     <pre id="log-tail">…</pre>                              (appended by htmx over SSE)
import { mountSeriesChart } from "../charts/series-chart.js";
import "./common.js";

export const POLL_MS = 3000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

const main = document.querySelector('main[data-page="run"]');

function mountCharts() {
  const runId = main?.dataset.runId;
  return [...document.querySelectorAll("[data-chart]")].map((panel) => {
    // the panel names its runs; the page's run is the fallback
    const options = panel.dataset.runs || !runId ? {} : { runs: [runId] };
    return mountSeriesChart(panel, options);
  });
}

function statusNow() {
  return document.getElementById("run-status")?.dataset.status ?? null;
}

/** Refreshes every chart each POLL_MS until the status turns terminal, then once more. */
function poll(charts) {
  let timer = null;
  const tick = () => {
    if (!document.hidden) for (const chart of charts) chart.refresh();
  };
  const stop = () => {
    if (timer === null) return;
    clearInterval(timer);
    timer = null;
    observer.disconnect();
    document.removeEventListener("visibilitychange", onVisible);
    // the last points may have landed after the previous tick
    for (const chart of charts) chart.refresh();
  };
  const onVisible = () => {
    if (!document.hidden) tick();
  };
  // #run-status may be replaced whole (outerHTML swap) or have its attribute changed
  const observer = new MutationObserver(() => {
    if (TERMINAL.has(statusNow())) stop();
  });
  if (TERMINAL.has(statusNow())) {
    stop();
    return;
  }
  timer = setInterval(tick, POLL_MS);
  document.addEventListener("visibilitychange", onVisible);
  observer.observe(document.body, {
    subtree: true,
    childList: true,
    attributes: true,
    attributeFilter: ["data-status"],
  });
}

/** Keeps the log scrolled to its end unless the reader has scrolled up. */
function followLog() {
  let pre = null;
  let stuck = true;
  const atBottom = (el) => el.scrollHeight - el.scrollTop - el.clientHeight < 8;
  const onScroll = () => {
    stuck = atBottom(pre);
  };
  const attach = () => {
    const found = document.getElementById("log-tail");
    if (found === pre) return;
    pre?.removeEventListener("scroll", onScroll);
    pre = found;
    if (!pre) return;
    pre.addEventListener("scroll", onScroll, { passive: true });
  };
  const follow = () => {
    attach();
    if (pre && stuck) pre.scrollTop = pre.scrollHeight;
  };
  attach();
  follow();
  // htmx appends (beforeend) or replaces the element; watch its surroundings for both
  new MutationObserver(follow).observe(pre?.parentElement ?? document.body, {
    subtree: true,
    childList: true,
    characterData: true,
  });
}

if (main) {
  const charts = mountCharts();
  if (main.dataset.live === "true") poll(charts);
  followLog();
}
