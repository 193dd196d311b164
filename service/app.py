"""The composition root: `create_app(settings)` builds every object and hangs it on `app.state`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp
from threadpoolctl import threadpool_limits

from service import __version__
from service.access_control import AccessControl
from service.auth import KeyRing
from service.dataplane import DataPlane
from service.drift_desk import DriftDesk
from service.drift_metrics import DriftCollector
from service.embedded_redis import redis_url_or_embedded
from service.errors import EdgeharvestError
from service.event_log import EventLog
from service.fast_routes import FastPredictionRoutes
from service.label_desk import LabelDesk
from service.metrics import ServiceMetrics
from service.model_lifecycle import ModelLifecycle
from service.model_repository import ModelRepository
from service.monitoring import PredictionMonitor
from service.neighbour_index import build_neighbour_index
from service.onnx_classifier import SessionConfig
from service.opentelemetry_setup import fastapi_telemetry
from service.prediction_scorer import PredictionScorer
from service.queue_metrics import LabelQueueCollector
from service.redis_connection import create_async_redis, create_redis
from service.reference_profile import ReferenceProfile
from service.request_metrics import RequestMetricsMiddleware
from service.routers import console, drift, inference_protocol, labeling, observability, predict
from service.routers import repository as repository_router
from service.scores import FlagThresholds
from service.settings import Settings
from service.shared_metrics import forget_dead_processes, process_stopping

logger = logging.getLogger("edgeharvest")


def session_config(settings: Settings) -> SessionConfig:
    return SessionConfig(
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        graph_optimization_level=settings.graph_optimization_level,
    )


def build_scorers(
    references: dict[tuple[str, str], ReferenceProfile], settings: Settings
) -> dict[tuple[str, str], PredictionScorer]:
    thresholds = FlagThresholds(settings.low_confidence_percentile, settings.novel_percentile)
    # numpy's BLAS is limited to one thread for the whole process (the kNN search is the only
    # BLAS user; onnxruntime has its own pool), so the index need not toggle it per search.
    threadpool_limits(limits=1, user_api="blas")
    return {
        key: PredictionScorer(
            profile,
            build_neighbour_index(
                profile.embeddings, settings.exact_search_max_size, manage_blas_threads=False
            ),
            thresholds,
        )
        for key, profile in references.items()
    }


def create_app(
    settings: Settings | None = None, registry: CollectorRegistry | None = None
) -> FastAPI:
    settings = settings or Settings()
    registry = registry if registry is not None else CollectorRegistry()
    # Loading validates every manifest and reference profile against its graph and warms the
    # model up, so a bad repository stops start-up with a message instead of failing requests.
    repository = ModelRepository.from_directory(settings.model_dir, session_config(settings))
    metrics = ServiceMetrics(registry)
    event_log: EventLog | None = None
    monitor: PredictionMonitor | None = None
    if settings.monitoring_enabled:
        event_log = EventLog(
            capacity=settings.event_buffer_capacity,
            batch_size=settings.event_batch_size,
            flush_interval=settings.event_flush_interval,
            maxlen=settings.event_stream_maxlen,
            retention_seconds=settings.event_retention_seconds or None,
            shutdown_timeout=settings.event_shutdown_timeout,
            trim_interval=settings.event_trim_interval,
            backoff_min=settings.event_backoff_min,
            backoff_max=settings.event_backoff_max,
            metrics=metrics,
        )
        writer = event_log  # not Optional inside the closure
        metrics.watch_event_buffer(lambda: writer.buffered)
        monitor = PredictionMonitor(
            build_scorers(repository.references, settings),
            metrics,
            event_log,
            input_sample_rate=settings.event_input_sample_rate,
            max_input_bytes=settings.event_max_input_bytes,
        )
    dataplane = DataPlane(repository, settings, metrics, monitor)
    lifecycle = ModelLifecycle(
        dataplane, session_config(settings), lambda references: build_scorers(references, settings)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        embedded = None
        redis = None
        sync_redis = None
        collectors = []
        if settings.monitoring_enabled or settings.redis_url is not None:
            url, embedded = redis_url_or_embedded(settings.redis_url, settings.data_dir)
            connection = {
                "max_connections": settings.redis_max_connections,
                "socket_timeout": settings.redis_socket_timeout,
                "health_check_interval": settings.redis_health_check_interval,
                "cluster": settings.redis_cluster or None,
            }
            sync_redis = create_redis(url, **connection)  # type: ignore[arg-type]
            desk = LabelDesk(repository, sync_redis, settings.label_lease_seconds)
            app.state.label_desk = desk
            drift_desk = DriftDesk(repository, sync_redis)
            app.state.drift_desk = drift_desk
            collectors = [
                LabelQueueCollector(lambda: desk.queues),
                DriftCollector(lambda: drift_desk.stores),
            ]
            for collector in collectors:
                metrics.scrape_registry.register(collector)
            if event_log is not None:
                redis = create_async_redis(url, **connection)  # type: ignore[arg-type]
                await event_log.start(redis)
        # Starts the adaptive batchers (warmed up), then marks the models ready.
        await dataplane.start()
        publisher = _start_shared_gauges(metrics)
        try:
            yield
        finally:
            # Batches already queued or running finish (and log their events) first.
            await dataplane.stop()
            if publisher is not None:
                publisher.cancel()
            for collector in collectors:
                metrics.scrape_registry.unregister(collector)
            app.state.label_desk = None
            app.state.drift_desk = None
            if event_log is not None:
                await event_log.stop()
            if redis is not None:
                await redis.aclose()
            if sync_redis is not None:
                sync_redis.close()
            if embedded is not None:
                embedded.stop()
            if metrics.shared_directory is not None:
                process_stopping(metrics.shared_directory)

    app = EdgeharvestApp(
        title="edgeharvest",
        version=__version__,
        description="Serves ONNX classifiers over the Open Inference Protocol and watches them.",
        lifespan=lifespan,
        telemetry=fastapi_telemetry(),
    )
    app.state.settings = settings
    app.state.dataplane = dataplane
    app.state.lifecycle = lifecycle
    app.state.metrics = metrics
    app.state.event_log = event_log
    app.state.label_desk = None  # set once Redis is connected
    app.state.drift_desk = None  # set once Redis is connected
    # Routes are matched in order: the prediction routes go first, they take the traffic.
    app.include_router(predict.router)
    app.include_router(inference_protocol.router)
    app.include_router(labeling.router)
    app.include_router(drift.router)
    app.include_router(repository_router.router)
    app.include_router(observability.router)
    app.include_router(console.router)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, repository=repository)
    install_error_handlers(app)
    return app


# How often each worker process publishes its gauges in multiprocess mode.
SHARED_GAUGE_INTERVAL_SECONDS = 1.0


def _start_shared_gauges(metrics: ServiceMetrics) -> asyncio.Task[None] | None:
    """In multiprocess mode (several worker processes, see shared_metrics.py): forget the live
    gauges of workers that died, then publish this process's buffer depth every second, since a
    scrape answered by another process cannot read it."""
    directory = metrics.shared_directory
    if directory is None:
        return None
    for pid in forget_dead_processes(directory):
        logger.info("worker process %d is gone: its gauges no longer count", pid)

    async def publish() -> None:
        while True:
            metrics.publish_event_buffer()
            await asyncio.sleep(SHARED_GAUGE_INTERVAL_SECONDS)

    return asyncio.create_task(publish(), name="edgeharvest-shared-gauges")


class EdgeharvestApp(FastAPI):
    """FastAPI with access control, then the prediction fast path, in front of its whole
    middleware stack.

    `add_middleware` would still place it inside FastAPI's own error, telemetry and body-limit
    middleware, a few microseconds per request; the fast path handles its own errors.
    """

    def build_middleware_stack(self) -> ASGIApp:
        settings: Settings = self.state.settings
        return AccessControl(
            FastPredictionRoutes(super().build_middleware_stack(), self.state.dataplane),
            KeyRing(settings.api_keys),
            max_concurrent_requests=settings.max_concurrent_requests,
            request_timeout_seconds=settings.request_timeout_seconds,
            protect_observability=settings.auth_protect_observability,
        )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    """One table: every error body is `{"error": "..."}`, as the Open Inference Protocol says."""

    async def edgeharvest_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, EdgeharvestError)
        return _error(exc.status_code, exc.message)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return _error(400, f"invalid request: {problems}")

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            message = f"no endpoint at {request.method} {request.url.path}; see /docs"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        response = _error(exc.status_code, message)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); the server log has details")

    app.add_exception_handler(EdgeharvestError, edgeharvest_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
