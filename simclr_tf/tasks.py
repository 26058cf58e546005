"""What each stage optimises: pretraining, fine-tuning and distillation.

A task maps (model, batch) to the loss to differentiate and a dict of
per-example metric values. The learner (`simclr_tf.learner`) is the same
for all three; only the task differs.

Losses are sums over the replica's examples divided by the GLOBAL batch
size, so that summing gradients over replicas (what the Keras optimizer does
under tf.distribute) gives the gradient of the global mean.
"""

from __future__ import annotations

from typing import Callable, Optional

import tensorflow as tf

from simclr_tf import losses
from simclr_tf import monitor


def num_replicas() -> int:
  return tf.distribute.get_replica_context().num_replicas_in_sync \
      if tf.distribute.get_replica_context() is not None else 1


def global_mean(per_example: tf.Tensor) -> tf.Tensor:
  """Sum of this replica's values over the global batch size."""
  per_example = tf.cast(per_example, tf.float32)
  local = tf.cast(tf.shape(per_example)[0], tf.float32)
  return tf.reduce_sum(per_example) / (local * num_replicas())


def masked_global_mean(values, mask):
  """Mean over the masked-in examples of the global batch."""
  mask = tf.cast(mask, tf.float32)
  total = tf.reduce_sum(tf.cast(values, tf.float32) * mask)
  count = tf.reduce_sum(mask)
  ctx = tf.distribute.get_replica_context()
  if ctx is not None and ctx.num_replicas_in_sync > 1:
    count = ctx.all_reduce("sum", count)
  return total / tf.maximum(count, 1.0)


def top_k_correct(labels, logits, k):
  """1.0 where the label is among the k largest logits, per example.

  Ties are broken by class index (as argmax does), so a constant prediction
  is right for one class only; tf.math.in_top_k would count every tied class
  as correct, which makes a zero-initialised head look perfect.
  """
  logits = tf.cast(logits, tf.float32)                         # [B, C]
  labels = tf.cast(labels, tf.int32)
  label_logit = tf.gather(logits, labels, axis=1, batch_dims=1)[:, None]
  classes = tf.range(tf.shape(logits)[1])[None, :]
  ahead = (logits > label_logit) | (
      (logits == label_logit) & (classes < labels[:, None]))
  rank = tf.reduce_sum(tf.cast(ahead, tf.int32), axis=1)      # [B]
  return tf.cast(rank < k, tf.float32)


def classification_metrics(labels, logits, loss_name="sup_loss",
                           top_k_names=((1, "sup_acc"),)):
  """Per-example cross entropy and top-k hits, over the labeled examples.

  Args:
    labels: [B] int labels, negative for unlabeled examples.
    logits: [B, C] logits.
    loss_name: key of the cross entropy.
    top_k_names: (k, key) pairs of the top-k hits to measure.
  Returns:
    {name: ([B] per-example values, [B] bool labeled mask)}, what the
    learner's metric trackers take.
  """
  labeled = labels >= 0
  safe = tf.maximum(labels, 0)
  metrics = {loss_name: (losses.supervised_loss(labels, logits), labeled)}
  for k, name in top_k_names:
    metrics[name] = (top_k_correct(safe, logits, k), labeled)
  return metrics


