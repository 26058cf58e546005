"""ResNet encoder of SimCLRv2, with ResNet-D, selective kernels and SE.

The architecture follows the official SimCLR TF2 code
(github.com/google-research/simclr, tf2/resnet.py) so that its checkpoints map
onto these layers one to one:

* ResNet v1.5: the stride of a bottleneck sits on its 3x3 convolution
  (He et al. 2016, arXiv 1512.03385, with the torch "v1.5" change).
* Convolutions with stride > 1 pad explicitly ((k - 1) // 2 before, the rest
  after) and then run VALID; TF's SAME would pad depending on the input size
  (only after, on even sizes). Stride-1 convolutions use SAME.
* The first block of every block group has a projection shortcut (also the
  first block of a basic-block group, where 64 -> 64 channels would not need
  one; the official code does the same).
* sk_ratio > 0 turns on ResNet-D (He et al. 2019, arXiv 1812.01187): a stem of
  three 3x3 convolutions and avg-pool + 1x1 conv projection shortcuts; and a
  selective-kernel 3x3 convolution (Li et al. 2019, arXiv 1903.06586) in every
  bottleneck block. Basic blocks keep a plain 3x3 convolution, as officially.
* The last batch norm of every residual block starts with gamma = 0
  (Goyal et al. 2017, arXiv 1706.02677).

Every sublayer has a fixed name, so `variable.path` reads, e.g.,
`resnet/block_group2/block_0/conv_1/kernel` in any process; see `ResNet`.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from simclr_tf import config as config_lib
from simclr_tf.models.batch_norm import BatchNormalization

# Blocks per group (He et al. 2016, Table 1; 200 from He et al. 2016b).
BLOCK_TYPES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
# Base widths of the four block groups (He et al. 2016, Table 1).
GROUP_FILTERS = (64, 128, 256, 512)
GROUP_STRIDES = (1, 2, 2, 2)
# A bottleneck block outputs 4x its base width (He et al. 2016, Fig. 5).
BOTTLENECK_EXPANSION = 4
# Smallest width of the selective-kernel attention (SKNet, Li et al. 2019,
# "L" in Eq. 4; the official SimCLRv2 code uses 32).
SK_MIN_DIM = 32
OUTPUT_NAMES = ("initial_conv", "initial_max_pool", "block_group1",
                "block_group2", "block_group3", "block_group4",
                "final_avg_pool")


def _conv_initializer():
  # tf.keras VarianceScaling() defaults (scale 1, fan_in, truncated normal),
  # as in the official code.
  return keras.initializers.VarianceScaling()


def _conv(filters: int, kernel_size: int, strides: int, name: str,
          dtype: Any) -> keras.layers.Conv2D:
  """A bias-free convolution; strided ones expect `_fixed_pad`ded inputs."""
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


def _fixed_pad(x, kernel_size: int):
  """Pads H and W by (k - 1) // 2 before and the rest after, for any size."""
  total = kernel_size - 1
  before = total // 2
  after = total - before
  return ops.pad(x, [[0, 0], [before, after], [before, after], [0, 0]])


def _apply_conv(conv: keras.layers.Conv2D, x):
  """Runs `conv`, padding first (`_fixed_pad`) when it is strided."""
  if conv.strides[0] > 1:
    x = _fixed_pad(x, conv.kernel_size[0])
  return conv(x)


def _channels(input_shape) -> int:
  channels = input_shape[-1]
  if channels is None:
    raise ValueError(
        f"The channel dimension must be known. Received: "
        f"input_shape={tuple(input_shape)}")
  return int(channels)


def _nhwc(channels: int):
  return (None, None, None, channels)


class _BNLayer(keras.layers.Layer):
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


