"""Run configuration: one frozen dataclass built by `run.py` from its flags.

No module below the entry point reads flags. `Config` holds every value of a
run (it is what `model_dir/flags.json` records); `ModelConfig` holds only the
architecture, which the SavedModel export carries so a later stage can rebuild
the same Keras model and restore every weight.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional

from simclr_tf import stages

MODES = ("train", "eval", "train_then_eval", "embed", "predict")
# Modes that apply an export to image files and train nothing.
INFERENCE_MODES = ("embed", "predict")
OUTPUT_FORMATS = ("npy", "csv")
TRAIN_MODES = tuple(stages.STAGES)
RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)
PROJ_HEAD_MODES = ("nonlinear", "linear", "none")
OPTIMIZERS = ("lars", "momentum", "adam")
LR_SCALINGS = ("linear", "sqrt")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
# TensorFlow's oneDNN CPU kernels (simclr_tf.cpu): auto chooses by CPU.
ONEDNN_SETTINGS = ("auto", "on", "off")

# The dataset bundled inside the package (a small CIFAR-10 sample), so that
# `python run.py` works offline on a fresh machine.
BUNDLED_DATASET = "cifar10_sample"
IMAGE_FOLDER = "image_folder"

# Smallest input the stems accept: the CIFAR stem keeps the resolution until
# block group 2 and halves it three times; the ImageNet stem divides by 32.
MIN_IMAGE_SIZE_CIFAR_STEM = 8
MIN_IMAGE_SIZE_IMAGENET_STEM = 64
CIFAR_STEM_MAX_SIZE = 32


class ConfigError(ValueError):
  """A flag value that cannot work; the message names flag, value and fix."""


def num_proj_layers(proj_head_mode: str, num_layers: int) -> int:
  """Layers of a whole projection head: 0 ('none'), 1 ('linear') or
  `num_layers` ('nonlinear')."""
  return {"none": 0, "linear": 1, "nonlinear": num_layers}[proj_head_mode]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The architecture of a SimCLR model: everything needed to rebuild it.

  Attributes:
    resnet_depth: 18, 34 (basic blocks) or 50, 101, 152, 200 (bottlenecks).
    width_multiplier: channel multiplier of the ResNet (paper: 1, 2, 3;
      fractions such as 0.5 give narrow networks for small budgets).
    sk_ratio: selective-kernel reduction ratio; 0 disables SK (paper: 1/16).
    se_ratio: squeeze-excitation ratio; 0 disables SE.
    cifar_stem: 3x3 stride-1 stem without max-pool (images of 32 px or less).
    batch_norm_decay: moving-average momentum of batch norm.
    global_bn: synchronise batch norm statistics across replicas.
    proj_head_mode: 'nonlinear', 'linear' or 'none'.
    num_proj_layers: number of layers of the (nonlinear) projection head.
    proj_out_dim: output width of the projection head.
    proj_layers_kept: projection layers kept in the model (None: all). Fine-
      tuning from layer k drops the layers above it.
    num_classes: classes of the supervised head; 0 means no head.
    sup_head_input: which projection-head output feeds the supervised head
      (0: encoder output, k: output of projection layer k).
    sup_head_stop_gradient: True for the linear classifier trained alongside
      pretraining; its gradient does not reach the encoder.
  """

  resnet_depth: int = 18
  width_multiplier: float = 1.0
  sk_ratio: float = 0.0
  se_ratio: float = 0.0
  cifar_stem: bool = True
  batch_norm_decay: float = 0.9
  global_bn: bool = True
  proj_head_mode: str = "nonlinear"
  num_proj_layers: int = 3
  proj_out_dim: int = 128
  proj_layers_kept: Optional[int] = None
  num_classes: int = 0
  sup_head_input: int = 0
  sup_head_stop_gradient: bool = False

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(
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


@dataclasses.dataclass(frozen=True)
class Config:
  """Every value of one run, as parsed from the command line."""

  # What to do.
  mode: str = "train"
  train_mode: str = "pretrain"
  model_dir: str = "/tmp/simclr_tf"
  init_from: str = ""
  init_head: bool = False
  teacher: str = ""
  seed: int = 0

  # Data.
  dataset: str = BUNDLED_DATASET
  data_dir: str = ""
  train_split: str = "train"
  eval_split: str = "test"
  image_size: int = 32
  color_jitter_strength: float = 0.5
  use_blur: bool = False
  cache_dataset: bool = True
  label_fraction: float = 1.0
  strict_data: bool = False

  # Model.
  resnet_depth: int = 18
  width_multiplier: float = 1.0
  sk_ratio: float = 0.0
  se_ratio: float = 0.0
  batch_norm_decay: float = 0.9
  global_bn: bool = True
  proj_head_mode: str = "nonlinear"
  num_proj_layers: int = 3
  proj_out_dim: int = 128
  ft_proj_selector: int = 1
  lineareval_while_pretraining: bool = True
  fine_tune_after_block: int = -1

  # Optimisation.
  train_batch_size: int = 128
  eval_batch_size: int = 256
  train_epochs: int = 1
  train_steps: int = 0
  optimizer: str = "lars"
  momentum: float = 0.9
  learning_rate: float = 1.0
  learning_rate_scaling: str = "linear"
  warmup_epochs: float = 0.1
  weight_decay: float = 1e-4
  temperature: float = 0.5
  hidden_norm: bool = True
  distill_temperature: float = 0.1
  distill_label_weight: float = 0.0
  memory_size: int = 0
  memory_momentum: float = 0.999
  precision: str = "auto"
  jit_compile: bool = False
  steps_per_execution: int = 1
  onednn: str = "auto"

  # Checkpoints and logs.
  checkpoint_steps: int = 0
  checkpoint_epochs: int = 1
  keep_checkpoint_max: int = 5
  log_images: bool = True

  # Monitoring and inference.
  knn_eval_epochs: int = -1
  knn_max_examples: int = 10000
  output_format: str = "npy"

  # Distribution.
  strategy: str = "auto"
  tpu: str = ""
  cpu_replicas: int = 0

  @property
  def cifar_stem(self) -> bool:
    return self.image_size <= CIFAR_STEM_MAX_SIZE

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)


