"""Drop-in nn.Module losses. Each is a thin wrapper over relkd.functional that
checks its options at construction (ValueError naming the option) and holds
state where the method has some (EKD's anchors).

Options common to the relation losses:

    detach_teacher  True: no gradient flows into ft (the teacher is frozen).
    backend         "auto": the fused kernels where compiled for the device,
                    else the reference with one FallbackWarning; "fused":
                    the kernels or an error; "reference": the transcription
                    of docs/SPEC.md (N x N memory).
    process_group   a torch.distributed group: relate each rank's rows to
                    the global batch of its ranks and return this rank's
                    share (SPEC §8; the shares sum to the single-process
                    loss). Pickled by name, shared by copy.deepcopy
                    (relkd/_group_state.py).
    gather          True: the same over the default group when
                    process_group is None.

Every module pickles, deep-copies and round-trips its state_dict.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import _validation as check
from . import functional as Fn
from ._group_state import ProcessGroupHolder

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["FCDLoss", "RADLoss", "CoupleFaceLoss", "EKDLoss", "CCKDLoss", "SPLoss", "RKDLoss",
           "ExclusivityLoss", "ECKDLoss"]

# What ExclusivityLoss / ECKDLoss take as the student's weights.
Weights = Union[Tensor, Iterable[Tensor], nn.Module]


class _Loss(ProcessGroupHolder, nn.Module):
    """Holds the options every loss shares: backend and, for batch relations,
    the process group of the global batch (SPEC §8). Subclasses list their
    own options in `_options` for extra_repr."""

    def __init__(self, backend: str = "auto", process_group: Optional[ProcessGroup] = None,
                 gather: bool = False):
        super().__init__()
        self.backend = check.backend(backend)
        self.process_group = process_group
        self.gather = check.flag(gather, "gather")

    def _dist(self) -> dict:
        return dict(backend=self.backend, process_group=self.process_group, gather=self.gather)

    def _options(self) -> List[Tuple[str, object]]:
        return []

    def extra_repr(self) -> str:
        """The options, as the constructor takes them (the group by name)."""
        options = self._options() + [("backend", self.backend), ("gather", self.gather)]
        group = self._process_group_repr()
        if group is not None:
            options.append(("process_group", group))
        return ", ".join(f"{name}={value!r}" for name, value in options)


class FCDLoss(_Loss):
    """Feature consistency distillation, SPEC §1: the distance of each
    student embedding to its teacher embedding.

    The feature-consistency term of Liu et al., "CoupleFace: Relation
    Matters for Face Recognition Distillation", ECCV 2022, and of Wang et
    al., "Exclusivity-Consistency Regularized Knowledge Distillation for
    Face Recognition", ECCV 2020. With x, z the L2-normalised rows of fs,
    ft: mean_i |x_i - z_i|^2 ("l2") or mean_i (1 - x_i . z_i) ("cosine").

    Args:
        metric: "l2" (default) or "cosine".
        normalize: L2-normalise the rows first (default True); False takes
            the raw embeddings.
        detach_teacher: True (default): no gradient flows into ft.
        backend: "auto", "fused" or "reference" (O(N*D) either way).
        process_group: return this rank's share of the global-batch mean.
        gather: True: the same over the default group.

    Forward:
        fs: (N, D) student embeddings; ft: (N, D) teacher embeddings.
        Returns a 0-dim loss (float32 for half inputs).
    """

    def __init__(self, metric: str = "l2", normalize: bool = True, *,
                 detach_teacher: bool = True, backend: str = "auto",
                 process_group: Optional[ProcessGroup] = None, gather: bool = False):
        """Checks the options (ValueError naming the option); see the class
        docstring for each argument."""
        super().__init__(backend, process_group, gather)
        self.metric = check.choice(metric, "metric", Fn.FCD_METRICS)
        self.normalize = check.flag(normalize, "normalize")
        self.detach_teacher = check.flag(detach_teacher, "detach_teacher")

    def _options(self) -> List[Tuple[str, object]]:
        return [("metric", self.metric), ("normalize", self.normalize),
                ("detach_teacher", self.detach_teacher)]

    def forward(self, fs: Tensor, ft: Tensor) -> Tensor:
        """The loss of student fs (N, D) against teacher ft (N, D)."""
        return Fn.fcd_loss(fs, ft, self.metric, self.normalize,
                           detach_teacher=self.detach_teacher, **self._dist())


class RADLoss(_Loss):
    """Relation-aware distillation over mined informative relations, SPEC §2.

    The mutual relation distillation of CoupleFace: Liu et al.,
    "CoupleFace: Relation Matters for Face Recognition Distillation",
    ECCV 2022. For each face, the k most similar other-identity candidates
    (by the teacher's or the student's cosine) are mined; the loss is the
    mean over the mined pairs of phi(s_ij - t_ij), with s, t the student's
    and teacher's cosines and phi = max(0, d - margin) ("hinge"), d^2 ("l2")
    or |d| ("l1"). The paper's equations are not public; the defaults
    follow the one public implementation of its idea.

    Args:
        k: relations mined per face (int >= 1, default 16).
        metric: "hinge" (default), "l2" or "l1".
        margin: the hinge's margin (default 0.03; unused by "l2" and "l1").
        mine_by: "teacher" (default) or "student": whose cosines pick the
            k hardest candidates.
        detach_teacher: True (default): no gradient flows into ft.
        backend: "auto", "fused" or "reference".
        process_group: relate each rank's faces to the global batch of the
            group's ranks; each rank returns its share.
        gather: True: the same over the default group.

    Forward:
        fs: (N, D) student embeddings; ft: (N, D') teacher embeddings (D'
            may differ from D in batch mode); y: optional (N,) integer
            labels, same-label candidates are never mined (in bank mode:
            together with bank_labels, else y warns once); bank: optional
            (M, D) rows to mine from instead of the batch (e.g.
            PrototypeBank.active()); bank_labels: optional (M,) labels of the
            bank (needs y); indices: optional (N, k) int64 precomputed
            neighbours (-1 = padding; e.g. hardest_identities(...)[y]),
            which skips mining. Returns a 0-dim loss.
    """

    def __init__(self, k: int = 16, metric: str = "hinge", margin: float = 0.03,
                 mine_by: str = "teacher", *, detach_teacher: bool = True,
                 backend: str = "auto", process_group: Optional[ProcessGroup] = None,
                 gather: bool = False):
        """Checks the options (ValueError naming the option); see the class
        docstring for each argument."""
        super().__init__(backend, process_group, gather)
        self.k = check.positive_int(k, "k")
        self.metric = check.choice(metric, "metric", Fn.RAD_METRICS)
        self.margin = check.number(margin, "margin")
        self.mine_by = check.choice(mine_by, "mine_by", Fn.MINE_BY)
        self.detach_teacher = check.flag(detach_teacher, "detach_teacher")

    def _options(self) -> List[Tuple[str, object]]:
        return [("k", self.k), ("metric", self.metric), ("margin", self.margin),
                ("mine_by", self.mine_by), ("detach_teacher", self.detach_teacher)]

    def _rad(self) -> dict:
        return dict(k=self.k, metric=self.metric, margin=self.margin, mine_by=self.mine_by,
                    detach_teacher=self.detach_teacher, **self._dist())

    def forward(self, fs: Tensor, ft: Tensor, y: Optional[Tensor] = None,
                bank: Optional[Tensor] = None, bank_labels: Optional[Tensor] = None,
                indices: Optional[Tensor] = None) -> Tensor:
        """The loss of fs (N, D) against ft (N, D'); see the class docstring
        for y (N,), bank (M, D), bank_labels (M,) and indices (N, k)."""
        return Fn.rad_loss(fs, ft, y, bank, bank_labels, indices, **self._rad())


class CoupleFaceLoss(RADLoss):
    """CoupleFace, SPEC §2: alpha * FCD(l2) + beta * RAD.

    Liu et al., "CoupleFace: Relation Matters for Face Recognition
    Distillation", ECCV 2022: feature consistency distillation (FCDLoss with
    metric "l2") plus mutual relation distillation (RADLoss).

    Args:
        alpha: weight of the feature-consistency term (default 1.0).
        beta: weight of the relation term (default 1.0).
        k: relations mined per face (int >= 1, default 16).
        metric: RAD's "hinge" (default), "l2" or "l1".
        margin: RAD's hinge margin (default 0.03).
        mine_by: "teacher" (default) or "student".
        detach_teacher: True (default): no gradient flows into ft.
        backend: "auto", "fused" or "reference".
        process_group: relate over the global batch of the group's ranks;
            each rank returns its share.
        gather: True: the same over the default group.

    Forward:
        fs: (N, D) student embeddings; ft: (N, D) teacher embeddings (the
            same dim, for the feature term); y, bank, bank_labels, indices:
            optional, as RADLoss.forward: (N,) labels, an (M, D) bank to
            mine from, its (M,) labels, (N, k) precomputed neighbours.
        Returns a 0-dim loss.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, *, k: int = 16,
                 metric: str = "hinge", margin: float = 0.03, mine_by: str = "teacher",
                 detach_teacher: bool = True, backend: str = "auto",
                 process_group: Optional[ProcessGroup] = None, gather: bool = False):
        """Checks the options (ValueError naming the option); see the class
        docstring for each argument."""
        super().__init__(k, metric, margin, mine_by, detach_teacher=detach_teacher,
                         backend=backend, process_group=process_group, gather=gather)
        self.alpha = check.number(alpha, "alpha")
        self.beta = check.number(beta, "beta")

    def _options(self) -> List[Tuple[str, object]]:
        return [("alpha", self.alpha), ("beta", self.beta)] + super()._options()

    def forward(self, fs: Tensor, ft: Tensor, y: Optional[Tensor] = None,
                bank: Optional[Tensor] = None, bank_labels: Optional[Tensor] = None,
                indices: Optional[Tensor] = None) -> Tensor:
        """The loss of fs (N, D) against ft (N, D); the other arguments as
        RADLoss.forward."""
        return Fn.coupleface_loss(fs, ft, y, bank, bank_labels, indices, alpha=self.alpha,
                                  beta=self.beta, **self._rad())


