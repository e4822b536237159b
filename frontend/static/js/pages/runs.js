// The runs page is htmx only (filters, sort, live cells over SSE, multi-select → compare are
// plain forms and attributes). This module only loads what every page shares.
import "./common.js";
