"""The server's metrics, read from a real server's fresh registry: each path counts where it should."""

from __future__ import annotations

import urllib.request
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.metrics import DROP_REASONS, FAILURE_REASONS, LOAD_OUTCOMES, MODEL_STATES, UNKNOWN_MODEL
from tests.helpers.servers import RunningServer, make_config
from tests.helpers.traffic import (HELD_CONFIG, HEALTH, SERVICE, forward_held, image, send_held, send_simple, value,
                                   wait_for)

MODELS = ("tiny-max", "tiny-avg")
METHODS = {"Classify", "ClassifyStream", "ListModels", "GetModelInfo"}
CODES = {code.name for code in grpc.StatusCode}
GRPC_METHODS = {
    SERVICE: METHODS,
    HEALTH: {"Check", "Watch"},
    "grpc.reflection.v1alpha.ServerReflection": {"ServerReflectionInfo"},
}


@pytest.fixture(scope="module")
def metered(tiny_models_dir):
    running = RunningServer(make_config(tiny_models_dir, **HELD_CONFIG))  # each server builds a fresh registry
    yield running
    running.stop(grace=1.0)


def samples(registry, name: str) -> Counter:
    """{frozenset of label items: value} for every sample called ``name``."""
    return Counter({frozenset(s.labels.items()): s.value
                    for family in registry.collect() for s in family.samples if s.name == name})


def changes(before: Counter, after: Counter) -> dict:
    return {labels: after[labels] - before[labels] for labels in after if after[labels] != before[labels]}


def keyed(counts: Counter, *names: str) -> dict:
    return {frozenset(zip(names, key)): n for key, n in counts.items() if n}


@pytest.fixture(scope="module")
def mix(metered):
    """send_simple then send_held once, with every sample before and after."""
    registry = metered.app.metrics.registry
    names = {s.name for family in registry.collect() for s in family.samples}
    names |= {"grpc_server_handled_total", "grpc_server_started_total", "grpc_server_handling_seconds_count",
              "cifar10_requests_total", "cifar10_request_duration_seconds_count", "cifar10_images_total"}
    before = {name: samples(registry, name) for name in names}
    sent = send_simple(metered.target)
    held = send_held(metered)
    sent += held
    sent.in_flight = held.in_flight
    after = {name: samples(registry, name) for name in names}
    return sent, {name: changes(before[name], after[name]) for name in names}


def test_requests_count_once_by_method_model_and_code(mix):
    sent, delta = mix
    expected = keyed(sent.requests, "method", "model", "code")
    assert delta["cifar10_requests_total"] == expected
    assert delta["cifar10_request_duration_seconds_count"] == expected  # one latency sample per request


def test_images_count_by_model_and_outcome(mix):
    sent, delta = mix
    assert delta["cifar10_images_total"] == keyed(sent.images, "model", "outcome")


def test_parts_of_the_path_observe_the_requests_that_reached_them(mix):
    sent, delta = mix
    for model in MODELS:
        label = frozenset({("model", model)})
        served = sum(n for (method, m, code), n in sent.requests.items()
                     if m == model and method.startswith("Classify") and code == "OK")
        decoded = sum(n for (method, m, code), n in sent.requests.items()
                      if m == model and method.startswith("Classify") and code != "INVALID_ARGUMENT")
        assert delta["cifar10_queue_wait_seconds_count"].get(label, 0) == served
        assert delta["cifar10_preprocess_duration_seconds_count"].get(label, 0) == decoded
        assert delta["cifar10_batch_size_images_sum"].get(label, 0) == sent.images[(model, "ok")]
        passes = delta["cifar10_compute_duration_seconds_count"].get(label, 0)
        assert delta["cifar10_batch_size_images_count"].get(label, 0) == passes > 0
    # D was cancelled by its caller, E's deadline passed: both dropped before compute.
    assert delta["cifar10_dropped_requests_total"] == {frozenset({("model", "tiny-max"), ("reason", "cancelled")}): 2}
    assert sent.in_flight == 2  # A and B, while C was refused


def test_grpc_interceptor_counts_every_registered_call(mix):
    sent, delta = mix
    assert delta["grpc_server_started_total"] == {
        frozenset({("grpc_service", s), ("grpc_method", m), ("grpc_type", _type(m))}): n
        for (s, m), n in sent.started.items()}
    assert delta["grpc_server_handled_total"] == {
        frozenset({("grpc_service", s), ("grpc_method", m), ("grpc_type", _type(m)), ("grpc_code", c)}): n
        for (s, m, c), n in sent.handled.items()}
    assert delta["grpc_server_handling_seconds_count"] == delta["grpc_server_started_total"]


def test_the_interceptor_leaves_a_stream_written_with_context_write_working(metered):
    with grpc.insecure_channel(metered.target) as channel:  # grpc.health's Watch streams with context.write()
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def _type(method: str) -> str:
    return "BIDI_STREAMING" if method == "ClassifyStream" else "UNARY"


def test_a_stream_request_cut_off_by_its_deadline_counts_as_deadline_exceeded(metered):
    registry = metered.app.metrics.registry

    def count(code):
        return value(registry, "cifar10_requests_total", method="ClassifyStream", model="tiny-max", code=code)

    before = {code: count(code) for code in ("OK", "CANCELLED", "DEADLINE_EXCEEDED")}
    with grpc.insecure_channel(metered.target) as channel, forward_held(metered, "tiny-max"):
        stream = pb_grpc.ClassifierStub(channel).ClassifyStream(iter([pb.ClassifyRequest(images=[image()])]),
                                                                  timeout=2.0)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: count("DEADLINE_EXCEEDED") == before["DEADLINE_EXCEEDED"] + 1,
                 "the server to count the stream's request")
    assert (count("OK"), count("CANCELLED")) == (before["OK"], before["CANCELLED"])


