// The API docs page (/docs): Swagger UI from the vendored bundle, which the page loads first as a
// classic script (it defines the global `SwaggerUIBundle`); this module runs after it.
//   <meta name="csrf-token" content="…">   (a signed-in browser's writes need it)
//   <div id="swagger-ui"></div>
const csrf = document.querySelector('meta[name="csrf-token"]')?.content ?? "";

/** Same-origin calls made with "Try it out" carry the session's CSRF token. */
export function withCsrf(request) {
  const { origin } = new URL(request.url, globalThis.location.href);
  if (csrf && origin === globalThis.location.origin) request.headers["X-CSRF-Token"] = csrf;
  return request;
}

globalThis.SwaggerUIBundle({
  url: "/api/openapi.json",
  dom_id: "#swagger-ui",
  validatorUrl: null, // no badge from validator.swagger.io: nothing leaves this server
  requestInterceptor: withCsrf,
});
