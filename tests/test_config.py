"""Flag validation and the stage wiring of `ModelConfig`."""

import math

import pytest

from simclr_tf import config as config_lib
from simclr_tf import stages
from simclr_tf.config import Config, ConfigError, ModelConfig


@pytest.mark.parametrize("changes, expected", [
    ({"mode": "fit"}, "--mode='fit' is not allowed"),
    ({"resnet_depth": 20}, "--resnet_depth=20 is not allowed"),
    ({"label_fraction": 0.0}, "--label_fraction=0.0 is outside (0.0, 1.0]"),
    ({"label_fraction": 1.5}, "--label_fraction=1.5 is outside"),
    ({"label_fraction": -0.5}, "--label_fraction=-0.5 is outside (0.0, 1.0]"),
    ({"width_multiplier": 0.3},
     "--width_multiplier=0.3 does not give whole channels"),
    ({"image_size": 4}, "--image_size=4 is too small for the CIFAR stem"),
    ({"image_size": 48}, "--image_size=48 is too small for the ImageNet"),
    ({"ft_proj_selector": 4}, "--ft_proj_selector=4 is outside [0, 3]"),
    ({"proj_head_mode": "none", "ft_proj_selector": 1},
     "--ft_proj_selector=1 is outside [0, 0]"),
    ({"train_mode": "distill"}, "--teacher is empty"),
    ({"temperature": 0.0}, "--temperature=0.0 is outside (0.0, inf)"),
    ({"fine_tune_after_block": 5}, "--fine_tune_after_block=5 is outside"),
    ({"recompute_blocks": 9}, "--recompute_blocks=9 is outside [-1, 8]; "
     "give -1 (auto), 0 (off) or 1 to 8"),
    ({"recompute_blocks": -2}, "--recompute_blocks=-2 is outside [-1, 8]"),
    ({"resnet_depth": 50, "recompute_blocks": 17},
     "--recompute_blocks=17 is outside [-1, 16]"),
    ({"cpu_replicas": 3, "train_batch_size": 16}, "does not split evenly"),
    ({"tpu": "x", "strategy": "mirrored"}, "--tpu='x' needs --strategy=tpu"),
])
def test_validate_rejects_with_the_flag_name(changes, expected):
  with pytest.raises(ConfigError) as err:
    config_lib.validate(Config(**changes))
  assert expected in str(err.value)
  assert "\n" not in str(err.value)


def test_defaults_are_valid():
  assert config_lib.validate(Config()) == Config()


def test_pretrain_wiring_keeps_full_head_and_stop_gradient_classifier():
  mc = config_lib.model_config(Config(ft_proj_selector=1), num_classes=10)
  assert mc.proj_layers_kept is None
  assert mc.num_proj_outputs == 3
  assert (mc.num_classes, mc.sup_head_input, mc.sup_head_stop_gradient) == (
      10, 1, True)
  no_head = config_lib.model_config(
      Config(lineareval_while_pretraining=False), num_classes=10)
  assert no_head.num_classes == 0


def test_finetune_wiring_cuts_head_at_selector():
  cfg = Config(train_mode="finetune", ft_proj_selector=1)
  mc = config_lib.model_config(cfg, num_classes=10)
  assert (mc.proj_layers_kept, mc.num_proj_outputs) == (1, 1)
  assert (mc.sup_head_input, mc.sup_head_stop_gradient) == (1, False)


def test_finetune_from_cut_export_cannot_select_a_dropped_layer():
  base = ModelConfig(proj_layers_kept=1, num_classes=10)
  with pytest.raises(ConfigError, match="keeps only 1"):
    config_lib.model_config(
        Config(train_mode="finetune", ft_proj_selector=2), 10, base=base)


def test_model_config_json_round_trip_and_unknown_keys():
  mc = ModelConfig(resnet_depth=50, sk_ratio=0.0625, num_classes=5)
  assert ModelConfig.from_json(mc.to_json()) == mc
  with pytest.raises(ValueError, match="unknown keys"):
    ModelConfig.from_dict({"resnet_depth": 50, "bogus": 1})