class EKDLoss(_Loss):
    """Evaluation-oriented knowledge distillation, SPEC §3.

    Huang et al., "Evaluation-oriented Knowledge Distillation for Deep Face
    Recognition", CVPR 2022. A rank-based loss on all positive pairs and the
    topk hardest negative pairs of the batch, ranks measured against EMA
    anchors at the thresholds of the FPR levels; equal (up to floating
    point) to the authors' code (Tencent/TFace).

    Args:
        topk: hardest negative pairs in the negative term (int >= 0,
            default 2000).
        temperature: of the rank sigmoids (> 0, default 0.01).
        fpr_levels: the FPR levels f whose thresholds anchor the ranks, each
            with 0 < f < 2/3 (default 1e-1 ... 1e-6).
        momentum: EMA rate of the anchors (default 0.01).
        pos_weight: weight of the positive-pair term (default 0.02).
        neg_weight: weight of the negative-pair term (default 0.01).
        backend: "auto", "fused" or "reference".
        process_group: global thresholds and top-k over the global batch
            of the group's ranks; each rank returns its share and holds the
            same anchors.
        gather: True: the same over the default group.

    Buffers (in state_dict): s_anchor, t_anchor, each (len(fpr_levels),),
    zeros at first, moved only in training mode.

    Forward:
        fs: (N, D) student embeddings; ft: (N, D') teacher embeddings;
        y: (N,) integer labels (required). Returns a 0-dim loss.
    """

    def __init__(self, topk: int = 2000, temperature: float = 0.01,
                 fpr_levels: Sequence[float] = Fn.DEFAULT_FPR_LEVELS, momentum: float = 0.01,
                 pos_weight: float = 0.02, neg_weight: float = 0.01, *,
                 backend: str = "auto", process_group: Optional[ProcessGroup] = None,
                 gather: bool = False):
        """Checks the options (ValueError naming the option); see the class
        docstring for each argument."""
        super().__init__(backend, process_group, gather)
        self.topk = check.non_negative_int(topk, "topk")
        self.temperature = check.number(temperature, "temperature", positive=True)
        self.fpr_levels = check.fpr_levels(fpr_levels)
        self.momentum = check.number(momentum, "momentum")
        self.pos_weight = check.number(pos_weight, "pos_weight")
        self.neg_weight = check.number(neg_weight, "neg_weight")
        self.register_buffer("s_anchor", torch.zeros(len(self.fpr_levels)))
        self.register_buffer("t_anchor", torch.zeros(len(self.fpr_levels)))

    def _options(self) -> List[Tuple[str, object]]:
        return [("topk", self.topk), ("temperature", self.temperature),
                ("fpr_levels", self.fpr_levels), ("momentum", self.momentum),
                ("pos_weight", self.pos_weight), ("neg_weight", self.neg_weight)]

    def forward(self, fs: Tensor, ft: Tensor, y: Tensor) -> Tensor:
        """The loss of fs (N, D) against ft (N, D') with labels y (N,); in
        training mode the anchors move first."""
        if self.training and _in_backward():
            raise RuntimeError(
                "EKDLoss: its forward runs inside a backward pass (activation "
                "checkpointing recomputes it there) in training mode, where it moves its "
                "anchors: they would move twice and the gradient would see the moved ones. "
                "Call the loss outside the checkpointed function, or checkpoint "
                "relkd.functional.ekd_loss with anchors you pass and update yourself.")
        loss, s_anchor, t_anchor = Fn.ekd_loss(
            fs, ft, y, self.s_anchor, self.t_anchor, training=self.training, topk=self.topk,
            temperature=self.temperature, fpr_levels=self.fpr_levels, momentum=self.momentum,
            pos_weight=self.pos_weight, neg_weight=self.neg_weight, **self._dist())
        if self.training:
            with torch.no_grad():
                self.s_anchor.copy_(s_anchor)
                self.t_anchor.copy_(t_anchor)
        return loss


