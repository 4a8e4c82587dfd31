"""Callers that ask for every feature map, as fast as they are answered, from their own process:

    python -m tests.helpers.feature_load TARGET SECONDS CALLERS IMAGES

Prints one JSON line at the end: answers by status code. A caller refused RESOURCE_EXHAUSTED waits
a little and tries again, as a client should. Callers read every answer but do not parse it: parsing
tens of megabytes would only take this machine's CPU from the server under test. Run by
tests/test_responsive.py."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter

import grpc
import numpy as np

from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb

BACKOFF_SECONDS = 0.05
CHANNELS = 4
CLASSIFY = "/cifar10.v1.Classifier/Classify"


async def main(target: str, seconds: float, callers: int, images: int) -> None:
    rng = np.random.default_rng(3)
    raw = [pb.Image(raw=pb.RawTensor(shape=[32, 32, 3], layout=pb.LAYOUT_HWC, data=rng.integers(0, 256, 3072, dtype=np.uint8).tobytes()))
           for _ in range(images)]
    request = pb.ClassifyRequest(images=raw, feature_layers=["*"])
    codes: Counter[str] = Counter()
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", -1),
                                                           ("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CHANNELS)]
    stop = time.monotonic() + seconds

    async def caller(k: int) -> None:
        classify = channels[k % CHANNELS].unary_unary(CLASSIFY, request_serializer=pb.ClassifyRequest.SerializeToString)
        while time.monotonic() < stop:
            try:
                await classify(request, timeout=30)  # the answer's bytes, unparsed
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
                await asyncio.sleep(BACKOFF_SECONDS)

    await asyncio.gather(*(caller(k) for k in range(callers)))
    for channel in channels:
        await channel.close()
    print(json.dumps(codes), flush=True)


if __name__ == "__main__":
    target, seconds, callers, images = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    asyncio.run(main(target, seconds, callers, images))
