"""Checks that an export handed from one stage to the next fits the run.

The one home of the hand-over rules (SimCLRv2's pretrain -> fine-tune ->
distill, and any export given to evaluate): the architecture the run asks
for must be the export's; a restored supervised head must predict the
run's classes from the same projection layer; a teacher must have a
supervised head for the data's classes; and only the weights that are new
by design (the supervised head of a training stage) may be missing from
what an export restores. The export reader (`tf_hub_export.load`) then
checks that the rebuilt model computes what the SavedModel computes.
"""

from __future__ import annotations

from simclr_tf import config as config_lib
from simclr_tf.config import Config, ConfigError
from simclr_tf.models.config import fields_of_kind

# Architecture fields that the flags and an --init_from export must share:
# the stem (from --image_size), then those that fix the weights' shapes.
ARCH_FLAGS = ("cifar_stem",) + fields_of_kind("arch")


def check_arch(cfg: Config, meta, flag: str, fields=ARCH_FLAGS) -> None:
  """The flags' architecture must be the export's (in `fields`)."""
  ours = config_lib.model_config(cfg, 0)
  for name in fields:
    a, b = getattr(ours, name), getattr(meta.model_config, name)
    if a != b:
      shown = ("image_size" if name == "cifar_stem" else name)
      value = cfg.image_size if name == "cifar_stem" else a
      want = (f"{'<=' if b else '>'} {config_lib.CIFAR_STEM_MAX_SIZE}"
              if name == "cifar_stem" else b)
      raise ConfigError(
          f"--{shown}={value} does not match the --{flag} export, which has "
          f"{shown}={want}; set --{shown} to match it.")


def check_head(cfg: Config, init_meta, want: int) -> None:
  """--init_head needs a head of the `want` classes this run predicts."""
  head = init_meta.model_config
  if not head.num_classes or (want and head.num_classes != want):
    raise ConfigError(
        f"--init_head: --init_from={cfg.init_from!r} has "
        f"{head.num_classes or 'no'} supervised classes but this run "
        f"predicts {want}; give a fine-tuned export of the same classes, or "
        "drop --init_head.")
  ours = config_lib.model_config(cfg, want)
  if ours.sup_head_input != head.sup_head_input:
    raise ConfigError(
        f"--init_head: --init_from={cfg.init_from!r}'s head reads "
        f"{head.sup_head_input}, this run's reads {ours.sup_head_input}; "
        "set --ft_proj_selector as when it was fine-tuned.")


def check_teacher(cfg: Config, teacher_meta, data_classes: int) -> int:
  """The teacher must predict the data's classes; returns the run's class
  count (the teacher's, also for unlabeled data)."""
  t_classes = teacher_meta.model_config.num_classes
  if not t_classes:
    raise ConfigError(
        f"--teacher={cfg.teacher!r} has no 'logits_sup' output; give a "
        "fine-tuned export.")
  if data_classes and data_classes != t_classes:
    raise ConfigError(
        f"--teacher={cfg.teacher!r} predicts {t_classes} classes but "
        f"--dataset={cfg.dataset} has {data_classes}; distill on the data "
        "the teacher was fine-tuned for.")
  return t_classes


def is_supervised_head(path: str) -> bool:
  """A supervised-head weight: new (zero-initialised) in a training stage
  unless --init_head restores it."""
  return "head_supervised" in path.split("/")


def new_weights(cfg: Config):
  """Which weights a training run may leave unrestored from --init_from:
  the supervised head, unless --init_head restores it too."""
  return None if cfg.init_head else is_supervised_head
