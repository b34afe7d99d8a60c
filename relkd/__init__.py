"""relkd: fused kernels for relation-based knowledge distillation in face
recognition. Losses compute cosine-similarity relations, informative-relation
mining and the loss tile by tile, forward and backward, without ever holding
the N x N (or N x M) relation matrix.

    import relkd
    loss = relkd.RADLoss(k=16)(student_emb, teacher_emb, labels)

"SPEC §n" in the docstrings is section n of docs/SPEC.md, the exact formulas
(transcribed in relkd.reference).
"""
__version__ = "0.2.0"

from . import data, distributed, functional, metrics, ops, reference  # noqa: E402
from ._second_order import double_backward  # noqa: E402
from .banks import PrototypeBank, hardest_identities  # noqa: E402
from .functional import similarity_topk  # noqa: E402
from .ida import IDAScorer, ida_scores  # noqa: E402
from .ops import ExtensionWarning, FallbackWarning  # noqa: E402
from .losses import (  # noqa: E402
    CCKDLoss,
    CoupleFaceLoss,
    ECKDLoss,
    EKDLoss,
    ExclusivityLoss,
    FCDLoss,
    RADLoss,
    RKDLoss,
    SPLoss,
)
from .rco import RouteConstrainedTeacher  # noqa: E402

__all__ = [
    "__version__", "FCDLoss", "RADLoss", "CoupleFaceLoss", "EKDLoss", "CCKDLoss", "SPLoss",
    "RKDLoss", "ExclusivityLoss", "ECKDLoss", "similarity_topk", "PrototypeBank",
    "hardest_identities", "RouteConstrainedTeacher", "ida_scores", "IDAScorer",
    "FallbackWarning", "ExtensionWarning", "functional", "reference", "ops", "distributed",
    "data", "metrics", "double_backward",
]
