// The one JSON endpoint the charts read. No DOM: runs in node tests with a stubbed fetch.

export const COMPARE_URL = "/api/compare";
/** The server refuses more (KDLAB_MAX_POINTS_PER_QUERY defaults to 10 000). */
export const MAX_POINTS_LIMIT = 10000;

/**
 * The URL of one /api/compare request.
 * @param {{runs: string[], keys: string[], x?: "step"|"time", maxPoints?: number,
 *   range?: {min?: number|null, max?: number|null}|null}} query
 *   `range` is in the units of `x`: steps (sent as min_step/max_step, widened to whole steps,
 *   never below 0) or Unix seconds (min_time/max_time).
 */
export function compareUrl({ runs, keys, x = "step", maxPoints = 1000, range = null }) {
  const params = new URLSearchParams();
  params.set("runs", runs.join(","));
  params.set("keys", keys.join(","));
  const points = Math.round(Number(maxPoints));
  params.set("max_points", String(Math.min(Math.max(points || 1, 1), MAX_POINTS_LIMIT)));
  params.set("x", x === "time" ? "time" : "step");
  const { min = null, max = null } = range ?? {};
  if (x === "time") {
    if (Number.isFinite(min)) params.set("min_time", String(min));
    if (Number.isFinite(max)) params.set("max_time", String(max));
  } else {
    if (Number.isFinite(min)) params.set("min_step", String(Math.max(0, Math.floor(min))));
    if (Number.isFinite(max)) params.set("max_step", String(Math.max(0, Math.ceil(max))));
  }
  return `${COMPARE_URL}?${params}`;
}

/**
 * The words of an API error body: `detail` as text, or the `msg`s of a 422's list joined by "; ".
 * @param {unknown} body
 * @returns {string|null}
 */
export function detailMessage(body) {
  const detail = body && typeof body === "object" ? body.detail : undefined;
  if (typeof detail === "string" && detail) return detail;
  if (Array.isArray(detail)) {
    const msgs = detail
      .map((d) => (d && typeof d === "object" ? d.msg : typeof d === "string" ? d : null))
      .filter((m) => typeof m === "string" && m);
    if (msgs.length) return msgs.join("; ");
  }
  return null;
}

/**
 * GET /api/compare with the page's cookies; the parsed JSON answer. A non-2xx answer throws an
 * Error whose message is the API's `detail` in words (and `status` the HTTP status).
 * @param {{runs: string[], keys: string[], x?: "step"|"time", maxPoints?: number,
 *   range?: {min?: number|null, max?: number|null}|null, signal?: AbortSignal}} query
 * @returns {Promise<{series: {run_id: string, key: string, step: number[], time: number[],
 *   value: number[], min: number[], max: number[], points?: number}[]}>}
 */
export async function fetchCompare({ runs, keys, x, maxPoints, range, signal }) {
  const response = await fetch(compareUrl({ runs, keys, x, maxPoints, range }), {
    credentials: "same-origin",
    headers: { Accept: "application/json" },
    signal,
  });
  if (!response.ok) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      // not JSON (a proxy's error page): fall back to the status line
    }
    const words = detailMessage(body) ?? `${response.status} ${response.statusText}`.trim();
    const error = new Error(words);
    error.status = response.status;
    throw error;
  }
  return response.json();
}
