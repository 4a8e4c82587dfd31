"""The server's configuration: one frozen dataclass, filled from flags and environment variables.

Every flag ``--some-name`` has a matching variable ``CIFAR10_SOME_NAME``; a flag wins over the
variable, the variable over the default. Nothing reads the environment at import time.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping, Sequence

ENV_PREFIX = "CIFAR10_"


def bundled_models_dir() -> Path:
    """The models shipped inside the package (``model/artifacts`` in a checkout, package data in a
    wheel). Found without importing ``cifar10_serving.model``: the server never imports the trainer."""
    spec = importlib.util.find_spec("cifar10_serving.model")
    if spec is None or not spec.origin:
        return Path("model") / "artifacts"  # not installed: relative to the working directory, and says so when missing
    # resolve(): a strict editable install links each file from a tree under build/, which holds only the
    # artifacts that existed at install time; the package's own __init__.py leads back to the real folder.
    return Path(spec.origin).resolve().parent / "artifacts"


DEFAULT_MODELS_DIR = bundled_models_dir()
MiB = 1 << 20


def setting(default, help: str, group: str):
    """A field of ``ServerConfig`` with its meaning, shown by ``--help`` and docs/configuration.md."""
    return field(default=default, metadata={"help": help, "group": group})


NETWORK, MODELS, BATCHING, LIMITS, CONNECTIONS, SECURITY, PROCESS = (
    "network", "models and devices", "batching and threads", "limits under load", "connections", "security",
    "process")


@dataclass(frozen=True)
class ServerConfig:
    host: str = setting("127.0.0.1", "Address gRPC listens on; 0.0.0.0 (all interfaces) in the container.", NETWORK)
    port: int = setting(50051, "gRPC port, for both APIs, health and reflection; 0 picks a free port.", NETWORK)
    metrics_port: int = setting(9090, "Port of Prometheus' /metrics over HTTP; 0 picks a free port, -1 turns it "
                                      "off.", NETWORK)
    metrics_host: str = setting("127.0.0.1", "Address /metrics listens on: loopback unless set, since it takes no "
                                             "token; 0.0.0.0 in the container and the pod, where Prometheus scrapes "
                                             "it.", NETWORK)
    http_port: int = setting(8000, "Port of the Open Inference Protocol over HTTP/REST (curl, tritonclient.http, "
                                   "KServe's HTTP clients), Triton's default; 0 picks a free port, -1 turns it off.",
                             NETWORK)
    http_host: str = setting("", "Address the HTTP port listens on; empty: the same as --host.", NETWORK)
    http_max_connections: int = setting(1000, "HTTP connections open at once; one more is answered 503 and "
                                              "closed, so slow or idle clients cannot take every file descriptor "
                                              "of the process (often 1,024).", NETWORK)
    http_header_timeout_ms: int = setting(10_000, "An HTTP connection that has not sent a request's headers "
                                                  "this long after it opened, or after the request's first "
                                                  "byte, is closed (as --handshake-timeout-ms); 0: never.",
                                          NETWORK)
    http_body_timeout_ms: int = setting(60_000, "An HTTP request body not read in full by then is answered 408 "
                                                "and its connection closed: 64 MiB at 1 MB/s fits; 0: never.",
                                        NETWORK)
    http_idle_timeout_ms: int = setting(300_000, "An HTTP connection with no request for this long is closed "
                                                 "(as --max-connection-idle-ms); 0: never.", NETWORK)
    http_max_body_bytes: int = setting(64 * MiB, "Largest HTTP request body; a larger Content-Length is answered "
                                                 "413 before the body is read. 64 MiB: as "
                                                 "--max-receive-message-bytes.", NETWORK)
    models_dir: str = setting(str(DEFAULT_MODELS_DIR), "The model repository: NAME.pt files and Triton's "
                                                       "NAME/VERSION/model.pt folders; docs/model-repository.md. "
                                                       "The bundled models by default.", MODELS)
    default_model: str = setting("base-max", "Model that answers requests naming none.", MODELS)
    device: str = setting("auto", "Where forward passes run: auto (cuda when available, else cpu), cpu, cuda or "
                                  "cuda:N.", MODELS)
    warmup_batches: int = setting(1, "Warm-up rounds per model before SERVING, each at every size of the batch "
                                     "ladder; a second round was measured to gain nothing.", MODELS)
    model_control_mode: str = setting("none", "What may change the models served: none (what --models-dir holds "
                                              "at start, never changed), poll (the folder is rescanned every "
                                              "--repository-poll-seconds: new versions load, removed ones unload) "
                                              "or explicit (the repository calls of the Open Inference Protocol "
                                              "load and unload; docs/model-repository.md).", MODELS)
    load_models: str = setting("*", "Models loaded at start, comma-separated, or * for every model in the "
                                    "repository; poll mode follows only these (new versions load, removed ones "
                                    "unload, other folders are left alone), explicit mode loads the rest when "
                                    "asked.", MODELS)
    version_policy: str = setting("latest:1", "Which versions of each model serve: latest:N (the N highest), "
                                              "all, or specific:V1,V2; a request naming no version gets the "
                                              "highest that serves.", MODELS)
    repository_poll_seconds: float = setting(15.0, "How often poll mode rescans the repository.", MODELS)
    compiled_min_batch: int = setting(2, "A model with a compiled package beside its file (NAME.pt2, python -m "
                                         "model.compile) runs its one-thread passes of this many images or more "
                                         "with it, and smaller ones with its TorchScript: where each was faster on "
                                         "the 2-core VM (docs/compiled.md); 0: never (the package is not even "
                                         "read).", BATCHING)
    compiled_min_batch_wide: int = setting(8, "The same for passes on more than one thread (a lone pass on an "
                                              "idle server), where the package overtakes the TorchScript later.",
                                           BATCHING)
    max_batch_size: int = setting(64, "Most images in one request and in one forward pass.", BATCHING)
    max_queue_delay_us: int = setting(500, "How long a forming batch may wait for company, in microseconds, when "
                                           "a pass is already running; an idle server starts at once.", BATCHING)
    max_queue_images: int = setting(1024, "Images waiting per model before new requests get RESOURCE_EXHAUSTED.",
                                    BATCHING)
    instances: int = setting(0, "Forward passes of one model in flight at once, each on its own thread (and CUDA "
                                "stream); 0: 2 on CUDA, so one pass's copies overlap another's kernels, and one per "
                                "torch thread on the CPU, so a loaded server runs a one-thread pass on every core.",
                             BATCHING)
    torch_threads: int = setting(0, "Intra-op threads that the process's forward passes share (a lone pass gets "
                                    "them all, concurrent passes an equal share); 0: the cores this process may "
                                    "run on, shared among the workers.", BATCHING)
    compute_nice: int = setting(10, "How much nicer than the event loop the forward, decoding and answer threads "
                                    "run (0-19), so that the loop's health checks and small calls are scheduled "
                                    "first on cores the compute fills; 0: the same priority. Why 10: "
                                    "docs/reliability.md.", BATCHING)
    answer_budget_bytes: int = setting(0, "Memory for requests in progress and answers not yet sent (their "
                                          "decoded images, feature maps, explanations, echoed ids); a request "
                                          "that does not fit gets RESOURCE_EXHAUSTED before any work. 0: a "
                                          "quarter of the memory the process may use (its cgroup limit).", LIMITS)
    max_image_pixels: int = setting(4096 * 4096, "Pixels one encoded or raw image may declare; more is refused "
                                                 "from its header, before any pixel is decoded.", LIMITS)
    max_request_pixels: int = setting(64 * MiB, "Decoded pixels per request: 64 one-megapixel photos, or 4 "
                                                "images at --max-image-pixels.", LIMITS)
    max_receive_message_bytes: int = setting(64 * MiB, "Largest request gRPC reads: a full batch of large "
                                                       "encoded images fits.", LIMITS)
    max_send_message_bytes: int = setting(256 * MiB, "Largest answer gRPC sends: every float32 feature map of "
                                                     "a full batch of the base model fits.", LIMITS)
    handshake_timeout_ms: int = setting(10_000, "A connection without its TLS handshake and HTTP/2 SETTINGS by "
                                                "then is closed (gRPC's own default is 120 s); 0: gRPC's.",
                                        CONNECTIONS)
    max_connection_idle_ms: int = setting(300_000, "A connection without a call for this long gets GOAWAY and is "
                                                   "closed, which frees the sockets of clients that went away; "
                                                   "0: never.", CONNECTIONS)
    max_connection_age_ms: int = setting(600_000, "GOAWAY at this age (gRPC adds +-10%% jitter), so clients "
                                                  "behind an L4 balancer reconnect and spread over the replicas "
                                                  "(one channel is one connection); 0: never.", CONNECTIONS)
    max_connection_age_grace_ms: int = setting(60_000, "After the age's GOAWAY, calls still open get this long, "
                                                       "then the connection closes; 0: forever.", CONNECTIONS)
    tls_cert_file: str = setting("", "PEM certificate chain; with --tls-key-file the gRPC port speaks TLS only.",
                                 SECURITY)
    tls_key_file: str = setting("", "PEM private key of --tls-cert-file.", SECURITY)
    tls_client_ca_file: str = setting("", "PEM CA bundle: clients must present a certificate it signed (mutual "
                                          "TLS).", SECURITY)
    auth_token_file: str = setting("", "Accepted bearer tokens, one a line: every call but health must carry "
                                       "one (authorization: Bearer TOKEN).", SECURITY)
    admin_token_file: str = setting("", "Bearer tokens, one a line, that may load and unload models (explicit "
                                        "mode); with --auth-token-file set, the repository calls need one of "
                                        "these, and an inference token is refused PERMISSION_DENIED.", SECURITY)
    workers: int = setting(1, "Server processes sharing the gRPC port (SO_REUSEPORT), each with its own models "
                              "and a share of the cores; docs/scaling.md.", PROCESS)
    worker_index: int = setting(-1, "Set by the supervisor of --workers for each worker; -1: not a worker.",
                                PROCESS)
    grace_period_seconds: float = setting(10.0, "After SIGTERM, calls in flight may finish for this long; new "
                                                "calls get UNAVAILABLE meanwhile.", PROCESS)
    ready_file: str = setting("", "Once SERVING, a JSON document (pid, ports, models, device) is written here, "
                                  "atomically; removed at stop.", PROCESS)
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR; the server logs a line per start, stop and "
                                     "error, not per request.", PROCESS)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_queue_images < self.max_batch_size:
            raise ValueError(
                f"max_queue_images ({self.max_queue_images}) must hold one full batch ({self.max_batch_size})"
            )
        if self.compiled_min_batch < 0 or self.compiled_min_batch_wide < 1:
            raise ValueError(f"compiled_min_batch must be >= 0 (0: never) and compiled_min_batch_wide >= 1, got "
                             f"{self.compiled_min_batch} and {self.compiled_min_batch_wide}")
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
        if self.http_port < -1 or self.http_max_connections < 1 or self.http_max_body_bytes < 1:
            raise ValueError(f"http_port must be >= -1 (-1: off), http_max_connections and http_max_body_bytes "
                             f">= 1; got {self.http_port}, {self.http_max_connections}, {self.http_max_body_bytes}")
        for name in ("http_header_timeout_ms", "http_body_timeout_ms", "http_idle_timeout_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        if self.model_control_mode not in ("none", "poll", "explicit"):
            raise ValueError(f"model_control_mode must be none, poll or explicit, got {self.model_control_mode!r}")
        VersionPolicy.parse(self.version_policy)  # a bad policy fails here, naming the setting
        if self.repository_poll_seconds <= 0:
            raise ValueError(f"repository_poll_seconds must be > 0, got {self.repository_poll_seconds}")
        if self.model_control_mode == "explicit" and self.workers > 1:
            raise ValueError("model_control_mode explicit with workers > 1: a load or unload call reaches one worker "
                             "only, so the workers would serve different models; use poll mode with --workers")
        if self.admin_token_file and not self.auth_token_file:
            raise ValueError("admin_token_file needs auth_token_file: without inference tokens every caller could "
                             "call the repository")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")

    @property
    def policy(self) -> VersionPolicy:
        """``version_policy``, parsed."""
        return VersionPolicy.parse(self.version_policy)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model are served: ``latest:N``, ``all`` or ``specific:V1,V2``."""

    kind: str
    count: int = 1
    versions: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        kind, _, rest = text.partition(":")
        if kind == "all" and not rest:
            return cls("all")
        if kind == "latest" and (not rest or rest.isdigit() and int(rest) >= 1):
            return cls("latest", int(rest or 1))
        if kind == "specific" and rest and all(v for v in rest.split(",")):
            return cls("specific", versions=tuple(rest.split(",")))
        raise ValueError(f"version_policy {text!r}: use latest:N (N >= 1), all, or specific:V1,V2")

    def choose(self, versions) -> list[str]:
        ordered = sorted(versions, key=version_key)
        if self.kind == "all":
            return ordered
        if self.kind == "latest":
            return ordered[-self.count:]
        return [v for v in ordered if v in self.versions]


