"""Keras callbacks of the training loop: checkpoints, summaries, stopping."""

from __future__ import annotations

import logging
import math
import signal

import keras
import numpy as np
import tensorflow as tf

log = logging.getLogger("simclr_tf")


class NonFiniteLossError(FloatingPointError):
  """Training produced NaN or Inf; raised before anything is overwritten."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, permissions, ...)."""


LIKELY_NAN_CAUSES = (
    "Likely causes: a learning rate too high for this batch size (lower "
    "--learning_rate or raise --warmup_epochs), --precision=mixed_float16 "
    "overflow, or bad input images.")


def _step(model) -> int:
  return int(model.optimizer.iterations.numpy())


class StopAtStep(keras.callbacks.Callback):
  """Stops `fit` once the optimizer has taken `total_steps` steps."""

  def __init__(self, total_steps: int):
    super().__init__()
    self.total_steps = total_steps

  def on_train_batch_end(self, batch, logs=None):
    if _step(self.model) >= self.total_steps:
      self.model.stop_training = True


class CheckNumerics(keras.callbacks.Callback):
  """Stops at the first non-finite loss, naming the step and likely causes."""

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get("loss")
    if loss is not None and not math.isfinite(float(loss)):
      self.model.stop_training = True
      raise NonFiniteLossError(
          f"Loss became {float(loss)} at step {_step(self.model)}. "
          f"{LIKELY_NAN_CAUSES} The last checkpoint and export were left "
          "untouched.")


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

  Also saves when the process receives SIGTERM (preemption notice), then
  stops training cleanly. Never saves a non-finite state: after a NaN or Inf
  loss it saves nothing, and before each save it checks that every weight
  and optimizer slot is finite (the step that makes the weights non-finite
  can still report a finite loss), so the last checkpoint stays the last
  good one.
  """

  def __init__(self, manager: tf.train.CheckpointManager, handle_sigterm=True):
    super().__init__()
    self.manager = manager
    self._terminate = False
    self._handle_sigterm = handle_sigterm
    self._previous_handler = None
    self._diverged = False

  def _on_sigterm(self, signum, frame):
    self._terminate = True

  def on_train_begin(self, logs=None):
    if self._handle_sigterm:
      try:
        self._previous_handler = signal.signal(signal.SIGTERM,
                                               self._on_sigterm)
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
    step = _step(self.model)
    if self._diverged:
      log.warning("Not saving step %d: training diverged.", step)
      return
    if self.manager.latest_checkpoint and self.manager.latest_checkpoint \
        .endswith(f"-{step}"):
      return
    self._check_finite(step)
    try:
      path = self.manager.save(checkpoint_number=step)
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
    if self._terminate:
      log.warning("SIGTERM received: saving a checkpoint and stopping.")
      self.save()
      self.model.stop_training = True
      self.model.preempted = True

  def on_epoch_end(self, epoch, logs=None):
    self.save()

  def on_train_end(self, logs=None):
    self.close()

  def close(self):
    """Gives SIGTERM back its previous handler (also after an exception)."""
    if self._handle_sigterm and self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


class Summaries(keras.callbacks.Callback):
  """TensorBoard scalars every `every_steps` steps, keyed by the global step."""

  def __init__(self, log_dir: str, every_steps: int, learning_rate=None):
    super().__init__()
    self.writer = tf.summary.create_file_writer(log_dir)
    self.every_steps = max(1, every_steps)
    self.learning_rate = learning_rate

  def on_train_batch_end(self, batch, logs=None):
    step = _step(self.model)
    if step % self.every_steps:
      return
    with self.writer.as_default(step=step):
      for name, value in (logs or {}).items():
        tf.summary.scalar(f"train/{name}", float(np.asarray(value)))
      if self.learning_rate is not None:
        tf.summary.scalar("train/learning_rate",
                          float(self.learning_rate(step - 1)))
    self.writer.flush()

  def on_train_end(self, logs=None):
    self.writer.flush()


def write_scalars(log_dir: str, step: int, values: dict, prefix: str) -> None:
  writer = tf.summary.create_file_writer(log_dir)
  with writer.as_default(step=step):
    for name, value in values.items():
      tf.summary.scalar(f"{prefix}/{name}", float(value))
  writer.flush()


def write_image_pairs(log_dir: str, view1, view2, max_images=8) -> None:
  """A TensorBoard picture of augmented pairs: view 1 above view 2."""
  n = min(max_images, int(view1.shape[0]))
  pairs = tf.concat([view1[:n], view2[:n]], axis=1)   # [n, 2H, W, 3]
  writer = tf.summary.create_file_writer(log_dir)
  with writer.as_default(step=0):
    tf.summary.image("augmented_pairs", tf.cast(pairs, tf.float32),
                     max_outputs=n)
  writer.flush()
