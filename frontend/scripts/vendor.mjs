// Copy the browser builds of the pinned packages from node_modules into static/vendor/, with the
// version in each file name, plus their licences. Run after `npm install <pkg>@<ver>`:
//   cd frontend && npm install && npm run vendor
// Files of an older version are removed so the folder holds exactly one copy of each library.
// Templates reference the file names, so update them (and static/vendor/README.md) after a bump.
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const modules = join(root, "node_modules");
const out = join(root, "static", "vendor");

const version = (pkg) =>
  JSON.parse(readFileSync(join(modules, pkg, "package.json"), "utf8")).version;

const htmx = version("htmx.org");
const sse = version("htmx-ext-sse");
const uplot = version("uplot");
const swagger = version("swagger-ui-dist");

// [source in node_modules, target name in static/vendor, transform]
const files = [
  ["htmx.org/dist/htmx.min.js", `htmx-${htmx}.min.js`],
  ["htmx.org/LICENSE", "LICENSE-htmx.txt"],
  // The extension's classic-script build (it calls the global `htmx.defineExtension`).
  ["htmx-ext-sse/dist/sse.js", `htmx-ext-sse-${sse}.js`],
  ["htmx-ext-sse/LICENSE", "LICENSE-htmx-ext-sse.txt"],
  // uPlot ships no minified ES module, only an unminified one (~145 KB). Its minified IIFE
  // build (~51 KB) is `var uPlot=function(){...}();`: appending `export default uPlot;` makes it
  // an ES module with the same export as dist/uPlot.esm.js, a third of the size.
  ["uplot/dist/uPlot.iife.min.js", `uPlot-${uplot}.esm.js`, toModule],
  ["uplot/dist/uPlot.min.css", `uPlot-${uplot}.min.css`],
  ["uplot/LICENSE", "LICENSE-uPlot.txt"],
  // Swagger UI for /docs only (fixed names in a folder; its version is in README.md).
  ["swagger-ui-dist/swagger-ui-bundle.js", "swagger-ui/swagger-ui-bundle.js"],
  [
    "swagger-ui-dist/swagger-ui-bundle.js.LICENSE.txt",
    "swagger-ui/swagger-ui-bundle.js.LICENSE.txt",
  ],
  ["swagger-ui-dist/swagger-ui.css", "swagger-ui/swagger-ui.css"],
  ["swagger-ui-dist/LICENSE", "swagger-ui/LICENSE"],
  ["swagger-ui-dist/NOTICE", "swagger-ui/NOTICE"],
];

function toModule(text) {
  if (!/^\s*(\/\*![\s\S]*?\*\/\s*)?var uPlot=function\(\)\{/.test(text)) {
    throw new Error(
      "uPlot.iife.min.js no longer starts with `var uPlot=function(){`: vendor the ESM",
    );
  }
  return `${text.trimEnd()}\nexport default uPlot;\n`;
}

mkdirSync(join(out, "swagger-ui"), { recursive: true });
const stale = /^(htmx-\d.*\.min\.js|htmx-ext-sse-\d.*\.js|uPlot-\d.*\.(esm\.js|min\.css))$/;
for (const name of readdirSync(out)) {
  if (stale.test(name)) rmSync(join(out, name));
}
for (const [source, target, transform] of files) {
  const from = join(modules, source);
  const to = join(out, target);
  if (transform) writeFileSync(to, transform(readFileSync(from, "utf8")));
  else copyFileSync(from, to);
  process.stdout.write(`${source} -> static/vendor/${target}\n`);
}
process.stdout.write(`swagger-ui-dist ${swagger}: update its row in static/vendor/README.md\n`);
