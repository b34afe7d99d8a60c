"""Training for the demo: the configuration, the data it runs on, the cached
teacher, P x K identity-balanced batches and one student run per loss."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

import torch
from torch import Tensor, nn

import relkd

from ..data import ImageFolderFaces, SyntheticFaces, split_identities
from .models import CosFaceHead, ResNetTeacher, StudentCNN

__all__ = ["DemoConfig", "DEFAULT", "QUICK", "DemoData", "RUNS", "Run", "load_or_train_teacher",
           "train_student", "embed", "progress"]


@dataclass(frozen=True)
class DemoConfig:
    # Data (synthetic; with --data the identity counts come from the folder).
    train_identities: int = 2000
    test_identities: int = 300
    images_per_train_identity: int = 8    # the students' fixed training set
    images_per_test_identity: int = 10
    image_size: int = 32
    nuisance: float = 0.5                 # SyntheticFaces' within-identity variation
    data_seed: int = 0
    # Networks and their training (AdamW, linear warm-up then cosine decay).
    embedding_dim: int = 128
    cosface_scale: float = 30.0
    cosface_margin: float = 0.35
    teacher_steps: int = 1000
    teacher_batch: int = 128
    teacher_lr: float = 3e-3
    student_steps: int = 600
    identities_per_batch: int = 32        # P
    images_per_batch_identity: int = 4    # K
    student_lr: float = 3e-3
    weight_decay: float = 5e-4
    # Evaluation.
    max_impostors: int = 5_000_000
    validation_first_identity: int = 100_000  # --validation: tune here, not on the test set

    def teacher_key(self, data_fingerprint: str) -> str:
        """What the teacher depends on, hashed: the cache file's name."""
        fields = {f: getattr(self, f) for f in (
            "train_identities", "image_size", "nuisance", "data_seed", "embedding_dim",
            "cosface_scale", "cosface_margin", "teacher_steps", "teacher_batch", "teacher_lr",
            "weight_decay")}
        fields.update(data=data_fingerprint, model="ResNetTeacher-v1")
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


DEFAULT = DemoConfig()
# Small enough to run end to end in well under a minute on 2 CPU cores: a
# smoke test of the whole pipeline, not a measurement.
QUICK = dataclasses.replace(
    DEFAULT, train_identities=200, test_identities=40, images_per_train_identity=4,
    images_per_test_identity=6, teacher_steps=60, teacher_batch=64, student_steps=40,
    identities_per_batch=16, max_impostors=1_000_000)


# ----------------------------------------------------------------------- data
def normalise(images: Tensor) -> Tensor:
    """[0, 1] grey images -> roughly zero mean, unit variance."""
    return (images - 0.5) / 0.25