class SelectiveKernel(_BNLayer):
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
    **kwargs: batch-norm arguments of `_BNLayer` and Layer arguments.
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
    self.conv = _conv(2 * filters, 3, strides, "conv", dtype)
    self.bn = self._bn("bn")
    self.reduce = _conv(self.mid_dim, 1, 1, "reduce", dtype)
    self.reduce_bn = self._bn("reduce_bn")
    self.expand = _conv(2 * filters, 1, 1, "expand", dtype)

  def build(self, input_shape):
    self.conv.build(_nhwc(_channels(input_shape)))
    self.bn.build(_nhwc(2 * self.filters))
    self.reduce.build(_nhwc(self.filters))
    self.reduce_bn.build(_nhwc(self.mid_dim))
    self.expand.build(_nhwc(self.mid_dim))

  def call(self, inputs, training=False):
    x = _apply_conv(self.conv, inputs)
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
    channels = _channels(input_shape)
    # Created in build because its width is the input's.
    self.expand = keras.layers.Conv2D(
        channels, 1, use_bias=True, kernel_initializer=_conv_initializer(),
        name="expand", dtype=self.dtype_policy)
    self.reduce.build(_nhwc(channels))
    self.expand.build(_nhwc(self.reduced_dim))

  def call(self, inputs):
    gate = ops.mean(inputs, axis=(1, 2), keepdims=True)
    gate = self.expand(ops.relu(self.reduce(gate)))
    return inputs * ops.sigmoid(gate)

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update({"filters": self.filters, "se_ratio": self.se_ratio})
    return config


class ResidualBlock(_BNLayer):
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
    **kwargs: batch-norm arguments of `_BNLayer` and Layer arguments.
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
      self.shortcut_conv = _conv(self.out_filters, 1,
                                 1 if resnet_d else strides, "shortcut_conv",
                                 dtype)
      self.shortcut_bn = self._bn("shortcut_bn")

    self.use_sk = bottleneck and sk_ratio > 0
    self.conv_2 = self.bn_2 = self.sk_1 = self.conv_1 = self.bn_1 = None
    if bottleneck:
      self.conv_0 = _conv(filters, 1, 1, "conv_0", dtype)
      self.bn_0 = self._bn("bn_0")
      if self.use_sk:
        self.sk_1 = SelectiveKernel(filters, strides, sk_ratio, name="sk_1",
                                    dtype=dtype, **bn_args)
      else:
        self.conv_1 = _conv(filters, 3, strides, "conv_1", dtype)
        self.bn_1 = self._bn("bn_1")
      self.conv_2 = _conv(self.out_filters, 1, 1, "conv_2", dtype)
      self.bn_2 = self._bn("bn_2", zero_init=True)
    else:
      self.conv_0 = _conv(filters, 3, strides, "conv_0", dtype)
      self.bn_0 = self._bn("bn_0")
      self.conv_1 = _conv(filters, 3, 1, "conv_1", dtype)
      self.bn_1 = self._bn("bn_1", zero_init=True)
    self.se = (SqueezeExcite(filters, se_ratio, name="se", dtype=dtype)
               if se_ratio > 0 else None)

  def build(self, input_shape):
    channels = _channels(input_shape)
    if self.use_projection:
      self.shortcut_conv.build(_nhwc(channels))
      self.shortcut_bn.build(_nhwc(self.out_filters))
    self.conv_0.build(_nhwc(channels))
    self.bn_0.build(_nhwc(self.filters))
    if self.use_sk:
      self.sk_1.build(_nhwc(self.filters))
    else:
      self.conv_1.build(_nhwc(self.filters))
      self.bn_1.build(_nhwc(self.filters))
    if self.bottleneck:
      self.conv_2.build(_nhwc(self.filters))
      self.bn_2.build(_nhwc(self.out_filters))
    if self.se is not None:
      self.se.build(_nhwc(self.out_filters))

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
      x = _apply_conv(self.shortcut_conv, x)
    return self.shortcut_bn(x, training=training)

  def call(self, inputs, training=False):
    shortcut = self._shortcut(inputs, training)
    x = ops.relu(self.bn_0(_apply_conv(self.conv_0, inputs),
                           training=training))
    if self.bottleneck:
      if self.use_sk:
        x = self.sk_1(x, training=training)
      else:
        x = ops.relu(self.bn_1(_apply_conv(self.conv_1, x),
                               training=training))
      x = self.bn_2(self.conv_2(x), training=training)
    else:
      x = self.bn_1(self.conv_1(x), training=training)
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


