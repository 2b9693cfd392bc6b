"""The notebooks' models in Flax NNX, one class per torch class, attribute for attribute.

Constructor arguments are the torch ones plus ``rngs``; attribute names are the torch ones, so the port can
derive every torch key from the module tree. Inputs are NHWC (N, 32, 32, 3). ``model.train()`` and
``model.eval()`` switch BatchNorm and dropout as in torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet.layers import (
    BatchNorm2d,
    Conv2d,
    Identity,
    Linear,
    adaptive_avg_pool_1x1,
    kaiming_normal,
    relu,
)

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
    "check_image_batch",
]


def check_image_batch(x: jax.Array, channels: int = 3, size: int | None = None) -> None:
    """Reject a wrongly shaped batch with a message that says what was expected (not an XLA shape dump)."""
    shape = tuple(x.shape)
    if len(shape) != 4:
        raise ValueError(f"expected a batch of NHWC images (N, H, W, {channels}), got shape {shape}")
    if shape[-1] != channels:
        hint = ""
        if shape[1] == channels:
            hint = " It looks like NCHW (torch's layout): transpose with x.transpose(0, 2, 3, 1)."
        raise ValueError(f"expected NHWC images with {channels} channels last, got shape {shape}.{hint}")
    if size is not None and shape[1:3] != (size, size):
        raise ValueError(f"this model takes {size}x{size} images (its fc layer is sized for them), "
                         f"got {shape[1]}x{shape[2]}")


def _flatten(x: jax.Array) -> jax.Array:
    """``x.view(N, -1)`` after the 1x1 average pool (spatial dims are 1, so layout does not matter)."""
    return x.reshape(x.shape[0], -1)


# ----------------------------------------------------------------------------------------------- notebook 000
class PlainBlock(nnx.Module):
    """Two 3x3 conv-BN-ReLU layers, no skip connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False, rngs=rngs)
        self.bn1 = BatchNorm2d(out_channels, rngs=rngs)
        self.conv2 = Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False, rngs=rngs)
        self.bn2 = BatchNorm2d(out_channels, rngs=rngs)

    def __call__(self, x):
        out = relu(self.bn1(self.conv1(x)))
        return relu(self.bn2(self.conv2(out)))


