"""An independent copy of RepDistiller's CIFAR models (HobbitLong/RepDistiller, ``models/``
``resnet.py``, ``wrn.py``, ``vgg.py``), written from reading them: the same module
names (hence the same state-dict keys) and the same forward passes, including the
``(feats, logits)`` return of ``forward(x, is_feat=True)``. Used only as the oracle
for importing RepDistiller checkpoints; initialisation is left at torch's defaults.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------ resnet.py
class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None, is_last=False):
        super().__init__()
        self.is_last = is_last
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        out += residual
        preact = out
        out = F.relu(out)
        return (out, preact) if self.is_last else out


class ResNet(nn.Module):
    def __init__(self, depth, num_filters, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3], num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, is_last=blocks == 1)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, is_last=i == blocks - 1) for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x, is_feat=False):
        x = self.relu(self.bn1(self.conv1(x)))
        f0 = x
        x, _ = self.layer1(x)
        f1 = x
        x, _ = self.layer2(x)
        f2 = x
        x, _ = self.layer3(x)
        f3 = x
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        f4 = x
        x = self.fc(x)
        return ([f0, f1, f2, f3, f4], x) if is_feat else x


# --------------------------------------------------------------------------- wrn.py
class WideBasicBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(
                    in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1
                )
                for i in range(nb_layers)
            ]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, num_classes, widen_factor=1):
        super().__init__()
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]

    def forward(self, x, is_feat=False):
        out = self.conv1(x)
        f0 = out
        out = self.block1(out)
        f1 = out
        out = self.block2(out)
        f2 = out
        out = self.block3(out)
        f3 = out
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        out = out.view(-1, self.nChannels)
        f4 = out
        out = self.fc(out)
        return ([f0, f1, f2, f3, f4], out) if is_feat else out


# --------------------------------------------------------------------------- vgg.py
class VGG(nn.Module):
    def __init__(self, cfg, num_classes=1000):
        super().__init__()
        self.block0 = self._make_layers(cfg[0], 3)
        self.block1 = self._make_layers(cfg[1], cfg[0][-1])
        self.block2 = self._make_layers(cfg[2], cfg[1][-1])
        self.block3 = self._make_layers(cfg[3], cfg[2][-1])
        self.block4 = self._make_layers(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)

    @staticmethod
    def _make_layers(widths, in_channels):
        layers: list[nn.Module] = []
        for v in widths:
            layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(True)]
            in_channels = v
        return nn.Sequential(*layers[:-1])

    def forward(self, x, is_feat=False):
        h = x.shape[2]
        x = F.relu(self.block0(x))
        f0 = x
        x = F.relu(self.block1(self.pool0(x)))
        f1 = x
        x = F.relu(self.block2(self.pool1(x)))
        f2 = x
        x = F.relu(self.block3(self.pool2(x)))
        f3 = x
        if h == 64:
            x = self.pool3(x)
        x = F.relu(self.block4(x))
        f4 = x
        x = self.pool4(x).view(x.size(0), -1)
        f5 = x
        x = self.classifier(x)
        return ([f0, f1, f2, f3, f4, f5], x) if is_feat else x


_VGG = {
    "S": [[64], [128], [256], [512], [512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}

#: RepDistiller's ``model_dict`` entries for its CIFAR ResNets, WRNs and VGGs
MODEL_DICT = {
    "resnet110": lambda num_classes: ResNet(110, [16, 16, 32, 64], num_classes),
    "resnet32": lambda num_classes: ResNet(32, [16, 16, 32, 64], num_classes),
    "resnet32x4": lambda num_classes: ResNet(32, [32, 64, 128, 256], num_classes),
    "resnet8x4": lambda num_classes: ResNet(8, [32, 64, 128, 256], num_classes),
    "wrn_40_2": lambda num_classes: WideResNet(40, num_classes, widen_factor=2),
    "wrn_16_2": lambda num_classes: WideResNet(16, num_classes, widen_factor=2),
    "vgg13": lambda num_classes: VGG(_VGG["B"], num_classes),
    "vgg8": lambda num_classes: VGG(_VGG["S"], num_classes),
}
