"""Checkpoints: what one holds, where it goes, and how a run resumes.

A checkpoint of `model_dir/checkpoints/ckpt-<step>` holds the network
(`model`, and every variable by its path under `net_weights`), the optimizer
(its slots and step counter) and, in a pretraining run with
`--memory_size`, SimCLRv2's memory (network, queue, pointer). The chief
writes them; the other workers of a multi-worker run must take part in
every save and write theirs to a scratch folder that is deleted at the end
(`scratch_dir`). Every worker resumes from the chief's newest checkpoint that
reads back (`resume`).

`Checkpointer` saves at the end of every chunk of steps and on SIGTERM
(preemption), and never saves a non-finite state.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import re
import shutil
import signal
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from simclr_tf import atomic
from simclr_tf import distribute
from simclr_tf.callbacks import LIKELY_NAN_CAUSES, NonFiniteLossError
from simclr_tf.config import Config, ConfigError
from simclr_tf.models.simclr import variables_by_path

log = logging.getLogger("simclr_tf")

# Folder of model_dir where non-chief workers write (and then delete) the
# checkpoints that every worker must save in a multi-worker run.
SCRATCH_DIR = ".worker_scratch"
# Signals that stop training after a checkpoint: a preemption notice
# (SIGTERM) and Ctrl-C (SIGINT).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# TensorFlow's state file of a checkpoint folder (which ckpt-N exist).
STATE_FILE = "checkpoint"


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, permissions, ...)."""


class VariablesByPath(tf.Module):
  """Checkpoint dependencies on variables, named by their paths.

  Keras 3 does not make layers kept in Python lists (the block groups, the
  projection layers) checkpoint dependencies of their model, so
  `tf.train.Checkpoint(model=net)` alone would save only the trainable
  weights (through the optimizer) and lose every batch-norm moving average.

  Args:
    variables: {path: variable}.
  """

  def __init__(self, variables: dict):
    super().__init__(name="variables_by_path")
    self.by_path = dict(variables)


# --- Where checkpoints go ----------------------------------------------------

def checkpoint_dir(model_dir: str) -> str:
  """Where the chief writes checkpoints, and where every worker resumes."""
  return os.path.join(model_dir, "checkpoints")


def scratch_dir(model_dir: str, strategy: tf.distribute.Strategy) -> str:
  """The folder a non-chief worker saves its (discarded) checkpoints to.

  Every worker of a multi-worker run must take part in a checkpoint save
  (variables that synchronise on read are all-reduced while saving); the
  non-chief ones write to model_dir/.worker_scratch/<task>, removed at the
  end of training (`remove_scratch`).

  Args:
    model_dir: the run's --model_dir.
    strategy: the run's strategy.
  Returns:
    The folder's path.
  """
  return os.path.join(model_dir, SCRATCH_DIR, distribute.task_name(strategy))


def remove_scratch(directory: str) -> None:
  """Deletes a non-chief worker's scratch folder (and SCRATCH_DIR if empty).

  Args:
    directory: the folder `scratch_dir` returned.
  """
  if tf.io.gfile.isdir(directory):
    tf.io.gfile.rmtree(directory)
  parent = os.path.dirname(directory)
  if os.path.basename(parent) == SCRATCH_DIR and os.path.isdir(parent):
    try:
      os.rmdir(parent)   # only if empty: other workers may still use it
    except OSError:
      pass


# --- What a checkpoint holds, and resuming -----------------------------------

def make_manager(cfg: Config, learner, chief: bool,
                 strategy=None) -> tf.train.CheckpointManager:
  """The manager this process saves with (the chief's or a scratch one).

  Args:
    cfg: the run's config.
    learner: the `Learner` (network, optimizer, task).
    chief: whether this process is the chief.
    strategy: the run's strategy (names a non-chief's scratch folder).
  Returns:
    A `tf.train.CheckpointManager` keeping --keep_checkpoint_max.
  """
  extra = {}
  if getattr(learner.task, "memory", None) is not None:
    extra["memory"] = learner.task.memory    # queue, pointer, memory net
  ckpt = tf.train.Checkpoint(
      model=learner.net, optimizer=learner.optimizer,
      net_weights=VariablesByPath(variables_by_path(learner.net)), **extra)
  directory = checkpoint_dir(cfg.model_dir)
  if not chief:   # other workers write to a scratch folder, then discard it
    directory = scratch_dir(cfg.model_dir, strategy)
  return tf.train.CheckpointManager(ckpt, directory,
                                    max_to_keep=cfg.keep_checkpoint_max)


