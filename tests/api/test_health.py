from kdlab.backend.db.migrate import head_revision


def test_health_needs_no_token_and_reports_the_schema(client):
    response = client.get("/api/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["database"] in {"sqlite", "postgresql"}
    assert body["schema_revision"] == head_revision()


# DESIGN §3's endpoints (plus the worker's status/heartbeat and artifact upload), method and path
DESIGN_ENDPOINTS = {
    ("get", "/api/health"),
    ("get", "/api/catalog"),
    ("get", "/api/catalog/models/{name}/layers"),
    ("post", "/api/runs"),
    ("post", "/api/runs/validate"),
    ("get", "/api/runs"),
    ("get", "/api/runs/{run_id}"),
    ("post", "/api/runs/{run_id}/cancel"),
    ("post", "/api/runs/{run_id}/clone"),
    ("delete", "/api/runs/{run_id}"),
    ("post", "/api/runs/{run_id}/metrics"),
    ("get", "/api/runs/{run_id}/metrics"),
    ("get", "/api/compare"),
    ("get", "/api/runs/{run_id}/artifacts"),
    ("get", "/api/runs/{run_id}/artifacts/{name}"),
    ("put", "/api/runs/{run_id}/artifacts/{name}"),
    ("get", "/api/runs/{run_id}/student"),
    ("post", "/api/uploads"),
    ("get", "/api/runs/{run_id}/logs"),
    ("get", "/api/runs/{run_id}/events"),
    ("post", "/api/runs/{run_id}/status"),
    ("post", "/api/runs/{run_id}/heartbeat"),
}


def test_openapi_lists_every_endpoint(client):
    paths = client.get("/api/openapi.json").json()["paths"]
    listed = {(method, path) for path, item in paths.items() for method in item}
    assert DESIGN_ENDPOINTS - listed == set()
