"""Tests of simclr_tf.optim.schedules.WarmUpAndCosineDecay."""

import math

import numpy as np
import pytest


def _schedule(**kwargs):
  from simclr_tf.optim import WarmUpAndCosineDecay
  args = dict(base_learning_rate=0.3, batch_size=512, total_steps=110,
              warmup_steps=10, scaling="linear")
  args.update(kwargs)
  return WarmUpAndCosineDecay(**args)


def _lr(schedule, step):
  return float(schedule(step).numpy())


def test_linear_scaling_warmup_and_cosine_values():
  s = _schedule()
  peak = 0.3 * 512 / 256  # 0.6
  assert s.scaled_learning_rate == pytest.approx(peak)
  assert _lr(s, 0) == 0.0
  assert _lr(s, 5) == pytest.approx(0.5 * peak, rel=1e-6)  # mid warm-up
  assert _lr(s, 9) == pytest.approx(0.9 * peak, rel=1e-6)
  assert _lr(s, 10) == pytest.approx(peak, rel=1e-6)  # end of warm-up
  assert _lr(s, 60) == pytest.approx(0.5 * peak, rel=1e-6)  # cosine midpoint
  t = 25 / 100
  assert _lr(s, 35) == pytest.approx(0.5 * peak * (1 + math.cos(math.pi * t)),
                                     rel=1e-6)
  assert _lr(s, 110) == pytest.approx(0.0, abs=1e-7)  # end
  assert _lr(s, 500) == pytest.approx(0.0, abs=1e-7)  # constant after


def test_sqrt_scaling():
  s = _schedule(scaling="sqrt", base_learning_rate=0.075, batch_size=4096)
  peak = 0.075 * math.sqrt(4096)  # 4.8
  assert s.scaled_learning_rate == pytest.approx(peak)
  assert _lr(s, 10) == pytest.approx(peak, rel=1e-6)


def test_no_warmup_starts_at_peak():
  s = _schedule(warmup_steps=0, total_steps=100)
  peak = 0.6
  assert _lr(s, 0) == pytest.approx(peak, rel=1e-6)
  assert _lr(s, 50) == pytest.approx(0.5 * peak, rel=1e-6)
  assert _lr(s, 100) == pytest.approx(0.0, abs=1e-7)


def test_warmup_only_then_zero():
  s = _schedule(warmup_steps=10, total_steps=10)
  assert _lr(s, 5) == pytest.approx(0.3, rel=1e-6)
  assert _lr(s, 10) == 0.0


def test_int64_steps_in_tf_function():
  import tensorflow as tf
  s = _schedule()
  fn = tf.function(lambda step: s(step))
  steps = [0, 5, 10, 60, 110, 200]
  got = [float(fn(tf.constant(i, tf.int64))) for i in steps]
  want = [_lr(s, i) for i in steps]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
  assert fn(tf.constant(3, tf.int64)).dtype == tf.float32


def test_drives_keras_optimizer_iterations():
  import keras
  import tensorflow as tf
  s = _schedule()
  opt = keras.optimizers.SGD(learning_rate=s)
  var = keras.Variable([1.0])
  for _ in range(5):
    opt.apply([tf.constant([1.0])], [var])
  # Steps 0..4 used lr = i / 10 * 0.6.
  assert float(var.numpy()[0]) == pytest.approx(1.0 - 0.6 * 1.0, rel=1e-5)
  assert float(opt.learning_rate) == pytest.approx(0.3, rel=1e-6)


def test_config_round_trip_and_bad_scaling():
  import keras
  from simclr_tf.optim import WarmUpAndCosineDecay
  s = _schedule(scaling="sqrt")
  clone = WarmUpAndCosineDecay.from_config(s.get_config())
  assert clone.get_config() == s.get_config()
  clone = keras.optimizers.schedules.deserialize(
      keras.optimizers.schedules.serialize(s))
  assert isinstance(clone, WarmUpAndCosineDecay)
  assert _lr(clone, 33) == _lr(s, 33)
  with pytest.raises(ValueError, match="scaling must be one of"):
    _schedule(scaling="cube")
  with pytest.raises(ValueError):
    _schedule(warmup_steps=-1)
