"""simclr_tf/models/bn_relu_conv.py: batch norm, ReLU and convolution with the
outputs and gradients of autodiff, keeping no ReLU output; and the blocks
that use it (simclr_tf/models/blocks.py) train as they did."""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT
from simclr_tf.models import batch_norm
from simclr_tf.models import blocks
from simclr_tf.models.bn_relu_conv import bn_relu_conv

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import saved_for_backward as sfb  # pylint: disable=g-import-not-at-top,wrong-import-position

EPSILON = 1e-5
# (input N, H, W, C_in), kernel: a basic block's 3x3, a bottleneck's 1x1.
SHAPES = [((4, 8, 8, 16), (3, 3, 16, 8)), ((4, 6, 6, 8), (1, 1, 8, 32))]


def _autodiff(x, scale, offset, kernel, epsilon):
  """The three ops as blocks ran them before: autodiff keeps the ReLU."""
  empty = tf.zeros([0], tf.float32)
  y, mean, variance = tf.raw_ops.FusedBatchNormV3(
      x=x, scale=scale, offset=offset, mean=empty, variance=empty,
      epsilon=epsilon, exponential_avg_factor=1.0, data_format="NHWC",
      is_training=True)[:3]
  out = tf.nn.conv2d(tf.nn.relu(y), kernel, 1, "SAME")
  return out, mean, variance


def _inputs(x_shape, kernel_shape, dtype):
  rng = np.random.default_rng(sum(x_shape) + sum(kernel_shape))
  x = tf.cast(rng.standard_normal(x_shape) * 2 + 0.5, dtype)
  channels = x_shape[-1]
  scale = tf.constant(rng.uniform(0.5, 1.5, channels), tf.float32)
  # Offsets around 0, so that the ReLU cuts a good part of every channel.
  offset = tf.constant(rng.uniform(-0.5, 0.5, channels), tf.float32)
  kernel = tf.cast(rng.standard_normal(kernel_shape) / 4, dtype)
  return x, scale, offset, kernel


def _run(fn, x, scale, offset, kernel):
  """Outputs and the gradients of a fixed-pattern loss, as arrays."""
  with tf.GradientTape() as tape:
    tape.watch([x, scale, offset, kernel])
    out, mean, variance = fn(x, scale, offset, kernel, EPSILON)
    pattern = tf.cos(tf.reshape(tf.range(tf.size(out), dtype=tf.float32),
                                out.shape))
    loss = tf.reduce_sum(tf.cast(out, tf.float32) * pattern)
  grads = tape.gradient(loss, [x, scale, offset, kernel])
  return [t.numpy().astype(np.float64)
          for t in (out, mean, variance, *grads)]


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("x_shape,kernel_shape", SHAPES)
def test_outputs_and_gradients_are_autodiffs(x_shape, kernel_shape, dtype):
  inputs = _inputs(x_shape, kernel_shape, dtype)
  ours = _run(bn_relu_conv, *inputs)
  reference = _run(_autodiff, *inputs)
  names = ["out", "mean", "variance", "d_x", "d_scale", "d_offset",
           "d_kernel"]
  for name, a, b in zip(names, ours, reference):
    # The same ops on the same inputs: the same numbers, in either dtype.
    np.testing.assert_array_equal(a, b, err_msg=name)
  assert np.count_nonzero(ours[3]) > 0.3 * ours[3].size


def _kept_producers(fn, x_shape, kernel_shape):
  x, scale, offset, kernel = _inputs(x_shape, kernel_shape, tf.float32)
  kernel = tf.Variable(kernel)

  @tf.function
  def step(x):
    with tf.GradientTape() as tape:
      out = fn(x, scale, offset, kernel, EPSILON)[0]
      loss = tf.reduce_sum(out * out)
    kernel.assign_sub(0.1 * tape.gradient(loss, kernel))
    return loss

  graph = step.get_concrete_function(tf.TensorSpec(x_shape)).graph
  return {k.producer for k in sfb.kept_tensors(graph, graph.outputs[0])}


def test_backward_pass_keeps_no_relu_output():
  x_shape, kernel_shape = SHAPES[0]
  # The check can fail: autodiff keeps the ReLU's output.
  assert "Relu" in _kept_producers(_autodiff, x_shape, kernel_shape)
  kept = _kept_producers(bn_relu_conv, x_shape, kernel_shape)
  assert "Relu" not in kept
  assert "Placeholder" in kept   # the batch norm's input, recomputed from


