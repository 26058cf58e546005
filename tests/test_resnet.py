"""Tests of the SimCLRv2 ResNet encoder (simclr_tf/models/resnet.py)."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_fresh
from simclr_tf.models import blocks
from simclr_tf.models import resnet as resnet_lib
from simclr_tf.models.resnet import ResNet

SK_RATIO = 0.0625  # SimCLRv2 section 4 / official code: 1/16.


def _built(**kwargs) -> ResNet:
  model = ResNet(**kwargs)
  model.build((None, None, None, 3))
  return model


def _num_params(weights) -> int:
  return sum(int(np.prod(v.shape)) for v in weights)


def _expected_trainable(depth: int, w: int, sk_ratio: float = 0.0,
                        cifar_stem: bool = False) -> int:
  """Trainable parameters of the official architecture, counted by hand.

  Convolutions have no bias; every batch norm has gamma and beta. Follows
  google-research/simclr tf2/resnet.py: a projection shortcut in the first
  block of every group, ResNet-D stem and shortcuts and selective-kernel
  bottlenecks when sk_ratio > 0.
  """
  block, blocks = resnet_lib.BLOCK_TYPES[depth]
  bottleneck = block == "bottleneck"

  def conv(k, cin, cout):
    return k * k * cin * cout

  def bn(c):
    return 2 * c  # gamma and beta

  width = round(64 * w)
  if cifar_stem:
    total = conv(3, 3, width) + bn(width)
  elif sk_ratio > 0:
    half = width // 2
    total = (conv(3, 3, half) + bn(half) + conv(3, half, half) + bn(half) +
             conv(3, half, width) + bn(width))
  else:
    total = conv(7, 3, width) + bn(width)
  channels = width
  for base, num in zip((64, 128, 256, 512), blocks):
    f = round(base * w)
    out = 4 * f if bottleneck else f
    for i in range(num):
      if i == 0:
        total += conv(1, channels, out) + bn(out)
      if bottleneck:
        total += conv(1, channels, f) + bn(f)
        if sk_ratio > 0:
          mid = max(int(f * sk_ratio), 32)
          total += (conv(3, f, 2 * f) + bn(2 * f) + conv(1, f, mid) +
                    bn(mid) + conv(1, mid, 2 * f))
        else:
          total += conv(3, f, f) + bn(f)
        total += conv(1, f, out) + bn(out)
      else:
        total += conv(3, channels, f) + bn(f) + conv(3, f, f) + bn(f)
      channels = out
  return total


@pytest.fixture(scope="module")
def r50():
  return _built(depth=50)


@pytest.fixture(scope="module")
def r50_sk():
  return _built(depth=50, sk_ratio=SK_RATIO)


@pytest.fixture
def mixed_bfloat16():
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  yield
  keras.mixed_precision.set_global_policy("float32")


def test_cifar_resnet18_outputs():
  model = ResNet(depth=18, cifar_stem=True)
  out = model(tf.random.uniform([2, 32, 32, 3]), training=True)
  expected = {
      "initial_conv": (2, 32, 32, 64),
      "initial_max_pool": (2, 32, 32, 64),
      "block_group1": (2, 32, 32, 64),
      "block_group2": (2, 16, 16, 128),
      "block_group3": (2, 8, 8, 256),
      "block_group4": (2, 4, 4, 512),
      "final_avg_pool": (2, 512),
  }
  assert {k: tuple(v.shape) for k, v in out.items()} == expected
  assert tuple(out) == resnet_lib.OUTPUT_NAMES
  assert model.output_dim == 512


@pytest.mark.parametrize("fixture", ["r50", "r50_sk"])
def test_imagenet_resnet50_outputs(fixture, request):
  model = request.getfixturevalue(fixture)
  out = model(tf.random.uniform([2, 64, 64, 3]), training=False)
  expected = {
      "initial_conv": (2, 32, 32, 64),
      "initial_max_pool": (2, 16, 16, 64),
      "block_group1": (2, 16, 16, 256),
      "block_group2": (2, 8, 8, 512),
      "block_group3": (2, 4, 4, 1024),
      "block_group4": (2, 2, 2, 2048),
      "final_avg_pool": (2, 2048),
  }
  assert {k: tuple(v.shape) for k, v in out.items()} == expected
  assert model.output_dim == 2048
  assert np.all(np.isfinite(out["final_avg_pool"].numpy()))


def test_odd_sizes_and_output_shape():
  model = ResNet(depth=18, width_multiplier=2, sk_ratio=SK_RATIO,
                 se_ratio=0.25)
  images = tf.random.uniform([1, 67, 45, 3])
  out = model(images, training=True)
  shapes = model.compute_output_shape((1, 67, 45, 3))
  assert {k: tuple(v.shape) for k, v in out.items()} == shapes
  assert model.output_dim == 1024


def test_unknown_spatial_dims_in_tf_function():
  model = _built(depth=18, cifar_stem=True)

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3])])
  def features(images):
    return model(images, training=False)["final_avg_pool"]

  assert features(tf.zeros([3, 16, 24, 3])).shape == (3, 512)
  assert features(tf.zeros([1, 8, 8, 3])).shape == (1, 512)


def test_resnet50_parameter_count(r50):
  # torchvision resnet50 without its 2048x1000 classifier: 23,508,032.
  model = r50
  assert _num_params(model.trainable_weights) == 23_508_032
  assert _num_params(model.non_trainable_weights) == 53_120


def test_resnet50_sk_parameter_count(r50_sk):
  # Paper Table 1: R50 (1x) + SK has 35M parameters. The official
  # architecture (ResNet-D stem and shortcuts, SK in every bottleneck,
  # attention width max(filters / 16, 32)) has 35,215,584 trainable ones.
  model = r50_sk
  count = _num_params(model.trainable_weights)
  assert count == _expected_trainable(50, 1, SK_RATIO) == 35_215_584
  assert abs(count - 35e6) / 35e6 < 0.01


def test_cifar_resnet18_parameter_count():
  # Standard CIFAR ResNet-18 (3x3 stem) has 11,168,832; the official code
  # adds a 1x1 projection (+BN) to block_group1/block_0: +4,224.
  model = _built(depth=18, cifar_stem=True)
  assert _num_params(model.trainable_weights) == 11_173_056
  assert _expected_trainable(18, 1, cifar_stem=True) == 11_173_056


@pytest.mark.parametrize("depth,width,sk_ratio",
                         [(34, 1, 0.0), (18, 2, SK_RATIO), (34, 1, SK_RATIO),
                          (18, 0.25, 0.0), (50, 0.5, SK_RATIO)])
def test_parameter_count_matches_hand_count(depth, width, sk_ratio):
  model = _built(depth=depth, width_multiplier=width, sk_ratio=sk_ratio)
  assert model.output_dim == round(
      (2048 if depth >= 50 else 512) * width)
  assert _num_params(model.trainable_weights) == _expected_trainable(
      depth, width, sk_ratio)


# SimCLRv2 paper, Table 1: parameters (millions) by depth, width and SK.
PAPER_TABLE_1 = [
    (50, 1, False, 24), (50, 1, True, 35), (50, 2, False, 94),
    (50, 2, True, 140), (101, 1, False, 43), (101, 1, True, 65),
    (101, 2, False, 170), (101, 2, True, 257), (152, 1, False, 58),
    (152, 1, True, 89), (152, 2, False, 233), (152, 2, True, 354),
    (152, 3, True, 795),
]


@pytest.mark.parametrize("depth,width,sk,millions", PAPER_TABLE_1)
def test_hand_count_matches_paper_table_1(depth, width, sk, millions):
  count = _expected_trainable(depth, width, SK_RATIO if sk else 0.0)
  assert abs(count / 1e6 - millions) < 1.0  # The paper rounds to 1M.


def test_resnet152_3x_sk_hand_count():
  # Paper Table 1: R152 (3x) + SK has 795M parameters.
  assert _expected_trainable(152, 3, SK_RATIO) == 794_704_160


@pytest.mark.slow
def test_resnet152_3x_sk_parameter_count():
  model = _built(depth=152, width_multiplier=3, sk_ratio=SK_RATIO)
  assert _num_params(model.trainable_weights) == 794_704_160
  assert model.output_dim == 6144


def test_last_batch_norm_of_each_block_starts_at_zero(r50_sk):
  for model in (_built(depth=18), r50_sk):
    for group in model.block_groups:
      for block in group.blocks:
        last = block.bn_2 if block.bottleneck else block.bn_1
        assert np.all(last.gamma.numpy() == 0.0)
        assert np.all(block.bn_0.gamma.numpy() == 1.0)
        if block.use_projection:
          assert np.all(block.shortcut_bn.gamma.numpy() == 1.0)


def test_identity_blocks_start_as_identity():
  # Zero-initialised last gamma: a block without projection returns
  # relu(input) = input (inputs are post-ReLU) until it is trained.
  for bottleneck in (True, False):
    block = blocks.ResidualBlock(
        16, bottleneck=bottleneck, sk_ratio=SK_RATIO, se_ratio=0.25,
        resnet_d=True)
    x = tf.nn.relu(tf.random.normal([2, 8, 8, block.out_filters]))
    np.testing.assert_allclose(block(x, training=True).numpy(), x.numpy())


_ALLOWED_PATH_PART = re.compile(
    r"^(resnet|stem|block_group[1-4]|block_\d+|conv_[0-2]|bn_[0-2]|sk_1|se|"
    r"shortcut_conv|shortcut_bn|conv|bn|reduce|reduce_bn|expand|kernel|bias|"
    r"gamma|beta|moving_mean|moving_variance)$")


def test_variable_paths_are_deterministic():
  first = _built(depth=18, sk_ratio=SK_RATIO, se_ratio=0.25)
  # Unnamed layers bump Keras' auto-naming counters in between.
  for _ in range(3):
    keras.layers.Dense(2).build((None, 2))
    keras.layers.BatchNormalization().build((None, 2))
    keras.layers.Conv2D(2, 1, name="conv_0").build((None, 4, 4, 1))
  second = _built(depth=18, sk_ratio=SK_RATIO, se_ratio=0.25)
  paths = [v.path for v in first.weights]
  assert paths == [v.path for v in second.weights]
  assert len(set(paths)) == len(paths)
  for path in paths:
    assert all(_ALLOWED_PATH_PART.match(p) for p in path.split("/")), path
  assert "resnet/block_group4/block_1/se/expand/bias" in paths


def test_bottleneck_sk_variable_paths(r50_sk):
  paths = [v.path for v in r50_sk.weights]
  assert len(set(paths)) == len(paths)
  for path in paths:
    assert all(_ALLOWED_PATH_PART.match(p) for p in path.split("/")), path
  assert "resnet/stem/conv_2/kernel" in paths
  assert "resnet/block_group2/block_0/sk_1/conv/kernel" in paths
  assert "resnet/block_group2/block_0/sk_1/reduce_bn/gamma" in paths
  assert "resnet/block_group3/block_5/bn_2/moving_variance" in paths
  assert "resnet/block_group3/block_0/shortcut_conv/kernel" in paths


def _fresh_paths():
  """In `run_fresh`'s process, where no layer was made before."""
  model = ResNet(depth=18, cifar_stem=True)
  model.build((None, None, None, 3))
  return [v.path for v in model.weights]


