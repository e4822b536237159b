from backend.db.migrate import head_revision


def test_health_needs_no_token_and_reports_the_schema(client):
    response = client.get("/api/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["database"] in {"sqlite", "postgresql"}
    assert body["schema_revision"] == head_revision()


def test_openapi_lists_the_api(client):
    paths = client.get("/api/openapi.json").json()["paths"]
    assert "/api/health" in paths
