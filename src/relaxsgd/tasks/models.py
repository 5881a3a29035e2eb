"""Model factories in plain torch (no torchvision), shared by every task.

Contract: every model maps a batch ``(B, *in_shape)`` (or the same batch flattened to
``(B, prod(in_shape))``) to logits ``(B, classes)``; no dropout (training is
deterministic for a seed); no buffers except BatchNorm's (``resnet20(norm="bn")``), which
the simulator stacks over the workers beside the parameters to run them with
``torch.func.vmap`` (see ``bank.py``).

- ``logreg``: one linear layer on the flattened input.
- ``mlp``: flattened input, ReLU hidden layers.
- ``cnn``: two 5x5 convolutions (32 and 64 channels), each followed by ReLU and a 2x
  max-pool, then FC 128 and the output layer (the classic MNIST CNN, over 99% on MNIST);
  a 1-D version (kernel 5) for sequences such as MNIST-1D.
- ``resnet20``: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
  section 4.2 (CIFAR ResNet with 3 stages of 3 basic blocks, 16/32/64 channels,
  0.27M parameters), option A shortcuts (identity, stride-2 subsampling and zero channel
  padding: parameter-free); BatchNorm or GroupNorm (Hsieh et al., ICML 2020, showed
  GroupNorm keeps non-IID decentralised training working where BatchNorm fails).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

MODELS = ("logreg", "mlp", "cnn", "resnet20")


class Reshape(nn.Module):
    """Reshape each sample to ``shape`` (keeps the batch dimension); no parameters."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


def logreg(in_features: int, classes: int) -> nn.Module:
    """Multinomial logistic regression: flatten, then one affine layer to the logits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, classes))


def mlp(in_features: int, classes: int, hidden: Sequence[int] = (128,)) -> nn.Module:
    """Fully connected ReLU network with the given hidden widths on the flattened input."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def cnn(in_shape: Sequence[int], classes: int) -> nn.Module:
    """Small CNN; ``in_shape`` is ``(C, H, W)`` (2-D convolutions), ``(C, L)`` or ``(L,)``
    (1-D convolutions, one channel for ``(L,)``)."""
    shape = tuple(int(s) for s in in_shape)
    if len(shape) == 1:
        shape = (1, shape[0])
    if len(shape) == 2:
        conv, pool, spatial = nn.Conv1d, nn.MaxPool1d, (shape[1] // 4,)
    elif len(shape) == 3:
        conv, pool, spatial = nn.Conv2d, nn.MaxPool2d, (shape[1] // 4, shape[2] // 4)
    else:
        raise ConfigError(f"model 'cnn' needs an input shape (C, H, W), (C, L) or (L,), "
                          f"not {shape}")
    if min(spatial) < 1:
        raise ConfigError(f"model 'cnn' needs inputs of at least 4 along each axis, "
                          f"not {shape}")
    return nn.Sequential(
        Reshape(shape),  # accepts flattened inputs too
        conv(shape[0], 32, 5, padding=2), nn.ReLU(), pool(2),
        conv(32, 64, 5, padding=2), nn.ReLU(), pool(2),
        nn.Flatten(), nn.Linear(64 * math.prod(spatial), 128), nn.ReLU(),
        nn.Linear(128, classes))


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "bn" else nn.GroupNorm(groups, channels)


class _Block(nn.Module):
    """Basic residual block: 3x3 conv, norm, ReLU, 3x3 conv, norm, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm(norm, cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm(norm, cout, groups)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        short = x
        if self.stride != 1 or self.pad:  # option A: subsample, zero-pad the new channels
            short = x[:, :, ::self.stride, ::self.stride]
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016); see :func:`resnet20`."""

    def __init__(self, classes: int, norm: str, in_channels: int, groups: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.n0 = _norm(norm, 16, groups)
        blocks: list[nn.Module] = []
        cin = 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(3):
                blocks.append(_Block(cin, cout, 2 if stage > 0 and i == 0 else 1, norm, groups))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.n0(self.stem(x)))
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))  # global average pooling


def resnet20(classes: int, norm: str = "bn", in_channels: int = 3,
             gn_groups: int = 2) -> nn.Module:
    """ResNet-20 for 32x32 images; ``norm`` "bn" (BatchNorm, has buffers) or "gn"
    (GroupNorm with ``gn_groups`` in 2, 4 or 8 groups: buffer-free)."""
    if norm not in ("bn", "gn"):
        raise ConfigError(f"resnet20 norm {norm!r} is not valid; choose one of: bn, gn")
    if norm == "gn" and gn_groups not in (2, 4, 8):
        raise ConfigError(f"resnet20 gn_groups={gn_groups!r} is not valid; choose 2, 4 or 8")
    return ResNet20(classes, norm, in_channels, gn_groups)


def build_model(name: str, in_shape: Sequence[int], classes: int, **kw: object) -> nn.Module:
    """A fresh model ``name`` for inputs of per-sample shape ``in_shape``.

    Keyword options: ``hidden`` (mlp), ``norm`` and ``gn_groups`` (resnet20).
    """
    in_features = math.prod(in_shape)
    if name == "logreg":
        return logreg(in_features, classes)
    if name == "mlp":
        return mlp(in_features, classes, **kw)  # type: ignore[arg-type]
    if name == "cnn":
        return cnn(in_shape, classes)
    if name == "resnet20":
        if len(in_shape) != 3:
            raise ConfigError(f"model 'resnet20' needs image inputs (C, H, W), not "
                              f"{tuple(in_shape)}")
        return resnet20(classes, in_channels=int(in_shape[0]), **kw)  # type: ignore[arg-type]
    raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")


def model_factory(name: str, in_shape: Sequence[int], classes: int,
                  **kw: object) -> Callable[[], nn.Module]:
    """A picklable zero-argument factory for :func:`build_model` (built once now, on the
    meta device, so a bad name or shape fails at task build time, not in a worker, and a
    model too large for the machine is refused by the run's check, not allocated)."""
    with torch.device("meta"):
        build_model(name, in_shape, classes, **kw)
    return partial(build_model, name, tuple(in_shape), classes, **kw)


def batching_for(name: str) -> str:
    """The simulator's batching preference: vmap pays only for small dense models."""
    return "vmap" if name in ("logreg", "mlp") else "loop"
