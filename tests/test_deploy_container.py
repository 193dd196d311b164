"""The Dockerfile, docker-compose and Grafana provisioning: what can be checked without a Docker
engine. The compose file is validated against the Compose Specification schema
(check-jsonschema's vendored copy, offline), and the image's HEALTHCHECK command is run for
real against the running service."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from service.cli import app as cli_app
from service.settings import Settings
from tests.support import REPO_ROOT, free_port
from tests.test_deploy_promql import DASHBOARD_FILE, DEPLOY

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    parsed = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            parsed.append((keyword.upper(), " ".join(arguments.split())))
    return parsed


def final_stage() -> list[tuple[str, str]]:
    parsed = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(parsed) if keyword == "FROM")
    return parsed[last_from:]


def healthcheck_command() -> list[str]:
    (arguments,) = [a for k, a in final_stage() if k == "HEALTHCHECK"]
    return list(json.loads(arguments.split(" CMD ", 1)[1]))


def compose() -> dict[str, Any]:
    definition: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return definition


def cli_commands() -> set[str]:
    return set(typer.main.get_command(cli_app).commands)  # type: ignore[attr-defined]


def test_the_image_is_multi_stage_slim_and_runs_unprivileged() -> None:
    parsed = instructions()
    assert [a for k, a in parsed if k == "ARG"] == ["PYTHON_IMAGE=python:3.11-slim-bookworm"]
    stages = [a for k, a in parsed if k == "FROM"]
    assert stages == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]
    final = final_stage()
    (user,) = [a for k, a in final if k == "USER"]
    assert int(user.split(":")[0]) != 0
    # Only the build stage installs anything, and never the [dev] extra.
    installs = [a for k, a in parsed if k == "RUN" and "pip install" in a]
    assert installs and not any("[dev]" in a or ".[" in a for a in installs)
    assert not any(k == "RUN" and "pip install" in a for k, a in final)
    copies = [a for k, a in final if k == "COPY"]
    assert copies == ["--from=build /opt/edgeharvest /opt/edgeharvest", "models ./models"]


def test_one_image_serves_the_api_by_default_and_runs_workers_by_command() -> None:
    (cmd,) = [a for k, a in final_stage() if k == "CMD"]
    assert json.loads(cmd) == ["edgeharvest", "serve", "--host", "0.0.0.0"]
    assert {"serve", "select", "drift"} <= cli_commands()
    assert "8000" in next(a for k, a in final_stage() if k == "EXPOSE").split()


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    """.dockerignore lets through exactly the files the COPY instructions need."""
    allowed = [
        line[1:].rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.startswith("!")
    ]
    assert DOCKERIGNORE.read_text().splitlines()[1] == "*"
    for keyword, arguments in instructions():
        if keyword != "COPY" or arguments.startswith("--from"):
            continue
        *sources, _ = arguments.split()
        for source in sources:
            assert (REPO_ROOT / source).exists(), source
            assert any(source == a or source.startswith(f"{a}/") for a in allowed), source


def test_the_healthcheck_command_probes_the_live_endpoint(live_server: str) -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"] and "/v2/health/live" in command[2]
    port = str(urlsplit(live_server).port)
    # The image's python has the same standard library: run the probe as the container would.
    healthy = subprocess.run(
        [sys.executable, *command[1:]],
        env={**os.environ, "EDGEHARVEST_PORT": port},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert healthy.returncode == 0, healthy.stderr
    unhealthy = subprocess.run(
        [sys.executable, *command[1:]],
        env={**os.environ, "EDGEHARVEST_PORT": str(free_port())},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert unhealthy.returncode != 0


def run_compose_schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    executable = Path(sys.executable).parent / "check-jsonschema"
    return subprocess.run(
        [str(executable), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_file_is_valid_against_the_compose_specification(tmp_path: Path) -> None:
    result = run_compose_schema_check(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    # ...and the check has teeth: a misspelt key fails it.
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE_FILE.read_text()
    broken.write_text(
        text.replace("command: [edgeharvest, select]", "comand: [edgeharvest, select]")
    )
    result = run_compose_schema_check(broken)
    assert result.returncode != 0 and "comand" in result.stdout + result.stderr


def test_compose_runs_the_three_processes_with_real_settings() -> None:
    services = compose()["services"]
    assert {"api", "selector", "drift", "redis", "prometheus", "grafana"} == set(services)
    commands = {name: services[name]["command"] for name in ("api", "selector", "drift")}
    assert commands == {
        "api": ["edgeharvest", "serve", "--host", "0.0.0.0"],
        "selector": ["edgeharvest", "select"],
        "drift": ["edgeharvest", "drift"],
    }
    for name in ("api", "selector", "drift"):
        environment = services[name]["environment"]
        for key in environment:
            assert key.removeprefix("EDGEHARVEST_").lower() in Settings.model_fields, key
        assert urlsplit(environment["EDGEHARVEST_REDIS_URL"]).hostname == "redis"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["redis"]["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])


def test_compose_prometheus_scrapes_each_service_on_its_port() -> None:
    services = compose()["services"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {
        job["job_name"]: (sd["names"], sd["port"])
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
    }
    worker_port = int(services["selector"]["environment"]["EDGEHARVEST_WORKER_METRICS_PORT"])
    assert targets == {
        "edgeharvest-api": (["api"], Settings.model_fields["port"].default),
        "edgeharvest-selector": (["selector"], worker_port),
        "edgeharvest-drift": (["drift"], worker_port),
    }
    assert services["drift"]["environment"]["EDGEHARVEST_WORKER_METRICS_PORT"] == str(worker_port)
    mounts = services["prometheus"]["volumes"]
    assert "./prometheus:/etc/prometheus:ro" in mounts
    assert config["rule_files"] == ["rules.yml"]


def test_compose_mounts_exist_and_grafana_finds_dashboard_and_datasource() -> None:
    services = compose()["services"]
    mounts: dict[str, str] = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target, *_ = volume.split(":")
            if source.startswith("."):
                assert (COMPOSE_FILE.parent / source).exists(), source
                mounts[target] = source
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    (provider,) = yaml.safe_load(
        (GRAFANA_PROVISIONING / "dashboards" / "edgeharvest.yml").read_text()
    )["providers"]
    dashboard_mount = next(t for t, s in mounts.items() if s == "./grafana/dashboard.json")
    assert str(Path(dashboard_mount).parent) == provider["options"]["path"]
    (datasource,) = yaml.safe_load(
        (GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert urlsplit(datasource["url"]).hostname == "prometheus"
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["current"]["value"] == datasource["uid"]
    assert datasource["type"] == variable["query"] == "prometheus"


@pytest.mark.parametrize("service", ["selector", "drift"])
def test_worker_containers_probe_their_metrics_port(service: str) -> None:
    definition = compose()["services"][service]
    probe = " ".join(definition["healthcheck"]["test"])
    port = definition["environment"]["EDGEHARVEST_WORKER_METRICS_PORT"]
    assert f"http://127.0.0.1:{port}/metrics" in probe
