"""Learning-rate schedule of SimCLR: linear warm-up, then cosine decay.

SimCLR (arXiv 2002.05709) appendix B.1: the base learning rate is scaled with
the batch size (linearly, `base * batch / 256`, or by its square root,
`base * sqrt(batch)`), warmed up linearly for the first epochs and decayed
with a cosine schedule without restarts (Loshchilov & Hutter 2016) to zero.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from simclr_tf.optim.scaling import scaled_learning_rate


@keras.saving.register_keras_serializable(package="simclr_tf")
class WarmUpAndCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
  """lr(step) = scaled_lr * step / warmup            for step < warmup,
               scaled_lr * (1 + cos(pi * t)) / 2   after, t = (step - warmup)
                                                    / (total - warmup) <= 1,
               0                                   for step >= total.
  """

  def __init__(self, base_learning_rate: float, batch_size: int,
               total_steps: int, warmup_steps: int, scaling: str = "linear"):
    """Creates the schedule.

    Args:
      base_learning_rate: learning rate before batch-size scaling.
      batch_size: global training batch size.
      total_steps: step at which the learning rate reaches 0.
      warmup_steps: steps of linear warm-up from 0; 0 disables warm-up.
      scaling: 'linear' (base * batch / 256) or 'sqrt' (base * sqrt(batch)).
    """
    super().__init__()
    if total_steps < 0 or warmup_steps < 0:
      raise ValueError(
          f"total_steps={total_steps} and warmup_steps={warmup_steps} must "
          "be >= 0.")
    self.base_learning_rate = float(base_learning_rate)
    self.batch_size = int(batch_size)
    self.total_steps = int(total_steps)
    self.warmup_steps = int(warmup_steps)
    self.scaling = scaling
    # Raises ValueError for an unknown scaling.
    self.scaled_learning_rate = scaled_learning_rate(
        self.base_learning_rate, self.batch_size, scaling)

  def __call__(self, step):
    """The learning rate at `step`.

    Args:
      step: scalar int or float tensor (the optimizer's int64 iterations).
    Returns:
      Scalar float32 tensor.
    """
    with tf.name_scope("warmup_cosine_decay"):
      step = tf.cast(step, tf.float32)
      scaled_lr = tf.constant(self.scaled_learning_rate, tf.float32)
      # Warm-up: lr = step / warmup * scaled_lr (as the official code).
      if self.warmup_steps > 0:
        warmup_lr = step / float(self.warmup_steps) * scaled_lr
      else:
        warmup_lr = scaled_lr
      decay_steps = self.total_steps - self.warmup_steps
      if decay_steps > 0:
        # Cosine decay to 0 over [warmup, total], then constant 0.
        progress = tf.clip_by_value(
            (step - float(self.warmup_steps)) / float(decay_steps), 0.0, 1.0)
        cosine_lr = 0.5 * scaled_lr * (1.0 + tf.cos(math.pi * progress))
      else:
        cosine_lr = tf.zeros_like(scaled_lr)
      return tf.where(step < float(self.warmup_steps), warmup_lr, cosine_lr)

  def get_config(self):
    """The constructor arguments.

    Returns:
      A dict accepted by `WarmUpAndCosineDecay.from_config`.
    """
    return {
        "base_learning_rate": self.base_learning_rate,
        "batch_size": self.batch_size,
        "total_steps": self.total_steps,
        "warmup_steps": self.warmup_steps,
        "scaling": self.scaling,
    }
