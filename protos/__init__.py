"""The project's contracts, each specified once.

- The gRPC contract: ``cifar10/v1/classifier.proto`` and the Python code generated from it::

      from cifar10_serving.protos.cifar10.v1 import classifier_pb2, classifier_pb2_grpc

- The Open Inference Protocol (KServe v2), served beside it: ``inference/open_inference_grpc.proto``,
  the standard's contract, and its generated code::

      from cifar10_serving.protos.inference import open_inference_grpc_pb2, open_inference_grpc_pb2_grpc

- The model artifact format, between the trainer (``model/``) and the server: ``artifact.py``, whose
  docstring is the specification and whose ``check_metadata`` every reader applies::

      from cifar10_serving.protos import artifact
"""
