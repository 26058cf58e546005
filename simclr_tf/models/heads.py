"""Projection head and supervised head of SimCLRv2.

As in the official SimCLR TF2 code (github.com/google-research/simclr,
tf2/model.py): every projection layer is a bias-free dense layer followed by
batch norm; the middle layers keep the input width and add a beta and a ReLU,
the last one has neither. SimCLRv2 uses a 3-layer head and fine-tunes from
its first layer (Chen et al. 2020b, arXiv 2006.10029, section 2).
"""

from __future__ import annotations

from typing import Any, Optional

import keras
from keras import ops

from simclr_tf.models.config import PROJ_HEAD_MODES, num_proj_layers
from simclr_tf.models.batch_norm import BatchNormalization

# Dense kernels of the projection head start at N(0, 0.01^2), as officially.
PROJ_KERNEL_STDDEV = 0.01


@keras.saving.register_keras_serializable(package="simclr_tf")
class ProjectionLayer(keras.layers.Layer):
  """Dense (no bias) + batch norm (+ ReLU): one layer of the projection head.

  Sublayers: 'dense', 'bn'.

  Args:
    units: output width; None keeps the input width (known at build).
    center: batch norm with a beta (middle layers) or without (last layer).
    relu: apply a ReLU after the batch norm.
    batch_norm_decay: moving-average momentum of batch norm.
    batch_norm_epsilon: batch-norm epsilon.
    global_bn: synchronise batch-norm statistics across replicas.
    **kwargs: Layer arguments.
  """

  def __init__(self, units: Optional[int] = None, center: bool = True,
               relu: bool = True, batch_norm_decay: float = 0.9,
               batch_norm_epsilon: float = 1e-5, global_bn: bool = True,
               **kwargs):
    super().__init__(**kwargs)
    if units is not None and units < 1:
      raise ValueError(f"units must be positive or None. Received: "
                       f"units={units}")
    self.units = units
    self.center = center
    self.relu = relu
    self.batch_norm_decay = batch_norm_decay
    self.batch_norm_epsilon = batch_norm_epsilon
    self.global_bn = global_bn
    self.dense = None
    self.bn = None

  def build(self, input_shape):
    in_dim = input_shape[-1]
    if in_dim is None:
      raise ValueError(f"The feature dimension must be known. Received: "
                       f"input_shape={tuple(input_shape)}")
    # Created here because the width of a middle layer is the input's.
    self.dense = keras.layers.Dense(
        self.units or int(in_dim), use_bias=False,
        kernel_initializer=keras.initializers.RandomNormal(
            stddev=PROJ_KERNEL_STDDEV),
        name="dense", dtype=self.dtype_policy)
    self.bn = BatchNormalization(
        momentum=self.batch_norm_decay, epsilon=self.batch_norm_epsilon,
        center=self.center, synchronized=self.global_bn, name="bn",
        dtype=self.dtype_policy)
    self.dense.build(tuple(input_shape))
    self.bn.build(tuple(input_shape[:-1]) + (self.dense.units,))

  def call(self, inputs, training=False):
    x = self.bn(self.dense(inputs), training=training)
    return ops.relu(x) if self.relu else x

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.units or input_shape[-1],)

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update({
        "units": self.units,
        "center": self.center,
        "relu": self.relu,
        "batch_norm_decay": self.batch_norm_decay,
        "batch_norm_epsilon": self.batch_norm_epsilon,
        "global_bn": self.global_bn,
    })
    return config


