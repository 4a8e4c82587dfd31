"""The container tests: the image and the compose stack, built and run with podman (deploy/podman/).

They take minutes (the build installs torch) and need root, podman, runc, netavark, debootstrap and
podman-compose, so a plain ``python -m pytest`` skips them; ``python -m pytest tests/container``
(what .ci/containers runs, after installing those) runs them, and fails where the engine is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PODMAN_DIR = ROOT / "deploy" / "podman"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
CLASSIFIER_IMAGE = "cifar10-classifier"  # docker-compose.yml's image name, which build.sh tags
BUILD_SECONDS = 1800  # from nothing: debootstrap, apt, then pip installing torch and its CUDA libraries
HEALTHY_SECONDS = 180  # loading and warming up four models on a busy 2-core machine, with room to spare
OWNER = f"cifar10-test-{os.getpid()}"  # every container and compose project these tests make is named so
FIGURES: dict[str, str] = {}  # measured on the way (image size, start-up time), printed at the end


def pytest_collection_modifyitems(config, items):
    named = [(config.invocation_params.dir / arg.split("::")[0]).resolve() for arg in config.args]
    if any(path.is_relative_to(HERE) for path in named):
        return
    skip = pytest.mark.skip(reason="container tests take minutes and need podman as root: "
                                   "python -m pytest tests/container (.ci/containers installs what they need)")
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("container figures")
        for what, value in FIGURES.items():
            terminalreporter.write_line(f"{what}: {value}")


# ----------------------------------------------------------------------------- podman
def run(argv: list[str], timeout: float, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and out.returncode != 0:
        command = " ".join(map(str, argv))
        raise AssertionError(f"{command}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """podman with this machine's settings (deploy/podman/podman reads deploy/podman/containers.conf)."""
    return run([str(PODMAN_DIR / "podman"), *args], timeout=timeout, check=check)


def free_port() -> int:
    with socket.socket() as s:  # podman publishes a port we name, so find one nothing holds
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inspect(container: str, template: str) -> str:
    return podman("inspect", "--format", template, container).stdout.strip()


def wait_healthy(container: str, seconds: float = HEALTHY_SECONDS) -> float:
    """Runs the image's health check (no systemd here to run it on a timer) until it passes; returns
    the seconds waited. Fails at once, with the container's log, if the container stops."""
    start = time.monotonic()
    while podman("healthcheck", "run", container, check=False).returncode != 0:
        if inspect(container, "{{.State.Running}}") != "true" or time.monotonic() - start > seconds:
            logs = podman("logs", container, check=False).stderr[-3000:]
            raise AssertionError(f"{container} not healthy after {time.monotonic() - start:.0f}s:\n{logs}")
        time.sleep(1)
    return time.monotonic() - start


def wait_for(condition, what: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds:.0f}s for {what}")
        time.sleep(0.5)


@dataclass(frozen=True)
class Built:
    seconds: float
    log: str


@pytest.fixture(scope="session")
def built() -> Built:
    """The base, Prometheus and classifier images, built by deploy/podman/build.sh as a user would."""
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    assert not missing, f"missing {missing}: .ci/containers installs them (apt-get install podman runc debootstrap)"
    start = time.monotonic()
    # PYTHON: the build copies the pip settings of the Python running the tests.
    out = run([str(PODMAN_DIR / "build.sh")], timeout=BUILD_SECONDS, env={**os.environ, "PYTHON": sys.executable})
    return Built(time.monotonic() - start, out.stdout + out.stderr)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """After the tests no container or network of theirs remains, whatever failed."""
    yield
    if shutil.which("podman") is None:
        return
    for name in podman("ps", "-a", "--format", "{{.Names}}", check=False).stdout.split():
        if name.startswith(OWNER):
            podman("rm", "-f", "-t", "0", name, check=False)
    for name in podman("network", "ls", "--format", "{{.Name}}", check=False).stdout.split():
        if name.startswith(OWNER):
            podman("network", "rm", "-f", name, check=False)
