"""Tests of simclr_tf.losses against numpy references written out by hand."""

import math

import numpy as np
import pytest

from conftest import run_fresh


def _np_nt_xent(z1, z2, temperature, hidden_norm=True, queue=None,
                queue_mask=None):
  """SimCLR eq. 1 with explicit loops: loss_a + loss_b per example."""
  z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
  if hidden_norm:
    z1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
    z2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
  keys = [] if queue is None else [
      k for k, ok in zip(np.asarray(queue, np.float64),
                         np.ones(len(queue), bool) if queue_mask is None
                         else queue_mask) if ok]
  n = len(z1)
  losses = []
  for i in range(n):
    total = 0.0
    for anchor, same, other in ((z1[i], z1, z2), (z2[i], z2, z1)):
      positive = math.exp(anchor @ other[i] / temperature)
      negatives = sum(math.exp(anchor @ other[j] / temperature)
                      for j in range(n) if j != i)
      negatives += sum(math.exp(anchor @ same[j] / temperature)
                       for j in range(n) if j != i)
      negatives += sum(math.exp(anchor @ k / temperature) for k in keys)
      total += -math.log(positive / (positive + negatives))
    losses.append(total)
  return np.array(losses)


def _random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_nt_xent_closed_form():
  from simclr_tf.losses import nt_xent
  z = np.eye(2, dtype=np.float32)
  out = nt_xent(z, z, temperature=1.0)
  # Row 0, direction a: logits [1, 0] (ab) and [masked, 0] (aa):
  # -log(e / (e + 1 + 1)), twice (both directions).
  want = 2.0 * (math.log(math.e + 2.0) - 1.0)
  np.testing.assert_allclose(out.loss.numpy(), [want, want], rtol=1e-6)
  np.testing.assert_array_equal(out.labels.numpy(), [0, 1])
  assert out.logits_ab.shape == (2, 2)


@pytest.mark.parametrize("hidden_norm,temperature,batch,dim",
                         [(True, 0.5, 3, 4), (False, 0.7, 3, 2),
                          (True, 1.0, 2, 3), (False, 2.0, 4, 3)])
def test_nt_xent_matches_numpy(hidden_norm, temperature, batch, dim):
  from simclr_tf.losses import nt_xent
  z1, z2 = _random((batch, dim), 1), _random((batch, dim), 2)
  if not hidden_norm:
    z1, z2 = 0.5 * z1, 0.5 * z2
  out = nt_xent(z1, z2, temperature, hidden_norm=hidden_norm)
  assert out.loss.dtype == "float32" and out.loss.shape == (batch,)
  np.testing.assert_allclose(
      out.loss.numpy(), _np_nt_xent(z1, z2, temperature, hidden_norm),
      rtol=1e-5)


def test_nt_xent_is_symmetric_in_the_views():
  from simclr_tf.losses import nt_xent
  z1, z2 = _random((4, 3), 3), _random((4, 3), 4)
  np.testing.assert_allclose(nt_xent(z1, z2, 0.3).loss.numpy(),
                             nt_xent(z2, z1, 0.3).loss.numpy(), rtol=1e-6)


def test_perfect_alignment_gives_full_accuracy_and_low_loss():
  from simclr_tf.losses import contrastive_metrics, nt_xent
  z = np.eye(4, dtype=np.float32)
  out = nt_xent(z, z + 0.01, temperature=0.05)
  metrics = contrastive_metrics(out.logits_ab, out.labels)
  np.testing.assert_array_equal(metrics["accuracy"].numpy(), np.ones(4))
  assert np.all(out.loss.numpy() < 1e-6)
  assert np.all(metrics["entropy"].numpy() < 1e-6)


def test_contrastive_metrics_by_hand():
  from simclr_tf.losses import contrastive_metrics
  logits = np.array([[0.0, 0.0, 0.0], [1.0, 3.0, 2.0]], np.float32)
  metrics = contrastive_metrics(logits, np.array([0, 2]))
  # Row 0 is a tie: argmax picks index 0. Row 1 picks 1, not 2.
  np.testing.assert_array_equal(metrics["accuracy"].numpy(), [1.0, 0.0])
  p = np.exp(logits[1]) / np.exp(logits[1]).sum()
  np.testing.assert_allclose(metrics["entropy"].numpy(),
                             [math.log(3.0), -(p * np.log(p)).sum()],
                             rtol=1e-6)


