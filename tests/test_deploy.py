"""The deployment files agree with each other and with the server's defaults.

There is no Docker engine where these tests run, so they read docker-compose.yml, the GPU override,
the Dockerfile, .dockerignore, deploy/prometheus.yml and Grafana's provisioning, and check the
ports, paths, mounted files, scrape target and data source that tie them together. The classifier's
health check is run for real, against a real server.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml
from prometheus_client import CollectorRegistry

from cifar10_serving.server import grpc_metrics
from cifar10_serving.server.config import DEFAULT_MODELS_DIR, ENV_PREFIX, ServerConfig, parse_config
from cifar10_serving.server.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
GPU_COMPOSE = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
SERVICES = COMPOSE["services"]
DEFAULTS = ServerConfig()
PROMETHEUS_PORT = 9090  # Prometheus's own default listen port, which the image keeps
GPU_METRICS = {"cifar10_gpu_memory_allocated_bytes", "cifar10_gpu_memory_reserved_bytes"}  # CUDA servers only


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def instruction(name: str) -> list[str]:
    return [args for op, args in dockerfile() if op == name]


def mounts(service: str) -> dict[str, str]:
    """{container path: repository path} for the service's bind mounts."""
    out = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        assert source.startswith("./"), f"{service}: {volume} is not a file in the repository"
        out[target] = source[2:]
    return out


def published(service: str) -> dict[int, int]:
    """{container port: host port}."""
    return {int(p.split(":")[1]): int(p.split(":")[0]) for p in SERVICES[service].get("ports", [])}


def dashboard() -> dict:
    return json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "cifar10.json").read_text())


# ----------------------------------------------------------------------------- compose
def test_three_services_each_with_a_health_check():
    assert set(SERVICES) == {"classifier", "prometheus", "grafana"}
    for name, service in SERVICES.items():
        check = service["healthcheck"]
        assert check["test"][0] == "CMD" and len(check["test"]) > 1, name
    for name, service in SERVICES.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in SERVICES, name
            assert rule["condition"] in ("service_started", "service_healthy"), name


def test_images_are_pinned():
    for name in ("prometheus", "grafana"):
        image = SERVICES[name]["image"]
        assert ":" in image and not image.endswith(":latest"), image
    assert SERVICES["classifier"]["build"] == "."


def test_every_mounted_file_is_in_the_repository():
    for name in SERVICES:
        for target, source in mounts(name).items():
            assert (ROOT / source).exists(), f"{name} mounts ./{source}, which is not in the repository"


def test_classifier_publishes_the_grpc_port_and_checks_health_through_the_client_cli():
    assert published("classifier") == {DEFAULTS.port: DEFAULTS.port}
    argv = SERVICES["classifier"]["healthcheck"]["test"][1:]
    assert argv[:3] == ["python", "-m", "client"] and argv[-1] == "health"
    assert argv[argv.index("--target") + 1] == f"127.0.0.1:{DEFAULTS.port}"


def _health_check(target: str) -> subprocess.CompletedProcess:
    argv = SERVICES["classifier"]["healthcheck"]["test"][2:]  # after "CMD", "python"
    argv[argv.index("--target") + 1] = target
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_the_health_check_passes_on_a_serving_server_and_fails_on_a_dead_port(tiny_server):
    assert _health_check(tiny_server.target).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # bound but not listening: connection refused
        assert _health_check(dead).returncode != 0


# ----------------------------------------------------------------------------- Dockerfile
def test_dockerfile_runs_the_readmes_install_without_the_test_tools():
    (base,) = instruction("FROM")
    assert re.fullmatch(r"python:3\.1[0-9]+-slim", base)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert "cifar10-serving[server]" in extras["test"]  # the README installs [test], which is [server] + tools
    assert 'pip install -e ".[test]"' in (ROOT / "README.md").read_text()
    assert any('pip install -e ".[server]"' in run for run in instruction("RUN"))


def test_dockerfile_starts_the_server_on_all_interfaces_with_the_default_ports():
    (cmd,) = instruction("CMD")
    argv = json.loads(cmd)
    assert argv == ["python", "-m", "server", "--host", "0.0.0.0"]
    config = parse_config(argv[3:], environ={})
    assert (config.host, config.port, config.metrics_port) == ("0.0.0.0", DEFAULTS.port, DEFAULTS.metrics_port)
    exposed = {int(port) for line in instruction("EXPOSE") for port in line.split()}
    assert exposed == {config.port, config.metrics_port}
    assert config.metrics_host == ""  # so /metrics binds 0.0.0.0 too, where Prometheus can reach it


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "*/"))
               or (pattern.startswith("**/") and fnmatch.fnmatch(PurePosixPath(p).name, pattern[3:]))
               for p in prefixes):
            ignored = not negate
    return ignored


