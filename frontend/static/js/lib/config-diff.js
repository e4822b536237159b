// The compare page's config diff: which fields differ between the runs' configs. Pure: no DOM.

/** Top-level config sections, in the order the diff shows them; the rest go to "other". */
export const GROUP_ORDER = ["dataset", "student", "teacher", "distill", "train"];
export const OTHER_GROUP = "other";
/** Top-level fields left out: they always differ (name) or the page shows them elsewhere. */
export const IGNORED = new Set(["name", "experiment"]);

const isPlainObject = (v) =>
  v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof Date);
/** A non-empty array of objects (`distill.pairs`) is walked by index; other arrays are values. */
const isRecordList = (v) => Array.isArray(v) && v.length > 0 && v.every(isPlainObject);
/** Markers of the walk: the run is not compared here (it lacks an enclosing section) … */
const OUTSIDE = Symbol("outside");
/** … or it is, but lacks an enclosing list element (its fields are all absent). */
const NO_ITEM = Symbol("no item");
const isMarker = (v) => v === OUTSIDE || v === NO_ITEM;
const isBranch = (v) => isPlainObject(v) || isRecordList(v);

/** A leaf as the diff compares and shows it: arrays as their JSON text (`[16]`). */
function leafValue(v) {
  if (isMarker(v)) return undefined;
  return Array.isArray(v) ? JSON.stringify(v) : v;
}

/**
 * How a section reads in the one row that stands for it: a list's length, an object's `name`
 * (every registry-driven section has one: "mlp", "cosine"), else "set".
 */
function summary(v) {
  if (Array.isArray(v)) return v.length === 1 ? "1 item" : `${v.length} items`;
  return typeof v.name === "string" ? v.name : "set";
}

function keysOf(nodes) {
  const keys = [];
  const seen = new Set();
  for (const node of nodes) {
    if (!isPlainObject(node) && !Array.isArray(node)) continue;
    for (const key of Object.keys(node)) {
      if (!seen.has(key)) {
        seen.add(key);
        keys.push(key);
      }
    }
  }
  return keys;
}

function childOf(node, key, inList) {
  if (node === OUTSIDE || node === NO_ITEM) return node;
  if (Object.hasOwn(node, key)) return node[key];
  return inList ? NO_ITEM : undefined;
}

/** Pushes the row when the compared runs (not OUTSIDE) disagree. */
function pushIfDiffers(rows, path, nodes, values, section) {
  const compared = values.filter((_, i) => nodes[i] !== OUTSIDE);
  if (compared.every((v) => v === compared[0])) return;
  rows.push(section ? { path, values, section: true } : { path, values });
}

/**
 * Walks the configs side by side (`nodes`: one per run), pushing a row per differing leaf.
 * A section that is an object in some runs and null, absent or a value in others is one row (its
 * summary, or that value); inside it only the runs that have it are compared, and its `name`
 * is left out (the summary shows it).
 */
function walk(nodes, prefix, rows, skip) {
  const inList = nodes.some(Array.isArray);
  for (const key of keysOf(nodes)) {
    if (key === skip || (!prefix && IGNORED.has(key))) continue;
    const path = prefix ? `${prefix}.${key}` : key;
    const children = nodes.map((node) => childOf(node, key, inList));
    // a run lacking the list item has nothing here: it decides neither way
    const real = children.filter((c) => !isMarker(c));
    const branches = real.filter(isBranch).length;
    if (branches === 0) {
      pushIfDiffers(rows, path, children, children.map(leafValue));
    } else if (branches === real.length) {
      walk(children, path, rows);
    } else {
      const values = children.map((c) => (isBranch(c) ? summary(c) : leafValue(c)));
      pushIfDiffers(rows, path, children, values, true);
      walk(
        children.map((c) => (isBranch(c) || c === NO_ITEM ? c : OUTSIDE)),
        path,
        rows,
        "name",
      );
    }
  }
}

/**
 * Only the config fields whose values differ between runs, as dotted paths grouped by their
 * top-level key in the order dataset, student, teacher, distill, train, then "other"; empty
 * groups are omitted. Lists of objects are flattened by index (`distill.pairs.0.loss.name`);
 * other arrays are one value, their JSON text (`[16]`); null is a value; an empty object has no
 * fields. `values` has one entry per run, in the input order, `undefined` where a run lacks the
 * field. A section that is an object in some runs and null or absent in others (a train run's
 * `teacher: null`) is a single row with `section: true`: its summary (its `name`, "set", or "n
 * items") where present, `null`/`undefined` where not; inside it, only the runs that have it are
 * compared (the others read `undefined`). Rows keep the configs' key order, first run first.
 * @param {{name: string, config: object}[]} runs
 * @returns {{group: string, rows: {path: string, values: unknown[], section?: true}[]}[]}
 */
export function diffConfigs(runs) {
  const configs = runs.map((run) => (isPlainObject(run.config) ? run.config : {}));
  const rows = [];
  if (configs.length > 0) walk(configs, "", rows);
  const groups = new Map([...GROUP_ORDER, OTHER_GROUP].map((g) => [g, []]));
  for (const row of rows) {
    const top = row.path.split(".", 1)[0];
    groups.get(GROUP_ORDER.includes(top) ? top : OTHER_GROUP).push(row);
  }
  return [...groups]
    .filter(([, list]) => list.length > 0)
    .map(([group, list]) => ({ group, rows: list }));
}
