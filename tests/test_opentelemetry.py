"""FastAPI's native OpenTelemetry spans: on when a provider is installed before the app is
built, off (with no per-request check) when none is.

Each case runs in its own interpreter: OpenTelemetry's global providers can be set only once.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import MODELS_DIR, REPO_ROOT

SCRIPT = """
import json, sys
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from service.app import create_app
from service.settings import Settings

settings = Settings(model_dir=sys.argv[1], monitoring_enabled=False)
built_before = create_app(settings)
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
built_after = create_app(settings)
spans = {}
for name, app in (("built_before", built_before), ("built_after", built_after)):
    exporter.clear()
    with TestClient(app) as client:
        response = client.post("/v1/models/digits/predict", json={"instances": [[0.0] * 64]})
        assert response.status_code == 200, response.text
    spans[name] = [
        {"name": s.name, "kind": s.kind.name, "attributes": dict(s.attributes or {})}
        for s in exporter.get_finished_spans()
    ]
print(json.dumps(spans))
"""


def test_spans_only_from_an_app_built_after_a_provider_was_installed() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(MODELS_DIR)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    spans = json.loads(completed.stdout.strip().splitlines()[-1])
    # Built with no provider installed: FastAPI's instrumentation is off for good.
    assert spans["built_before"] == []
    # Built after: the prediction, served by the fast path, is a server span with its route.
    servers = [s for s in spans["built_after"] if s["kind"] == "SERVER"]
    assert len(servers) == 1, spans["built_after"]
    attributes = servers[0]["attributes"]
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.response.status_code"] == 200
