"""The layers of simclr_tf/models/blocks.py save and reload, and the shared
layer harness (tests/layer_harness.py) catches the faults it checks for."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from layer_harness import run_layer_test
from simclr_tf.models import blocks

SHAPE = (2, 8, 8, 4)  # a tiny NHWC batch


@pytest.mark.parametrize("kwargs,out_shape", [
    (dict(filters=4), (2, 8, 8, 4)),                 # default min_dim (32)
    (dict(filters=4, strides=2, sk_ratio=0.25, min_dim=2), (2, 4, 4, 4)),
    (dict(filters=3, batch_norm_decay=0.99, batch_norm_epsilon=1e-3,
          global_bn=False), (2, 8, 8, 3)),
])
def test_selective_kernel(kwargs, out_shape):
  result = run_layer_test(blocks.SelectiveKernel, kwargs, SHAPE,
                          expected_output_shape=out_shape)
  layer = result.reloaded.get_layer(result.layer.name)
  assert layer.mid_dim == result.layer.mid_dim
  assert layer.bn.momentum == kwargs.get("batch_norm_decay", 0.9)


@pytest.mark.parametrize("kwargs", [
    dict(filters=4, se_ratio=0.5),
    dict(filters=16, se_ratio=0.0625),   # reduced to one channel
])
def test_squeeze_excite(kwargs):
  result = run_layer_test(blocks.SqueezeExcite, kwargs, SHAPE,
                          expected_output_shape=SHAPE)
  # `expand` is created in build with the input's width.
  layer = result.reloaded.get_layer(result.layer.name)
  assert tuple(layer.expand.kernel.shape) == (1, 1, layer.reduced_dim, 4)


RESIDUAL_BLOCKS = {
    "basic": (dict(filters=4, bottleneck=False), (2, 8, 8, 4)),
    "basic_projection_strided": (
        dict(filters=6, strides=2, bottleneck=False, use_projection=True),
        (2, 4, 4, 6)),
    "basic_se_resnet_d": (
        dict(filters=4, bottleneck=False, use_projection=True,
             resnet_d=True, se_ratio=0.25), (2, 8, 8, 4)),
    # sk_ratio is ignored by basic blocks, as officially.
    "basic_sk_ignored": (
        dict(filters=4, bottleneck=False, sk_ratio=0.0625), (2, 8, 8, 4)),
    "bottleneck": (dict(filters=1, bottleneck=True), (2, 8, 8, 4)),
    "bottleneck_projection_strided": (
        dict(filters=2, strides=2, use_projection=True), (2, 4, 4, 8)),
    "bottleneck_sk": (
        dict(filters=2, use_projection=True, sk_ratio=0.0625), (2, 8, 8, 8)),
    "bottleneck_se": (
        dict(filters=2, use_projection=True, se_ratio=0.25), (2, 8, 8, 8)),
    "bottleneck_sk_se_resnet_d_strided": (
        dict(filters=2, strides=2, use_projection=True, resnet_d=True,
             sk_ratio=0.0625, se_ratio=0.25), (2, 4, 4, 8)),
    "bottleneck_resnet_d_stride_1": (
        dict(filters=2, use_projection=True, resnet_d=True,
             batch_norm_decay=0.95, global_bn=False), (2, 8, 8, 8)),
}


@pytest.mark.parametrize("case", sorted(RESIDUAL_BLOCKS))
def test_residual_block(case):
  kwargs, out_shape = RESIDUAL_BLOCKS[case]
  result = run_layer_test(blocks.ResidualBlock, kwargs, SHAPE,
                          expected_output_shape=out_shape)
  block = result.reloaded.get_layer(result.layer.name)
  assert block.use_sk == (kwargs.get("bottleneck", True) and
                          kwargs.get("sk_ratio", 0.0) > 0)
  assert (block.sk_1 is not None) == block.use_sk
  assert (block.se is not None) == (kwargs.get("se_ratio", 0.0) > 0)
  assert (block.shortcut_conv is not None) == kwargs.get(
      "use_projection", False)


def _gradients(kwargs, dtype, x, weights=None):
  """The block and the gradients of its input and variables, in `dtype`."""
  block = blocks.ResidualBlock(**kwargs, global_bn=False, dtype=dtype,
                               name="block")
  block.build(x.shape)
  if weights is not None:
    block.set_weights(weights)
  x = tf.cast(x, dtype)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = block(x, training=True)
    r = tf.reshape(tf.linspace(-1.0, 1.0, int(np.prod(y.shape))), y.shape)
    loss = tf.reduce_sum(y * tf.cast(r, dtype))
  sources = {"input": x, **{v.path: v for v in block.trainable_variables}}
  grads = tape.gradient(loss, list(sources.values()))
  return block, {k: g.numpy().astype(np.float64)
                 for k, g in zip(sources, grads)}


@pytest.mark.parametrize("channels,size,bottleneck", [
    (4, 8, False), (7, 32, False), (8, 32, False), (12, 8, False),
    (4, 8, True)])
def test_strided_projection_gradients_equal_float64(channels, size,
                                                    bottleneck):
  # oneDNN's float32 weight gradient of a strided 1x1 convolution is wrong
  # below 8 input channels (TensorFlow 2.21, AVX2), which the block routes
  # around (blocks.SUBSAMPLE_BELOW); float64 runs TensorFlow's own kernels.
  # On both sides of that width, every gradient must agree with float64.
  kwargs = dict(filters=4, strides=2, bottleneck=bottleneck,
                use_projection=True)
  x = tf.random.stateless_normal((2, size, size, channels), seed=(1, 2))
  block, _ = _gradients(kwargs, "float64", x)
  # Non-zero last batch-norm scale, so the residual branch has gradients.
  weights = [w + 0.5 if w.ndim == 1 else w for w in block.get_weights()]
  _, want = _gradients(kwargs, "float64", x, weights)
  _, got = _gradients(kwargs, "float32", x, weights)
  assert want.keys() == got.keys()
  for path, g in want.items():
    np.testing.assert_allclose(got[path], g, rtol=1e-4,
                               atol=1e-4 * np.abs(g).max(), err_msg=path)


def test_bn_layer_config_round_trip():
  # The base of the blocks: no call of its own, only the batch-norm
  # arguments its subclasses share.
  layer = blocks.BNLayer(batch_norm_decay=0.99, batch_norm_epsilon=1e-3,
                         global_bn=False, name="base")
  config = layer.get_config()
  assert keras.saving.get_registered_name(blocks.BNLayer) == (
      "simclr_tf>BNLayer")
  clone = keras.saving.deserialize_keras_object(
      keras.saving.serialize_keras_object(layer))
  assert type(clone) is blocks.BNLayer and clone.get_config() == config
  bn = clone._bn("bn", zero_init=True)  # pylint: disable=protected-access
  assert (bn.momentum, bn.epsilon, bn.synchronized) == (0.99, 1e-3, False)


@pytest.mark.parametrize("strides", [1, 2])
def test_make_conv_is_a_serializable_keras_conv(strides):
  # The conv helpers return Keras' own Conv2D (serializable by Keras).
  conv = blocks.make_conv(4, 3, strides, "conv_0", "float32")
  assert type(conv) is keras.layers.Conv2D
  clone = keras.layers.deserialize(keras.layers.serialize(conv))
  assert clone.get_config() == conv.get_config()
  assert clone.padding == ("same" if strides == 1 else "valid")


# The harness must fail on the faults it is there to catch.


@keras.saving.register_keras_serializable(package="harness_selftest")
class _Scale(keras.layers.Layer):
  """A complete, correct layer: x * w + offset."""

  def __init__(self, offset: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    self.offset = offset

  def build(self, input_shape):
    self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones",
                             name="w")

  def call(self, x):
    return x * self.w + self.offset

  def get_config(self):
    return {**super().get_config(), "offset": self.offset}


@keras.saving.register_keras_serializable(package="harness_selftest")
class _ForgetsOffset(_Scale):
  """get_config drops an __init__ argument."""

  def get_config(self):
    config = super().get_config()
    del config["offset"]
    return config


@keras.saving.register_keras_serializable(package="harness_selftest")
class _AlwaysFloat32(_Scale):
  """Casts its output to float32 whatever the policy."""

  def call(self, x):
    return tf.cast(super().call(x), tf.float32)


class _Unregistered(_Scale):
  pass


def test_harness_passes_a_correct_layer():
  result = run_layer_test(_Scale, dict(offset=0.5), (2, 3),
                          package="harness_selftest")
  np.testing.assert_allclose(
      result.outputs,
      result.inputs * result.layer.w.numpy() + 0.5, rtol=1e-6)


def test_harness_catches_an_incomplete_config():
  with pytest.raises(AssertionError, match=r"lacks the __init__ argument"):
    run_layer_test(_ForgetsOffset, dict(offset=0.5), (2, 3),
                   package="harness_selftest")


def test_harness_catches_a_wrong_mixed_precision_dtype():
  with pytest.raises(AssertionError, match="expected bfloat16"):
    run_layer_test(_AlwaysFloat32, {}, (2, 3), package="harness_selftest")
  # The global policy is restored even after a failure.
  assert keras.config.dtype_policy().name == "float32"
  run_layer_test(_AlwaysFloat32, {}, (2, 3), package="harness_selftest",
                 mixed_dtypes="float32")


def test_harness_catches_an_unregistered_layer():
  with pytest.raises(AssertionError, match="is not registered"):
    run_layer_test(_Unregistered, {}, (2, 3), package="harness_selftest")
  # Without the registration check, load_model itself cannot find it.
  with pytest.raises(TypeError, match="_Unregistered"):
    run_layer_test(_Unregistered, {}, (2, 3), package=None)
