"""Tests of simclr_tf.optim.lars: single steps against numpy, by hand."""

import numpy as np
import pytest

from conftest import run_fresh

LR = 0.5
MOMENTUM = 0.9
WD = 0.1
ETA = 0.01


def _np_lars_step(w, g, v, lr=LR, momentum=MOMENTUM, weight_decay=WD,
                  eta=ETA, decay=True, adapt=True):
  """The official SimCLR LARS step, written out in numpy (float64)."""
  w, g, v = (np.asarray(a, np.float64) for a in (w, g, v))
  if decay:
    g = g + weight_decay * w
  ratio = 1.0
  if adapt:
    w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
    if w_norm > 0 and g_norm > 0:
      ratio = eta * w_norm / g_norm
  v = momentum * v + lr * ratio * g
  return w - v, v


def _make(tf, keras, shape, seed):
  rng = np.random.default_rng(seed)
  w0 = rng.normal(size=shape).astype(np.float32)
  g0 = rng.normal(size=shape).astype(np.float32)
  return keras.Variable(w0, name=f"w{seed}"), w0, g0


def _lars(**kwargs):
  from simclr_tf.optim import LARS
  args = dict(learning_rate=LR, momentum=MOMENTUM, weight_decay=WD,
              trust_coefficient=ETA)
  args.update(kwargs)
  return LARS(**args)


def _momentum_of(opt, var):
  return opt._momentums[opt._get_variable_index(var)].numpy()


@pytest.mark.parametrize("decay,adapt", [(True, True), (False, False),
                                         (True, False), (False, True)])
def test_one_step_matches_numpy(decay, adapt):
  import keras
  import tensorflow as tf
  var, w0, g0 = _make(tf, keras, (4, 3), seed=1)
  opt = _lars()
  if not decay:
    opt.exclude_from_weight_decay(var_list=[var])
  if not adapt:
    opt.exclude_from_layer_adaptation(var_list=[var])
  opt.apply([tf.constant(g0)], [var])
  want_w, want_v = _np_lars_step(w0, g0, np.zeros_like(w0), decay=decay,
                                 adapt=adapt)
  np.testing.assert_allclose(var.numpy(), want_w, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(_momentum_of(opt, var), want_v, rtol=1e-6,
                             atol=1e-7)
  if not decay and not adapt:
    # Plain momentum SGD from a zero buffer: w - lr * g.
    np.testing.assert_allclose(var.numpy(), w0 - LR * g0, rtol=1e-6)


def test_zero_weights_give_trust_ratio_one():
  import keras
  import tensorflow as tf
  var = keras.Variable(np.zeros((3, 2), np.float32))
  g = np.arange(6, dtype=np.float32).reshape(3, 2) - 2.0
  opt = _lars()
  opt.apply([tf.constant(g)], [var])
  # ||w|| = 0: decay adds nothing and the ratio is 1, so w = -lr * g.
  np.testing.assert_allclose(var.numpy(), -LR * g, rtol=1e-6)


def test_zero_gradient_gives_trust_ratio_one_and_no_nan():
  import keras
  import tensorflow as tf
  var = keras.Variable(np.ones((2, 2), np.float32))
  opt = _lars(weight_decay=0.0)
  g1 = np.full((2, 2), 0.5, np.float32)
  opt.apply([tf.constant(g1)], [var])
  w1, v1 = _np_lars_step(np.ones((2, 2)), g1, np.zeros((2, 2)),
                         weight_decay=0.0)
  opt.apply([tf.zeros((2, 2))], [var])
  # ||g|| = 0: only the momentum term moves w, and nothing is NaN.
  w2, v2 = _np_lars_step(w1, np.zeros((2, 2)), v1, weight_decay=0.0)
  assert np.all(np.isfinite(var.numpy()))
  np.testing.assert_allclose(var.numpy(), w2, rtol=1e-6)
  np.testing.assert_allclose(w2, w1 - MOMENTUM * v1)


def test_two_steps_accumulate_momentum():
  import keras
  import tensorflow as tf
  var, w0, g0 = _make(tf, keras, (5,), seed=2)
  g1 = np.random.default_rng(3).normal(size=(5,)).astype(np.float32)
  opt = _lars()
  opt.apply([tf.constant(g0)], [var])
  opt.apply([tf.constant(g1)], [var])
  w, v = _np_lars_step(w0, g0, np.zeros(5))
  w, v = _np_lars_step(w, g1, v)
  np.testing.assert_allclose(var.numpy(), w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_momentum_of(opt, var), v, rtol=1e-5, atol=1e-7)
  assert int(opt.iterations.numpy()) == 2


def test_exclusions_on_a_real_model_by_variable_identity():
  import keras
  import tensorflow as tf
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                            keras.layers.BatchNormalization()])
  dense, bn = model.layers
  # Make every variable non-zero so each hypothesis gives its own update.
  bn.gamma.assign([1.5, 0.7, 1.2])
  bn.beta.assign([0.3, -0.2, 0.1])
  dense.bias.assign([0.05, -0.4, 0.2])
  # What the model code will do: structure decides, not names. Here each
  # variable gets a different combination.
  expected = {  # variable -> (decayed, adapted)
      id(dense.kernel): (True, True),
      id(dense.bias): (False, False),
      id(bn.gamma): (True, False),
      id(bn.beta): (False, True),
  }
  opt = _lars()
  opt.exclude_from_weight_decay(var_list=[dense.bias, bn.beta])
  opt.exclude_from_layer_adaptation(var_list=[dense.bias, bn.gamma])

  x = tf.constant(np.random.default_rng(0).normal(size=(8, 4)), tf.float32)
  with tf.GradientTape() as tape:
    y = model(x, training=True)
    loss = tf.reduce_mean(tf.square(y - 0.3) * tf.range(1.0, 4.0))
  variables = model.trainable_variables
  assert len(variables) == 4
  before = [v.numpy() for v in variables]
  grads = tape.gradient(loss, variables)
  opt.apply(grads, variables)

  for var, w0, g in zip(variables, before, grads):
    hypotheses = {
        (d, a): _np_lars_step(w0, g.numpy(), np.zeros_like(w0), decay=d,
                              adapt=a)[0]
        for d in (True, False) for a in (True, False)}
    matches = [k for k, w in hypotheses.items()
               if np.allclose(var.numpy(), w, rtol=1e-5, atol=1e-7)]
    assert matches == [expected[id(var)]], (var.path, matches)
  # Non-trainable BN statistics are left to the layer, not the optimizer.
  assert len(opt.variables) == 2 + len(variables)  # iterations, lr, buffers