def test_variable_paths_match_a_fresh_process():
  fresh = run_fresh(__file__, "_fresh_paths", cpus=1, timeout=120)
  keras.layers.Conv2D(1, 1, name="conv_0").build((None, 4, 4, 1))
  here = _built(depth=18, cifar_stem=True)
  assert fresh == [v.path for v in here.weights]


def test_get_config_round_trip():
  model = ResNet(depth=18, width_multiplier=1, sk_ratio=SK_RATIO,
                 se_ratio=0.25, cifar_stem=False, batch_norm_decay=0.99,
                 global_bn=False, name="encoder")
  config = model.get_config()
  assert config["depth"] == 18 and config["sk_ratio"] == SK_RATIO
  assert config["batch_norm_decay"] == 0.99 and config["global_bn"] is False
  clone = ResNet.from_config(config)
  assert clone.get_config() == config
  model.build((None, None, None, 3))
  clone.build((None, None, None, 3))
  assert ([(v.path, tuple(v.shape)) for v in clone.weights] ==
          [(v.path, tuple(v.shape)) for v in model.weights])
  bn = clone.block_groups[0].blocks[0].bn_0
  assert bn.momentum == 0.99 and bn.synchronized is False


def test_global_bn_sets_synchronized():
  model = _built(depth=18, cifar_stem=True)
  bns = [l for l in model._flatten_layers()
         if isinstance(l, keras.layers.BatchNormalization)]
  assert bns and all(bn.synchronized for bn in bns)
  assert all(bn.momentum == 0.9 and bn.epsilon == 1e-5 for bn in bns)


