"""The inspect page, end to end: a real server, the CLI writes the page, headless Chromium renders it.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``), with the
standard library only: the test asks the rendered page how many layer sections it has, whether every
image decoded, which label tops each model's bars, which convolutions show their filters, which
downsampling steps their worked example and whether the contribution bars are there, and takes a
screenshot. Debian's ``chromium``
package provides the browser; without it these tests skip and say so.
"""

from __future__ import annotations

import base64
import fcntl
import json
import math
import os
import select
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from cifar10_serving.client import ClassifierClient
from cifar10_serving.client.cli import main
from cifar10_serving.client.inspect_page import BARS, DOWNSAMPLING, load_input, merged_layer_order
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from tests.helpers.servers import RunningServer, make_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BUNDLED_MODELS = ROOT / "model" / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
BROWSER_SECONDS = 60  # each wait on the browser; a page of inlined PNGs renders in well under that
WINDOW = (1280, 900)
CONVOLUTIONS = ("patch_whitening", "conv", "conv_downsample")  # layers whose filters the page draws


class Chromium:
    """Headless Chromium over the DevTools protocol on fds 3 (commands in) and 4 (answers out)."""

    def __init__(self, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire() -> None:  # runs in the child before exec: the protocol's fixed descriptors
            # Copies above 10 first, so neither dup2 maps a descriptor onto itself (a no-op that would
            # keep its close-on-exec flag) or onto the other before it is copied.
            r, w = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
             f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire, close_fds=False)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._ids = iter(range(1, 1 << 30))
        self._buffer = b""
        self.session = None

    def send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        """Sends one command and waits for its answer, skipping events on the way."""
        message = {"id": next(self._ids), "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read()
            if answer.get("id") == message["id"]:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def _read(self) -> dict:
        deadline = time.monotonic() + BROWSER_SECONDS
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer in {BROWSER_SECONDS} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe (exit code {self.process.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})
        deadline = time.monotonic() + BROWSER_SECONDS
        while self.evaluate("document.readyState") != "complete":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading in {BROWSER_SECONDS} s")
            time.sleep(0.1)

    def evaluate(self, expression: str):
        answer = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in answer:
            raise RuntimeError(f"page script failed: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def screenshot(self, path: Path, height: int | None = None) -> Path:
        """The page (from the top, ``height`` CSS pixels of it, default all) as a PNG."""
        width, full = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
        clip = {"x": 0, "y": 0, "width": width, "height": min(full, height or full), "scale": 1}
        data = self.send("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
            self.process.wait(10)
        except Exception:
            self.process.kill()
            self.process.wait(10)
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)


# Everything the test asks of the rendered page, in one evaluation.
PAGE_FACTS = """JSON.stringify({
  sections: [...document.querySelectorAll('section.layer')].map(s => s.dataset.layer),
  images: [...document.images].map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0,
                                          shown: i.getBoundingClientRect().width > 0})),
  tops: [...document.querySelectorAll('ol.topk')].map(o => {
    const first = o.querySelector('li .label');
    return {top: o.dataset.top, text: first.innerText, shown: first.getBoundingClientRect().width > 0};
  }),
  rules: [...document.querySelectorAll('.rule')].map(r => r.innerText),
  explain: [...document.querySelectorAll('section.explain')].map(s => s.innerText),
  filters: [...document.querySelectorAll('.filters')].map(f => ({layer: f.dataset.layer,
                                                                pictures: f.querySelectorAll('img').length})),
  examples: [...document.querySelectorAll('.pool-example')].map(e => ({
    kind: e.dataset.kind, tables: [...e.querySelectorAll('table')].map(t => t.querySelectorAll('td').length),
    text: e.innerText})),
  bars: [...document.querySelectorAll('.contributions')].map(c => ({top: c.dataset.class,
    bars: [...c.querySelectorAll('li .bar span')].filter(b => b.getBoundingClientRect().width > 0).length})),
})"""


@pytest.fixture()
def browser(tmp_path):
    chromium = Chromium(tmp_path / "profile")
    yield chromium
    chromium.close()


def inspect_page(target: str, models: list[str], out: Path, image: Path = EXAMPLES / "cat.jpg", *options: str) -> Path:
    assert main(["--target", target, "inspect", str(image), "--models", ",".join(models), "--out", str(out),
                 *options]) == 0
    page = out / f"{image.stem}.html"
    assert page.exists()
    return page


def facts(browser: Chromium, page: Path) -> dict:
    browser.open(page.resolve().as_uri())
    return json.loads(browser.evaluate(PAGE_FACTS))


def check_rendered(seen: dict, client: ClassifierClient, models: list[str], image: Path) -> None:
    """Every layer of every model has its section, every image decoded and is laid out, and each
    model's top label is the one the server gives for the same pixels."""
    pixels = load_input(image)
    expected_sections = []
    for name in models:
        expected_sections += [layer.name for layer in client.model_info(name).layers]
    assert sorted(seen["sections"]) == sorted(expected_sections)
    broken = [i["alt"] for i in seen["images"] if not (i["ok"] and i["shown"])]
    assert not broken, f"images that did not render: {broken}"
    # Per model: the input, one grid per layer but the fc (its scores are a table), and any explanations.
    grids = sum(1 for name in models for layer in client.model_info(name).layers if layer.kind != "fc")
    assert len(seen["images"]) >= grids + len(models)
    labels = [client.classify([pixels], model=name)[0].label for name in models]
    assert [t["top"] for t in seen["tops"]] == labels
    assert all(t["text"] == t["top"] and t["shown"] for t in seen["tops"])
    # Each convolution's filters, each downsampling step's worked example, and the bars at the end.
    convolutions = [l.name for name in models for l in client.model_info(name).layers if l.kind in CONVOLUTIONS]
    assert sorted(f["layer"] for f in seen["filters"]) == sorted(convolutions)  # the page goes row by row
    assert all(f["pictures"] >= 1 for f in seen["filters"])
    kinds = [l.kind for name in models for l in client.model_info(name).layers if l.kind in DOWNSAMPLING]
    assert sorted(e["kind"] for e in seen["examples"]) == sorted(kinds)
    for example in seen["examples"]:
        assert "worked example" in example["text"] and example["tables"][-1] == 4  # the 2x2 result
    assert [b["top"] for b in seen["bars"]] == labels and all(b["bars"] == BARS for b in seen["bars"])


@pytest.mark.system
@needs_chromium
def test_page_shows_every_layer_of_two_models_side_by_side(tiny_server, tiny_client, browser, tmp_path):
    models = ["tiny-max", "tiny-avg"]
    page = inspect_page(tiny_server.target, models, tmp_path / "out")
    seen = facts(browser, page)
    check_rendered(seen, tiny_client, models, EXAMPLES / "cat.jpg")
    rules = " | ".join(seen["rules"])
    assert "(W - F) / S + 1 = (32 - 2) / 2 + 1 = 16; depth unchanged: 4" in rules  # tiny-max's stage1.pool
    assert "(W - F) / S + 1 = (32 - 3) / 2 + 1 = 15 (rounded down); depth unchanged: 4" in rules  # tiny-avg's
    # tiny-avg's windows of 3 at stride 2 overlap: its patches are 5 x 5, tiny-max's 4 x 4.
    assert [e["tables"] for e in seen["examples"]] == [[16, 4], [25, 4]] * 3
    assert len(seen["explain"]) == len(models) and all(text.startswith("Why ") for text in seen["explain"])
    assert sum("grad_cam" in i["alt"] or "saliency" in i["alt"] for i in seen["images"]) == 2 * len(models)
    shot = browser.screenshot(tmp_path / "page.png")
    picture = np.asarray(Image.open(shot).convert("L"))
    assert picture.shape[1] >= WINDOW[0] // 2 and picture.shape[0] > WINDOW[1]  # the whole page, not the window
    assert picture.std() > 10  # something was drawn: not one flat colour


@pytest.mark.system
@needs_chromium
def test_bundled_models_page_renders(browser, tmp_path):
    """The page the README shows: the shipped max-pooling, average-pooling and strided-convolution
    models side by side on the shipped cat, with their filters, worked examples and contributions."""
    config = make_config(BUNDLED_MODELS, default_model="base-max", load_models="base-max,base-avg,base-conv")
    running = RunningServer(config)
    try:
        models = ["base-max", "base-avg", "base-conv"]
        page = inspect_page(running.target, models, tmp_path / "out")
        seen = facts(browser, page)
        with ClassifierClient(running.target) as client:
            check_rendered(seen, client, models, EXAMPLES / "cat.jpg")
        assert any("input channel" in e["text"] for e in seen["examples"])  # base-conv's strided convolution
        assert "stem.whiten" in [f["layer"] for f in seen["filters"]]  # its whitening stem
        shot = browser.screenshot(tmp_path / "page.png", height=WINDOW[1])
        assert Image.open(shot).size[1] == WINDOW[1]
    finally:
        running.stop(grace=1.0)


def test_page_is_self_contained(tiny_server, tmp_path):
    page = inspect_page(tiny_server.target, ["tiny-max"], tmp_path).read_text(encoding="utf-8")
    assert page.count('<section class="layer"') > 10
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count('data-offered="true"') == 1 and "grad_cam at stage3.act2" in page
    page = inspect_page(tiny_server.target, ["tiny-max"], tmp_path, EXAMPLES / "cat.jpg", "--layer", "stage2.pool")
    assert "grad_cam at stage2.pool" in page.read_text(encoding="utf-8")


class WithoutExplain(pb_grpc.ClassifierServicer):
    """A server from before Explain: Classify and GetModelInfo passed on to a real one, Explain the
    generated UNIMPLEMENTED."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.ClassifierStub(self.channel)

    def Classify(self, request, context):
        return self.stub.Classify(request, timeout=30)

    def GetModelInfo(self, request, context):
        return self.stub.GetModelInfo(request, timeout=30)


def test_page_says_when_the_server_offers_no_explanations(tiny_server, tmp_path):
    servicer = WithoutExplain(tiny_server.target)
    server = grpc.server(ThreadPoolExecutor(2))
    pb_grpc.add_ClassifierServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        page = inspect_page(f"127.0.0.1:{port}", ["tiny-max"], tmp_path).read_text(encoding="utf-8")
    finally:
        server.stop(1).wait(10)
        servicer.channel.close()
    assert 'data-offered="false"' in page and "saliency and Grad-CAM: not offered by this server" in page
    assert "filters: not offered by this server" in page and 'class="contributions"' not in page
    assert page.count('<section class="layer"') > 10  # the rest of the page stands


def test_merged_layer_order_keeps_each_models_order():
    plain = ["s1.conv1", "s1.pool", "s1.act2", "head.pool", "fc"]
    residual = ["s1.conv1", "s1.pool", "s1.act2", "s1.conv3", "s1.add", "head.pool", "fc"]
    assert merged_layer_order([plain, residual]) == residual
    assert merged_layer_order([residual, plain]) == residual
    assert merged_layer_order([["a", "c"], ["a", "b", "c"], ["x"]]) == ["x", "a", "b", "c"]


def test_save_features_grids_are_captioned_and_enlarged(tiny_server, tmp_path, capsys):
    out = tmp_path / "maps"
    assert main(["--target", tiny_server.target, "classify", str(EXAMPLES / "cat.jpg"), "--save-features",
                 str(out), "--json"]) == 0
    shapes = json.loads(capsys.readouterr().out)[0]["feature_maps"]
    c, h, w = shapes["stage3.pool"]
    grid = np.asarray(Image.open(out / "cat" / "stage3.pool.png"))
    cols = math.ceil(math.sqrt(c))
    assert grid.shape[1] >= cols * 32  # 4 x 4 tiles drawn at least 32 pixels wide
    assert grid.shape[0] > math.ceil(c / cols) * 32 + 30  # room for the caption and the scale
    assert grid[:14].min() < 100  # dark caption text on the white band above the tiles
