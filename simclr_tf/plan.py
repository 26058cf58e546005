"""Everything a run decides before it builds a model: its folder, its data,
the exports it starts from, its architecture and its number of steps.

Every check here needs files but no model, so a bad combination fails in
under a second with one line (`ConfigError`), before anything is built.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Optional

from simclr_tf import atomic
from simclr_tf import config as config_lib
from simclr_tf import handover
from simclr_tf import identity as identity_lib
from simclr_tf import stages
from simclr_tf.config import Config, ConfigError, ModelConfig
from simclr_tf.data import sources
from tf_hub_export import load as load_lib

FLAGS_FILE = "flags.json"


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything decided before any model is built."""

  info: sources.DatasetInfo
  model_config: ModelConfig
  num_train_examples: int
  total_steps: int
  steps_per_epoch: int
  chunk_steps: int
  init_meta: Optional[object] = None
  teacher_meta: Optional[object] = None
  identity: Optional[dict] = None     # what model_dir/run.json records


def prepare_model_dir(cfg: Config) -> None:
  """Creates model_dir and proves it is writable (before anything else)."""
  probe = os.path.join(cfg.model_dir,
                       f".write_probe.{socket.gethostname()}.{os.getpid()}")
  try:
    os.makedirs(cfg.model_dir, exist_ok=True)
    try:
      with open(probe, "wb") as f:
        f.write(b"\0" * (1 << 20))
        f.flush()
        os.fsync(f.fileno())
    finally:
      if os.path.exists(probe):
        os.remove(probe)
  except OSError as e:
    reason = ("a file, not a folder" if isinstance(e, FileExistsError)
              else e.strerror)
    raise ConfigError(
        f"--model_dir={cfg.model_dir!r} is not writable ({reason}); "
        "choose a folder with free space that you can write to.") from e


def record_flags(cfg: Config, plan: Optional[Plan] = None) -> None:
  """Writes model_dir/flags.json (and run.json, the run's identity): only
  once the run's plan holds, so a run refused with exit 2 leaves the record
  of the last run that started."""
  atomic.write_text(os.path.join(cfg.model_dir, FLAGS_FILE), cfg.to_json())
  if plan is not None and plan.identity is not None:
    identity_lib.record(cfg.model_dir, plan.identity)


def _check_eval_target(cfg: Config) -> None:
  """An export evaluated into a run's folder must be that run's export:
  its result.json would otherwise replace the run's own."""
  if not identity_lib.holds_a_run(cfg.model_dir):
    return
  own = os.path.realpath(os.path.join(cfg.model_dir, "saved_model"))
  if os.path.realpath(load_lib.resolve_export(cfg.init_from)) != own:
    raise ConfigError(
        f"--mode=eval --init_from={cfg.init_from!r} would write its "
        f"result.json into --model_dir={cfg.model_dir!r}, which holds "
        "another run; choose an empty or new --model_dir for this "
        "evaluation.")


def make_plan(cfg: Config, training: bool = True) -> Plan:
  """Opens data and exports; raises ConfigError for any bad combination.

  Args:
    cfg: the run's config.
    training: plan a training run (reads the teacher, checks the batch
      size against the training data); False for an evaluation.
  """
  stage = stages.get(cfg.train_mode)
  try:
    # `config.validate` leaves --label_fraction at 1 in other stages.
    info = sources.get_info(cfg.dataset, cfg.data_dir, cfg.train_split,
                            cfg.eval_split, strict=cfg.strict_data,
                            label_fraction=cfg.label_fraction, seed=cfg.seed)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from e
  init_meta = teacher_meta = None
  try:
    if cfg.init_from:
      init_meta = load_lib.read_meta(cfg.init_from, "init_from")
      # Evaluating an export takes its architecture as it is; only the
      # image size must suit its stem.
      handover.check_arch(cfg, init_meta, "init_from",
                          handover.ARCH_FLAGS if training else ("cifar_stem",))
    if stage.teacher and training:
      teacher_meta = load_lib.read_meta(cfg.teacher, "teacher")
  except load_lib.ExportError as e:
    raise ConfigError(str(e)) from e
  if training:
    run_identity = identity_lib.check(cfg, training=True)
  elif cfg.init_from:
    _check_eval_target(cfg)
    run_identity = None
  else:   # model_dir's own checkpoint: the flags must describe its run
    identity_lib.check(cfg, training=False)
    run_identity = None

  num_classes = info.num_classes
  if teacher_meta is not None:
    num_classes = handover.check_teacher(cfg, teacher_meta, num_classes)
  if cfg.init_head and init_meta is not None:
    handover.check_head(cfg, init_meta, num_classes)
  if stage.needs_labels and not num_classes:
    raise ConfigError(
        f"--dataset={cfg.dataset} has no labels (no class folders); "
        f"--train_mode={stage.name} needs labeled data.")
  model_config = config_lib.model_config(cfg, num_classes)

  num_train = info.num_train_examples
  if training and cfg.train_batch_size > num_train:
    raise ConfigError(
        f"--train_batch_size={cfg.train_batch_size} is larger than the "
        f"{num_train} training examples; use at most {num_train}.")
  spe = config_lib.steps_per_epoch(num_train, cfg.train_batch_size)
  total = config_lib.total_train_steps(cfg, num_train)
  chunk = cfg.checkpoint_steps or max(1, spe * max(1, cfg.checkpoint_epochs))
  chunk = min(chunk, max(total, 1))
  return Plan(info=info, model_config=model_config, num_train_examples=num_train,
              total_steps=total, steps_per_epoch=spe, chunk_steps=chunk,
              init_meta=init_meta, teacher_meta=teacher_meta,
              identity=run_identity)


