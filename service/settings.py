"""Settings, read from the environment with the prefix EDGEHARVEST_ (and an optional .env file)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

GraphOptimizationLevel = Literal["disable", "basic", "extended", "all"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEHARVEST_", env_file=".env", extra="ignore")

    # Where models live: every folder below it with a manifest.json is served.
    model_dir: Path = Path("models")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # onnxruntime. One intra-op thread per session by default: the service scales out by
    # processes and replicas, and small models lose more to thread hand-off than they gain.
    intra_op_threads: int = Field(default=1, ge=0)
    inter_op_threads: int = Field(default=1, ge=0)
    graph_optimization_level: GraphOptimizationLevel = "all"

    # Limits on what one request may ask for.
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_batch_size: int = Field(default=1024, ge=1)
    # Requests with at least this many input values run onnxruntime in a worker thread so the
    # event loop keeps serving; smaller ones run inline, where a thread hop would cost more
    # than the inference itself.
    threadpool_min_elements: int = Field(default=16384, ge=0)
