"""Tests of the SimCLRv2 ResNet encoder (simclr_tf/models/resnet.py)."""

import functools
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_fresh
from layer_harness import run_layer_test
from simclr_tf.models import blocks
from simclr_tf.models import resnet as resnet_lib
from simclr_tf.models.resnet import BlockGroup, ResNet, Stem

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


# He et al. 2016 (arXiv 1512.03385), Table 1: block type and blocks per
# group (conv2_x .. conv5_x) by depth; 200 from He et al. 2016b (arXiv
# 1603.05027). Written out here, not read from resnet.BLOCK_TYPES.
HE_TABLE_1 = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
    200: (True, (3, 24, 36, 3)),
}
SMALL_WIDTH = 0.125  # 8 base channels: every depth builds in seconds.


@functools.lru_cache(maxsize=None)
def _small(depth: int, width: float) -> ResNet:
  """An ImageNet-stem ResNet, built; shared by the tests below."""
  return _built(depth=depth, width_multiplier=width)


def _main_path_convs(model: ResNet) -> list:
  """The weighted layers that give a ResNet its depth, in order: the stem
  convolution and the convolutions of every block (not the projection
  shortcuts)."""
  convs = [model.stem.convs[0]]
  for group in model.block_groups:
    for block in group.blocks:
      convs += [block.conv_0, block.conv_1]
      if block.bottleneck:
        convs.append(block.conv_2)
  return convs


@pytest.mark.parametrize("depth", sorted(HE_TABLE_1))
def test_built_resnet_matches_he_et_al_table_1(depth):
  bottleneck, blocks_per_group = HE_TABLE_1[depth]
  model = _small(depth, SMALL_WIDTH)
  assert tuple(len(g.blocks) for g in model.block_groups) == blocks_per_group
  assert all(block.bottleneck == bottleneck
             for g in model.block_groups for block in g.blocks)
  # The depth counts the weighted layers: these convolutions and the
  # classifier (which the encoder leaves to the heads).
  assert len(_main_path_convs(model)) + 1 == depth
  expansion = 4 if bottleneck else 1
  out = model(tf.zeros([1, 32, 32, 3]), training=False)
  # conv2_x .. conv5_x: 64, 128, 256, 512 base channels (x 4 for
  # bottlenecks), at 1/4, 1/8, 1/16, 1/32 of the input.
  for g, (base, size) in enumerate(zip((64, 128, 256, 512), (8, 4, 2, 1))):
    assert tuple(out[f"block_group{g + 1}"].shape) == (
        1, size, size, round(base * SMALL_WIDTH) * expansion)
  assert model.output_dim == round(512 * expansion * SMALL_WIDTH)
  # The built model has the parameters the hand count gives, which
  # test_simclrv2_table_1_parameter_counts then extends to wide networks.
  assert _num_params(model.trainable_weights) == _expected_trainable(
      depth, SMALL_WIDTH)


# SimCLRv2 paper (arXiv 2006.10029), Table 1: encoder parameters (millions,
# rounded) by depth, width and selective kernels.
PAPER_TABLE_1 = [
    (50, 1, False, 24), (50, 1, True, 35), (50, 2, False, 94),
    (50, 2, True, 140), (101, 1, False, 43), (101, 1, True, 65),
    (101, 2, False, 170), (101, 2, True, 257), (152, 1, False, 58),
    (152, 1, True, 89), (152, 2, False, 233), (152, 2, True, 354),
    (152, 3, True, 795),
]


def _extrapolated_trainable(depth: int, width: float) -> int:
  """Trainable parameters of a ResNet without SK at `width`, from built ones.

  Without selective kernels every convolution has k * k * (c_in x w) *
  (c_out x w) weights (the stem's: 7 * 7 * 3 * (64 x w)) and every batch
  norm 2 * (c x w): the count is exactly a w^2 + b w. Two built narrow
  networks give a and b.
  """
  w1, w2 = SMALL_WIDTH, 2 * SMALL_WIDTH
  n1 = _num_params(_small(depth, w1).trainable_weights)
  n2 = _num_params(_small(depth, w2).trainable_weights)
  a = (n2 / w2 - n1 / w1) / (w2 - w1)
  b = n1 / w1 - a * w1
  return int(round(a * width ** 2 + b * width))


