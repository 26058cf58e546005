"""The layers of the SimCLRv2 ResNet: residual blocks, selective kernels, SE.

`simclr_tf.models.resnet` stacks them; see its docstring for the
architecture and the official code they follow. Every sublayer has a fixed
name, so variable paths do not depend on what else the process built.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from simclr_tf.models.batch_norm import BatchNormalization
from simclr_tf.models.strided_conv import conv_fixed_padding, fixed_padding

# A bottleneck block outputs 4x its base width (He et al. 2016, Fig. 5).
BOTTLENECK_EXPANSION = 4
# Smallest width of the selective-kernel attention (SKNet, Li et al. 2019,
# "L" in Eq. 4; the official SimCLRv2 code uses 32).
SK_MIN_DIM = 32
# oneDNN's float32 weight gradient of a strided 1x1 convolution is wrong
# when it has fewer than 8 input channels (TensorFlow 2.21 on AVX2 CPUs,
# e.g. the projection shortcuts of a ResNet-18 at width_multiplier=0.0625):
# there `apply_conv` subsamples and convolves at stride 1, the same sums.
# Wider ones keep the strided kernel, which is correct and 1.6x faster
# (tests/test_blocks.py checks both against float64 gradients).
SUBSAMPLE_BELOW = 8
# `apply_conv` runs strided convolutions as `conv_fixed_padding`; False
# makes it convolve a `fixed_pad`ded copy (the official code) in whatever is
# traced afterwards, for comparisons and benchmarks.
PAD_INSIDE = True


def _conv_initializer():
  # tf.keras VarianceScaling() defaults (scale 1, fan_in, truncated normal),
  # as in the official code.
  return keras.initializers.VarianceScaling()


def make_conv(filters: int, kernel_size: int, strides: int, name: str,
              dtype: Any) -> keras.layers.Conv2D:
  """A bias-free convolution; strided ones expect `fixed_pad`ded inputs."""
  return keras.layers.Conv2D(
      filters=filters,
      kernel_size=kernel_size,
      strides=strides,
      padding="same" if strides == 1 else "valid",
      use_bias=False,
      kernel_initializer=_conv_initializer(),
      name=name,
      dtype=dtype)


def _batch_norm(name: str, decay: float, epsilon: float, synchronized: bool,
                dtype: Any,
                zero_init: bool = False) -> BatchNormalization:
  # Keras' layer with a fused kernel for single-replica statistics.
  return BatchNormalization(
      axis=-1,
      momentum=decay,
      epsilon=epsilon,
      gamma_initializer="zeros" if zero_init else "ones",
      synchronized=synchronized,
      name=name,
      dtype=dtype)


def fixed_pad(x, kernel_size: int):
  """Pads H and W by (k - 1) // 2 before and the rest after, for any size."""
  before, after = fixed_padding(kernel_size)
  return ops.pad(x, [[0, 0], [before, after], [before, after], [0, 0]])


def apply_conv(conv: keras.layers.Conv2D, x):
  """Runs `conv`, with the official fixed padding when it is strided.

  On TensorFlow a strided convolution larger than 1x1 runs as
  `strided_conv.conv_fixed_padding`: the sums of `conv(fixed_pad(x))`
  without a padded copy kept for the backward pass. A strided 1x1
  convolution of fewer than SUBSAMPLE_BELOW channels runs as the same
  convolution at stride 1 of every strides-th row and column.
  """
  stride, size = conv.strides[0], conv.kernel_size[0]
  if stride > 1 and size == 1 and num_channels(x.shape) < SUBSAMPLE_BELOW:
    x = x[:, ::stride, ::stride, :]
    return ops.conv(x, ops.cast(conv.kernel, x.dtype), 1, "valid")
  if (stride > 1 and size > 1 and PAD_INSIDE and
      keras.backend.backend() == "tensorflow"):
    x = ops.cast(x, conv.compute_dtype)
    return conv_fixed_padding(x, ops.cast(conv.kernel, x.dtype), stride)
  if stride > 1:
    x = fixed_pad(x, size)
  return conv(x)


