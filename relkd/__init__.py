"""relkd: fused kernels for relation-based knowledge distillation in face
recognition. Losses compute cosine-similarity relations, informative-relation
mining and the loss tile by tile, forward and backward, without ever holding
the N x N (or N x M) relation matrix.

    import relkd
    loss = relkd.RADLoss(k=16)(student_emb, teacher_emb, labels)

See shared/SPEC.md (transcribed in relkd.reference) for the exact formulas.
"""
__version__ = "0.1.0"

from . import data, distributed, functional, metrics, ops, reference  # noqa: E402
from .banks import PrototypeBank, hardest_identities  # noqa: E402
from .functional import similarity_topk  # noqa: E402
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
    "hardest_identities", "RouteConstrainedTeacher", "functional", "reference", "ops",
    "distributed", "data", "metrics",
]
