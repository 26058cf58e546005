"""The fused batch norm computes what Keras' BatchNormalization computes.

Outputs, moving statistics and gradients are compared with the Keras layer
holding the same weights, in float32 (to 1e-5) and mixed_bfloat16; global
batch norm over two mirrored replicas is checked in a subprocess.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_fresh
from layer_harness import run_layer_test
from simclr_tf.config import ModelConfig
from simclr_tf.models import batch_norm
from simclr_tf.models import simclr as simclr_lib


def _pair(shape, center=True, synchronized=True, dtype=None):
  """Keras' layer and ours, built, with the same random weights."""
  kwargs = dict(momentum=0.9, epsilon=1e-5, center=center,
                synchronized=synchronized, dtype=dtype)
  ref = keras.layers.BatchNormalization(**kwargs)
  ours = batch_norm.BatchNormalization(**kwargs)
  ref.build(shape)
  ours.build(shape)
  rng = np.random.default_rng(0)
  weights = [rng.normal(size=w.shape).astype("float32") for w in ref.weights]
  weights[-1] = np.abs(weights[-1]) + 0.5   # a moving variance is positive
  ref.set_weights(weights)
  ours.set_weights(weights)
  return ref, ours


def _inputs(shape, seed=1):
  rng = np.random.default_rng(seed)
  return tf.constant(3.0 * rng.normal(size=shape) + 1.0, tf.float32)


def _forward_and_grads(layer, x, upstream, training):
  """Output, moving statistics and gradients of sum(output * upstream)."""

  @tf.function
  def run(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, training=training)
      loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    return y, tape.gradient(loss, [x] + layer.trainable_weights)

  y, grads = run(x)
  return (y.numpy(), [g.numpy() for g in grads],
          layer.moving_mean.numpy(), layer.moving_variance.numpy())


@pytest.mark.parametrize("shape", [(8, 5, 5, 16), (16, 32)])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_matches_keras_in_float32(shape, center, training):
  ref, ours = _pair(shape, center=center)
  x = _inputs(shape)
  upstream = _inputs(shape, seed=2)
  y_ref, g_ref, mean_ref, var_ref = _forward_and_grads(ref, x, upstream,
                                                       training)
  y, g, mean, var = _forward_and_grads(ours, x, upstream, training)
  assert y.dtype == np.float32
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, var_ref, rtol=1e-5, atol=1e-6)
  assert len(g) == len(g_ref) == 1 + (2 if center else 1)
  for a, b in zip(g, g_ref):
    scale = max(1.0, float(np.max(np.abs(b))))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


def test_matches_keras_in_mixed_bfloat16():
  shape = (16, 4, 4, 24)
  ref, ours = _pair(shape, dtype="mixed_bfloat16")
  x = tf.cast(_inputs(shape), tf.bfloat16)
  upstream = _inputs(shape, seed=2)
  y_ref, g_ref, mean_ref, var_ref = _forward_and_grads(ref, x, upstream, True)
  y, g, mean, var = _forward_and_grads(ours, x, upstream, True)
  assert y.dtype == y_ref.dtype == tf.bfloat16.as_numpy_dtype
  assert ours.moving_mean.dtype == "float32"
  # Statistics are computed in float32 from the same bfloat16 inputs.
  np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(var, var_ref, rtol=1e-5, atol=1e-5)
  # Outputs differ by at most about one bfloat16 rounding.
  np.testing.assert_allclose(y.astype(np.float32), y_ref.astype(np.float32),
                             rtol=2e-2, atol=2e-2)
  for a, b in zip(g[1:], g_ref[1:]):   # gamma, beta: sums over the batch
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * np.abs(b).max())


def test_frozen_layer_uses_and_keeps_moving_statistics():
  shape = (8, 3, 3, 4)
  ref, ours = _pair(shape)
  ref.trainable = ours.trainable = False
  before = ours.moving_mean.numpy().copy()
  x = _inputs(shape)
  np.testing.assert_allclose(ours(x, training=True), ref(x, training=True),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ours.moving_mean.numpy(), before)


