"""The face-recognition distillation demo (`python -m relkd.demo`, `make
demo`): a ResNet teacher and a much smaller CNN student on procedural faces
(relkd.data.SyntheticFaces) or an image folder, one student per relkd loss,
open-set verification at low FPR on held-out identities."""
from .cli import main

__all__ = ["main"]