class Pretrain:
  """NT-Xent on two views (SimCLR eq. 1) + optional linear evaluation head."""

  metric_names = ("loss", "contrast_loss", "contrast_acc", "contrast_entropy",
                  "proj_std", "sup_loss", "sup_acc")

  def __init__(self, temperature: float, hidden_norm: bool = True,
               memory=None):
    """Creates the task.

    Args:
      temperature: NT-Xent temperature.
      hidden_norm: l2-normalise the projections.
      memory: optional `simclr_tf.memory.Memory`, SimCLRv2's moving-average
        network whose queued keys are extra negatives; adds the
        'memory_fill' metric (fraction of the queue holding keys).
    """
    self.temperature = temperature
    self.hidden_norm = hidden_norm
    self.memory = memory
    if memory is not None:
      self.metric_names = Pretrain.metric_names + ("memory_fill",)

  def __call__(self, model, batch, training):
    view1, view2, labels = batch["view1"], batch["view2"], batch["label"]
    images = tf.concat([view1, view2], axis=0)          # [2B, H, W, 3]
    outputs = model(images, training=training)
    z1, z2 = tf.split(outputs["proj_head_output"], 2, axis=0)   # [B, D] each
    extra, keys = {}, None
    if self.memory is not None:
      # Moving-average update, then the queue (past keys) as extra negatives.
      extra, keys = self.memory.contrast_kwargs(model, images,
                                                training=training)
    con = losses.nt_xent(z1, z2, self.temperature,
                         hidden_norm=self.hidden_norm, **extra)
    if keys is not None and training:
      self.memory.enqueue(keys)      # after the loss read the queue
    stats = losses.contrastive_metrics(con.logits_ab, con.labels)
    loss = global_mean(con.loss)
    metrics = {"contrast_loss": con.loss,
               "contrast_acc": stats["accuracy"],
               "contrast_entropy": stats["entropy"],
               # ~1/sqrt(d) while healthy, 0 when collapsed.
               "proj_std": monitor.collapse_std(z1)}
    if self.memory is not None:
      metrics["memory_fill"] = self.memory.fill_level()
    if "logits_sup" in outputs:
      both = tf.concat([labels, labels], axis=0)
      sup = classification_metrics(both, outputs["logits_sup"])
      loss += masked_global_mean(*sup["sup_loss"])
      metrics.update(sup)
    return loss, metrics


class Finetune:
  """Cross-entropy on the labeled subset (SimCLRv2, section 2)."""

  metric_names = ("loss", "sup_loss", "sup_acc")

  def __call__(self, model, batch, training):
    outputs = model(batch["image"], training=training)
    sup = classification_metrics(batch["label"], outputs["logits_sup"])
    return masked_global_mean(*sup["sup_loss"]), sup


class Distill:
  """Self-/big-to-small distillation on unlabeled images (SimCLRv2, eq. 3).

  loss = T^2 CE(softmax(teacher / T), softmax(student / T))
         + alpha * CE(labels, student)  where labels exist.
  """

  metric_names = ("loss", "distill_loss", "teacher_agreement", "sup_loss",
                  "sup_acc")

  def __init__(self, teacher: Callable, temperature: float,
               label_weight: float = 0.0):
    self.teacher = teacher
    self.temperature = temperature
    self.label_weight = label_weight

  def __call__(self, model, batch, training):
    images, labels = batch["image"], batch["label"]
    teacher_logits = tf.stop_gradient(
        tf.cast(self.teacher(images), tf.float32))
    student_logits = model(images, training=training)["logits_sup"]
    distill = losses.distillation_loss(teacher_logits, student_logits,
                                       self.temperature)
    agree = tf.cast(tf.equal(tf.argmax(teacher_logits, -1),
                             tf.argmax(student_logits, -1)), tf.float32)
    sup = classification_metrics(labels, student_logits)
    loss = global_mean(distill)
    if self.label_weight:
      loss += self.label_weight * masked_global_mean(*sup["sup_loss"])
    return loss, {"distill_loss": distill, "teacher_agreement": agree, **sup}


def make_task(train_mode: str, *, temperature: float, hidden_norm: bool,
              distill_temperature: float, distill_label_weight: float,
              teacher: Optional[Callable] = None, memory=None):
  if train_mode == "pretrain":
    return Pretrain(temperature, hidden_norm, memory=memory)
  if train_mode == "finetune":
    return Finetune()
  if train_mode == "distill":
    if teacher is None:
      raise ValueError("Received: teacher=None; distillation needs a teacher.")
    return Distill(teacher, distill_temperature, distill_label_weight)
  raise ValueError(f"Received: train_mode={train_mode!r}; use pretrain, "
                   "finetune or distill.")
