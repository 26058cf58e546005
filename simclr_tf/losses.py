"""Losses of SimCLR / SimCLRv2, per example and in float32.

Every loss returns one value per local example; the caller reduces them over
the GLOBAL batch (`tf.reduce_sum(loss) / B_global`) so that the
gradients summed over replicas by the optimizer are those of the global mean.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import tensorflow as tf

# Subtracted from a logit to remove it from a softmax (official SimCLR code).
LARGE_NUM = 1e9


class NTXentOutput(NamedTuple):
  """What `nt_xent` returns (a NamedTuple, so it nests in tf.function).

  Attributes:
    loss: [B_local] float32, loss_a + loss_b of each local example.
    logits_ab: [B_local, B_global] float32, view-1 vs view-2 logits (the
      positives are at `labels`); input of `contrastive_metrics`.
    labels: [B_local] int32, global index of each example's positive.
  """
  loss: tf.Tensor
  logits_ab: tf.Tensor
  labels: tf.Tensor


def _gather_global(replica_context, tensors):
  """All-gathers `tensors` along the batch axis when replicas > 1.

  `ReplicaContext.all_gather` has a gradient in TF 2.x (a custom gradient:
  all-reduce SUM of the upstream gradient, then each replica keeps its own
  slice), so the negatives that other replicas take from this replica send
  their gradient back here.

  Args:
    replica_context: a `tf.distribute.ReplicaContext` or None.
    tensors: list of [B_local, D] tensors.
  Returns:
    (list of [B_global, D] tensors, replica id as int32 scalar).
  """
  if (replica_context is None or
      replica_context.num_replicas_in_sync <= 1):
    return tensors, tf.constant(0, tf.int32)
  gathered = replica_context.all_gather(tensors, axis=0)
  replica_id = tf.cast(replica_context.replica_id_in_sync_group, tf.int32)
  return list(gathered), replica_id


def nt_xent(z1: tf.Tensor,
            z2: tf.Tensor,
            temperature: float,
            hidden_norm: bool = True,
            replica_context=None,
            extra_negatives: Optional[tf.Tensor] = None,
            extra_negatives_mask: Optional[tf.Tensor] = None) -> NTXentOutput:
  """NT-Xent, the normalised temperature-scaled cross entropy (SimCLR eq. 1).

  For local example i with views a = z1[i], b = z2[i], its positive is the
  other view at global index p = i + replica_id * B_local and the negatives
  are the 2 B_global - 2 other views of the global batch:
    loss_a(i) = -log softmax([a.b_j / T]_j, [a.a_j / T]_{j != p})_p
  and loss_b symmetrically; the per-example loss is loss_a + loss_b, the sum
  over both directions (as the official code; the paper's mean over 2N
  views differs only by a factor 2).

  Local batches must have the same size on every replica (drop the
  remainder), as in the official code.

  Args:
    z1: [B_local, D] projections of view 1, any float dtype (cast to
      float32).
    z2: [B_local, D] projections of view 2 of the same images.
    temperature: T > 0.
    hidden_norm: l2-normalise z1, z2 first (cosine similarity).
    replica_context: a `tf.distribute.ReplicaContext`; None uses
      `tf.distribute.get_replica_context()` (None in cross-replica context,
      the default replica context outside any strategy).
    extra_negatives: optional [K, D] keys (e.g. a momentum-encoder queue,
      already normalised); appended as K more negative columns for both
      directions. They get no gradient.
    extra_negatives_mask: optional [K] bool, False for queue slots that hold
      no key yet; those columns are removed from the softmax.
  Returns:
    An `NTXentOutput` (loss [B_local], logits_ab [B_local, B_global], labels
    [B_local] int32).
  """
  z1 = tf.cast(z1, tf.float32)
  z2 = tf.cast(z2, tf.float32)
  if hidden_norm:
    z1 = tf.math.l2_normalize(z1, axis=-1)
    z2 = tf.math.l2_normalize(z2, axis=-1)
  if replica_context is None:
    replica_context = tf.distribute.get_replica_context()

  local_batch = tf.shape(z1)[0]
  # z1_global, z2_global: [B_global, D]
  (z1_global, z2_global), replica_id = _gather_global(
      replica_context, [z1, z2])
  global_batch = tf.shape(z1_global)[0]
  labels = tf.range(local_batch, dtype=tf.int32) + replica_id * local_batch
  # Removes each view's similarity with itself: [B_local, B_global].
  self_mask = tf.one_hot(labels, global_batch, dtype=tf.float32) * LARGE_NUM

  inv_t = 1.0 / tf.cast(temperature, tf.float32)
  # All logits: [B_local, B_global].
  logits_ab = tf.matmul(z1, z2_global, transpose_b=True) * inv_t
  logits_ba = tf.matmul(z2, z1_global, transpose_b=True) * inv_t
  logits_aa = tf.matmul(z1, z1_global, transpose_b=True) * inv_t - self_mask
  logits_bb = tf.matmul(z2, z2_global, transpose_b=True) * inv_t - self_mask

  logits_a = [logits_ab, logits_aa]
  logits_b = [logits_ba, logits_bb]
  if extra_negatives is not None:
    keys = tf.stop_gradient(tf.cast(extra_negatives, tf.float32))  # [K, D]
    # logits_aq, logits_bq: [B_local, K]
    logits_aq = tf.matmul(z1, keys, transpose_b=True) * inv_t
    logits_bq = tf.matmul(z2, keys, transpose_b=True) * inv_t
    if extra_negatives_mask is not None:
      invalid = 1.0 - tf.cast(extra_negatives_mask, tf.float32)  # [K]
      logits_aq -= invalid[tf.newaxis, :] * LARGE_NUM
      logits_bq -= invalid[tf.newaxis, :] * LARGE_NUM
    logits_a.append(logits_aq)
    logits_b.append(logits_bq)

  # Positives sit in the first B_global columns, at `labels`.
  # [B_local, 2 B_global (+ K)] -> [B_local]
  loss_a = tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=labels, logits=tf.concat(logits_a, axis=1))
  loss_b = tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=labels, logits=tf.concat(logits_b, axis=1))
  return NTXentOutput(loss=loss_a + loss_b, logits_ab=logits_ab,
                      labels=labels)


def contrastive_metrics(logits_ab: tf.Tensor,
                        labels: tf.Tensor) -> dict[str, tf.Tensor]:
  """Per-example contrastive accuracy and entropy (official SimCLR metrics).

  Args:
    logits_ab: [B, B_global] view-1 vs view-2 logits from `nt_xent`.
    labels: [B] int, index of each example's positive.
  Returns:
    {'accuracy': [B] float32, 1 where argmax(logits_ab) is the positive;
     'entropy': [B] float32, -sum_j p_j log p_j of softmax(logits_ab)}.
    Average them over the global batch like the loss.
  """
  logits_ab = tf.cast(logits_ab, tf.float32)
  predicted = tf.argmax(logits_ab, axis=-1, output_type=tf.int32)
  accuracy = tf.cast(tf.equal(predicted, tf.cast(labels, tf.int32)),
                     tf.float32)
  log_p = tf.nn.log_softmax(logits_ab, axis=-1)
  entropy = -tf.reduce_sum(tf.exp(log_p) * log_p, axis=-1)
  return {"accuracy": accuracy, "entropy": entropy}


def distillation_loss(teacher_logits: tf.Tensor, student_logits: tf.Tensor,
                      temperature: float) -> tf.Tensor:
  """Knowledge-distillation loss (Hinton et al. 2015; SimCLRv2 eq. 3).

    L = -T^2 sum_y softmax(t / T)_y log softmax(s / T)_y
  The teacher gets no gradient. The T^2 factor keeps the gradient,
  T (softmax(s / T) - softmax(t / T)), on the scale of a T = 1 loss.

  Args:
    teacher_logits: [B, C] logits of the teacher, any float dtype.
    student_logits: [B, C] logits of the student.
    temperature: T > 0.
  Returns:
    [B] float32 per-example loss.
  """
  t = tf.cast(temperature, tf.float32)
  teacher_probs = tf.stop_gradient(
      tf.nn.softmax(tf.cast(teacher_logits, tf.float32) / t, axis=-1))
  student_log_probs = tf.nn.log_softmax(
      tf.cast(student_logits, tf.float32) / t, axis=-1)
  return -tf.reduce_sum(teacher_probs * student_log_probs, axis=-1) * t * t


def labeled_mask(labels: tf.Tensor) -> tf.Tensor:
  """1.0 for labeled examples, 0.0 for unlabeled ones (label < 0).

  Args:
    labels: [B] int class indices, negative for unlabeled examples.
  Returns:
    [B] float32 mask.
  """
  return tf.cast(tf.greater_equal(labels, 0), tf.float32)


def supervised_loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
  """Per-example softmax cross entropy; unlabeled examples give 0.

  Args:
    labels: [B] int class indices; negative means unlabeled.
    logits: [B, C] logits, any float dtype (computed in float32).
  Returns:
    [B] float32 loss, 0 where labels < 0. Divide the sum by the number of
    labeled examples (`labeled_mask`) or by the global batch size.
  """
  labels = tf.cast(labels, tf.int32)
  mask = labeled_mask(labels)
  # Unlabeled rows get a valid dummy index, then their loss is zeroed.
  safe_labels = tf.maximum(labels, 0)
  loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=safe_labels, logits=tf.cast(logits, tf.float32))
  # tf.where, not loss * mask: a masked row stays 0 even if its logits are
  # not finite.
  return tf.where(mask > 0.0, loss, tf.zeros_like(loss))