class ResidualBlock(nnx.Module):
    """PlainBlock plus a skip connection; ``shortcut`` is empty or conv1x1 + BN, as in notebook 000."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False, rngs=rngs)
        self.bn1 = BatchNorm2d(out_channels, rngs=rngs)
        self.conv2 = Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False, rngs=rngs)
        self.bn2 = BatchNorm2d(out_channels, rngs=rngs)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nnx.Sequential(
                Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, rngs=rngs),
                BatchNorm2d(out_channels, rngs=rngs),
            )
        else:
            self.shortcut = nnx.Sequential()

    def __call__(self, x):
        identity = self.shortcut(x)
        out = relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return relu(out + identity)


class _ThreeStageCNN(nnx.Module):
    """The 16/32/64-channel CIFAR network of notebook 000; subclasses pick the block."""

    block: type[nnx.Module]

    def __init__(self, n_blocks: int = 3, *, rngs: nnx.Rngs):
        self.conv1 = Conv2d(3, 16, 3, stride=1, padding=1, bias=False, rngs=rngs)
        self.bn1 = BatchNorm2d(16, rngs=rngs)
        self.stage1 = self._make_stage(16, 16, n_blocks, 1, rngs)
        self.stage2 = self._make_stage(16, 32, n_blocks, 2, rngs)
        self.stage3 = self._make_stage(32, 64, n_blocks, 2, rngs)
        self.avgpool = adaptive_avg_pool_1x1
        self.fc = Linear(64, 10, rngs=rngs)

    def _make_stage(self, in_channels, out_channels, n_blocks, stride, rngs):
        blocks = [self.block(in_channels, out_channels, stride=stride, rngs=rngs)]
        for _ in range(1, n_blocks):
            blocks.append(self.block(out_channels, out_channels, stride=1, rngs=rngs))
        return nnx.Sequential(*blocks)

    def __call__(self, x):
        check_image_batch(x)
        out = relu(self.bn1(self.conv1(x)))
        out = self.stage1(out)
        out = self.stage2(out)
        out = self.stage3(out)
        return self.fc(_flatten(self.avgpool(out)))


class PlainDeepCNN(_ThreeStageCNN):
    """1 + 6n conv layers without skip connections (n=5: 31 layers)."""

    block = PlainBlock


class SimpleResNet(_ThreeStageCNN):
    """PlainDeepCNN with ResidualBlocks: n=3 is ResNet-20, n=5 ResNet-32."""

    block = ResidualBlock


# ----------------------------------------------------------------------------------------------- notebook 004
class _FourStageNet(nnx.Module):
    """The 64..512-channel stem and stages shared by PlainNet and ResNet."""

    def __init__(self, block, layers: Sequence[int], num_classes: int, *, rngs: nnx.Rngs):
        self.in_channels = 64
        self.conv1 = Conv2d(3, 64, 3, stride=1, padding=1, bias=False, rngs=rngs)
        self.bn1 = BatchNorm2d(64, rngs=rngs)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, rngs)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, rngs)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, rngs)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, rngs)
        self.avgpool = adaptive_avg_pool_1x1
        self.fc = Linear(512 * getattr(block, "expansion", 1), num_classes, rngs=rngs)

    def _stages(self):
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def __call__(self, x):
        check_image_batch(x)
        x = relu(self.bn1(self.conv1(x)))
        for stage in self._stages():
            x = stage(x)
        return self.fc(_flatten(self.avgpool(x)))


class PlainNet(_FourStageNet):
    """64..512-channel network without skip connections (shallow [1,1,1,1], deep [3,3,3,3])."""

    def __init__(self, block, num_blocks: Sequence[int], num_classes: int = 10, *, rngs: nnx.Rngs):
        super().__init__(block, num_blocks, num_classes, rngs=rngs)

    def _make_layer(self, block, out_channels, num_blocks, stride, rngs):
        layers = [block(self.in_channels, out_channels, stride, rngs=rngs)]
        self.in_channels = out_channels
        for _ in range(1, num_blocks):
            layers.append(block(out_channels, out_channels, rngs=rngs))
        return nnx.Sequential(*layers)


class BasicBlock(nnx.Module):
    """ResNet-18/34 block; the projection shortcut is passed in as ``downsample``."""

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 downsample: nnx.Module | None = None, *, rngs: nnx.Rngs):
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False, rngs=rngs)
        self.bn1 = BatchNorm2d(out_channels, rngs=rngs)
        self.conv2 = Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False, rngs=rngs)
        self.bn2 = BatchNorm2d(out_channels, rngs=rngs)
        self.downsample = downsample

    def __call__(self, x):
        identity = x
        out = relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return relu(out + identity)


class BottleneckBlock(nnx.Module):
    """ResNet-50 block: 1x1 reduce, 3x3 (with the stride), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 downsample: nnx.Module | None = None, *, rngs: nnx.Rngs):
        self.conv1 = Conv2d(in_channels, out_channels, 1, bias=False, rngs=rngs)
        self.bn1 = BatchNorm2d(out_channels, rngs=rngs)
        self.conv2 = Conv2d(out_channels, out_channels, 3, stride=stride, padding=1, bias=False, rngs=rngs)
        self.bn2 = BatchNorm2d(out_channels, rngs=rngs)
        self.conv3 = Conv2d(out_channels, out_channels * self.expansion, 1, bias=False, rngs=rngs)
        self.bn3 = BatchNorm2d(out_channels * self.expansion, rngs=rngs)
        self.downsample = downsample

    def __call__(self, x):
        identity = x
        out = relu(self.bn1(self.conv1(x)))
        out = relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return relu(out + identity)


class ResNet(_FourStageNet):
    """CIFAR ResNet (3x3 stem, stride 1, no max-pool) with the notebook's He initialisation."""

    def __init__(self, block, layers: Sequence[int], num_classes: int = 10, *, rngs: nnx.Rngs):
        super().__init__(block, layers, num_classes, rngs=rngs)
        self.relu = relu
        # The notebook re-initialises after construction: every conv kaiming_normal(fan_out), BN 1/0
        # (already Flax's BN default), the fc keeps torch's default.
        he_fan_out = kaiming_normal("fan_out")
        for _, module in nnx.iter_modules(self):
            if isinstance(module, nnx.Conv):
                kernel = module.kernel
                kernel[...] = he_fan_out(rngs.params(), kernel.shape, kernel.dtype)

    def _make_layer(self, block, out_channels, num_blocks, stride, rngs):
        downsample = None
        if stride != 1 or self.in_channels != out_channels * block.expansion:
            downsample = nnx.Sequential(
                Conv2d(self.in_channels, out_channels * block.expansion, 1, stride=stride, bias=False,
                       rngs=rngs),
                BatchNorm2d(out_channels * block.expansion, rngs=rngs),
            )
        layers = [block(self.in_channels, out_channels, stride, downsample, rngs=rngs)]
        self.in_channels = out_channels * block.expansion
        for _ in range(1, num_blocks):
            layers.append(block(self.in_channels, out_channels, rngs=rngs))
        return nnx.Sequential(*layers)