def test_same_variables_as_keras():
  ref, ours = _pair((4, 2, 2, 8), center=False)
  assert [v.name for v in ours.weights] == [v.name for v in ref.weights]
  assert [v.name for v in ours.weights] == ["gamma", "moving_mean",
                                            "moving_variance"]
  config = ours.get_config()
  assert config["synchronized"] and not config["center"]
  clone = batch_norm.BatchNormalization.from_config(config)
  assert clone.epsilon == ours.epsilon and clone.momentum == ours.momentum


@pytest.mark.parametrize("kwargs,shape", [
    (dict(), (2, 8, 8, 4)),
    (dict(momentum=0.99, epsilon=1e-3, center=False, synchronized=False),
     (2, 8, 8, 4)),
    (dict(gamma_initializer="zeros", name="bn_2"), (2, 6)),
])
def test_saves_and_reloads(kwargs, shape):
  result = run_layer_test(batch_norm.BatchNormalization, kwargs, shape,
                          expected_output_shape=shape)
  layer = result.reloaded.get_layer(result.layer.name)
  np.testing.assert_array_equal(layer.moving_variance.numpy(),
                                result.layer.moving_variance.numpy())
  assert layer.synchronized == kwargs.get("synchronized", False)


def _op_types(layer, shape, training=True):
  fn = tf.function(lambda x: layer(x, training=training))
  graph = fn.get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph
  return {op.type for op in graph.get_operations()}


def test_single_replica_runs_one_fused_op():
  ref, ours = _pair((4, 3, 3, 8))
  ops = _op_types(ours, (4, 3, 3, 8))
  assert "FusedBatchNormV3" in ops and "Mean" not in ops
  assert "FusedBatchNormV3" not in _op_types(ref, (4, 3, 3, 8))
  assert "FusedBatchNormV3" in _op_types(ours, (4, 3, 3, 8), training=False)


def test_fused_switch_restores_keras_path():
  _, ours = _pair((4, 3, 3, 8))
  batch_norm.BatchNormalization.fused = False
  try:
    assert "FusedBatchNormV3" not in _op_types(ours, (4, 3, 3, 8))
  finally:
    batch_norm.BatchNormalization.fused = True