def test_histograms_observe_one_sample_per_request(metered):
    registry = metered.app.metrics.registry
    names = ["cifar10_request_duration_seconds", "cifar10_preprocess_duration_seconds", "cifar10_queue_wait_seconds",
             "cifar10_compute_duration_seconds", "cifar10_batch_size_images"]

    def read():
        out = {}
        for name in names:
            labels = {"model": "tiny-avg"}
            if name == "cifar10_request_duration_seconds":
                labels = {"method": "Classify", "model": "tiny-avg", "code": "OK"}
            out[name] = (value(registry, name + "_count", **labels), value(registry, name + "_sum", **labels),
                         value(registry, name + "_bucket", le="+Inf", **labels))
        return out

    before = read()
    sizes = [1, 4, 2, 3, 1]
    with grpc.insecure_channel(metered.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for n in sizes:  # one at a time: each request is its own forward pass
            stub.Classify(pb.ClassifyRequest(images=[image(i) for i in range(n)], model="tiny-avg"), timeout=30)
    after = read()
    count, total, inf = ({name: after[name][i] - before[name][i] for name in names} for i in range(3))
    assert count == {name: len(sizes) for name in names}
    assert inf == count  # every observation fell in a bucket
    assert total["cifar10_batch_size_images"] == sum(sizes)
    # Each request's time encloses its own decode and its own forward pass.
    assert total["cifar10_request_duration_seconds"] > (
        total["cifar10_preprocess_duration_seconds"] + total["cifar10_compute_duration_seconds"])


def test_labels_stay_within_their_bounded_sets(metered):
    with grpc.insecure_channel(metered.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for i in range(20):  # callers choose model names and method paths; none may become a label value
            with pytest.raises(grpc.RpcError):
                stub.Classify(pb.ClassifyRequest(images=[image()], model=f"model-{i}"), timeout=30)
            with pytest.raises(grpc.RpcError):
                stub.GetModelInfo(pb.GetModelInfoRequest(name=f"model-{i}"), timeout=30)
            with pytest.raises(grpc.RpcError):
                channel.unary_unary(f"/{SERVICE}/Method{i}")(b"", timeout=30)
    allowed = {
        "method": METHODS, "model": {*MODELS, UNKNOWN_MODEL, ""}, "code": CODES,
        "outcome": {"ok", *CODES, *LOAD_OUTCOMES}, "reason": {*DROP_REASONS, *FAILURE_REASONS},
        "version": {"test"}, "state": set(MODEL_STATES),  # the repository's versions, and their states
        "grpc_service": set(GRPC_METHODS), "grpc_method": set().union(*GRPC_METHODS.values()),
        "grpc_type": {"UNARY", "BIDI_STREAMING", "SERVER_STREAMING", "CLIENT_STREAMING"}, "grpc_code": CODES,
    }
    seen = Counter()
    for family in metered.app.metrics.registry.collect():
        if not family.name.startswith(("cifar10_", "grpc_")):
            continue
        for sample in family.samples:
            for key, label in sample.labels.items():
                if key in allowed:
                    assert label in allowed[key], f"{sample.name}: {key}={label!r}"
                    seen[key] += 1
                elif key != "le":
                    assert family.name == "cifar10_model", f"{sample.name} has an unexpected label {key}"
    assert {"method", "model", "code", "grpc_method", "grpc_code"} <= set(seen)


def test_every_model_has_its_info_and_zeroed_series(metered):
    registry = metered.app.metrics.registry
    assert value(registry, "cifar10_model_info", model="tiny-max", version="test", pooling="max", pool_window="2",
                 device="cpu") == 1
    assert value(registry, "cifar10_model_info", model="tiny-avg", version="test", pooling="avg", pool_window="3",
                 device="cpu") == 1
    for model in MODELS:
        for reason in FAILURE_REASONS:  # present from the start, so rate() reads 0 rather than nothing
            assert registry.get_sample_value("cifar10_batch_failures_total", {"model": model, "reason": reason}) == 0
        for reason in DROP_REASONS:
            assert registry.get_sample_value("cifar10_dropped_requests_total", {"model": model, "reason": reason}) is not None


def test_gpu_memory_is_reported_only_on_cuda(metered):
    names = {s.name for family in metered.app.metrics.registry.collect() for s in family.samples}
    gpu = {name for name in names if name.startswith("cifar10_gpu_memory_")}
    on_cuda = any(m.device.type == "cuda" for m in metered.app.models.values())
    assert gpu == ({"cifar10_gpu_memory_allocated_bytes", "cifar10_gpu_memory_reserved_bytes"} if on_cuda else set())


def test_metrics_port_serves_every_family_in_the_text_format(metered):
    url = f"http://127.0.0.1:{metered.app.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    for name, kind in [("cifar10_request_duration_seconds", "histogram"), ("cifar10_requests", "counter"),
                       ("cifar10_queue_images", "gauge"), ("cifar10_batch_size_images", "histogram"),
                       ("cifar10_model_info", "gauge"), ("grpc_server_handled", "counter"),
                       ("grpc_server_handling_seconds", "histogram"), ("process_cpu_seconds", "counter"),
                       ("python_gc_objects_collected", "counter")]:
        assert families[name].type == kind, name


def test_names_follow_prometheus_conventions(metered):
    for family in metered.app.metrics.registry.collect():
        if not family.name.startswith("cifar10_"):
            continue
        if family.type == "histogram":  # base units in the name
            assert family.name.endswith(("_seconds", "_images")), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