def _in_backward() -> bool:
    """Whether this runs inside an autograd backward pass (e.g. activation
    checkpointing recomputing a forward). Eager only: under torch.compile
    the compiled graph decides recomputation itself."""
    if torch.compiler.is_compiling():
        return False
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class CCKDLoss(_Loss):
    """Correlation congruence, SPEC §4.

    Peng et al., "Correlation Congruence for Knowledge Distillation",
    ICCV 2019: (1/N^2) sum_{i,j} (phi(s_ij) - phi(t_ij))^2 over all pairs,
    phi the order-P Taylor expansion of the Gaussian RBF on unit vectors.

    Args:
        kernel: "gaussian" (default) or "bilinear" (phi(u) = u).
        gamma: the RBF's gamma (default 0.4).
        order: P, the Taylor order (int >= 0, default 2).
        detach_teacher: True (default): no gradient flows into ft.
        backend: "auto", "fused" or "reference".
        process_group: relate over the global batch of the group's ranks;
            each rank returns its share.
        gather: True: the same over the default group.

    Forward:
        fs: (N, D) student embeddings; ft: (N, D') teacher embeddings.
        Returns a 0-dim loss.
    """

    def __init__(self, kernel: str = "gaussian", gamma: float = 0.4, order: int = 2, *,
                 detach_teacher: bool = True, backend: str = "auto",
                 process_group: Optional[ProcessGroup] = None, gather: bool = False):
        """Checks the options (ValueError naming the option); see the class
        docstring for each argument."""
        super().__init__(backend, process_group, gather)
        self.kernel = check.choice(kernel, "kernel", Fn.CCKD_KERNELS)
        self.gamma = check.number(gamma, "gamma")
        self.order = check.non_negative_int(order, "order")
        self.detach_teacher = check.flag(detach_teacher, "detach_teacher")

    def _options(self) -> List[Tuple[str, object]]:
        return [("kernel", self.kernel), ("gamma", self.gamma), ("order", self.order),
                ("detach_teacher", self.detach_teacher)]

    def forward(self, fs: Tensor, ft: Tensor) -> Tensor:
        """The loss of fs (N, D) against ft (N, D')."""
        return Fn.cckd_loss(fs, ft, kernel=self.kernel, gamma=self.gamma, order=self.order,
                            detach_teacher=self.detach_teacher, **self._dist())


