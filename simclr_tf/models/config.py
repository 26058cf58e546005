"""The architecture of a SimCLR model: the one list of its fields.

`ModelConfig` is everything needed to rebuild a network, and the only place
the architecture's field names are written. Each field says in its metadata
who sets it:

  'arch'   a choice of the user that fixes the weights' shapes (an export
           handed to the next stage must agree on it);
  'train'  a choice of the user that does not change the weights' shapes;
  'compute' a choice of how the training step is computed that changes
           neither the weights' shapes nor their values (a run resumed with
           another value is the same run);
  'stage'  derived from the stage and the data (never set by hand).

The run configuration (`simclr_tf.config`) and the command line take their
architecture options from here (`user_fields`), and exports carry a
`ModelConfig` so a later stage rebuilds the same Keras model.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

# Block type and blocks per group of each depth (He et al. 2016, Table 1;
# 200 from He et al. 2016b).
BLOCK_TYPES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
RESNET_DEPTHS = tuple(BLOCK_TYPES)
PROJ_HEAD_MODES = ("nonlinear", "linear", "none")
# Images of at most this size use the CIFAR stem (3x3 conv, stride 1, no
# max-pool); larger ones the ImageNet stem.
CIFAR_STEM_MAX_SIZE = 32


def num_proj_layers(proj_head_mode: str, num_layers: int) -> int:
  """Layers of a whole projection head: 0 ('none'), 1 ('linear') or
  `num_layers` ('nonlinear')."""
  return {"none": 0, "linear": 1, "nonlinear": num_layers}[proj_head_mode]


def whole_channels(width_multiplier: float) -> bool:
  """True for a ResNet width multiplier that gives every layer whole
  channels: positive, with 64 (the narrowest base width) x it an integer."""
  channels = 64 * width_multiplier
  return width_multiplier > 0 and abs(channels - round(channels)) < 1e-9


def _field(default, kind: str, help_text: str = ""):
  return dataclasses.field(default=default,
                           metadata={"kind": kind, "help": help_text})


@dataclasses.dataclass(frozen=True)
class ArchOptions:
  """The architecture options a user chooses (flags, API arguments).

  The run configuration inherits these fields; `ModelConfig` adds the ones
  the stage and the data decide.
  """

  resnet_depth: int = _field(
      18, "arch", "ResNet depth: 18, 34 (basic blocks), 50, 101, 152 or 200 "
      "(bottlenecks).")
  width_multiplier: float = _field(
      1.0, "arch", "ResNet width multiplier (paper: 1, 2, 3; 0.5 or 0.25 for "
      "narrow networks on small budgets).")
  sk_ratio: float = _field(
      0.0, "arch", "Selective-kernel ratio (paper: 0.0625); 0 disables SK "
      "(and ResNet-D).")
  se_ratio: float = _field(
      0.0, "arch", "Squeeze-excitation ratio; 0 disables SE.")
  batch_norm_decay: float = _field(
      0.9, "train", "Batch-norm moving-average momentum.")
  global_bn: bool = _field(
      True, "train", "Batch-norm statistics over the global batch (all "
      "replicas).")
  recompute_blocks: int = _field(
      0, "compute", "Gradient checkpointing: the stem and the first N "
      "residual blocks keep only their inputs for the backward pass and run "
      "again there (the stem with the first block); the same gradients in "
      "less memory, for a second forward pass of those layers. -1, a run's "
      "default: 1 on CPUs where it can run, else 0. It needs float32 or "
      "mixed_bfloat16, and not --global_bn over several replicas.")
  proj_head_mode: str = _field(
      "nonlinear", "arch", "Projection head: nonlinear, linear or none.")
  num_proj_layers: int = _field(
      3, "arch", "Layers of the nonlinear projection head (v2: 3).")
  proj_out_dim: int = _field(
      128, "arch", "Output width of the projection head.")


@dataclasses.dataclass(frozen=True)
class ModelConfig(ArchOptions):
  """The architecture of a SimCLR model: everything needed to rebuild it.

  The user's `ArchOptions` and what the stage and data decide.
  """

  cifar_stem: bool = _field(
      True, "stage", "3x3 stride-1 stem without max-pool (from the image "
      f"size: at most {CIFAR_STEM_MAX_SIZE} px).")
  proj_layers_kept: Optional[int] = _field(
      None, "stage", "Projection layers kept (None: all); fine-tuning from "
      "layer k drops the layers above it.")
  num_classes: int = _field(
      0, "stage", "Classes of the supervised head; 0: no head.")
  sup_head_input: int = _field(
      0, "stage", "Projection output feeding the supervised head (0: the "
      "encoder output, k: projection layer k).")
  sup_head_stop_gradient: bool = _field(
      False, "stage", "The supervised head's gradient does not reach the "
      "encoder (linear classifier trained beside pretraining).")

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(
          f"Model config has unknown keys {unknown}; it was written by a newer "
          "or different program. Re-export it with this version of simclr-tf.")
    return cls(**values)

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    return cls.from_dict(json.loads(text))

  @property
  def num_proj_outputs(self) -> int:
    """Projection layers the model computes (kept ones only)."""
    total = num_proj_layers(self.proj_head_mode, self.num_proj_layers)
    if self.proj_layers_kept is None:
      return total
    return min(total, self.proj_layers_kept)

  def validate(self) -> "ModelConfig":
    """Raises ValueError naming the first field that cannot work."""
    if self.resnet_depth not in RESNET_DEPTHS:
      raise ValueError(f"resnet_depth must be one of {RESNET_DEPTHS}. "
                       f"Received: resnet_depth={self.resnet_depth!r}")
    if not whole_channels(self.width_multiplier):
      raise ValueError(
          "width_multiplier must give whole channels (64 x it a whole "
          "number), e.g. 0.25, 0.5, 1, 2 or 3. Received: "
          f"width_multiplier={self.width_multiplier!r}")
    if self.proj_head_mode not in PROJ_HEAD_MODES:
      raise ValueError(f"proj_head_mode must be one of {PROJ_HEAD_MODES}. "
                       f"Received: proj_head_mode={self.proj_head_mode!r}")
    return self


def fields_of_kind(*kinds: str) -> tuple:
  """Names of the ModelConfig fields of these kinds, in definition order."""
  return tuple(f.name for f in dataclasses.fields(ModelConfig)
               if f.metadata["kind"] in kinds)


def user_fields() -> tuple:
  """The fields a user chooses (command-line flags, API arguments)."""
  return tuple(f.name for f in dataclasses.fields(ArchOptions))


def field_help(name: str) -> str:
  return {f.name: f.metadata["help"]
          for f in dataclasses.fields(ModelConfig)}[name]
