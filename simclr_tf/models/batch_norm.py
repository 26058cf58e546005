"""Batch normalization that runs TensorFlow's fused kernel where it can.

Keras 3's `BatchNormalization` on the TensorFlow backend is unfused: it
upcasts bfloat16 inputs to float32, computes the moments with separate
reductions (with `synchronized=True`, through E[x^2] - E[x]^2, a tensor of
ones and three all-reduces, even with a single replica), then normalises
with element-wise ops and casts back. On a CPU these passes over the
activations cost about as much as the convolutions of a CIFAR ResNet.

`BatchNormalization` below is the Keras layer (same constructor, variables,
variable paths, config and checkpoints) whose `call` uses one
`FusedBatchNormV3` op (oneDNN on x86, with a bfloat16 kernel; cuDNN on GPUs)
whenever the result is the same as Keras':

* the statistics are local: `synchronized=False`, or a single replica in
  sync (outside any strategy, `OneDeviceStrategy`, a one-device
  `MirroredStrategy`);
* NHWC or [batch, features] inputs normalised over the last axis, in
  float32 or bfloat16, without a mask or batch renormalization.

Otherwise (cross-replica "global" batch norm over several replicas, masks,
renorm, other axes or dtypes) it runs the Keras code unchanged. In training
mode the moving statistics are updated exactly as Keras does (with the
biased batch variance; the fused kernel returns the unbiased one, which is
converted back).
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from simclr_tf.models import bn_relu_conv

# Input dtypes of the fused kernel, and so of recomputed blocks
# (models/recompute.py).
FUSED_DTYPES = (tf.float32, tf.bfloat16)


def num_replicas_in_sync() -> int:
  """Replicas that a synchronized batch norm would all-reduce over."""
  ctx = tf.distribute.get_replica_context()
  if ctx is None:   # cross-replica context: Keras computes local moments
    return 1
  return ctx.num_replicas_in_sync


@contextlib.contextmanager
def relu_outputs_kept():
  """Within it, `BatchNormalization.relu_conv` declines, so what is traced
  runs the plain ops and autodiff keeps the ReLU outputs.

  Exports trace their functions so (tf_hub_export/export.py): a SavedModel
  then holds no custom gradient of ours per block, which it would otherwise
  trace, save and load each time, and fine-tuning it computes the same
  gradients by autodiff.
  """
  before = BatchNormalization.recompute_relu
  BatchNormalization.recompute_relu = False
  try:
    yield
  finally:
    BatchNormalization.recompute_relu = before


@keras.saving.register_keras_serializable(package="simclr_tf")
class BatchNormalization(keras.layers.BatchNormalization):
  """`keras.layers.BatchNormalization` with a fused single-replica path.

  Takes the arguments of the Keras layer. The class attribute `fused`
  (default True) switches the fused path off for every instance traced
  afterwards, for comparisons and benchmarks. `relu_conv` runs the layer,
  a ReLU and a convolution without keeping the ReLU's output for the
  backward pass (`bn_relu_conv`).
  """

  fused = True
  # False makes `relu_conv` decline (the caller keeps the ReLU's output),
  # for comparisons and benchmarks.
  recompute_relu = True
  # True while `moving_statistics_frozen` traces a second run of a block.
  _frozen = False

  @classmethod
  @contextlib.contextmanager
  def moving_statistics_frozen(cls):
    """Within it, training-mode calls on the fused path normalise with the
    batch statistics without updating the moving ones: the second run of a
    recomputed block (`simclr_tf.models.recompute`) must not update them a
    second time. A call that would take the Keras path raises instead."""
    before = cls._frozen
    cls._frozen = True
    try:
      yield
    finally:
      cls._frozen = before

  def _can_fuse(self, inputs, mask) -> bool:
    if not self.fused or keras.backend.backend() != "tensorflow":
      return False
    if mask is not None or self.renorm:
      return False
    ndim = len(inputs.shape)
    if ndim not in (2, 4) or self.axis not in (-1, ndim - 1):
      return False
    if inputs.dtype not in FUSED_DTYPES or inputs.shape[-1] is None:
      return False
    return not self.synchronized or num_replicas_in_sync() == 1

  def call(self, inputs, training=None, mask=None):
    inputs = tf.convert_to_tensor(inputs)
    if not self._can_fuse(inputs, mask):
      if self._frozen and training and self.trainable:
        raise RuntimeError(
            f"{self.name}: a recomputed block's batch norm must take the "
            "fused path (local statistics in float32 or bfloat16); the Keras "
            "path would update the moving statistics a second time.")
      return super().call(inputs, training=training, mask=mask)
    channels = int(inputs.shape[-1])
    x = inputs
    if len(inputs.shape) == 2:   # [B, C] -> [B, 1, 1, C]
      x = tf.reshape(x, [-1, 1, 1, channels])
    scale, offset = self._scale_and_offset(channels)
    if training and self.trainable:
      y, mean, variance = self._fused_train(x, scale, offset)
      self._update_moving_statistics(mean, variance)
    else:
      y = tf.raw_ops.FusedBatchNormV3(
          x=x, scale=scale, offset=offset,
          mean=tf.cast(self.moving_mean, tf.float32),
          variance=tf.cast(self.moving_variance, tf.float32),
          epsilon=self.epsilon, data_format="NHWC", is_training=False)[0]
    if len(inputs.shape) == 2:
      y = tf.reshape(y, tf.shape(inputs))
    return tf.cast(y, self.compute_dtype)

  def relu_conv(self, inputs, kernel, training=None):
    """`conv(relu(self(inputs)))` for a stride-1 SAME `kernel`, or None.

    In training with batch statistics on the fused path, the result of
    `bn_relu_conv.bn_relu_conv` (which keeps no ReLU output for the
    backward pass), with the moving statistics updated as `call` does.
    Elsewhere (inference, frozen, the Keras path) None: the caller runs the
    three layers itself.
    """
    inputs = tf.convert_to_tensor(inputs)
    if not (self.recompute_relu and training and self.trainable and
            len(inputs.shape) == 4 and
            self._can_fuse(inputs, None) and
            inputs.dtype == self.compute_dtype):
      return None
    scale, offset = self._scale_and_offset(int(inputs.shape[-1]))
    out, mean, unbiased = bn_relu_conv.bn_relu_conv(
        inputs, scale, offset, tf.cast(kernel, inputs.dtype), self.epsilon)
    self._update_moving_statistics(
        tf.stop_gradient(mean), self._biased(inputs, unbiased))
    return out

  def _scale_and_offset(self, channels: int):
    scale = (tf.cast(self.gamma, tf.float32) if self.scale
             else tf.ones([channels], tf.float32))
    offset = (tf.cast(self.beta, tf.float32) if self.center
              else tf.zeros([channels], tf.float32))
    return scale, offset

  def _update_moving_statistics(self, mean, variance):
    if self._frozen:
      return
    momentum = tf.cast(self.momentum, tf.float32)
    self.moving_mean.assign(
        tf.cast(self.moving_mean, tf.float32) * momentum +
        mean * (1.0 - momentum))
    self.moving_variance.assign(
        tf.cast(self.moving_variance, tf.float32) * momentum +
        variance * (1.0 - momentum))

  @staticmethod
  def _biased(x, unbiased):
    # The kernel's variance has Bessel's correction n / (n - 1); Keras
    # (and the normalisation itself) uses the biased one.
    count = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
    return tf.stop_gradient(
        unbiased * ((count - 1.0) / tf.maximum(count, 1.0)))

  def _fused_train(self, x, scale, offset):
    """Normalises `x` with its batch statistics.

    Args:
      x: [N, H, W, C] float32 or bfloat16.
      scale: [C] float32 gamma (ones without scale).
      offset: [C] float32 beta (zeros without center).
    Returns:
      (normalised x in x's dtype, [C] float32 batch mean, [C] float32 biased
      batch variance), the mean and variance Keras' moments give.
    """
    empty = tf.zeros([0], tf.float32)
    y, mean, unbiased, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=empty, variance=empty,
        epsilon=self.epsilon, exponential_avg_factor=1.0, data_format="NHWC",
        is_training=True)
    return y, tf.stop_gradient(mean), self._biased(x, unbiased)
