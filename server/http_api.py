"""The Open Inference Protocol (KServe v2) over HTTP/REST: curl, tritonclient.http, KServe's clients.

A thin front-end over the serving core (``server.core``), on its own port and the same event loop as
gRPC: the same models, answer budget, decode lanes, batchers, drain, TLS, tokens and metrics. Its
requests are counted under method labels of their own (``HTTPModelInfer``, ``HTTPModelMetadata``,
``HTTPModelStatistics`` ...) in the same histograms as gRPC's, refusals of the drain and the tokens
included. The request path reads as gRPC's does: the model from the URL (404), the
body's size from ``Content-Length`` (413, before reading it), a reservation for the body (429),
the body read within ``--http-body-timeout-ms``, the plan (``server.http_tensors``, 400), a
reservation for the images and the answer (429), decode, infer, and the answer written while the
reservation is held, so a client that reads nothing holds the budget as on gRPC.

Endpoints (``/v2/models/{model}`` may add ``/versions/{version}``):

    GET  /v2/health/live | /v2/health/ready      no token: probes carry none
    GET  /v2                                     server metadata
    GET  /v2/models/{model} | .../ready          model metadata, readiness
    POST /v2/models/{model}/infer                JSON, or Triton's binary tensor extension; explanations too
    GET  /v2/models/{model}/config               Triton's model configuration
    GET  /v2/models[/{model}]/stats              Triton's statistics
    POST /v2/repository/index                    the repository's index
    POST /v2/repository/models/{model}/load | unload   explicit mode; an admin token when tokens are on

The protocol's rules are ``server.v2_tensors``', shared with the gRPC front-end; the JSON and binary
framing is ``server.http_tensors``'.

Why aiohttp (docs/open-inference.md says it too): the asyncio HTTP server that runs on an event loop
it does not own, alongside grpc.aio, without a second framework (ASGI) or server process between; a
request body is read only when the handler asks for it, so a body is refused from its
``Content-Length`` before it is read; one small dependency with a long record of maintenance (aio-libs).

``Expect: 100-continue`` is answered "100 Continue" only when a handler reads the body (``_continue``),
not by aiohttp before the middleware runs, so the refusals that need no body (503 draining, 401/403,
404 for a model, 411, 413, 429) come before the client is invited to send it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from importlib import metadata as package_metadata
from typing import Callable

from aiohttp import HttpVersion11, web
from grpc_health.v1 import health_pb2

from cifar10_serving.server import http_tensors
from cifar10_serving.server import v2_tensors as rules
from cifar10_serving.server.answer_budget import Reservation
from cifar10_serving.server.calls import INTERNAL_MESSAGE, Call
from cifar10_serving.server.core import ServingCore
from cifar10_serving.server.errors import Code, Rejection, invalid
from cifar10_serving.server.http_server import Limits, Listener, ssl_context
from cifar10_serving.server.images import Encoded, Raw, Resize, Source
from cifar10_serving.server.security import NOT_ACCEPTED, NOT_ADMIN, check_bearer, load_tokens, warn_plaintext_http
from cifar10_serving.server.v2_tensors import ENCODED_IMAGE, IMAGE, SERVER_NAME

log = logging.getLogger(__name__)

# Triton's: top-k strings, binary tensors, and the REST forms of ModelConfig, ModelStatistics and the repository.
EXTENSIONS = ("classification", "binary_tensor_data", "model_configuration", "statistics", "model_repository")
# The protocol's method of each call but inference and metadata (its messages name it); its metrics
# label is the same name after "HTTP" (server.metrics.METHODS), apart from gRPC's.
METHODS = {"stats": "ModelStatistics", "config": "ModelConfig", "index": "RepositoryIndex",
           "load": "RepositoryModelLoad", "unload": "RepositoryModelUnload"}
HTTP = "HTTP"  # the prefix of this front-end's method labels
SMALL_BODY_BYTES = 64 * 1024  # the repository calls' JSON: a few parameters at most
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
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


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
        self._tokens: list[bytes] | None = None  # None: tokens are off
        self._labels: dict[Callable, str] = {}  # each route's handler -> its method label (app())
        self._admin: list[bytes] = []  # who may load and unload (docs/model-repository.md)
        if config.auth_token_file:
            if config.admin_token_file:
                self._admin = [t.encode() for t in load_tokens(config.admin_token_file, "admin_token_file")]
            self._tokens = [t.encode() for t in load_tokens(config.auth_token_file)] + self._admin
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._runner: web.AppRunner | None = None
        try:
            self._version = package_metadata.version(SERVER_NAME)
        except package_metadata.PackageNotFoundError:
            self._version = "0+unknown"

    # ------------------------------------------------------------------ life
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=self.config.http_max_body_bytes)
        app.on_response_prepare.append(_server_header)

        def get(path: str, handler) -> None:
            app.router.add_get(path, handler, expect_handler=_expect)

        def post(path: str, handler) -> None:
            app.router.add_post(path, handler, expect_handler=_expect)

        get("/v2/health/live", self.live)
        get("/v2/health/ready", self.ready)
        get("/v2", self.server_metadata)
        get("/v2/models/stats", self.statistics)  # before /v2/models/{model}: every model's
        for model in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            get(model, self.model_metadata)
            get(model + "/ready", self.model_ready)
            post(model + "/infer", self.infer)
            get(model + "/config", self.model_config)
            get(model + "/stats", self.statistics)
        post("/v2/repository/index", self.repository_index)
        post("/v2/repository/models/{model}/load", self.repository_load)
        post("/v2/repository/models/{model}/unload", self.repository_unload)
        calls = {"config": self.model_config, "stats": self.statistics, "index": self.repository_index,
                 "load": self.repository_load, "unload": self.repository_unload}  # those _lookup counts
        self._labels = {self.infer: "HTTPModelInfer", self.model_metadata: "HTTPModelMetadata",
                        **{handler: HTTP + METHODS[kind] for kind, handler in calls.items()}}  # probes: not counted
        return app

    async def start(self) -> int:
        """Opens the port; returns it."""
        warn_plaintext_http(self.config)
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
                self._count_refusal(request, Code.UNAVAILABLE)
                return error(503, DRAINING_MESSAGE, close=True)
            if self._tokens is not None and not open_path:
                problem = check_bearer(self._tokens, request.headers.get("Authorization"))
                status = 403 if problem == NOT_ACCEPTED else 401
                if problem is not None:
                    self._count_refusal(request, Code.PERMISSION_DENIED if status == 403 else Code.UNAUTHENTICATED)
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

    def _count_refusal(self, request: web.Request, code: Code) -> None:
        """A request the drain or the tokens refused, counted as gRPC's metrics interceptor counts its
        refused calls: under the method it was for, with the code it got (no route: not counted)."""
        method = self._labels.get(request.match_info.handler)
        if method is not None:
            name = request.match_info.get("model", "")
            with contextlib.suppress(Rejection), Call(self.metrics, method, self.core.label(name) if name else ""):
                raise Rejection(code, "refused before the handler")

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
        versions = [m.version for m in self.core.models() if m.name == model.name]  # every ready one, as gRPC
        return web.json_response(rules.model_metadata(model, versions))

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
        deadline = None
        if plan.timeout_us is not None:
            deadline = call.deadline = time.monotonic() + plan.timeout_us / 1e6
        explained = []
        if plan.outputs.explanation is not None:  # explained images are not counted as classified ones
            explained = await self._explanation_tensors(plan, deadline, held)
            if not plan.outputs.inference:
                return _framed(*await self.core.off_loop(http_tensors.answer, plan, explained))
        call.images = plan.images
        json_out = any(not o.raw for o in plan.outputs.outputs)
        advice = (f"request fewer layer outputs (this asks for {len(plan.layers)}), binary FP16 ones, or fewer images"
                  if plan.layers else "send fewer images per request")
        held.append(self.core.reserve(model, images=plan.images, request_bytes=0, echo_bytes=plan.echo_bytes,
                                      layers=plan.layers, itemsize=JSON_VALUE_BYTES if json_out else 4,
                                      advice=advice))
        images = await self._images(plan, deadline)
        result = await self.core.infer(model, images, plan.layers, deadline, held[-1])  # counted in the statistics
        tensors = plan.outputs.in_order(
            rules.inference_tensors(model, plan.outputs, result.probabilities, result.features) + explained)
        if plan.layers or explained or (json_out and plan.images > 1):  # large answers are written off the loop
            return _framed(*await self.core.off_loop(http_tensors.answer, plan, tensors))
        return _framed(*http_tensors.answer(plan, tensors))

    async def _explanation_tensors(self, plan: http_tensors.Plan, deadline: float | None,
                                   held: list[Reservation]) -> list:
        """Saliency and Grad-CAM on the core's explanation path, as gRPC's ModelInfer and cifar10.v1's
        Explain take it: checked, reserved, then a place on the path (429 at once when none is free)."""
        model, ask = plan.model, plan.outputs.explanation
        layer = self.core.explainer.plan(model, plan.images, ask.layer, ask.target)
        json_maps = any(not o.raw for o in plan.outputs.outputs if o.name in rules.EXPLANATIONS)
        held.append(self.core.reserve_explanation(model, images=plan.images, request_bytes=0,
                                                  echo_bytes=plan.echo_bytes,
                                                  value_bytes=JSON_VALUE_BYTES if json_maps else 4))
        try:
            maps = await self.core.explain(model, await self._sources(plan), Resize.CENTER_CROP, layer, ask.target,
                                           deadline)
        except Rejection as rejection:
            raise (rules.with_input_name(rejection) if plan.input == ENCODED_IMAGE else rejection) from None
        return rules.explanation_tensors(plan.outputs, maps, layer)

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
        await _continue(request)
        try:
            return await asyncio.wait_for(request.read(), timeout)
        except asyncio.TimeoutError:
            raise _Status(408, f"the body's {length:,} bytes did not arrive within {timeout:g} s "
                               "(--http-body-timeout-ms)") from None

    async def _maybe_off_loop(self, size: int, fn: Callable, *args):
        return await self.core.off_loop(fn, *args) if size > OFF_LOOP_BYTES else fn(*args)

    async def _pixels(self, plan: http_tensors.Plan):
        model = plan.model
        size = len(plan.binary) if plan.binary is not None else plan.images * math.prod(model.input_shape)
        array = await self._maybe_off_loop(size, http_tensors.image_array, plan)
        return self.core.tensor(model, array, f"input {IMAGE!r}: {plan.datatype}")

    async def _images(self, plan: http_tensors.Plan, deadline: float | None):
        if plan.input == IMAGE:
            return await self._pixels(plan)
        files = [Encoded(data) for data in http_tensors.encoded_files(plan)]
        try:
            return await self.core.decode(plan.model, files, Resize.CENTER_CROP, deadline)
        except Rejection as rejection:
            raise rules.with_input_name(rejection) from None

    async def _sources(self, plan: http_tensors.Plan) -> list[Source]:
        """The input as the core's image sources, for the explanation path (which decodes them itself)."""
        if plan.input == ENCODED_IMAGE:
            return [Encoded(data) for data in http_tensors.encoded_files(plan)]
        pixels = await self._pixels(plan)
        return [Raw(image.tobytes(), image.shape, pixels.dtype, channels_last=False) for image in pixels]

    # ------------------------------------------------------------------ statistics, configuration, repository
    async def model_config(self, request: web.Request) -> web.Response:
        def config() -> dict:
            model = self.core.model(request.match_info["model"], request.match_info.get("version", ""))
            return rules.model_config(model, self.config, self.core.server_instances, self.core.device.type)

        return await self._lookup(request, "config", config)

    async def statistics(self, request: web.Request) -> web.Response:
        async def statistics() -> dict:  # with --workers, the siblings are asked
            versions = await self.core.statistics(request.match_info.get("model", ""),
                                                  request.match_info.get("version", ""))
            return {"model_stats": [rules.model_statistics(v) for v in versions]}

        return await self._lookup(request, "stats", statistics)

    async def repository_index(self, request: web.Request) -> web.Response:
        async def index() -> list:
            document = await self._small_json(request, ("repository_name", "ready"))
            rules.one_repository(_string(document.get("repository_name", ""), "\"repository_name\""))
            ready = document.get("ready", False)
            if not isinstance(ready, bool):
                raise invalid(f"\"ready\" is {rules.shown(ready)}; send true or false")
            return rules.repository_index(self.core.repository.index(ready_only=ready))

        return await self._lookup(request, "index", index, model="")

    async def repository_load(self, request: web.Request) -> web.Response:
        return await self._change(request, "load", self.core.repository.load)

    async def repository_unload(self, request: web.Request) -> web.Response:
        return await self._change(request, "unload", self.core.repository.unload)

    async def _change(self, request: web.Request, kind: str, change) -> web.Response:
        """A load or an unload: an admin token when tokens are on (403 for another), then gRPC's rules
        (``server.v2_tensors.check_change``: explicit mode only, no parameters) and the repository's
        own check of the name."""
        if self._tokens is not None and check_bearer(self._admin, request.headers.get("Authorization")) is not None:
            return error(403, NOT_ADMIN, close=True)

        async def work() -> dict:
            document = await self._small_json(request, ("parameters",))
            params = http_tensors.parameters(document, METHODS[kind])
            rules.check_change(self.config.model_control_mode, METHODS[kind], params)
            await change(request.match_info["model"])
            return {}

        return await self._lookup(request, kind, work, model=request.match_info["model"])

    async def _lookup(self, request: web.Request, kind: str, answer: Callable, model: str | None = None):
        """A call that is not inference: counted under the protocol's method, refused like any other."""
        name = request.match_info.get("model", "") if model is None else model
        try:
            with Call(self.metrics, HTTP + METHODS[kind], self.core.label(name) if name else ""):
                result = answer()
                if asyncio.iscoroutine(result):
                    result = await result
        except Rejection as rejection:
            return rejected(rejection, close=not request.content.is_eof())
        return web.json_response(result)

    async def _small_json(self, request: web.Request, keys: tuple[str, ...]) -> dict:
        """A repository call's JSON body: empty or an object of ``keys``, at most ``SMALL_BODY_BYTES``."""
        length = request.content_length
        if length is None and request.headers.get("Transfer-Encoding"):
            raise _Status(411, "send the body with a Content-Length (chunked bodies are not read)")
        if length is not None and length > SMALL_BODY_BYTES:
            raise _Status(413, f"the body is {length:,} bytes; this call takes at most {SMALL_BODY_BYTES:,}")
        if not length:
            return {}
        timeout = self.config.http_body_timeout_ms / 1000 if self.config.http_body_timeout_ms > 0 else None
        await _continue(request)
        try:
            body = await asyncio.wait_for(request.read(), timeout)
        except asyncio.TimeoutError:
            raise _Status(408, f"the body's {length:,} bytes did not arrive within {timeout:g} s "
                               "(--http-body-timeout-ms)") from None
        if not body.strip():
            return {}
        document = http_tensors.parse_json(body, "the body", "")
        http_tensors.known_keys(document, keys, "the body")
        return document


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """Every route's ``Expect`` handler, called by aiohttp before the middleware. aiohttp's default
    writes "100 Continue" here, before the drain, token and size checks; this one leaves it to
    ``_continue``, and answers an expectation other than 100-continue 417 in JSON (aiohttp's is text)."""
    expect = request.headers.get("Expect", "")
    if request.version == HttpVersion11 and expect.lower() != "100-continue":
        return error(417, f"Expect: {expect[:100]!r} is not supported; send 100-continue or no Expect", close=True)
    return None


