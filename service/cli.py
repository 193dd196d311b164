"""The `edgeharvest` command line. Each command builds what it needs from Settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from service.errors import EdgeharvestError, ModelLoadError

if TYPE_CHECKING:
    from collections.abc import Container

    from prometheus_client import CollectorRegistry

    from service.drift_worker import DriftWorker
    from service.embedded_redis import EmbeddedRedis
    from service.manifest import Manifest
    from service.redis_connection import SyncRedis
    from service.reference_profile import ReferenceProfile
    from service.selector_worker import SelectorWorker
    from service.settings import Settings

ModelDirOption = Annotated[
    Path | None, typer.Option(help="Model repository [EDGEHARVEST_MODEL_DIR]")
]

app = typer.Typer(
    help="edgeharvest: serve an ONNX classifier, watch it, harvest its edge cases.",
    no_args_is_help=True,
    add_completion=False,
)
manifest_app = typer.Typer(help="Create and check model manifests.", no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")
reference_app = typer.Typer(help="Build reference profiles.", no_args_is_help=True)
app.add_typer(reference_app, name="reference")


apikey_app = typer.Typer(help="Create API keys.", no_args_is_help=True)
app.add_typer(apikey_app, name="apikey")


@apikey_app.command("create")
def apikey_create(
    name: Annotated[str, typer.Option(help="Who holds the key (shown in 403 messages)")],
    role: Annotated[list[str], typer.Option(help="predict, label or admin (repeat for several)")],
) -> None:
    """Print a new random API key and the EDGEHARVEST_API_KEYS entry that holds its hash."""
    from pydantic import ValidationError

    from service.auth import ApiKey, hash_key, new_api_key

    key = new_api_key()
    try:
        entry = ApiKey(name=name, sha256=hash_key(key), roles=role)  # type: ignore[arg-type]
    except ValidationError as exc:
        _fail(f"{exc.errors()[0]['loc']}: {exc.errors()[0]['msg']} (roles: predict, label, admin)")
    typer.echo(f"key (give it to {name}; it is not stored anywhere): {key}")
    typer.echo("EDGEHARVEST_API_KEYS entry (a JSON list of these):")
    typer.echo(json.dumps(entry.model_dump()))


def _settings(model_dir: Path | None) -> Settings:
    from service.settings import Settings

    return Settings(**({"model_dir": model_dir} if model_dir else {}))  # type: ignore[arg-type]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


HostOption = Annotated[str | None, typer.Option(help="Bind address [EDGEHARVEST_HOST]")]
PortOption = Annotated[int | None, typer.Option(help="Port [EDGEHARVEST_PORT]")]
WorkersOption = Annotated[
    int | None,
    typer.Option(min=1, help="API worker processes sharing the port [EDGEHARVEST_WORKERS]"),
]
# uvicorn's options for every way the API is served. Access logs per request cost more than the
# tiny models take to run. The protocol is uvicorn's httptools one, writing each response in one
# system call (service/http_protocol.py); named by import path, so `edgeharvest --help` does not
# import uvicorn.
UVICORN_OPTIONS = {
    "loop": "uvloop",
    "http": "service.http_protocol:JoinedWritesHttpToolsProtocol",
    "access_log": False,
}


@app.command()
def serve(
    host: HostOption = None,
    port: PortOption = None,
    model_dir: ModelDirOption = None,
    workers: WorkersOption = None,
) -> None:
    """Start the HTTP service (Open Inference Protocol on /v2, simple JSON on /v1)."""
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    overrides = {
        k: v
        for k, v in {"host": host, "port": port, "model_dir": model_dir, "workers": workers}.items()
        if v is not None
    }
    settings = Settings(**overrides)  # type: ignore[arg-type]
    if settings.workers > 1:
        _serve_processes(settings)
        return
    try:
        application = create_app(settings)
    except ModelLoadError as exc:
        _fail(exc.message)
    uvicorn.run(
        application,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        **UVICORN_OPTIONS,  # type: ignore[arg-type]
    )


def _serve_processes(settings: Settings) -> None:
    """`settings.workers` uvicorn worker processes on one socket, each building the app from
    the environment, with one Redis and one directory for their merged metrics."""
    import os
    import shutil
    import tempfile

    import uvicorn

    from service.app import session_config
    from service.embedded_redis import redis_url_or_embedded
    from service.model_repository import ModelRepository
    from service.shared_metrics import DIRECTORY_VARIABLE

    # Load the repository once here, so a bad one stops with its message, not a traceback
    # from every worker; the workers load their own copies.
    try:
        ModelRepository.from_directory(settings.model_dir, session_config(settings))
    except ModelLoadError as exc:
        _fail(exc.message)
    embedded = None
    if settings.monitoring_enabled or settings.redis_url is not None:
        url, embedded = redis_url_or_embedded(settings.redis_url, settings.data_dir)
        os.environ["EDGEHARVEST_REDIS_URL"] = url
    os.environ["EDGEHARVEST_HOST"] = settings.host
    os.environ["EDGEHARVEST_PORT"] = str(settings.port)
    os.environ["EDGEHARVEST_MODEL_DIR"] = str(settings.model_dir.resolve())
    # A fresh directory per start: the library needs it empty, and a directory set by the
    # operator (e.g. a volume) is only ever used as the parent of ours.
    metrics_dir = tempfile.mkdtemp(
        prefix="edgeharvest-metrics-", dir=os.environ.get(DIRECTORY_VARIABLE)
    )
    os.environ[DIRECTORY_VARIABLE] = metrics_dir
    try:
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            workers=settings.workers,
            timeout_worker_healthcheck=settings.worker_start_timeout_seconds,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            **UVICORN_OPTIONS,  # type: ignore[arg-type]
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if embedded is not None:
            embedded.stop()


@app.command()
def check(
    model_dir: ModelDirOption = None,
) -> None:
    """Load every model in the repository as `serve` would, and report what it serves."""
    from service.app import session_config
    from service.model_repository import ModelRepository

    settings = _settings(model_dir)
    try:
        repository = ModelRepository.from_directory(settings.model_dir, session_config(settings))
    except ModelLoadError as exc:
        _fail(exc.message)
    for model in repository:
        outputs = ", ".join(o.name for o in model.outputs)
        typer.echo(
            f"{model.name} v{model.version}: {len(model.class_names)} classes; outputs {outputs}"
        )


@manifest_app.command("propose")
def manifest_propose(
    onnx_file: Annotated[Path, typer.Argument(help="The .onnx file to inspect")],
    name: Annotated[str | None, typer.Option(help="Model name (default: file name)")] = None,
    version: Annotated[str, typer.Option(help="Model version")] = "1",
    write: Annotated[
        bool, typer.Option("--write", help="Write manifest.json next to the model")
    ] = False,
) -> None:
    """Inspect a graph and propose a manifest (roles, input, class names, sha256)."""
    from service.manifest import MANIFEST_FILE
    from service.manifest_proposal import propose_manifest

    if not onnx_file.is_file():
        _fail(f"{onnx_file} does not exist")
    try:
        manifest = propose_manifest(onnx_file, name=name, version=version)
    except ModelLoadError as exc:
        _fail(exc.message)
    if write:
        target = onnx_file.parent / MANIFEST_FILE
        manifest.save(target)
        typer.echo(f"wrote {target}; review the roles and class names", err=True)
    else:
        json.dump(manifest.model_dump(mode="json", exclude_none=True), sys.stdout, indent=2)
        sys.stdout.write("\n")


@reference_app.command("build")
def reference_build(
    model: Annotated[str, typer.Option(help="Model name")],
    data: Annotated[Path, typer.Option(help="Reference inputs: .npy, .npz, .csv or .parquet")],
    version: Annotated[str | None, typer.Option(help="Model version (default: latest)")] = None,
    labels: Annotated[
        Path | None, typer.Option(help="Labels file (.npy or one-column CSV), one per row")
    ] = None,
    label_column: Annotated[
        str | None, typer.Option(help="Label column in a CSV or Parquet file")
    ] = None,
    validation_data: Annotated[
        Path | None,
        typer.Option(help="Data the model was not trained on, for the score distributions"),
    ] = None,
    validation_labels: Annotated[
        Path | None, typer.Option(help="Labels of the validation data")
    ] = None,
    max_embeddings: Annotated[int, typer.Option(help="Size cap of the kNN bank")] = 20_000,
    holdout_fraction: Annotated[
        float, typer.Option(help="Share of each class held out to measure score distributions")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Random seed of the split and subsample")] = 0,
    model_dir: ModelDirOption = None,
    output: Annotated[
        Path | None, typer.Option(help="Where to write (default: reference.npz by the model)")
    ] = None,
) -> None:
    """Run a served model over reference data and write its reference profile."""
    from tqdm import tqdm

    from service.app import session_config
    from service.datatypes import OIP_TO_NUMPY
    from service.model_repository import ModelRepository
    from service.reference_builder import build_reference_profile
    from service.reference_data import fit_to_model, read_reference_data
    from service.reference_profile import REFERENCE_FILE

    settings = _settings(model_dir)
    try:
        repository = ModelRepository.from_directory(
            settings.model_dir, session_config(settings), load_references=False
        )
        classifier = repository.get(model, version)
        inputs, targets = read_reference_data(data, labels, label_column)
        spec = classifier.manifest.input
        dtype = OIP_TO_NUMPY[spec.datatype]
        inputs, targets = fit_to_model(
            inputs, targets, spec.shape[1:], dtype, classifier.class_names
        )
        held_out, held_out_targets = None, None
        if validation_data is not None:
            raw, raw_targets = read_reference_data(validation_data, validation_labels, label_column)
            held_out, held_out_targets = fit_to_model(
                raw, raw_targets, spec.shape[1:], dtype, classifier.class_names
            )
        profile = build_reference_profile(
            classifier,
            inputs,
            targets,
            max_embeddings=max_embeddings,
            holdout_fraction=holdout_fraction,
            seed=seed,
            source=data.name,
            progress=lambda items, total: tqdm(items, total=total, desc="inference", unit="batch"),
            validation_inputs=held_out,
            validation_labels=held_out_targets,
        )
    except (EdgeharvestError, ValueError) as exc:
        _fail(getattr(exc, "message", str(exc)))
    target = output or classifier.directory / REFERENCE_FILE
    profile.save(target)
    meta = profile.metadata
    typer.echo(
        f"wrote {target}: kNN bank of {meta['bank_size']} embeddings (k={profile.k}), "
        f"score distributions from {meta['holdout_size']} held-out rows"
        + (f", accuracy {meta['accuracy']:.4f}" if meta["accuracy"] is not None else "")
    )


def _worker_redis(settings: Settings, block_ms: int) -> tuple[SyncRedis, EmbeddedRedis | None]:
    from service.embedded_redis import redis_url_or_embedded
    from service.redis_connection import create_redis

    url, embedded = redis_url_or_embedded(settings.redis_url, settings.data_dir)
    client = create_redis(
        url,
        max_connections=4,
        # Longer than a blocking read, so a quiet stream is not mistaken for a dead server.
        socket_timeout=settings.redis_socket_timeout + block_ms / 1000,
        cluster=settings.redis_cluster or None,
    )
    return client, embedded


def _run_worker(
    worker: SelectorWorker | DriftWorker,
    client: SyncRedis,
    embedded: EmbeddedRedis | None,
    burst: bool,
) -> int:
    """Run until SIGTERM/SIGINT (or, with `burst`, until drained); then close everything."""
    import signal

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: worker.stop())
    try:
        return worker.run(burst=burst)
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()


def _consumer_name(consumer: str | None) -> str:
    import os
    import socket

    return consumer or f"{socket.gethostname()}-{os.getpid()}"


def _worker_registry(settings: Settings) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, registry=registry)
    return registry


BurstOption = Annotated[
    bool, typer.Option("--burst", help="Exit once every event stream is drained")
]
ConsumerOption = Annotated[
    str | None, typer.Option(help="Consumer name in the group (default: host-pid)")
]


@app.command()
def select(
    burst: BurstOption = False,
    consumer: ConsumerOption = None,
    model_dir: ModelDirOption = None,
) -> None:
    """Run a selector worker: events -> selection policy -> labeling queue."""
    from service.model_repository import ModelRepository
    from service.selection_policy import WindowBudget
    from service.selector_worker import ModelStream, SelectorWorker, selection_config
    from service.worker_metrics import WorkerMetrics

    settings = _settings(model_dir)

    def model_streams(known: Container[tuple[str, str]]) -> list[ModelStream]:
        return [
            ModelStream(m.name, m.version, m.class_names)
            for m in ModelRepository.find_manifests(settings.model_dir)
            if (m.name, m.version) not in known
        ]

    try:
        streams = model_streams(())
        config = selection_config(settings.selection)
    except (EdgeharvestError, ValueError) as exc:
        _fail(getattr(exc, "message", str(exc)))
    registry = _worker_registry(settings)
    client, embedded = _worker_redis(settings, settings.selector_block_ms)
    worker = SelectorWorker(
        client,
        streams,
        consumer=_consumer_name(consumer),
        config=config,
        budget=WindowBudget(settings.selector_budget_per_window, settings.selector_window_seconds),
        metrics=WorkerMetrics(registry),
        round_size=settings.selector_round_size,
        block_ms=settings.selector_block_ms,
        claim_idle_ms=int(settings.selector_claim_idle_seconds * 1000),
        lease_seconds=settings.label_lease_seconds,
        discover=model_streams,
        discover_seconds=settings.worker_discover_seconds,
    )
    processed = _run_worker(worker, client, embedded, burst)
    typer.echo(f"selector processed {processed} stream entries", err=True)


@app.command()
def drift(
    burst: BurstOption = False,
    consumer: ConsumerOption = None,
    model_dir: ModelDirOption = None,
) -> None:
    """Run a drift worker: events of every replica -> windows -> drift tests -> Redis."""
    from service.drift_detectors import ReferenceSample
    from service.drift_worker import DriftStream, DriftWorker, DriftWorkerMetrics, drift_config
    from service.model_repository import ModelRepository

    settings = _settings(model_dir)
    try:
        found = ModelRepository.find_references(settings.model_dir)
        config = drift_config(
            settings.drift_window_size, settings.drift_window_seconds, settings.drift
        )
    except (EdgeharvestError, ValueError) as exc:
        _fail(getattr(exc, "message", str(exc)))
    unwatched: set[tuple[str, str]] = set()

    def drift_streams(
        found: list[tuple[Manifest, ReferenceProfile | None]],
    ) -> list[DriftStream]:
        for manifest in (m for m, profile in found if profile is None):
            if (manifest.name, manifest.version) not in unwatched:
                unwatched.add((manifest.name, manifest.version))
                typer.echo(
                    f"model '{manifest.name}' v{manifest.version} has no reference profile: "
                    "not watched for drift (build one with `edgeharvest reference build`)",
                    err=True,
                )
        return [
            DriftStream(m.name, m.version, ReferenceSample.from_profile(profile))
            for m, profile in found
            if profile is not None
        ]

    def new_streams(known: set[tuple[str, str]]) -> list[DriftStream]:
        # A version without a profile is looked at again: one may be built for it meanwhile.
        return drift_streams(ModelRepository.find_references(settings.model_dir, known))

    registry = _worker_registry(settings)
    client, embedded = _worker_redis(settings, settings.drift_block_ms)
    worker = DriftWorker(
        client,
        drift_streams(found),
        consumer=_consumer_name(consumer),
        config=config,
        metrics=DriftWorkerMetrics(registry),
        round_size=settings.drift_round_size,
        block_ms=settings.drift_block_ms,
        claim_idle_ms=int(settings.drift_claim_idle_seconds * 1000),
        history_size=settings.drift_history_size,
        grace_seconds=settings.drift_window_grace_seconds,
        discover=new_streams,
        discover_seconds=settings.worker_discover_seconds,
    )
    processed = _run_worker(worker, client, embedded, burst)
    typer.echo(f"drift worker processed {processed} stream entries", err=True)


@app.command("drift-report")
def drift_report(
    model: Annotated[str, typer.Option(help="Model name")],
    version: Annotated[str | None, typer.Option(help="Model version (default: latest)")] = None,
    out: Annotated[Path, typer.Option(help="HTML file to write")] = Path("drift-report.html"),
    windows: Annotated[int, typer.Option(min=1, help="Past windows in the timeline")] = 50,
    model_dir: ModelDirOption = None,
) -> None:
    """Write an HTML drift report: latest tests, score histograms, recent windows."""
    from service.drift_desk import drift_summary
    from service.drift_report import render_html
    from service.drift_store import DriftStore
    from service.model_repository import ModelRepository, version_key

    settings = _settings(model_dir)
    try:
        found = ModelRepository.find_references(settings.model_dir)
    except EdgeharvestError as exc:
        _fail(exc.message)
    versions = {m.version: profile is not None for m, profile in found if m.name == model}
    if not versions:
        _fail(f"unknown model '{model}'; the repository holds {sorted({m.name for m, _ in found})}")
    if version is None:
        version = max(versions, key=version_key)
    elif version not in versions:
        _fail(f"model '{model}' has no version '{version}'; available: {sorted(versions)}")
    client, embedded = _worker_redis(settings, 0)
    try:
        summary = drift_summary(DriftStore(client, model, version), versions[version], windows)
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()
    out.write_text(render_html(summary), encoding="utf-8")
    typer.echo(
        f"wrote {out}: {summary['windows_evaluated']} windows evaluated, "
        f"alarm: {'yes' if summary['alarm'] else 'no'}"
    )


@app.command()
def run(
    host: HostOption = None,
    port: PortOption = None,
    workers: WorkersOption = None,
) -> None:
    """Everything on one machine: the API plus a selector and a drift worker, sharing one Redis.

    Without EDGEHARVEST_REDIS_URL, the embedded Redis is started first and the worker is
    pointed at them. In production run `serve`, `select` and `drift` as separate deployments.
    """
    import os
    import signal
    import subprocess

    from service.embedded_redis import redis_url_or_embedded
    from service.settings import Settings

    def exit_on_sigterm(signum: int, frame: object) -> None:
        # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for its
        # default action, which would end this process before the `finally` below stops the
        # workers and the embedded Redis (they were left running). Raised as an exit, it runs.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    settings = Settings()
    url, embedded = redis_url_or_embedded(settings.redis_url, settings.data_dir)
    # The API (this process) and the worker both use it.
    os.environ["EDGEHARVEST_REDIS_URL"] = url
    env = dict(os.environ)
    background: list[subprocess.Popen[bytes]] = []
    try:
        for command in ("select", "drift"):
            background.append(
                subprocess.Popen([sys.executable, "-m", "service.cli", command], env=env)
            )
        serve(host=host, port=port, model_dir=None, workers=workers)
    finally:
        for worker in background:
            worker.terminate()
        for worker in background:
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
        if embedded is not None:
            embedded.stop()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
