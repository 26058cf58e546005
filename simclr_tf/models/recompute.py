"""Parts of a ResNet recomputed in the backward pass (gradient checkpointing).

Under autodiff a residual block keeps its convolutions' outputs and its
output for the backward pass. `recomputed(fn, x)` runs `fn` (a block, or the
stem followed by the first block) with its own gradient instead, which keeps
only the input `x`: once the output's gradient exists it runs `fn` again on
`x` (the same ops on the same input, so the same values) and takes
autodiff's gradient of that second run. Outputs and gradients are bitwise
those under autodiff (tests/test_recompute.py); the price is a second
forward pass of `fn`.

The stem and the early blocks hold most of a ResNet's activations.
Recomputing the stem with the first block of the CIFAR ResNet-18 (32 x 32,
64 channels; `ResNet(recompute_blocks=1)`) cuts the float32 pretraining
step's peak at 2 x 256 views from 3.6 to 2.9 GiB, for 1-15% of its speed
on a 2-core CPU in four runs (docs/performance.md, "The stem and the first
block recomputed" and "The default"). A run does so by default on CPUs
(`simclr_tf.distribute.resolve_recompute`).

Batch norm updates its moving statistics once, in the first run: the second
runs inside `moving_statistics_frozen`, which only the fused batch norm
honours. So the statistics must be local and their dtype float32 or
bfloat16 (`can_recompute`): cross-replica ("global") batch norm over several
replicas, or float16, runs Keras' batch norm, which would update them again
(and repeat its all-reduces).
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

from simclr_tf.models import batch_norm

# False: the ResNet recomputes nothing in whatever is traced afterwards
# (exports, comparisons); see `blocks_kept`.
ENABLED = True


@contextlib.contextmanager
def blocks_kept():
  """Within it, nothing is recomputed (autodiff keeps what it needs).
  Exports trace their functions so: a SavedModel then holds no custom
  gradient, and fine-tuning it computes the same gradients by autodiff."""
  global ENABLED
  before = ENABLED
  ENABLED = False
  try:
    yield
  finally:
    ENABLED = before


def can_recompute(global_bn: bool, compute_dtype: str) -> bool:
  """Whether a layer's batch norms can run twice: they take the fused path,
  with local statistics (`global_bn` off, or a single replica in sync) in
  float32 or bfloat16."""
  if tf.as_dtype(compute_dtype) not in batch_norm.FUSED_DTYPES:
    return False
  return not global_bn or batch_norm.num_replicas_in_sync() == 1


def check(layer) -> None:
  """Raises ValueError where `layer` (a BNLayer) cannot be recomputed."""
  if not can_recompute(layer.global_bn, layer.compute_dtype):
    raise ValueError(
        f"{layer.name}: recompute needs batch-norm statistics computed "
        "locally (global_bn=False, or one replica) in float32 or bfloat16; "
        f"here global_bn={layer.global_bn} in {layer.compute_dtype}. Turn "
        "recompute off (recompute_blocks=0).")


def recomputed(fn, x):
  """`fn(x)`, keeping only `x` for the backward pass.

  Args:
    fn: a function of one tensor whose output depends only on it and on
      Keras layers' variables, run in training mode (e.g. a residual block
      called with training=True).
    x: its input tensor.
  Returns:
    `fn(x)`; its gradient with respect to `x` and to the variables `fn`
    reads is autodiff's.
  """

  @tf.custom_gradient
  def forward(x):
    y = fn(x)

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
          y_again = fn(x_when_needed)
      d_x, *d_variables = tape.gradient(
          y_again, [x_when_needed] + variables, output_gradients=d_y,
          unconnected_gradients=tf.UnconnectedGradients.ZERO)
      return d_x, d_variables

    return y, grad

  return forward(x)
