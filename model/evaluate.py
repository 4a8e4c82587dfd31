"""Validation accuracy of a network, as served and with flip test-time augmentation; shared by the
trainer (per epoch) and the exporter (re-scoring a file at export)."""

from __future__ import annotations

import torch
from torch import Tensor

from cifar10_serving.model.network import CifarNet


def autocast(device: torch.device, enabled: bool = True):
    # bf16 on the GPU roughly doubles throughput; the CPU here has no fast bf16, so it stays fp32
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.inference_mode()
def evaluate(net: CifarNet, images: Tensor, labels: Tensor, device: torch.device, batch: int = 1000,
             exact: bool = False) -> dict:
    """Top-1 accuracy of the plain forward (what the service computes) and with flip test-time augmentation.

    ``exact`` evaluates in float32 without TF32 (what the exported file computes on a CPU); otherwise bf16
    on the GPU, which is faster and fine for the per-epoch lines."""
    net.eval()
    correct = correct_tta = 0
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if exact:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    for start in range(0, len(images), batch):
        x = images[start : start + batch].to(device).contiguous(memory_format=torch.channels_last)
        y = labels[start : start + batch].to(device)
        with autocast(device, enabled=not exact):
            p = net(x).float()
            p_tta = p + net(x.flip(3)).float()
        correct += (p.argmax(1) == y).sum().item()
        correct_tta += (p_tta.argmax(1) == y).sum().item()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"accuracy": correct / len(images), "accuracy_flip_tta": correct_tta / len(images)}