def test_exclusions_must_precede_build():
  import keras
  var = keras.Variable(np.ones(2, np.float32))
  opt = _lars()
  opt.build([var])
  with pytest.raises(ValueError, match="before the optimizer is built"):
    opt.exclude_from_layer_adaptation(var_list=[var])
  with pytest.raises(ValueError, match="before the optimizer is built"):
    opt.exclude_from_weight_decay(var_list=[var])


def test_no_decoupled_keras_weight_decay():
  import keras
  import tensorflow as tf
  var = keras.Variable(np.full((2,), 2.0, np.float32))
  opt = _lars(weight_decay=0.5)
  opt.exclude_from_weight_decay(var_list=[var])
  opt.exclude_from_layer_adaptation(var_list=[var])
  opt.apply([tf.zeros(2)], [var])
  # Excluded and zero gradient: the variable must not move at all.
  np.testing.assert_array_equal(var.numpy(), [2.0, 2.0])


def _apply_fn(opt, var):
  # Captured by closure: a default argument would turn `var` into a tensor
  # input of the tf.function.
  def apply(g):
    opt.apply([g], [var])
  return apply


def test_tf_function_and_jit_compile_match_eager():
  import keras
  import tensorflow as tf
  results = []
  for mode in ("eager", "function", "jit"):
    var, w0, g0 = _make(tf, keras, (3, 3), seed=4)
    opt = _lars()
    opt.build([var])
    step = _apply_fn(opt, var)
    if mode == "function":
      step = tf.function(step)
    elif mode == "jit":
      step = tf.function(step, jit_compile=True)
    for _ in range(2):
      step(tf.constant(g0))
    results.append(var.numpy())
  w, v = _np_lars_step(w0, g0, np.zeros_like(w0))
  w, _ = _np_lars_step(w, g0, v)
  for r in results:
    np.testing.assert_allclose(r, w, rtol=1e-5, atol=1e-6)


def test_with_schedule_and_loss_scale_optimizer_float16():
  import keras
  import tensorflow as tf
  from simclr_tf.optim import WarmUpAndCosineDecay
  schedule = WarmUpAndCosineDecay(1.0, 256, total_steps=10, warmup_steps=2)
  layer = keras.layers.Dense(2, dtype="mixed_float16")
  layer.build((None, 3))
  assert layer.kernel.dtype == "float32"
  inner = _lars(learning_rate=schedule)
  opt = keras.optimizers.LossScaleOptimizer(inner)
  opt.build([layer.kernel])  # creates `dynamic_scale`
  x = tf.constant(np.random.default_rng(5).normal(size=(4, 3)), tf.float16)
  w_before = layer.kernel.numpy()
  v = np.zeros_like(w_before)
  skipped = 0
  for _ in range(30):  # until 3 steps were applied: lr = 0, 0.5, 1
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(tf.cast(layer(x), tf.float32) ** 2)
      scaled = opt.scale_loss(loss)
    scale = float(opt.dynamic_scale.numpy())
    grads = tape.gradient(scaled, [layer.kernel])
    assert grads[0].dtype == tf.float32
    lr = float(schedule(inner.iterations))
    opt.apply(grads, [layer.kernel])
    g = grads[0].numpy() / scale
    if np.all(np.isfinite(g)):
      w_before, v = _np_lars_step(w_before, g, v, lr=lr)
    else:
      skipped += 1  # float16 overflow: the wrapper skips LARS, halves scale
    np.testing.assert_allclose(layer.kernel.numpy(), w_before, rtol=1e-4,
                               atol=1e-6)
    if int(inner.iterations.numpy()) == 3:
      break
  assert skipped > 0  # the initial scale 2^15 overflows float16 here
  assert int(inner.iterations.numpy()) == 3


