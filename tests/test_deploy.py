"""The deployment files agree with each other and with the server's defaults.

These tests need no container engine: they read docker-compose.yml, the GPU override, the
Dockerfile, .dockerignore, deploy/prometheus.yml and Grafana's provisioning, and check the ports,
paths, mounted files, scrape target, data source, health check and stop grace that tie them
together. The classifier's health check is run for real, against a real server.
tests/container builds the image and runs it and the stack with podman.
"""

from __future__ import annotations

import fnmatch
import json
import re
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


def dockerfile_healthcheck() -> list[str]:
    """The HEALTHCHECK's test as Docker stores it: ["CMD", argv...]."""
    (check,) = instruction("HEALTHCHECK")
    _, argv = check.split(" CMD ", 1)
    return ["CMD", *json.loads(argv)]


def dockerfile_healthcheck_options() -> dict[str, str]:
    (check,) = instruction("HEALTHCHECK")
    options, _ = check.split(" CMD ", 1)
    return dict(option.removeprefix("--").split("=", 1) for option in options.split())


def stop_grace_seconds() -> int:
    """docker-compose.yml's stop_grace_period for the classifier, in seconds."""
    grace = SERVICES["classifier"]["stop_grace_period"]
    assert re.fullmatch(r"\d+s", grace), grace
    return int(grace[:-1])


def scripts() -> dict[str, str]:
    """{installed command: "module:function"} from pyproject.toml."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


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
    assert published("classifier") == {DEFAULTS.port: DEFAULTS.port, DEFAULTS.http_port: DEFAULTS.http_port}
    argv = SERVICES["classifier"]["healthcheck"]["test"][1:]
    assert scripts()[argv[0]] == "cifar10_serving.client.cli:main" and argv[-1] == "health"
    assert argv[argv.index("--target") + 1] == f"127.0.0.1:{DEFAULTS.port}"


def test_compose_repeats_the_dockerfiles_health_check():
    check = SERVICES["classifier"]["healthcheck"]
    assert check["test"] == dockerfile_healthcheck()
    options = dockerfile_healthcheck_options()
    assert {key: check[key.replace("-", "_")] for key in options} == {
        key: int(value) if key == "retries" else value for key, value in options.items()}


def test_the_stop_grace_outlasts_the_servers_drain():
    # docker stop sends SIGTERM, then SIGKILL after the grace: the server must finish its drain first.
    assert stop_grace_seconds() > DEFAULTS.grace_period_seconds + 5  # + the few seconds shutdown itself takes
    assert not instruction("STOPSIGNAL")  # SIGTERM, which the server handles


def _health_check(target: str) -> subprocess.CompletedProcess:
    command, *args = SERVICES["classifier"]["healthcheck"]["test"][1:]  # after "CMD"
    args[args.index("--target") + 1] = target
    module, function = scripts()[command].split(":")  # the installed script, run by this Python
    code = f"import sys; from {module} import {function}; sys.exit({function}(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_the_health_check_passes_on_a_serving_server_and_fails_on_a_dead_port(tiny_server):
    assert _health_check(tiny_server.target).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # bound but not listening: connection refused
        assert _health_check(dead).returncode != 0


# ----------------------------------------------------------------------------- Dockerfile
def test_dockerfile_builds_on_the_official_python_image_by_default():
    (arg,) = instruction("ARG")
    name, default = arg.split("=", 1)
    assert name == "BASE_IMAGE" and re.fullmatch(r"python:3\.1[0-9]+-slim", default)
    assert instruction("FROM") == ["${BASE_IMAGE}"]


def test_dockerfile_installs_the_package_with_the_server_extra_not_editable():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert "cifar10-serving[server]" in extras["test"]  # the README installs [test], which is [server] + tools
    (dependencies, package) = instruction("RUN")
    (pyproject, checkout) = [copy.split() for copy in instruction("COPY")]
    # First the dependencies, read from pyproject.toml alone (so code changes keep that layer) ...
    assert pyproject == ["pyproject.toml", "/tmp/pyproject.toml"]
    assert '["dependencies"] + p["optional-dependencies"]["server"]' in dependencies
    assert "pip install -r /tmp/requirements.txt" in dependencies
    # ... then the package itself, from the whole build context, not editable, the checkout removed after.
    assert checkout[0] == "."
    assert f'pip install "{checkout[1]}[server]"' in package and "-e" not in package.split()
    assert f"rm -rf {checkout[1]}" in package


def test_dockerfile_runs_as_a_user_it_makes_not_root():
    (user,) = instruction("USER")
    assert user not in ("root", "0") and f"useradd --create-home --uid 10001 {user}" in instruction("RUN")[-1]


def test_dockerfile_starts_the_server_on_all_interfaces_with_the_default_ports():
    (cmd,) = instruction("CMD")
    argv = json.loads(cmd)
    assert argv == ["cifar10-server", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0"]
    assert scripts()[argv[0]] == "cifar10_serving.server.main:main"
    config = parse_config(argv[1:], environ={})
    assert (config.host, config.port, config.metrics_port) == ("0.0.0.0", DEFAULTS.port, DEFAULTS.metrics_port)
    exposed = {int(port) for line in instruction("EXPOSE") for port in line.split()}
    assert exposed == {config.port, config.http_port, config.metrics_port}
    # /metrics binds loopback by default; in the container all interfaces, where Prometheus can reach it
    assert (DEFAULTS.metrics_host, config.metrics_host) == ("127.0.0.1", "0.0.0.0")


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


def test_the_build_gets_the_code_and_models_and_not_the_data_cache():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    models = DEFAULT_MODELS_DIR.relative_to(ROOT).as_posix()
    assert models == "model/artifacts"  # in a checkout; installed, the package data next to the server's package
    # Compiled packages (*.pt2, python -m model.compile) are made per machine and never shipped.
    artifacts = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / models).iterdir() if p.suffix != ".pt2")
    assert any(a.endswith(".pt") for a in artifacts)
    for kept in (*artifacts, "server/main.py", "client/cli.py", "protos/cifar10/v1/classifier.proto",
                 "model/network.py", "pyproject.toml", "README.md"):  # README.md: pyproject's readme
        assert not _ignored(kept, patterns), kept
    for dropped in (".git/HEAD", ".cache/cifar10/data.bin", "server/__pycache__/main.cpython-311.pyc",
                    "cifar10_serving.egg-info/PKG-INFO", "tests/test_deploy.py"):
        assert _ignored(dropped, patterns), dropped
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for artifact in artifacts:  # the wheel carries every file of the models directory
        relative = PurePosixPath(artifact).relative_to("model").as_posix()
        assert any(fnmatch.fnmatch(relative, g) for g in package_data["cifar10_serving.model"]), artifact


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
def test_every_metric_is_documented(family):
    page = (ROOT / "docs" / "metrics.md").read_text()
    section = page[page.index("## The series"):]
    assert f"`{family}`" in section
