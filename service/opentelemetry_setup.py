"""Whether FastAPI's native OpenTelemetry instrumentation runs, decided once at start.

FastAPI (0.165, the version this was measured with) asks on every request whether an
OpenTelemetry provider has been installed since the last one: three provider lookups, each
reading the environment, 31,000-34,000 instructions, a tenth of what a digits request costs the
app (`make bench-instructions`). A served model gets its providers before it starts or not at
all (`opentelemetry-instrument edgeharvest serve`, an SDK set up by a wrapper, or FastAPI's own
`FASTAPI_OTEL_AUTO_CONFIGURE=true`), so the service asks once, when the app is built.
"""

from __future__ import annotations

import os

from fastapi.telemetry import TelemetryConfig
from opentelemetry import _logs, metrics, trace

# What the OpenTelemetry API returns until an SDK installs a provider: proxies that forward to
# a provider set later. Any other class is a provider someone installed.
_PLACEHOLDER_PROVIDERS = frozenset(
    {"ProxyTracerProvider", "_ProxyMeterProvider", "ProxyLoggerProvider"}
)


def providers_installed() -> bool:
    """Whether a tracer, meter or logger provider has been installed."""
    providers = (
        trace.get_tracer_provider(),
        metrics.get_meter_provider(),
        _logs.get_logger_provider(),
    )
    return any(type(p).__name__ not in _PLACEHOLDER_PROVIDERS for p in providers)


def fastapi_telemetry() -> TelemetryConfig:
    """FastAPI's `telemetry` argument: its defaults when a provider is installed or FastAPI is
    to set one up, otherwise spans, metrics and logs off (no per-request check)."""
    if providers_installed() or os.environ.get("FASTAPI_OTEL_AUTO_CONFIGURE", "").lower() == "true":
        return {}
    return {"tracing": False, "metrics": False, "logs": False}
