"""Exports written by the previous release (0.1.0, commit 78f94b0) still load.

tests/fixtures/export_v0_1_0 holds a pretraining and a fine-tuning export of
an 8-channel ResNet-18 made with that release's run.py (2 steps each), and
the outputs its SavedModels gave on fixed images.
"""

import os

import numpy as np
import pytest

import simclr_tf

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures",
                        "export_v0_1_0")


@pytest.fixture(scope="module")
def expected():
  return dict(np.load(os.path.join(FIXTURES, "expected_outputs.npz")))


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_an_old_export_loads_as_a_keras_model(stage, expected):
  model = simclr_tf.load_export(os.path.join(FIXTURES, stage))
  outputs = model(expected["images"], training=False)
  keys = [k.split("/", 1)[1] for k in expected if k.startswith(stage + "/")]
  assert "logits_sup" in keys
  for key in keys:
    np.testing.assert_allclose(outputs[key].numpy(),
                               expected[f"{stage}/{key}"], rtol=1e-5,
                               atol=1e-6, err_msg=key)
  assert model.model_config.width_multiplier == 0.125


@pytest.mark.slow
def test_an_old_export_is_the_start_of_a_new_stage(tmp_path, expected):
  ft = simclr_tf.finetune("cifar10_sample",
                          init_from=os.path.join(FIXTURES, "pretrain"),
                          model_dir=str(tmp_path / "ft"), label_fraction=0.1,
                          train_steps=1, train_batch_size=10, seed=0)
  assert ft.metrics["global_step"] == 1
  features = simclr_tf.embed(os.path.join(FIXTURES, "finetune"),
                             (expected["images"] * 255).round()
                             .astype(np.uint8))
  assert features.shape == (4, 64)
