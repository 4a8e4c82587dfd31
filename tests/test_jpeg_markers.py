"""Header bombs (security review, issue 28): JPEGs stuffed with tiny metadata segments, PNGs with
tiny chunks, are refused from a linear scan before Pillow parses them, in bounded time, while the
files cameras and image libraries write still pass; and against a real server process, one client's
bomb no longer holds up everyone else's calls."""

from __future__ import annotations

import glob
import io
import statistics
import struct
import threading
import time
import zlib
from pathlib import Path

import grpc
import pytest
from PIL import Image, ImageCms
from PIL.PngImagePlugin import PngInfo

from bench.hostile import PNG_SIGNATURE, png_chunk
from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.protos.inference import open_inference_grpc_pb2 as v2
from cifar10_serving.protos.inference import open_inference_grpc_pb2_grpc as v2_grpc
from cifar10_serving.server import jpeg_markers
from cifar10_serving.server.images import Encoded, ImageError, Resize, open_image
from cifar10_serving.server.launcher import ServerProcess
from tests.helpers.images import encode, random_images
from tests.helpers.servers import server_args

ROOT = Path(__file__).resolve().parent.parent
MAX_PIXELS = 4096 * 4096  # the server's default
SIZE = (32, 32)
APP1 = b"\xff\xe1" + struct.pack(">H", 14) + b"Exif\0\0" + bytes(6)  # 16 bytes: the smallest that parses as Exif
BOUND_SECONDS = 0.1  # for 8 MB: before the scan, Pillow took 32 s


def jpeg_bomb(megabytes: float) -> bytes:
    """A real 32x32 JPEG with ``megabytes`` of 16-byte APP1 segments after its SOI."""
    jpeg = encode(random_images(1, seed=1)[0], "JPEG")
    return jpeg[:2] + APP1 * int(megabytes * (1 << 20) // len(APP1)) + jpeg[2:]


def png_with_chunks(n: int, kind: bytes = b"tEXt", body: bytes = b"k\0v") -> bytes:
    """A real 32x32 RGB PNG with ``n`` small ``kind`` chunks before its IDAT."""
    header = struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0)
    pixels = zlib.compress(bytes((3 * 32 + 1) * 32))
    return (PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(kind, body) * n + png_chunk(b"IDAT", pixels)
            + png_chunk(b"IEND", b""))


def opened(data: bytes, index: int = 0):
    return open_image(Encoded(data), index, SIZE, Resize.CENTER_CROP, MAX_PIXELS)


def refused_quickly(data: bytes, index: int, *words: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ImageError) as refusal:
        opened(data, index)
    seconds = time.perf_counter() - start
    assert seconds < BOUND_SECONDS, f"{len(data):,} bytes refused after {seconds:.2f} s"
    for word in (f"image {index}:", *words):
        assert word in str(refusal.value), (word, str(refusal.value))


def test_a_jpeg_stuffed_with_app_segments_is_refused_from_a_linear_scan():
    refused_quickly(jpeg_bomb(8), 3, "APP/COM segments", f"the limit is {jpeg_markers.MAX_JPEG_METADATA_SEGMENTS}",
                    "exiftool -all=")


@pytest.mark.parametrize("name, make, words", [
    ("fill bytes", lambda jpeg: jpeg[:2] + b"\xff" * (1 << 20) + jpeg[2:], ["fill or stray bytes"]),
    ("table segments", lambda jpeg: jpeg[:2] + b"\xff\xdd\x00\x04\x00\x00" * (1 << 18) + jpeg[2:], ["segments"]),
    ("metadata bytes", lambda jpeg: jpeg[:2] + (b"\xff\xe2\xff\xff" + bytes(65533)) * 20 + jpeg[2:],
     ["MiB of APP/COM metadata"]),
])
def test_other_jpeg_header_bombs_are_refused(name, make, words):
    # Pillow steps through fill bytes one at a time (1 MiB: 0.6 s) and spends ~1 us per segment.
    refused_quickly(make(encode(random_images(1, seed=2)[0], "JPEG")), 1, *words)


@pytest.mark.parametrize("kind, body", [(b"tEXt", b"k\0v"), (b"zTXt", b"k\0\0" + zlib.compress(b"v")),
                                        (b"iTXt", b"k\0\0\0\0\0v"), (b"prVt", b"x")])
def test_a_png_with_many_small_chunks_is_refused(kind, body):
    # Not quadratic in Pillow, but ~4 us a chunk: 100,000 took 0.35-0.6 s, a 64 MiB message of them ~20 s.
    refused_quickly(png_with_chunks(100_000, kind, body), 2, "ancillary chunks", "the limit is 64")