class SPLoss(_Loss):
    """Similarity-preserving distillation, SPEC §5.

    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019:
    (1/N^2) |rownorm(Fs Fs^T) - rownorm(Ft Ft^T)|_F^2 on the flattened,
    unnormalised features.

    Args:
        detach_teacher: True (default): no gradient flows into ft.
        backend: "auto", "fused" or "reference".
        process_group: relate over the global batch of the group's ranks;
            each rank returns its share.
        gather: True: the same over the default group.

    Forward:
        fs: (N, ...) student features; ft: (N, ...) teacher features (any
        trailing shape, flattened). Returns a 0-dim loss.
    """

    def __init__(self, *, detach_teacher: bool = True, backend: str = "auto",
                 process_group: Optional[ProcessGroup] = None, gather: bool = False):
        """Checks the options (ValueError naming the option); see the class
        docstring for each argument."""
        super().__init__(backend, process_group, gather)
        self.detach_teacher = check.flag(detach_teacher, "detach_teacher")

    def _options(self) -> List[Tuple[str, object]]:
        return [("detach_teacher", self.detach_teacher)]

    def forward(self, fs: Tensor, ft: Tensor) -> Tensor:
        """The loss of fs (N, ...) against ft (N, ...)."""
        return Fn.sp_loss(fs, ft, detach_teacher=self.detach_teacher, **self._dist())


