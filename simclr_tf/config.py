"""Run configuration: one frozen dataclass built by `run.py` from its flags.

No module below the entry point reads flags. `Config` holds every value of a
run (it is what `model_dir/flags.json` records); `ModelConfig` holds only the
architecture, which the SavedModel export carries so a later stage can rebuild
the same Keras model and restore every weight.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

from simclr_tf import stages
from simclr_tf.data import BUNDLED_DATASET, IMAGE_FOLDER
from simclr_tf.models.config import (BLOCK_TYPES, CIFAR_STEM_MAX_SIZE,
                                     PROJ_HEAD_MODES, RESNET_DEPTHS,
                                     ArchOptions, ModelConfig,
                                     fields_of_kind, user_fields,
                                     num_proj_layers, whole_channels)
from simclr_tf.optim.scaling import LR_SCALINGS, scaled_learning_rate  # noqa: F401

MODES = ("train", "eval", "train_then_eval", "embed", "predict", "export")
# Modes that apply an export to image files and train nothing.
INFERENCE_MODES = ("embed", "predict")
OUTPUT_FORMATS = ("npy", "csv")
# --mode=export: a file for devices (simclr_tf.deploy owns the values).
EXPORT_FORMATS = ("litert", "onnx")
QUANTIZATIONS = ("none", "dynamic", "int8")
TRAIN_MODES = tuple(stages.STAGES)
OPTIMIZERS = ("lars", "momentum", "adam")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
# TensorFlow's oneDNN CPU kernels (simclr_tf.cpu): auto chooses by CPU.
ONEDNN_SETTINGS = ("auto", "on", "off")
# --recompute_blocks's default: chosen per run on its hardware
# (`distribute.resolve_recompute`).
AUTO_RECOMPUTE = -1

# Smallest input the stems accept: the CIFAR stem keeps the resolution until
# block group 2 and halves it three times; the ImageNet stem divides by 32.
MIN_IMAGE_SIZE_CIFAR_STEM = 8
MIN_IMAGE_SIZE_IMAGENET_STEM = 64
# Largest --image_size accepted: 16x the paper's 224 px in pixels; one
# batch of larger images exhausts a machine's memory before it trains.
MAX_IMAGE_SIZE = 1024


class ConfigError(ValueError):
  """A flag value that cannot work; the message names flag, value and fix."""


@dataclasses.dataclass(frozen=True)
class Config(ArchOptions):
  """Every value of one run: the architecture options (`ArchOptions`, the
  one list of them) and the run's own below."""

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

  # Model (the architecture itself is `ArchOptions`; a run resolves its
  # default recompute on its hardware, a ModelConfig holds the number).
  recompute_blocks: int = dataclasses.field(
      default=AUTO_RECOMPUTE, metadata=next(
          f.metadata for f in dataclasses.fields(ArchOptions)
          if f.name == "recompute_blocks"))
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

  # Deployment (--mode=export).
  export_format: str = "litert"
  quantize: str = "none"
  min_agreement: float = 0.98

  # Distribution.
  strategy: str = "auto"
  tpu: str = ""
  cpu_replicas: int = 0

  @property
  def cifar_stem(self) -> bool:
    return self.image_size <= CIFAR_STEM_MAX_SIZE

  def values(self) -> dict:
    """{field: value}, flat (without copying in-memory data)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def to_json(self) -> str:
    values = self.values()
    if not isinstance(values["dataset"], str):   # in-memory images
      values["dataset"] = repr(values["dataset"])
    return json.dumps(values, indent=2, sort_keys=True)

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)


def _check_choice(name: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(
        f"--{name}={value!r} is not allowed; use one of: "
        f"{', '.join(str(a) for a in allowed)}.")


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
  _check_choice("export_format", cfg.export_format, EXPORT_FORMATS)
  _check_choice("quantize", cfg.quantize, QUANTIZATIONS)
  _check_range("min_agreement", cfg.min_agreement, 0.0, 1.0,
               fix="give the fraction of eval images whose prediction must "
               "not change, e.g. 0.98.")
  if cfg.mode == "export" and not cfg.init_from:
    raise ConfigError(
        "--mode=export needs --init_from=EXPORT (the saved_model/ of a "
        "stage, usually the distilled student).")
  if cfg.mode != "export":
    for name in ("export_format", "quantize", "min_agreement"):
      if getattr(cfg, name) != getattr(Config, name):
        raise ConfigError(
            f"--{name}={getattr(cfg, name)!r} is only used by --mode=export; "
            "drop it or use --mode=export.")
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
  blocks = sum(BLOCK_TYPES[cfg.resnet_depth][1])
  _check_range("recompute_blocks", cfg.recompute_blocks, AUTO_RECOMPUTE,
               blocks, fix=f"give -1 (auto), 0 (off) or 1 to {blocks}, the "
               f"blocks of a ResNet-{cfg.resnet_depth}.")
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
  if cfg.image_size > MAX_IMAGE_SIZE:
    raise ConfigError(
        f"--image_size={cfg.image_size} is too large: at most "
        f"{MAX_IMAGE_SIZE} (SimCLRv2 uses 224, and 32 on CIFAR); one batch "
        "at this size would not fit in memory.")
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
  unused = stages.unused_flags(stage, cfg.values())
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


def arch_options(cfg: Config) -> dict:
  """The run's architecture options, {field: value} of `ArchOptions`."""
  return {name: getattr(cfg, name) for name in user_fields()}


def model_config(cfg: Config, num_classes: int,
                 base: Optional[ModelConfig] = None) -> ModelConfig:
  """The architecture for this run's stage.

  Args:
    cfg: the run's config. A training run has resolved --recompute_blocks
      on its hardware (`runner.resolve_hardware`); where it has not (an
      evaluation, a network built by hand), -1 recomputes nothing.
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
    base = ModelConfig(cifar_stem=cfg.cifar_stem, **arch_options(cfg))
  else:
    # The export fixes the weights' shapes; how to train them is this run's.
    base = dataclasses.replace(
        base, **{name: getattr(cfg, name)
                 for name in fields_of_kind("train", "compute")})
  base = dataclasses.replace(
      base, recompute_blocks=max(base.recompute_blocks, 0))
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