def bn_relu_then_conv(bn, conv: keras.layers.Conv2D, x, training):
  """`apply_conv(conv, relu(bn(x)))`.

  Where `bn.relu_conv` can (training on the fused path, a stride-1
  convolution), the backward pass keeps no ReLU output and recomputes it
  (`simclr_tf.models.bn_relu_conv`); the same outputs and gradients.
  """
  if conv.strides[0] == 1 and conv.padding == "same":
    out = bn.relu_conv(x, conv.kernel, training=training)
    if out is not None:
      return out
  return apply_conv(conv, ops.relu(bn(x, training=training)))


def num_channels(input_shape) -> int:
  channels = input_shape[-1]
  if channels is None:
    raise ValueError(
        f"The channel dimension must be known. Received: "
        f"input_shape={tuple(input_shape)}")
  return int(channels)


def nhwc(channels: int):
  return (None, None, None, channels)


@keras.saving.register_keras_serializable(package="simclr_tf")
class BNLayer(keras.layers.Layer):
  """Base of the layers below: holds the batch-norm arguments."""

  def __init__(self, batch_norm_decay: float = 0.9,
               batch_norm_epsilon: float = 1e-5, global_bn: bool = True,
               **kwargs):
    super().__init__(**kwargs)
    self.batch_norm_decay = batch_norm_decay
    self.batch_norm_epsilon = batch_norm_epsilon
    self.global_bn = global_bn

  def _bn(self, name: str, zero_init: bool = False):
    return _batch_norm(name, self.batch_norm_decay, self.batch_norm_epsilon,
                       self.global_bn, self.dtype_policy, zero_init=zero_init)

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update({
        "batch_norm_decay": self.batch_norm_decay,
        "batch_norm_epsilon": self.batch_norm_epsilon,
        "global_bn": self.global_bn,
    })
    return config


@keras.saving.register_keras_serializable(package="simclr_tf")
class SelectiveKernel(BNLayer):
  """Selective-kernel 3x3 convolution as in the official SimCLRv2 code.

  One 3x3 convolution computes both branches (2 x `filters` channels), which
  go through BN-ReLU and are split in two. Their sum is pooled and squeezed to
  max(int(filters * sk_ratio), 32) channels (1x1 conv, BN-ReLU), expanded back
  to 2 x `filters` logits, and a softmax across the two branches weights them.

  Sublayers: 'conv', 'bn', 'reduce', 'reduce_bn', 'expand'.

  Args:
    filters: output channels.
    strides: stride of the 3x3 convolution.
    sk_ratio: width of the attention relative to `filters` (paper: 1/16).
    min_dim: smallest width of the attention.
    **kwargs: batch-norm arguments of `BNLayer` and Layer arguments.
  """

  def __init__(self, filters: int, strides: int = 1, sk_ratio: float = 0.0625,
               min_dim: int = SK_MIN_DIM, **kwargs):
    super().__init__(**kwargs)
    if sk_ratio <= 0:
      raise ValueError(f"sk_ratio must be positive. Received: "
                       f"sk_ratio={sk_ratio}")
    self.filters = filters
    self.strides = strides
    self.sk_ratio = sk_ratio
    self.min_dim = min_dim
    self.mid_dim = max(int(filters * sk_ratio), min_dim)
    dtype = self.dtype_policy
    self.conv = make_conv(2 * filters, 3, strides, "conv", dtype)
    self.bn = self._bn("bn")
    self.reduce = make_conv(self.mid_dim, 1, 1, "reduce", dtype)
    self.reduce_bn = self._bn("reduce_bn")
    self.expand = make_conv(2 * filters, 1, 1, "expand", dtype)

  def build(self, input_shape):
    self.conv.build(nhwc(num_channels(input_shape)))
    self.bn.build(nhwc(2 * self.filters))
    self.reduce.build(nhwc(self.filters))
    self.reduce_bn.build(nhwc(self.mid_dim))
    self.expand.build(nhwc(self.mid_dim))

  def call(self, inputs, training=False):
    x = apply_conv(self.conv, inputs)
    x = ops.relu(self.bn(x, training=training))
    a, b = x[..., :self.filters], x[..., self.filters:]
    pooled = ops.mean(a + b, axis=(1, 2), keepdims=True)
    z = ops.relu(self.reduce_bn(self.reduce(pooled), training=training))
    logits = self.expand(z)
    # softmax over the two branches == sigmoid of their logit difference.
    weight_a = ops.sigmoid(logits[..., :self.filters] -
                           logits[..., self.filters:])
    return b + (a - b) * weight_a

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update({
        "filters": self.filters,
        "strides": self.strides,
        "sk_ratio": self.sk_ratio,
        "min_dim": self.min_dim,
    })
    return config


