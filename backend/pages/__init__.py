"""HTML pages: one router per page group, as thin as the API routes, calling the same services.

Templates live in `frontend/templates` (one per page, partials named after the element id they
render); static files in `frontend/static`. Nothing here answers JSON: the charts fetch
`/api/compare` themselves.
"""