def _remove_killed_saves(directory: str) -> None:
  """Deletes the temporary files of saves killed before they completed."""
  for leftover in tf.io.gfile.glob(os.path.join(directory, "*_temp*")):
    if tf.io.gfile.isdir(leftover):
      tf.io.gfile.rmtree(leftover)
    else:
      tf.io.gfile.remove(leftover)


def list_checkpoints(directory: str) -> list:
  """Prefixes of the complete `ckpt-<step>` checkpoints on disk, oldest
  first (read from the files themselves, not from the state file)."""
  found = []
  pattern = os.path.join(glob.escape(directory), "ckpt-*.index")
  for index in glob.glob(pattern):
    prefix = index[:-len(".index")]
    match = re.fullmatch(r"ckpt-(\d+)", os.path.basename(prefix))
    if match:
      found.append((int(match.group(1)), prefix))
  return [prefix for _, prefix in sorted(found)]


def _state_problem(directory: str, found: list) -> Optional[str]:
  """Why the state file `checkpoint` cannot be trusted, or None."""
  path = os.path.join(directory, STATE_FILE)
  if not os.path.exists(path):
    return "is missing"
  try:
    state = tf.train.get_checkpoint_state(directory)
  except Exception as e:  # pylint: disable=broad-except
    return f"is unreadable ({str(e).strip().splitlines()[0][:80]})"
  if state is None or not state.model_checkpoint_path:
    return "is garbled"
  listed = [state.model_checkpoint_path, *state.all_model_checkpoint_paths]
  for prefix in listed:
    full = prefix if os.path.isabs(prefix) else os.path.join(directory,
                                                             prefix)
    if not os.path.exists(full + ".index"):
      return f"names {os.path.basename(prefix)}, which is not there"
  newest = os.path.basename(state.model_checkpoint_path)
  if newest != os.path.basename(found[-1]):
    return f"names {newest} as the newest, but {os.path.basename(found[-1])} " \
        "is newer"
  return None


def repair_state(directory: str) -> None:
  """Rewrites the state file from the checkpoints on disk when it is
  missing, garbled or names checkpoints that are not there (the chief, before
  its manager reads it); the checkpoints themselves are not touched."""
  found = list_checkpoints(directory)
  if not found:
    return
  problem = _state_problem(directory, found)
  if problem is None:
    return
  log.warning("%s %s; listing the checkpoints themselves instead: %s.",
              os.path.join(directory, STATE_FILE), problem,
              ", ".join(os.path.basename(p) for p in found))
  names = [os.path.basename(p) for p in found]
  atomic.write_text(os.path.join(directory, STATE_FILE), "".join(
      [f'model_checkpoint_path: "{names[-1]}"\n'] +
      [f'all_model_checkpoint_paths: "{n}"\n' for n in names]))


