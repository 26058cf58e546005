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

import functools
from typing import Any

import keras
from keras import ops

from simclr_tf.models import recompute as recompute_lib
from simclr_tf.models.config import BLOCK_TYPES, whole_channels
from simclr_tf.models.blocks import (BNLayer, ResidualBlock, apply_conv,
                                     make_conv, nhwc, num_channels)

# Base widths of the four block groups (He et al. 2016, Table 1).
GROUP_FILTERS = (64, 128, 256, 512)
GROUP_STRIDES = (1, 2, 2, 2)
OUTPUT_NAMES = ("initial_conv", "initial_max_pool", "block_group1",
                "block_group2", "block_group3", "block_group4",
                "final_avg_pool")


@keras.saving.register_keras_serializable(package="simclr_tf")
class BlockGroup(BNLayer):
  """`num_blocks` residual blocks 'block_0', 'block_1', ...; the first strides
  and has the projection shortcut.

  Args:
    filters: base width of the blocks.
    num_blocks: number of blocks.
    strides: stride of the first block.
    bottleneck, resnet_d, sk_ratio, se_ratio: as in `ResidualBlock`.
    recompute_blocks: in training, the first `recompute_blocks` blocks
      each keep only their input for the backward pass and run again there
      (`simclr_tf.models.recompute`): less memory for a second forward pass
      of those blocks. Needs local batch-norm statistics (`global_bn=False`
      or one replica) in float32 or bfloat16; a training call elsewhere
      raises ValueError.
    **kwargs: batch-norm arguments of `BNLayer` and Layer arguments.

  Call arguments:
    inputs: the previous layer's output.
    training: batch norms use batch statistics and update moving ones.
    first_block: start at this block; `inputs` is the output of the one
      before it (`ResNet` runs the first block with the stem when it
      recomputes them).
  """

  def __init__(self, filters: int, num_blocks: int, strides: int = 1,
               bottleneck: bool = True, resnet_d: bool = False,
               sk_ratio: float = 0.0, se_ratio: float = 0.0,
               recompute_blocks: int = 0, **kwargs):
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
    self.recompute_blocks = recompute_blocks
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
    channels = num_channels(input_shape)
    for block in self.blocks:
      block.build(nhwc(channels))
      channels = block.out_filters

  def call(self, inputs, training=False, first_block=0):
    x = inputs
    recompute = self.recompute_blocks if training else 0
    if recompute > first_block:
      recompute_lib.check(self)
    for i, block in enumerate(self.blocks[first_block:], start=first_block):
      if i < recompute and block.trainable and recompute_lib.ENABLED:
        x = recompute_lib.recomputed(
            functools.partial(block, training=True), x)
      else:
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
        "recompute_blocks": self.recompute_blocks,
    })
    return config


@keras.saving.register_keras_serializable(package="simclr_tf")
class Stem(BNLayer):
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
    **kwargs: batch-norm arguments of `BNLayer` and Layer arguments.
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
    self.convs = [make_conv(f, k, s, f"conv_{i}", dtype)
                  for i, (f, k, s) in enumerate(specs)]
    self.bns = [self._bn(f"bn_{i}") for i in range(len(specs))]

  def build(self, input_shape):
    channels = num_channels(input_shape)
    for conv, bn in zip(self.convs, self.bns):
      conv.build(nhwc(channels))
      channels = conv.filters
      bn.build(nhwc(channels))

  def call(self, inputs, training=False):
    x = inputs
    for conv, bn in zip(self.convs, self.bns):
      initial_conv = apply_conv(conv, x)
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


@keras.saving.register_keras_serializable(package="simclr_tf")
class ResNet(BNLayer):
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
    recompute_blocks: in training, the stem and the first
      `recompute_blocks` residual blocks keep only their inputs for the
      backward pass and run again there (gradient checkpointing,
      `simclr_tf.models.recompute`): the stem with the first block, from
      the images, then each further block on its own. The same gradients
      in less memory, for a second forward pass of those layers; the
      training call then returns no 'initial_conv' and 'initial_max_pool'
      (they are not kept). Needs local batch-norm statistics (`global_bn`
      off, or one replica) in float32 or bfloat16.
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
               recompute_blocks: int = 0, name: str = "resnet", **kwargs):
    super().__init__(batch_norm_decay=batch_norm_decay,
                     batch_norm_epsilon=batch_norm_epsilon,
                     global_bn=global_bn, name=name, **kwargs)
    if depth not in BLOCK_TYPES:
      raise ValueError(f"depth must be one of {sorted(BLOCK_TYPES)}. "
                       f"Received: depth={depth}")
    if not whole_channels(width_multiplier):
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
    block_type, blocks = BLOCK_TYPES[depth]
    if recompute_blocks not in range(sum(blocks) + 1):
      raise ValueError(f"recompute_blocks must be 0 to {sum(blocks)} (the "
                       f"blocks of a ResNet-{depth}). Received: "
                       f"recompute_blocks={recompute_blocks!r}")
    self.depth = depth
    self.width_multiplier = width_multiplier
    self.sk_ratio = sk_ratio
    self.se_ratio = se_ratio
    self.cifar_stem = cifar_stem
    self.recompute_blocks = recompute_blocks
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
                   recompute_blocks=min(
                       max(recompute_blocks - sum(blocks[:g]), 0), num_blocks),
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
    channels = num_channels(input_shape)
    self.stem.build(nhwc(channels))
    channels = self.stem.filters
    for group in self.block_groups:
      group.build(nhwc(channels))
      channels = group.out_filters

  def call(self, images, training=False):
    outputs = {}
    first_block = 0
    first_group = self.block_groups[0]
    if (training and self.recompute_blocks and recompute_lib.ENABLED and
        self.stem.trainable and first_group.blocks[0].trainable):
      recompute_lib.check(self)

      def stem_and_first_block(x):
        x = self.stem(x, training=True)[1]
        return first_group.blocks[0](x, training=True)

      x = recompute_lib.recomputed(stem_and_first_block, images)
      first_block = 1
    else:
      outputs["initial_conv"], x = self.stem(images, training=training)
      outputs["initial_max_pool"] = x
    for g, group in enumerate(self.block_groups):
      x = group(x, training=training, first_block=first_block if g == 0
                else 0)
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
        "recompute_blocks": self.recompute_blocks,
    })
    return config
