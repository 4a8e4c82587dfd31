"""The CIFAR-10 CNN: stages of convolution, pooling, normalisation and activation, then one fully
connected layer.

Each stage is ``conv1 -> pool -> bn1 -> act1 -> conv2 -> bn2 -> act2``. Pooling comes straight after
the first convolution (as in airbench) so the rest of the stage runs at a quarter of the pixels; max
pooling commutes with the monotonic GELU that follows, so the order costs nothing in what max pooling
keeps. A residual stage (``residual=True``) adds ``conv3 -> bn3 -> act3`` and then ``add``, which adds
act1's output back (a skip connection around conv2 and conv3, as in airbench96); the pooling layer stays
where it was. The head pools each channel to one value, flattens the volume and a fully connected layer
maps it to the ten classes; ``forward`` returns their softmax.
With ``whiten=True`` a frozen 2x2 patch-whitening convolution and a GELU (the ``stem``) come before
the first stage, as in airbench; without it the stem is empty and the network is as it always was.

The network takes uint8 images N x 3 x 32 x 32 and normalises them itself, so no caller carries the
dataset's mean and std. It is written to be compiled by ``torch.jit.script``.
"""

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

POOL_KINDS = ("max", "avg", "conv")  # "conv": a learned stride-2 convolution in place of pooling
POOL_STRIDE = 2  # every downsampling layer halves (about) width and height
WHITEN_PATCH = 2  # airbench's patch side: 2x2 patches of 3 channels give 12 directions to whiten
WHITEN_EPS = 5e-4  # airbench's floor under the eigenvalues, so near-constant directions are not blown up

# Per-channel statistics of the CIFAR-10 training split, on the 0..255 scale.
CIFAR10_MEAN = (125.307, 122.950, 113.865)
CIFAR10_STD = (62.993, 62.089, 66.705)


@dataclass(frozen=True)
class NetConfig:
    pool: str = "max"  # "max", "avg" or "conv"
    pool_size: int = 2  # 2: non-overlapping windows; 3: overlapping windows (stride stays 2)
    widths: Tuple[int, ...] = (64, 128, 256)  # output channels of each stage
    residual: bool = False  # each stage gains conv3/bn3/act3 and a skip connection from act1
    num_classes: int = 10
    in_size: int = 32  # input height and width
    in_channels: int = 3
    whiten: bool = False  # a frozen 2x2 patch-whitening conv + GELU before stage 1 (airbench); off in old files

    def __post_init__(self) -> None:
        if self.pool not in POOL_KINDS:
            raise ValueError(f"unknown pool kind {self.pool!r}; expected one of {POOL_KINDS}")
        if self.pool_size not in (2, 3):
            raise ValueError(f"pool_size must be 2 or 3, got {self.pool_size!r}")
        if not self.widths or any(int(w) != w or w < 1 for w in self.widths):
            raise ValueError(f"widths must be positive integers, got {self.widths!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes!r}")
        size = self.in_size - (WHITEN_PATCH - 1 if self.whiten else 0)  # the whitening conv has no padding
        for _ in self.widths:
            size = pooled_size(size, self.pool_size)
            if size < 1:
                raise ValueError(
                    f"{len(self.widths)} stages with pool_size {self.pool_size} shrink a "
                    f"{self.in_size}x{self.in_size} input to nothing"
                )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


def pooled_size(size: int, window: int, stride: int = POOL_STRIDE) -> int:
    """Output width of a pooling layer without padding: (W - F) / S + 1, rounded down."""
    return (size - window) // stride + 1


class Normalize(nn.Module):
    """uint8 (or float on the 0..255 scale) in, zero-mean unit-variance float out."""

    def __init__(self, mean: Tuple[float, ...], std: Tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x.float() - self.mean) * self.inv_std


def make_downsample(kind: str, window: int, channels: int) -> nn.Module:
    if kind == "max":
        return nn.MaxPool2d(window, stride=POOL_STRIDE)
    if kind == "avg":
        return nn.AvgPool2d(window, stride=POOL_STRIDE)
    if kind == "conv":
        return nn.Conv2d(channels, channels, window, stride=POOL_STRIDE, bias=False)
    raise ValueError(f"unknown pool kind {kind!r}; expected one of {POOL_KINDS}")