def version_key(version: str) -> tuple:
    """Numbers in numeric order, before other names in text order: "2" < "10" < "v1"."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


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
    """For ``instances=0``: 2 on CUDA; on the CPU one per torch thread (docs/scaling.md, "Instances")."""
    return 2 if device_type == "cuda" else torch_threads


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line: one flag per setting, grouped, each with its meaning, variable and default."""
    environ = os.environ if environ is None else environ
    result = argparse.ArgumentParser(
        prog="cifar10-server",
        description="Serve CIFAR-10 TorchScript models: the cifar10.v1 API and the Open Inference Protocol on one "
        "gRPC port (--port), the Open Inference Protocol over HTTP/REST on another (--http-port). Each flag can "
        "also be set as the environment variable "
        f"{ENV_PREFIX}<FLAG_NAME>, e.g. {ENV_PREFIX}PORT=50051; a flag wins over the variable.",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(ServerConfig):
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = result.add_argument_group(group)
        kind = _kind(f)
        default = environ.get(_env(f.name), f.default)
        groups[group].add_argument(_flag(f.name), type=kind, default=kind(default), metavar=kind.__name__.upper(),
                                   help=f"{f.metadata['help']} (env {_env(f.name)}, default {_shown(f.default)})")
    return result


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Builds the config from ``argv`` (flags) over ``environ`` (CIFAR10_* variables) over defaults."""
    argument_parser = parser(environ)
    args = argument_parser.parse_args(argv)
    try:
        return ServerConfig(**vars(args))
    except ValueError as exc:  # settings that disagree: a usage error, said in one line (exit status 2)
        argument_parser.error(str(exc))


def markdown() -> str:
    """docs/configuration.md: every setting by group, from the same text as ``--help``."""
    lines = ["# Configuration", "",
             "Every setting of the server, as `python -m cifar10_serving.server --help` shows it. Each flag "
             f"`--some-name` can also be set as the environment variable `{ENV_PREFIX}SOME_NAME`; a flag wins "
             "over the variable, the variable over the default.", "",
             "Generated by `python -m cifar10_serving.server.config > docs/configuration.md` from the "
             "settings' own text in `server/config.py`; `tests/test_config.py` fails when they differ.", ""]
    groups: dict[str, list] = {}
    for f in fields(ServerConfig):
        groups.setdefault(f.metadata["group"], []).append(f)
    for group, members in groups.items():
        lines += [f"## {group[0].upper()}{group[1:]}", "", "| flag | variable | default | meaning |",
                  "| --- | --- | --- | --- |"]
        for f in members:
            default = "the bundled models" if f.name == "models_dir" else _shown(f.default)
            meaning = f.metadata["help"].replace("%%", "%").replace("|", "\\|")
            lines.append(f"| `{_flag(f.name)}` | `{_env(f.name)}` | `{default}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)


def _kind(f) -> type:
    return {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]


def _shown(default) -> str:
    return repr(default) if default == "" else str(default)


if __name__ == "__main__":
    print(markdown(), end="")
