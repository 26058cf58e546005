"""Residual blocks recomputed in the backward pass (gradient checkpointing).

Under autodiff a block keeps its convolutions' outputs and its output for
the backward pass. `recomputed(block, x)` runs the block with its own
gradient instead, which keeps only the block's input `x`: once the
output's gradient exists it runs the block again on `x` (the same ops on
the same input, so the same values) and takes autodiff's gradient of that
second run. Outputs and gradients are bitwise those of the block under
autodiff (tests/test_recompute.py); the price is a second forward pass of
the block.

The early block groups hold most of a ResNet's activations. Recomputing
the first group of the CIFAR ResNet-18 (32 x 32, 64 channels) cuts what its
float32 pretraining step keeps at 2 x 256 views from 1.90 to 1.28 GiB, for
9% of the step's speed on a 2-core CPU (docs/performance.md, "The first
block group recomputed").

Batch norm updates its moving statistics once, in the first run: the second
runs inside `moving_statistics_frozen`, which only the fused batch norm
honours. So the blocks' statistics must be local and their dtype float32
or bfloat16 (`can_recompute`): cross-replica ("global") batch norm over
several replicas, or float16, runs Keras' batch norm, which would update
them again (and repeat its all-reduces).
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

from simclr_tf.models import batch_norm

# False makes `recomputed` run the plain block in whatever is traced
# afterwards (exports, comparisons); see `blocks_kept`.
ENABLED = True


@contextlib.contextmanager
def blocks_kept():
  """Within it, `recomputed` runs the plain block (autodiff keeps what it
  needs). Exports trace their functions so: a SavedModel then holds no
  custom gradient per block, and fine-tuning it computes the same gradients
  by autodiff."""
  global ENABLED
  before = ENABLED
  ENABLED = False
  try:
    yield
  finally:
    ENABLED = before


def can_recompute(global_bn: bool, compute_dtype: str) -> bool:
  """Whether a block's batch norms can run twice: they take the fused path,
  with local statistics (`global_bn` off, or a single replica in sync) in
  float32 or bfloat16."""
  if tf.as_dtype(compute_dtype) not in batch_norm.FUSED_DTYPES:
    return False
  return not global_bn or batch_norm.num_replicas_in_sync() == 1


def recomputed(block, x):
  """`block(x, training=True)`, keeping only `x` for the backward pass.

  Args:
    block: a Keras layer whose output depends only on its input and its
      variables (a residual block).
    x: the block's input tensor.
  Returns:
    The block's output; its gradient with respect to `x` and to the
    block's trainable variables is autodiff's.
  """
  if not ENABLED:
    return block(x, training=True)

  @tf.custom_gradient
  def forward(x):
    y = block(x, training=True)

    def grad(d_y, variables=None):
      variables = list(variables or [])
      # The second run's input waits for the output's gradient: without
      # that, the executor would run it in the forward pass and keep its
      # activations after all (and Grappler would merge it with the first
      # run's identical ops).
      with tf.control_dependencies([d_y]):
        x_when_needed = tf.identity(x)
      with tf.GradientTape() as tape:
        tape.watch(x_when_needed)
        with batch_norm.BatchNormalization.moving_statistics_frozen():
          y_again = block(x_when_needed, training=True)
      d_x, *d_variables = tape.gradient(
          y_again, [x_when_needed] + variables, output_gradients=d_y,
          unconnected_gradients=tf.UnconnectedGradients.ZERO)
      return d_x, d_variables

    return y, grad

  return forward(x)