def ResNet18(*, rngs: nnx.Rngs) -> ResNet:  # noqa: N802 - the notebook's name
    return ResNet(BasicBlock, [2, 2, 2, 2], rngs=rngs)


def ResNet34(*, rngs: nnx.Rngs) -> ResNet:  # noqa: N802
    return ResNet(BasicBlock, [3, 4, 6, 3], rngs=rngs)


def ResNet50(*, rngs: nnx.Rngs) -> ResNet:  # noqa: N802
    return ResNet(BottleneckBlock, [3, 4, 6, 3], rngs=rngs)


class SimpleNet(nnx.Module):
    """The four-conv network of notebook 004's ``verify_he_init`` (He init, fc after an NCHW flatten)."""

    def __init__(self, *, rngs: nnx.Rngs):
        he_fan_out = kaiming_normal("fan_out")
        self.conv1 = Conv2d(3, 64, 3, padding=1, rngs=rngs, kernel_init=he_fan_out)
        self.conv2 = Conv2d(64, 64, 3, padding=1, rngs=rngs, kernel_init=he_fan_out)
        self.conv3 = Conv2d(64, 128, 3, padding=1, stride=2, rngs=rngs, kernel_init=he_fan_out)
        self.conv4 = Conv2d(128, 128, 3, padding=1, rngs=rngs, kernel_init=he_fan_out)
        self.fc = Linear(128 * 16 * 16, 10, rngs=rngs, kernel_init=kaiming_normal("fan_in"))

    def __call__(self, x):
        check_image_batch(x, size=32)
        x = relu(self.conv1(x))
        x = relu(self.conv2(x))
        x = relu(self.conv3(x))
        x = relu(self.conv4(x))
        # torch flattens NCHW (C, H, W order); keep that order so fc weights port with a plain transpose.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        return self.fc(x)


# ---------------------------------------------------------------------------------- notebook 004, ablation
class ResNetNoBN(ResNet):
    """Ablation: the ResNet with every BatchNorm replaced by ``Identity``, as the torch reference does."""

    def __init__(self, block, layers: Sequence[int], num_classes: int = 10, *, rngs: nnx.Rngs):
        super().__init__(block, layers, num_classes, rngs=rngs)
        for _, parent in list(nnx.iter_modules(self)):
            if isinstance(parent, nnx.Sequential):
                for i, child in enumerate(parent.layers):
                    if isinstance(child, nnx.BatchNorm):
                        parent.layers[i] = Identity()
            else:
                for name, child in list(vars(parent).items()):
                    if isinstance(child, nnx.BatchNorm):
                        setattr(parent, name, Identity())


class ResNetDropout(ResNet):
    """Ablation: the ResNet with dropout after each residual block (state_dict keys are the ResNet's)."""

    def __init__(self, block, layers: Sequence[int], num_classes: int = 10, p: float = 0.2, *,
                 rngs: nnx.Rngs):
        super().__init__(block, layers, num_classes, rngs=rngs)
        self.dropout = nnx.Dropout(p, rngs=rngs)

    def __call__(self, x):
        check_image_batch(x)
        x = relu(self.bn1(self.conv1(x)))
        for stage in self._stages():
            for block in stage.layers:
                x = self.dropout(block(x))
        return self.fc(_flatten(self.avgpool(x)))


def ResNet18NoBN(*, rngs: nnx.Rngs) -> ResNetNoBN:  # noqa: N802
    return ResNetNoBN(BasicBlock, [2, 2, 2, 2], rngs=rngs)


def ResNet18Dropout(p: float = 0.2, *, rngs: nnx.Rngs) -> ResNetDropout:  # noqa: N802
    return ResNetDropout(BasicBlock, [2, 2, 2, 2], p=p, rngs=rngs)
