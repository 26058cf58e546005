"""Checks that an --init_from export fits the run its flags describe."""

from __future__ import annotations

from simclr_tf import config as config_lib
from simclr_tf.config import Config, ConfigError

# Architecture fields that the flags and an --init_from export must share.
ARCH_FLAGS = ("resnet_depth", "width_multiplier", "sk_ratio", "se_ratio",
              "cifar_stem", "proj_head_mode", "num_proj_layers",
              "proj_out_dim")


def check_arch(cfg: Config, meta, flag: str) -> None:
  """The flags' architecture must be the export's."""
  ours = config_lib.model_config(cfg, 0)
  for name in ARCH_FLAGS:
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
