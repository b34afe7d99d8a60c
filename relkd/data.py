"""Face-recognition data for the demo and for tests.

`SyntheticFaces` renders face-like grey images procedurally, on the fly and
deterministically from (seed, identity, sample): an identity is a set of
shape parameters (head, hair, eyes, brows, nose, mouth, skin marks), a sample
is that face under a random pose, expression, illumination, occlusion
(glasses, a mask, a patch), blur and noise. Nothing is written to disk.

`ImageFolderFaces` reads aligned face crops, one folder per identity, with
Pillow (imported only when it is used, so relkd itself does not need it);
`split_identities` makes an open-set split by identity, never by image.
"""
from __future__ import annotations

import hashlib
import math
import os
from types import SimpleNamespace
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from . import _validation as check

__all__ = ["SyntheticFaces", "ImageFolderFaces", "split_identities", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")

_MASK32 = 0xFFFFFFFF


# ------------------------------------------------------------- random numbers
def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixing function on int64 tensors holding values in
    [0, 2^32): every product stays below 2^63, so it is exact on any device
    and the same numbers come out whatever the batch they are drawn in."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def _uniforms(seed: int, identity: Tensor, sample: Tensor, count: int) -> Tensor:
    """(B, count) uniforms in (0, 1), a pure function of (seed, identity,
    sample, column): the counter-based generator behind every face."""
    h = _hash32(torch.full_like(identity, seed & _MASK32) ^ 0x9E3779B9)
    h = _hash32(h ^ (identity & _MASK32))
    h = _hash32(h ^ (sample & _MASK32))
    columns = _hash32(torch.arange(count, device=identity.device, dtype=torch.int64) + 0x51ED27)
    bits = _hash32(h[:, None] ^ columns[None, :])
    return (bits.double() + 0.5) / 2.0 ** 32


def _normals(u1: Tensor, u2: Tensor) -> Tensor:
    """Box-Muller: standard normals from two independent uniform tensors."""
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


class _Draws:
    """Hands out columns of a (B, n) uniform table by name, in a fixed order,
    so adding a parameter at the end never changes the earlier ones."""

    def __init__(self, table: Tensor):
        self.table, self.used = table, 0

    def uniform(self, low: float, high: float, width: int = 1) -> Tensor:
        cols = self.table[:, self.used:self.used + width]
        if cols.shape[1] != width:
            raise RuntimeError("SyntheticFaces: the random table is too small")  # a bug, not input
        self.used += width
        out = (low + (high - low) * cols).float()  # drawn in float64, rendered in float32
        return out[:, 0] if width == 1 else out

    def normal(self, std: float, width: int = 1) -> Tensor:
        u1, u2 = self.uniform(0, 1, width), self.uniform(0, 1, width)
        return std * _normals(u1, u2)

    def chance(self, p: float) -> Tensor:
        return self.uniform(0, 1) < p


# ------------------------------------------------------------------ rendering
def _ellipse(x: Tensor, y: Tensor, cx, cy, rx, ry, sharpness: Tensor) -> Tensor:
    """Soft inside-mask of an axis-aligned ellipse, (B, H, W) in [0, 1]; the
    edge is about one pixel wide, so shapes are anti-aliased."""
    r = torch.sqrt(((x - cx[:, None, None]) / rx[:, None, None]) ** 2
                   + ((y - cy[:, None, None]) / ry[:, None, None]) ** 2 + 1e-12)
    return torch.sigmoid((1.0 - r) * (sharpness * torch.minimum(rx, ry))[:, None, None])


def _paint(canvas: Tensor, mask: Tensor, value) -> Tensor:
    """Alpha-composites a (B,) or (B, H, W) grey value over the canvas."""
    if isinstance(value, Tensor) and value.dim() == 1:
        value = value[:, None, None]
    return canvas * (1 - mask) + value * mask


def _blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Per-image Gaussian blur (sigma in pixels, 0 = none), separable, one
    grouped convolution per axis."""
    b, h, w = images.shape
    radius = 3
    taps = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    x = F.pad(images[None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel[:, None, None, :], groups=b)
    x = F.conv2d(x, kernel[:, None, :, None], groups=b)
    return x[0]


class SyntheticFaces(Dataset):
    """Procedural identities for open-set face verification.

    num_identities identities, starting at identity number first_identity
    (so disjoint ranges give disjoint held-out identities), with
    images_per_identity samples each; item i is (image (1, size, size)
    float32 in about [0, 1], label i // images_per_identity). Images are
    rendered when asked for, deterministically from (seed, identity,
    sample): the random parameters are a pure function of those three, so an
    item is the same whatever batch it is drawn in (bit for bit for the same
    batch layout; up to float32 rounding, about 1e-7, across layouts).
    ``render(identities, samples)`` draws any samples in one batch, e.g.
    fresh ones (samples >= images_per_identity) for training a teacher.
    nuisance scales the within-identity variation (pose, expression,
    lighting, occluders, blur, noise; the background grey varies at any
    setting); the demo uses 0.5.
    """

    def __init__(self, num_identities: int, images_per_identity: int, *, seed: int = 0,
                 first_identity: int = 0, size: int = 32, nuisance: float = 1.0):
        self.num_identities = check.positive_int(num_identities, "num_identities")
        self.images_per_identity = check.positive_int(images_per_identity,
                                                      "images_per_identity")
        self.first_identity = check.non_negative_int(first_identity, "first_identity")
        if self.first_identity + self.num_identities > 1 << 32:
            # The generator hashes 32-bit identities: 2^32 would alias identity 0.
            raise ValueError(f"first_identity: expected first_identity + num_identities <= "
                             f"2^32, got {first_identity} + {num_identities}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 32:
            # A 32-bit generator: seed 2^32 + 1 would draw seed 1's faces.
            raise ValueError(f"seed: expected an int in [0, 2^32), got {seed!r}")
        self.seed = seed
        self.size = check.positive_int(size, "size")
        if self.size < 16:
            raise ValueError(f"size: expected an int >= 16 (pixels per side), got {size!r}")
        self.nuisance = check.number(nuisance, "nuisance", non_negative=True)

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        label, sample = divmod(index, self.images_per_identity)
        image = self.render(torch.tensor([label]), torch.tensor([sample]))
        return image[0], label

    @property
    def labels(self) -> Tensor:
        return torch.arange(self.num_identities).repeat_interleave(self.images_per_identity)

    def images(self, start: int = 0, stop: Optional[int] = None,
               batch_size: int = 2048) -> Tensor:
        """Items start..stop (default: all) as one (n, 1, size, size) tensor,
        rendered in batches."""
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"start, stop: expected 0 <= start <= stop <= {len(self)} (items), "
                             f"got {start}, {stop}")
        if start == stop:  # split() of an empty range gives one empty chunk
            return torch.empty(0, 1, self.size, self.size)
        index = torch.arange(start, stop)
        chunks = [self.render(part // self.images_per_identity, part % self.images_per_identity)
                  for part in index.split(batch_size)]
        return torch.cat(chunks)

    def render(self, labels: Tensor, samples: Tensor) -> Tensor:
        """(B, 1, size, size) images of sample samples[b] of identity
        labels[b] (labels count from 0 within this dataset)."""
        for name, values in (("labels", labels), ("samples", samples)):
            if torch.as_tensor(values).is_floating_point():  # 0.7 would truncate to 0
                raise ValueError(f"{name}: expected integers, got {torch.as_tensor(values).dtype}")
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        samples = torch.as_tensor(samples, dtype=torch.int64).reshape(-1)
        if labels.shape != samples.shape:
            raise ValueError(f"samples: expected the shape of labels {tuple(labels.shape)}, "
                             f"got {tuple(samples.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_identities):
            raise ValueError(f"labels: expected values in [0, {self.num_identities})")
        if samples.numel() and int(samples.min()) < 0:
            raise ValueError("samples: expected values >= 0")
        identity = labels + self.first_identity
        face = _Draws(_uniforms(self.seed, identity, torch.zeros_like(identity), 64))
        view = _Draws(_uniforms(self.seed, identity, samples + 1, 64))
        return _render(face, view, len(labels), self.size, self.nuisance)[:, None]


def _per_image(v: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1): one value per image, broadcast over its pixels."""
    return v[:, None, None]


def _face_parameters(face: _Draws, b: int) -> SimpleNamespace:
    """The identity: shape and tone of every part (coordinates in [-1, 1])."""
    p = SimpleNamespace()
    p.skin = face.uniform(0.35, 0.85)
    p.hair_tone = face.uniform(0.0, 1.0)
    p.head_w, p.head_h = face.uniform(0.52, 0.72), face.uniform(0.68, 0.88)
    p.hairline = face.uniform(0.15, 0.45)       # how far hair comes down the forehead
    p.hair_volume = face.uniform(0.02, 0.14)
    p.eye_dx, p.eye_y = face.uniform(0.20, 0.34), face.uniform(-0.22, -0.04)
    p.eye_w, p.eye_h = face.uniform(0.07, 0.13), face.uniform(0.035, 0.07)
    p.iris = face.uniform(0.0, 0.45)
    p.brow_gap, p.brow_thick = face.uniform(0.06, 0.16), face.uniform(0.015, 0.045)
    p.brow_tilt, p.brow_tone = face.uniform(-0.08, 0.08), face.uniform(0.0, 0.5)
    p.nose_len, p.nose_w = face.uniform(0.12, 0.30), face.uniform(0.04, 0.10)
    p.mouth_y, p.mouth_w = face.uniform(0.30, 0.50), face.uniform(0.12, 0.26)
    p.mouth_curve, p.lip_tone = face.uniform(-0.25, 0.25), face.uniform(0.1, 0.6)
    p.beard = face.chance(0.2).float() * face.uniform(0.3, 1.0)
    p.marks_xy = face.uniform(-0.45, 0.45, 6).reshape(b, 3, 2)   # moles, scars
    p.marks_amp = face.uniform(-0.25, 0.25, 3)
    p.cheek = face.uniform(-0.12, 0.12, 4)      # low-frequency shading of the face
    return p


def _view_parameters(view: _Draws, n: float) -> SimpleNamespace:
    """The sample: pose, expression, light, occluders, camera; spreads scale
    with the nuisance n."""
    v = SimpleNamespace()
    v.angle = view.normal(0.20 * n)              # radians: about 6 degrees at n = 0.5
    v.scale = 1.0 + view.normal(0.07 * n)
    v.shift = view.normal(0.07 * n, 2)
    v.yaw = view.normal(0.35 * n).clamp(-0.9, 0.9)
    v.smile = view.normal(0.12 * n)
    v.openness = (1.0 + view.normal(0.25 * n)).clamp(0.15, 1.5)
    v.gain = 1.0 + view.normal(0.15 * n)
    v.contrast = (1.0 + view.normal(0.2 * n)).clamp(0.4, 1.8)
    v.light_angle, v.light_strength = view.uniform(0, 2 * math.pi), view.uniform(0, 0.5 * n)
    v.background = view.uniform(0.05, 0.95)
    v.glasses = view.chance(min(1.0, 0.25 * n)).float()
    v.glasses_tone = view.uniform(0.0, 0.35)
    v.glasses_fill = view.uniform(0.0, 0.7)      # tinted lenses hide the eyes
    v.mask = view.chance(min(1.0, 0.15 * n)).float()
    v.mask_tone, v.mask_top = view.uniform(0.3, 1.0), view.uniform(0.05, 0.2)
    v.patch = view.chance(min(1.0, 0.2 * n)).float()
    v.patch_xy, v.patch_wh = view.uniform(-0.7, 0.7, 2), view.uniform(0.15, 0.45, 2)
    v.patch_tone = view.uniform(0.0, 1.0)
    v.blur_sigma = view.uniform(0.0, 1.2 * n)
    v.noise_std = view.uniform(0.005, 0.06 * n + 0.005)
    v.noise_keys = view.table[:, view.used:view.used + 2]  # seed the pixel noise
    # Yaw turns the head: it narrows and the inner features slide sideways.
    v.turn = 0.22 * v.yaw
    v.narrow = 1.0 - 0.25 * v.yaw.abs()
    return v


class _Canvas:
    """The image grid in two frames: (gx, gy) of the image and (x, y) of the
    face, i.e. the image grid under the inverse pose, so every shape is
    evaluated analytically where the face is (no resampling)."""

    def __init__(self, v: SimpleNamespace, b: int, size: int):
        axis = torch.linspace(-1, 1, size)
        self.gy, self.gx = torch.meshgrid(axis, axis, indexing="ij")
        cos, sin = _per_image(torch.cos(v.angle)), _per_image(torch.sin(v.angle))
        px = (self.gx[None] - _per_image(v.shift[:, 0])) / _per_image(v.scale)
        py = (self.gy[None] - _per_image(v.shift[:, 1])) / _per_image(v.scale)
        self.x, self.y = cos * px + sin * py, -sin * px + cos * py
        self.size = size
        self.sharp = torch.full((b,), 0.5 * size)  # edges about one pixel wide
        self.zero = torch.zeros(b)
        self.pixels = _per_image(v.background).expand(b, size, size).clone()

    def ellipse(self, cx, cy, rx, ry, sharpness=None, x=None, y=None) -> Tensor:
        return _ellipse(self.x if x is None else x, self.y if y is None else y, cx, cy, rx, ry,
                        self.sharp if sharpness is None else sharpness)

    def below(self, coordinate: Tensor, level: Tensor) -> Tensor:
        """Soft mask of coordinate > level (y points down: below the level)."""
        return torch.sigmoid((coordinate - _per_image(level)) * 0.5 * self.size)

    def paint(self, mask: Tensor, value) -> None:
        self.pixels = _paint(self.pixels, mask, value)


def _draw_face(c: _Canvas, p: SimpleNamespace, v: SimpleNamespace) -> None:
    x, y, zero, turn, narrow = c.x, c.y, c.zero, v.turn, v.narrow
    c.paint(c.ellipse(turn * 0.3, zero - p.hair_volume, p.head_w * narrow + p.hair_volume,
                      p.head_h + p.hair_volume), p.hair_tone)
    head = c.ellipse(turn * 0.3, zero + 0.05, p.head_w * narrow, p.head_h)
    skin = head * c.below(y, -p.head_h + 0.05 + p.hairline)  # hair above the hairline
    cheek = [_per_image(p.cheek[:, i]) for i in range(4)]
    shading = (cheek[0] * torch.cos(2.5 * x) + cheek[1] * y + cheek[2] * torch.cos(3.0 * y)
               + cheek[3] * x * y)
    c.paint(skin, _per_image(p.skin) + shading)
    for k in range(3):
        mark = c.ellipse(p.marks_xy[:, k, 0] * p.head_w + turn, p.marks_xy[:, k, 1] * p.head_h,
                         zero + 0.06, zero + 0.06, c.sharp * 0.5)
        c.pixels = c.pixels + _per_image(p.marks_amp[:, k]) * mark * skin
    c.paint(head * c.below(y, p.mouth_y - 0.08) * _per_image(p.beard), p.hair_tone)
    for side in (-1.0, 1.0):
        ex = side * p.eye_dx * narrow + turn
        white = c.ellipse(ex, p.eye_y, p.eye_w * narrow, p.eye_h * v.openness)
        c.paint(white, zero + 0.95)
        pupil = c.ellipse(ex + 0.3 * turn, p.eye_y, p.eye_h * 0.9, p.eye_h * v.openness * 0.9)
        c.paint(pupil * white, p.iris)
        tilted = y + side * _per_image(p.brow_tilt) * (x - _per_image(ex))
        c.paint(c.ellipse(ex, p.eye_y - p.brow_gap, p.eye_w * 1.3 * narrow, p.brow_thick,
                          y=tilted), p.brow_tone)
    nose_x = turn * 1.3
    nose = c.ellipse(nose_x, p.eye_y + 0.08 + p.nose_len / 2, p.nose_w * narrow, p.nose_len / 2)
    c.pixels = c.pixels - 0.18 * nose * torch.tanh(2 + 4 * (x - _per_image(nose_x)))  # shadow
    mouth_x = x - _per_image(turn)
    curve = _per_image(p.mouth_curve + v.smile)
    bent = y - curve * mouth_x ** 2 / (_per_image(p.mouth_w) ** 2 + 1e-6) * 0.08
    c.paint(c.ellipse(zero, p.mouth_y, p.mouth_w * narrow, zero + 0.035, x=mouth_x, y=bent),
            p.lip_tone)


def _occlude(c: _Canvas, p: SimpleNamespace, v: SimpleNamespace) -> None:
    """Glasses and masks follow the pose (face frame); a patch (a hand, a
    microphone) lies in the image frame."""
    for side in (-1.0, 1.0):
        ex = side * p.eye_dx * v.narrow + v.turn
        lens = c.ellipse(ex, p.eye_y, p.eye_w * 1.7, p.eye_h * 2.6 + 0.04)
        rim = lens - c.ellipse(ex, p.eye_y, p.eye_w * 1.7 - 0.03, p.eye_h * 2.6 + 0.01)
        worn = _per_image(v.glasses)
        c.paint(worn * lens * _per_image(v.glasses_fill), v.glasses_tone)
        c.paint(worn * rim.clamp(0, 1), v.glasses_tone)
    head = c.ellipse(v.turn * 0.3, c.zero + 0.05, p.head_w * v.narrow, p.head_h)
    lower = head * c.below(c.y, p.eye_y + 0.08 + p.nose_len * v.mask_top / 0.2)
    c.paint(lower * _per_image(v.mask), v.mask_tone)
    half_w, half_h = _per_image(v.patch_wh[:, 0]), _per_image(v.patch_wh[:, 1])
    inside = (torch.sigmoid((half_w - (c.gx - _per_image(v.patch_xy[:, 0])).abs()) * 0.5 * c.size)
              * torch.sigmoid((half_h - (c.gy - _per_image(v.patch_xy[:, 1])).abs())
                              * 0.5 * c.size))
    c.paint(inside * _per_image(v.patch), v.patch_tone)


def _camera(c: _Canvas, v: SimpleNamespace) -> Tensor:
    """Contrast, gain and a linear light gradient, blur, pixel noise."""
    light = (_per_image(torch.cos(v.light_angle)) * c.gx
             + _per_image(torch.sin(v.light_angle)) * c.gy)
    pixels = (c.pixels - 0.5) * _per_image(v.contrast) + 0.5
    pixels = pixels * _per_image(v.gain) * (1 + _per_image(v.light_strength) * light)
    pixels = _blur(pixels, v.blur_sigma)
    pixels = pixels + _per_image(v.noise_std) * _normals(*_pixel_uniforms(v.noise_keys, c.size))
    return pixels.clamp(0, 1)


def _render(face: _Draws, view: _Draws, b: int, size: int, nuisance: float) -> Tensor:
    """(B, size, size) faces: identity parameters from `face`, the sample's
    variation (scaled by `nuisance`) from `view`."""
    p, v = _face_parameters(face, b), _view_parameters(view, nuisance)
    canvas = _Canvas(v, b, size)
    _draw_face(canvas, p, v)
    _occlude(canvas, p, v)
    return _camera(canvas, v)


def _pixel_uniforms(keys: Tensor, size: int) -> Tuple[Tensor, Tensor]:
    """Two (B, size, size) uniform fields hashed from the sample's two noise
    keys (uniforms in (0, 1)) and the pixel index."""
    keys = (keys * 2.0 ** 32).long()
    pixels = torch.arange(size * size, dtype=torch.int64)
    fields = []
    for col in range(2):
        bits = _hash32(_hash32(keys[:, col, None] ^ 0x2545F491) ^ pixels[None, :])
        fields.append(((bits.double() + 0.5) / 2.0 ** 32).float().reshape(-1, size, size))
    return fields[0], fields[1]


# ---------------------------------------------------------------- image folder
class ImageFolderFaces(Dataset):
    """Aligned face crops, one folder per identity (root/<identity>/<image>):
    item i is (grey image (1, size, size) float32 in [0, 1], label). Images
    are read with Pillow, converted to grey and resized to size x size when
    asked for. Identities are the sorted folder names; folders without
    images are skipped. `subset(ids)` keeps some identities, relabelled 0..n-1."""

    def __init__(self, root: str, size: int = 32, *, _files: Optional[List[str]] = None,
                 _labels: Optional[List[int]] = None, _names: Optional[List[str]] = None):
        self.root = root
        self.size = check.positive_int(size, "size")
        if _files is None:
            _names, _files, _labels = self._scan(root)
        self.files, self.label_list, self.names = _files, _labels, _names

    @staticmethod
    def _scan(root: str):
        if not isinstance(root, (str, os.PathLike)) or not os.path.isdir(root):
            raise ValueError(f"root: expected a directory with one folder per identity, "
                             f"got {root!r}")
        names, files, labels = [], [], []
        for name in sorted(os.listdir(root)):
            folder = os.path.join(root, name)
            if not os.path.isdir(folder):
                continue
            images = sorted(f for f in os.listdir(folder)
                            if f.lower().endswith(IMAGE_EXTENSIONS))
            if not images:
                continue
            files += [os.path.join(folder, f) for f in images]
            labels += [len(names)] * len(images)
            names.append(name)
        if not names:
            raise ValueError(f"root: no identity folders with images "
                             f"({', '.join(IMAGE_EXTENSIONS)}) in {root!r}")
        return names, files, labels

    @property
    def num_identities(self) -> int:
        return len(self.names)

    @property
    def labels(self) -> Tensor:
        return torch.tensor(self.label_list, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        return self._load(self.files[index]), self.label_list[index]

    def _load(self, path: str) -> Tensor:
        try:
            from PIL import Image
        except ImportError:
            raise ImportError("reading an image folder needs Pillow: pip install pillow") from None
        with Image.open(path) as img:
            grey = img.convert("L").resize((self.size, self.size), Image.BILINEAR)
            data = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8)
        return data.reshape(1, self.size, self.size).float() / 255.0

    def images(self) -> Tensor:
        """Every image as one (n, 1, size, size) tensor."""
        if not self.files:
            return torch.empty(0, 1, self.size, self.size)
        return torch.stack([self._load(f) for f in self.files])

    def subset(self, identities: Sequence[int]) -> "ImageFolderFaces":
        """The images of the given identities (indices into names), labelled
        by their position in `identities`."""
        identities = [int(i) for i in identities]
        if any(not 0 <= i < self.num_identities for i in identities):
            raise ValueError(f"identities: expected indices in [0, {self.num_identities})")
        if len(set(identities)) != len(identities):  # a repeat would own no images
            raise ValueError(f"identities: expected distinct indices, got {identities}")
        new_label = {old: new for new, old in enumerate(identities)}
        keep = [i for i, lab in enumerate(self.label_list) if lab in new_label]
        return ImageFolderFaces(self.root, self.size, _files=[self.files[i] for i in keep],
                                _labels=[new_label[self.label_list[i]] for i in keep],
                                _names=[self.names[i] for i in identities])

    def fingerprint(self) -> str:
        """A hash of the file list and sizes: changes when the data does."""
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(os.path.relpath(path, self.root).encode())
            digest.update(str(os.path.getsize(path)).encode())
        return f"folder:{digest.hexdigest()[:16]}"


def split_identities(num_identities: int, num_test: int, seed: int = 0) -> Tuple[List[int],
                                                                                  List[int]]:
    """An open-set split: (training identities, held-out identities), a
    random partition of range(num_identities) fixed by seed. Every image of
    an identity falls on the same side."""
    check.positive_int(num_identities, "num_identities")
    check.positive_int(num_test, "num_test")
    if num_test >= num_identities:
        raise ValueError(f"num_test: expected fewer than the {num_identities} identities, "
                         f"got {num_test}")
    order = torch.randperm(num_identities, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[num_test:]), sorted(order[:num_test])