@keras.saving.register_keras_serializable(package="simclr_tf")
class SqueezeExcite(keras.layers.Layer):
  """Squeeze-and-excitation gate (Hu et al. 2018, arXiv 1709.01507).

  Global average pool, 1x1 conv (with bias) to max(1, int(filters *
  se_ratio)) channels, ReLU, 1x1 conv (with bias) back to the input channels,
  sigmoid, times the input. As in the official code, `filters` is the base
  width of the block (a quarter of a bottleneck's output). Sublayers:
  'reduce', 'expand'.

  Args:
    filters: width the reduction is relative to.
    se_ratio: reduction ratio, in (0, 1].
    **kwargs: Layer arguments.
  """

  def __init__(self, filters: int, se_ratio: float, **kwargs):
    super().__init__(**kwargs)
    if se_ratio <= 0:
      raise ValueError(f"se_ratio must be positive. Received: "
                       f"se_ratio={se_ratio}")
    self.filters = filters
    self.se_ratio = se_ratio
    self.reduced_dim = max(1, int(filters * se_ratio))
    self.reduce = keras.layers.Conv2D(
        self.reduced_dim, 1, use_bias=True,
        kernel_initializer=_conv_initializer(), name="reduce",
        dtype=self.dtype_policy)
    self.expand = None

  def build(self, input_shape):
    channels = num_channels(input_shape)
    # Created in build because its width is the input's.
    self.expand = keras.layers.Conv2D(
        channels, 1, use_bias=True, kernel_initializer=_conv_initializer(),
        name="expand", dtype=self.dtype_policy)
    self.reduce.build(nhwc(channels))
    self.expand.build(nhwc(self.reduced_dim))

  def call(self, inputs):
    gate = ops.mean(inputs, axis=(1, 2), keepdims=True)
    gate = self.expand(ops.relu(self.reduce(gate)))
    return inputs * ops.sigmoid(gate)

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update({"filters": self.filters, "se_ratio": self.se_ratio})
    return config


