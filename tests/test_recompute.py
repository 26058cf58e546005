"""simclr_tf/models/recompute.py: block groups that recompute their blocks in
the backward pass, and a ResNet that recomputes its stem with the first
block, train exactly as the plain layers do, keep only the inputs, and run
the recompute in the backward pass."""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT
from simclr_tf.models import batch_norm
from simclr_tf.models import recompute
from simclr_tf.models.resnet import BlockGroup, ResNet

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import saved_for_backward as sfb  # pylint: disable=g-import-not-at-top,wrong-import-position

# Block groups of two blocks (the first with its projection shortcut).
GROUPS = {
    "basic": dict(filters=8, bottleneck=False),
    "bottleneck": dict(filters=4),
    "bottleneck_sk_se": dict(filters=4, strides=2, resnet_d=True,
                             sk_ratio=0.0625, se_ratio=0.25),
}
INPUT_SHAPE = (4, 8, 8, 8)


def _nonzero_gammas(layer):
  """So that every branch carries gradient."""
  for v in layer.weights:
    if v.path.endswith("gamma"):
      v.assign(tf.ones_like(v) * 0.7)
  return layer


def _group(kwargs, recompute, policy="float32"):
  """Two blocks, both recomputed or neither."""
  keras.utils.set_random_seed(3)
  group = BlockGroup(num_blocks=2, recompute_blocks=2 if recompute else 0,
                     dtype=policy, global_bn=False, **kwargs)
  group.build(INPUT_SHAPE)
  return _nonzero_gammas(group)