class RKDLoss(_Loss):
    """Relational knowledge distillation, SPEC §6.

    Park et al., "Relational Knowledge Distillation", CVPR 2019:
    distance_weight * L_distance + angle_weight * L_angle on the raw
    embeddings, the teacher side without gradient. The angle term is O(N^3 D)
    work either way; the fused path takes its vertices a few at a time
    (O(N D + N^2) memory each, where the reference holds N x N x D
    differences and N x N x N angles).

    Args:
        distance_weight: weight of the distance term (default 25.0).
        angle_weight: weight of the angle term (default 50.0; 0 leaves the
            O(N^2 D) distance term alone).
        backend: "auto", "fused" or "reference".
        process_group: relate over the global batch of the group's ranks;
            each rank returns its share.
        gather: True: the same over the default group.

    Forward:
        fs: (N, D) student embeddings; ft: (N, D') teacher embeddings.
        Returns a 0-dim loss.
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, *,
                 backend: str = "auto", process_group: Optional[ProcessGroup] = None,
                 gather: bool = False):
        """Checks the options (ValueError naming the option); see the class
        docstring for each argument."""
        super().__init__(backend, process_group, gather)
        self.distance_weight = check.number(distance_weight, "distance_weight")
        self.angle_weight = check.number(angle_weight, "angle_weight")

    def _options(self) -> List[Tuple[str, object]]:
        return [("distance_weight", self.distance_weight),
                ("angle_weight", self.angle_weight)]

    def forward(self, fs: Tensor, ft: Tensor) -> Tensor:
        """The loss of fs (N, D) against ft (N, D')."""
        return Fn.rkd_loss(fs, ft, distance_weight=self.distance_weight,
                           angle_weight=self.angle_weight, **self._dist())


class ExclusivityLoss(_Loss):
    """Filter exclusivity, SPEC §7: the exclusivity term of EC-KD.

    Wang et al., "Exclusivity-Consistency Regularized Knowledge Distillation
    for Face Recognition", ECCV 2020. Summed over weights, of each weight
    flattened to (F, P) with L2-normalised rows:
    (1/(F(F-1))) sum_{i != j} sum_p |w_ip| |w_jp|. The paper's exact form is
    not public; this one is relkd's.

    Args:
        backend: "auto", "fused" or "reference" (O(F*P) either way).
        process_group: every rank computes the same term; each returns
            1/world of it, so that the shares sum to the loss.
        gather: True: the same over the default group.

    Forward:
        weights: a weight tensor (F, ...), a sequence of them, or an
        nn.Module (every Conv/Linear weight). Returns a 0-dim loss.
    """

    def __init__(self, *, backend: str = "auto", process_group: Optional[ProcessGroup] = None,
                 gather: bool = False):
        """Checks the options (ValueError naming the option); see the class
        docstring for each argument."""
        super().__init__(backend, process_group, gather)

    def forward(self, weights: Weights) -> Tensor:
        """The exclusivity of `weights`: a tensor, tensors or an nn.Module."""
        return Fn.exclusivity_loss(weights, **self._dist())


class ECKDLoss(_Loss):
    """Exclusivity-consistency regularised distillation, SPEC §7:
    FCD(l2) + lam * Exclusivity(student weights).

    Wang et al., "Exclusivity-Consistency Regularized Knowledge Distillation
    for Face Recognition", ECCV 2020. The paper's exact weighting is not
    public; lam=1.0 is relkd's default.

    Args:
        lam: weight of the exclusivity term (default 1.0).
        detach_teacher: True (default): no gradient flows into ft.
        backend: "auto", "fused" or "reference".
        process_group: the feature term's global-batch share, and 1/world
            of the exclusivity term, on each rank.
        gather: True: the same over the default group.

    Forward:
        fs: (N, D) student embeddings; ft: (N, D) teacher embeddings;
        weights: the student's weights, as ExclusivityLoss.forward takes
        them. Returns a 0-dim loss.
    """

    def __init__(self, lam: float = 1.0, *, detach_teacher: bool = True,
                 backend: str = "auto", process_group: Optional[ProcessGroup] = None,
                 gather: bool = False):
        """Checks the options (ValueError naming the option); see the class
        docstring for each argument."""
        super().__init__(backend, process_group, gather)
        self.lam = check.number(lam, "lam")
        self.detach_teacher = check.flag(detach_teacher, "detach_teacher")

    def _options(self) -> List[Tuple[str, object]]:
        return [("lam", self.lam), ("detach_teacher", self.detach_teacher)]

    def forward(self, fs: Tensor, ft: Tensor, weights: Weights) -> Tensor:
        """The loss of fs (N, D) against ft (N, D) plus the exclusivity of
        the student's `weights`."""
        fcd = Fn.fcd_loss(fs, ft, "l2", True, detach_teacher=self.detach_teacher,
                          **self._dist())
        return fcd + self.lam * Fn.exclusivity_loss(weights, **self._dist())