@keras.saving.register_keras_serializable(package="simclr_tf")
class ResidualBlock(BNLayer):
  """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) residual block.

  Sublayers: 'shortcut_conv', 'shortcut_bn' (projection only); 'conv_0',
  'bn_0', 'conv_1', 'bn_1' and for bottlenecks 'conv_2', 'bn_2', where a
  selective-kernel bottleneck has 'sk_1' in place of 'conv_1' and 'bn_1';
  'se' with se_ratio > 0. The last batch norm has gamma initialised to 0.

  Args:
    filters: base width; a bottleneck outputs 4x as many channels.
    strides: stride of the block (on its 3x3 convolution).
    bottleneck: bottleneck (True) or basic (False) block.
    use_projection: 1x1 projection shortcut instead of the identity.
    resnet_d: ResNet-D projection shortcut (avg pool, then 1x1 conv).
    sk_ratio: > 0 makes the 3x3 conv of a bottleneck a selective kernel.
    se_ratio: > 0 adds squeeze-excitation before the residual sum.
    **kwargs: batch-norm arguments of `BNLayer` and Layer arguments.
  """

  def __init__(self, filters: int, strides: int = 1, bottleneck: bool = True,
               use_projection: bool = False, resnet_d: bool = False,
               sk_ratio: float = 0.0, se_ratio: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.strides = strides
    self.bottleneck = bottleneck
    self.use_projection = use_projection
    self.resnet_d = resnet_d
    self.sk_ratio = sk_ratio
    self.se_ratio = se_ratio
    self.out_filters = filters * (BOTTLENECK_EXPANSION if bottleneck else 1)
    dtype = self.dtype_policy
    bn_args = {"batch_norm_decay": self.batch_norm_decay,
               "batch_norm_epsilon": self.batch_norm_epsilon,
               "global_bn": self.global_bn}

    self.shortcut_conv = None
    self.shortcut_bn = None
    if use_projection:
      # ResNet-D moves the stride into an average pool before the 1x1 conv.
      self.shortcut_conv = make_conv(self.out_filters, 1,
                                 1 if resnet_d else strides, "shortcut_conv",
                                 dtype)
      self.shortcut_bn = self._bn("shortcut_bn")

    self.use_sk = bottleneck and sk_ratio > 0
    self.conv_2 = self.bn_2 = self.sk_1 = self.conv_1 = self.bn_1 = None
    if bottleneck:
      self.conv_0 = make_conv(filters, 1, 1, "conv_0", dtype)
      self.bn_0 = self._bn("bn_0")
      if self.use_sk:
        self.sk_1 = SelectiveKernel(filters, strides, sk_ratio, name="sk_1",
                                    dtype=dtype, **bn_args)
      else:
        self.conv_1 = make_conv(filters, 3, strides, "conv_1", dtype)
        self.bn_1 = self._bn("bn_1")
      self.conv_2 = make_conv(self.out_filters, 1, 1, "conv_2", dtype)
      self.bn_2 = self._bn("bn_2", zero_init=True)
    else:
      self.conv_0 = make_conv(filters, 3, strides, "conv_0", dtype)
      self.bn_0 = self._bn("bn_0")
      self.conv_1 = make_conv(filters, 3, 1, "conv_1", dtype)
      self.bn_1 = self._bn("bn_1", zero_init=True)
    self.se = (SqueezeExcite(filters, se_ratio, name="se", dtype=dtype)
               if se_ratio > 0 else None)

  def build(self, input_shape):
    channels = num_channels(input_shape)
    if self.use_projection:
      self.shortcut_conv.build(nhwc(channels))
      self.shortcut_bn.build(nhwc(self.out_filters))
    self.conv_0.build(nhwc(channels))
    self.bn_0.build(nhwc(self.filters))
    if self.use_sk:
      self.sk_1.build(nhwc(self.filters))
    else:
      self.conv_1.build(nhwc(self.filters))
      self.bn_1.build(nhwc(self.filters))
    if self.bottleneck:
      self.conv_2.build(nhwc(self.filters))
      self.bn_2.build(nhwc(self.out_filters))
    if self.se is not None:
      self.se.build(nhwc(self.out_filters))

  def _shortcut(self, x, training):
    if not self.use_projection:
      return x
    if self.resnet_d:
      if self.strides > 1:
        # Official: pad one row/column after, then a VALID 2x2 pool.
        x = ops.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]])
        x = ops.average_pool(x, 2, self.strides, padding="valid")
      else:
        # Official (stride-1 projection of block group 1): 2x2 SAME pool.
        x = ops.average_pool(x, 2, 1, padding="same")
      x = self.shortcut_conv(x)
    else:
      x = apply_conv(self.shortcut_conv, x)
    return self.shortcut_bn(x, training=training)

  def call(self, inputs, training=False):
    shortcut = self._shortcut(inputs, training)
    x = apply_conv(self.conv_0, inputs)
    if self.bottleneck:
      if self.use_sk:
        x = self.sk_1(ops.relu(self.bn_0(x, training=training)),
                      training=training)
        x = self.conv_2(x)
      else:
        x = bn_relu_then_conv(self.bn_0, self.conv_1, x, training)
        x = bn_relu_then_conv(self.bn_1, self.conv_2, x, training)
      x = self.bn_2(x, training=training)
    else:
      x = self.bn_1(bn_relu_then_conv(self.bn_0, self.conv_1, x, training),
                    training=training)
    if self.se is not None:
      x = self.se(x)
    return ops.relu(x + shortcut)

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update({
        "filters": self.filters,
        "strides": self.strides,
        "bottleneck": self.bottleneck,
        "use_projection": self.use_projection,
        "resnet_d": self.resnet_d,
        "sk_ratio": self.sk_ratio,
        "se_ratio": self.se_ratio,
    })
    return config


