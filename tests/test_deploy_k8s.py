"""deploy/k8s/: validated offline against the Kubernetes schemas, and consistent with itself,
with the settings, the command line and the alert rules."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer.main
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError, all_versions

from service.cli import app as cli_app
from service.settings import Settings
from tests.test_deploy_promql import DEPLOY, RULES_FILE

K8S = DEPLOY / "k8s"
NAMESPACE = "edgeharvest"
# Prometheus Operator resources: no schema in kubernetes-validate; checked structurally below.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")

Resource = dict[str, Any]


def kustomization_resources(directory: Path) -> list[Resource]:
    """The resources a kustomization lists, following sub-kustomizations (as kustomize does)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    resources: list[Resource] = []
    for entry in kustomization["resources"]:
        path = directory / entry
        if path.is_dir():
            resources.extend(kustomization_resources(path))
        else:
            resources.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return resources


ALL = kustomization_resources(K8S)
BASE = kustomization_resources(K8S / "base")


def of_kind(kind: str, resources: list[Resource] = ALL) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def named(kind: str, name: str) -> Resource:
    (found,) = [r for r in of_kind(kind) if r["metadata"]["name"] == name]
    return found


def workloads() -> list[Resource]:
    return [r for r in ALL if r["kind"] in WORKLOAD_KINDS]


def containers(workload: Resource) -> list[dict[str, Any]]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (matchLabels and the In / NotIn / Exists operators)."""
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        value = labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and value is None:
            return False
    return True


def configmap_settings() -> dict[str, str]:
    return dict(named("ConfigMap", "edgeharvest-config")["data"])


KUBERNETES_VERSIONS = [all_versions()[0], all_versions()[-1]]


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(kubernetes_version: str) -> None:
    """Strict: unknown fields are errors, as `kubectl apply --validate=strict` would say."""
    unchecked = set()
    for resource in ALL:
        try:
            kubernetes_validate.validate(resource, kubernetes_version, strict=True)
        except SchemaNotFoundError:
            unchecked.add(resource["kind"])
        except ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(
                f"{resource['kind']}/{resource['metadata']['name']}: {where}: {exc.message}"
            )
    assert unchecked == OPERATOR_KINDS


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "replicas"), "two"),
        (("spec", "template", "spec", "containers", 0, "readinesProbe"), {}),
        (("spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"), "http"),
    ],
)
def test_the_schema_validation_has_teeth(path: tuple[str | int, ...], value: object) -> None:
    broken = copy.deepcopy(named("Deployment", "edgeharvest-api"))
    target: Any = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize(("directory", "expected"), [(K8S, ALL), (K8S / "base", BASE)])
def test_kubectl_kustomize_builds_namespaced_labelled_valid_resources(
    directory: Path, expected: list[Resource]
) -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    resources = [doc for doc in yaml.safe_load_all(built.stdout) if doc]

    def identities(items: list[Resource]) -> list[tuple[str, str]]:
        return sorted((r["kind"], r["metadata"]["name"]) for r in items)

    assert identities(resources) == identities(expected)
    for resource in resources:
        metadata = resource["metadata"]
        if resource["kind"] != "Namespace":
            assert metadata["namespace"] == NAMESPACE
        assert metadata["labels"]["app.kubernetes.io/part-of"] == "edgeharvest"
        if resource["kind"] not in OPERATOR_KINDS:
            kubernetes_validate.validate(resource, KUBERNETES_VERSIONS[-1], strict=True)


def test_services_select_their_pods_by_named_ports() -> None:
    for service in of_kind("Service"):
        selected = [
            w
            for w in workloads()
            if matches(
                {"matchLabels": service["spec"]["selector"]},
                w["spec"]["template"]["metadata"]["labels"],
            )
        ]
        assert len(selected) == 1, service["metadata"]["name"]
        port_names = {p["name"] for c in containers(selected[0]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, service["metadata"]["name"]


def test_workloads_select_their_own_template_and_probe_named_ports() -> None:
    for workload in workloads():
        spec = workload["spec"]
        assert matches(spec["selector"], spec["template"]["metadata"]["labels"])
        for container in containers(workload):
            port_names = {p["name"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                action = container.get(probe, {})
                port = (action.get("httpGet") or action.get("tcpSocket") or {}).get("port")
                assert port is None or port in port_names, (workload["metadata"]["name"], probe)


def test_the_api_is_probed_on_the_inference_protocol_health_endpoints() -> None:
    (api,) = containers(named("Deployment", "edgeharvest-api"))
    assert api["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert api["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert api["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert configmap_settings()["EDGEHARVEST_PORT"] == "8000"


def test_autoscaler_and_disruption_budget_target_the_api() -> None:
    api = named("Deployment", "edgeharvest-api")
    (hpa,) = of_kind("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "edgeharvest-api")
    assert 1 <= hpa["spec"]["minReplicas"] <= api["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    (pdb,) = of_kind("PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"], api["spec"]["template"]["metadata"]["labels"])
    for workload in workloads():
        if workload is not api:
            labels = workload["spec"]["template"]["metadata"]["labels"]
            assert not matches(pdb["spec"]["selector"], labels)
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_every_container_has_resources_and_runs_unprivileged() -> None:
    for workload in workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            assert "memory" in container["resources"]["limits"], where
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], where


def test_configmap_and_secret_references_resolve() -> None:
    configmaps = {c["metadata"]["name"] for c in of_kind("ConfigMap")}
    secrets = {s["metadata"]["name"]: s.get("stringData", {}) for s in of_kind("Secret")}
    for workload in workloads():
        for container in containers(workload):
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], variable["name"]


def test_the_secret_points_at_the_redis_service() -> None:
    secret = named("Secret", "edgeharvest-secrets")["stringData"]
    redis = named("StatefulSet", "edgeharvest-redis")
    service = named("Service", redis["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    port = service["spec"]["ports"][0]["port"]
    assert secret["redis-url"] == f"redis://{service['metadata']['name']}:{port}/0"
    (data,) = redis["spec"]["volumeClaimTemplates"]
    (mount,) = containers(redis)[0]["volumeMounts"]
    assert mount["name"] == data["metadata"]["name"]
    assert "--appendonly" in containers(redis)[0]["args"]


def test_configmap_values_are_settings_that_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each variable names a field of Settings and parses, exactly as a pod would read it."""
    values = configmap_settings()
    for key, value in values.items():
        assert key.startswith("EDGEHARVEST_"), key
        field = key.removeprefix("EDGEHARVEST_").lower()
        assert field in Settings.model_fields, f"{key} is not a setting"
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.port == 8000 and settings.worker_metrics_port == 9100
    assert str(settings.model_dir) == "/app/models"
    assert settings.monitoring_enabled is True


