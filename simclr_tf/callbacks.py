"""Keras callbacks of the training loop: summaries, stopping, numerics.

(Saving checkpoints is `simclr_tf.checkpoints.Checkpointer`.)
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf


class NonFiniteLossError(FloatingPointError):
  """Training produced NaN or Inf; raised before anything is overwritten."""


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