def test_the_image_gets_the_code_and_models_and_not_the_data_cache():
    (workdir,) = instruction("WORKDIR")
    assert "COPY . ." in [f"COPY {args}" for args in instruction("COPY")]
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    models = DEFAULT_MODELS_DIR.relative_to(ROOT).as_posix()
    assert models == "model/artifacts"  # in the image: /app/model/artifacts, next to /app/server
    for kept in (f"{models}/base-max.pt", "server/main.py", "client/cli.py", "protos/cifar10/v1/classifier.proto",
                 "model/network.py", "pyproject.toml", "README.md"):
        assert not _ignored(kept, patterns), kept
    for dropped in (".git/HEAD", ".cache/cifar10/data.bin", "server/__pycache__/main.cpython-311.pyc"):
        assert _ignored(dropped, patterns), dropped
    assert workdir == "/app"


# ----------------------------------------------------------------------------- Prometheus
def test_prometheus_reads_the_repositorys_config_and_scrapes_the_metrics_port():
    command = SERVICES["prometheus"]["command"]
    config_path = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--config.file="))
    assert mounts("prometheus")[config_path] == "deploy/prometheus.yml"
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (static,) = job["static_configs"]
    (target,) = static["targets"]
    host, port = target.split(":")
    assert host in SERVICES and host == "classifier"
    assert int(port) == DEFAULTS.metrics_port
    assert published("prometheus") == {PROMETHEUS_PORT: PROMETHEUS_PORT}


# ----------------------------------------------------------------------------- Grafana
def test_grafana_is_provisioned_with_the_prometheus_data_source_the_dashboard_uses():
    provisioning = ROOT / mounts("grafana")["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == f"http://prometheus:{PROMETHEUS_PORT}" and "prometheus" in SERVICES
    used = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                used.add((node["datasource"]["type"], node["datasource"]["uid"]))
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(dashboard())
    assert used == {("prometheus", datasource["uid"])}


def test_grafana_loads_the_dashboard_from_its_mounted_folder_and_opens_on_it():
    provisioning = ROOT / mounts("grafana")["/etc/grafana/provisioning"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "cifar10.yml").read_text())["providers"]
    folder = provider["options"]["path"]
    assert mounts("grafana")[folder] == "deploy/grafana/dashboards"
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert PurePosixPath(home).parent == PurePosixPath(folder)
    assert (ROOT / "deploy" / "grafana" / "dashboards" / PurePosixPath(home).name).is_file()
    assert published("grafana") == {3000: 3000}
    assert SERVICES["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"


# ----------------------------------------------------------------------------- GPU override
def test_the_gpu_override_reserves_an_nvidia_gpu_for_the_classifier():
    assert set(GPU_COMPOSE["services"]) == {"classifier"}
    classifier = GPU_COMPOSE["services"]["classifier"]
    (device,) = classifier["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    environment = classifier["environment"]
    assert all(name.startswith(ENV_PREFIX) for name in environment)
    assert parse_config([], environ=environment).device == "cuda"
    assert "docker-compose.gpu.yml" in (ROOT / "docker-compose.yml").read_text()  # documented where users look


# ----------------------------------------------------------------------------- dashboard and README
def exposed_families() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    grpc_metrics.interceptor(registry)
    names = {family.name for family in registry.collect()}
    counters = {f.name for f in registry.collect() if f.type == "counter"}
    return {f"{n}_total" if n in counters else f"{n}_info" if n == "cifar10_model" else n for n in names} | GPU_METRICS


def dashboard_metrics() -> set[str]:
    exprs = []

    def walk(panels):
        for panel in panels:
            walk(panel.get("panels", []))
            exprs.extend(target["expr"] for target in panel.get("targets", []))

    walk(dashboard()["panels"])
    names = set()
    labels = {"grpc_service", "grpc_method", "grpc_code", "grpc_type"}
    for expr in exprs:
        names |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"\b((?:cifar10|grpc|process)_[a-z0-9_]+)", expr)} - labels
    return names


def test_the_dashboard_shows_what_operators_asked_for():
    metrics = dashboard_metrics()
    assert {"cifar10_requests_total", "cifar10_request_duration_seconds", "cifar10_queue_wait_seconds",
            "cifar10_preprocess_duration_seconds", "cifar10_compute_duration_seconds", "cifar10_batch_size_images",
            "cifar10_requests_in_flight", "cifar10_images_total", "cifar10_gpu_memory_allocated_bytes",
            "grpc_server_handled_total"} <= metrics
    exprs = json.dumps(dashboard())
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le, method, model)" in exprs
    assert metrics - {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= exposed_families()


@pytest.mark.parametrize("family", sorted(exposed_families()))
def test_every_metric_is_documented_in_the_readme(family):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Metrics and dashboard"):]
    assert f"`{family}`" in section
