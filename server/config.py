"""The server's configuration: one frozen dataclass, filled from flags and environment variables.

Every flag ``--some-name`` has a matching variable ``CIFAR10_SOME_NAME``; a flag wins over the
variable, the variable over the default. Nothing reads the environment at import time.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping, Sequence

ENV_PREFIX = "CIFAR10_"


def bundled_models_dir() -> Path:
    """The models shipped inside the package (``model/artifacts`` in a checkout, package data in a
    wheel). Found without importing ``cifar10_serving.model``: the server never imports the trainer."""
    spec = importlib.util.find_spec("cifar10_serving.model")
    if spec is None or not spec.submodule_search_locations:
        return Path("model") / "artifacts"  # not installed: relative to the working directory, and says so when missing
    return Path(next(iter(spec.submodule_search_locations))) / "artifacts"


DEFAULT_MODELS_DIR = bundled_models_dir()
MiB = 1 << 20


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # 0.0.0.0 in the container
    port: int = 50051  # gRPC; 0 picks a free port
    metrics_port: int = 9090  # Prometheus /metrics over HTTP; 0 picks a free port, -1 turns it off
    metrics_host: str = ""  # "" binds metrics on the same host as gRPC
    models_dir: str = str(DEFAULT_MODELS_DIR)
    default_model: str = "base-max"
    device: str = "auto"  # auto: cuda when available, else cpu
    max_batch_size: int = 64  # images per request and per forward pass
    max_queue_delay_us: int = 500  # how long a forming batch may wait for company under load
    max_queue_images: int = 1024  # images waiting per model before RESOURCE_EXHAUSTED
    # Model instances (README "Performance"): forward passes of one model in flight at once, each on its
    # own thread (and CUDA stream). 0: on CUDA 2, so that one pass's copies overlap another's kernels; on
    # the CPU one per torch thread, so that a loaded server runs a one-thread pass on every core.
    instances: int = 0
    # Intra-op threads that the process's forward passes share: a pass that starts alone gets them all,
    # one that starts beside others an equal share over every instance (batching.ThreadShares).
    # 0: the cores this process may run on (its CPU affinity), shared out among the workers.
    torch_threads: int = 0
    workers: int = 1  # server processes sharing the gRPC port (SO_REUSEPORT); README "Performance"
    # Forward, decoding and answer threads run this much nicer than the event loop, so that a loop with
    # work is scheduled first on a host whose cores the compute fills (server.priority); 0: the same.
    # 10: health p99 under 32 feature-map callers 57-86 ms against 92-154 ms at 0, and no throughput
    # lost in an ABBA of bench.bench (README "Reliability").
    compute_nice: int = 10
    worker_index: int = -1  # set by the supervisor of --workers for each worker; -1: not a worker
    max_receive_message_bytes: int = 64 * MiB  # a full batch of large encoded images fits
    max_send_message_bytes: int = 256 * MiB  # all float32 feature maps of a full batch of the base model fit
    max_image_pixels: int = 4096 * 4096  # encoded images declaring more are refused from their header
    grace_period_seconds: float = 10.0  # in-flight calls may finish this long after SIGTERM
    warmup_batches: int = 1  # warm-up rounds per model before SERVING, each at every ladder size (a 2nd: no gain)
    log_level: str = "INFO"
    ready_file: str = ""  # once SERVING, a JSON document (pid, ports, models, device) is written here; removed at stop
    # Security (README "Security"): all off by default, for a server on 127.0.0.1.
    tls_cert_file: str = ""  # PEM certificate chain; with tls_key_file the gRPC port speaks TLS only
    tls_key_file: str = ""  # PEM private key of tls_cert_file
    tls_client_ca_file: str = ""  # PEM CA bundle: clients must present a certificate it signed (mutual TLS)
    auth_token_file: str = ""  # accepted bearer tokens, one a line: every call but health must carry one
    # Connections (README "Configuration"); 0 turns each off. Closing idle and old connections frees
    # the sockets of clients that went away, and makes clients behind an L4 balancer reconnect and so
    # spread over the replicas (one gRPC channel is one connection, pinned to one replica).
    handshake_timeout_ms: int = 10_000  # no TLS handshake and HTTP/2 SETTINGS by then: closed (gRPC's own default: 120 s)
    max_connection_idle_ms: int = 300_000  # no call for this long: GOAWAY, and closed
    max_connection_age_ms: int = 600_000  # GOAWAY at this age (gRPC adds +-10% jitter), so clients rebalance
    max_connection_age_grace_ms: int = 60_000  # after the age's GOAWAY, calls still open get this long; then closed
    # Hostile load (README "Reliability"): memory for answers, and decoding.
    answer_budget_bytes: int = 0  # answers computed but not yet sent, with their requests; 0: a quarter of the memory (server.answer_budget)
    max_request_pixels: int = 64 * MiB  # decoded pixels per request: 64 one-megapixel photos, or 4 images at max_image_pixels

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_queue_images < self.max_batch_size:
            raise ValueError(
                f"max_queue_images ({self.max_queue_images}) must hold one full batch ({self.max_batch_size})"
            )
        if self.instances < 0:
            raise ValueError(f"instances must be >= 0 (0: automatic), got {self.instances}")
        if not 0 <= self.compute_nice <= 19:
            raise ValueError(f"compute_nice must be in 0..19 (a nice value), got {self.compute_nice}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0 (0: automatic), got {self.torch_threads}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.grace_period_seconds < 0:
            raise ValueError(f"grace_period_seconds must be >= 0, got {self.grace_period_seconds}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        for name in ("handshake_timeout_ms", "max_connection_idle_ms", "max_connection_age_ms",
                     "max_connection_age_grace_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        if self.answer_budget_bytes < 0:
            raise ValueError(f"answer_budget_bytes must be >= 0 (0: automatic), got {self.answer_budget_bytes}")
        if self.max_request_pixels < 1:
            raise ValueError(f"max_request_pixels must be at least 1, got {self.max_request_pixels}")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (``taskset``, a container's cpuset), not
    every core of the machine. A CPU quota (``docker --cpus``, a Kubernetes limit) is not seen: set
    ``--torch-threads`` there."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_torch_threads(workers: int = 1) -> int:
    """For ``torch_threads=0``: the cores this process may use, shared out among the workers, at least 1."""
    return max(1, available_cores() // workers)


def default_instances(device_type: str, torch_threads: int) -> int:
    """For ``instances=0``: 2 on CUDA; on the CPU one per torch thread (README "Performance")."""
    return 2 if device_type == "cuda" else torch_threads


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Builds the config from ``argv`` (flags) over ``environ`` (CIFAR10_* variables) over defaults."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="cifar10-server",
        description="Serve CIFAR-10 TorchScript models over gRPC. Each flag can also be set as the "
        f"environment variable {ENV_PREFIX}<FLAG_NAME>, e.g. {ENV_PREFIX}PORT=50051.",
    )
    for f in fields(ServerConfig):
        kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        default = environ.get(_env(f.name), f.default)
        parser.add_argument(_flag(f.name), type=kind, default=kind(default),
                            help=f"(env {_env(f.name)}, default {f.default})")
    args = parser.parse_args(argv)
    return ServerConfig(**vars(args))
