"""A real Prometheus, with the repository's scrape config, scrapes a real server under real traffic.

Then, through Prometheus's HTTP API: the latency histogram counts exactly the requests sent, by
method and code; so does the gRPC interceptor's counter; and every query in the dashboard returns
data. Prometheus is Debian's ``prometheus`` package, which ``.ci/run`` installs; without it this
module fails under CI and is skipped elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.helpers.servers import RunningServer, make_config
from tests.helpers.traffic import HELD_CONFIG, Sent, send_mix, wait_for

pytestmark = pytest.mark.system  # a real Prometheus scraping a real server

ROOT = Path(__file__).resolve().parent.parent
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "cifar10.json"
SCRAPE_INTERVAL = "1s"  # the repository's 5s, shortened so the test waits less for each scrape
WINDOW = "5m"  # stands in for Grafana's $__rate_interval: covers the whole test, so rate() sees all traffic
GPU_ONLY = ("cifar10_gpu_memory_",)  # series that exist only on a CUDA server
PROMETHEUS = shutil.which("prometheus")

if PROMETHEUS is None and not os.environ.get("CI"):
    pytest.skip("Debian's prometheus is not installed (apt-get install prometheus); CI installs it",
                allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:  # Prometheus cannot report a port it picked itself, so pick one for it
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, config: dict, directory: Path) -> None:
        assert PROMETHEUS, "the prometheus binary is missing: apt-get install prometheus (.ci/run does)"
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(directory / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._ready, "Prometheus to be ready", seconds=60)

    def _ready(self) -> bool:
        assert self.process.poll() is None, f"prometheus exited: {self.process.returncode}"
        try:
            return urllib.request.urlopen(self.url + "/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def api(self, path: str, **params):
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        body = json.loads(urllib.request.urlopen(url, timeout=30).read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return data["result"]

    def by(self, expr: str, *labels: str) -> Counter:
        return Counter({tuple(r["metric"].get(k, "") for k in labels): float(r["value"][1]) for r in self.query(expr)})

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def scraped(tiny_models_dir, tmp_path_factory):
    """A server, Prometheus scraping it, two rounds of traffic; returns (prometheus, job, what was sent)."""
    tiny_server = RunningServer(make_config(tiny_models_dir, **HELD_CONFIG))
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = SCRAPE_INTERVAL
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{tiny_server.app.metrics_port}"]}]
    prometheus = Prometheus(config, tmp_path_factory.mktemp("prometheus"))
    try:
        name = job["job_name"]
        wait_for(lambda: prometheus.by(f'up{{job="{name}"}}') == Counter({(): 1.0}), "the first scrape")
        sent = Sent()
        # Two rounds, a scrape between: a series first scraped after all its traffic would show no increase.
        for _ in range(2):
            sent += send_mix(tiny_server)
            total = sum(sent.requests.values())
            wait_for(lambda: prometheus.by("sum(cifar10_requests_total)") == Counter({(): total}),
                     "a scrape after the traffic")
        yield prometheus, name, sent
    finally:
        prometheus.stop()
        tiny_server.stop(grace=1.0)


def by_labels(counts: Counter, *keep: int) -> Counter:
    out = Counter()
    for key, n in counts.items():
        out[tuple(key[i] for i in keep)] += n
    return out


def test_latency_histogram_counts_every_request_sent_by_method_and_code(scraped):
    prometheus, _, sent = scraped
    got = prometheus.by("sum by (method, code) (cifar10_request_duration_seconds_count)", "method", "code")
    assert got == by_labels(sent.requests, 0, 2)
    assert {code for _, code in got} >= {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED",
                                         "DEADLINE_EXCEEDED", "CANCELLED"}
    by_model = prometheus.by("sum by (method, model, code) (cifar10_request_duration_seconds_count)",
                             "method", "model", "code")
    assert by_model == sent.requests


def test_grpc_handled_counts_every_call_sent_by_method_and_code(scraped):
    prometheus, _, sent = scraped
    got = prometheus.by("sum by (grpc_service, grpc_method, grpc_code) (grpc_server_handled_total)",
                        "grpc_service", "grpc_method", "grpc_code")
    assert got == sent.handled
    started = prometheus.by("sum by (grpc_service, grpc_method) (grpc_server_started_total)",
                            "grpc_service", "grpc_method")
    assert started == sent.started


def dashboard_queries() -> list[tuple[str, str]]:
    def walk(panels):
        for panel in panels:
            yield from walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                yield panel["title"], target["expr"]

    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def test_every_dashboard_query_returns_data(scraped):
    prometheus, job, _ = scraped
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, expr in queries:
        expr = expr.replace("$__rate_interval", WINDOW).replace("$model", ".*")
        assert "$" not in expr, f"{title}: a dashboard variable the test does not fill in: {expr}"
        result = prometheus.query(expr)
        if any(name in expr for name in GPU_ONLY):
            assert result == [], f"{title}: GPU series on a CPU server"  # and on CUDA, test_metrics checks them
            continue
        values = [float(r["value"][1]) for r in result]
        assert any(math.isfinite(v) for v in values), f"{title}: no data from {expr} ({result})"
    assert prometheus.by(f'count(process_cpu_seconds_total{{job="{job}"}})') == Counter({(): 1.0})


def test_the_model_variable_lists_the_loaded_models(scraped):
    prometheus, _, _ = scraped
    variable = json.loads(DASHBOARD.read_text())["templating"]["list"][0]
    assert variable["query"]["query"] == "label_values(cifar10_model_info, model)"
    assert sorted(prometheus.api("label/model/values", **{"match[]": "cifar10_model_info"})) == ["tiny-avg", "tiny-max"]


def test_promtool_accepts_the_repository_config():
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package"
    out = subprocess.run([promtool, "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