def test_mixed_bfloat16(mixed_bfloat16):
  del mixed_bfloat16
  model = ResNet(depth=18, sk_ratio=SK_RATIO, se_ratio=0.25)
  out = model(tf.random.uniform([2, 64, 64, 3]), training=True)
  assert all(v.dtype == tf.bfloat16 for v in out.values())
  assert all(v.dtype == "float32" for v in model.weights)
  assert np.all(np.isfinite(
      tf.cast(out["final_avg_pool"], tf.float32).numpy()))
  # A selective-kernel bottleneck (only deep ResNets have them).
  block = blocks.ResidualBlock(32, strides=2, bottleneck=True,
                                   use_projection=True, resnet_d=True,
                                   sk_ratio=SK_RATIO, se_ratio=0.25)
  y = block(tf.random.uniform([2, 9, 9, 64]), training=True)
  assert y.dtype == tf.bfloat16 and tuple(y.shape) == (2, 5, 5, 128)
  assert np.all(np.isfinite(tf.cast(y, tf.float32).numpy()))
  assert all(v.dtype == "float32" for v in block.weights)


def test_gradients_reach_every_trainable_variable():
  model = ResNet(depth=18, sk_ratio=SK_RATIO, se_ratio=0.25)
  block = blocks.ResidualBlock(32, strides=2, bottleneck=True,
                                   use_projection=True, resnet_d=True,
                                   sk_ratio=SK_RATIO, se_ratio=0.25)
  images = tf.random.uniform([2, 64, 64, 3])
  with tf.GradientTape() as tape:
    out = model(images, training=True)
    y = block(out["block_group1"], training=True)
    loss = tf.reduce_sum(out["final_avg_pool"] ** 2) + tf.reduce_sum(y ** 2)
  variables = model.trainable_weights + block.trainable_weights
  grads = tape.gradient(loss, variables)
  assert all(g is not None for g in grads)
  # The zero-initialised gamma of the last batch norm trains from step 1.
  by_id = {id(v): g for v, g in zip(variables, grads)}
  assert np.any(by_id[id(block.bn_2.gamma)].numpy() != 0.0)


