r"""The convolutions of a recipe, one by one: forward, input gradient and
weight gradient, TensorFlow's kernels against three other ways to compute
the weight gradient.

A profile of the training step (profile_step.py) gives the weight gradient
(`Conv2DBackpropFilter`) as one sum. This script finds every convolution of
the model that a recipe trains (traced from the Keras model, so each shape
is the one the step runs, with how often it occurs), then times, per shape,
on the same random tensors:

  forward         tf.nn.conv2d
  input grad      tf.raw_ops.Conv2DBackpropInput (for explicit padding,
                  the padded copy's, sliced, as the model computes it)
  weight grad     tf.raw_ops.Conv2DBackpropFilter (what autodiff calls)
  im2col          the weight gradient as one matrix product of the
                  image patches (tf.image.extract_patches) with the output
                  gradient: [k*k*C_in, N*H*W] x [N*H*W, C_out]
  taps            one matrix product per kernel tap (k*k of them), each of
                  the shifted input's [C_in, N*H*W] with the output
                  gradient: no k*k-times larger patch tensor
  swapped         one forward convolution with batch and channels swapped:
                  the padded input as [C_in, H, W, N] convolved with the
                  output gradient as a [H_out, W_out, N, C_out] filter
                  (stride 1 only; the kernel runs forward convolution code)

and checks that each equals TensorFlow's gradient (largest error relative
to the largest value). Totals are weighted by each shape's count.
Run it with ONEDNN_VERBOSE=1 to see which oneDNN implementation each
primitive runs (brgconv/AMX, jit:avx2, gemm, ref...).

  .venv/bin/python benchmarks/conv_weight_grad.py --recipe r18-cifar \
      --batch 512 --dtype float32 [--repeats 5] [--json PATH]

Recipes: r18-cifar (full-width ResNet-18, CIFAR stem, 32 px; the pretraining
batch of 2 x 256 views is 512) and r50-224 (ResNet-50, 224 px).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import simclr_tf  # noqa: F401  (chooses oneDNN before TensorFlow loads)  pylint: disable=unused-import,g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_tf.models.config import ModelConfig  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_tf.models.simclr import build_float32  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_tf.models import strided_conv  # pylint: disable=g-import-not-at-top,wrong-import-position

RECIPES = {
    "r18-cifar": (ModelConfig(resnet_depth=18, width_multiplier=1.0,
                              cifar_stem=True, global_bn=False), 32),
    "r50-224": (ModelConfig(resnet_depth=50, width_multiplier=1.0,
                            cifar_stem=False, global_bn=False), 224),
}

# (input shape without batch, filter shape, strides, padding) of one conv;
# padding is "SAME", "VALID" or explicit, (top, bottom, left, right).
Shape = collections.namedtuple("Shape", "hwc kernel stride padding")


def conv_padding(padding):
  """`padding` as tf.nn.conv2d takes it."""
  if isinstance(padding, str):
    return padding
  top, bottom, left, right = padding
  return [[0, 0], [top, bottom], [left, right], [0, 0]]


def _raw_padding(padding) -> dict:
  """`padding` as the Conv2DBackprop* ops take it."""
  if isinstance(padding, str):
    return {"padding": padding}
  return {"padding": "EXPLICIT",
          "explicit_paddings": [0, 0, *padding, 0, 0]}


def conv_shapes(config: ModelConfig, image_size: int) -> collections.Counter:
  """{Shape: count} of the Conv2D ops of the model's training forward pass."""
  model = build_float32(config, image_size)
  spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32)
  graph = tf.function(lambda x: model(x, training=True)).get_concrete_function(
      spec).graph
  found = collections.Counter()
  for op in graph.get_operations():
    if op.type != "Conv2D":
      continue
    x, w = op.inputs[0].shape, op.inputs[1].shape
    padding = op.get_attr("padding").decode()
    if padding == "EXPLICIT":
      padding = tuple(op.get_attr("explicit_paddings")[2:6])
    found[Shape(tuple(x[1:]), tuple(w), op.get_attr("strides")[1],
                padding)] += 1
  return found


