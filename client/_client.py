"""The client object: owns its channel, is a context manager, takes a timeout per call."""

from __future__ import annotations

import io
import ipaddress
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence, Union

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar10_serving.client.explanation import Explanation, explanations
from cifar10_serving.client.filters import LayerFilters, layer_filters
from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc

ImageLike = Union[str, os.PathLike, bytes, np.ndarray, Any]  # Any: a PIL.Image.Image
DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 256 << 20  # matches the server's send limit: all feature maps of a full batch
_NUMPY_DTYPES = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_FLOAT16: np.dtype("<f2")}
_FEATURE_DTYPES = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16}
_SERVICE = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
# The unary methods have no side effects, so a call the server never ran is safe to send again:
# UNAVAILABLE (shutting down, or not reachable yet) and CANCELLED that the caller did not cause (gRPC
# fails calls it had not yet handed to a handler when the server stops that way: grpc/grpc#41785).
# gRPC itself retries, and only while no response has begun; a call this client cancels is not retried.
RETRYABLE_CODES = ("UNAVAILABLE", "CANCELLED")
# Between attempts to reconnect to a replica that went away gRPC waits 1 s, then 1.6 times longer
# each time, up to 120 s: a replica back from a restart would wait that long for calls again.
BALANCED_MAX_RECONNECT_BACKOFF_MS = 2000


def retry_service_config(attempts: int, load_balancing: str | None = None) -> str:
    """The gRPC service config that retries Classify, ListModels, GetModelInfo and GetFilters up to
    ``attempts`` times in all (50 ms, then 100 ms, ... up to 500 ms apart, with gRPC's jitter), and
    balances calls with the ``load_balancing`` policy (``"round_robin"``, ``"pick_first"``; None:
    gRPC's default)."""
    config: dict[str, Any] = {}
    if load_balancing is not None:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    if attempts > 1:
        config["methodConfig"] = [{
            "name": [{"service": _SERVICE, "method": m}
                     for m in ("Classify", "ListModels", "GetModelInfo", "GetFilters")],
            "retryPolicy": {"maxAttempts": attempts, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
                            "backoffMultiplier": 2, "retryableStatusCodes": list(RETRYABLE_CODES)},
        }]
    return json.dumps(config)


def address_list_target(addresses: Sequence[str]) -> str:
    """One gRPC target for several ``host:port`` addresses of replicas, all IPv4 or all IPv6
    literals: ``["127.0.0.1:50061", "127.0.0.1:50062"]`` -> ``"ipv4:127.0.0.1:50061,127.0.0.1:50062"``.
    Names need a resolver that returns every replica: a ``dns:///`` target (a headless Service)."""
    if not addresses:
        raise ValueError("no addresses given")
    families = set()
    for address in addresses:
        host, sep, port = address.rpartition(":")
        try:
            families.add(ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).version)
            if not sep or not port.isdigit() or (":" in host and not host.startswith("[")):
                raise ValueError
        except ValueError:
            raise ValueError(f"{address!r} is not an IP address and port (127.0.0.1:50051, [::1]:50051); for host "
                             "names use one target such as dns:///NAME:PORT whose name resolves to every replica") from None
    if len(families) > 1:
        raise ValueError(f"mix of IPv4 and IPv6 addresses: {list(addresses)}; gRPC takes one family per target")
    return f"ipv{families.pop()}:" + ",".join(addresses)


def _is_address_list(target: str) -> bool:
    return target.startswith(("ipv4:", "ipv6:")) and "," in target


class ClassifierError(Exception):
    """A failed call; ``code`` is the gRPC status code, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "ClassifierError":
        return cls(error.code(), error.details() or "")


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    probability: float


@dataclass
class Classification:
    """One image's answer: softmax scores, the top k, and any feature maps as numpy arrays."""

    probabilities: np.ndarray  # float32, one score per class
    top_k: list[Prediction]
    feature_maps: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> (C, H, W) or (N,)
    model: str = ""  # the model and version that answered
    version: str = ""

    @property
    def label(self) -> str:
        return self.top_k[0].label


@dataclass
class StreamResult:
    """One answer from ``classify_stream``: ``results`` on success, ``error`` otherwise."""

    request_id: str
    results: list[Classification]
    error: ClassifierError | None = None