def test_extra_negatives_by_hand_and_mask():
  from simclr_tf.losses import nt_xent
  z1, z2 = _random((3, 4), 5), _random((3, 4), 6)
  queue = _random((5, 4), 7)
  queue /= np.linalg.norm(queue, axis=1, keepdims=True)
  mask = np.array([True, False, True, True, False])
  out = nt_xent(z1, z2, 0.5, extra_negatives=queue)
  np.testing.assert_allclose(out.loss.numpy(),
                             _np_nt_xent(z1, z2, 0.5, queue=queue), rtol=1e-5)
  out = nt_xent(z1, z2, 0.5, extra_negatives=queue,
                extra_negatives_mask=mask)
  np.testing.assert_allclose(
      out.loss.numpy(), _np_nt_xent(z1, z2, 0.5, queue=queue, queue_mask=mask),
      rtol=1e-5)
  # An all-invalid queue is the plain loss; logits_ab never sees the queue.
  plain = nt_xent(z1, z2, 0.5)
  empty = nt_xent(z1, z2, 0.5, extra_negatives=queue,
                  extra_negatives_mask=np.zeros(5, bool))
  np.testing.assert_allclose(empty.loss.numpy(), plain.loss.numpy(),
                             rtol=1e-6)
  np.testing.assert_array_equal(empty.logits_ab.numpy(),
                                plain.logits_ab.numpy())
  # None is exactly the plain NT-Xent.
  none = nt_xent(z1, z2, 0.5, extra_negatives=None)
  np.testing.assert_array_equal(none.loss.numpy(), plain.loss.numpy())


def test_extra_negatives_get_no_gradient():
  import tensorflow as tf
  from simclr_tf.losses import nt_xent
  queue = tf.Variable(_random((3, 4), 8))
  z = tf.Variable(_random((2, 4), 9))
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(nt_xent(z, z * 2.0, 0.5, extra_negatives=queue).loss)
  g_queue, g_z = tape.gradient(loss, [queue, z])
  assert g_queue is None and g_z is not None


def test_low_precision_inputs_are_computed_in_float32():
  import tensorflow as tf
  from simclr_tf.losses import nt_xent
  z1, z2 = _random((3, 4), 10), _random((3, 4), 11)
  for dtype in (tf.bfloat16, tf.float16):
    a, b = tf.cast(z1, dtype), tf.cast(z2, dtype)
    out = nt_xent(a, b, 0.2)
    assert out.loss.dtype == tf.float32 and out.logits_ab.dtype == tf.float32
    ref = _np_nt_xent(tf.cast(a, tf.float32).numpy(),
                      tf.cast(b, tf.float32).numpy(), 0.2)
    np.testing.assert_allclose(out.loss.numpy(), ref, rtol=1e-5)


def test_nt_xent_in_tf_function_with_unknown_batch():
  import tensorflow as tf
  from simclr_tf.losses import nt_xent
  spec = tf.TensorSpec([None, 4], tf.float32)
  fn = tf.function(lambda a, b: nt_xent(a, b, 0.5).loss,
                   input_signature=[spec, spec])
  for batch in (2, 5):
    z1, z2 = _random((batch, 4), batch), _random((batch, 4), batch + 1)
    np.testing.assert_allclose(fn(z1, z2).numpy(),
                               _np_nt_xent(z1, z2, 0.5), rtol=1e-5)


def test_nt_xent_under_jit_compile_matches_eager():
  import tensorflow as tf
  from simclr_tf.losses import nt_xent
  z1, z2 = _random((4, 3), 12), _random((4, 3), 13)
  queue = _random((2, 3), 14)
  mask = np.array([True, False])
  fn = tf.function(lambda a, b: nt_xent(a, b, 0.5, extra_negatives=queue,
                                        extra_negatives_mask=mask).loss,
                   jit_compile=True)
  np.testing.assert_allclose(
      fn(z1, z2).numpy(),
      nt_xent(z1, z2, 0.5, extra_negatives=queue,
              extra_negatives_mask=mask).loss.numpy(), rtol=1e-5)


def test_distillation_loss_by_hand_and_gradient():
  import tensorflow as tf
  from simclr_tf.losses import distillation_loss
  t = 0.5
  teacher = np.array([[2.0, 0.0, -1.0], [0.3, 0.2, 0.1]], np.float32)
  student = np.array([[1.0, 1.0, 0.0], [-0.5, 0.5, 2.0]], np.float32)

  def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)

  p_t, p_s = softmax(teacher / t), softmax(student / t)
  want = -(p_t * np.log(p_s)).sum(axis=1) * t * t
  s_var, t_var = tf.Variable(student), tf.Variable(teacher)
  with tf.GradientTape() as tape:
    loss = distillation_loss(t_var, s_var, t)
    total = tf.reduce_sum(loss)
  np.testing.assert_allclose(loss.numpy(), want, rtol=1e-6)
  assert loss.shape == (2,) and loss.dtype == tf.float32
  g_student, g_teacher = tape.gradient(total, [s_var, t_var])
  # d/ds [T^2 CE(p_t, softmax(s/T))] = T (softmax(s/T) - softmax(t/T)).
  np.testing.assert_allclose(g_student.numpy(), t * (p_s - p_t), atol=1e-6)
  assert g_teacher is None
  # Equal logits: the loss is T^2 times the teacher's entropy.
  same = distillation_loss(teacher, teacher, t).numpy()
  np.testing.assert_allclose(same, -(p_t * np.log(p_t)).sum(1) * t * t,
                             rtol=1e-6)


