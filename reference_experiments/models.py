"""Model zoo: the RepDistiller CIFAR architectures plus a small digits CNN/MLP pair.

``create_model(name, num_classes, in_channels=3)`` builds one of

- ``resnet110``, ``resnet32`` (CIFAR ResNets, basic blocks, widths 16/16/32/64),
- ``resnet32x4``, ``resnet8x4`` (the same, widths 32/64/128/256),
- ``wrn_40_2``, ``wrn_16_2`` (pre-activation wide ResNets),
- ``vgg13``, ``vgg8`` (the *batch-norm* VGG variants, as RepDistiller's ``model_dict``
  maps ``vgg13 -> vgg13_bn`` and ``vgg8 -> vgg8_bn``),
- ``digits_cnn`` (teacher) and ``digits_mlp`` (student) for 8x8x1 digits.

The CIFAR definitions follow RepDistiller (HobbitLong/RepDistiller, ``models/``) layer
for layer, including weight initialisation, so parameter counts match exactly
(at 100 classes: resnet110 1,736,564; resnet32 472,756; resnet32x4 7,433,860;
resnet8x4 1,233,540; wrn_40_2 2,255,156;
wrn_16_2 703,284; vgg13 9,462,180; vgg8 3,965,028). The only change: the fixed
``AvgPool2d(8)`` of the ResNet/WRN heads is a global average pool, which is identical
at 32x32 and lets the models accept other sizes (e.g. 56x56 Stanford Cars crops).
VGG keeps RepDistiller's rule of applying ``pool3`` only for 64-pixel inputs.

Every model's ``forward(x, return_features=False)`` returns logits, or
``(logits, features)`` where ``features`` is RepDistiller's ``feat`` list (post-ReLU
variants): ``features[-1]`` is the pooled embedding fed to the classifier,
``features[2]`` is the FitNets hint layer, ``features[1:-1]`` are VID's layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODEL_NAMES",
    "count_parameters",
    "create_model",
    "feature_shapes",
]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


# --------------------------------------------------------------------------- ResNet
class _ResBlock(nn.Module):
    """Post-activation basic block (conv-bn-relu-conv-bn, + shortcut, relu)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """RepDistiller ``ResNet(depth, [16, 16, 32, 64], 'basicblock')``."""

    # registered with setattr in __init__
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential

    def __init__(
        self,
        depth: int,
        num_classes: int,
        widths: Sequence[int] = (16, 16, 32, 64),
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        stages = []
        for i, (cout, stride) in enumerate(zip(widths[1:], (1, 2, 2), strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(_ResBlock(cin, cout, stride if j == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
            setattr(self, f"layer{i + 1}", stages[-1])
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = f3.mean((2, 3))  # = adaptive_avg_pool2d(.., 1); vmap-friendly (no as_strided_)
        logits = self.fc(f4)
        if return_features:
            return logits, [f0, f1, f2, f3, f4]
        return logits


# ------------------------------------------------------------------------------ WRN
class _WideBlock(nn.Module):
    """Pre-activation block of RepDistiller's WRN (dropout 0)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.equal_in_out = cin == cout
        self.conv_shortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.conv_shortcut = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        # As in the original: with a projection shortcut it acts on the activated input.
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(act)
        return shortcut + out


class WideResNet(nn.Module):
    """RepDistiller ``WideResNet(depth, num_classes, widen_factor)``."""

    # registered with setattr in __init__
    block1: nn.Sequential
    block2: nn.Sequential
    block3: nn.Sequential

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], kernel_size=3, padding=1, bias=False)
        for i, stride in enumerate((1, 2, 2)):
            blocks = [
                _WideBlock(ch[i] if j == 0 else ch[i + 1], ch[i + 1], stride if j == 0 else 1)
                for j in range(n)
            ]
            setattr(self, f"block{i + 1}", nn.Sequential(*blocks))
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        out = F.relu(self.bn1(f3))
        f4 = out.mean((2, 3))  # = adaptive_avg_pool2d(.., 1); vmap-friendly (no as_strided_)
        logits = self.fc(f4)
        if return_features:
            return logits, [f0, f1, f2, f3, f4]
        return logits


# ------------------------------------------------------------------------------ VGG
_VGG_CFG: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def _vgg_block(widths: Sequence[int], cin: int) -> nn.Sequential:
    """conv-bn-relu repeated, without the final ReLU (applied in forward)."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, kernel_size=3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """RepDistiller ``VGG(cfg, batch_norm=True)``; the 4th max-pool only for 64-px inputs."""

    # registered with setattr in __init__
    block0: nn.Sequential
    block1: nn.Sequential
    block2: nn.Sequential
    block3: nn.Sequential
    block4: nn.Sequential

    def __init__(self, cfg: list[list[int]], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        cins = [in_channels] + [c[-1] for c in cfg[:-1]]
        for i, (widths, cin) in enumerate(zip(cfg, cins, strict=True)):
            setattr(self, f"block{i}", _vgg_block(widths, cin))
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        h = x.shape[2]
        f0 = F.relu(self.block0(x))
        f1 = F.relu(self.block1(F.max_pool2d(f0, 2)))
        f2 = F.relu(self.block2(F.max_pool2d(f1, 2)))
        f3 = F.relu(self.block3(F.max_pool2d(f2, 2)))
        x = F.max_pool2d(f3, 2) if h == 64 else f3
        f4 = F.relu(self.block4(x))
        f5 = f4.mean((2, 3))  # = adaptive_avg_pool2d(.., 1); vmap-friendly (no as_strided_)
        logits = self.classifier(f5)
        if return_features:
            return logits, [f0, f1, f2, f3, f4, f5]
        return logits


# --------------------------------------------------------------------------- digits
class DigitsCNN(nn.Module):
    """Small CNN teacher for 8x8 digits (~98% test accuracy after a few epochs).

    Features: [32x8x8, 64x4x4, 128x2x2, pooled 128].
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1 = F.relu(self.bn2(self.conv2(f0)))
        f2 = F.relu(self.bn3(self.conv3(f1)))
        f3 = f2.mean((2, 3))  # = adaptive_avg_pool2d(.., 1); vmap-friendly (no as_strided_)
        logits = self.fc(f3)
        if return_features:
            return logits, [f0, f1, f2, f3]
        return logits


class DigitsMLP(nn.Module):
    """Small MLP student for 8x8 digits.

    Features are flat vectors, not spatial maps: [128, 128, 64, 64] (``features[-1]``
    is the embedding before the classifier). FitNets/VID regressors pairing it with
    ``digits_cnn`` must therefore map 2-D student features to the teacher's shapes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels * input_size * input_size, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, 64)
        self.fc4 = nn.Linear(64, 64)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        x = torch.flatten(x, 1)
        f0 = F.relu(self.fc1(x))
        f1 = F.relu(self.fc2(f0))
        f2 = F.relu(self.fc3(f1))
        f3 = F.relu(self.fc4(f2))
        logits = self.classifier(f3)
        if return_features:
            return logits, [f0, f1, f2, f3]
        return logits


# -------------------------------------------------------------------------- factory
_FACTORIES: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet110": lambda nc, ic: CifarResNet(110, nc, in_channels=ic),
    "resnet32": lambda nc, ic: CifarResNet(32, nc, in_channels=ic),
    "resnet32x4": lambda nc, ic: CifarResNet(32, nc, widths=(32, 64, 128, 256), in_channels=ic),
    "resnet8x4": lambda nc, ic: CifarResNet(8, nc, widths=(32, 64, 128, 256), in_channels=ic),
    "wrn_40_2": lambda nc, ic: WideResNet(40, 2, nc, in_channels=ic),
    "wrn_16_2": lambda nc, ic: WideResNet(16, 2, nc, in_channels=ic),
    "vgg13": lambda nc, ic: VGG(_VGG_CFG["vgg13"], nc, in_channels=ic),
    "vgg8": lambda nc, ic: VGG(_VGG_CFG["vgg8"], nc, in_channels=ic),
    "digits_cnn": lambda nc, ic: DigitsCNN(nc, in_channels=ic),
    "digits_mlp": lambda nc, ic: DigitsMLP(nc, in_channels=ic),
}

MODEL_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def create_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build model ``name`` (see ``MODEL_NAMES``) with ``num_classes`` outputs.

    >>> m = create_model("resnet32", 100)
    >>> count_parameters(m)
    472756
    """
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}") from None
    return factory(int(num_classes), int(in_channels))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def feature_shapes(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Shapes of ``model(x, return_features=True)[1]`` from a dry run.

    ``input_shape`` is ``(C, H, W)`` (returned shapes then omit the batch dimension)
    or ``(N, C, H, W)`` (returned shapes include it). Runs in eval mode on the
    model's device/dtype with a batch of 2 and restores the training flag.

    >>> feature_shapes(create_model("wrn_16_2", 100), (3, 32, 32))
    [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)]
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W), got {shape}")
    batched = len(shape) == 4
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros((shape if batched else (2, *shape)), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        _, feats = model(x, return_features=True)
    finally:
        model.train(was_training)
    return [tuple(f.shape) if batched else tuple(f.shape[1:]) for f in feats]
