"""relkd demo: distil a small face-embedding student from a fixed teacher with
each relkd loss, on synthetic data, and compare verification accuracy.

Run from the repository root:

    python3 examples/demo.py        (or: make demo)

Synthetic "faces": each identity is a random point in a latent space; an
image is that point plus within-identity variation, mixed with a nuisance
factor (pose, lighting) by a fixed random nonlinear "camera", plus pixel
noise. A teacher MLP is trained with a CosFace classifier on 1000 identities
and frozen. For each loss, the same freshly initialised student MLP is then
trained against the teacher for 300 steps, on the same batches drawn from 200
of those identities, and verified on 100 identities neither network has seen,
as in face recognition. Two reference rows: the untrained student, and the
student trained on the labels alone (CosFace, no teacher).

Printed per loss: the loss at the start and end of training and the student's
verification accuracy next to the teacher's on the same pairs. CPU only;
fixed seeds, so a rerun prints the same table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import relkd

# Data
LATENT_DIM = 32       # identity latent
NUISANCE_DIM = 8      # pose / lighting latent
IMAGE_DIM = 64        # "image" features seen by the networks
TEACHER_IDS = 1000    # the teacher is pretrained on more identities than ...
STUDENT_IDS = 200     # ... the student's distillation set (its first 200)
IMAGES_PER_TRAIN_ID = 24
TEST_IDS, TEST_IMAGES_PER_ID = 100, 10
WITHIN_ID_STD, NUISANCE_STD, PIXEL_NOISE_STD = 0.6, 2.0, 0.1

# Training
EMBED_DIM = 128                     # teacher and student: FCD / ECKD need equal dims
TEACHER_WIDTH, STUDENT_WIDTH = 256, 128  # hidden layers: teacher 2, student 1
BATCH_IDS, BATCH_IMAGES_PER_ID = 64, 4  # 256 rows; every label has positives
TEACHER_STEPS, STUDENT_STEPS = 400, 300
LEARNING_RATE = 1e-3
CURVE_WINDOW = 10                   # loss start/end = mean of the first/last 10 steps


# ----------------------------------------------------------------------- data
def make_camera(gen: torch.Generator) -> nn.Module:
    """A fixed random nonlinear map (identity latent, nuisance) -> image, with
    weights ~ N(0, 1/fan_in) so its tanh is neither linear nor fully saturated."""
    camera = nn.Sequential(nn.Linear(LATENT_DIM + NUISANCE_DIM, 256), nn.Tanh(),
                           nn.Linear(256, IMAGE_DIM))
    with torch.no_grad():
        for layer in (camera[0], camera[2]):
            fan_in = layer.weight.shape[1]
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) / fan_in ** 0.5)
            layer.bias.zero_()
    return camera.requires_grad_(False)


@torch.no_grad()
def render_faces(camera: nn.Module, n_ids: int, per_id: int,
                 gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Images of n_ids new identities, per_id each, and their labels."""
    centres = torch.randn(n_ids, LATENT_DIM, generator=gen)
    labels = torch.arange(n_ids).repeat_interleave(per_id)
    identity = centres[labels] + WITHIN_ID_STD * torch.randn(len(labels), LATENT_DIM,
                                                             generator=gen)
    nuisance = NUISANCE_STD * torch.randn(len(labels), NUISANCE_DIM, generator=gen)
    images = camera(torch.cat([identity, nuisance], dim=1))
    images += PIXEL_NOISE_STD * torch.randn(images.shape, generator=gen)
    return images, labels


def sample_batch(labels: Tensor, n_ids: int, gen: torch.Generator) -> Tensor:
    """Row indices of BATCH_IDS identities x BATCH_IMAGES_PER_ID images each, so
    every label in the batch has positives (RAD, EKD need them)."""
    ids = torch.randperm(n_ids, generator=gen)[:BATCH_IDS]
    per_id = len(labels) // n_ids  # labels are grouped: id i owns rows i*per_id ...
    picks = torch.rand(BATCH_IDS, per_id, generator=gen).argsort(dim=1)[:, :BATCH_IMAGES_PER_ID]
    return (ids[:, None] * per_id + picks).flatten()


