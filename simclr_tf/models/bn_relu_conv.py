"""Batch norm, ReLU and a stride-1 convolution that keep no ReLU output.

Inside a residual block a batch norm's output goes through a ReLU into the
next convolution: `conv(relu(bn(x)))`. Under autodiff the backward pass
keeps the ReLU's output (for `ReluGrad` and the convolution's weight
gradient) beside the batch norm's input `x`, which the batch norm's own
gradient keeps anyway. At the CIFAR ResNet-18's pretraining batch these
ReLU outputs are 0.47 GiB (docs/performance.md, "What the backward pass
keeps").

`bn_relu_conv` computes the same forward ops (`FusedBatchNormV3` with the
batch statistics, `Relu`, `Conv2D`) and keeps only `x`, the batch norm's
reserve spaces and the kernel: its gradient recomputes the normalisation
and the ReLU from `x` once the output's gradient exists (the same ops on
the same input, so the same values), then runs the ops autodiff would
(`Conv2DBackpropInput`, `Conv2DBackpropFilter`, `ReluGrad`,
`FusedBatchNormGradV3`). Outputs and gradients are bitwise those of the
three ops under autodiff (tests/test_bn_relu_conv.py); the price is one
more batch norm and ReLU in the backward pass, which on a 2-core CPU cost
no measurable speed (docs/performance.md, "The ReLU outputs recomputed").
"""

from __future__ import annotations

import tensorflow as tf


def bn_relu_conv(x, scale, offset, kernel, epsilon: float):
  """`conv(relu(batch_norm(x)))` in training mode, recomputing the ReLU.

  Args:
    x: [N, H, W, C_in] float32 or bfloat16 input of the batch norm.
    scale: [C_in] float32 gamma.
    offset: [C_in] float32 beta.
    kernel: [k, k, C_in, C_out] in x's dtype; stride 1, SAME padding.
    epsilon: the batch norm's epsilon.
  Returns:
    (out [N, H, W, C_out] in x's dtype, [C_in] float32 batch mean,
    [C_in] float32 unbiased batch variance), as `FusedBatchNormV3` gives
    them; the mean and variance carry no gradient.
  """
  empty = tf.zeros([0], tf.float32)
  strides = [1, 1, 1, 1]

  def normalize(x, scale, offset):
    return tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=empty, variance=empty,
        epsilon=epsilon, exponential_avg_factor=1.0, data_format="NHWC",
        is_training=True)

  @tf.custom_gradient
  def forward(x, scale, offset, kernel):
    y, mean, variance, reserve_1, reserve_2, reserve_3 = normalize(
        x, scale, offset)
    out = tf.raw_ops.Conv2D(input=tf.nn.relu(y), filter=kernel,
                            strides=strides, padding="SAME")

    def grad(d_out, unused_d_mean, unused_d_variance):
      # The same ops on the same input: the ReLU output the forward pass had.
      # Their input waits for the output's gradient: without that, the
      # executor would run them as soon as `x` exists, in the forward pass,
      # and keep their result until the backward pass after all (and
      # Grappler would merge them with the forward pass's ops). The wait is
      # on an identity of `x`, not on the batch norm itself, so that the
      # batch norm and ReLU are fused as in the forward pass.
      with tf.control_dependencies([d_out]):
        x_when_needed = tf.identity(x)
      activation = tf.nn.relu(normalize(x_when_needed, scale, offset)[0])
      d_activation = tf.raw_ops.Conv2DBackpropInput(
          input_sizes=tf.shape(activation), filter=kernel,
          out_backprop=d_out, strides=strides, padding="SAME")
      d_kernel = tf.raw_ops.Conv2DBackpropFilter(
          input=activation, filter_sizes=tf.shape(kernel),
          out_backprop=d_out, strides=strides, padding="SAME")
      d_y = tf.raw_ops.ReluGrad(gradients=d_activation, features=activation)
      d_x, d_scale, d_offset = tf.raw_ops.FusedBatchNormGradV3(
          y_backprop=d_y, x=x, scale=scale, reserve_space_1=reserve_1,
          reserve_space_2=reserve_2, reserve_space_3=reserve_3,
          epsilon=epsilon, data_format="NHWC", is_training=True)[:3]
      return d_x, d_scale, d_offset, d_kernel

    return (out, tf.stop_gradient(mean), tf.stop_gradient(variance)), grad

  return forward(x, scale, offset, kernel)