def test_training_step_of_the_model_matches_keras_batch_norm():
  """One step of a quarter-width CIFAR ResNet-18 with heads: same loss and
  gradients."""
  config = ModelConfig(width_multiplier=0.25, proj_out_dim=16, num_classes=10,
                       sup_head_input=1)
  images = tf.random.stateless_uniform([8, 16, 16, 3], [0, 1])
  results = []
  for fused in (True, False):
    batch_norm.BatchNormalization.fused = fused
    try:
      keras.utils.set_random_seed(0)
      net = simclr_lib.build_model(config, 16)

      @tf.function
      def step(x, net=net):
        with tf.GradientTape() as tape:
          out = net(x, training=True)
          loss = (tf.reduce_sum(tf.square(out["proj_head_output"])) +
                  tf.reduce_sum(tf.square(out["logits_sup"])))
        return loss, tape.gradient(loss, net.trainable_variables)

      loss, grads = step(images)
    finally:
      batch_norm.BatchNormalization.fused = True
    moving = [v.numpy() for v in net.non_trainable_variables]
    results.append((loss.numpy(), [g.numpy() for g in grads], moving))
  (loss_a, grads_a, moving_a), (loss_b, grads_b, moving_b) = results
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  # Through 20 batch norms over 32 values a channel, float32 rounding alone
  # moves gradients by ~3e-4 of their largest entry (Keras' own path is as
  # far from a float64 computation).
  for a, b in zip(grads_a, grads_b):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * np.abs(b).max())
  for a, b in zip(moving_a, moving_b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_global_batch_norm_over_two_replicas():
  """Synchronized: statistics of the global batch; else of each replica."""
  result = run_fresh(__file__, "_mirrored_worker")
  assert result.pop("num_replicas") == 2
  # Recomputed blocks would run these batch norms twice (repeating their
  # all-reduces): the block group and the run refuse (in the same process,
  # which has the two replicas).
  group_refusal, run_refusal = result.pop("recompute_refused")
  assert ("block_group: recompute needs batch-norm statistics computed "
          "locally") in group_refusal   # inside Keras' note on the call
  assert run_refusal.startswith(
      "--recompute_blocks=1 with --global_bn over 2 replicas")
  # What the default (-1) resolves to there: nothing with global batch
  # norm, the stem and first block with local statistics.
  assert result.pop("recompute_auto") == {"global_bn": 0, "local_bn": 1}
  for key, value in result.items():
    assert value < 1e-5, (key, result)


def _mirrored_worker():
  """In `run_fresh`'s process: 2 logical CPUs exist before TF starts."""
  shape = (8, 3, 3, 6)
  x = _inputs(shape)
  half = shape[0] // 2
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  diffs = {"num_replicas": strategy.num_replicas_in_sync}
  for synchronized in (True, False):
    ref, _ = _pair(shape, synchronized=synchronized)
    with strategy.scope():
      _, ours = _pair(shape, synchronized=synchronized)
    if synchronized:   # one batch norm over the global batch
      expected = ref(x, training=True).numpy()
    else:              # each replica over its own half
      expected = np.concatenate([
          ref(x[:half], training=True).numpy(),
          _pair(shape, synchronized=False)[0](x[half:],
                                               training=True).numpy()])
    local = strategy.experimental_distribute_values_from_function(
        lambda ctx: x[ctx.replica_id_in_sync_group * half:][:half])

    @tf.function
    def run(local, layer=ours):
      y = strategy.run(lambda v: layer(v, training=True), args=(local,))
      return strategy.gather(y, axis=0)

    got = run(local).numpy()
    name = "global" if synchronized else "local"
    diffs[f"{name}_output"] = float(np.max(np.abs(got - expected)))
    if synchronized:
      diffs["global_moving_mean"] = float(np.max(np.abs(
          ours.moving_mean.numpy() - ref.moving_mean.numpy())))
      diffs["global_moving_variance"] = float(np.max(np.abs(
          ours.moving_variance.numpy() - ref.moving_variance.numpy())))
  diffs["recompute_refused"] = _recompute_refusals(strategy)
  from simclr_tf import runner  # pylint: disable=g-import-not-at-top
  from simclr_tf.config import Config  # pylint: disable=g-import-not-at-top
  diffs["recompute_auto"] = {
      f"{name}_bn": runner.resolve_hardware(
          Config(global_bn=name == "global"), strategy).recompute_blocks
      for name in ("global", "local")}
  return diffs


def _recompute_refusals(strategy):
  """What a recomputing block group with global batch norm, and a run with
  --recompute_blocks, say over `strategy`'s replicas (None: no refusal)."""
  from simclr_tf import runner  # pylint: disable=g-import-not-at-top
  from simclr_tf.config import Config, ConfigError  # pylint: disable=g-import-not-at-top
  from simclr_tf.models.resnet import BlockGroup  # pylint: disable=g-import-not-at-top
  with strategy.scope():
    group = BlockGroup(4, 1, bottleneck=False, recompute_blocks=1,
                       name="block_group")
    group.build((None, 4, 4, 4))
  messages = [None, None]
  try:
    strategy.run(lambda: group(tf.ones((2, 4, 4, 4)), training=True))
  except ValueError as e:
    messages[0] = str(e)
  try:
    runner.check_recompute(Config(recompute_blocks=1), strategy)
  except ConfigError as e:
    messages[1] = str(e)
  return messages