# ------------------------------------------------------------------- networks
def make_teacher() -> nn.Module:
    """Deeper and wider than the student: two hidden layers."""
    return nn.Sequential(nn.Linear(IMAGE_DIM, TEACHER_WIDTH), nn.ReLU(),
                         nn.Linear(TEACHER_WIDTH, TEACHER_WIDTH), nn.ReLU(),
                         nn.Linear(TEACHER_WIDTH, EMBED_DIM))


def make_student() -> nn.Module:
    """The same initial student for every loss, so the comparison is fair."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(IMAGE_DIM, STUDENT_WIDTH), nn.ReLU(),
                         nn.Linear(STUDENT_WIDTH, EMBED_DIM))


class CosFaceHead(nn.Module):
    """Large-margin cosine classifier (CosFace): how face teachers are trained."""

    def __init__(self, n_classes: int, scale: float = 30.0, margin: float = 0.25):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, EMBED_DIM) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, emb: Tensor, y: Tensor) -> Tensor:
        cos = F.normalize(emb, dim=1) @ F.normalize(self.weight, dim=1).t()
        cos = cos - self.margin * F.one_hot(y, cos.shape[1])
        return F.cross_entropy(self.scale * cos, y)


def train(net: nn.Module, loss_fn, images: Tensor, labels: Tensor, n_ids: int, steps: int,
          extra_params=()) -> list[float]:
    """Adam on P x K batches; loss_fn(embeddings, batch_rows) -> loss. The batch
    generator is reseeded so every run sees the same batches."""
    gen = torch.Generator().manual_seed(2)
    params = list(net.parameters()) + list(extra_params)
    optimiser = torch.optim.Adam(params, lr=LEARNING_RATE)
    curve = []
    for _ in range(steps):
        rows = sample_batch(labels, n_ids, gen)
        loss = loss_fn(net(images[rows]), rows)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        curve.append(loss.item())
    return curve


def train_with_labels(net: nn.Module, images: Tensor, labels: Tensor, n_ids: int,
                      steps: int) -> list[float]:
    """Classification training with a CosFace head, discarded afterwards."""
    head = CosFaceHead(n_ids)
    return train(net, lambda emb, rows: head(emb, labels[rows]), images, labels, n_ids, steps,
                 extra_params=head.parameters())


# ----------------------------------------------------------------- evaluation
def verification_pairs(labels: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Every genuine pair of the test set and as many random impostor pairs."""
    i, j = torch.triu_indices(len(labels), len(labels), offset=1)
    genuine = labels[i] == labels[j]
    impostors = torch.randperm(int((~genuine).sum()), generator=gen)[:int(genuine.sum())]
    a = torch.cat([i[genuine], i[~genuine][impostors]])
    b = torch.cat([j[genuine], j[~genuine][impostors]])
    return a, b, labels[a] == labels[b]


@torch.no_grad()
def verification_accuracy(net: nn.Module, images: Tensor, pairs) -> float:
    """Best-threshold accuracy of cosine-similarity verification (LFW protocol
    without the folds): the fraction of pairs decided right at the threshold
    that decides most pairs right."""
    a, b, same = pairs
    emb = F.normalize(net(images), dim=1)
    scores = (emb[a] * emb[b]).sum(dim=1)
    same_sorted = same[scores.argsort(descending=True)].float()
    # Threshold after the k-th highest score: pairs above are "same".
    accepted_genuine = torch.cat([torch.zeros(1), same_sorted.cumsum(0)])
    accepted_impostor = torch.arange(len(same) + 1) - accepted_genuine
    correct = accepted_genuine + (len(same) - same.sum()) - accepted_impostor
    return (correct.max() / len(same)).item()


# --------------------------------------------------------------------- losses
# (name, non-default options shown in the table, constructor). A fresh module
# per run: EKD keeps EMA anchors. Under Adam, whose step size does not scale
# with the gradient, EKD's small default weights (0.02, 0.01) need no boost.
DISTILLATION_LOSSES = [
    ("FCD", "", relkd.FCDLoss),
    ("RAD", "", relkd.RADLoss),
    ("CoupleFace", "", relkd.CoupleFaceLoss),
    ("EKD", "", relkd.EKDLoss),
    ("CCKD", "", relkd.CCKDLoss),
    ("SP", "", relkd.SPLoss),
    # The distance term only, which the fused kernel covers (angle is O(N^3)).
    ("RKD", "angle_weight=0", lambda: relkd.RKDLoss(angle_weight=0.0)),
    ("ECKD", "", relkd.ECKDLoss),
]