def restore_latest(checkpoint: tf.train.Checkpoint, directory: str,
                   clean: bool = True, partial: bool = False) -> Optional[str]:
  """Restores the newest checkpoint of `directory` that reads back; None if
  there is none.

  The candidates are the `ckpt-<step>` files on disk, newest first, so a
  missing or garbled state file cannot hide them. A kill during a save
  cannot damage a complete checkpoint (TensorFlow writes the files first,
  then the index), but a disk error can; then the previous checkpoint is
  used, with a warning, and the damaged one is rewritten when training
  reaches its step again.

  Args:
    checkpoint: what to restore into.
    directory: the checkpoints' folder.
    clean: delete the files of saves that were killed before completing
      (only the process that writes the checkpoints should).
    partial: `checkpoint` holds part of what was saved (the network
      without its optimizer, to evaluate it).
  Returns:
    The restored checkpoint's path, or None.
  Raises:
    ConfigError: there are checkpoints but none can be restored.
  """
  if clean:
    _remove_killed_saves(directory)
  candidates = list(reversed(list_checkpoints(directory)))
  errors = []
  for path in candidates:
    try:
      status = checkpoint.restore(path)
      status.assert_existing_objects_matched()
      if partial:
        status.expect_partial()
      return path
    except Exception as e:  # pylint: disable=broad-except
      # Damaged files fail in many ways (OpError, IndexError, ...).
      errors.append(str(e).strip().splitlines()[0][:200])
      log.warning("Cannot restore %s (%s); trying an older checkpoint.",
                  path, errors[-1])
  if candidates:
    raise ConfigError(
        f"--model_dir={os.path.dirname(directory)!r} has "
        f"{len(candidates)} checkpoint(s) but none can be restored (newest: "
        f"{errors[0]}); they were written with other architecture flags or "
        "are damaged: rerun with the flags that wrote them, or choose a new "
        "--model_dir.")
  return None


def resume(cfg: Config, learner, chief: bool, strategy=None):
  """This process's manager, and the chief's newest checkpoint restored.

  A non-chief worker saves to its scratch folder but reads the chief's
  model_dir/checkpoints (a multi-worker model_dir must be shared).

  Args:
    cfg: the run's config.
    learner: the `Learner`.
    chief: whether this process is the chief.
    strategy: the run's strategy.
  Returns:
    (manager to save with, restored checkpoint path or None).
  Raises:
    ConfigError: there are checkpoints but none can be restored.
  """
  if chief:
    repair_state(checkpoint_dir(cfg.model_dir))
  manager = make_manager(cfg, learner, chief, strategy)
  return manager, restore_latest(manager.checkpoint,
                                 checkpoint_dir(cfg.model_dir), clean=chief)


def restore_network(cfg: Config, net) -> Optional[str]:
  """Restores only the network from model_dir's newest checkpoint that reads
  back (to evaluate it); returns its path, or None if there is none."""
  return restore_latest(tf.train.Checkpoint(model=net),
                        checkpoint_dir(cfg.model_dir), clean=False,
                        partial=True)


def step_of(path: str) -> int:
  """The step of a checkpoint path `.../ckpt-<step>`."""
  return int(path.rsplit("-", 1)[-1])


def _num_bytes(variables) -> int:
  return sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size
             for v in variables)


def check_free_space(cfg: Config, learner) -> None:
  """Fails now, not hours later, when model_dir cannot hold the outputs.

  The outputs are --keep_checkpoint_max checkpoints plus the one being
  written (weights and optimizer slots each) and an export (weights);
  checkpoints already in model_dir count as written.

  Args:
    cfg: the run's config.
    learner: the built `Learner`.
  Raises:
    ConfigError: too little free space.
  """
  weights = _num_bytes(learner.net.variables)
  ckpt = weights + _num_bytes(learner.optimizer.variables)
  written = atomic.folder_bytes(checkpoint_dir(cfg.model_dir))
  need = (cfg.keep_checkpoint_max + 1) * ckpt + weights - written
  free = shutil.disk_usage(cfg.model_dir).free
  if free < need:
    raise ConfigError(
        f"--model_dir={cfg.model_dir!r} has {free / 1e6:.0f} MB free but "
        f"--keep_checkpoint_max={cfg.keep_checkpoint_max} checkpoints and the "
        f"export of this model need about {need / 1e6:.0f} MB more; free some "
        "space, lower --keep_checkpoint_max or choose another --model_dir.")


# --- Saving during training -------------------------------------------------

def _non_finite(variables) -> list:
  """Paths of the floating-point variables that hold a NaN or an Inf."""
  bad = []
  for v in variables:
    if not tf.as_dtype(v.dtype).is_floating:
      continue
    if not bool(tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v)))):
      bad.append(getattr(v, "path", v.name))
  return bad


