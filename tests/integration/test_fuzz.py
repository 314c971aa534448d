"""Schema-driven fuzzing of the HTTP API (schemathesis): whatever is sent, no 5xx, no leaked internals.

Uses the OpenAPI document the running server publishes, so the schema and the server cannot drift.
"""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from contract import manifest  # noqa: E402
from contract.config import ModelConfig, ProjectConfig  # noqa: E402
from contract.settings import AppConfig, ServerSettings  # noqa: E402
from serve_app.app import build  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def fuzz_url(serve_url, tiny_bert_root):
    from ray import serve

    cfg = ModelConfig(id="tiny", source="unused/unused")
    app = build(AppConfig(project=ProjectConfig(artifacts=str(tiny_bert_root), models=(cfg,)),
                          server=ServerSettings(max_inputs_per_request=64)), manifest.load(tiny_bert_root))
    serve.run(app, name="fuzz", route_prefix="/")
    yield serve_url
    serve.delete("fuzz")


def test_no_server_errors(fuzz_url):
    """Every operation in the published schema, 40 generated requests each (valid and invalid)."""
    from hypothesis import given

    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/embeddings", "/v1/models", "/health", "/ready"}
    seen = {}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=fuzz_url, timeout=30)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (operation.path, case.body, response.text[:300])
            assert "Traceback" not in response.text and "/work/" not in response.text
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()
    print(f"\nfuzz: status counts {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 40
