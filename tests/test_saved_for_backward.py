"""benchmarks/saved_for_backward.py: what a step keeps for its backward pass."""

import os
import sys

import tensorflow as tf

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import saved_for_backward as sfb  # pylint: disable=g-import-not-at-top,wrong-import-position

N, K, M = 6, 5, 4


def _step_graph(paddings):
  """A dense layer, ReLU, a pad and a loss, its gradient and an update."""
  w = tf.Variable(tf.ones([K, M]))

  @tf.function
  def step(x):
    with tf.GradientTape() as tape:
      y = tf.nn.relu(tf.matmul(x, w))
      z = tf.identity(tf.pad(y, paddings))
      loss = tf.reduce_sum(z * 2.0)
    w.assign_sub(0.1 * tape.gradient(loss, w))
    return loss

  graph = step.get_concrete_function(tf.TensorSpec([N, K])).graph
  return graph, graph.outputs[0]


def test_keeps_the_relu_output_and_the_input_once_each():
  graph, loss = _step_graph([[0, 0], [0, 0]])
  kept = sfb.kept_tensors(graph, loss)
  # ReLU's gradient reads its output, the weight gradient the input; the pad
  # of nothing and the identity pass the ReLU's output on (counted once);
  # the variable and the constants are not activations.
  assert {(k.producer, k.num_bytes) for k in kept} == {
      ("Relu", N * M * 4), ("Placeholder", N * K * 4)}
  relu, = [k for k in kept if k.producer == "Relu"]
  assert "ReluGrad" in relu.consumers
  assert kept[0].num_bytes >= kept[1].num_bytes   # largest first


def test_a_pad_that_pads_is_a_tensor_of_its_own():
  graph, loss = _step_graph([[0, 0], [1, 0]])
  producers = {k.producer for k in sfb.kept_tensors(graph, loss)}
  # The pad's gradient reads only its input's shape: no padded copy is
  # kept, and the ReLU's output still is.
  assert "Relu" in producers and "Placeholder" in producers
  assert sfb._pads_nothing(  # pylint: disable=protected-access
      [op for op in graph.get_operations() if op.type == "Pad"][0]) is False


def test_the_update_is_not_forward():
  graph, loss = _step_graph([[0, 0], [0, 0]])
  forward = sfb.forward_ops(loss)
  types = {op.type for op in graph.get_operations() if op.name in forward}
  assert "MatMul" in types and "Relu" in types
  assert not types & {"ReluGrad", "AssignSubVariableOp"}


def test_by_kind_sums_counts_and_bytes():
  kept = [sfb.Kept("a", "Relu", ("ReluGrad",), 8),
          sfb.Kept("b", "Relu", ("ReluGrad",), 4),
          sfb.Kept("c", "Conv2D", ("FusedBatchNormGradV3",), 16)]
  assert sfb.by_kind(kept) == [("Conv2D", "FusedBatchNormGradV3", 1, 16),
                               ("Relu", "ReluGrad", 2, 12)]


def test_ops_the_step_never_runs_read_nothing():
  w = tf.Variable(tf.ones([K, M]))

  @tf.function
  def step(x):
    with tf.GradientTape() as tape:
      y = tf.matmul(x, w)
      tf.identity(y)   # read by nothing: pruned before the step runs
      loss = tf.reduce_sum(y * 2.0)
    w.assign_sub(0.1 * tape.gradient(loss, w))
    return loss

  graph = step.get_concrete_function(tf.TensorSpec([N, K])).graph
  producers = {k.producer for k in sfb.kept_tensors(graph, graph.outputs[0])}
  # The weight gradient reads the input; the product's gradient needs no
  # forward tensor, and the dangling identity does not count.
  assert producers == {"Placeholder"}
  assert any(op.type == "Identity" and op.inputs[0].op.type == "MatMul"
             for op in graph.get_operations())
