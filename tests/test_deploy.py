"""deploy/: the Kubernetes overlays render and validate, their settings agree with the
config they mount, the alert rules pass promtool, and the dashboard is well-formed."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from imgproxy.gateway import Gateway

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
OVERLAYS = ["sidecar", "gateway"]
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor"}


def tool(name: str) -> str:
    """A command-line tool that scripts/test installs: required in CI, else the test skips."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; scripts/test installs it")
        pytest.skip(f"{name} is not installed (scripts/test installs it)")
    return path


def render(overlay: str) -> list[dict]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(DEPLOY / "kubernetes" / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    return request.param, render(request.param)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def imgproxy_container(docs: list[dict]) -> tuple[dict, dict]:
    (deployment,) = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    for container in pod.get("initContainers", []) + pod["containers"]:
        if container["name"] == "imgproxy":
            return pod, container
    raise AssertionError("no imgproxy container")


def test_core_objects_validate_strictly(rendered):
    import kubernetes_validate

    _, docs = rendered
    kinds = {doc["kind"] for doc in docs}
    assert kinds >= {"ConfigMap", "ServiceAccount", "Deployment"}
    for doc in docs:
        if doc["kind"] in MONITORING_KINDS:
            continue
        kubernetes_validate.validate(doc, "1.37.0", strict=True)


def test_overlay_objects(rendered):
    overlay, docs = rendered
    kinds = {doc["kind"] for doc in docs}
    if overlay == "gateway":
        assert kinds >= {"Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"}
    else:
        assert "PodMonitor" in kinds
        pod, container = imgproxy_container(docs)
        assert container in pod["initContainers"] and container["restartPolicy"] == "Always"  # a native sidecar
        app = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in app["env"]}
        assert env["OPENAI_BASE_URL"] == "http://localhost:8080/v1"


def test_monitoring_objects_have_their_required_fields(rendered):
    """prometheus-operator CRDs are not in the Kubernetes schemas: check what the operator needs."""
    _, docs = rendered
    (monitor,) = [doc for doc in docs if doc["kind"] in MONITORING_KINDS]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    endpoints = spec["endpoints"] if monitor["kind"] == "ServiceMonitor" else spec["podMetricsEndpoints"]
    assert spec["selector"]["matchLabels"] and endpoints
    for endpoint in endpoints:
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # The selector picks the objects that expose the metrics port.
    targets = by_kind(docs, "Service") if monitor["kind"] == "ServiceMonitor" else by_kind(docs, "Deployment")
    for target in targets:
        labels = target["metadata"]["labels"] if monitor["kind"] == "ServiceMonitor" else target["spec"]["template"]["metadata"]["labels"]
        if all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items()):
            break
    else:
        raise AssertionError("the monitor selects nothing")


async def test_workload_agrees_with_its_config(rendered):
    _, docs = rendered
    pod, container = imgproxy_container(docs)
    (configmap,) = by_kind(docs, "ConfigMap")
    gateway = await Gateway.load(text=configmap["data"]["proxy.yaml"], env={})
    config = gateway.config
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == config.metrics.port
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        check = container[probe]["httpGet"]
        assert check["path"] == path and check["port"] in ("metrics", config.metrics.port)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop + config.server.drain_timeout < pod["terminationGracePeriodSeconds"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert "subPath" not in mounts["config"]  # ConfigMap updates arrive only without subPath
    assert container["args"] == ["--config", mounts["config"]["mountPath"] + "/proxy.yaml"]
    assert mounts["images"]["mountPath"] == config.images.directory
    assert config.server.reload_interval > 0


def test_restricted_pod_security(rendered):
    _, docs = rendered
    pod, _ = imgproxy_container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod.get("initContainers", []) + pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"] and container["resources"]["limits"]
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])


def test_dockerfile_runs_imgproxy_as_non_root():
    lines = [line.split() for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line and not line.startswith("#")]
    final = lines[max(i for i, line in enumerate(lines) if line[0] == "FROM"):]
    instructions = {line[0] for line in final}
    assert "USER" in instructions and ["USER", "10001:10001"] in final
    assert ["ENTRYPOINT", '["imgproxy",', '"serve"]'] in final
    assert not any(word in " ".join(line) for line in final for word in ("gcc", "build-essential"))


def test_alert_rules_pass_promtool():
    promtool = tool("promtool")
    checked = subprocess.run([promtool, "check", "rules", "rules.yaml"], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", "rules.test.yaml"], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_dashboard_is_well_formed():
    dashboard = json.loads((DEPLOY / "grafana" / "imgproxy.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"key", "model"} <= set(variables)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert any("$key" in e for e in exprs) and any("$model" in e for e in exprs)
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
