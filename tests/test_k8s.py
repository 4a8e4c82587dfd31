"""The Kubernetes and KServe manifests render, validate, and agree with the server.

No cluster can run where these tests run, so they check what can be checked offline: every
kustomization renders with `kubectl kustomize`, every built-in kind validates against the
Kubernetes API schemas of KUBERNETES_VERSION (kubernetes-validate bundles them; custom resources
have no schema there and are listed), and the ports, probes, grace periods, flags, image name and
user agree with the server's own defaults, the Dockerfile and docker-compose.yml. One test runs the
InferenceService's container as written, under a read-only root with only its writable directory.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from cifar10_serving.server.config import ENV_PREFIX, ServerConfig, parse_config
from cifar10_serving.server.metrics import Metrics
from tests.helpers.models import export_tiny

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KSERVE = ROOT / "deploy" / "kserve"
KUBECTL = shutil.which("kubectl")
# The oldest release with everything used: native gRPC probes (GA in 1.27) and the preStop `sleep`
# action (beta, on by default, in 1.30); validated against the schemas of the kubectl found here.
KUBERNETES_VERSION = "1.32"
CUSTOM_KINDS = {"InferenceService", "PodMonitor"}  # no schema in kubernetes-validate
# Knative's queue-proxy sidecar (KServe's Serverless mode) owns these ports and mount paths.
KNATIVE_RESERVED_PORTS = {8008, 8012, 8013, 8022, 9090, 9091}
KNATIVE_RESERVED_PATHS = {"/", "/dev", "/dev/log", "/tmp", "/var", "/var/log"}
DEFAULTS = ServerConfig()
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["classifier"]
OVERLAYS = ("overlays/cpu", "overlays/gpu")
KSERVE_FILES = {"kserve": "inferenceservice.yaml", "kserve-http": "inferenceservice-http.yaml"}  # one per protocol

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: the manifests cannot be rendered")


def kustomize(directory: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def with_component(tmp_path: Path, overlay: str, component: str) -> list[dict]:
    """``overlay`` with ``components/<component>`` added, as the README and docs tell users to."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / overlay, tmp_path)],  # kustomize refuses absolute paths
        "components": [os.path.relpath(K8S / "components" / component, tmp_path)],
    }))
    return kustomize(tmp_path)


def kserve_with(tmp_path: Path, files: list[str]) -> list[dict]:
    """deploy/kserve with ``files`` as its resources, the edit its kustomization.yaml tells REST users to make."""
    shutil.copytree(KSERVE, tmp_path, dirs_exist_ok=True)
    kustomization = yaml.safe_load((tmp_path / "kustomization.yaml").read_text())
    assert kustomization["resources"] == [KSERVE_FILES["kserve"]]  # gRPC unless told otherwise
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({**kustomization, "resources": files}))
    return kustomize(tmp_path)


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(docs: list[dict]) -> dict:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def server_config(c: dict) -> ServerConfig:
    """The settings the server would run with: the container's flags over its CIFAR10_* variables."""
    return parse_config(c["args"], environ=env(c))


def ports(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    return ({name: kustomize(K8S / name) for name in ("base", *OVERLAYS)} | {"kserve": kustomize(KSERVE)}
            | {"kserve-http": kserve_with(tmp_path_factory.mktemp("kserve-http"), [KSERVE_FILES["kserve-http"]])})


# ----------------------------------------------------------------------------- rendering and schemas
def test_every_kustomization_in_the_repository_is_rendered_here():
    found = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "deploy").rglob("kustomization.yaml")}
    assert found == {"deploy/k8s/base", "deploy/k8s/overlays/cpu", "deploy/k8s/overlays/gpu",
                     "deploy/k8s/components/queue-autoscaling", "deploy/k8s/components/http-probes",
                     "deploy/kserve"}
    manifests = {p.name for p in KSERVE.glob("inferenceservice*.yaml")}
    assert manifests == set(KSERVE_FILES.values())  # each is rendered: "kserve" and "kserve-http"


@pytest.mark.parametrize("name", ["base", *OVERLAYS, "kserve", "kserve-http", "cpu+queue-autoscaling",
                                  "cpu+http-probes"])
