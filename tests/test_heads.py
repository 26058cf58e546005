"""Tests of the projection and supervised heads (simclr_tf/models/heads.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from layer_harness import run_layer_test
from simclr_tf.models.heads import (ProjectionHead, ProjectionLayer,
                                    SupervisedHead)

IN_DIM = 24


def _built(**kwargs) -> ProjectionHead:
  head = ProjectionHead(**kwargs)
  head.build((None, IN_DIM))
  return head


def _features(batch=8):
  return tf.random.normal([batch, IN_DIM])


@pytest.fixture
def mixed_bfloat16():
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  yield
  keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("kwargs,widths", [
    (dict(), [IN_DIM, IN_DIM, IN_DIM, 128]),
    (dict(num_layers=2, out_dim=16), [IN_DIM, IN_DIM, 16]),
    (dict(num_layers_kept=1), [IN_DIM, IN_DIM]),
    (dict(num_layers_kept=2), [IN_DIM, IN_DIM, IN_DIM]),
    (dict(num_layers_kept=0), [IN_DIM]),
    (dict(num_layers_kept=7), [IN_DIM, IN_DIM, IN_DIM, 128]),
    (dict(mode="linear", out_dim=32), [IN_DIM, 32]),
    (dict(mode="linear", num_layers_kept=0), [IN_DIM]),
    (dict(mode="none"), [IN_DIM]),
])
def test_output_lists(kwargs, widths):
  head = ProjectionHead(**kwargs)
  x = _features()
  outputs = head(x, training=True)
  assert isinstance(outputs, list)
  assert [int(o.shape[-1]) for o in outputs] == widths
  assert outputs[0] is x or np.array_equal(outputs[0].numpy(), x.numpy())
  assert head.num_outputs == len(widths) - 1
  assert [tuple(s) for s in head.compute_output_shape((8, IN_DIM))] == [
      (8, w) for w in widths]


def test_nonlinear_layers():
  head = _built(num_layers=3, out_dim=16)
  first, middle, last = head.proj_layers
  for layer in (first, middle):
    assert tuple(layer.dense.kernel.shape) == (IN_DIM, IN_DIM)
    assert layer.dense.bias is None
    assert layer.bn.beta is not None and layer.relu
  assert tuple(last.dense.kernel.shape) == (IN_DIM, 16)
  assert last.dense.bias is None
  assert last.bn.beta is None and not last.bn.center and not last.relu
  # Middle outputs went through a ReLU, the last did not.
  outputs = head(_features(), training=True)
  assert np.all(outputs[1].numpy() >= 0) and np.all(outputs[2].numpy() >= 0)
  assert np.any(outputs[3].numpy() < 0)


def test_linear_head_has_no_beta():
  head = _built(mode="linear", out_dim=8)
  (layer,) = head.proj_layers
  assert tuple(layer.dense.kernel.shape) == (IN_DIM, 8)
  assert layer.bn.beta is None and not layer.relu


def test_none_head_has_no_weights():
  head = _built(mode="none")
  assert not head.weights


def test_variable_paths():
  paths = [v.path for v in _built().weights]
  assert paths == [
      "proj_head/layer_1/dense/kernel",
      "proj_head/layer_1/bn/gamma",
      "proj_head/layer_1/bn/beta",
      "proj_head/layer_1/bn/moving_mean",
      "proj_head/layer_1/bn/moving_variance",
      "proj_head/layer_2/dense/kernel",
      "proj_head/layer_2/bn/gamma",
      "proj_head/layer_2/bn/beta",
      "proj_head/layer_2/bn/moving_mean",
      "proj_head/layer_2/bn/moving_variance",
      "proj_head/layer_3/dense/kernel",
      "proj_head/layer_3/bn/gamma",
      "proj_head/layer_3/bn/moving_mean",
      "proj_head/layer_3/bn/moving_variance",
  ]


@pytest.mark.parametrize("kept", [0, 1, 2, 3])
def test_kept_layers_have_the_full_heads_paths(kept):
  full = _built()
  for _ in range(2):  # Bump Keras' auto-naming counters.
    keras.layers.Dense(3).build((None, 3))
  cut = _built(num_layers_kept=kept)
  full_paths = [(v.path, tuple(v.shape)) for v in full.weights]
  cut_paths = [(v.path, tuple(v.shape)) for v in cut.weights]
  expected = [p for p in full_paths
              if int(p[0].split("/")[1].split("_")[1]) <= kept]
  assert cut_paths == expected


def test_projection_head_config_round_trip():
  head = ProjectionHead(mode="nonlinear", num_layers=2, out_dim=64,
                        num_layers_kept=1, batch_norm_decay=0.99,
                        global_bn=False, name="ph")
  config = head.get_config()
  clone = ProjectionHead.from_config(config)
  assert clone.get_config() == config
  head.build((None, IN_DIM))
  clone.build((None, IN_DIM))
  assert ([(v.path, tuple(v.shape)) for v in clone.weights] ==
          [(v.path, tuple(v.shape)) for v in head.weights])
  assert clone.proj_layers[0].bn.momentum == 0.99
  assert clone.proj_layers[0].bn.synchronized is False


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="mlp"), "Received: mode='mlp'"),
    (dict(num_layers=0), "Received: num_layers=0"),
    (dict(out_dim=0), "Received: out_dim=0"),
    (dict(num_layers_kept=-1), "Received: num_layers_kept=-1"),
])
def test_projection_head_invalid_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ProjectionHead(**kwargs)


def test_supervised_head_starts_at_zero():
  head = SupervisedHead(10)
  logits = head(_features(), training=True)
  assert tuple(logits.shape) == (8, 10)
  assert np.all(logits.numpy() == 0.0)
  assert [v.path for v in head.weights] == ["head_supervised/dense/kernel",
                                            "head_supervised/dense/bias"]
  assert all(np.all(v.numpy() == 0.0) for v in head.weights)


def test_supervised_head_is_float32_under_mixed_precision(mixed_bfloat16):
  del mixed_bfloat16
  head = SupervisedHead(5)
  logits = head(tf.cast(_features(), tf.bfloat16))
  assert logits.dtype == tf.float32
  assert head.dense.kernel.dtype == "float32"
  projection = ProjectionHead()
  outputs = projection(tf.cast(_features(), tf.bfloat16), training=True)
  assert outputs[-1].dtype == tf.bfloat16
  assert all(v.dtype == "float32" for v in projection.weights)


def test_supervised_head_config_round_trip():
  head = SupervisedHead(7, name="head_supervised")
  config = head.get_config()
  clone = SupervisedHead.from_config(config)
  assert clone.get_config() == config
  assert clone.num_classes == 7 and clone.dtype_policy.name == "float32"


def test_supervised_head_invalid_arguments():
  with pytest.raises(ValueError, match="Received: num_classes=0"):
    SupervisedHead(0)


# Saving and reloading (tests/layer_harness.py), on [2, 6] features.
FEATURES = (2, 6)


@pytest.mark.parametrize("kwargs,out_shape", [
    (dict(), (2, 6)),                                  # a middle layer
    (dict(units=4, center=False, relu=False), (2, 4)),  # the last layer
    (dict(units=3, batch_norm_decay=0.99, batch_norm_epsilon=1e-3,
          global_bn=False), (2, 3)),
])
def test_projection_layer_saves_and_reloads(kwargs, out_shape):
  result = run_layer_test(ProjectionLayer, kwargs, FEATURES,
                          expected_output_shape=out_shape)
  layer = result.reloaded.get_layer(result.layer.name)
  assert (layer.bn.beta is not None) == kwargs.get("center", True)
  assert layer.bn.momentum == kwargs.get("batch_norm_decay", 0.9)


@pytest.mark.parametrize("kwargs,widths", [
    (dict(out_dim=4), [6, 6, 6, 4]),
    (dict(num_layers=2, out_dim=4, num_layers_kept=1), [6, 6]),
    (dict(out_dim=4, num_layers_kept=0), [6]),
    (dict(mode="linear", out_dim=3, global_bn=False), [6, 3]),
    (dict(mode="none"), [6]),
])
def test_projection_head_saves_and_reloads(kwargs, widths):
  result = run_layer_test(ProjectionHead, kwargs, FEATURES,
                          expected_output_shape=[(2, w) for w in widths])
  head = result.reloaded.get_layer(result.layer.name)
  assert head.num_outputs == len(widths) - 1
  assert [v.path for v in head.weights] == [
      v.path for v in result.layer.weights]


def test_supervised_head_saves_and_reloads():
  # Always float32, also under mixed_bfloat16.
  result = run_layer_test(SupervisedHead, dict(num_classes=3), FEATURES,
                          expected_output_shape=(2, 3),
                          mixed_dtypes="float32")
  assert np.any(result.outputs != 0.0)   # the random weights came back
  head = result.reloaded.get_layer("head_supervised")
  assert head.dtype_policy.name == "float32"