@pytest.mark.parametrize("depth", [50, 101, 152])
def test_simclrv2_table_1_parameter_counts(depth):
  rows = [r for r in PAPER_TABLE_1 if r[0] == depth]
  for _, width, sk, millions in rows:
    hand = _expected_trainable(depth, width, SK_RATIO if sk else 0.0)
    assert abs(hand / 1e6 - millions) < 1.0, (width, sk, hand)
    if not sk:
      # Without SK, the count of the built networks, extrapolated exactly.
      assert _extrapolated_trainable(depth, width) == hand, (width, hand)
  if depth == 50:
    # torchvision's resnet50 without its 2048 x 1000 classifier.
    assert _extrapolated_trainable(50, 1) == 23_508_032


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
                 global_bn=False, recompute_blocks=3, name="encoder")
  config = model.get_config()
  assert config["depth"] == 18 and config["sk_ratio"] == SK_RATIO
  assert config["recompute_blocks"] == 3
  assert config["batch_norm_decay"] == 0.99 and config["global_bn"] is False
  clone = ResNet.from_config(config)
  assert clone.get_config() == config
  model.build((None, None, None, 3))
  clone.build((None, None, None, 3))
  assert ([(v.path, tuple(v.shape)) for v in clone.weights] ==
          [(v.path, tuple(v.shape)) for v in model.weights])
  bn = clone.block_groups[0].blocks[0].bn_0
  assert bn.momentum == 0.99 and bn.synchronized is False
  assert [g.recompute_blocks for g in clone.block_groups] == [2, 1, 0, 0]


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
    (dict(depth=18, recompute_blocks=9), "Received: recompute_blocks=9"),
])
def test_invalid_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ResNet(**kwargs)


# Saving and reloading (tests/layer_harness.py), on tiny batches.


@pytest.mark.parametrize("kwargs,out_shape", [
    (dict(filters=4, num_blocks=2, bottleneck=False), (2, 8, 8, 4)),
    (dict(filters=2, num_blocks=2, strides=2, resnet_d=True,
          sk_ratio=SK_RATIO, se_ratio=0.25, batch_norm_decay=0.99,
          global_bn=False, recompute_blocks=2), (2, 4, 4, 8)),
])
def test_block_group_saves_and_reloads(kwargs, out_shape):
  result = run_layer_test(BlockGroup, kwargs, (2, 8, 8, 4),
                          expected_output_shape=out_shape)
  group = result.reloaded.get_layer(result.layer.name)
  assert [b.name for b in group.blocks] == ["block_0", "block_1"]
  assert [b.use_projection for b in group.blocks] == [True, False]


@pytest.mark.parametrize("kwargs,out_shapes", [
    (dict(filters=4, cifar_stem=True), [(2, 8, 8, 4), (2, 8, 8, 4)]),
    (dict(filters=4), [(2, 4, 4, 4), (2, 2, 2, 4)]),
    (dict(filters=4, resnet_d=True), [(2, 4, 4, 4), (2, 2, 2, 4)]),
])
def test_stem_saves_and_reloads(kwargs, out_shapes):
  result = run_layer_test(Stem, kwargs, (2, 8, 8, 3),
                          expected_output_shape=out_shapes)
  stem = result.reloaded.get_layer(result.layer.name)
  assert len(stem.convs) == (3 if kwargs.get("resnet_d") else 1)


@pytest.mark.parametrize("kwargs,size", [
    (dict(depth=18, width_multiplier=SMALL_WIDTH, cifar_stem=True), 8),
    (dict(depth=18, width_multiplier=SMALL_WIDTH, sk_ratio=SK_RATIO,
          se_ratio=0.25, batch_norm_decay=0.99, global_bn=False,
          recompute_blocks=3, name="encoder"), 32),
])
def test_resnet_saves_and_reloads(kwargs, size):
  model = ResNet(**kwargs)
  expected = model.compute_output_shape((2, size, size, 3))
  result = run_layer_test(ResNet, kwargs, (2, size, size, 3),
                          input_data=np.random.default_rng(0).uniform(
                              size=(2, size, size, 3)).astype(np.float32),
                          expected_output_shape=expected)
  encoder = result.reloaded.get_layer(kwargs.get("name", "resnet"))
  assert set(result.outputs) == set(resnet_lib.OUTPUT_NAMES)
  assert ([v.path for v in encoder.weights] ==
          [v.path for v in result.layer.weights])
  assert (f"{encoder.name}/block_group2/block_0/conv_1/kernel" in
          [v.path for v in encoder.weights])
