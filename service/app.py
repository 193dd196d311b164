"""The composition root: `create_app(settings)` builds every object and hangs it on `app.state`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.dataplane import DataPlane
from service.errors import EdgeharvestError
from service.model_repository import ModelRepository
from service.onnx_classifier import SessionConfig
from service.routers import inference_protocol, predict
from service.settings import Settings

logger = logging.getLogger("edgeharvest")


def session_config(settings: Settings) -> SessionConfig:
    return SessionConfig(
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        graph_optimization_level=settings.graph_optimization_level,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # Loading validates every manifest against its graph and warms the model up, so a bad
    # repository stops start-up with a message instead of failing requests later.
    repository = ModelRepository.from_directory(settings.model_dir, session_config(settings))
    dataplane = DataPlane(repository, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dataplane.mark_ready()
        yield

    app = FastAPI(
        title="edgeharvest",
        version=__version__,
        description="Serves ONNX classifiers over the Open Inference Protocol and watches them.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.dataplane = dataplane
    app.include_router(inference_protocol.router)
    app.include_router(predict.router)
    install_error_handlers(app)
    return app


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