def _step_fn(group):
  @tf.function
  def step(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      out = group(x, training=True)
      pattern = tf.cos(tf.reshape(
          tf.range(tf.size(out), dtype=tf.float32), tf.shape(out)))
      loss = tf.reduce_sum(tf.cast(out, tf.float32) * pattern)
    return loss, out, tape.gradient(loss, [x] + group.trainable_weights)
  return step


def _input():
  return tf.constant(
      np.random.default_rng(0).standard_normal(INPUT_SHAPE), tf.float32)


def _train(kwargs, recompute_blocks, policy):
  """Output, gradients and moving statistics after one step."""
  group = _group(kwargs, recompute_blocks, policy)
  _, out, grads = _step_fn(group)(_input())
  moving = [v.numpy() for v in group.non_trainable_weights]
  return [out.numpy()] + [g.numpy() for g in grads] + moving


@pytest.mark.parametrize("name,policy", [
    *((name, "float32") for name in GROUPS),
    # The blocks of the two recipes (ResNet-18, ResNet-50) in bfloat16.
    ("basic", "mixed_bfloat16"), ("bottleneck", "mixed_bfloat16")])
def test_group_trains_as_the_plain_blocks(name, policy):
  ours = _train(GROUPS[name], True, policy)
  plain = _train(GROUPS[name], False, policy)
  assert len(ours) == len(plain)
  # Outputs, gradients and moving statistics (updated once, not again by
  # the recompute): the same numbers.
  for a, b in zip(ours, plain):
    np.testing.assert_array_equal(a, b)
  num_moving = len(_group(GROUPS[name], True).non_trainable_weights)
  assert all(np.any(m != 0) for m in ours[-num_moving:][::2])   # the means
  assert np.count_nonzero(ours[1]) > 0.3 * ours[1].size         # d_x


def _kept_activations(recompute):
  """What the step of a basic group keeps (`_kept`)."""
  return _kept(_step_fn(_group(GROUPS["basic"], recompute)))


def _kept(step, input_shape=INPUT_SHAPE, channels=8):
  """Producers of the activation-sized tensors `step` keeps for its
  backward pass (the batch statistics of the moving averages left out)."""
  graph = step.get_concrete_function(
      tf.TensorSpec(input_shape, tf.float32)).graph
  size = int(np.prod(input_shape[:3])) * channels * 4
  return sorted(k.producer for k in sfb.kept_tensors(graph, graph.outputs[0])
                if k.num_bytes >= size)


def test_backward_pass_keeps_only_the_group_input():
  # The check can fail: the plain blocks keep their convolutions' outputs
  # and ReLU outputs.
  plain = _kept_activations(False)
  assert plain.count("Conv2D") >= 3 and "Relu" in plain
  # Ours: each block's input (the group's input, the first block's output);
  # the group's output and the loss's pattern are the loss's gradient's.
  assert _kept_activations(True) == ["Cos", "Placeholder", "Relu", "Relu"]


def _executed_convolutions(recompute_blocks):
  """Forward convolutions in the graph TensorFlow ran for one step: after
  Grappler, which merges identical ops (a recompute that did not wait for
  the backward pass would be merged with the forward pass's own ops)."""
  value = _input().numpy()
  with tf.Graph().as_default(), tf.compat.v1.Session() as session:
    group = _group(GROUPS["basic"], recompute_blocks)
    # A placeholder, so that Grappler cannot fold the step into constants.
    x = tf.compat.v1.placeholder(tf.float32, INPUT_SHAPE)
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = tf.reduce_sum(tf.square(group(x, training=True)))
    grads = tape.gradient(loss, [x] + group.trainable_weights)
    session.run(tf.compat.v1.global_variables_initializer())
    metadata = tf.compat.v1.RunMetadata()
    session.run(grads, feed_dict={x: value},
                options=tf.compat.v1.RunOptions(output_partition_graphs=True),
                run_metadata=metadata)
  return sum(node.op.endswith("Conv2D") for graph in metadata.partition_graphs
             for node in graph.node)


def test_the_recompute_runs_in_the_backward_pass():
  # Each block's convolutions run twice: once forward, once in the backward
  # pass (strided and 1x1 convolutions included).
  plain = _executed_convolutions(False)
  assert plain >= 5   # 2 blocks x 2 convolutions and the projection
  assert _executed_convolutions(True) == 2 * plain


def test_declines_where_it_cannot_run_twice():
  # Cross-replica statistics over several replicas would repeat their
  # all-reduces (batch_norm.num_replicas_in_sync, which the fused batch
  # norm's choice also reads, is tested in tests/test_batch_norm.py).
  assert recompute.can_recompute(global_bn=False, compute_dtype="float32")
  assert recompute.can_recompute(global_bn=True,   # one replica
                                 compute_dtype="bfloat16")
  # float16 takes Keras' batch norm, which would update its statistics in
  # the second run too: the group refuses rather than run plainly.
  assert not recompute.can_recompute(global_bn=False, compute_dtype="float16")
  group = BlockGroup(4, 1, bottleneck=False, recompute_blocks=1,
                     global_bn=False, dtype="mixed_float16")
  with pytest.raises(ValueError, match="recompute needs batch-norm"):
    group(tf.ones((2, 4, 4, 4)), training=True)
  group(tf.ones((2, 4, 4, 4)), training=False)   # inference runs
  # Exports trace the plain blocks.
  with recompute.blocks_kept():
    assert "Conv2D" in _kept_activations(True)
  assert "Conv2D" not in _kept_activations(True)


# A CIFAR ResNet-18 at 1/16 width: 4-32 channels, 8 x 8 images.
RESNET_INPUT = (4, 8, 8, 3)


def _resnet(recompute_blocks, input_shape=RESNET_INPUT, **kwargs):
  keras.utils.set_random_seed(5)
  kwargs = dict(dict(depth=18, width_multiplier=0.0625,
                     cifar_stem=True), **kwargs)
  net = ResNet(global_bn=False, recompute_blocks=recompute_blocks, **kwargs)
  net.build(input_shape)
  return _nonzero_gammas(net)


def _resnet_step(net):
  """A step whose loss reads the last block group (the first group's
  output is also an output, as the heads see it)."""
  @tf.function
  def step(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      out = net(x, training=True)
      pattern = tf.cos(tf.reshape(tf.range(tf.size(out["block_group4"]),
                                           dtype=tf.float32),
                                  tf.shape(out["block_group4"])))
      loss = tf.reduce_sum(tf.cast(out["block_group4"], tf.float32) *
                           pattern)
    return out, tape.gradient(loss, [x] + net.trainable_weights)
  return step


def test_resnet_recomputes_the_stem_with_the_first_block():
  images = tf.constant(np.random.default_rng(1).uniform(size=RESNET_INPUT),
                       tf.float32)
  results = {}
  for blocks in (0, 1, 3):
    net = _resnet(blocks)
    out, grads = _resnet_step(net)(images)
    results[blocks] = ([out["block_group4"], out["final_avg_pool"]] + grads +
                       net.non_trainable_weights)
    # Not kept, so not returned; the plain network returns them.
    assert ("initial_conv" in out) == (blocks == 0)
  for blocks in (1, 3):
    for a, b in zip(results[blocks], results[0]):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Blocks per group: the first N of the network's blocks.
  assert [g.recompute_blocks for g in _resnet(3).block_groups] == [2, 1, 0, 0]
  # What the step keeps at the first group's size (4 channels at 8 x 8):
  # the plain network the outputs of the stem's convolution, the first
  # block's three (its projection shortcut's too) and the second block's
  # two, and ReLU outputs.
  plain = _kept(_resnet_step(_resnet(0)), RESNET_INPUT, channels=4)
  ours = _kept(_resnet_step(_resnet(1)), RESNET_INPUT, channels=4)
  assert plain.count("Conv2D") == 6 and "Relu" in plain   # the check can fail
  # The second block's two convolutions and the two blocks' outputs.
  assert ours == ["Conv2D", "Conv2D", "Relu", "Relu"]


@pytest.mark.slow   # six ResNet-50 traces: ~40 s
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_the_imagenet_recipe_recomputes_as_the_plain_network(policy):
  """The ResNet-50 recipe's network (ImageNet stem, in its ResNet-D form
  with SK: three convolutions and the max-pool; bottlenecks with SK) at
  1/16 width and 64 px, with the stem and 1 or 4 blocks (into the second
  group) recomputed, in the run's precisions on CPUs."""
  shape = (2, 64, 64, 3)
  images = tf.constant(np.random.default_rng(2).uniform(size=shape),
                       tf.float32)
  results = {}
  for blocks in (0, 1, 4):
    net = _resnet(blocks, shape, depth=50, cifar_stem=False,
                  sk_ratio=0.0625, dtype=policy)
    out, grads = _resnet_step(net)(images)
    results[blocks] = [out["block_group4"]] + grads + net.non_trainable_weights
    assert out["block_group4"].dtype == (
        tf.bfloat16 if policy == "mixed_bfloat16" else tf.float32)
  assert [g.recompute_blocks for g in net.block_groups] == [3, 1, 0, 0]
  for blocks in (1, 4):
    for a, b in zip(results[blocks], results[0]):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_frozen_statistics_refuse_the_keras_path():
  bn = batch_norm.BatchNormalization(synchronized=False, renorm=True)
  x = tf.ones((2, 4, 4, 3))
  bn.build(x.shape)
  with batch_norm.BatchNormalization.moving_statistics_frozen():
    with pytest.raises(RuntimeError, match="fused path"):
      bn(x, training=True)
    fused = batch_norm.BatchNormalization(synchronized=False)
    fused(x, training=True)
  assert np.all(fused.moving_mean.numpy() == 0.0)   # not updated while frozen
  fused(x, training=True)
  assert np.all(fused.moving_mean.numpy() != 0.0)