def test_supervised_loss_masks_unlabeled():
  import tensorflow as tf
  from simclr_tf.losses import labeled_mask, supervised_loss
  labels = np.array([-1, 2, 0], np.int64)
  logits = tf.Variable(np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0],
                                 [0.0, 0.0, 0.0]], np.float32))
  with tf.GradientTape() as tape:
    loss = supervised_loss(labels, tf.cast(logits, tf.bfloat16))
    total = tf.reduce_sum(loss)
  assert loss.dtype == tf.float32
  np.testing.assert_array_equal(labeled_mask(labels).numpy(), [0, 1, 1])
  row = np.array([0.5, -1.0, 2.0])
  ce1 = -(row[2] - np.log(np.exp(row).sum()))
  np.testing.assert_allclose(loss.numpy(), [0.0, ce1, math.log(3.0)],
                             rtol=1e-2)  # bfloat16 logits
  grad = tape.gradient(total, logits).numpy()
  np.testing.assert_array_equal(grad[0], [0.0, 0.0, 0.0])
  assert np.all(grad[1:] != 0.0)
  loss32 = supervised_loss(labels, logits).numpy()
  np.testing.assert_allclose(loss32, [0.0, ce1, math.log(3.0)], rtol=1e-6)


@pytest.mark.slow  # a fresh TF process with 2 logical CPUs (~5-10 s)
def test_mirrored_two_replicas_match_single_device():
  result = run_fresh(__file__, "_mirrored_worker", timeout=120)
  assert result["num_replicas"] == 2
  assert result["labels"] == list(range(8))
  for key in ("loss", "logits_ab", "grad", "loss_queue", "grad_queue",
              "accuracy", "entropy"):
    assert result[key] < 1e-5, (key, result)
  # Sanity: the gradient is not trivially zero.
  assert result["grad_norm"] > 1e-3


def _mirrored_worker():
  """In `run_fresh`'s process: 2 logical CPUs exist before TF starts."""
  import tensorflow as tf
  from simclr_tf.losses import contrastive_metrics, nt_xent

  batch, dim_in, dim, temperature = 8, 6, 5, 0.3
  x1, x2 = _random((batch, dim_in), 20), _random((batch, dim_in), 21)
  w0 = _random((dim_in, dim), 22)
  queue = _random((4, dim), 23)
  queue /= np.linalg.norm(queue, axis=1, keepdims=True)
  queue_mask = np.array([True, True, False, True])

  def loss_and_grad(w, a, b, keys):
    with tf.GradientTape() as tape:
      z1, z2 = tf.matmul(a, w), tf.matmul(b, w)  # [B_local, D]
      out = nt_xent(z1, z2, temperature, extra_negatives=keys,
                    extra_negatives_mask=None if keys is None else queue_mask)
      # The global mean: local sum over B_global, summed across replicas.
      loss = tf.reduce_sum(out.loss) / float(batch)
    metrics = contrastive_metrics(out.logits_ab, out.labels)
    return (out.loss, out.logits_ab, out.labels, tape.gradient(loss, w),
            metrics["accuracy"], metrics["entropy"])

  w_single = tf.Variable(w0)
  single = loss_and_grad(w_single, x1, x2, None)
  single_q = loss_and_grad(w_single, x1, x2, queue)

  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  with strategy.scope():
    w_dist = tf.Variable(w0)
  half = batch // 2
  a = strategy.experimental_distribute_values_from_function(
      lambda ctx: x1[ctx.replica_id_in_sync_group * half:][:half])
  b = strategy.experimental_distribute_values_from_function(
      lambda ctx: x2[ctx.replica_id_in_sync_group * half:][:half])

  @tf.function
  def distributed(a, b, use_queue):
    keys = tf.constant(queue) if use_queue else None
    per_replica = strategy.run(loss_and_grad, args=(w_dist, a, b, keys))
    losses, logits, labels, grads, acc, ent = per_replica
    cat = lambda v: strategy.gather(v, axis=0)  # noqa: E731
    return (cat(losses), cat(logits), cat(labels),
            strategy.reduce(tf.distribute.ReduceOp.SUM, grads, axis=None),
            cat(acc), cat(ent))

  dist = [t.numpy() for t in distributed(a, b, False)]
  dist_q = [t.numpy() for t in distributed(a, b, True)]
  diff = lambda x, y: float(np.max(np.abs(np.asarray(x) - y)))  # noqa: E731
  return {
      "num_replicas": strategy.num_replicas_in_sync,
      "labels": [int(i) for i in dist[2]],
      "loss": diff(single[0], dist[0]),
      "logits_ab": diff(single[1], dist[1]),
      "grad": diff(single[3], dist[3]),
      "accuracy": diff(single[4], dist[4]),
      "entropy": diff(single[5], dist[5]),
      "loss_queue": diff(single_q[0], dist_q[0]),
      "grad_queue": diff(single_q[3], dist_q[3]),
      "grad_norm": float(np.linalg.norm(dist[3])),
  }