def test_learning_rate_scaling():
  assert config_lib.scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(
      4.8)
  assert config_lib.scaled_learning_rate(0.075, 4096, "sqrt") == (
      pytest.approx(0.075 * 64))
  assert math.isclose(config_lib.scaled_learning_rate(1.0, 256, "linear"), 1.0)


def test_steps():
  cfg = Config(train_batch_size=100, train_epochs=3, warmup_epochs=0.5)
  assert config_lib.total_train_steps(cfg, 1050) == 30
  assert config_lib.total_train_steps(cfg.replace(train_steps=7), 1050) == 7
  assert config_lib.warmup_steps(cfg, 1000) == 5


@pytest.mark.parametrize("changes, expected", [
    ({"train_mode": "pretrain", "label_fraction": 0.1},
     "--label_fraction=0.1 is only used by --train_mode=finetune"),
    ({"train_mode": "distill", "teacher": "t", "label_fraction": 0.1},
     "--label_fraction=0.1 is only used by --train_mode=finetune"),
    ({"train_mode": "finetune", "teacher": "t"},
     "--teacher='t' is only used by --train_mode=distill"),
    ({"train_mode": "pretrain", "teacher": "t"},
     "--teacher='t' is only used by --train_mode=distill"),
    ({"train_mode": "finetune", "memory_size": 64},
     "--memory_size=64 is only used by --train_mode=pretrain"),
    ({"train_mode": "distill", "teacher": "t", "memory_size": 64},
     "--memory_size=64 is only used by --train_mode=pretrain"),
    ({"train_mode": "pretrain", "fine_tune_after_block": 4},
     "--fine_tune_after_block=4 is only used by --train_mode=finetune or "
     "distill"),
])
def test_a_flag_the_stage_does_not_use_is_an_error(changes, expected):
  with pytest.raises(ConfigError) as err:
    config_lib.validate(Config(**changes))
  assert expected in str(err.value)


@pytest.mark.parametrize("changes", [
    {"train_mode": "finetune", "label_fraction": 0.1,
     "fine_tune_after_block": 4},
    {"train_mode": "distill", "teacher": "t", "fine_tune_after_block": 2},
    {"train_mode": "pretrain", "memory_size": 64},
    # Evaluating a distilled model needs no teacher.
    {"train_mode": "distill", "mode": "eval"},
])
def test_the_flags_each_stage_uses_are_accepted(changes):
  cfg = config_lib.validate(Config(**changes))
  stage = stages.get(cfg.train_mode)
  # The same flag under a stage that does not use it is rejected, naming it.
  moved = 0
  for flag, field, unset in stages.STAGE_FLAGS:
    if changes.get(flag, unset) == unset:
      continue
    assert getattr(stage, field), flag
    for other in stages.STAGES.values():
      if getattr(other, field):
        continue
      elsewhere = {"train_mode": other.name, flag: changes[flag]}
      if other.teacher:
        elsewhere["teacher"] = "t"
      with pytest.raises(ConfigError) as err:
        config_lib.validate(Config(**elsewhere))
      assert (f"--{flag}={changes[flag]!r} is only used by --train_mode="
              in str(err.value)), str(err.value)
      moved += 1
  if changes.get("mode") == "eval":
    # Only evaluation goes without a teacher; training is rejected.
    with pytest.raises(ConfigError, match="--teacher is empty"):
      config_lib.validate(cfg.replace(mode="train"))
  else:
    assert moved > 0
  # The accepted config is wired as its stage needs.
  mc = config_lib.model_config(cfg, 10)
  assert (mc.num_classes, mc.sup_head_input) == (10, cfg.ft_proj_selector)
  if cfg.train_mode == "pretrain":
    # The whole projection head; a linear classifier that does not train
    # the encoder.
    assert mc.proj_layers_kept is None and mc.num_proj_outputs == 3
    assert mc.sup_head_stop_gradient is True
  else:
    # The head cut at --ft_proj_selector; the classifier trains the encoder.
    assert mc.proj_layers_kept == cfg.ft_proj_selector == mc.num_proj_outputs
    assert mc.sup_head_stop_gradient is False


def test_every_stage_flag_is_used_by_some_stage():
  for flag, field, unset in stages.STAGE_FLAGS:
    assert getattr(Config(), flag) == unset, flag
    assert any(getattr(s, field) for s in stages.STAGES.values()), flag