class BlockGroup(_BNLayer):
  """`num_blocks` residual blocks 'block_0', 'block_1', ...; the first strides
  and has the projection shortcut.

  Args:
    filters: base width of the blocks.
    num_blocks: number of blocks.
    strides: stride of the first block.
    bottleneck, resnet_d, sk_ratio, se_ratio: as in `ResidualBlock`.
    **kwargs: batch-norm arguments of `_BNLayer` and Layer arguments.
  """

  def __init__(self, filters: int, num_blocks: int, strides: int = 1,
               bottleneck: bool = True, resnet_d: bool = False,
               sk_ratio: float = 0.0, se_ratio: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    if num_blocks < 1:
      raise ValueError(f"A block group needs at least one block. Received: "
                       f"num_blocks={num_blocks}")
    self.filters = filters
    self.num_blocks = num_blocks
    self.strides = strides
    self.bottleneck = bottleneck
    self.resnet_d = resnet_d
    self.sk_ratio = sk_ratio
    self.se_ratio = se_ratio
    self.blocks = [
        ResidualBlock(
            filters,
            strides=strides if i == 0 else 1,
            bottleneck=bottleneck,
            use_projection=i == 0,
            resnet_d=resnet_d,
            sk_ratio=sk_ratio,
            se_ratio=se_ratio,
            batch_norm_decay=self.batch_norm_decay,
            batch_norm_epsilon=self.batch_norm_epsilon,
            global_bn=self.global_bn,
            name=f"block_{i}",
            dtype=self.dtype_policy) for i in range(num_blocks)
    ]

  @property
  def out_filters(self) -> int:
    return self.blocks[0].out_filters

  def build(self, input_shape):
    channels = _channels(input_shape)
    for block in self.blocks:
      block.build(_nhwc(channels))
      channels = block.out_filters

  def call(self, inputs, training=False):
    x = inputs
    for block in self.blocks:
      x = block(x, training=training)
    return x

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update({
        "filters": self.filters,
        "num_blocks": self.num_blocks,
        "strides": self.strides,
        "bottleneck": self.bottleneck,
        "resnet_d": self.resnet_d,
        "sk_ratio": self.sk_ratio,
        "se_ratio": self.se_ratio,
    })
    return config


class Stem(_BNLayer):
  """The layers before the first block group.

  * cifar_stem: 3x3 stride-1 conv 'conv_0' + 'bn_0' + ReLU, no max pool.
  * ImageNet: 7x7 stride-2 conv 'conv_0' + 'bn_0' + ReLU + 3x3 stride-2
    SAME max pool.
  * ImageNet with resnet_d: three 3x3 convs 'conv_0' (stride 2, half width),
    'conv_1' (half width), 'conv_2', each followed by 'bn_i' + ReLU, then the
    max pool.

  `call` returns (initial_conv, initial_max_pool): as in the official code,
  the output of the last convolution before its batch norm, and the output
  of the stem.

  Args:
    filters: output channels (64 x width multiplier).
    cifar_stem: the CIFAR stem.
    resnet_d: the ResNet-D stem (ignored with cifar_stem, as officially).
    **kwargs: batch-norm arguments of `_BNLayer` and Layer arguments.
  """

  def __init__(self, filters: int = 64, cifar_stem: bool = False,
               resnet_d: bool = False, **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.cifar_stem = cifar_stem
    self.resnet_d = resnet_d
    dtype = self.dtype_policy
    if cifar_stem:
      specs = [(filters, 3, 1)]
    elif resnet_d:
      specs = [(filters // 2, 3, 2), (filters // 2, 3, 1), (filters, 3, 1)]
    else:
      specs = [(filters, 7, 2)]
    self.convs = [_conv(f, k, s, f"conv_{i}", dtype)
                  for i, (f, k, s) in enumerate(specs)]
    self.bns = [self._bn(f"bn_{i}") for i in range(len(specs))]

  def build(self, input_shape):
    channels = _channels(input_shape)
    for conv, bn in zip(self.convs, self.bns):
      conv.build(_nhwc(channels))
      channels = conv.filters
      bn.build(_nhwc(channels))

  def call(self, inputs, training=False):
    x = inputs
    for conv, bn in zip(self.convs, self.bns):
      initial_conv = _apply_conv(conv, x)
      x = ops.relu(bn(initial_conv, training=training))
    if not self.cifar_stem:
      x = ops.max_pool(x, 3, 2, padding="same")
    return initial_conv, x

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update({
        "filters": self.filters,
        "cifar_stem": self.cifar_stem,
        "resnet_d": self.resnet_d,
    })
    return config


class ResNet(_BNLayer):
  """The SimCLRv2 ResNet encoder (a Keras layer, NHWC).

  Variable paths are `{name}/stem/conv_0/kernel`,
  `{name}/block_group{g}/block_{i}/{conv_j|bn_j|shortcut_conv|shortcut_bn|
  sk_1/...|se/...}/{kernel|gamma|beta|moving_mean|moving_variance|bias}` with
  g in 1..4; they depend only on the arguments and `name` (and on the names
  of the layers this one is called inside).

  Args:
    depth: 18, 34 (basic blocks) or 50, 101, 152, 200 (bottlenecks).
    width_multiplier: channel multiplier (paper: 1, 2, 3); fractions such as
      0.5 or 0.25 give narrow networks for small compute budgets (64 x the
      multiplier must be a whole number of channels).
    sk_ratio: > 0 turns on selective kernels and ResNet-D (paper: 1/16).
    se_ratio: > 0 adds squeeze-excitation to every block.
    cifar_stem: 3x3 stride-1 stem without max pool, for <= 32 px images.
    batch_norm_decay: moving-average momentum of batch norm.
    batch_norm_epsilon: batch-norm epsilon.
    global_bn: synchronise batch-norm statistics across replicas (Keras
      BatchNormalization(synchronized=True); a no-op outside a strategy).
    name: layer name, the first component of the variable paths.
    **kwargs: Layer arguments (dtype, trainable).

  Attributes:
    stem: the `Stem` layer.
    block_groups: the four `BlockGroup` layers. Setting `.trainable = False`
      on a layer freezes it; its batch norms then run in inference mode.

  Call arguments:
    images: [B, H, W, 3] float images in [0, 1]; H and W may be None.
    training: batch norms use batch statistics and update moving ones.

  Returns:
    A dict with 'initial_conv', 'initial_max_pool', 'block_group1' ..
    'block_group4' ([B, h, w, C] maps) and 'final_avg_pool' ([B, C]), all in
    the layer's compute dtype.
  """

  def __init__(self, depth: int = 50, width_multiplier: float = 1,
               sk_ratio: float = 0.0, se_ratio: float = 0.0,
               cifar_stem: bool = False, batch_norm_decay: float = 0.9,
               batch_norm_epsilon: float = 1e-5, global_bn: bool = True,
               name: str = "resnet", **kwargs):
    super().__init__(batch_norm_decay=batch_norm_decay,
                     batch_norm_epsilon=batch_norm_epsilon,
                     global_bn=global_bn, name=name, **kwargs)
    if depth not in BLOCK_TYPES:
      raise ValueError(f"depth must be one of {sorted(BLOCK_TYPES)}. "
                       f"Received: depth={depth}")
    if not config_lib.whole_channels(width_multiplier):
      raise ValueError(
          f"width_multiplier must be positive with {GROUP_FILTERS[0]} x "
          f"width_multiplier a whole number (e.g. 0.25, 0.5, 1, 2). "
          f"Received: width_multiplier={width_multiplier}")
    if not 0.0 <= sk_ratio <= 1.0:
      raise ValueError(f"sk_ratio must be in [0, 1]. Received: "
                       f"sk_ratio={sk_ratio}")
    if not 0.0 <= se_ratio <= 1.0:
      raise ValueError(f"se_ratio must be in [0, 1]. Received: "
                       f"se_ratio={se_ratio}")
    self.depth = depth
    self.width_multiplier = width_multiplier
    self.sk_ratio = sk_ratio
    self.se_ratio = se_ratio
    self.cifar_stem = cifar_stem
    block_type, blocks = BLOCK_TYPES[depth]
    self.bottleneck = block_type == "bottleneck"
    resnet_d = sk_ratio > 0
    bn_args = {"batch_norm_decay": batch_norm_decay,
               "batch_norm_epsilon": batch_norm_epsilon,
               "global_bn": global_bn, "dtype": self.dtype_policy}
    w = self.width_multiplier
    self.stem = Stem(round(GROUP_FILTERS[0] * w), cifar_stem=cifar_stem,
                     resnet_d=resnet_d, name="stem", **bn_args)
    self.block_groups = [
        BlockGroup(round(filters * w), num_blocks, strides,
                   bottleneck=self.bottleneck, resnet_d=resnet_d,
                   sk_ratio=sk_ratio, se_ratio=se_ratio,
                   name=f"block_group{g + 1}", **bn_args)
        for g, (filters, num_blocks, strides) in enumerate(
            zip(GROUP_FILTERS, blocks, GROUP_STRIDES))
    ]

  @property
  def output_dim(self) -> int:
    """Channels of 'final_avg_pool': 512 w (basic) or 2048 w (bottleneck)."""
    return self.block_groups[-1].out_filters

  def build(self, input_shape):
    if len(input_shape) != 4:
      raise ValueError(f"ResNet expects [batch, height, width, channels] "
                       f"images. Received: input_shape={tuple(input_shape)}")
    channels = _channels(input_shape)
    self.stem.build(_nhwc(channels))
    channels = self.stem.filters
    for group in self.block_groups:
      group.build(_nhwc(channels))
      channels = group.out_filters

  def call(self, images, training=False):
    outputs = {}
    outputs["initial_conv"], x = self.stem(images, training=training)
    outputs["initial_max_pool"] = x
    for g, group in enumerate(self.block_groups):
      x = group(x, training=training)
      outputs[f"block_group{g + 1}"] = x
    # Average in float32 even when computing in bfloat16.
    pooled = ops.mean(ops.cast(x, "float32"), axis=(1, 2))
    outputs["final_avg_pool"] = ops.cast(pooled, self.compute_dtype)
    return outputs

  def compute_output_shape(self, input_shape):
    batch, height, width = input_shape[:3]

    def down(size, factor):
      return None if size is None else -(-size // factor)

    stem_down = 1 if self.cifar_stem else 2
    pool_down = 1 if self.cifar_stem else 4
    shapes = {
        "initial_conv": (batch, down(height, stem_down),
                         down(width, stem_down), self.stem.filters),
        "initial_max_pool": (batch, down(height, pool_down),
                             down(width, pool_down), self.stem.filters),
    }
    factor = pool_down
    for g, group in enumerate(self.block_groups):
      factor *= group.strides
      shapes[f"block_group{g + 1}"] = (batch, down(height, factor),
                                       down(width, factor), group.out_filters)
    shapes["final_avg_pool"] = (batch, self.output_dim)
    return shapes

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update({
        "depth": self.depth,
        "width_multiplier": self.width_multiplier,
        "sk_ratio": self.sk_ratio,
        "se_ratio": self.se_ratio,
        "cifar_stem": self.cifar_stem,
    })
    return config