def test_containers_run_edgeharvest_commands() -> None:
    commands = set(typer.main.get_command(cli_app).commands)  # type: ignore[attr-defined]
    ran = {}
    for workload in workloads():
        if workload["metadata"]["name"] == "edgeharvest-redis":
            continue
        (container,) = containers(workload)
        program, command, *options = container["command"]
        assert program == "edgeharvest" and command in commands
        ran[workload["metadata"]["name"]] = [command, *options]
    assert ran == {
        "edgeharvest-api": ["serve", "--host", "0.0.0.0"],
        "edgeharvest-selector": ["select"],
        "edgeharvest-drift": ["drift"],
    }
    port = int(configmap_settings()["EDGEHARVEST_WORKER_METRICS_PORT"])
    for name in ("edgeharvest-selector", "edgeharvest-drift"):
        (container,) = containers(named("Deployment", name))
        assert container["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]


def test_service_monitors_scrape_every_api_and_worker_service_as_the_rules_expect() -> None:
    monitors = of_kind("ServiceMonitor")
    scraped: dict[str, str] = {}
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        spec = monitor["spec"]
        services = [
            s for s in of_kind("Service") if matches(spec["selector"], s["metadata"]["labels"])
        ]
        assert services, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
        for endpoint in spec["endpoints"]:
            assert endpoint["path"] == "/metrics"
            assert DURATION.match(endpoint["interval"]) and DURATION.match(
                endpoint["scrapeTimeout"]
            )
            for service in services:
                names = {p["name"] for p in service["spec"]["ports"]}
                assert endpoint["port"] in names, (monitor["metadata"]["name"], endpoint["port"])
                scraped[service["metadata"]["name"]] = endpoint["port"]
    # Without jobLabel, the operator names each job after its Service: the rules' job names.
    assert not any("jobLabel" in m["spec"] for m in monitors)
    jobs = set(re.findall(r'job=~?"([^"]+)"', RULES_FILE.read_text()))
    expanded = {service for service in scraped for job in jobs if re.fullmatch(job, service)}
    assert (
        expanded
        == set(scraped)
        == {
            "edgeharvest-api",
            "edgeharvest-selector",
            "edgeharvest-drift",
        }
    )


def test_prometheus_rule_holds_exactly_the_rules_file() -> None:
    (rule,) = of_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load(RULES_FILE.read_text()), (
        "deploy/k8s/prometheusrule.yaml is stale: run make deploy/k8s/prometheusrule.yaml"
    )


def test_the_base_leaves_out_only_the_operator_resources() -> None:
    def identities(items: list[Resource]) -> set[tuple[str, str]]:
        return {(r["kind"], r["metadata"]["name"]) for r in items}

    assert {kind for kind, _ in identities(ALL) - identities(BASE)} == OPERATOR_KINDS
    assert not OPERATOR_KINDS & {r["kind"] for r in BASE}