class PatchWhitening(nn.Conv2d):
    """A frozen 2x2 convolution (no padding) whose filters whiten the input's 2x2 patches, as in airbench:
    the eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue), then the same filters
    negated, so the GELU after it keeps both signs of each direction. Fitted once from training
    images (``fit``), never trained: the weight has ``requires_grad`` off and no optimizer sees it.
    The bias starts at zero and is trained (airbench trains it for the first epochs, then freezes it)."""

    def __init__(self, c_in: int, patch: int = WHITEN_PATCH) -> None:
        super().__init__(c_in, 2 * c_in * patch * patch, patch, bias=True)
        self.weight.requires_grad_(False)
        nn.init.zeros_(self.bias)

    @torch.jit.unused
    def fit(self, x: Tensor, eps: float = WHITEN_EPS) -> None:
        """Sets the filters from normalised images ``x`` (N x C x H x W, float)."""
        c, k = self.in_channels, self.kernel_size[0]
        patches = x.float().unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        # the second moment, uncentred as in airbench: the inputs are already normalised to mean 0
        cov = patches.T.double() @ patches.double() / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).flip(0)  # largest first
        filters = filters.reshape(c * k * k, c, k, k).to(self.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(torch.cat([filters, -filters]))
            self.bias.zero_()


class Stage(nn.Sequential):
    """``conv1 -> pool -> bn1 -> act1 -> conv2 -> bn2 -> act2``, one layer after another."""

    names: List[str]

    def __init__(self, name: str, c_in: int, c_out: int, pool: str, window: int) -> None:
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                pool=make_downsample(pool, window, c_out),
                bn1=nn.BatchNorm2d(c_out),
                act1=nn.GELU(),
                conv2=nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                bn2=nn.BatchNorm2d(c_out),
                act2=nn.GELU(),
            )
        )
        self.names = [f"{name}.{child}" for child, _ in self.named_children()]

    def forward_features(self, x: Tensor, layers: List[str], features: Dict[str, Tensor]) -> Tensor:
        i = 0
        for layer in self:
            x = layer(x)
            if self.names[i] in layers:
                features[self.names[i]] = x
            i += 1
        return x


class Add(nn.Module):
    """The end of a skip connection: the stage's last activation plus act1's output (same shape)."""

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return x + skip


class ResidualStage(nn.Module):
    """``conv1 -> pool -> bn1 -> act1 -> conv2 -> bn2 -> act2 -> conv3 -> bn3 -> act3 -> add(act1)``."""

    names: List[str]

    def __init__(self, name: str, c_in: int, c_out: int, pool: str, window: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = make_downsample(pool, window, c_out)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = nn.GELU()
        self.conv3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.act3 = nn.GELU()
        self.add = Add()
        nn.init.zeros_(self.bn3.weight)  # the branch starts silent: the stage begins as conv1 -> pool alone
        self.names = [f"{name}.{child}" for child, _ in self.named_children()]

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.pool(self.conv1(x))))
        y = self.act2(self.bn2(self.conv2(x)))
        y = self.act3(self.bn3(self.conv3(y)))
        return self.add(y, x)

    def _keep(self, i: int, x: Tensor, layers: List[str], features: Dict[str, Tensor]) -> Tensor:
        if self.names[i] in layers:
            features[self.names[i]] = x
        return x

    def forward_features(self, x: Tensor, layers: List[str], features: Dict[str, Tensor]) -> Tensor:
        x = self._keep(0, self.conv1(x), layers, features)
        x = self._keep(1, self.pool(x), layers, features)
        x = self._keep(2, self.bn1(x), layers, features)
        x = self._keep(3, self.act1(x), layers, features)
        y = self._keep(4, self.conv2(x), layers, features)
        y = self._keep(5, self.bn2(y), layers, features)
        y = self._keep(6, self.act2(y), layers, features)
        y = self._keep(7, self.conv3(y), layers, features)
        y = self._keep(8, self.bn3(y), layers, features)
        y = self._keep(9, self.act3(y), layers, features)
        return self._keep(10, self.add(y, x), layers, features)