def test_an_encoded_image_larger_than_its_raw_pixels_could_be_is_refused():
    limit = jpeg_markers.max_encoded_bytes(32 * 32)
    assert limit == 3 * 32 * 32 + jpeg_markers.ENCODED_ALLOWANCE_BYTES
    too_big = encode(random_images(1)[0], "PNG") + bytes(limit)
    message = jpeg_markers.check_encoded(too_big, 5, 32 * 32)
    assert message and message.startswith("image 5: encoded image is") and f"the limit is {limit:,}" in message


def test_photos_with_real_metadata_and_the_examples_still_pass():
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0132] = "Camera maker", "Camera model", "2024:01:01 12:00:00"
    photo = Image.fromarray(random_images(1, seed=3, size=64)[0])
    files = []
    for params in ({"exif": exif, "icc_profile": srgb}, {"exif": exif.tobytes() + bytes(60_000)},
                   {"icc_profile": srgb + bytes(400_000)}, {"comment": b"made by a test", "progressive": True}):
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", quality=90, **params)
        files.append(buffer.getvalue())
    buffer = io.BytesIO()
    text = PngInfo()
    for i in range(10):
        text.add_text(f"key{i}", "value" * 20, zip=i % 2 == 1)
    photo.save(buffer, "PNG", pnginfo=text, icc_profile=srgb)
    files.append(buffer.getvalue())
    files += [Path(p).read_bytes() for p in sorted(glob.glob(str(ROOT / "examples" / "*.jpg")))]
    assert len(files) > 10
    for i, data in enumerate(files):
        assert jpeg_markers.check_encoded(data, i, MAX_PIXELS) is None
        assert opened(data, i).decode().shape == (32, 32, 3)


# ----------------------------------------------------------------------------- against a server process
NORMAL_CALLS = 20
NORMAL_TIMEOUT_SECONDS = 2.0
BUDGET_SECONDS = 15.0  # on the code before the scan the normal calls all time out: bounded here


def _bomb_call(channel, api: str):
    """The 6 MB bomb (~17 s in Pillow before the scan) through ``api``, as a call taking a timeout."""
    bomb = jpeg_bomb(6)
    if api == "Classify":
        return lambda timeout: pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(images=[pb.Image(encoded=bomb)]), timeout=timeout)
    if api == "Explain":
        return lambda timeout: pb_grpc.ClassifierStub(channel).Explain(
            pb.ExplainRequest(images=[pb.Image(encoded=bomb)]), timeout=timeout)
    tensor = v2.ModelInferRequest.InferInputTensor(name="encoded_image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(bomb)
    return lambda timeout: v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
        v2.ModelInferRequest(model_name="tiny-max", inputs=[tensor]), timeout=timeout)


@pytest.mark.system
@pytest.mark.parametrize("api", ["Classify", "Explain", "ModelInfer"])
def test_one_clients_jpeg_bomb_is_refused_and_holds_up_nobody_else(tiny_models_dir, api):
    normal = pb.ClassifyRequest(images=[pb.Image(encoded=encode(random_images(1, seed=4)[0], "JPEG"))])
    with ServerProcess(server_args(tiny_models_dir)) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        stub.Classify(normal, timeout=30)  # connected and warm
        send = _bomb_call(channel, api)
        bomb_result: list = []

        def send_bomb() -> None:
            start = time.monotonic()
            try:
                send(1.0)
                bomb_result.append((grpc.StatusCode.OK, "", time.monotonic() - start))
            except grpc.RpcError as exc:
                bomb_result.append((exc.code(), exc.details(), time.monotonic() - start))

        bomber = threading.Thread(target=send_bomb)
        bomber.start()
        latencies, codes = [], []
        give_up = time.monotonic() + BUDGET_SECONDS
        while len(codes) < NORMAL_CALLS and time.monotonic() < give_up:
            start = time.monotonic()
            try:
                assert len(stub.Classify(normal, timeout=NORMAL_TIMEOUT_SECONDS).results) == 1
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
            latencies.append(time.monotonic() - start)
        bomber.join(30)
    assert codes == [grpc.StatusCode.OK] * NORMAL_CALLS, [c.name for c in codes]
    assert statistics.median(latencies) < 0.1, latencies
    code, details, bomb_seconds = bomb_result[0]
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "APP/COM segments" in details and bomb_seconds < 1.0, (details, bomb_seconds)
