"""A strided convolution with the official fixed padding, without a copy.

The official SimCLR ResNets pad the input of every strided convolution
((k - 1) // 2 rows and columns before, the rest after) and convolve the
padded copy without padding. Under autodiff that copy is kept for the
backward pass beside the input itself (about 0.3 GiB at the CIFAR
ResNet-18's pretraining batch). Padding inside the convolution (explicit
padding) keeps no copy, but oneDNN's input gradient with explicit padding
is 1.5-6x slower than without (docs/performance.md, "Memory: the padded
copies"), while its forward pass and weight gradient are as fast or faster.

`conv_fixed_padding` takes the fast kernel for each of the three products:
the forward pass and the weight gradient pad inside the convolution (the
weight gradient then runs TensorFlow's own kernel, not oneDNN's, and is as
fast or faster at the recipes' shapes), and the input gradient is that of
the padded copy (no padding, on the padded shape), sliced back to the
input's shape (`padded_input_grad`). Outputs and gradients are those of
`conv(fixed_pad(x))` (the same sums; tests/test_strided_conv.py checks them
against float64), and only `x` is kept for the backward pass.
"""

from __future__ import annotations

import tensorflow as tf


def fixed_padding(kernel_size: int) -> tuple[int, int]:
  """(before, after): the official padding of H and W for a kernel size."""
  total = kernel_size - 1
  return total // 2, total - total // 2


def padded_input_grad(dy, kernel, input_shape, stride: int, padding):
  """The input gradient of a convolution with explicit `padding`, computed
  as that of a VALID convolution of the padded input, then sliced.

  Args:
    dy: [N, H_out, W_out, C_out] output gradient.
    kernel: [k, k, C_in, C_out].
    input_shape: [N, H, W, C_in] int32 shape of the convolution's input.
    stride: the convolution's stride in H and W.
    padding: (top, bottom, left, right).
  Returns:
    [N, H, W, C_in], equal to Conv2DBackpropInput with that explicit
    padding (oneDNN runs this form several times faster).
  """
  top, bottom, left, right = padding
  padded = input_shape + tf.constant([0, top + bottom, left + right, 0])
  dx = tf.raw_ops.Conv2DBackpropInput(
      input_sizes=padded, filter=kernel, out_backprop=dy,
      strides=[1, stride, stride, 1], padding="VALID")
  return dx[:, top:top + input_shape[1], left:left + input_shape[2], :]


def conv_fixed_padding(x, kernel, stride: int):
  """Convolves `x` at `stride` as the official code does after `fixed_pad`.

  Args:
    x: [N, H, W, C_in] float tensor.
    kernel: [k, k, C_in, C_out] tensor of x's dtype (square kernel).
    stride: the convolution's stride in H and W.
  Returns:
    [N, ceil(H / stride), ceil(W / stride), C_out] in x's dtype (for odd
    k; in general what a VALID convolution of the padded input gives).
  """
  kernel_size = int(kernel.shape[0])
  before, after = fixed_padding(kernel_size)
  strides = [1, stride, stride, 1]
  explicit = [0, 0, before, after, before, after, 0, 0]

  @tf.custom_gradient
  def conv(x, kernel):
    y = tf.raw_ops.Conv2D(input=x, filter=kernel, strides=strides,
                          padding="EXPLICIT", explicit_paddings=explicit)

    def grad(dy):
      dx = padded_input_grad(dy, kernel, tf.shape(x), stride,
                             (before, after, before, after))
      dkernel = tf.raw_ops.Conv2DBackpropFilter(
          input=x, filter_sizes=tf.shape(kernel), out_backprop=dy,
          strides=strides, padding="EXPLICIT", explicit_paddings=explicit)
      return dx, dkernel

    return y, grad

  return conv(x, kernel)
