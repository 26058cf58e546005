"""Learning-rate scaling with the batch size (SimCLR, arXiv 2002.05709,
appendix B.1). Pure Python: the run configuration validates against it before
TensorFlow is imported."""

from __future__ import annotations

import math

LR_SCALINGS = ("linear", "sqrt")


def scaled_learning_rate(base_lr: float, batch_size: int, scaling: str) -> float:
  """`base_lr * batch_size / 256` ('linear') or `base_lr * sqrt(batch_size)`
  ('sqrt')."""
  if scaling == "linear":
    return base_lr * batch_size / 256.0
  if scaling == "sqrt":
    return base_lr * math.sqrt(batch_size)
  raise ValueError(f"scaling must be one of {LR_SCALINGS}. Received: "
                   f"scaling={scaling!r}")