class Checkpointer(keras.callbacks.Callback):
  """Saves a checkpoint at the end of every `fit` epoch (a chunk of steps).

  Also saves when the process receives SIGTERM (preemption notice) or
  SIGINT (Ctrl-C), then stops training cleanly and sets `preempted` and
  `stopped_by` (the signal's name). Never saves a non-finite
  state: after a NaN or Inf loss it saves nothing, and before each save it
  checks that every weight and optimizer slot is finite (the step that makes
  the weights non-finite can still report a finite loss), so the last
  checkpoint stays the last good one.

  Args:
    manager: the manager to save with.
    handle_sigterm: save and stop on SIGTERM.
  """

  def __init__(self, manager: tf.train.CheckpointManager, handle_sigterm=True):
    super().__init__()
    self.manager = manager
    self.preempted = False
    self.stopped_by = None          # the signal's name once one arrived
    self._signal = None
    self._handle_sigterm = handle_sigterm
    self._previous_handlers = {}
    self._diverged = False
    self._saved_step = None

  def _on_signal(self, signum, frame):
    self._signal = signum

  def on_train_begin(self, logs=None):
    # The step training starts from is in a checkpoint already (or is 0).
    # A damaged newer checkpoint the restore fell back from is rewritten
    # when training reaches its step.
    self._saved_step = int(self.model.optimizer.iterations.numpy())
    if self._handle_sigterm:
      try:
        for signum in STOP_SIGNALS:
          self._previous_handlers[signum] = signal.signal(signum,
                                                          self._on_signal)
      except ValueError:   # not the main thread
        self._handle_sigterm = False

  def _check_finite(self, step: int) -> None:
    variables = list(self.model.weights) + list(
        self.model.optimizer.variables)
    bad = _non_finite(variables)
    if bad:
      self._diverged = True
      raise NonFiniteLossError(
          f"{len(bad)} weight(s) became NaN or Inf at step {step} (first: "
          f"{bad[0]}); nothing was saved. {LIKELY_NAN_CAUSES} The last "
          "checkpoint and export were left untouched.")

  def save(self):
    """Saves the current step, unless saved already; never a NaN state."""
    step = int(self.model.optimizer.iterations.numpy())
    if self._diverged:
      log.warning("Not saving step %d: training diverged.", step)
      return
    if step == self._saved_step:   # restored from, or saved already
      return
    self._check_finite(step)
    try:
      path = self.manager.save(checkpoint_number=step)
      self._saved_step = step
    except (OSError, tf.errors.OpError) as e:
      reason = getattr(e, "strerror", None) or getattr(e, "message", str(e))
      raise CheckpointWriteError(
          f"Could not write the checkpoint of step {step} to "
          f"{self.manager.directory} ({reason.splitlines()[0]}); free space "
          "in --model_dir (or make it writable) and rerun the same command "
          "to continue from the last checkpoint.") from e
    log.info("Saved checkpoint %s", path)

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get("loss")
    if loss is not None and not math.isfinite(float(loss)):
      self._diverged = True   # CheckNumerics raises; never save this state
      return
    if self._signal is not None and not self.preempted:
      self.stopped_by = signal.Signals(self._signal).name
      log.warning("%s received: saving a checkpoint and stopping.",
                  self.stopped_by)
      self.preempted = True
      self.model.stop_training = True
      self.save()

  def on_epoch_end(self, epoch, logs=None):
    self.save()

  def on_train_end(self, logs=None):
    if self._signal is not None and not self.preempted:
      # The signal came after the last batch: the last step is saved (an
      # epoch's end), and the run still stops as asked.
      self.stopped_by = signal.Signals(self._signal).name
      self.preempted = True
      self.save()
    self.close()

  def close(self):
    """Gives the signals back their previous handlers (also after an
    exception)."""
    for signum, handler in self._previous_handlers.items():
      signal.signal(signum, handler)
    self._previous_handlers = {}
