"""simclr_tf/models/strided_conv.py: the sums of the official padded copy,
with the fast kernels and without the copy."""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT
from simclr_tf.models import blocks
from simclr_tf.models.strided_conv import conv_fixed_padding

# Every strided convolution larger than 1x1 of the two recipes of
# benchmarks/conv_weight_grad.py, as (input H, W, C_in), kernel: the CIFAR
# ResNet-18 and the ResNet-50 at 224 px (its 7x7 stem first), width 1.
RECIPE_SHAPES = [
    ((32, 32, 64), (3, 3, 64, 128)),
    ((16, 16, 128), (3, 3, 128, 256)),
    ((8, 8, 256), (3, 3, 256, 512)),
    ((224, 224, 3), (7, 7, 3, 64)),
    ((56, 56, 128), (3, 3, 128, 128)),
    ((28, 28, 256), (3, 3, 256, 256)),
    ((14, 14, 512), (3, 3, 512, 512)),
]
# Odd sizes, an even kernel, stride 3: the padding is the official one for
# any shape, not only the recipes'.
OTHER_SHAPES = [((9, 9, 3), (3, 3, 3, 5)), ((15, 15, 3), (7, 7, 3, 4)),
                ((8, 8, 2), (4, 4, 2, 3)), ((10, 10, 2), (5, 5, 2, 3))]
# bfloat16 keeps 8 significant bits: half a unit in the last place.
BF16_EPS = 2 ** -9


def _run(conv, x, kernel, stride, dtype):
  """conv's output and its input and kernel gradients, as float64 arrays;
  the output gradient is a fixed pattern rounded to `dtype`."""
  with tf.GradientTape() as tape:
    tape.watch([x, kernel])
    y = conv(x, kernel, stride)
    r = tf.cos(tf.reshape(tf.range(tf.size(y), dtype=tf.float64), y.shape))
    loss = tf.reduce_sum(y * tf.cast(tf.cast(r, dtype), y.dtype))
  return [t.numpy().astype(np.float64)
          for t in (y, *tape.gradient(loss, [x, kernel]))]


def _padded_copy(x, kernel, stride):
  """The official code: pad a copy (fixed_pad), convolve it VALID."""
  return tf.nn.conv2d(blocks.fixed_pad(x, int(kernel.shape[0])), kernel,
                      stride, "VALID")


def _inputs(hwc, kernel_shape, dtype):
  rng = np.random.default_rng(sum(hwc) + sum(kernel_shape))
  x = rng.standard_normal((2,) + hwc)
  kernel = rng.standard_normal(kernel_shape) / np.sqrt(
      np.prod(kernel_shape[:3]))
  return tf.cast(tf.constant(x), dtype), tf.cast(tf.constant(kernel), dtype)


def _float64(conv, x, kernel, stride):
  """`conv` in float64 (TensorFlow's own kernels) on x and kernel as they
  are (already rounded to their dtype)."""
  return _run(conv, tf.cast(x, tf.float64), tf.cast(kernel, tf.float64),
              stride, x.dtype)


def _check(hwc, kernel_shape, stride, dtype, rtol):
  x, kernel = _inputs(hwc, kernel_shape, dtype)
  want = _float64(_padded_copy, x, kernel, stride)
  got = _run(conv_fixed_padding, x, kernel, stride, dtype)
  for name, g, w in zip(("output", "input grad", "kernel grad"), got, want):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max(),
                               err_msg=f"{dtype.name} {name}")


@pytest.mark.parametrize("hwc,kernel_shape", RECIPE_SHAPES + OTHER_SHAPES)
def test_float32_equals_the_padded_copy(hwc, kernel_shape):
  # float32 runs oneDNN's kernels on x86: exact to float32 rounding.
  _check(hwc, kernel_shape, 2, tf.float32, 1e-5)


@pytest.mark.parametrize("hwc,kernel_shape", OTHER_SHAPES[:2])
def test_float64_and_stride_3_equal_the_padded_copy(hwc, kernel_shape):
  _check(hwc, kernel_shape, 2, tf.float64, 1e-12)
  _check(hwc, kernel_shape, 3, tf.float64, 1e-12)


@pytest.mark.parametrize("hwc,kernel_shape",
                         RECIPE_SHAPES[:3] + RECIPE_SHAPES[4:])
def test_bfloat16_is_as_exact_as_tensorflows_own_gradient(hwc,
                                                         kernel_shape):
  # Mixed precision runs these convolutions in bfloat16, where TensorFlow's
  # own gradients of the padded copy round far more than half a unit (2-5%
  # of the largest value on an AVX2 CPU). Ours may differ from them, but
  # must be as close to float64 on the same bfloat16 inputs, within
  # bfloat16 rounding. (The 7x7 stem of 224 px images is left out:
  # emulated bfloat16 takes seconds where the CPU has none, and its kernels
  # are the float32 test's.)
  x, kernel = _inputs(hwc, kernel_shape, tf.bfloat16)
  exact = _float64(_padded_copy, x, kernel, 2)
  ours = _run(conv_fixed_padding, x, kernel, 2, tf.bfloat16)
  theirs = _run(_padded_copy, x, kernel, 2, tf.bfloat16)
  for name, e, o, t in zip(("output", "input grad", "kernel grad"), exact,
                           ours, theirs):
    scale = np.abs(e).max()
    ours_err = np.abs(o - e).max() / scale
    theirs_err = np.abs(t - e).max() / scale
    assert ours_err <= theirs_err + 4 * BF16_EPS, (name, ours_err,
                                                   theirs_err)


def test_apply_conv_keeps_no_padded_copy():
  # The point of the function: no Pad op whose output the backward pass
  # would keep; the input gradient runs VALID on the padded shape (oneDNN's
  # explicit-padding input gradient is slow), the rest pads explicitly.
  conv = blocks.make_conv(4, 3, 2, "conv", "float32")
  conv.build((None, None, None, 3))

  @tf.function
  def grads(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = tf.reduce_sum(blocks.apply_conv(conv, x))
    return tape.gradient(loss, [x, conv.kernel])

  graph = grads.get_concrete_function(
      tf.TensorSpec([2, 8, 8, 3], tf.float32)).graph
  padding = {}
  for op in graph.get_operations():
    assert op.type not in ("Pad", "PadV2", "MirrorPad"), op.name
    if op.type.startswith("Conv2D"):
      padding.setdefault(op.type, set()).add(op.get_attr("padding").decode())
  assert padding == {"Conv2D": {"EXPLICIT"}, "Conv2DBackpropInput": {"VALID"},
                     "Conv2DBackpropFilter": {"EXPLICIT"}}


@pytest.mark.slow
def test_recipe_shapes_are_the_recipes_strided_convolutions():
  # RECIPE_SHAPES above is what the two recipes' models run.
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import conv_weight_grad  # pylint: disable=g-import-not-at-top
  found = []
  for config, size in conv_weight_grad.RECIPES.values():
    for shape in conv_weight_grad.conv_shapes(config, size):
      if shape.stride > 1 and shape.kernel[0] > 1:
        found.append((shape.hwc, shape.kernel))
  assert sorted(found) == sorted(RECIPE_SHAPES)
