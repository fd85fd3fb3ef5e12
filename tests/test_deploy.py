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


# What the gateway overlay's Secrets give its pods (values only for loading the config here).
GATEWAY_ENV = {"IMGPROXY_REDIS_URL": "redis://imgproxy-redis:6379/0", "IMGPROXY_S3_BUCKET": "images", "IMGPROXY_SIGNING_KEY": "k" * 32}


async def test_workload_agrees_with_its_config(rendered):
    overlay, docs = rendered
    pod, container = imgproxy_container(docs)
    (configmap,) = by_kind(docs, "ConfigMap")
    gateway = await Gateway.load(text=configmap["data"]["proxy.yaml"], env=GATEWAY_ENV if overlay == "gateway" else {})
    config = gateway.config
    env_names = {e["name"] for e in container["env"]}
    for variable in ("IMGPROXY_REDIS_URL", "IMGPROXY_S3_BUCKET", "IMGPROXY_SIGNING_KEY") if overlay == "gateway" else ():
        assert variable in env_names, variable
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == config.metrics.port
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        check = container[probe]["httpGet"]
        assert check["path"] == path and check["port"] in ("metrics", config.metrics.port)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    # imgproxy exits within drain_timeout + 1 s of SIGTERM; the rest is margin.
    assert pre_stop + config.server.drain_timeout + 1 < pod["terminationGracePeriodSeconds"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert "subPath" not in mounts["config"]  # ConfigMap updates arrive only without subPath
    assert container["args"] == ["--config", mounts["config"]["mountPath"] + "/proxy.yaml"]
    if overlay == "gateway":
        # Replicas share state and images through Redis and S3, not a ReadWriteMany volume.
        assert config.sections["state"]["backend"] == "redis" and config.sections["images"]["store"] == "s3"
        assert "images" not in mounts and not by_kind(docs, "PersistentVolumeClaim")
    else:
        assert mounts["images"]["mountPath"] == config.images.directory
        # The store evicts before the kubelet would evict the pod for a full emptyDir.
        (images,) = [v for v in pod["volumes"] if v["name"] == "images"]
        limit = images["emptyDir"]["sizeLimit"]
        assert limit.endswith("Gi") and 0 < config.images.max_bytes < int(limit[:-2]) * 1024**3
    assert config.server.reload_interval > 0
    # No name hash on the ConfigMap: an edit reaches running pods as a hot reload, not a rollout.
    (config_volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"] == "imgproxy-config"


def test_gateway_ingress_and_network_policy():
    docs = render("gateway")
    (ingress,) = by_kind(docs, "Ingress")
    (service,) = by_kind(docs, "Service")
    (policy,) = by_kind(docs, "NetworkPolicy")
    _, container = imgproxy_container(docs)
    assert "cert-manager.io/cluster-issuer" in ingress["metadata"]["annotations"]
    (tls,) = ingress["spec"]["tls"]
    hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
    assert set(tls["hosts"]) == hosts and tls["secretName"]
    backends = [path["backend"]["service"] for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert all(b["name"] == service["metadata"]["name"] and b["port"]["name"] in service_ports for b in backends)
    # The ingress controller's namespace may reach the API port the container listens on.
    api_port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    admitted = [
        rule for rule in policy["spec"]["ingress"]
        if any(peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == "ingress-nginx" for peer in rule["from"])
    ]
    assert admitted and all(any(p["port"] == api_port for p in rule["ports"]) for rule in admitted)
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    assert {443, 6379} <= egress_ports  # providers and S3; Redis


def test_redis_component_renders_and_validates(tmp_path):
    import kubernetes_validate

    overlay = tmp_path / "try-it"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{os.path.relpath(DEPLOY / 'kubernetes' / 'overlays' / 'gateway', overlay)}]\n"
        f"components: [{os.path.relpath(DEPLOY / 'kubernetes' / 'components' / 'redis', overlay)}]\n"
    )
    result = subprocess.run([tool("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "imgproxy-redis"]
    (redis_service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "imgproxy-redis"]
    assert f"//{redis_service['metadata']['name']}:{redis_service['spec']['ports'][0]['port']}/" in secret["stringData"]["url"]
    for doc in docs:
        if doc["kind"] not in MONITORING_KINDS:
            kubernetes_validate.validate(doc, "1.37.0", strict=True)


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
