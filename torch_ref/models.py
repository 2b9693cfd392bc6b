"""The notebooks' PyTorch models, as the notebooks define them.

Class names, constructor arguments, attribute names and initialisation are the notebooks' own, so a
``state_dict`` saved from a notebook loads here with ``strict=True`` and vice versa. Nothing clever lives here:
this is the reference that the Flax port is measured against.

Notebook 000 ("ResNets and Skip Connections"): PlainBlock, PlainDeepCNN, ResidualBlock, SimpleResNet.
Notebook 004 ("Residual Networks"): PlainBlock (the same block), PlainNet, BasicBlock, BottleneckBlock, ResNet,
ResNet18/34/50, SimpleNet, and the ablation variants ResNetNoBN / ResNetDropout that its exercise 5 asks for.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PlainBlock",
    "PlainDeepCNN",
    "ResidualBlock",
    "SimpleResNet",
    "PlainNet",
    "BasicBlock",
    "BottleneckBlock",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "SimpleNet",
    "ResNetNoBN",
    "ResNetDropout",
    "ResNet18NoBN",
    "ResNet18Dropout",
]


# ----------------------------------------------------------------------------------------------- notebook 000
class PlainBlock(nn.Module):
    """Two 3x3 conv-BN-ReLU layers, no skip connection (notebooks 000 and 004 define the same block)."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return out


class ResidualBlock(nn.Module):
    """PlainBlock plus a skip connection; a 1x1 conv + BN projection when the shape changes."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x):
        identity = self.shortcut(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return F.relu(out)


class _ThreeStageCNN(nn.Module):
    """The 16/32/64-channel CIFAR network of notebook 000; subclasses pick the block."""

    block: type[nn.Module]

    def __init__(self, n_blocks=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.stage1 = self._make_stage(16, 16, n_blocks, stride=1)
        self.stage2 = self._make_stage(16, 32, n_blocks, stride=2)
        self.stage3 = self._make_stage(32, 64, n_blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def _make_stage(self, in_channels, out_channels, n_blocks, stride):
        blocks = [self.block(in_channels, out_channels, stride=stride)]
        for _ in range(1, n_blocks):
            blocks.append(self.block(out_channels, out_channels, stride=1))
        return nn.Sequential(*blocks)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.stage1(out)
        out = self.stage2(out)
        out = self.stage3(out)
        out = self.avgpool(out)
        out = out.view(out.size(0), -1)
        return self.fc(out)


class PlainDeepCNN(_ThreeStageCNN):
    """1 + 6n conv layers without skip connections (n=5: 31 layers)."""

    block = PlainBlock


class SimpleResNet(_ThreeStageCNN):
    """PlainDeepCNN with ResidualBlocks: n=3 is ResNet-20, n=5 ResNet-32."""

    block = ResidualBlock


# ----------------------------------------------------------------------------------------------- notebook 004
class PlainNet(nn.Module):
    """64..512-channel network without skip connections (shallow [1,1,1,1], deep [3,3,3,3])."""

    def __init__(self, block, num_blocks, num_classes=10):
        super().__init__()
        self.in_channels = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def _make_layer(self, block, out_channels, num_blocks, stride):
        layers = [block(self.in_channels, out_channels, stride)]
        self.in_channels = out_channels
        for _ in range(1, num_blocks):
            layers.append(block(out_channels, out_channels))
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = self.avgpool(out)
        out = out.view(out.size(0), -1)
        return self.fc(out)


class BasicBlock(nn.Module):
    """ResNet-18/34 block; the projection shortcut is passed in as ``downsample``."""

    expansion = 1

    def __init__(self, in_channels, out_channels, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return F.relu(out)


class BottleneckBlock(nn.Module):
    """ResNet-50 block: 1x1 reduce, 3x3 (with the stride), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_channels, out_channels, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels * self.expansion)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return F.relu(out)


class ResNet(nn.Module):
    """CIFAR ResNet (3x3 stem, stride 1, no max-pool) with the notebook's He initialisation."""

    def __init__(self, block, layers, num_classes=10):
        super().__init__()
        self.in_channels = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, out_channels, num_blocks, stride):
        downsample = None
        if stride != 1 or self.in_channels != out_channels * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_channels, out_channels * block.expansion, kernel_size=1, stride=stride,
                          bias=False),
                nn.BatchNorm2d(out_channels * block.expansion),
            )
        layers = [block(self.in_channels, out_channels, stride, downsample)]
        self.in_channels = out_channels * block.expansion
        for _ in range(1, num_blocks):
            layers.append(block(self.in_channels, out_channels))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)


def ResNet18():  # noqa: N802 - the notebook's name
    return ResNet(BasicBlock, [2, 2, 2, 2])


def ResNet34():  # noqa: N802
    return ResNet(BasicBlock, [3, 4, 6, 3])


def ResNet50():  # noqa: N802
    return ResNet(BottleneckBlock, [3, 4, 6, 3])


class SimpleNet(nn.Module):
    """The four-conv network of notebook 004's ``verify_he_init`` (He init, fc after an NCHW flatten)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1, stride=2)
        self.conv4 = nn.Conv2d(128, 128, 3, padding=1)
        self.fc = nn.Linear(128 * 16 * 16, 10)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = x.view(x.size(0), -1)
        return self.fc(x)


# ---------------------------------------------------------------------------------- notebook 004, ablation
class ResNetNoBN(ResNet):
    """Ablation: the ResNet with every BatchNorm2d replaced by ``nn.Identity`` (same keys, minus BN)."""

    def __init__(self, block, layers, num_classes=10):
        super().__init__(block, layers, num_classes)
        for parent in list(self.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.BatchNorm2d):
                    setattr(parent, name, nn.Identity())


class ResNetDropout(ResNet):
    """Ablation: the ResNet with ``nn.Dropout(p)`` after each residual block.

    The dropout is applied in ``forward`` rather than inserted into the stages, so the ``state_dict`` keys
    are exactly the ResNet's and weights move freely between the two.
    """

    def __init__(self, block, layers, num_classes=10, p=0.2):
        super().__init__(block, layers, num_classes)
        self.dropout = nn.Dropout(p)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = self.dropout(block(x))
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)


def ResNet18NoBN():  # noqa: N802
    return ResNetNoBN(BasicBlock, [2, 2, 2, 2])


def ResNet18Dropout(p=0.2):  # noqa: N802
    return ResNetDropout(BasicBlock, [2, 2, 2, 2], p=p)
