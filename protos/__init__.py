"""The gRPC contract: ``cifar10/v1/classifier.proto`` and the Python code generated from it.

    from cifar10_serving.protos.cifar10.v1 import classifier_pb2, classifier_pb2_grpc
"""