def _check_choice(name: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(
        f"--{name}={value!r} is not allowed; use one of: "
        f"{', '.join(str(a) for a in allowed)}.")


def whole_channels(width_multiplier: float) -> bool:
  """True for a ResNet width multiplier that gives every layer whole
  channels: positive, with 64 (the narrowest base width) x it an integer."""
  channels = 64 * width_multiplier
  return width_multiplier > 0 and abs(channels - round(channels)) < 1e-9


def _check_range(name: str, value, low, high, low_open=False, fix=""):
  too_low = value <= low if low_open else value < low
  if too_low or (high is not None and value > high):
    bracket = "(" if low_open else "["
    upper = "inf)" if high is None else f"{high}]"
    raise ConfigError(
        f"--{name}={value!r} is outside {bracket}{low}, {upper}" +
        (f"; {fix}" if fix else "."))


def validate(cfg: Config) -> Config:
  """Checks values and their combinations; raises ConfigError naming the flag.

  Only checks that need no file system or model: run.py calls it before it
  builds anything. Data- and export-dependent checks happen where the data
  and exports are opened, still before any model is built.
  """
  _check_choice("mode", cfg.mode, MODES)
  _check_choice("train_mode", cfg.train_mode, TRAIN_MODES)
  _check_choice("resnet_depth", cfg.resnet_depth, RESNET_DEPTHS)
  _check_choice("proj_head_mode", cfg.proj_head_mode, PROJ_HEAD_MODES)
  _check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
  _check_choice("learning_rate_scaling", cfg.learning_rate_scaling,
                LR_SCALINGS)
  _check_choice("precision", cfg.precision, PRECISIONS)
  _check_choice("onednn", cfg.onednn, ONEDNN_SETTINGS)
  _check_choice("strategy", cfg.strategy, STRATEGIES)
  _check_choice("output_format", cfg.output_format, OUTPUT_FORMATS)
  _check_range("knn_eval_epochs", cfg.knn_eval_epochs, -1, None,
               fix="use -1 (auto), 0 (off) or a number of epochs.")
  _check_range("knn_max_examples", cfg.knn_max_examples, 1, None)
  if cfg.mode in INFERENCE_MODES:
    if not cfg.init_from:
      raise ConfigError(
          f"--mode={cfg.mode} needs --init_from=EXPORT (a saved_model/ of a "
          "stage, or one written by tf_hub_export.import_official).")
    if cfg.dataset not in (BUNDLED_DATASET, IMAGE_FOLDER):
      raise ConfigError(
          f"--mode={cfg.mode} reads image files: use --dataset=image_folder "
          f"--data_dir=ROOT (images under ROOT/{cfg.eval_split}/, the "
          f"--eval_split), not --dataset={cfg.dataset}.")
  if not whole_channels(cfg.width_multiplier):
    raise ConfigError(
        f"--width_multiplier={cfg.width_multiplier!r} does not give whole "
        "channels (64 x the multiplier must be a whole number); use e.g. "
        "0.25, 0.5, 1, 2 or 3.")
  _check_range("sk_ratio", cfg.sk_ratio, 0.0, 1.0)
  _check_range("se_ratio", cfg.se_ratio, 0.0, 1.0)
  _check_range("batch_norm_decay", cfg.batch_norm_decay, 0.0, 1.0)
  _check_range("num_proj_layers", cfg.num_proj_layers, 1, None)
  _check_range("proj_out_dim", cfg.proj_out_dim, 1, None)
  _check_range("label_fraction", cfg.label_fraction, 0.0, 1.0, low_open=True,
               fix="give a fraction of the labeled examples such as 0.1.")
  _check_range("train_batch_size", cfg.train_batch_size, 1, None)
  _check_range("eval_batch_size", cfg.eval_batch_size, 1, None)
  _check_range("train_epochs", cfg.train_epochs, 0, None)
  _check_range("train_steps", cfg.train_steps, 0, None)
  _check_range("learning_rate", cfg.learning_rate, 0.0, None)
  _check_range("warmup_epochs", cfg.warmup_epochs, 0.0, None)
  _check_range("weight_decay", cfg.weight_decay, 0.0, None)
  _check_range("momentum", cfg.momentum, 0.0, 1.0)
  _check_range("temperature", cfg.temperature, 0.0, None, low_open=True)
  _check_range("distill_temperature", cfg.distill_temperature, 0.0, None,
               low_open=True)
  _check_range("distill_label_weight", cfg.distill_label_weight, 0.0, None)
  _check_range("color_jitter_strength", cfg.color_jitter_strength, 0.0, None)
  _check_range("memory_size", cfg.memory_size, 0, None)
  _check_range("memory_momentum", cfg.memory_momentum, 0.0, 1.0)
  _check_range("fine_tune_after_block", cfg.fine_tune_after_block, -1, 4)
  _check_range("checkpoint_steps", cfg.checkpoint_steps, 0, None)
  _check_range("checkpoint_epochs", cfg.checkpoint_epochs, 0, None)
  _check_range("keep_checkpoint_max", cfg.keep_checkpoint_max, 1, None)
  _check_range("steps_per_execution", cfg.steps_per_execution, 1, None)
  _check_range("cpu_replicas", cfg.cpu_replicas, 0, None)

  min_size = (MIN_IMAGE_SIZE_CIFAR_STEM if cfg.cifar_stem
              else MIN_IMAGE_SIZE_IMAGENET_STEM)
  if cfg.image_size < min_size:
    stem = "CIFAR" if cfg.cifar_stem else "ImageNet"
    raise ConfigError(
        f"--image_size={cfg.image_size} is too small for the {stem} stem; "
        f"use at least {min_size}.")
  if cfg.image_size > CIFAR_STEM_MAX_SIZE and (
      cfg.image_size < MIN_IMAGE_SIZE_IMAGENET_STEM):
    raise ConfigError(
        f"--image_size={cfg.image_size} is too small for the ImageNet stem "
        f"(used above {CIFAR_STEM_MAX_SIZE} px); use at most "
        f"{CIFAR_STEM_MAX_SIZE} or at least {MIN_IMAGE_SIZE_IMAGENET_STEM}.")
  max_selector = num_proj_layers(cfg.proj_head_mode, cfg.num_proj_layers)
  _check_range("ft_proj_selector", cfg.ft_proj_selector, 0, max_selector,
               fix=f"--proj_head_mode={cfg.proj_head_mode} with "
               f"--num_proj_layers={cfg.num_proj_layers} has "
               f"{max_selector} projection layer(s).")
  stage = stages.get(cfg.train_mode)
  if cfg.init_head and (not cfg.init_from or
                        cfg.mode not in ("train", "train_then_eval")):
    raise ConfigError(
        "--init_head restores the supervised head of --init_from when "
        "training; give --init_from=EXPORT (a fine-tuned export) and "
        "--mode=train or train_then_eval, or drop --init_head.")
  if stage.teacher and not cfg.teacher and cfg.mode != "eval":
    raise ConfigError(
        f"--teacher is empty; --train_mode={stage.name} needs --teacher=DIR, "
        "a SavedModel with a 'logits_sup' output (e.g. a fine-tune export).")
  unused = stages.unused_flags(stage, dataclasses.asdict(cfg))
  if unused:
    flag, value, users = unused[0]
    raise ConfigError(
        f"--{flag}={value!r} is only used by --train_mode="
        f"{' or '.join(users)}; drop it or change --train_mode.")
  if cfg.tpu and cfg.strategy not in ("auto", "tpu"):
    raise ConfigError(
        f"--tpu={cfg.tpu!r} needs --strategy=tpu or auto; received "
        f"--strategy={cfg.strategy}.")
  if cfg.cpu_replicas and cfg.strategy not in ("auto", "mirrored"):
    raise ConfigError(
        f"--cpu_replicas={cfg.cpu_replicas} makes a mirrored strategy over "
        f"CPU devices; received --strategy={cfg.strategy}. Use "
        "--strategy=auto or mirrored.")
  if cfg.cpu_replicas > 1 and cfg.train_batch_size % cfg.cpu_replicas:
    raise ConfigError(
        f"--train_batch_size={cfg.train_batch_size} does not split evenly "
        f"over --cpu_replicas={cfg.cpu_replicas}; use a multiple of it.")
  return cfg


def model_config(cfg: Config, num_classes: int,
                 base: Optional[ModelConfig] = None) -> ModelConfig:
  """The architecture for this run's stage.

  Args:
    cfg: the run's config.
    num_classes: classes of the data (0 when unlabeled).
    base: the architecture of the export passed by --init_from, if any; its
      backbone and head shape are kept, the supervised head is rebuilt.
  Returns:
    pretrain: the full projection head; a stop-gradient linear classifier on
      projection output `ft_proj_selector` if lineareval_while_pretraining.
    finetune / distill: the projection head cut at `ft_proj_selector` with a
      new supervised head on top (SimCLRv2, section 2).
  """
  if base is None:
    base = ModelConfig(
        resnet_depth=cfg.resnet_depth,
        width_multiplier=cfg.width_multiplier,
        sk_ratio=cfg.sk_ratio,
        se_ratio=cfg.se_ratio,
        cifar_stem=cfg.cifar_stem,
        batch_norm_decay=cfg.batch_norm_decay,
        global_bn=cfg.global_bn,
        proj_head_mode=cfg.proj_head_mode,
        num_proj_layers=cfg.num_proj_layers,
        proj_out_dim=cfg.proj_out_dim)
  else:
    base = dataclasses.replace(base, batch_norm_decay=cfg.batch_norm_decay,
                               global_bn=cfg.global_bn)
  if stages.get(cfg.train_mode).whole_proj_head:
    with_head = cfg.lineareval_while_pretraining and num_classes > 0
    return dataclasses.replace(
        base, proj_layers_kept=None,
        num_classes=num_classes if with_head else 0,
        sup_head_input=cfg.ft_proj_selector, sup_head_stop_gradient=True)
  kept = cfg.ft_proj_selector
  if base.proj_layers_kept is not None and kept > base.proj_layers_kept:
    raise ConfigError(
        f"--ft_proj_selector={kept} asks for projection layer {kept}, but the "
        f"--init_from export keeps only {base.proj_layers_kept}; use at most "
        f"{base.proj_layers_kept}.")
  return dataclasses.replace(
      base, proj_layers_kept=kept, num_classes=num_classes,
      sup_head_input=kept, sup_head_stop_gradient=False)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return max(1, num_examples // batch_size)


def total_train_steps(cfg: Config, num_examples: int) -> int:
  if cfg.train_steps:
    return cfg.train_steps
  return cfg.train_epochs * steps_per_epoch(num_examples, cfg.train_batch_size)


def warmup_steps(cfg: Config, num_examples: int) -> int:
  return int(round(cfg.warmup_epochs *
                   num_examples / cfg.train_batch_size))


def scaled_learning_rate(base_lr: float, batch_size: int, scaling: str) -> float:
  """Learning-rate scaling of the paper (appendix B.1 of SimCLR v1)."""
  if scaling == "linear":
    return base_lr * batch_size / 256.0
  if scaling == "sqrt":
    return base_lr * math.sqrt(batch_size)
  raise ConfigError(f"--learning_rate_scaling={scaling!r} is not allowed; "
                    f"use one of: {', '.join(LR_SCALINGS)}.")