def test_renders_and_every_built_in_kind_validates(name, rendered, tmp_path):
    import kubernetes_validate

    overlay, _, component = name.partition("+")
    docs = with_component(tmp_path, f"overlays/{overlay}", component) if component else rendered[name]
    assert docs
    unchecked, errors = set(), []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # strict: unknown fields fail
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.add(doc["kind"])
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert not errors
    assert unchecked <= CUSTOM_KINDS, f"kinds without a schema: {unchecked - CUSTOM_KINDS}"


def test_the_base_has_each_piece_the_overlays_share(rendered):
    kinds = sorted(d["kind"] for d in rendered["base"])
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "Service"]
    for overlay in OVERLAYS:
        assert sorted(d["kind"] for d in rendered[overlay]) == kinds


# ----------------------------------------------------------------------------- image and command
@pytest.mark.parametrize("name", [*OVERLAYS, *KSERVE_FILES])
def test_the_image_is_the_one_compose_builds(name, rendered):
    images = [c["image"] for d in rendered[name] for c in _pod_spec(d).get("containers", [])]
    assert images and all(image.rsplit(":", 1)[0].rsplit("/", 1)[-1] == COMPOSE["image"] for image in images)
    kustomization = yaml.safe_load(((KSERVE if name in KSERVE_FILES else K8S / name) / "kustomization.yaml").read_text())
    assert [i["name"] for i in kustomization["images"]] == [COMPOSE["image"]]


def _pod_spec(doc: dict) -> dict:
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]
    if doc["kind"] == "InferenceService":
        return doc["spec"]["predictor"]
    return {}


def test_the_command_is_the_servers_installed_script(rendered):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in (*OVERLAYS, *KSERVE_FILES):
        for doc in rendered[name]:
            for c in _pod_spec(doc).get("containers", []):
                (script,) = c["command"]
                assert scripts[script] == "cifar10_serving.server.main:main"