def _executed_op_types(fn):
  """Op types of the graph TensorFlow ran for a step of `fn`: after
  Grappler, which merges identical ops (a recompute that did not wait for
  the backward pass would be merged with the forward pass's own ops)."""
  x_shape, kernel_shape = SHAPES[0]
  values = [t.numpy() for t in _inputs(x_shape, kernel_shape, tf.float32)]
  with tf.Graph().as_default(), tf.compat.v1.Session() as session:
    # Placeholders, so that Grappler cannot fold the step into constants.
    inputs = [tf.compat.v1.placeholder(tf.float32, v.shape) for v in values]
    out = fn(*inputs, EPSILON)[0]
    grads = tf.gradients(tf.reduce_sum(out * out), inputs)
    metadata = tf.compat.v1.RunMetadata()
    session.run(grads, feed_dict=dict(zip(inputs, values)),
                options=tf.compat.v1.RunOptions(output_partition_graphs=True),
                run_metadata=metadata)
  return [node.op for graph in metadata.partition_graphs
          for node in graph.node]


def _batch_norms(op_types):
  return sum("FusedBatchNorm" in t and "Grad" not in t for t in op_types)


def test_the_recompute_runs_in_the_backward_pass():
  # Autodiff's step runs one batch norm; ours a second one, which Grappler
  # would merge into the first if it did not wait for the output gradient.
  assert _batch_norms(_executed_op_types(_autodiff)) == 1
  assert _batch_norms(_executed_op_types(bn_relu_conv)) == 2


BLOCKS = {
    "basic": dict(filters=8, bottleneck=False),
    "basic_projection_strided": dict(filters=8, strides=2, bottleneck=False,
                                     use_projection=True),
    "bottleneck": dict(filters=4, use_projection=True),
    "bottleneck_strided": dict(filters=4, strides=2, use_projection=True),
    "bottleneck_sk": dict(filters=4, use_projection=True, sk_ratio=0.0625),
}


def _train_block(kwargs, recompute, policy):
  """A block's output, gradients and moving statistics after one step."""
  keras.utils.set_random_seed(3)
  batch_norm.BatchNormalization.recompute_relu = recompute
  try:
    block = blocks.ResidualBlock(dtype=policy, **kwargs)
    x = tf.constant(np.random.default_rng(0).standard_normal((4, 8, 8, 8)),
                    tf.float32)
    block.build(x.shape)
    # Non-zero gammas, so that every branch carries gradient.
    for v in block.weights:
      if v.path.endswith("gamma"):
        v.assign(tf.ones_like(v) * 0.7)

    @tf.function
    def step(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        out = block(x, training=True)
        loss = tf.reduce_sum(tf.cast(out, tf.float32) ** 2)
      return loss, out, tape.gradient(loss, [x] + block.trainable_weights)

    _, out, grads = step(x)
    graph = step.get_concrete_function(x).graph
    kept_relu_outputs = sum(k.producer == "Relu" for k in sfb.kept_tensors(
        graph, graph.outputs[0]))
    moving = [v.numpy() for v in block.non_trainable_weights]
  finally:
    batch_norm.BatchNormalization.recompute_relu = True
  return [out.numpy()] + [g.numpy() for g in grads] + moving, kept_relu_outputs


@pytest.mark.parametrize("name,policy", [
    *((name, "float32") for name in BLOCKS),
    # The blocks of the two recipes (ResNet-18, ResNet-50) in bfloat16.
    ("basic", "mixed_bfloat16"), ("bottleneck", "mixed_bfloat16")])
def test_block_trains_as_when_it_kept_the_relu_outputs(name, policy):
  ours, ours_relus = _train_block(BLOCKS[name], True, policy)
  kept, kept_relus = _train_block(BLOCKS[name], False, policy)
  assert len(ours) == len(kept)
  for a, b in zip(ours, kept):
    np.testing.assert_array_equal(a, b)
  # ReLU outputs no longer kept: the inner ones that feed a stride-1
  # convolution. A strided bottleneck's 3x3 convolution still keeps its
  # input, and a selective kernel (which convolves the first ReLU's output
  # itself, and feeds the last convolution without a ReLU) keeps all.
  recomputed = {"basic": 1, "basic_projection_strided": 1, "bottleneck": 2,
                "bottleneck_strided": 1, "bottleneck_sk": 0}[name]
  assert kept_relus - ours_relus == recomputed
  if name != "bottleneck_sk":   # and the block's output, read by the next
    assert ours_relus == 1 + (name == "bottleneck_strided")


def test_declines_outside_training_with_batch_statistics():
  bn = batch_norm.BatchNormalization()
  x = tf.ones((2, 4, 4, 3))
  bn.build(x.shape)
  kernel = tf.ones((3, 3, 3, 2))
  assert bn.relu_conv(x, kernel, training=True) is not None
  assert bn.relu_conv(x, kernel, training=False) is None
  bn.trainable = False
  assert bn.relu_conv(x, kernel, training=True) is None
  bn.trainable = True
  with batch_norm.relu_outputs_kept():
    assert bn.relu_conv(x, kernel, training=True) is None
  assert bn.relu_conv(x, kernel, training=True) is not None
  batch_norm.BatchNormalization.fused = False
  try:
    assert bn.relu_conv(x, kernel, training=True) is None
  finally:
    batch_norm.BatchNormalization.fused = True
