"""The CIFAR-10 gRPC server. It loads TorchScript artifacts and never imports ``model``."""