def to_image(image: ImageLike) -> pb.Image:
    """A path, encoded bytes, an H x W x 3 array (uint8, or float32 in [0, 1]) or a PIL image."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return pb.Image(encoded=f.read())
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.Image(encoded=bytes(image))
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8:
            dtype = pb.DTYPE_UINT8
        elif image.dtype == np.float32:
            dtype = pb.DTYPE_FLOAT32
        else:
            raise TypeError(f"arrays must be uint8 or float32, got {image.dtype}")
        array = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("<"))
        return pb.Image(raw=pb.RawTensor(shape=array.shape, dtype=dtype, layout=pb.LAYOUT_HWC,
                                         data=array.tobytes()))
    if hasattr(image, "save") and hasattr(image, "mode"):  # PIL image: send it losslessly as PNG
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return pb.Image(encoded=buffer.getvalue())
    raise TypeError(f"cannot send {type(image).__name__} as an image; use a path, bytes, numpy array or PIL image")


def _classification(result: pb.Result, response: pb.ClassifyResponse) -> Classification:
    maps = {}
    for fm in result.feature_maps:
        maps[fm.layer] = np.frombuffer(fm.data, dtype=_NUMPY_DTYPES[fm.dtype]).reshape(tuple(fm.shape))
    return Classification(
        probabilities=np.asarray(result.probabilities, dtype=np.float32),
        top_k=[Prediction(p.label, p.index, p.probability) for p in result.top_k],
        feature_maps=maps,
        model=response.model,
        version=response.model_version,
    )


class ClassifierClient:
    """Talks to a server, or to several replicas. ``with ClassifierClient("host:50051") as c: c.classify(["cat.png"])``.

    ``target`` is one gRPC target, or a list of replicas' ``host:port`` IP addresses, which gRPC
    balances call by call (``round_robin``), skipping replicas it cannot reach or that are draining:
    ``ClassifierClient(["10.0.0.5:50051", "10.0.0.6:50051"])`` is the same as the target
    ``"ipv4:10.0.0.5:50051,10.0.0.6:50051"``. ``load_balancing`` names gRPC's policy: the default is
    ``round_robin`` for several addresses and gRPC's own (``pick_first``: one connection to the
    first address that answers) otherwise; pass ``"round_robin"`` for a DNS name that resolves to
    every replica, such as a headless Kubernetes Service (``dns:///NAME.NAMESPACE.svc.cluster.local:50051``).
    With ``round_robin`` a replica that went away is tried again at least every 2 s, not gRPC's 120 s.
    ``connections=N`` opens N connections and takes them in turn, call by call: a server started
    with ``--workers`` shares its port among processes by connection, so one connection reaches one.
    ``attempts``: how many times in all a unary call is sent when it fails UNAVAILABLE or CANCELLED
    without the server having answered (``RETRYABLE_CODES``); 1 sends each call once. A resent call
    may go to another replica. Streams are not resent: resend the requests a stream did not answer.
    """

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, *, timeout: float | None = 30.0,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 options: Sequence[tuple[str, Any]] = (), connections: int = 1, attempts: int = 3,
                 load_balancing: str | None = None) -> None:
        if connections < 1:
            raise ValueError(f"connections must be at least 1, got {connections}")
        if not 1 <= attempts <= 5:  # gRPC caps maxAttempts at 5
            raise ValueError(f"attempts must be 1 to 5, got {attempts}")
        if not isinstance(target, str):
            target = address_list_target(list(target))
        if load_balancing is None and _is_address_list(target):
            load_balancing = "round_robin"
        if load_balancing not in (None, "round_robin", "pick_first"):
            raise ValueError(f"load_balancing must be round_robin or pick_first, got {load_balancing!r}")
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), *options]
        if attempts > 1:
            opts.append(("grpc.enable_retries", 1))
        if attempts > 1 or load_balancing is not None:
            opts.append(("grpc.service_config", retry_service_config(attempts, load_balancing)))
        if load_balancing == "round_robin" and "grpc.max_reconnect_backoff_ms" not in dict(options):
            opts.append(("grpc.max_reconnect_backoff_ms", BALANCED_MAX_RECONNECT_BACKOFF_MS))
        if connections > 1:
            opts.append(("grpc.use_local_subchannel_pool", 1))  # else gRPC shares one connection among channels
        if credentials is not None:
            self._channels = [grpc.secure_channel(target, credentials, options=opts) for _ in range(connections)]
        else:
            self._channels = [grpc.insecure_channel(target, options=opts) for _ in range(connections)]
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._stubs = itertools.cycle([(pb_grpc.ClassifierStub(c), health_pb2_grpc.HealthStub(c))
                                       for c in self._channels])
        self._ids = itertools.count()

    def _stub(self) -> pb_grpc.ClassifierStub:
        """The Classifier stub of the next connection in turn."""
        return next(self._stubs)[0]

    def _health(self) -> health_pb2_grpc.HealthStub:
        return next(self._stubs)[1]

    def __enter__(self) -> "ClassifierClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    # ------------------------------------------------------------------ calls
    def classify(self, images: Sequence[ImageLike], *, model: str = "", top_k: int = 5,
                 layers: Sequence[str] = (), feature_dtype: str = "float32", resize: bool = True,
                 version: str = "", timeout: float | None = None) -> list[Classification]:
        """Classifies ``images`` in one call; ``layers=["*"]`` returns every layer's feature map;
        ``version``: one ready version of the model (empty: its latest)."""
        request = self.request(images, model=model, top_k=top_k, layers=layers, feature_dtype=feature_dtype,
                               resize=resize)
        request.model_version = version
        response = self._call(self._stub().Classify, request, timeout)
        return [_classification(r, response) for r in response.results]

    def classify_stream(self, batches: Iterable[Sequence[ImageLike]], *, timeout: float | None = None,
                        **options: Any) -> Iterator[StreamResult]:
        """One request per batch over a single stream; answers come in order, a bad one as ``error``."""
        requests = (self.request(batch, **options) for batch in batches)
        try:
            for response in self._stub().ClassifyStream(requests, timeout=self._timeout(timeout),
                                                      metadata=self._metadata):
                error = ClassifierError(_status(response.error.code), response.error.message) \
                    if response.HasField("error") else None
                yield StreamResult(response.request_id, [_classification(r, response) for r in response.results], error)
        except grpc.RpcError as exc:
            raise ClassifierError.from_rpc_error(exc) from None

    def explain(self, images: Sequence[ImageLike], *, model: str = "", target: int | None = None, layer: str = "",
                resize: bool = True, timeout: float | None = None) -> list[Explanation]:
        """Saliency and Grad-CAM maps, input-sized, for class ``target`` (an index; None: each image's
        top class), Grad-CAM at ``layer`` (empty: the server's default, the last stage's output)."""
        classify = self.request(images, model=model, resize=resize)
        request = pb.ExplainRequest(model=model, images=classify.images, layer=layer, resize=classify.resize,
                                    request_id=classify.request_id)
        if target is not None:
            request.class_index = target
        return explanations(self._call(self._stub().Explain, request, timeout))

    def filters(self, model: str = "", *, layers: Sequence[str] = (), dtype: str = "float32",
                timeout: float | None = None) -> dict[str, LayerFilters]:
        """The trained weights of ``layers`` (empty: every convolution and the fully connected
        layer), by layer name in the model's order, as ``dtype`` ("float32" or "float16") arrays."""
        if dtype not in _FEATURE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_FEATURE_DTYPES)}, got {dtype!r}")
        request = pb.GetFiltersRequest(model=model, layers=list(layers), dtype=_FEATURE_DTYPES[dtype])
        return layer_filters(self._call(self._stub().GetFilters, request, timeout))

    def list_models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        return self._call(self._stub().ListModels, pb.ListModelsRequest(), timeout)

    def model_info(self, name: str = "", *, version: str = "", timeout: float | None = None) -> pb.ModelInfo:
        return self._call(self._stub().GetModelInfo, pb.GetModelInfoRequest(name=name, version=version), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard grpc.health.v1 status: "SERVING", "NOT_SERVING", ..."""
        response = self._call(self._health().Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # ------------------------------------------------------------------ helpers
    def request(self, images: Sequence[ImageLike], *, model: str = "", top_k: int = 5, layers: Sequence[str] = (),
                feature_dtype: str = "float32", resize: bool = True) -> pb.ClassifyRequest:
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)  # N x H x W x 3
        elif isinstance(images, (str, bytes, os.PathLike, np.ndarray)) or hasattr(images, "mode"):
            images = [images]  # one image given bare
        if feature_dtype not in _FEATURE_DTYPES:
            raise ValueError(f"feature_dtype must be one of {sorted(_FEATURE_DTYPES)}, got {feature_dtype!r}")
        return pb.ClassifyRequest(
            model=model, images=[to_image(i) for i in images], top_k=top_k, feature_layers=list(layers),
            feature_dtype=_FEATURE_DTYPES[feature_dtype],
            resize=pb.RESIZE_CENTER_CROP if resize else pb.RESIZE_REJECT, request_id=str(next(self._ids)))

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _call(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise ClassifierError.from_rpc_error(exc) from None


def _status(value: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)