class DemoData:
    """The training pool (images, labels), the held-out test set, and how
    the teacher draws its batches: fresh renderings of the training
    identities (synthetic) or the training images themselves (--data)."""

    def __init__(self, config: DemoConfig, data_dir: Optional[str] = None,
                 validation: bool = False):
        self.config = config
        if data_dir is None:
            self._synthetic(config, validation)
        elif validation:
            raise ValueError("validation: only for the synthetic faces (with --data, hold out "
                             "a validation folder yourself)")
        else:
            self._folder(config, data_dir)

    def _synthetic(self, c: DemoConfig, validation: bool) -> None:
        self.train_set = SyntheticFaces(c.train_identities, c.images_per_train_identity,
                                        seed=c.data_seed, size=c.image_size, nuisance=c.nuisance)
        first_test = c.validation_first_identity if validation else c.train_identities
        self.test_set = SyntheticFaces(c.test_identities, c.images_per_test_identity,
                                       seed=c.data_seed, first_identity=first_test,
                                       size=c.image_size, nuisance=c.nuisance)
        self.train_images = normalise(self.train_set.images())
        self.train_labels = self.train_set.labels
        self.test_images = normalise(self.test_set.images())
        self.test_labels = self.test_set.labels
        self.num_classes = c.train_identities
        self.fingerprint = "SyntheticFaces-v1"  # bump when the renderer changes
        self.description = (f"SyntheticFaces(seed={c.data_seed}, nuisance={c.nuisance}): "
                            f"{c.train_identities} training identities x "
                            f"{c.images_per_train_identity} images, {c.test_identities} "
                            f"{'validation' if validation else 'held-out'} identities x "
                            f"{c.images_per_test_identity}, {c.image_size}x{c.image_size} grey")

    def _folder(self, c: DemoConfig, data_dir: str) -> None:
        everything = ImageFolderFaces(data_dir, size=c.image_size)
        if everything.num_identities < 2:
            raise ValueError(f"data_dir: expected at least 2 identity folders (some to train "
                             f"on, some held out), found {everything.num_identities}")
        n_test = min(c.test_identities, everything.num_identities // 2)
        train_ids, test_ids = split_identities(everything.num_identities, n_test, seed=c.data_seed)
        train = everything.subset(train_ids)
        test = everything.subset(test_ids)
        self.train_images, self.train_labels = normalise(train.images()), train.labels
        self.test_images, self.test_labels = normalise(test.images()), test.labels
        self.num_classes = train.num_identities
        self.fingerprint = everything.fingerprint()
        self.description = (f"ImageFolder {os.path.abspath(data_dir)}: {train.num_identities} "
                            f"training identities ({len(train)} images), {test.num_identities} "
                            f"held-out identities ({len(test)} images), {c.image_size}x"
                            f"{c.image_size} grey")
        self.train_set = None

    def teacher_batch(self, step: int, gen: torch.Generator) -> tuple:
        """Batch `step` of the teacher: uniformly drawn identities, each a
        never-seen rendering (synthetic) or a random training image."""
        b = self.config.teacher_batch
        if self.train_set is None:
            rows = torch.randint(0, len(self.train_labels), (b,), generator=gen)
            return self.train_images[rows], self.train_labels[rows]
        labels = torch.randint(0, self.num_classes, (b,), generator=gen)
        # Sample numbers past the students' pool: the teacher sees fresh faces.
        samples = self.config.images_per_train_identity + step * b + torch.arange(b)
        return normalise(self.train_set.render(labels, samples)), labels


def pk_batches(labels: Tensor, p: int, k: int, steps: int, seed: int) -> Iterable[Tensor]:
    """Row indices of `steps` batches of p identities x k images each (as
    EKD's sampler), so every face has positives in its batch. An identity
    with fewer than k images contributes some twice."""
    order = labels.argsort(stable=True)
    ids, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = counts.cumsum(0) - counts
    p = min(p, len(ids))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        chosen = torch.randperm(len(ids), generator=gen)[:p]
        n = counts[chosen, None]
        width = max(k, int(n.max()))
        # k distinct images: the k smallest of random keys, padding keyed last ...
        distinct = torch.rand(p, width, generator=gen).masked_fill(
            torch.arange(width) >= n, 2.0).argsort(dim=1)[:, :k]
        # ... or, for an identity with fewer than k, k draws with replacement.
        repeated = (torch.rand(p, k, generator=gen) * n).long()
        pick = torch.where(n >= k, distinct, repeated)
        yield order[(starts[chosen, None] + pick).flatten()]


# -------------------------------------------------------------------- helpers
def progress(iterable, total: int, desc: str, enabled: bool = True):
    """tqdm when it is installed; otherwise a line every 10 %."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain_progress(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _plain_progress(iterable, total: int, desc: str):
    start, every = time.time(), max(1, total // 10)
    for i, item in enumerate(iterable, 1):
        yield item
        if i % every == 0 or i == total:
            print(f"  {desc}: {i}/{total} steps, {time.time() - start:.0f} s", flush=True)


def _schedule(optimiser: torch.optim.Optimizer, steps: int):
    """Linear warm-up over the first 5 % of the steps, then cosine to 0."""
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


class _Trainer:
    """AdamW + schedule, with float16 autocast and loss scaling on CUDA."""

    def __init__(self, params, lr: float, weight_decay: float, steps: int, device: torch.device):
        self.optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.schedule = _schedule(self.optimiser, steps)
        self.amp = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.device = device

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp)

    def step(self, loss: Tensor) -> None:
        self.optimiser.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimiser)
        self.scaler.update()
        self.schedule.step()


@torch.no_grad()
def embed(net: nn.Module, images: Tensor, device: torch.device, batch: int = 1024) -> Tensor:
    """Embeddings of all images in eval mode (float32, on device)."""
    was_training = net.training
    net.eval()
    out = []
    for chunk in images.split(batch):
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            out.append(net(chunk.to(device)).float())
    net.train(was_training)
    return torch.cat(out)


# -------------------------------------------------------------------- teacher
def _make_teacher(config: DemoConfig) -> ResNetTeacher:
    return ResNetTeacher(config.embedding_dim)


def train_teacher(config: DemoConfig, data: DemoData, device: torch.device,
                  show_progress: bool = True) -> ResNetTeacher:
    torch.manual_seed(config.data_seed)
    teacher = _make_teacher(config).to(device)
    head = CosFaceHead(data.num_classes, config.embedding_dim, config.cosface_scale,
                       config.cosface_margin).to(device)
    trainer = _Trainer(list(teacher.parameters()) + list(head.parameters()), config.teacher_lr,
                       config.weight_decay, config.teacher_steps, device)
    gen = torch.Generator().manual_seed(config.data_seed + 1)
    steps = progress(range(config.teacher_steps), config.teacher_steps, "teacher", show_progress)
    for step in steps:
        images, labels = data.teacher_batch(step, gen)
        images, labels = images.to(device), labels.to(device)
        with trainer.autocast():
            loss = head(teacher(images), labels)
        trainer.step(loss)
    return teacher.eval()


def load_or_train_teacher(config: DemoConfig, data: DemoData, device: torch.device,
                          cache_dir: str, show_progress: bool = True):
    """(teacher, path, whether it came from the cache). The cache file is
    keyed by everything the teacher depends on (DemoConfig.teacher_key)."""
    path = os.path.join(cache_dir, f"teacher-{config.teacher_key(data.fingerprint)}.pt")
    teacher = _make_teacher(config)
    if os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        teacher.load_state_dict(saved)
        return teacher.to(device).eval(), path, True
    teacher = train_teacher(config, data, device, show_progress)
    os.makedirs(cache_dir, exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"  # a killed run never leaves a truncated cache
    torch.save({k: v.cpu() for k, v in teacher.state_dict().items()}, partial)
    os.replace(partial, path)
    return teacher, path, False


# ------------------------------------------------------------------- students
@dataclass(frozen=True)
class Run:
    """One student run: CosFace + weight * the distillation loss (none for
    the baseline), the loss built by make_loss(inner): inner is the weight
    inside the loss where it has two terms (RAD's beta against FCD in
    CoupleFace, the exclusivity's lam in EC-KD). `inputs` says what the
    loss takes besides (fs, ft): "labels", "bank" (labels and the prototype
    bank) or "weights" (the student, for EC-KD's exclusivity)."""
    name: str
    make_loss: Optional[Callable[[Optional[float]], nn.Module]] = None
    weight: float = 0.0
    inner: Optional[float] = None
    inputs: str = ""
    note: str = ""

    def describe(self) -> str:
        if self.make_loss is None:
            return "CosFace only"
        return f"CosFace + {self.weight:g} x {self.name}" + (
            "" if self.inner is None else f" (inner weight {self.inner:g})")


# Weights of the KD terms against the CosFace term, chosen on validation
# identities (neither training nor test identities): for each loss the
# smallest weight within 0.005 TPR@1e-3 of the best one of a x3-step sweep.
# README, "Demo", gives the check of each choice and its command.
FCD_WEIGHT = 50.0
RUNS: List[Run] = [
    Run("CosFace (no KD)", note="labels only"),
    Run("FCD", lambda _: relkd.FCDLoss(), FCD_WEIGHT, note="feature consistency"),
    Run("CoupleFace", lambda beta: relkd.CoupleFaceLoss(alpha=1.0, beta=beta), FCD_WEIGHT, 0.3,
        "labels", note="FCD + RAD, batch mining k=16"),
    Run("CoupleFace+bank", lambda beta: relkd.CoupleFaceLoss(k=100, alpha=1.0, beta=beta),
        FCD_WEIGHT, 0.3, "bank", note="FCD + RAD, PrototypeBank k=100"),
    Run("EKD", lambda _: relkd.EKDLoss(), 20.0, inputs="labels",
        note="rank loss at FPR anchors"),
    Run("CCKD", lambda _: relkd.CCKDLoss(), 10000.0, note="Gaussian-kernel correlations"),
    Run("RKD", lambda _: relkd.RKDLoss(angle_weight=0.0), 81.0, note="distance term only"),
    Run("RKD+angle", lambda _: relkd.RKDLoss(), 27.0, note="distance and angle terms"),
    Run("SP", lambda _: relkd.SPLoss(), 6000.0, note="similarity preserving"),
    Run("EC-KD", lambda lam: relkd.ECKDLoss(lam=lam), FCD_WEIGHT, 0.01, "weights",
        note="FCD + exclusivity"),
]


def _distillation(run: Run, loss_fn: nn.Module, fs: Tensor, ft: Tensor, labels: Tensor,
                  student: nn.Module, bank: Optional[relkd.PrototypeBank]) -> Tensor:
    if run.inputs == "labels":
        return loss_fn(fs, ft, labels)
    if run.inputs == "bank":
        bank.update(ft, labels)  # the batch's teacher embeddings move its prototypes
        prototypes, ids = bank.active()
        return loss_fn(fs, ft, labels, bank=prototypes, bank_labels=ids)
    if run.inputs == "weights":
        return loss_fn(fs, ft, student)
    return loss_fn(fs, ft)


def train_student(run: Run, seed: int, config: DemoConfig, data: DemoData,
                  teacher_train_emb: Tensor, device: torch.device,
                  show_progress: bool = True) -> StudentCNN:
    """Trains a fresh student (the same initial weights and the same batches
    for every run of a seed) and returns it in eval mode."""
    torch.manual_seed(1000 + seed)
    student = StudentCNN(config.embedding_dim).to(device)
    head = CosFaceHead(data.num_classes, config.embedding_dim, config.cosface_scale,
                       config.cosface_margin).to(device)
    loss_fn = run.make_loss(run.inner).to(device) if run.make_loss else None
    bank = (relkd.PrototypeBank(data.num_classes, config.embedding_dim, device=device)
            if run.inputs == "bank" else None)
    trainer = _Trainer(list(student.parameters()) + list(head.parameters()), config.student_lr,
                       config.weight_decay, config.student_steps, device)
    batches = pk_batches(data.train_labels, config.identities_per_batch,
                         config.images_per_batch_identity, config.student_steps, seed)
    for rows in progress(batches, config.student_steps, f"{run.name} (seed {seed})",
                         show_progress):
        images, labels = data.train_images[rows].to(device), data.train_labels[rows].to(device)
        with trainer.autocast():
            fs = student(images)
            loss = head(fs, labels)
            if loss_fn is not None:
                ft = teacher_train_emb[rows.to(device)]
                loss = loss + run.weight * _distillation(run, loss_fn, fs, ft, labels, student,
                                                         bank)
        trainer.step(loss)
    return student.eval()
