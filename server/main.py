"""Start the CIFAR-10 gRPC server: ``python -m cifar10_serving.server`` (or ``cifar10-server``); ``--help``
lists the settings.

``create_server(config)`` loads every model in the models directory into the serving core
(``server.core``), puts each API's front-end over it (``server.cifar10_v1``, ``server.open_inference``)
beside the health and reflection services, starts gRPC and the Prometheus endpoint, warms the
models up, and only then reports SERVING; what a benchmark swaps (the metrics, the first
interceptors) are its arguments.
``App.stop(grace)`` drains: health goes NOT_SERVING, new calls get UNAVAILABLE, calls in flight
finish within the grace period. ``serve`` adds the signals and the ``--ready-file``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.inference import open_inference_grpc_pb2 as v2
from cifar10_serving.server import cifar10_v1, grpc_metrics, open_inference, registration
from cifar10_serving.server import http_api  # issue 32: the Open Inference Protocol over HTTP
from cifar10_serving.server.config import ServerConfig, default_instances, default_torch_threads, parse_config
from cifar10_serving.server.connections import close_port
from cifar10_serving.server.drain import DrainGate
from cifar10_serving.server.health import DrainingHealthServicer
from cifar10_serving.server.metrics import GpuMemoryCollector, Metrics, serve_metrics
from cifar10_serving.server.models import LoadedModel, ModelLoadError, resolve_device
from cifar10_serving.server.ready_file import remove_ready_file, write_ready_file
from cifar10_serving.server.security import SecurityConfigError, add_port, check_models_dir
from cifar10_serving.server.security import interceptors as security_interceptors
from cifar10_serving.server.core import ServingCore
from cifar10_serving.server.workers import supervise

log = logging.getLogger("server")

SERVICE_NAME = cifar10_v1.SERVICE_NAME  # "cifar10.v1.Classifier"
SERVICES = ("", SERVICE_NAME, open_inference.SERVICE_NAME)  # the names the health service answers for
WRITE_FLUSH_SECONDS = 0.1  # after the last call in flight ends, before its connection is shut (App.stop)
# oneDNN's kernel cache, unless the environment sets it: its default, 1,024, is less than the bundled
# models' architectures need with every rung of the batch ladder warmed at both thread counts, and a
# thrashing cache fragments the heap (docs/reliability.md, "Memory"; the counts in bench/RESULTS.md,
# "Memory and start-up"). oneDNN reads the variable when it makes its first kernel, so setting it
# here, before any model runs, is in time.
ONEDNN_CACHE_CAPACITY = "4096"


@dataclass
class App:
    config: ServerConfig
    server: grpc.aio.Server
    port: int
    metrics_port: int | None
    core: ServingCore
    health: DrainingHealthServicer
    metrics: Metrics
    _metrics_http: object | None = None
    gate: DrainGate | None = None
    device: str = ""
    http: http_api.HttpApi | None = None  # issue 32: --http-port; None when -1
    http_port: int | None = None

    @property
    def models(self) -> dict[str, LoadedModel]:
        """The models serving now (each one's latest ready version), by name."""
        return {model.name: model for model in self.core.models()}

    async def all_ready(self) -> None:
        """Returns once every model loaded at start serves (the default one does from SERVING on)."""
        starting = self.core.repository.starting
        if starting is not None:
            await asyncio.shield(starting)

    async def stop(self, grace: float | None = None) -> None:
        """Drains and stops: NOT_SERVING and new calls refused UNAVAILABLE first, in-flight calls get up
        to ``grace`` seconds, then the port's connections are closed and gRPC is stopped."""
        grace = self.config.grace_period_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()  # health watches send NOT_SERVING and end
        if self.http is not None:  # issue 32: HTTP readiness is false already; new requests get 503
            self.http.drain()
        if self.gate is not None:
            self.gate.drain()  # new calls: UNAVAILABLE; streams answer what they have read and end with UNAVAILABLE
            if not await self.gate.idle(grace):
                log.warning("%d calls still in flight after the %.1fs grace period: closing their connections",
                            self.gate.in_flight, grace)
            # A call is done for grpc.aio once its last frames are queued in the transport, before
            # gRPC's own thread writes them to the socket (chttp2 completes the send-status step
            # when it queues the frame). Shutting the connection in that gap loses an answer that
            # was computed: the client sees UNAVAILABLE. One short pause lets the write happen.
            await asyncio.sleep(min(WRITE_FLUSH_SECONDS, max(0.0, deadline - time.monotonic())))
            # A call gRPC has but no handler yet would be CANCELLED by server.stop (grpc/grpc#41785):
            # close the connections first, so that a client sees UNAVAILABLE instead (server/connections.py).
            listeners, connections = close_port(self.port)
            log.debug("closed %d listening sockets and %d connections", listeners, connections)
        if self.http is not None:  # issue 32: HTTP requests in flight finish within the same grace
            await self.http.stop(max(0.0, deadline - time.monotonic()))
        await self.server.stop(max(0.0, deadline - time.monotonic()))
        await self.core.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()


def default_registry() -> CollectorRegistry:
    """A registry with the client library's process, platform and GC collectors."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def set_threads(config: ServerConfig) -> int:
    threads = config.torch_threads or default_torch_threads()
    torch.set_num_threads(threads)
    return threads


async def create_server(config: ServerConfig, registry: CollectorRegistry | None = None, *,
                        metrics: Metrics | None = None,
                        interceptors: Sequence[grpc.aio.ServerInterceptor] | None = None) -> App:
    """The server, SERVING. ``metrics``: what the service and batchers record into (default
    ``Metrics(registry)``); ``interceptors``: what runs first on every call, before authentication
    and the drain gate (default: gRPC's standard server metrics on ``registry``; ``()`` for none)."""
    device = resolve_device(config.device)
    check_models_dir(config.models_dir)
    threads = set_threads(config)
    instances = config.instances or default_instances(device.type, threads)
    registry = registry if registry is not None else default_registry()
    metrics = metrics if metrics is not None else Metrics(registry, config.max_batch_size)
    if interceptors is None:
        interceptors = [grpc_metrics.interceptor(registry)]
    if device.type == "cuda":
        registry.register(GpuMemoryCollector([device.index or 0]))
    gate = DrainGate((SERVICE_NAME, open_inference.SERVICE_NAME))  # one gate: each call is counted once
    # The given interceptors (the metrics one by default) go first, so calls refused by authentication
    # or the drain gate are counted.
    server = grpc.aio.server(interceptors=[*interceptors, *security_interceptors(config), gate], options=[
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        ("grpc.max_send_message_length", config.max_send_message_bytes),
        # Two servers on one port would split traffic silently; workers of --workers do it on purpose.
        ("grpc.so_reuseport", 1 if config.worker_index >= 0 else 0),
        *connection_options(config),
    ])
    core = ServingCore(config, metrics, device=device, threads=threads, instances=instances)
    health_servicer = DrainingHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Each API over the core, registered as the generated code does, but answers may be wire bytes.
    registration.add_service(cifar10_v1.V1Servicer(core), server, pb, "Classifier")
    registration.add_service(open_inference.OpenInferenceServicer(core, health_servicer), server, v2,
                             "GRPCInferenceService")
    reflection.enable_server_reflection(
        (SERVICE_NAME, open_inference.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    metrics_http, metrics_port = None, None
    http, http_port = None, None  # issue 32
    try:
        for service in SERVICES:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        port = add_port(server, config)
        if port == 0:
            raise OSError(f"cannot bind gRPC to {config.address}")
        if config.metrics_port >= 0:
            metrics_http, metrics_port = serve_metrics(registry, config.metrics_host or config.host,
                                                       config.metrics_port)
        await server.start()
        if config.http_port >= 0:  # issue 32: the HTTP front-end, on this loop and this core
            http, http_port = await http_api.start(core, health_servicer)
        # The models load, and warm up before SERVING: the first passes pay for allocation and kernel
        # selection. In none mode a file that cannot be served fails the start.
        await core.start()
    except BaseException:  # a signal (cancelled) or a failure mid-start: nothing stays open
        if http is not None:  # issue 32
            await http.stop(0)
        await server.stop(0)
        await core.stop()
        if metrics_http is not None:
            metrics_http.shutdown()
            metrics_http.server_close()
        raise
    settle_heap()
    for service in SERVICES:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s:%d (metrics on %s, device %s, %d instances per model sharing %d torch threads, "
             "default model %s%s)", ", ".join(f"{m.name}:{m.version}" for m in core.models()), config.host, port,
             metrics_port if metrics_port is not None else "off", device, instances, threads, config.default_model,
             f", worker {config.worker_index}" if config.worker_index >= 0 else "")
    return App(config, server, port, metrics_port, core, health_servicer, metrics, metrics_http, gate=gate,
               device=str(device), http=http, http_port=http_port)  # issue 32: http


def settle_heap() -> int:
    """Collects start-up's garbage, then moves every object left (torch, the models, the protos: some
    hundreds of thousands) out of the cyclic collector's reach, as long-running Python servers do
    (``gc.freeze``). Each full collection scanned all of them with the loop stopped, one of them soon
    after SERVING and more as the serving heap grew (bench/RESULTS.md, "Responsiveness under
    feature-map load"). Returns how many objects were
    frozen. Frozen objects are still freed when their last reference goes, but a cycle among them
    never is, so this runs once, when start-up is done."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC's channel arguments for the connection limits in ``config``; a limit of 0 is left to gRPC (never)."""
    limits = {"grpc.server_handshake_timeout_ms": config.handshake_timeout_ms,
              "grpc.max_connection_idle_ms": config.max_connection_idle_ms,
              "grpc.max_connection_age_ms": config.max_connection_age_ms,
              "grpc.max_connection_age_grace_ms": config.max_connection_age_grace_ms}
    return [(name, value) for name, value in limits.items() if value > 0]


def ready_document(app: App) -> dict[str, Any]:
    """What ``--ready-file`` holds (server/launcher.py reads it); the supervisor of ``--workers`` adds ``workers``."""
    config = app.config
    return {"pid": os.getpid(), "host": config.host, "port": app.port,
            "metrics_host": config.metrics_host or config.host,
            "metrics_ports": [app.metrics_port] if app.metrics_port is not None else [],
            "models": sorted(app.models), "default_model": config.default_model, "device": app.device,
            "all_ready": app.core.repository.starting is None or app.core.repository.starting.done(),
            "worker_index": config.worker_index,
            "http_port": app.http_port}  # issue 32: None when --http-port -1


async def serve(config: ServerConfig, **seams) -> None:
    """Runs until SIGTERM or SIGINT, then drains; ``seams`` go to ``create_server``. The signals are
    caught from the start: one that comes while models load or warm up ends start-up cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, sig)
    watchdog = asyncio.ensure_future(_watch_parent(stop)) if config.worker_index >= 0 else None
    try:
        app = await _start_unless_stopped(config, stop, seams)
        if app is None:
            log.info("stopped during start-up")
            return
        if config.ready_file:
            if config.worker_index >= 0:  # a worker's file is read once by its supervisor: when all serve
                await app.all_ready()
            write_ready_file(config.ready_file, ready_document(app))  # SERVING: the default model serves
            rewrite = asyncio.ensure_future(_when_all_ready(app))
        await stop.wait()
        if config.ready_file:
            rewrite.cancel()
        if config.ready_file:
            remove_ready_file(config.ready_file)  # draining is not SERVING: nobody should start on this file now
        log.info("stopping: draining for up to %.1fs", config.grace_period_seconds)
        await app.stop()
        log.info("stopped")
    finally:
        if watchdog is not None:
            watchdog.cancel()


async def _when_all_ready(app: App) -> None:
    """Writes the ready file again once every model serves (``all_ready``: what tests and benchmarks
    that use every model wait for)."""
    if not ready_document(app)["all_ready"]:
        await app.all_ready()
        write_ready_file(app.config.ready_file, ready_document(app))
        log.info("all models ready: %s", ", ".join(f"{m.name}:{m.version}" for m in app.core.models()))


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    if not stop.is_set():
        log.info("received %s", sig.name)
    stop.set()


async def _start_unless_stopped(config: ServerConfig, stop: asyncio.Event, seams) -> App | None:
    """``create_server``, cancelled if ``stop`` is set first (it then closes what it opened): None."""
    starting = asyncio.ensure_future(create_server(config, **seams))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((starting, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if starting.done():
        return starting.result()
    log.info("stopping during start-up")
    starting.cancel()
    try:
        await starting
    except asyncio.CancelledError:
        pass
    return None


async def _watch_parent(stop: asyncio.Event, every_seconds: float = 0.5) -> None:
    """A worker of ``--workers`` stops when its supervisor is gone. PR_SET_PDEATHSIG (server/workers.py)
    signals it when the thread that started it exits; this catches a parent that died otherwise."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(every_seconds)
    log.warning("the supervisor (pid %d) is gone; stopping", parent)
    stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)  # workers inherit it
    if config.workers > 1:
        return supervise(config, argv)
    try:
        asyncio.run(serve(config))
    except (ModelLoadError, SecurityConfigError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
