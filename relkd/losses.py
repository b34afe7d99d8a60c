"""Drop-in nn.Module losses. Each is a thin wrapper over relkd.functional that
checks its options at construction (ValueError naming the option) and holds
state where the method has some (EKD's anchors)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import _validation as check
from . import functional as Fn

__all__ = ["FCDLoss", "RADLoss", "CoupleFaceLoss", "EKDLoss", "CCKDLoss", "SPLoss", "RKDLoss",
           "ExclusivityLoss", "ECKDLoss"]


class _Loss(nn.Module):
    """Holds the options every loss shares: backend and, for batch relations,
    the process group of the global batch (SPEC §8)."""

    def __init__(self, backend: str = "auto", process_group=None, gather: bool = False):
        super().__init__()
        self.backend = check.backend(backend)
        self.process_group = process_group
        self.gather = bool(gather)

    def _dist(self) -> dict:
        return dict(backend=self.backend, process_group=self.process_group, gather=self.gather)


class FCDLoss(_Loss):
    """Feature consistency distillation (CoupleFace, EC-KD), SPEC §1:
    mean_i |x_i - z_i|^2 ("l2") or mean_i (1 - x_i . z_i) ("cosine") of the
    L2-normalised (N, D) embeddings (raw with normalize=False)."""

    def __init__(self, metric: str = "l2", normalize: bool = True, *,
                 detach_teacher: bool = True, backend: str = "auto", process_group=None,
                 gather: bool = False):
        super().__init__(backend, process_group, gather)
        self.metric = check.choice(metric, "metric", Fn.FCD_METRICS)
        self.normalize = bool(normalize)
        self.detach_teacher = bool(detach_teacher)

    def forward(self, fs: Tensor, ft: Tensor) -> Tensor:
        return Fn.fcd_loss(fs, ft, self.metric, self.normalize,
                           detach_teacher=self.detach_teacher, **self._dist())


class RADLoss(_Loss):
    """Relation-aware distillation over mined informative relations
    (CoupleFace), SPEC §2: mean over the k mined pairs per row of
    phi(s_ij - t_ij), phi = max(0, d - margin) | d^2 | |d|.

    forward(fs (N, D), ft (N, D'), y=None (N,), bank=None (M, D),
    bank_labels=None (M,), indices=None (N, k) int64, -1 = padding)."""

    def __init__(self, k: int = 16, metric: str = "hinge", margin: float = 0.03,
                 mine_by: str = "teacher", *, detach_teacher: bool = True,
                 backend: str = "auto", process_group=None, gather: bool = False):
        super().__init__(backend, process_group, gather)
        self.k = check.positive_int(k, "k")
        self.metric = check.choice(metric, "metric", Fn.RAD_METRICS)
        self.margin = check.number(margin, "margin")
        self.mine_by = check.choice(mine_by, "mine_by", Fn.MINE_BY)
        self.detach_teacher = bool(detach_teacher)

    def _rad(self) -> dict:
        return dict(k=self.k, metric=self.metric, margin=self.margin, mine_by=self.mine_by,
                    detach_teacher=self.detach_teacher, **self._dist())

    def forward(self, fs: Tensor, ft: Tensor, y: Optional[Tensor] = None,
                bank: Optional[Tensor] = None, bank_labels: Optional[Tensor] = None,
                indices: Optional[Tensor] = None) -> Tensor:
        return Fn.rad_loss(fs, ft, y, bank, bank_labels, indices, **self._rad())


class CoupleFaceLoss(RADLoss):
    """CoupleFace, SPEC §2: alpha * FCD(l2) + beta * RAD (RAD options as
    RADLoss). forward as RADLoss; fs and ft must share their dim."""

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, **rad_kwargs):
        super().__init__(**rad_kwargs)
        self.alpha = check.number(alpha, "alpha")
        self.beta = check.number(beta, "beta")

    def forward(self, fs: Tensor, ft: Tensor, y: Optional[Tensor] = None,
                bank: Optional[Tensor] = None, bank_labels: Optional[Tensor] = None,
                indices: Optional[Tensor] = None) -> Tensor:
        return Fn.coupleface_loss(fs, ft, y, bank, bank_labels, indices, alpha=self.alpha,
                                  beta=self.beta, **self._rad())


class EKDLoss(_Loss):
    """Evaluation-oriented knowledge distillation (EKD, CVPR 2022), SPEC §3:
    rank-based loss on all positive pairs and the topk hardest negatives,
    ranks measured against EMA anchors at the FPR levels' thresholds.

    Buffers s_anchor, t_anchor (len(fpr_levels),), moved only in training
    mode. forward(fs (N, D), ft (N, D'), y (N,)) -> loss."""

    def __init__(self, topk: int = 2000, temperature: float = 0.01,
                 fpr_levels: Sequence[float] = Fn.DEFAULT_FPR_LEVELS, momentum: float = 0.01,
                 pos_weight: float = 0.02, neg_weight: float = 0.01, *,
                 backend: str = "auto", process_group=None, gather: bool = False):
        super().__init__(backend, process_group, gather)
        self.topk = check.non_negative_int(topk, "topk")
        self.temperature = check.number(temperature, "temperature", positive=True)
        self.fpr_levels = check.fpr_levels(fpr_levels)
        self.momentum = check.number(momentum, "momentum")
        self.pos_weight = check.number(pos_weight, "pos_weight")
        self.neg_weight = check.number(neg_weight, "neg_weight")
        self.register_buffer("s_anchor", torch.zeros(len(self.fpr_levels)))
        self.register_buffer("t_anchor", torch.zeros(len(self.fpr_levels)))

    def forward(self, fs: Tensor, ft: Tensor, y: Tensor) -> Tensor:
        loss, s_anchor, t_anchor = Fn.ekd_loss(
            fs, ft, y, self.s_anchor, self.t_anchor, training=self.training, topk=self.topk,
            temperature=self.temperature, fpr_levels=self.fpr_levels, momentum=self.momentum,
            pos_weight=self.pos_weight, neg_weight=self.neg_weight, **self._dist())
        if self.training:
            with torch.no_grad():
                self.s_anchor.copy_(s_anchor)
                self.t_anchor.copy_(t_anchor)
        return loss


class CCKDLoss(_Loss):
    """Correlation congruence (CCKD, ICCV 2019), SPEC §4:
    (1/N^2) sum_{i,j} (phi(s_ij) - phi(t_ij))^2, phi the order-P Taylor
    expansion of the Gaussian RBF (or u for kernel="bilinear").
    forward(fs (N, D), ft (N, D'))."""

    def __init__(self, kernel: str = "gaussian", gamma: float = 0.4, order: int = 2, *,
                 detach_teacher: bool = True, backend: str = "auto", process_group=None,
                 gather: bool = False):
        super().__init__(backend, process_group, gather)
        self.kernel = check.choice(kernel, "kernel", Fn.CCKD_KERNELS)
        self.gamma = check.number(gamma, "gamma")
        self.order = check.non_negative_int(order, "order")
        self.detach_teacher = bool(detach_teacher)

    def forward(self, fs: Tensor, ft: Tensor) -> Tensor:
        return Fn.cckd_loss(fs, ft, kernel=self.kernel, gamma=self.gamma, order=self.order,
                            detach_teacher=self.detach_teacher, **self._dist())


class SPLoss(_Loss):
    """Similarity-preserving distillation (SP, ICCV 2019), SPEC §5:
    (1/N^2) |rownorm(Fs Fs^T) - rownorm(Ft Ft^T)|_F^2 on flattened features.
    forward(fs (N, ...), ft (N, ...))."""

    def __init__(self, *, detach_teacher: bool = True, backend: str = "auto",
                 process_group=None, gather: bool = False):
        super().__init__(backend, process_group, gather)
        self.detach_teacher = bool(detach_teacher)

    def forward(self, fs: Tensor, ft: Tensor) -> Tensor:
        return Fn.sp_loss(fs, ft, detach_teacher=self.detach_teacher, **self._dist())


class RKDLoss(_Loss):
    """Relational knowledge distillation (RKD, CVPR 2019), SPEC §6:
    distance_weight * L_distance + angle_weight * L_angle on raw embeddings.
    The fused path has the distance term only: with angle_weight != 0,
    backend="auto" runs the O(N^3) reference. forward(fs (N, D), ft (N, D'))."""

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, *,
                 backend: str = "auto", process_group=None, gather: bool = False):
        super().__init__(backend, process_group, gather)
        self.distance_weight = check.number(distance_weight, "distance_weight")
        self.angle_weight = check.number(angle_weight, "angle_weight")

    def forward(self, fs: Tensor, ft: Tensor) -> Tensor:
        return Fn.rkd_loss(fs, ft, distance_weight=self.distance_weight,
                           angle_weight=self.angle_weight, **self._dist())


class ExclusivityLoss(_Loss):
    """Filter exclusivity (EC-KD), SPEC §7, summed over weights:
    (1/(F(F-1))) sum_{i != j} sum_p |w_ip| |w_jp| of row-normalised (F, P).
    forward(weights): a tensor, a list of tensors, or an nn.Module (every
    Conv/Linear weight)."""

    def __init__(self, *, backend: str = "auto", process_group=None, gather: bool = False):
        super().__init__(backend, process_group, gather)

    def forward(self, weights) -> Tensor:
        return Fn.exclusivity_loss(weights, **self._dist())


class ECKDLoss(_Loss):
    """Exclusivity-consistency KD (EC-KD), SPEC §7: FCD(l2) + lam *
    Exclusivity(student weights). forward(fs (N, D), ft (N, D), weights).
    The paper's exact weighting is not public; lam=1.0 is relkd's default."""

    def __init__(self, lam: float = 1.0, *, detach_teacher: bool = True,
                 backend: str = "auto", process_group=None, gather: bool = False):
        super().__init__(backend, process_group, gather)
        self.lam = check.number(lam, "lam")
        self.detach_teacher = bool(detach_teacher)

    def forward(self, fs: Tensor, ft: Tensor, weights) -> Tensor:
        fcd = Fn.fcd_loss(fs, ft, "l2", True, detach_teacher=self.detach_teacher,
                          **self._dist())
        return fcd + self.lam * Fn.exclusivity_loss(weights, **self._dist())
