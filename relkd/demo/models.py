"""The demo's networks: a ResNet-style teacher, a much smaller plain CNN
student, and the CosFace margin-softmax head both are trained with."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ResNetTeacher", "StudentCNN", "CosFaceHead", "count_macs"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18's block)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def _embedding_head(channels: int, dim: int) -> nn.Sequential:
    """Face-recognition output ("BN-Flatten-FC-BN", as ArcFace's): keeps the
    spatial layout instead of average pooling it away."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.BatchNorm2d(channels), nn.Flatten(),
                         nn.Linear(channels * 16, dim), nn.BatchNorm1d(dim))


class ResNetTeacher(nn.Module):
    """A small ResNet: a stride-2 stem, then one stage of BasicBlocks per
    width, each stage after the first halving the resolution."""

    def __init__(self, embedding_dim: int = 128, widths: Sequence[int] = (32, 64, 128),
                 blocks: Sequence[int] = (1, 1, 1), in_channels: int = 1):
        super().__init__()
        layers = [nn.Conv2d(in_channels, widths[0], 3, 2, 1, bias=False),
                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        cin = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for b in range(count):
                layers.append(BasicBlock(cin, width, 2 if stage > 0 and b == 0 else 1))
                cin = width
        self.features = nn.Sequential(*layers)
        self.head = _embedding_head(cin, embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class StudentCNN(nn.Module):
    """Four plain 3x3 conv-BN-ReLU layers (strides 2, 1, 2, 2) and the same
    embedding head as the teacher."""

    def __init__(self, embedding_dim: int = 128, widths: Sequence[int] = (8, 16, 32, 64),
                 in_channels: int = 1):
        super().__init__()
        layers, cin = [], in_channels
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(cin, width, 3, 1 if i == 1 else 2, 1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.head = _embedding_head(cin, embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class CosFaceHead(nn.Module):
    """Large-margin cosine loss (CosFace): cross-entropy of
    scale * (cos(theta_j) - margin * [j == y]) over identity centres."""

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 30.0,
                 margin: float = 0.35):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cos = F.normalize(embeddings.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).t()
        cos = cos - self.margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return F.cross_entropy(self.scale * cos, labels)


@torch.no_grad()
def count_macs(net: nn.Module, input_shape: Tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one input (convolutions
    and linear layers, which are all but a few percent of the work)."""
    total = 0

    def hook(module, _inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = (module.in_channels // module.groups) * module.kernel_size[0] \
                * module.kernel_size[1]
            total += output[0].numel() * per_output
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    was_training = net.training
    try:
        net.eval()
        device = next(net.parameters()).device
        net(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return total
