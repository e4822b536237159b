// The launch form is htmx only (validation, 422 re-render, HX-Redirect). This module only loads
// what every page shares: the copy buttons (e.g. a "Copy config" button with data-copy-target).
import "./common.js";
