"""The compose stack: docker-compose.yml plus deploy/podman/compose.override.yml, run by podman-compose.

The classifier and Prometheus each in their own container on the project's network (Grafana has no
image here; tests/test_dashboard.py checks its dashboard offline). The override publishes the base
file's ports, on loopback; the classifier answers on both of its own (gRPC and HTTP). Prometheus, in
its container, scrapes the classifier in its container by its service name; after traffic from the
host through the published port, the latency histogram counts exactly the requests sent, and every
dashboard query runs without error.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cifar10_serving.client import ClassifierClient, ClassifierError
from tests.container.conftest import COMPOSE, OWNER, PODMAN_DIR, ROOT, podman, run, wait_for, wait_healthy
from tests.test_dashboard import dashboard, fill_in, queries

pytestmark = pytest.mark.system  # the compose stack, built and run with podman

JOB = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"][0]["job_name"]
SCRAPE_SECONDS = 60  # the repository's 5 s scrape interval, many times over
# Read as plain YAML: "!override" (replace the base file's list) is a compose tag, not a value.
OVERRIDE = yaml.safe_load((PODMAN_DIR / "compose.override.yml").read_text().replace("!override", ""))
GRPC_PORT, HTTP_PORT, PROMETHEUS_PORT = 50051, 8000, 9090  # in the containers: the server's and Prometheus's defaults


def published(service: str) -> dict[int, str]:
    """{container port: the loopback address the override publishes it on}."""
    addresses = {}
    for port in OVERRIDE["services"][service]["ports"]:
        host, host_port, container_port = port.split(":")
        addresses[int(container_port)] = f"{host}:{host_port}"
    return addresses


def assert_free(address: str) -> None:
    host, port = address.split(":")
    with socket.socket() as s:
        try:
            s.bind((host, int(port)))
        except OSError as exc:
            raise AssertionError(f"{address} is taken ({exc}): the stack publishes there; stop what holds it") from None


def podman_compose() -> str:
    """podman-compose beside this Python (a venv), else on PATH."""
    beside = Path(sys.executable).parent / "podman-compose"
    found = str(beside) if beside.exists() else shutil.which("podman-compose")
    assert found, "podman-compose is missing: pip install podman-compose (.ci/containers does)"
    return found


@dataclass(frozen=True)
class Stack:
    project: str
    env: dict
    target: str  # the classifier's published gRPC port
    http: str  # the classifier's published HTTP port (the Open Inference Protocol), as a URL
    prometheus: str  # Prometheus's published HTTP port

    def compose(self, *args: str, timeout: float = 300, check: bool = True):
        return run([str(PODMAN_DIR / "compose.sh"), "-p", self.project, *args], timeout=timeout, check=check,
                   env=self.env)

    def container(self, service: str) -> str:
        (name,) = podman("ps", "-a", "--format", "{{.Names}}",
                         "--filter", f"label=io.podman.compose.project={self.project}",
                         "--filter", f"label=com.docker.compose.service={service}").stdout.split()
        return name

    def api(self, path: str, **params) -> dict:
        url = f"{self.prometheus}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = json.loads(urllib.request.urlopen(url, timeout=30).read())
        except urllib.error.HTTPError as exc:  # a query Prometheus rejects: 400 with the reason in the body
            raise AssertionError(f"{params}: HTTP {exc.code}: {exc.read().decode()[:500]}") from None
        assert body["status"] == "success", body
        return body["data"]

    def by(self, expr: str, *labels: str) -> Counter:
        return Counter({tuple(r["metric"].get(k, "") for k in labels): float(r["value"][1])
                        for r in self.api("query", query=expr)["result"]})


@pytest.fixture(scope="module")
def stack(built):
    for service in ("classifier", "prometheus"):
        for address in published(service).values():
            assert_free(address)
    env = {**os.environ, "PODMAN_COMPOSE": podman_compose()}
    classifier = published("classifier")
    up = Stack(f"{OWNER}-stack", env, classifier[GRPC_PORT], f"http://{classifier[HTTP_PORT]}",
               f"http://{published('prometheus')[PROMETHEUS_PORT]}")
    try:
        up.compose("up", "-d", "classifier", "prometheus")
        yield up
    finally:
        up.compose("down", "-t", "20", check=False)


def test_the_override_publishes_the_base_files_ports_on_loopback():
    # "!override" replaces the base file's list, so a port added there and not here is not published.
    for service in ("classifier", "prometheus"):
        base = {int(port.split(":")[-1]) for port in COMPOSE["services"][service]["ports"]}
        assert set(published(service)) == base, service
        assert all(address == f"127.0.0.1:{port}" for port, address in published(service).items()), service


def test_the_stack_comes_up(stack):
    wait_healthy(stack.container("classifier"))
    wait_healthy(stack.container("prometheus"), seconds=60)  # compose's check: wget on /-/ready, in the container
    with ClassifierClient(stack.target, timeout=10) as client:
        assert client.health() == "SERVING"
    with urllib.request.urlopen(f"{stack.http}/v2/health/ready", timeout=10) as answer:  # HTTP, published too
        assert answer.status == 200 and json.loads(answer.read()) == {"ready": True}


def test_prometheus_in_its_container_scrapes_the_classifier_in_its_container(stack):
    wait_healthy(stack.container("classifier"))
    # instance "classifier:9090": the service's name, resolved on the compose network, not a host port.
    wait_for(lambda: stack.by(f'up{{job="{JOB}"}}', "instance") == Counter({("classifier:9090",): 1.0}),
             "up == 1 for the classifier", SCRAPE_SECONDS)


def test_the_latency_histogram_counts_the_requests_sent(stack):
    wait_healthy(stack.container("classifier"))
    sent = Counter()
    with ClassifierClient(stack.target, timeout=30) as client:
        for image in sorted((ROOT / "examples").glob("*.jpg")):
            client.classify([image])
            sent["Classify", "OK"] += 1
        with pytest.raises(ClassifierError):
            client.classify([ROOT / "examples" / "cat.jpg"], model="no-such-model")
        sent["Classify", "NOT_FOUND"] += 1
        client.list_models()
        sent["ListModels", "OK"] += 1
    histogram = "sum by (method, code) (cifar10_request_duration_seconds_count)"
    wait_for(lambda: stack.by(histogram, "method", "code") == sent, f"the histogram to count {dict(sent)}",
             SCRAPE_SECONDS)


def test_every_dashboard_query_runs_without_error_against_the_stacks_prometheus(stack):
    wait_for(lambda: stack.by(f'up{{job="{JOB}"}}') == Counter({(): 1.0}), "the first scrape", SCRAPE_SECONDS)
    board = dashboard()
    for title, expr in queries(board):
        data = stack.api("query", query=fill_in(expr, board))
        assert data["resultType"] in ("vector", "scalar"), (title, data["resultType"])
    # The model variable's query, label_values(cifar10_model_info, model), as Grafana sends it.
    models = stack.api("label/model/values", **{"match[]": "cifar10_model_info"})
    assert sorted(models) == sorted(p.stem for p in (ROOT / "model" / "artifacts").glob("*.pt"))


def test_the_gpu_override_asks_for_an_nvidia_gpu_and_cuda_on_the_same_image():
    # No GPU here: podman-compose only prints the podman commands it would run (--dry-run).
    env = {**os.environ, "PODMAN_COMPOSE": podman_compose()}
    out = run([str(PODMAN_DIR / "compose.sh"), "-f", str(ROOT / "docker-compose.gpu.yml"), "-p", f"{OWNER}-gpu",
               "--verbose", "--dry-run", "up", "-d", "classifier"], timeout=120, env=env)
    (create,) = [line for line in (out.stdout + out.stderr).splitlines() if " create " in line and "classifier" in line]
    argv = create.split()
    assert "--device" in argv and argv[argv.index("--device") + 1].startswith("nvidia.com/gpu=")  # CDI, podman's way
    assert "CIFAR10_DEVICE=cuda" in argv
    assert argv[-1] == COMPOSE["services"]["classifier"]["image"]
