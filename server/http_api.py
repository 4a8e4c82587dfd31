"""The Open Inference Protocol (KServe v2) over HTTP/REST: curl, tritonclient.http, KServe's clients.

A thin front-end over the serving core (``server.core``), on its own port and the same event loop as
gRPC: the same models, answer budget, decode lanes, batchers, drain, TLS, tokens and metrics. Its
requests are counted under their own method label (``HTTPModelInfer``, ``HTTPModelMetadata``) in the
same histograms as gRPC's. The request path reads as gRPC's does: the model from the URL (404), the
body's size from ``Content-Length`` (413, before reading it), a reservation for the body (429),
the body read within ``--http-body-timeout-ms``, the plan (``server.http_tensors``, 400), a
reservation for the images and the answer (429), decode, infer, and the answer written while the
reservation is held, so a client that reads nothing holds the budget as on gRPC.

Endpoints (``/v2/models/{model}`` may add ``/versions/{version}``):

    GET  /v2/health/live | /v2/health/ready      no token: probes carry none
    GET  /v2                                     server metadata
    GET  /v2/models/{model} | .../ready          model metadata, readiness
    POST /v2/models/{model}/infer                JSON, or Triton's binary tensor extension

Why aiohttp: the asyncio HTTP server that runs on an event loop it does not own, alongside grpc.aio,
without a second framework (ASGI) or server process between; a request body is read only when the
handler asks for it, so a body is refused from its ``Content-Length`` before it is read; one small
dependency with a long record of maintenance (aio-libs).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from importlib import metadata as package_metadata
from typing import Callable

from aiohttp import web
from grpc_health.v1 import health_pb2

from cifar10_serving.server import http_tensors
from cifar10_serving.server.answer_budget import Reservation
from cifar10_serving.server.calls import INTERNAL_MESSAGE, Call
from cifar10_serving.server.core import ServingCore
from cifar10_serving.server.errors import Code, Rejection, invalid
from cifar10_serving.server.http_server import Limits, Listener, ssl_context
from cifar10_serving.server.images import Encoded, Resize
from cifar10_serving.server.security import load_tokens

log = logging.getLogger(__name__)

SERVER_NAME = "cifar10-serving"
PLATFORM = "pytorch_torchscript"
EXTENSIONS = ("classification", "binary_tensor_data")
HEADER_LENGTH = "Inference-Header-Content-Length"
OPEN_PATHS = ("/v2/health/",)  # no token, and answered while draining: probes must see not-ready
# The protocol's HTTP status for each of the core's codes (KServe's and Triton's choices).
HTTP_STATUS = {
    Code.OK: 200, Code.INVALID_ARGUMENT: 400, Code.FAILED_PRECONDITION: 400, Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403, Code.NOT_FOUND: 404, Code.RESOURCE_EXHAUSTED: 429, Code.CANCELLED: 499,
    Code.INTERNAL: 500, Code.UNAVAILABLE: 503, Code.DEADLINE_EXCEEDED: 504,
}
RETRY_AFTER_SECONDS = "1"  # on 429 and 503: the queue and the budget empty in milliseconds, not seconds
# A JSON body's values become Python objects: a float in a list is 32 bytes for ~10 of text, so the
# parsed header is counted at twice its text (the core counts a request twice again), binary data once.
JSON_FACTOR = 2
JSON_VALUE_BYTES = 32  # an output value held as a Python float in a list, then as text
OFF_LOOP_BYTES = 64 * 1024  # JSON larger than this is parsed and written on the core's thread
DRAINING_MESSAGE = "the server is shutting down and took no new requests: send it again (to another replica)"


def error(status: int, message: str, *, close: bool = False) -> web.Response:
    """The protocol's error answer: ``{"error": message}``."""
    response = web.json_response({"error": message}, status=status)
    if status in (429, 503):
        response.headers["Retry-After"] = RETRY_AFTER_SECONDS
    if close:  # the body was not read: do not read it to reach the next request
        response.force_close()
    return response


def rejected(rejection: Rejection, *, close: bool = False) -> web.Response:
    status = rejection.status if isinstance(rejection, _Status) else HTTP_STATUS[rejection.code]
    return error(status, rejection.message, close=close)