# ----------------------------------------------------------------------------- ports, probes, grace
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probes_are_the_servers(overlay, rendered):
    c = container(rendered[overlay])
    config = server_config(c)
    assert (config.host, config.metrics_host) == ("0.0.0.0", "0.0.0.0")  # /metrics too: its default is loopback
    assert ports(c) == {"grpc": DEFAULTS.port, "http": DEFAULTS.http_port, "metrics": DEFAULTS.metrics_port}
    assert (config.port, config.http_port, config.metrics_port) == (DEFAULTS.port, DEFAULTS.http_port,
                                                                    DEFAULTS.metrics_port)
    assert int(COMPOSE["ports"][0].split(":")[1]) == config.port
    assert int(COMPOSE["ports"][1].split(":")[1]) == config.http_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": config.port, "service": ""}, probe  # the whole server's health
    annotations = one(rendered[overlay], "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.metrics_port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_outlives_its_drain(overlay, rendered):
    pod = one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    c = container(rendered[overlay])
    config = server_config(c)
    assert config.grace_period_seconds == DEFAULTS.grace_period_seconds
    pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 1 <= pause <= 10  # long enough for endpoints to drop the pod, short enough not to stall rollouts
    # SIGTERM comes after the pause; the server then drains for up to its grace and stops its batchers.
    assert pod["terminationGracePeriodSeconds"] >= pause + config.grace_period_seconds + 5
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > pause + config.grace_period_seconds
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 120  # loading and warming up take a while


def test_the_rollout_keeps_capacity_and_the_budget_leaves_a_replica(rendered):
    docs = rendered["overlays/cpu"]
    deployment, hpa, pdb = one(docs, "Deployment"), one(docs, "HorizontalPodAutoscaler"), one(docs, "PodDisruptionBudget")
    assert "replicas" not in deployment["spec"]  # the HPA owns it; apply must not reset it
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()


def test_services_for_an_l7_proxy_and_for_client_side_round_robin(rendered):
    docs = rendered["overlays/cpu"]
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    proxied, headless = one(docs, "Service", "cifar10-classifier"), one(docs, "Service", "cifar10-classifier-headless")
    assert headless["spec"]["clusterIP"] == "None" and "clusterIP" not in proxied["spec"]
    for service in (proxied, headless):
        assert service["spec"]["selector"].items() <= labels.items()
        port = service["spec"]["ports"][0]
        assert port["appProtocol"] == "kubernetes.io/h2c" and port["targetPort"] == "grpc"
    # the Open Inference Protocol over HTTP beside gRPC on the proxied Service (the headless one is for gRPC's
    # client-side round robin)
    assert proxied["spec"]["ports"][1] == {"name": "http", "port": DEFAULTS.http_port, "targetPort": "http",
                                           "protocol": "TCP", "appProtocol": "http"}
    assert len(headless["spec"]["ports"]) == 1
    assert headless["spec"]["ports"][0]["port"] == DEFAULTS.port  # clients dial the pods' own port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_http_probes_component_probes_the_http_port_the_service_routes(overlay, rendered, tmp_path, tiny_server):
    docs = with_component(tmp_path, overlay, "http-probes")
    c, before = container(docs), copy.deepcopy(container(rendered[overlay]))  # the fixture is shared
    paths = {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
             "livenessProbe": "/v2/health/live"}
    for probe, path in paths.items():
        assert c[probe].pop("httpGet") == {"path": path, "port": "http"}, probe
        assert "grpc" not in c[probe], probe  # a probe with two handlers is refused by the API server
        before[probe].pop("grpc")
        assert c[probe] == before[probe], probe  # the base's timings kept
    assert ports(c)["http"] == server_config(c).http_port == DEFAULTS.http_port
    proxied = one(docs, "Service", "cifar10-classifier")
    assert {"name": "http", "port": DEFAULTS.http_port, "targetPort": "http", "protocol": "TCP",
            "appProtocol": "http"} in proxied["spec"]["ports"]
    # the paths are the server's: a real one, warmed up, answers each with 200
    for path in set(paths.values()):
        with urllib.request.urlopen(f"http://127.0.0.1:{tiny_server.app.http_port}{path}", timeout=10) as answer:
            assert answer.status == 200 and answer.read() in (b'{"ready": true}', b'{"live": true}'), path


# ----------------------------------------------------------------------------- resources and security
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_and_forward_threads_fit_the_request(overlay, rendered):
    c = container(rendered[overlay])
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert {"cpu", "memory"} <= requests.keys() and "memory" in limits
    assert "cpu" not in limits  # throttling would show up as p99 spikes
    # os.cpu_count() is the node's in a container: the thread budget must be set, to the request.
    assert server_config(c).torch_threads == max(1, int(cpu_cores(requests["cpu"])))


def test_the_device_each_overlay_asks_for(rendered):
    assert server_config(container(rendered["overlays/cpu"])).device == "cpu"
    gpu = container(rendered["overlays/gpu"])
    assert server_config(gpu).device == "cuda"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = one(rendered["overlays/gpu"], "Deployment")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "nvidia.com/gpu" not in str(container(rendered["overlays/cpu"])["resources"])


def dockerfile_uid() -> int:
    return int(re.search(r"useradd\b.*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_non_root_with_a_read_only_root_and_one_writable_temporary_directory(overlay, rendered):
    pod = one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    c = container(rendered[overlay])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert pod["automountServiceAccountToken"] is False
    (mount,) = c["volumeMounts"]
    assert mount["mountPath"] == env(c).get("TMPDIR", "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == mount["name"])


def test_no_service_can_inject_a_setting(rendered):
    """Service links put <NAME>_PORT=tcp://... and the like into pods; a Service named "cifar10" would
    set CIFAR10_PORT and break the server's config. They are off, and no name here would collide."""
    settings = {ENV_PREFIX + name.upper() for name in ServerConfig.__dataclass_fields__}
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        assert one(docs, "Deployment")["spec"]["template"]["spec"]["enableServiceLinks"] is False
        for service in (d for d in docs if d["kind"] == "Service"):
            prefix = service["metadata"]["name"].upper().replace("-", "_")
            injected = {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
            assert not injected & settings, service["metadata"]["name"]


# ----------------------------------------------------------------------------- queue autoscaling
def test_the_queue_metric_the_autoscaler_asks_for_is_one_the_server_exports(tmp_path, rendered):
    docs = with_component(tmp_path, "overlays/cpu", "queue-autoscaling")
    hpa = one(docs, "HorizontalPodAutoscaler")
    cpu, pods = hpa["spec"]["metrics"]
    assert cpu == one(rendered["overlays/cpu"], "HorizontalPodAutoscaler")["spec"]["metrics"][0]  # kept, not replaced
    metric = pods["pods"]["metric"]["name"]
    rules = yaml.safe_load((K8S / "components" / "queue-autoscaling" / "prometheus-adapter-rules.yaml").read_text())
    (rule,) = rules["rules"]["custom"]
    assert rule["name"]["as"] == metric
    assert re.fullmatch(rule["name"]["matches"], metric) and rule["seriesQuery"].startswith(metric + "{")
    registry = CollectorRegistry()
    Metrics(registry)
    gauges = {f.name for f in registry.collect() if f.type == "gauge"}
    assert metric in gauges
    # One full batch waiting per pod: well before the queue is full and the pod refuses work.
    target = int(pods["pods"]["target"]["averageValue"])
    assert target == DEFAULTS.max_batch_size < DEFAULTS.max_queue_images
    monitor = one(docs, "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and "metrics" in ports(container(docs))


# ----------------------------------------------------------------------------- KServe
def test_the_inference_service_is_a_grpc_v2_custom_predictor(rendered):
    isvc = one(rendered["kserve"], "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = isvc["spec"]["predictor"]
    (c,) = predictor["containers"]
    assert c["name"] == "kserve-container"
    (port,) = c["ports"]  # Knative routes one port; its name picks HTTP/2
    assert port == {"name": "h2c", "containerPort": 8081, "protocol": "TCP"}
    assert env(c)["PROTOCOL"] == "v2"  # KServe's webhook takes v1 or v2 for a custom predictor
    config = server_config(c)
    assert (config.host, config.port) == ("0.0.0.0", port["containerPort"])
    assert config.metrics_host == "0.0.0.0"  # its default is loopback: set, so the scrape reaches it
    assert config.grace_period_seconds == DEFAULTS.grace_period_seconds
    assert config.http_port == 8080  # KServe's HTTP port, in the pod beside gRPC; Knative routes the one above
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": config.port, "service": ""}
    assert c["livenessProbe"]["initialDelaySeconds"] >= 120  # no startupProbe: loading must not look like a hang
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert int(annotations["prometheus.kserve.io/port"]) == config.metrics_port


def test_the_rest_inference_service_is_the_grpc_one_with_rest_routed(rendered, tmp_path):
    grpc_isvc, isvc = (copy.deepcopy(one(rendered[name], "InferenceService")) for name in KSERVE_FILES)  # shared
    (c,) = isvc["spec"]["predictor"]["containers"]
    (port,) = c["ports"]  # Knative routes one port; `http1` is HTTP/1.1
    assert port == {"name": "http1", "containerPort": 8080, "protocol": "TCP"}
    config = server_config(c)
    assert config.http_port == port["containerPort"] and config.port != config.http_port
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port["containerPort"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port["containerPort"]}
    assert c["livenessProbe"]["initialDelaySeconds"] >= 120  # no startupProbe: loading must not look like a hang
    # everything else is the gRPC manifest's, so the two cannot drift apart
    (grpc_c,) = grpc_isvc["spec"]["predictor"]["containers"]
    for key in ("ports", "readinessProbe", "livenessProbe"):
        c.pop(key), grpc_c.pop(key)
    assert c == grpc_c
    assert {k: v for k, v in isvc["spec"]["predictor"].items() if k != "containers"} == \
           {k: v for k, v in grpc_isvc["spec"]["predictor"].items() if k != "containers"}
    assert isvc["metadata"]["annotations"] == grpc_isvc["metadata"]["annotations"]
    # both can be applied side by side, one service per protocol
    both = kserve_with(tmp_path, list(KSERVE_FILES.values()))
    assert sorted(d["metadata"]["name"] for d in both) == ["cifar10-classifier", "cifar10-classifier-http"]


@pytest.mark.parametrize("name", KSERVE_FILES)
def test_the_inference_service_avoids_what_knative_reserves(name, rendered):
    predictor = one(rendered[name], "InferenceService")["spec"]["predictor"]
    (c,) = predictor["containers"]
    config = server_config(c)
    assert not {config.port, config.http_port, config.metrics_port} & KNATIVE_RESERVED_PORTS
    assert len({config.port, config.http_port, config.metrics_port}) == 3
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert not mounts & KNATIVE_RESERVED_PATHS
    assert env(c)["TMPDIR"] in mounts  # torch's temporary directory is the writable mount
    assert "securityContext" not in predictor  # pod-level: off by default in Knative
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["runAsUser"] == dockerfile_uid()
    requests = c["resources"]["requests"]
    assert config.torch_threads == max(1, int(cpu_cores(requests["cpu"])))


# ----------------------------------------------------------------------------- read-only root, for real
def _can_make_read_only_mounts() -> bool:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as probe:  # unshare may work where mount does not (some sandboxes)
        script = f"mount --bind {probe} {probe} && mount -o remount,ro,bind {probe} && ! touch {probe}/x 2>/dev/null"
        return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                              capture_output=True, timeout=10).returncode == 0


@pytest.mark.system
@pytest.mark.skipif(not _can_make_read_only_mounts(), reason="needs root and unshare(1) to make a read-only mount namespace")
def test_the_kserve_container_serves_both_protocols_from_a_read_only_root(rendered, tmp_path):
    """The InferenceService's container as written (its flags and variables; on loopback, a free port
    and the tiny model instead of 0.0.0.0:8081 and the bundled ones), with every file system read-only
    in a private mount namespace but the directory its TMPDIR names: it reports SERVING on the
    standard health service and ready on the Open Inference Protocol, on the one port KServe routes."""
    from cifar10_serving.protos.inference import open_inference_grpc_pb2 as v2
    from cifar10_serving.protos.inference import open_inference_grpc_pb2_grpc as v2_grpc

    (c,) = one(rendered["kserve"], "InferenceService")["spec"]["predictor"]["containers"]
    models, scratch = tmp_path / "models", tmp_path / "scratch"
    export_tiny(models, "tiny-max")
    scratch.mkdir()
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    port, metrics_port = ports
    argv = [sys.executable, "-m", "cifar10_serving.server", *c["args"], "--host", "127.0.0.1", "--port", str(port),
            "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), "--models-dir", str(models),
            "--default-model", "tiny-max"]
    # A process that imported torch has TORCHINDUCTOR_CACHE_DIR set (torch sets it): a pod does not.
    environ = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    environ |= env(c) | {"TMPDIR": str(scratch)}  # the emptyDir mounted where the container's TMPDIR points
    read_only = " ".join(sorted({"/", "/tmp", "/var/tmp", str(Path.home()), str(ROOT), sys.prefix}))
    script = (f"for d in {read_only}; do mount --bind $d $d && mount -o remount,ro,bind $d || exit 3; done; "
              f"mount --bind {scratch} {scratch} && mount -o remount,rw,bind {scratch} || exit 4; "
              f"touch {models}/probe 2>/dev/null && exit 5; "  # the models' directory must be read-only now
              f"exec {shlex.join(argv)}")
    log = tmp_path / "server.log"  # a file, not a pipe that nobody reads until the end
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd="/",
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), env=environ)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, f"the server exited {proc.returncode}: {log.read_text()[-2000:]}"
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "not SERVING within 180 s"
                time.sleep(0.5)
            oip = v2_grpc.GRPCInferenceServiceStub(channel)
            assert oip.ServerReady(v2.ServerReadyRequest(), timeout=10).ready
            assert oip.ModelReady(v2.ModelReadyRequest(name="tiny-max"), timeout=10).ready
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert "cifar10_requests_total" in body
        assert any(p.name.startswith("torchinductor") for p in scratch.iterdir())  # why the directory is needed
    finally:
        proc.terminate()
        proc.wait(30)