def test_freezing_a_block_group():
  model = _built(depth=18, cifar_stem=True)
  all_trainable = len(model.trainable_weights)
  frozen = model.block_groups[0]
  num_frozen = len(frozen.trainable_weights)
  assert num_frozen > 0
  frozen.trainable = False
  frozen_ids = {id(v) for v in frozen.weights}
  assert not frozen_ids & {id(v) for v in model.trainable_weights}
  assert len(model.trainable_weights) == all_trainable - num_frozen
  # Frozen batch norms run in inference mode: their statistics stay put.
  frozen_bn = frozen.blocks[0].bn_0
  live_bn = model.block_groups[1].blocks[0].bn_0
  model(tf.random.uniform([2, 16, 16, 3]), training=True)
  assert np.all(frozen_bn.moving_mean.numpy() == 0.0)
  assert np.any(live_bn.moving_mean.numpy() != 0.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(depth=42), "Received: depth=42"),
    (dict(width_multiplier=0), "Received: width_multiplier=0"),
    (dict(width_multiplier=0.3), "Received: width_multiplier=0.3"),
    (dict(sk_ratio=-1.0), "Received: sk_ratio=-1.0"),
    (dict(se_ratio=2.0), "Received: se_ratio=2.0"),
])
def test_invalid_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ResNet(**kwargs)
