"""The classifier image, built by deploy/podman/build.sh and run with podman.

One container from it, its gRPC port published on loopback: it becomes healthy, the host's client
CLI classifies examples/cat.jpg through that port, it serves the bundled models as a user that can
change neither them nor the code, and SIGTERM (``podman stop``) ends it within the grace period with
exit code 0. The tests run in file order: the last one stops the container.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from cifar10_serving.client import ClassifierClient, ClassifierError
from tests.container.conftest import (CLASSIFIER_IMAGE, COMPOSE, FIGURES, HEALTHY_SECONDS, OWNER, ROOT, free_port,
                                      inspect, podman, wait_healthy)
from tests.test_deploy import dockerfile_healthcheck, stop_grace_seconds

pytestmark = pytest.mark.system  # the container image, built and run with podman


@dataclass(frozen=True)
class Container:
    name: str
    target: str  # the published gRPC port, on the host
    started: float  # time.monotonic() when `podman run` was called


@pytest.fixture(scope="module")
def container(built):
    name, port = f"{OWNER}-classifier", free_port()
    started = time.monotonic()
    podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:50051", CLASSIFIER_IMAGE)
    try:
        yield Container(name, f"127.0.0.1:{port}", started)
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def test_the_image_is_what_the_dockerfile_says(built):
    config = json.loads(podman("image", "inspect", CLASSIFIER_IMAGE).stdout)[0]
    assert config["Config"]["User"] == "classifier"
    assert config["Config"]["Cmd"] == ["cifar10-server", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0"]
    assert config["Healthcheck"]["Test"] == dockerfile_healthcheck()  # kept: the image is in Docker's format
    assert config["Healthcheck"]["Test"] == COMPOSE["services"]["classifier"]["healthcheck"]["test"]
    FIGURES["image size"] = f"{config['Size'] / 1e9:.2f} GB"
    FIGURES["build (all three images)"] = f"{built.seconds:.0f} s"


def test_the_container_becomes_healthy(container):
    # The host asks the health service itself, every 0.2 s, to time start-up to SERVING closely, and
    # asks podman (a slower call) every few seconds whether the container still runs.
    checked = time.monotonic()
    with ClassifierClient(container.target, timeout=2, attempts=1) as client:
        while True:
            try:
                if client.health() == "SERVING":
                    break
            except ClassifierError:
                pass  # not listening yet: the port is published before the server binds it
            if time.monotonic() - checked > 5:
                assert inspect(container.name, "{{.State.Running}}") == "true", podman("logs", container.name).stderr
                checked = time.monotonic()
            assert time.monotonic() - container.started < HEALTHY_SECONDS, "not SERVING in time"
            time.sleep(0.2)
    FIGURES["podman run to SERVING"] = f"{time.monotonic() - container.started:.1f} s"
    wait_healthy(container.name)  # the image's own HEALTHCHECK agrees, run inside the container
    assert inspect(container.name, "{{.State.Health.Status}}") == "healthy"


def test_the_hosts_client_classifies_the_cat_through_the_published_port(container):
    wait_healthy(container.name)
    out = subprocess.run([sys.executable, "-m", "cifar10_serving.client", "--target", container.target,
                          "classify", "examples/cat.jpg", "--json"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    (result,) = json.loads(out.stdout)
    assert result["label"] == "cat", result["top_k"]


def test_it_serves_the_bundled_models(container):
    with ClassifierClient(container.target, timeout=30) as client:
        served = {m.name for m in client.list_models().models}
    assert served == {p.stem for p in (ROOT / "model" / "artifacts").glob("*.pt")}


def test_the_server_is_not_root_and_cannot_change_its_code_or_models(container):
    status = podman("exec", container.name, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert "0" not in uids, status  # real, effective, saved and file-system uid
    assert "cifar10-server" in podman("exec", container.name, "cat", "/proc/1/cmdline").stdout
    writable = podman("exec", container.name, "python", "-c",
                      "import os, cifar10_serving.server as s; from cifar10_serving.server.config import "
                      "DEFAULT_MODELS_DIR as m; print(os.access(m, os.W_OK), os.access(s.__path__[0], os.W_OK))")
    assert writable.stdout.split() == ["False", "False"]


def test_its_torch_is_the_cuda_build_the_gpu_override_needs(container):
    # The same image serves on the CPU here and on an NVIDIA GPU under docker-compose.gpu.yml.
    out = podman("exec", container.name, "python", "-c", "import torch; print(torch.__version__, torch.version.cuda)")
    version, cuda = out.stdout.split()
    assert version.startswith("2.14.1") and cuda != "None", out.stdout


def test_sigterm_ends_it_within_the_grace_period_with_exit_code_0(container):
    grace = stop_grace_seconds()
    start = time.monotonic()
    podman("stop", "-t", str(grace), container.name, timeout=grace + 60)
    took = time.monotonic() - start
    assert took < grace, f"podman stop took {took:.1f}s: SIGKILL after {grace}s, not the server's own exit"
    assert inspect(container.name, "{{.State.ExitCode}}") == "0", podman("logs", container.name).stderr[-3000:]
    FIGURES["SIGTERM to exit"] = f"{took:.1f} s"
