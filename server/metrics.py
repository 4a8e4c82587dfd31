"""The server's Prometheus metrics, all in one place and on one registry.

Names follow Prometheus conventions: the ``cifar10_`` namespace, base units (``_seconds``), ``_total``
on counters, and only labels with bounded values (method, model name, gRPC status code, outcome).
Latencies are histograms so they can be aggregated across replicas with ``histogram_quantile``.
The per-call ``grpc_server_*`` series come from an interceptor, in ``server.grpc_metrics``.
docs/metrics.md lists every series with an example query.
The HTTP endpoint that serves them, with its limits, is ``server.metrics_http``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily

from cifar10_serving.server.metrics_http import serve_metrics  # noqa: F401  (server.main starts it from here)

NAMESPACE = "cifar10"
# From 100 us (a lone image on an idle CPU server) to 10 s (a full batch of large JPEGs under load).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The method label's values; server.calls refuses any other. Another API's methods go on this line.
METHODS = ("Classify", "ClassifyStream", "ListModels", "GetModelInfo", "Explain", "GetFilters",
           "ModelInfer", "ModelMetadata", "ModelConfig", "ModelStatistics",
           "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",  # the Open Inference Protocol's (server.open_inference); its probes are not counted
           # the same protocol over HTTP (server.http_api), under labels of its own
           "HTTPModelInfer", "HTTPModelMetadata", "HTTPModelConfig", "HTTPModelStatistics",
           "HTTPRepositoryIndex", "HTTPRepositoryModelLoad", "HTTPRepositoryModelUnload")
MODEL_STATES = ("READY", "LOADING", "UNLOADING", "UNAVAILABLE")  # server.repository's
LOAD_OUTCOMES = ("loaded", "failed", "unloaded")  # cifar10_model_loads_total{outcome}
# Loading, checking and warming a model version: a tiny test model in 0.1 s, the bundled ones in seconds.
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0)
UNKNOWN_MODEL = "unknown"  # label for requests naming a model that is not loaded: keeps the set bounded
DROP_REASONS = ("cancelled", "deadline")  # cifar10_dropped_requests_total{reason}
FAILURE_REASONS = ("out_of_memory", "error")  # cifar10_batch_failures_total{reason}
ABANDON_REASONS = ("cancelled", "deadline")  # cifar10_decode_abandoned_total{reason}


def batch_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to the max batch size, so each bucket is one doubling of batch fill."""
    buckets, b = [], 1
    while b < max_batch_size:
        buckets.append(float(b))
        b *= 2
    return (*buckets, float(max_batch_size))