def distillation_loss(loss: nn.Module, fs: Tensor, ft: Tensor, y: Tensor,
                      student: nn.Module) -> Tensor:
    """Calls each loss with the inputs it takes besides (fs, ft)."""
    if isinstance(loss, (relkd.RADLoss, relkd.EKDLoss)):  # CoupleFaceLoss is a RADLoss
        return loss(fs, ft, y)
    if isinstance(loss, relkd.ECKDLoss):  # regularises the student's own weights
        return loss(fs, ft, student)
    return loss(fs, ft)


# --------------------------------------------------------------------- report
def print_table(rows, teacher_acc: float, n_pairs: int) -> None:
    print(f"relkd demo: student MLP {IMAGE_DIM}-{STUDENT_WIDTH}-{EMBED_DIM} distilled from "
          f"teacher MLP {IMAGE_DIM}-{TEACHER_WIDTH}-{TEACHER_WIDTH}-{EMBED_DIM}")
    print(f"verified on {TEST_IDS} unseen identities ({n_pairs} pairs, half genuine); "
          f"acc = best-threshold verification accuracy")
    print(f"loss start/end = mean of the first/last {CURVE_WINDOW} steps; "
          f"Adam lr {LEARNING_RATE}, batch {BATCH_IDS} ids x {BATCH_IMAGES_PER_ID} images\n")
    print(f"{'loss':<15}{'notes':<20}{'steps':>6}   {'loss start -> end':<22}"
          f"{'student acc':>11}{'teacher acc':>13}")
    for name, note, steps, curve, acc in rows:
        if curve is None:
            span = f"{'-':^22}"
        else:
            first = sum(curve[:CURVE_WINDOW]) / CURVE_WINDOW
            last = sum(curve[-CURVE_WINDOW:]) / CURVE_WINDOW
            span = f"{first:<9.4g} -> {last:<9.4g}"
        print(f"{name:<15}{note:<20}{steps:>6}   {span}{acc:>11.3f}{teacher_acc:>13.3f}")


# ----------------------------------------------------------------------- main
def main() -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    camera = make_camera(gen)
    teacher_x, teacher_y = render_faces(camera, TEACHER_IDS, IMAGES_PER_TRAIN_ID, gen)
    test_x, test_y = render_faces(camera, TEST_IDS, TEST_IMAGES_PER_ID, gen)
    pairs = verification_pairs(test_y, gen)
    # Labels are grouped by identity: the first rows hold the first identities.
    student_x = teacher_x[:STUDENT_IDS * IMAGES_PER_TRAIN_ID]
    student_y = teacher_y[:STUDENT_IDS * IMAGES_PER_TRAIN_ID]

    teacher = make_teacher()
    train_with_labels(teacher, teacher_x, teacher_y, TEACHER_IDS, TEACHER_STEPS)
    teacher.requires_grad_(False).eval()
    teacher_emb = teacher(student_x)  # the teacher is fixed: embed once
    teacher_acc = verification_accuracy(teacher, test_x, pairs)

    rows = [("(student init)", "no training", 0, None,
             verification_accuracy(make_student(), test_x, pairs))]

    # Reference: the same student trained from the labels alone, no teacher.
    student = make_student()
    curve = train_with_labels(student, student_x, student_y, STUDENT_IDS, STUDENT_STEPS)
    rows.append(("(CosFace only)", "labels, no teacher", STUDENT_STEPS, curve,
                 verification_accuracy(student, test_x, pairs)))

    for name, note, make_loss in DISTILLATION_LOSSES:
        student, loss = make_student(), make_loss()
        curve = train(student, lambda fs, r: distillation_loss(
            loss, fs, teacher_emb[r], student_y[r], student),
            student_x, student_y, STUDENT_IDS, STUDENT_STEPS)
        rows.append((name, note, STUDENT_STEPS, curve,
                     verification_accuracy(student, test_x, pairs)))

    print_table(rows, teacher_acc, len(pairs[2]))


if __name__ == "__main__":
    main()