@keras.saving.register_keras_serializable(package="simclr_tf")
class ProjectionHead(keras.layers.Layer):
  """The SimCLR projection head g(.), layers 'layer_1' .. 'layer_k'.

  Variable paths: `{name}/layer_{j}/dense/kernel` and
  `{name}/layer_{j}/bn/{gamma|beta|moving_mean|moving_variance}`; a head cut
  with `num_layers_kept` has exactly the paths of the full head's first
  layers, so their weights restore by path.

  Args:
    mode: 'nonlinear' (num_layers layers; the first num_layers - 1 are
      Dense(input width) + BN + ReLU, the last Dense(out_dim) + BN without
      beta), 'linear' (one Dense(out_dim) + BN without beta) or 'none'.
    num_layers: layers of the nonlinear head (SimCLRv2: 3).
    out_dim: width of the last layer (paper: 128).
    num_layers_kept: build only the first k layers (None: all). Fine-tuning
      from projection layer k drops the layers above it.
    batch_norm_decay: moving-average momentum of batch norm.
    batch_norm_epsilon: batch-norm epsilon.
    global_bn: synchronise batch-norm statistics across replicas.
    name: layer name.
    **kwargs: Layer arguments.

  Call arguments:
    x: [B, D] features.
    training: batch norms use batch statistics and update moving ones.

  Returns:
    A list [x, h_1, ..., h_k] of the input and the output of every kept
    layer.
  """

  def __init__(self, mode: str = "nonlinear", num_layers: int = 3,
               out_dim: int = 128, num_layers_kept: Optional[int] = None,
               batch_norm_decay: float = 0.9, batch_norm_epsilon: float = 1e-5,
               global_bn: bool = True, name: str = "proj_head", **kwargs):
    super().__init__(name=name, **kwargs)
    if mode not in PROJ_HEAD_MODES:
      raise ValueError(f"mode must be one of {PROJ_HEAD_MODES}. Received: "
                       f"mode={mode!r}")
    if num_layers < 1:
      raise ValueError(f"num_layers must be at least 1. Received: "
                       f"num_layers={num_layers}")
    if out_dim < 1:
      raise ValueError(f"out_dim must be positive. Received: "
                       f"out_dim={out_dim}")
    if num_layers_kept is not None and num_layers_kept < 0:
      raise ValueError(f"num_layers_kept must be >= 0 or None. Received: "
                       f"num_layers_kept={num_layers_kept}")
    self.mode = mode
    self.num_layers = num_layers
    self.out_dim = out_dim
    self.num_layers_kept = num_layers_kept
    self.batch_norm_decay = batch_norm_decay
    self.batch_norm_epsilon = batch_norm_epsilon
    self.global_bn = global_bn

    total = num_proj_layers(mode, num_layers)
    kept = total if num_layers_kept is None else min(total, num_layers_kept)
    self.proj_layers = []
    for j in range(1, kept + 1):
      last = j == total
      self.proj_layers.append(ProjectionLayer(
          units=out_dim if last else None,
          center=not last,
          relu=not last,
          batch_norm_decay=batch_norm_decay,
          batch_norm_epsilon=batch_norm_epsilon,
          global_bn=global_bn,
          name=f"layer_{j}",
          dtype=self.dtype_policy))

  @property
  def num_outputs(self) -> int:
    """Projection layers computed (the length of the output list - 1)."""
    return len(self.proj_layers)

  def build(self, input_shape):
    shape = tuple(input_shape)
    for layer in self.proj_layers:
      layer.build(shape)
      shape = layer.compute_output_shape(shape)

  def call(self, x, training=False):
    hiddens = [x]
    for layer in self.proj_layers:
      hiddens.append(layer(hiddens[-1], training=training))
    return hiddens

  def compute_output_shape(self, input_shape):
    shapes = [tuple(input_shape)]
    for layer in self.proj_layers:
      shapes.append(layer.compute_output_shape(shapes[-1]))
    return shapes

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update({
        "mode": self.mode,
        "num_layers": self.num_layers,
        "out_dim": self.out_dim,
        "num_layers_kept": self.num_layers_kept,
        "batch_norm_decay": self.batch_norm_decay,
        "batch_norm_epsilon": self.batch_norm_epsilon,
        "global_bn": self.global_bn,
    })
    return config


@keras.saving.register_keras_serializable(package="simclr_tf")
class SupervisedHead(keras.layers.Layer):
  """Linear classifier 'head_supervised/dense', zero-initialised, float32.

  SimCLRv2 fine-tunes a new linear head that starts at zero (kernel and
  bias). The layer always computes in float32 (whatever the global policy),
  so its logits feed the loss at full precision.

  Args:
    num_classes: number of classes.
    name: layer name.
    **kwargs: Layer arguments; a `dtype` is ignored (always float32).
  """

  def __init__(self, num_classes: int, name: str = "head_supervised",
               **kwargs):
    kwargs.pop("dtype", None)
    super().__init__(name=name, dtype="float32", **kwargs)
    if num_classes < 1:
      raise ValueError(f"num_classes must be positive. Received: "
                       f"num_classes={num_classes}")
    self.num_classes = num_classes
    self.dense = keras.layers.Dense(
        num_classes, use_bias=True, kernel_initializer="zeros",
        bias_initializer="zeros", name="dense", dtype=self.dtype_policy)

  def build(self, input_shape):
    self.dense.build(tuple(input_shape))

  def call(self, x):
    return self.dense(x)

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.num_classes,)

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update({"num_classes": self.num_classes})
    return config