class Metrics:
    def __init__(self, registry: CollectorRegistry, max_batch_size: int = 64) -> None:
        self.registry = registry
        ns = NAMESPACE
        self.request_seconds = Histogram(
            "request_duration_seconds", "Time from receiving an RPC to answering it, by method, model and gRPC code.",
            ["method", "model", "code"], namespace=ns, buckets=LATENCY_BUCKETS, registry=registry)
        self.requests = Counter(
            "requests", "RPCs answered, by method, model and gRPC code.",
            ["method", "model", "code"], namespace=ns, registry=registry)
        self.images = Counter(
            "images", "Images received in classification requests (both APIs), by model and outcome (ok or the gRPC code).",
            ["model", "outcome"], namespace=ns, registry=registry)
        self.preprocess_seconds = Histogram(
            "preprocess_duration_seconds", "Decoding and validating one request's images.",
            ["model"], namespace=ns, buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_seconds = Histogram(
            "queue_wait_seconds", "Time a request waited in the batching queue before its forward pass started.",
            ["model"], namespace=ns, buckets=LATENCY_BUCKETS, registry=registry)
        self.compute_seconds = Histogram(
            "compute_duration_seconds", "One forward pass: host-to-device copy, model, and copy back.",
            ["model"], namespace=ns, buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram(
            "batch_size_images", "Images in each forward pass.",
            ["model"], namespace=ns, buckets=batch_buckets(max_batch_size), registry=registry)
        self.compiled_passes = Counter(
            "compiled_passes", "Forward passes run by the model's compiled package (NAME.pt2) rather than its "
            "TorchScript.", ["model"], namespace=ns, registry=registry)
        self.batch_failures = Counter(
            "batch_failures", "Forward passes that raised, by model and reason (out_of_memory or error).",
            ["model", "reason"], namespace=ns, registry=registry)
        self.dropped = Counter(
            "dropped_requests", "Requests dropped before compute, by model and reason (cancelled or deadline).",
            ["model", "reason"], namespace=ns, registry=registry)
        self.in_flight = Gauge(
            "requests_in_flight", "RPCs being handled now, by method.", ["method"], namespace=ns, registry=registry)
        self.queue_images = Gauge(
            "queue_images", "Images waiting in the batching queue, by model.", ["model"], namespace=ns,
            registry=registry)
        self.answer_budget = Gauge(
            "answer_budget_bytes", "The answer budget: bytes that answers not yet sent, and their requests, may hold.",
            namespace=ns, registry=registry)
        self.answer_budget_in_use = Gauge(
            "answer_budget_in_use_bytes", "Bytes of the answer budget reserved now: answers being computed or not yet "
            "sent, and their requests.", namespace=ns, registry=registry)
        self.answer_budget_refusals = Counter(
            "answer_budget_refusals", "Requests refused RESOURCE_EXHAUSTED because their answer did not fit the budget, "
            "by model.", ["model"], namespace=ns, registry=registry)
        self.decode_abandoned = Counter(
            "decode_abandoned", "Requests whose decoding stopped before the end because the caller had gone, by model "
            "and reason (cancelled or deadline).", ["model", "reason"], namespace=ns, registry=registry)
        self.model_state = Gauge(
            "model_state", "Each model version's state: 1 on the series of the state it is in, 0 on the others.",
            ["model", "version", "state"], namespace=ns, registry=registry)
        self.model_loads = Counter(
            "model_loads", "Model versions loaded, failed to load, and unloaded, by model and outcome.",
            ["model", "outcome"], namespace=ns, registry=registry)
        self.model_load_seconds = Histogram(
            "model_load_duration_seconds", "Loading, checking and warming one model version before it serves.",
            ["model"], namespace=ns, buckets=LOAD_BUCKETS, registry=registry)
        self.model_info = Info(
            "model", "One series per loaded model: version, pooling and device.", ["model"], namespace=ns,
            registry=registry)

    def set_state(self, model: str, version: str, state: str) -> None:
        """A model version's state: 1 on its state's series, 0 on the others."""
        for each in MODEL_STATES:
            self.model_state.labels(model, version, each).set(1 if each == state else 0)

    def add_model(self, name: str, info: dict[str, str]) -> None:
        """Publishes a loaded model's info series and starts its per-model series at zero.

        Series that exist from the start make ``rate()`` read 0 rather than nothing, so a dashboard
        panel for failures that have not happened yet shows a flat line instead of "no data".
        """
        self.model_info.labels(name).info(info)
        self.queue_images.labels(name).set(0)
        for histogram in (self.preprocess_seconds, self.queue_seconds, self.compute_seconds, self.batch_size):
            histogram.labels(name)
        for reason in DROP_REASONS:
            self.dropped.labels(name, reason)
        for reason in FAILURE_REASONS:
            self.batch_failures.labels(name, reason)
        self.answer_budget_refusals.labels(name)
        self.compiled_passes.labels(name)
        for reason in ABANDON_REASONS:
            self.decode_abandoned.labels(name, reason)


class GpuMemoryCollector:
    """GPU memory per CUDA device, read from PyTorch's caching allocator at scrape time.

    ``allocated`` is what tensors hold now; ``reserved`` is what the allocator keeps from the driver
    (allocated plus its cache), which is what other processes on the GPU cannot have.
    """

    def __init__(self, devices: list[int]) -> None:
        self.devices = devices

    def collect(self):
        import torch

        allocated = GaugeMetricFamily(f"{NAMESPACE}_gpu_memory_allocated_bytes",
                                      "Bytes of GPU memory held by tensors, per CUDA device.", labels=["device"])
        reserved = GaugeMetricFamily(f"{NAMESPACE}_gpu_memory_reserved_bytes",
                                     "Bytes of GPU memory PyTorch's allocator holds (tensors and its cache).",
                                     labels=["device"])
        for index in self.devices:
            allocated.add_metric([f"cuda:{index}"], float(torch.cuda.memory_allocated(index)))
            reserved.add_metric([f"cuda:{index}"], float(torch.cuda.memory_reserved(index)))
        yield allocated
        yield reserved
