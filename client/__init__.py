"""Python client for the CIFAR-10 classification service. It needs grpcio, protobuf, numpy and
pillow, never torch.

    from cifar10_serving.client import ClassifierClient
    with ClassifierClient("127.0.0.1:50051") as c:
        result = c.classify(["examples/cat.jpg"], layers=["stage1.pool"])[0]
        print(result.label, result.feature_maps["stage1.pool"].shape)
"""

from cifar10_serving.client._client import (
    Classification,
    ClassifierClient,
    ClassifierError,
    ImageLike,
    Prediction,
    StreamResult,
)
from cifar10_serving.client._credentials import tls_credentials
from cifar10_serving.client.explanation import Explanation, ExplanationMap
from cifar10_serving.client.filters import LayerFilters

__all__ = ["Classification", "ClassifierClient", "ClassifierError", "Explanation", "ExplanationMap", "ImageLike",
           "LayerFilters", "Prediction", "StreamResult", "tls_credentials"]