async def _continue(request: web.Request) -> None:
    """The "100 Continue" that a client sending ``Expect: 100-continue`` waits for before its body,
    written when the body is about to be read, every refusal before it passed. Left out once some of
    the body has arrived (the client stopped waiting; RFC 9110 section 10.1.1 lets a server omit it)."""
    if (request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue"
            and request.content.total_bytes == 0):
        await request.writer.write(CONTINUE)
        request.writer.output_size = 0  # as aiohttp's own expect handler: the answer itself has not begun


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    """The ``Server`` header names the service, not aiohttp's and Python's versions (aiohttp's default)."""
    response.headers["Server"] = SERVER_NAME


def _framed(body: bytes, header_length: int | None) -> tuple[bytes, dict]:
    """An inference answer's body and headers: JSON, or with binary outputs the JSON header's length."""
    if header_length is None:
        return body, {"Content-Type": "application/json"}
    return body, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}


def _string(value, what: str) -> str:
    if not isinstance(value, str):
        raise invalid(f"{what} is {rules.shown(value)}; send a string")
    return value


class _Status(Rejection):
    """A refusal that only HTTP has words for (411, 413, 408): answered with its own status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(Code.INVALID_ARGUMENT if status != 408 else Code.DEADLINE_EXCEEDED, message)
        self.status = status


async def start(core: ServingCore, health) -> tuple[HttpApi, int]:
    """The HTTP front-end on ``--http-port`` (server/main.py calls it once gRPC has started)."""
    api = HttpApi(core, health)
    return api, await api.start()

