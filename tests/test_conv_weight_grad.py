"""benchmarks/conv_weight_grad.py: its weight gradients equal TensorFlow's."""

import dataclasses
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import conv_weight_grad  # pylint: disable=g-import-not-at-top,wrong-import-position

Shape = conv_weight_grad.Shape

# The kinds of convolution the recipes have: 3x3 SAME stride 1, 3x3 VALID
# stride 2 (after fixed_pad), 1x1 SAME stride 1 and 2, the 7x7 stem; and the
# official fixed padding given to the convolution itself (explicit), which
# the performance docs compare with fixed_pad.
SHAPES = [
    Shape((8, 8, 3), (3, 3, 3, 5), 1, "SAME"),
    Shape((8, 8, 4), (3, 3, 4, 6), 2, (1, 1, 1, 1)),
    Shape((9, 9, 4), (3, 3, 4, 6), 2, "VALID"),
    Shape((8, 8, 4), (1, 1, 4, 6), 1, "SAME"),
    Shape((8, 8, 4), (1, 1, 4, 6), 2, "SAME"),
    Shape((14, 14, 3), (7, 7, 3, 4), 2, (3, 3, 3, 3)),
]


def _tensors(shape, rng):
  """x, the output gradient, and the weight gradient in float64 (TensorFlow's
  own kernels: oneDNN's float32 one is wrong for strided 1x1 convolutions
  with few input channels, such as two of the shapes here)."""
  x = rng.standard_normal((3,) + shape.hwc)
  w = tf.zeros(shape.kernel, tf.float64)
  x64 = tf.constant(x, tf.float64)
  with tf.GradientTape() as tape:
    tape.watch(w)
    y = tf.nn.conv2d(x64, w, shape.stride,
                     conv_weight_grad.conv_padding(shape.padding))
    dy = rng.standard_normal(y.shape)
    loss = tf.reduce_sum(y * dy)
  return (tf.constant(x, tf.float32), tf.constant(dy, tf.float32),
          tape.gradient(loss, w).numpy())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("grad_fn", [conv_weight_grad.im2col_filter_grad,
                                     conv_weight_grad.taps_filter_grad,
                                     conv_weight_grad.swapped_filter_grad],
                         ids=lambda f: f.__name__)
def test_equals_autodiff(shape, grad_fn):
  x, dy, want = _tensors(shape, np.random.default_rng(0))
  if grad_fn is conv_weight_grad.swapped_filter_grad and shape.stride != 1:
    with pytest.raises(ValueError, match="stride 1 only"):
      grad_fn(x, dy, shape.kernel, shape.stride, shape.padding)
    return
  got = grad_fn(x, dy, shape.kernel, shape.stride, shape.padding).numpy()
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())


def test_conv_shapes_of_the_cifar_recipe():
  config, size = conv_weight_grad.RECIPES["r18-cifar"]
  shapes = conv_weight_grad.conv_shapes(
      dataclasses.replace(config, width_multiplier=0.25), size)
  # ResNet-18: the stem, 16 block convolutions and a projection shortcut
  # at the start of each of the 4 block groups, as officially.
  assert sum(shapes.values()) == 21
  assert {s.stride for s in shapes} == {1, 2}


@pytest.mark.parametrize("shape", [s for s in SHAPES
                                   if not isinstance(s.padding, str)],
                         ids=str)
def test_measure_times_the_input_gradient_the_model_runs(shape):
  # For explicit padding it times the padded copy's input gradient, sliced
  # (what simclr_tf.models.strided_conv runs), and checks it against
  # TensorFlow's explicit-padding one.
  row = conv_weight_grad.measure(shape, 2, tf.float32, repeats=1)
  assert row["input_grad_max_rel_err"] < 1e-5
  assert row["input_grad_ms"] > 0
