// The compare page's config diff: which fields differ between the runs' configs. Pure: no DOM.

/** Top-level config sections, in the order the diff shows them; the rest go to "other". */
export const GROUP_ORDER = ["dataset", "student", "teacher", "distill", "train"];
export const OTHER_GROUP = "other";
/** Top-level fields left out: they always differ (name) or the page shows them elsewhere. */
export const IGNORED = new Set(["name", "experiment"]);

const isPlainObject = (v) =>
  v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof Date);

/**
 * Leaves of a config as dotted paths: `{"train.optimizer.lr": 0.001, "student.params.hidden":
 * "[32]"}`. Arrays become their JSON text (compared and shown whole); null is a leaf; an empty
 * object has no leaves.
 * @param {object} obj
 * @returns {Record<string, string|number|boolean|null>}
 */
export function flattenConfig(obj) {
  const out = {};
  const walk = (node, prefix) => {
    for (const [key, value] of Object.entries(node)) {
      const path = prefix ? `${prefix}.${key}` : key;
      if (isPlainObject(value)) walk(value, path);
      else if (Array.isArray(value)) out[path] = JSON.stringify(value);
      else if (value !== undefined) out[path] = value;
    }
  };
  if (isPlainObject(obj)) walk(obj, "");
  return out;
}

/**
 * Only the config paths whose values differ between runs, grouped by their top-level key in the
 * order dataset, student, teacher, distill, train, then "other"; empty groups are omitted. Rows
 * keep the order in which the paths first appear (first run's config first). `values` has one
 * entry per run, in the input order, `undefined` where a run's config lacks the path.
 * @param {{name: string, config: object}[]} runs
 * @returns {{group: string, rows: {path: string, values: unknown[]}[]}[]}
 */
export function diffConfigs(runs) {
  const flat = runs.map((run) => flattenConfig(run.config ?? {}));
  const paths = [];
  const seen = new Set();
  for (const f of flat) {
    for (const path of Object.keys(f)) {
      if (!seen.has(path)) {
        seen.add(path);
        paths.push(path);
      }
    }
  }
  const groups = new Map([...GROUP_ORDER, OTHER_GROUP].map((g) => [g, []]));
  for (const path of paths) {
    const top = path.split(".", 1)[0];
    if (IGNORED.has(top)) continue;
    const values = flat.map((f) => (Object.hasOwn(f, path) ? f[path] : undefined));
    if (values.every((v) => v === values[0])) continue;
    groups.get(GROUP_ORDER.includes(top) ? top : OTHER_GROUP).push({ path, values });
  }
  return [...groups]
    .filter(([, rows]) => rows.length > 0)
    .map(([group, rows]) => ({ group, rows }));
}