def test_config_round_trip():
  import keras
  from simclr_tf.optim import LARS, WarmUpAndCosineDecay
  opt = _lars(clipnorm=2.0)
  config = opt.get_config()
  assert config["weight_decay"] == WD and config["momentum"] == MOMENTUM
  assert config["trust_coefficient"] == ETA and config["clipnorm"] == 2.0
  clone = LARS.from_config(config)
  assert clone.get_config() == config

  schedule = WarmUpAndCosineDecay(0.3, 512, 100, 10, scaling="sqrt")
  opt = _lars(learning_rate=schedule)
  clone = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
  assert isinstance(clone, LARS)
  assert clone.get_config() == opt.get_config()
  assert isinstance(clone._learning_rate, WarmUpAndCosineDecay)


@pytest.mark.slow  # a fresh TF process with 2 logical CPUs (~5-10 s)
def test_mirrored_two_cpu_replicas_match_single_device():
  result = run_fresh(__file__, "_mirrored_worker", timeout=120)
  assert result["num_replicas"] == 2
  assert result["max_abs_diff"] < 1e-6, result
  assert result["excluded_is_plain_sgd_diff"] < 1e-6, result


def _mirrored_worker():
  """In `run_fresh`'s process: 2 logical CPUs exist before TF starts."""
  import tensorflow as tf
  import keras
  from simclr_tf.optim import LARS

  rng = np.random.default_rng(7)
  w0 = rng.normal(size=(4, 3)).astype(np.float32)
  b0 = rng.normal(size=(3,)).astype(np.float32)
  grads = [[rng.normal(size=(4, 3)).astype(np.float32),
            rng.normal(size=(3,)).astype(np.float32)] for _ in range(2)]

  def make_opt(bias):
    opt = LARS(learning_rate=LR, momentum=MOMENTUM, weight_decay=WD,
               trust_coefficient=ETA)
    opt.exclude_from_weight_decay(var_list=[bias])
    opt.exclude_from_layer_adaptation(var_list=[bias])
    return opt

  # Single device, full gradients.
  w_single, b_single = keras.Variable(w0), keras.Variable(b0)
  opt_single = make_opt(b_single)
  for g_w, g_b in grads:
    opt_single.apply([tf.constant(g_w), tf.constant(g_b)],
                     [w_single, b_single])

  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  with strategy.scope():
    w_dist, b_dist = keras.Variable(w0), keras.Variable(b0)
    opt_dist = make_opt(b_dist)
    # Build (create the momentum buffers) in the scope, outside tf.function:
    # mirrored variables created lazily inside the traced step fail.
    opt_dist.build([w_dist, b_dist])

  @tf.function
  def train_step(g_w, g_b):
    def replica_fn(g_w, g_b):
      opt_dist.apply([g_w, g_b], [w_dist, b_dist])
    strategy.run(replica_fn, args=(g_w, g_b))

  for g_w, g_b in grads:
    # Each replica holds half of the gradient; Keras sums them.
    halves = [strategy.experimental_distribute_values_from_function(
        lambda ctx, g=g: tf.constant(g / 2.0)) for g in (g_w, g_b)]
    train_step(*halves)

  diffs = []
  for single, dist in ((w_single, w_dist), (b_single, b_dist)):
    for component in strategy.experimental_local_results(dist.value):
      diffs.append(np.max(np.abs(component.numpy() - single.numpy())))
  # The excluded bias follows plain momentum SGD.
  v = LR * grads[0][1]
  b_want = b0 - v
  v = MOMENTUM * v + LR * grads[1][1]
  b_want = b_want - v
  return {
      "num_replicas": strategy.num_replicas_in_sync,
      "max_abs_diff": float(max(diffs)),
      "excluded_is_plain_sgd_diff": float(
          np.max(np.abs(b_dist.numpy() - b_want))),
  }

