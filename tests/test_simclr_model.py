"""The SimCLR network: named outputs per stage, freezing, decay selection."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from layer_harness import run_layer_test
from simclr_tf import config as config_lib
from simclr_tf.config import Config, ModelConfig
from simclr_tf.models import resnet as resnet_lib
from simclr_tf.models import simclr as simclr_lib

PRETRAIN = ModelConfig(num_classes=10, sup_head_input=1,
                       sup_head_stop_gradient=True, proj_out_dim=16)
FINETUNE = ModelConfig(proj_layers_kept=1, num_classes=10, sup_head_input=1,
                       proj_out_dim=16)


@pytest.fixture(scope="module")
def pretrain_net():
  return simclr_lib.build_model(PRETRAIN, 32)


def test_pretrain_outputs(pretrain_net):
  out = pretrain_net(tf.zeros([2, 32, 32, 3]))
  assert set(resnet_lib.OUTPUT_NAMES) <= set(out)
  for j in (1, 2, 3):
    assert simclr_lib.proj_layer_key(j) in out
  assert out["proj_head_output"].shape == (2, 16)
  assert out["proj_head_layer_1"].shape == (2, 512)
  np.testing.assert_array_equal(out["default"], out["final_avg_pool"])
  np.testing.assert_array_equal(out["proj_head_input"], out["final_avg_pool"])
  assert out["logits_sup"].shape == (2, 10)


def test_linear_eval_head_does_not_train_the_encoder(pretrain_net):
  images = tf.random.uniform([4, 32, 32, 3])
  with tf.GradientTape() as tape:
    logits = pretrain_net(images, training=True)["logits_sup"]
    loss = tf.reduce_sum(logits ** 2) + tf.reduce_sum(
        pretrain_net.sup_head.weights[0])
  grads = tape.gradient(loss, pretrain_net.trainable_variables)
  head = {id(v) for v in pretrain_net.sup_head.weights}
  for v, g in zip(pretrain_net.trainable_variables, grads):
    if id(v) not in head:
      assert g is None, v.path


def test_finetune_model_drops_layers_above_selector():
  net = simclr_lib.build_model(FINETUNE, 32)
  out = net(tf.zeros([1, 32, 32, 3]))
  assert "proj_head_layer_2" not in out
  np.testing.assert_array_equal(out["proj_head_output"],
                                out["proj_head_layer_1"])
  paths = [v.path for v in net.variables]
  assert not any("layer_2" in p or "layer_3" in p for p in paths
                 if "proj_head" in p)
  # Zero-initialised head: logits start at exactly 0.
  np.testing.assert_array_equal(out["logits_sup"], np.zeros([1, 10]))


def test_freeze_before_block_selects_groups():
  net = simclr_lib.build_model(FINETUNE, 32)
  everything = len(net.trainable_variables)
  simclr_lib.freeze_before_block(net, -1)
  assert len(net.trainable_variables) == everything
  simclr_lib.freeze_before_block(net, 2)
  trainable = [v.path for v in net.trainable_variables]
  assert not any("/stem/" in p or "block_group1/" in p or "block_group2/" in p
                 for p in trainable)
  assert any("block_group3/" in p for p in trainable)
  simclr_lib.freeze_before_block(net, 4)
  assert sorted(v.path for v in net.trainable_variables) == sorted(
      v.path for v in net.sup_head.weights)


def test_run_options_reach_the_block_groups():
  # --recompute_blocks: from the run's Config to the network's groups.
  cfg = Config(width_multiplier=0.25, recompute_blocks=3)
  net = simclr_lib.build_model(config_lib.model_config(cfg, 0), 32)
  assert net.backbone.recompute_blocks == 3
  assert [g.recompute_blocks for g in net.backbone.block_groups] == [2, 1, 0,
                                                                     0]
  # From an export (--init_from): its shapes, this run's training options.
  base = ModelConfig(width_multiplier=0.25, batch_norm_decay=0.5,
                     global_bn=False)
  tuned = config_lib.model_config(cfg.replace(train_mode="finetune"), 10,
                                  base=base)
  assert (tuned.recompute_blocks, tuned.batch_norm_decay, tuned.global_bn) == (
      3, cfg.batch_norm_decay, cfg.global_bn)


@pytest.mark.parametrize("optimizer", ["lars", "momentum"])
def test_decay_groups_select_by_structure(pretrain_net, optimizer):
  groups = simclr_lib.decay_groups(pretrain_net, optimizer)
  kernel_layers = (keras.layers.Conv2D, keras.layers.Dense)
  kernels = {id(l.kernel): l for l in pretrain_net._flatten_layers()
             if isinstance(l, kernel_layers)}
  head = {id(v) for v in pretrain_net.sup_head.weights}
  decayed = groups.lars_decayed + groups.loss_l2
  # Every conv/dense kernel is decayed exactly once; nothing else is.
  assert sorted(id(v) for v in decayed) == sorted(kernels)
  assert len(decayed) + len(groups.excluded) == len(
      pretrain_net.trainable_variables)
  for v in groups.excluded:
    assert v.path.rsplit("/", 1)[-1] in ("gamma", "beta", "bias"), v.path
  if optimizer == "lars":
    assert {id(v) for v in groups.loss_l2} == {
        id(pretrain_net.sup_head.weights[0])}
    assert not head & {id(v) for v in groups.lars_decayed}
  else:
    assert groups.lars_decayed == ()


def test_get_config_round_trip(pretrain_net):
  clone = simclr_lib.SimCLR.from_config(pretrain_net.get_config())
  assert clone.model_config == PRETRAIN
  clone.build_for(32)
  assert [v.path for v in clone.variables] == [
      v.path for v in pretrain_net.variables]


def test_copy_weights_by_path(pretrain_net):
  clone = simclr_lib.build_model(PRETRAIN, 32)
  simclr_lib.copy_weights(pretrain_net, clone)
  x = tf.random.uniform([2, 32, 32, 3])
  np.testing.assert_allclose(clone(x)["proj_head_output"],
                             pretrain_net(x)["proj_head_output"], atol=1e-6)


# The network of each stage saves to .keras and reloads (layer_harness).
TINY = dict(resnet_depth=18, width_multiplier=0.125, proj_out_dim=8)
STAGE_CONFIGS = {
    "pretrain": Config(**TINY),
    "finetune": Config(train_mode="finetune", **TINY),
    "distill": Config(train_mode="distill", teacher="t", ft_proj_selector=2,
                      **TINY),
}


def _images(size=8, batch=2):
  return np.random.default_rng(0).uniform(
      size=(batch, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_stage_model_saves_and_reloads(stage):
  cfg = STAGE_CONFIGS[stage]
  model_config = config_lib.model_config(cfg, num_classes=10)
  kept = 3 if stage == "pretrain" else cfg.ft_proj_selector
  expected = set(resnet_lib.OUTPUT_NAMES) | {
      "default", "proj_head_input", "proj_head_output", "logits_sup"} | {
          simclr_lib.proj_layer_key(j) for j in range(1, kept + 1)}
  result = run_layer_test(
      simclr_lib.SimCLR, dict(model_config=model_config), (2, 8, 8, 3),
      input_data=_images(), mixed_dtypes={"logits_sup": "float32"})
  # Every named output was compared, logits included (non-zero: the
  # weights, the supervised head's too, were randomised).
  assert set(result.outputs) == expected
  assert np.any(result.outputs["logits_sup"] != 0.0)
  reloaded = result.reloaded
  assert type(reloaded) is simclr_lib.SimCLR
  assert reloaded.model_config == model_config
  assert [v.path for v in reloaded.variables] == [
      v.path for v in result.layer.variables]
  assert "simclr/resnet/block_group2/block_0/conv_1/kernel" in [
      v.path for v in reloaded.variables]
  for saved, loaded in zip(result.layer.variables, reloaded.variables):
    np.testing.assert_array_equal(loaded.numpy(), saved.numpy())


def test_saved_model_keeps_its_dtype_policy(tmp_path):
  # Saved under mixed_bfloat16, loaded under float32: still bfloat16.
  path = str(tmp_path / "mixed.keras")
  saved_policy = keras.config.dtype_policy()
  keras.config.set_dtype_policy("mixed_bfloat16")
  try:
    model = simclr_lib.build_model(ModelConfig(**TINY, num_classes=3), 8)
    model.save(path)
    keras.config.set_dtype_policy("float32")
    reloaded = keras.saving.load_model(path)
  finally:
    keras.config.set_dtype_policy(saved_policy)
  assert reloaded.backbone.dtype_policy.name == "mixed_bfloat16"
  out = reloaded(_images())
  assert out["final_avg_pool"].dtype == tf.bfloat16
  assert out["proj_head_output"].dtype == tf.bfloat16
  assert out["logits_sup"].dtype == tf.float32
  assert all(v.dtype == "float32" for v in reloaded.variables)