def _median_ms(fn, repeats: int) -> float:
  fn()                                          # trace and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def im2col_filter_grad(x, dy, kernel_shape, stride: int, padding):
  """dL/dW of conv2d(x, W) as one matrix product of the patches of x."""
  k, _, c_in, c_out = kernel_shape
  if not isinstance(padding, str):
    x, padding = _pad(x, k, stride, padding), "VALID"
  patches = tf.image.extract_patches(
      x, sizes=[1, k, k, 1], strides=[1, stride, stride, 1],
      rates=[1, 1, 1, 1], padding=padding)            # [N, Ho, Wo, k*k*Cin]
  grad = tf.matmul(tf.reshape(patches, [-1, k * k * c_in]),
                   tf.reshape(dy, [-1, c_out]), transpose_a=True)
  return tf.reshape(grad, kernel_shape)


def _pad(x, k: int, stride: int, padding):
  """x padded as the convolution pads it, so the rest is VALID."""
  if padding == "VALID":
    return x
  if not isinstance(padding, str):
    return tf.pad(x, conv_padding(padding))
  size = int(x.shape[1])
  out = -(-size // stride)
  total = max((out - 1) * stride + k - size, 0)
  before = total // 2
  return tf.pad(x, [[0, 0], [before, total - before],
                    [before, total - before], [0, 0]])


def taps_filter_grad(x, dy, kernel_shape, stride: int, padding):
  """dL/dW as k*k matrix products, one per kernel tap."""
  k, _, c_in, c_out = kernel_shape
  x = _pad(x, k, stride, padding)
  rows, cols = int(dy.shape[1]), int(dy.shape[2])
  dy = tf.reshape(dy, [-1, c_out])
  grads = []
  for i in range(k):
    for j in range(k):
      shifted = x[:, i:i + stride * (rows - 1) + 1:stride,
                  j:j + stride * (cols - 1) + 1:stride, :]
      grads.append(tf.matmul(tf.reshape(shifted, [-1, c_in]), dy,
                             transpose_a=True))
  return tf.reshape(tf.stack(grads), kernel_shape)


def swapped_filter_grad(x, dy, kernel_shape, stride: int, padding):
  """dL/dW as one forward convolution, batch and channels swapped."""
  if stride != 1:
    raise ValueError("swapped_filter_grad: stride 1 only")
  x = tf.transpose(_pad(x, kernel_shape[0], 1, padding), [3, 1, 2, 0])
  grad = tf.nn.conv2d(x, tf.transpose(dy, [1, 2, 0, 3]), 1, "VALID")
  return tf.transpose(grad, [1, 2, 0, 3])          # [C_in,k,k,C_out] -> HWIO


def _rel_err(got, want) -> float:
  got = got.numpy().astype(np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def measure(shape: Shape, batch: int, dtype, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  x = tf.constant(rng.standard_normal((batch,) + shape.hwc), dtype)
  w = tf.constant(rng.standard_normal(shape.kernel) * 0.05, dtype)
  strides = [1, shape.stride, shape.stride, 1]
  padding = conv_padding(shape.padding)
  y = tf.nn.conv2d(x, w, strides, padding)
  dy = tf.constant(rng.standard_normal(y.shape), dtype)
  x_shape = tf.constant(x.shape, tf.int32)
  w_shape = tf.constant(w.shape, tf.int32)
  forward = tf.function(lambda: tf.nn.conv2d(x, w, strides, padding))
  if isinstance(shape.padding, str):
    input_grad = tf.function(lambda: tf.raw_ops.Conv2DBackpropInput(
        input_sizes=x_shape, filter=w, out_backprop=dy, strides=strides,
        **_raw_padding(shape.padding)))
  else:
    # As the model runs it (simclr_tf.models.strided_conv): the input
    # gradient of the padded copy, sliced; oneDNN's explicit-padding input
    # gradient is several times slower.
    input_grad = tf.function(lambda: strided_conv.padded_input_grad(
        dy, w, x_shape, shape.stride, shape.padding))
  filter_grad = tf.function(lambda: tf.raw_ops.Conv2DBackpropFilter(
      input=x, filter_sizes=w_shape, out_backprop=dy, strides=strides,
      **_raw_padding(shape.padding)))
  others = {"im2col": im2col_filter_grad, "taps": taps_filter_grad}
  if shape.stride == 1:
    others["swapped"] = swapped_filter_grad
  want = filter_grad().numpy().astype(np.float64)
  row = {
      "input": list(shape.hwc), "kernel": list(shape.kernel),
      "stride": shape.stride, "padding": shape.padding,
      "forward_ms": _median_ms(forward, repeats),
      "input_grad_ms": _median_ms(input_grad, repeats),
      "weight_grad_ms": _median_ms(filter_grad, repeats),
  }
  if not isinstance(shape.padding, str):
    row["input_grad_max_rel_err"] = _rel_err(
        input_grad(), tf.raw_ops.Conv2DBackpropInput(
            input_sizes=x_shape, filter=w, out_backprop=dy, strides=strides,
            **_raw_padding(shape.padding)).numpy().astype(np.float64))
  for name, grad_fn in others.items():
    fn = tf.function(lambda grad_fn=grad_fn: grad_fn(
        x, dy, shape.kernel, shape.stride, shape.padding))
    row[f"{name}_max_rel_err"] = _rel_err(fn(), want)
    row[f"{name}_ms"] = _median_ms(fn, repeats)
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--recipe", default="r18-cifar", choices=sorted(RECIPES))
  p.add_argument("--batch", type=int, default=512)
  p.add_argument("--dtype", default="float32",
                 choices=("float32", "bfloat16"))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--json", default="")
  a = p.parse_args(argv)
  config, size = RECIPES[a.recipe]
  shapes = conv_shapes(config, size)
  dtype = tf.as_dtype(a.dtype)
  rows = []
  print(f"{'input':>14} {'kernel':>16} s  n {'fwd ms':>8} {'dx ms':>8} "
        f"{'dw ms':>8} {'dw/fwd':>6} {'im2col':>8} {'taps':>8} "
        f"{'swapped':>8} {'max err':>8}")
  for shape, count in shapes.items():
    r = dict(measure(shape, a.batch, dtype, a.repeats), count=count)
    rows.append(r)
    err = max(v for k, v in r.items() if k.endswith("_max_rel_err"))
    print(f"{str(shape.hwc):>14} {str(shape.kernel):>16} {shape.stride} "
          f"{count:2d} {r['forward_ms']:8.1f} {r['input_grad_ms']:8.1f} "
          f"{r['weight_grad_ms']:8.1f} "
          f"{r['weight_grad_ms'] / r['forward_ms']:6.2f} "
          f"{r['im2col_ms']:8.1f} {r['taps_ms']:8.1f} "
          f"{r.get('swapped_ms', float('nan')):8.1f} {err:8.1e}",
          flush=True)
  totals = {k: sum(r[k] * r["count"] for r in rows)
            for k in ("forward_ms", "input_grad_ms", "weight_grad_ms",
                      "im2col_ms", "taps_ms")}
  # The fastest of TensorFlow's kernel and the alternatives, shape by shape.
  totals["best_weight_grad_ms"] = sum(
      min(v for k, v in r.items() if k in (
          "weight_grad_ms", "im2col_ms", "taps_ms", "swapped_ms")) *
      r["count"] for r in rows)
  print("per step (weighted by count): " + ", ".join(
      f"{k} {v / 1e3:.2f} s" for k, v in totals.items()))
  if a.json:
    with open(a.json, "w", encoding="utf-8") as f:
      json.dump({"date": time.strftime("%Y-%m-%d"),
                 "machine": throughput.machine_info(),
                 "command": " ".join(sys.argv), "recipe": a.recipe,
                 "batch": a.batch, "dtype": a.dtype,
                 "onednn": simclr_tf.ONEDNN.describe(),
                 "shapes": rows, "totals_ms": totals}, f, indent=2)


if __name__ == "__main__":
  main()
