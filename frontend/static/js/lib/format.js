// Number and duration formatting for chart legends and notes. Pure: no DOM.

const DASH = "–"; // en dash: "no value"

/**
 * A metric value in at most 4 significant digits: 0.1235, 1235, 12350; an exponent for tiny or
 * huge magnitudes (1.235e5, 1.2e-4); "–" for null/undefined/NaN; "∞"/"-∞" for infinities.
 * @param {number|null|undefined} v
 * @returns {string}
 */
export function formatValue(v) {
  if (v == null || Number.isNaN(v)) return DASH;
  if (v === Number.POSITIVE_INFINITY) return "∞";
  if (v === Number.NEGATIVE_INFINITY) return "-∞";
  if (v === 0) return "0";
  const abs = Math.abs(v);
  if (abs >= 1e5 || abs < 1e-3) {
    // "1.2350e+5" → "1.235e5"; "1.200e-4" → "1.2e-4"
    const [mantissa, exponent] = v.toExponential(3).split("e");
    return `${trimZeros(mantissa)}e${Number(exponent)}`;
  }
  return String(Number(v.toPrecision(4)));
}

function trimZeros(text) {
  return text.includes(".") ? text.replace(/\.?0+$/, "") : text;
}

const pad2 = (n) => String(n).padStart(2, "0");

/**
 * Seconds as "1 h 02 m", "3 m 05 s" or "42 s" (rounded to whole seconds first, so 3599.6 s is
 * "1 h 00 m"); "–" for null/NaN. Negative durations get a leading "-".
 * @param {number|null|undefined} seconds
 * @returns {string}
 */
export function formatDuration(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return DASH;
  const sign = seconds < 0 ? "-" : "";
  const total = Math.round(Math.abs(seconds));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  if (h > 0) return `${sign}${h} h ${pad2(m)} m`;
  if (m > 0) return `${sign}${m} m ${pad2(s)} s`;
  return `${sign}${s} s`;
}