class HttpApi:
    """The REST front-end; ``start`` opens its port, ``drain`` refuses new requests, ``stop`` closes."""

    def __init__(self, core: ServingCore, health) -> None:
        self.core = core
        self.config = config = core.config
        self.metrics = core.metrics
        self.health = health  # the health servicer: readiness follows it
        self.limits = Limits.of(config)
        self.listener = Listener(self.limits)
        self._tokens = [t.encode() for t in load_tokens(config.auth_token_file)] if config.auth_token_file else None
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._runner: web.AppRunner | None = None
        self._metadata: dict[tuple[str, str], dict] = {}  # by name and version, made on first ask
        try:
            self._version = package_metadata.version(SERVER_NAME)
        except package_metadata.PackageNotFoundError:
            self._version = "0+unknown"

    # ------------------------------------------------------------------ life
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=self.config.http_max_body_bytes)
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2", self.server_metadata)
        for model in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            app.router.add_get(model, self.model_metadata)
            app.router.add_get(model + "/ready", self.model_ready)
            app.router.add_post(model + "/infer", self.infer)
            # The REST forms of the other gRPC calls go here as they land: statistics and
            # configuration (GET .../stats, .../config), the repository (POST /v2/repository/...),
            # and explanations, once the gRPC v2 side offers them.
        return app

    async def start(self) -> int:
        """Opens the port; returns it."""
        self._runner = web.AppRunner(self.app(), handle_signals=False, access_log=None,
                                     keepalive_timeout=self.limits.idle_timeout, lingering_time=0)
        await self._runner.setup()
        return await self.listener.open(self._runner.server, self.config.http_host or self.config.host,
                                        self.config.http_port, ssl_context(self.config),
                                        reuse_port=self.config.worker_index >= 0)

    def drain(self) -> None:
        """New requests but health's get 503; readiness is already false (server/main.py)."""
        self._draining = True

    async def stop(self, timeout: float) -> None:
        """Waits up to ``timeout`` seconds for the requests in flight, answering new ones 503 meanwhile
        (a probe sees not-ready rather than a refused connection), then closes the port and every connection."""
        self.drain()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("%d HTTP requests still in flight after the grace period: closing their connections",
                        self._in_flight)
        await self.listener.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ every request
    @web.middleware
    async def _guard(self, request: web.Request, handler):
        connection = self.listener.of(request.transport)
        if connection is not None:
            connection.request_started()
        self._in_flight += 1
        self._idle.clear()
        try:
            open_path = request.path.startswith(OPEN_PATHS)
            if self._draining and not open_path:
                return error(503, DRAINING_MESSAGE, close=True)
            if self._tokens is not None and not open_path:
                status, problem = self._auth(request.headers.get("Authorization"))
                if problem is not None:
                    response = error(status, problem, close=True)
                    if status == 401:
                        response.headers["WWW-Authenticate"] = "Bearer"
                    return response
            response = await handler(request)
            if self._draining and not response.prepared:
                response.force_close()  # clients reconnect, to another replica
            return response
        except ConnectionError:  # the client went away mid-answer: aiohttp ends the connection quietly
            raise
        except web.HTTPException as exc:  # aiohttp's own: no route (404), wrong method (405)
            return error(exc.status, exc.reason if exc.status != 404 else f"no endpoint {request.path[:200]}",
                         close=True)
        except Exception:
            log.error("HTTP %s %s failed", request.method, request.path[:200], exc_info=True)
            return error(500, INTERNAL_MESSAGE, close=True)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            if connection is not None:
                connection.request_finished()

    def _auth(self, value: str | None) -> tuple[int, str | None]:
        """As the gRPC side: ``Bearer <token>``, the scheme in any case, compared in constant time."""
        if value is None:
            return 401, "this server needs a bearer token: send the header 'Authorization: Bearer <token>'"
        scheme, _, given = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return 401, "the Authorization header must be 'Bearer <token>'"
        given_bytes = given.strip().encode("latin-1", "replace")
        accepted = False
        for token in self._tokens:
            accepted |= hmac.compare_digest(given_bytes, token)
        return (200, None) if accepted else (403, "bearer token not accepted")

    # ------------------------------------------------------------------ health and metadata
    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = await self._serving()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": SERVER_NAME, "version": self._version, "extensions": list(EXTENSIONS)})

    async def model_ready(self, request: web.Request) -> web.Response:
        try:
            model = self.core.model(request.match_info["model"], request.match_info.get("version", ""))
        except Rejection as rejection:
            return rejected(rejection)
        ready = await self._serving()
        return web.json_response({"name": model.name, "ready": ready}, status=200 if ready else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        try:
            with Call(self.metrics, "HTTPModelMetadata", self.core.label(name)):
                model = self.core.model(name, request.match_info.get("version", ""))
        except Rejection as rejection:
            return rejected(rejection)
        key = (model.name, model.version)
        if key not in self._metadata:
            self._metadata[key] = http_tensors.model_metadata(model, PLATFORM)
        return web.json_response(self._metadata[key])

    async def _serving(self) -> bool:
        response = await self.health.Check(health_pb2.HealthCheckRequest(service=""), None)
        return response.status == health_pb2.HealthCheckResponse.SERVING

    # ------------------------------------------------------------------ inference
    async def infer(self, request: web.Request) -> web.StreamResponse:
        held: list[Reservation] = []
        name = request.match_info["model"]
        try:
            with Call(self.metrics, "HTTPModelInfer", self.core.label(name), in_flight=True) as call:
                body, headers = await self._infer(request, call, held)
        except Rejection as rejection:
            for reservation in held:
                reservation.release()
            return rejected(rejection, close=not request.content.is_eof())
        try:  # the reservations are held until the answer is written: a client that reads nothing holds them
            response = web.StreamResponse(headers=headers)
            response.content_length = len(body)
            if self._draining:
                response.force_close()
            await response.prepare(request)
            await response.write(body)
            await response.write_eof()
            return response
        finally:
            for reservation in held:
                reservation.release()

    async def _infer(self, request: web.Request, call: Call, held: list[Reservation]) -> tuple[bytes, dict]:
        model = self.core.model(request.match_info["model"], request.match_info.get("version", ""))
        body = await self._body(request, model, held)
        header, binary = http_tensors.split(body, request.headers.get(HEADER_LENGTH))
        document = await self._maybe_off_loop(len(header), http_tensors.parse_json, header)
        plan = http_tensors.plan(model, document, binary, self.config.max_batch_size, self.core.check_echo)
        call.images = plan.images
        deadline = None
        if plan.timeout_us is not None:
            deadline = call.deadline = time.monotonic() + plan.timeout_us / 1e6
        json_out = any(not o.binary for o in plan.outputs)
        advice = (f"request fewer layer outputs (this asks for {len(plan.layers)}), binary FP16 ones, or fewer images"
                  if plan.layers else "send fewer images per request")
        held.append(self.core.reserve(model, images=plan.images, request_bytes=0, echo_bytes=plan.echo_bytes,
                                      layers=plan.layers, itemsize=JSON_VALUE_BYTES if json_out else 4,
                                      advice=advice))
        images = await self._images(plan, deadline)
        result = await self.core.infer(model, images, plan.layers, deadline, held[-1])  # counted in the statistics
        if plan.layers or (json_out and plan.images > 1):  # large answers are written off the loop
            text, header_length = await self.core.off_loop(http_tensors.answer, plan, result.probabilities,
                                                           result.features)
        else:
            text, header_length = http_tensors.answer(plan, result.probabilities, result.features)
        if header_length is None:
            return text, {"Content-Type": "application/json"}
        return text, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}

    async def _body(self, request: web.Request, model, held: list[Reservation]) -> bytes:
        """The body, refused from ``Content-Length`` before it is read when over the limit (413) or
        over the answer budget (429), and read within ``--http-body-timeout-ms``."""
        length, limit = request.content_length, self.config.http_max_body_bytes
        if length is None:
            raise _Status(411, "send the body with a Content-Length (chunked bodies are not read)")
        if length > limit:
            raise _Status(413, f"the body is {length:,} bytes; the limit is {limit:,} (--http-max-body-bytes): "
                               "send fewer images per request")
        header = request.headers.get(HEADER_LENGTH)
        json_bytes = int(header) if header is not None and header.isdigit() and int(header) <= length else length
        held.append(self.core.reserve(model, images=0, request_bytes=JSON_FACTOR * json_bytes + (length - json_bytes),
                                      advice="send fewer images per request"))
        timeout = self.config.http_body_timeout_ms / 1000 if self.config.http_body_timeout_ms > 0 else None
        try:
            return await asyncio.wait_for(request.read(), timeout)
        except asyncio.TimeoutError:
            raise _Status(408, f"the body's {length:,} bytes did not arrive within {timeout:g} s "
                               "(--http-body-timeout-ms)") from None

    async def _maybe_off_loop(self, size: int, fn: Callable, *args):
        return await self.core.off_loop(fn, *args) if size > OFF_LOOP_BYTES else fn(*args)

    async def _images(self, plan: http_tensors.Plan, deadline: float | None):
        model = plan.model
        if plan.input == http_tensors.IMAGE:
            size = len(plan.binary) if plan.binary is not None else plan.images * math.prod(model.input_shape)
            array = await self._maybe_off_loop(size, http_tensors.image_array, plan)
            return self.core.tensor(model, array, f"input {http_tensors.IMAGE!r}: {plan.datatype}")
        files = [Encoded(data) for data in http_tensors.encoded_files(plan)]
        try:
            return await self.core.decode(model, files, Resize.CENTER_CROP, deadline)
        except Rejection as rejection:
            if rejection.code is Code.INVALID_ARGUMENT:
                raise invalid(f"input {http_tensors.ENCODED_IMAGE!r}: {rejection.message}") from None
            raise


class _Status(Rejection):
    """A refusal that only HTTP has words for (411, 413, 408): answered with its own status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(Code.INVALID_ARGUMENT if status != 408 else Code.DEADLINE_EXCEEDED, message)
        self.status = status


async def start(core: ServingCore, health) -> tuple[HttpApi, int]:
    """The HTTP front-end on ``--http-port`` (server/main.py calls it once gRPC has started)."""
    api = HttpApi(core, health)
    return api, await api.start()