class CifarNet(nn.Module):
    """Configurable CIFAR-10 CNN. ``layer_names`` lists every layer whose output can be returned."""

    layer_names: List[str]

    def __init__(self, config: NetConfig = NetConfig()) -> None:
        super().__init__()
        self.config = config
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        c_in = config.in_channels
        stem: List[Tuple[str, nn.Module]] = []
        if config.whiten:
            stem = [("whiten", PatchWhitening(c_in)), ("act", nn.GELU())]
            c_in = 2 * c_in * WHITEN_PATCH * WHITEN_PATCH
        self.stem = nn.Sequential(OrderedDict(stem))  # empty without whitening: old files load unchanged
        stages = []
        kind = ResidualStage if config.residual else Stage
        for i, width in enumerate(config.widths):
            name = f"stage{i + 1}"
            stages.append((name, kind(name, c_in, width, config.pool, config.pool_size)))
            c_in = width
        self.stages = nn.Sequential(OrderedDict(stages))
        head_pool = nn.AdaptiveMaxPool2d(1) if config.pool == "max" else nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(OrderedDict(pool=head_pool, flatten=nn.Flatten()))
        self.classifier = nn.Sequential(OrderedDict(fc=nn.Linear(c_in, config.num_classes)))
        self.layer_names = [name for name, _ in self.named_layers()]

    @torch.jit.unused
    def named_layers(self) -> List[Tuple[str, nn.Module]]:
        """(name, module) for every layer in order; names drop the ``stages.`` container prefix."""
        groups = [("stem", self.stem), *self.stages.named_children(), ("head", self.head), ("classifier", self.classifier)]
        return [(f"{group}.{name}", module) for group, block in groups for name, module in block.named_children()]

    def logits(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        x = self.stem(x)
        x = self.stages(x)
        x = self.head(x)
        return self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        """Softmax class scores, N x num_classes."""
        return F.softmax(self.logits(x), dim=1)

    @torch.jit.export
    def forward_with_features(self, x: Tensor, layers: List[str]) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Softmax scores and, in the same pass, the outputs of the layers named in ``layers``."""
        for name in layers:
            if name not in self.layer_names:
                raise ValueError("unknown layer: " + name)
        features: Dict[str, Tensor] = {}
        x = self.normalize(x)
        i = 0
        for layer in self.stem:
            x = layer(x)
            if self.layer_names[i] in layers:
                features[self.layer_names[i]] = x
            i += 1
        for block in self.stages:
            x = block.forward_features(x, layers, features)
        i = len(self.layer_names) - len(self.head) - len(self.classifier)
        for layer in self.head:
            x = layer(x)
            if self.layer_names[i] in layers:
                features[self.layer_names[i]] = x
            i += 1
        for layer in self.classifier:
            x = layer(x)
            if self.layer_names[i] in layers:
                features[self.layer_names[i]] = x
            i += 1
        return F.softmax(x, dim=1), features


def describe_layers(net: CifarNet) -> List[dict]:
    """Each layer in order with its kind, output shape (C, H, W) and multiply-add FLOPs (x2) per image."""
    cfg = net.config
    shape = (cfg.in_channels, cfg.in_size, cfg.in_size)
    rows = []
    for name, module in net.named_layers():
        c, h, w = shape
        flops = 0
        row: dict = {"name": name}
        if isinstance(module, PatchWhitening):
            h, w = h - module.kernel_size[0] + 1, w - module.kernel_size[0] + 1
            c_in, c = c, module.out_channels
            flops = 2 * c_in * c * module.kernel_size[0] ** 2 * h * w
            kind = "patch_whitening"  # a frozen conv
            row.update(kernel=module.kernel_size[0], stride=1, padding=0)
        elif isinstance(module, nn.Conv2d):
            k, s, p = module.kernel_size[0], module.stride[0], module.padding[0]
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            c_in, c = c, module.out_channels
            flops = 2 * c_in * c * k * k * h * w
            kind = "conv" if s == 1 else "conv_downsample"
            row.update(kernel=k, stride=s, padding=p)
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            k, s = int(module.kernel_size), int(module.stride)
            h, w = pooled_size(h, k, s), pooled_size(w, k, s)
            kind = "maxpool" if isinstance(module, nn.MaxPool2d) else "avgpool"
            row.update(kernel=k, stride=s, padding=0)
        elif isinstance(module, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)):
            h = w = 1
            kind = "global_maxpool" if isinstance(module, nn.AdaptiveMaxPool2d) else "global_avgpool"
        elif isinstance(module, nn.BatchNorm2d):
            kind = "batchnorm"
        elif isinstance(module, nn.GELU):
            kind = "gelu"
        elif isinstance(module, Add):
            kind = "residual_add"  # adds act1's output; additions are not counted as FLOPs
        elif isinstance(module, nn.Flatten):
            kind = "flatten"
        elif isinstance(module, nn.Linear):
            flops = 2 * module.in_features * module.out_features
            kind = "fc"
        else:
            raise TypeError(f"layer {name} has no description: {type(module).__name__}")
        if kind == "flatten":
            shape_out: Tuple[int, ...] = (c * h * w,)
        elif kind == "fc":
            shape_out = (module.out_features,)
        else:
            shape_out = (c, h, w)
        row.update(kind=kind, output_shape=list(shape_out), flops=flops)
        rows.append(row)
        shape = shape_out if len(shape_out) == 3 else (shape_out[0], 1, 1)
    return rows


def fit_whitening(net: CifarNet, images: Tensor) -> None:
    """Fits ``net``'s patch-whitening layer (if it has one) to uint8 training images N x 3 x H x W."""
    if net.config.whiten:
        with torch.no_grad():
            net.stem.whiten.fit(net.normalize(images.to(net.normalize.mean.device)))


def count_flops(net: CifarNet) -> int:
    """Multiply-adds x 2 per image in the convolutions and the fully connected layer (the FLOPs that
    matter; pooling, normalisation, activations and the residual additions are a few percent more)."""
    return sum(row["flops"] for row in describe_layers(net))
