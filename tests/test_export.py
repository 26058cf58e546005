"""The reusable SavedModel: equal outputs, fine-tunable, atomic, re-exportable."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import ModelConfig
from simclr_tf.models import simclr as simclr_lib
from tf_hub_export import export as export_lib
from tf_hub_export import load as load_lib

# One process runs this file's tests, so that its module fixtures (which
# export models) run once (`make test` distributes by xdist_group).
pytestmark = pytest.mark.xdist_group(__name__)

# Quarter width: the exports' traces cost the same, their variables less.
CONFIG = ModelConfig(width_multiplier=0.25, proj_layers_kept=1,
                     num_classes=10, sup_head_input=1, proj_out_dim=16)


def _trained_net():
  """A network whose weights and BN statistics are not at their init."""
  net = simclr_lib.build_model(CONFIG, 32)
  rng = np.random.default_rng(1)
  for v in net.variables:
    v.assign(v.numpy() + 0.05 * rng.standard_normal(v.shape).astype("float32"))
  return net


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  net = _trained_net()
  path = str(tmp_path_factory.mktemp("export") / "saved_model")
  meta = export_lib.export_saved_model(net, path, 32, class_names=list("abcdefghij"),
                                       train_mode="finetune", global_step=7)
  return net, path, meta


def _images(n=3, size=32, seed=0):
  return tf.constant(np.random.default_rng(seed).uniform(
      size=(n, size, size, 3)), tf.float32)


def test_reloaded_outputs_equal_keras(exported):
  net, path, meta = exported
  loaded = tf.saved_model.load(path)
  x = _images()
  ours, theirs = net(x, training=False), loaded(x, training=False)
  assert set(theirs) == set(ours)
  for key in ours:
    np.testing.assert_allclose(theirs[key], ours[key], atol=1e-5, rtol=1e-5,
                               err_msg=key)
  assert {"default", "logits_sup", "proj_head_input", "proj_head_output",
          "proj_head_layer_1", "block_group4"} <= set(theirs)
  # Any batch and spatial size.
  assert loaded(_images(1, 40), training=False)["default"].shape == (1, 128)
  assert meta.global_step == 7 and meta.class_names[0] == "a"


def test_reusable_interface(exported):
  net, path, meta = exported
  loaded = tf.saved_model.load(path)
  assert len(loaded.variables) == len(net.variables) == len(
      meta.variable_paths)
  assert len(loaded.trainable_variables) == len(net.trainable_variables)
  assert list(loaded.regularization_losses) == []
  serving = loaded.signatures["serving_default"]
  out = serving(images=_images())
  np.testing.assert_allclose(out["logits_sup"],
                             net(_images())["logits_sup"], atol=1e-5)


def test_training_call_updates_batch_norm_and_has_gradients(exported):
  _, path, meta = exported
  loaded = tf.saved_model.load(path)
  moving = [v for v, p in zip(loaded.variables, meta.variable_paths)
            if p.endswith("moving_mean")]
  before = [v.numpy().copy() for v in moving]
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(loaded(_images(), training=True)["logits_sup"] ** 2)
  grads = tape.gradient(loss, loaded.trainable_variables)
  assert all(g is not None for g in grads)
  assert any(np.abs(v.numpy() - b).max() > 0 for v, b in zip(moving, before))


def test_tfsmlayer_loads_and_fine_tunes(exported):
  net, path, _ = exported
  layer = keras.layers.TFSMLayer(path, call_endpoint="serve",
                                 call_training_endpoint="train",
                                 trainable=True)
  x = _images(8)
  np.testing.assert_allclose(layer(x)["logits_sup"],
                             net(x)["logits_sup"], atol=1e-5)
  inputs = keras.Input((32, 32, 3))
  model = keras.Model(inputs, layer(inputs)["logits_sup"])
  model.compile(optimizer=keras.optimizers.SGD(0.1),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
  loaded_vars = layer._reloaded_obj.variables
  before = [v.numpy().copy() for v in loaded_vars]
  model.fit(x, np.arange(8) % 10, epochs=1, verbose=0)
  changed = [np.abs(v.numpy() - b).max() > 0
             for v, b in zip(loaded_vars, before)]
  names = [v.name for v in loaded_vars]
  trainable_changed = any(c for c, v in zip(changed, loaded_vars)
                          if v.trainable)
  stats_changed = any(c for c, n in zip(changed, names) if "moving" in n)
  assert trainable_changed and stats_changed


def test_load_model_restores_and_checks(exported):
  net, path, _ = exported
  model, meta, report = load_lib.load_model(path)
  assert report.missing == () and report.unused == ()
  x = _images()
  for key in ("logits_sup", "proj_head_output", "block_group2"):
    np.testing.assert_allclose(model(x)[key], net(x)[key], atol=1e-5)


def test_narrow_network_round_trips(tmp_path, monkeypatch):
  """A fractional width (0.25x: 16-128 channels) survives export and load;
  the export traces the network once per mode."""
  config = ModelConfig(width_multiplier=0.25, proj_out_dim=16)
  net = simclr_lib.build_model(config, 32)
  path = str(tmp_path / "narrow")
  calls = []
  network_call = simclr_lib.SimCLR.call

  def counted_call(self, inputs, training=None):
    calls.append(training)
    return network_call(self, inputs, training=training)

  monkeypatch.setattr(simclr_lib.SimCLR, "call", counted_call)
  meta = export_lib.export_saved_model(net, path, 32)
  monkeypatch.undo()
  # Building the float32 copy (one eager call), then one trace per mode;
  # endpoints and the save's own retracing reuse those traces.
  assert sorted(calls) == [False, False, True], calls
  assert meta.model_config.width_multiplier == 0.25
  model, meta, report = load_lib.load_model(path)
  assert report.missing == ()
  assert meta.model_config.width_multiplier == 0.25
  x = _images()
  assert model(x)["default"].shape == (3, 128)
  np.testing.assert_allclose(model(x)["proj_head_output"],
                             net(x)["proj_head_output"], atol=1e-5)


def test_load_model_with_new_head_reports_exactly_the_head(exported):
  _, path, _ = exported
  new = dataclasses.replace(CONFIG, num_classes=3)
  model, _, report = load_lib.load_model(
      path, new, new_weights=lambda p: "head_supervised" in p)
  assert sorted(report.missing) == sorted(
      v.path for v in model.sup_head.weights)
  np.testing.assert_array_equal(model(_images())["logits_sup"],
                                np.zeros([3, 3]))


def test_load_model_rejects_a_different_architecture(exported):
  _, path, _ = exported
  wrong = dataclasses.replace(CONFIG, resnet_depth=34)
  with pytest.raises(load_lib.ExportError, match="lacks|shape"):
    load_lib.load_model(path, wrong)


def test_teacher_runs_in_the_session_precision(exported):
  net, path, _ = exported
  x = _images(4)
  reference = net(x, training=False)["logits_sup"].numpy()
  logits_fn, _ = load_lib.load_logits_fn(path)
  np.testing.assert_allclose(logits_fn(x), reference, atol=1e-5, rtol=1e-5)
  keras.config.set_dtype_policy("mixed_bfloat16")
  try:
    logits_fn, _ = load_lib.load_logits_fn(path)
    fast = logits_fn(x)
  finally:
    keras.config.set_dtype_policy("float32")
  fast = fast.numpy()
  # Computed in bfloat16 (rounding shows), from the same weights.
  assert np.abs(fast - reference).max() > 1e-4
  np.testing.assert_allclose(fast, reference,
                             atol=0.1 * np.abs(reference).max() + 0.05)


def test_foreign_or_missing_exports_are_clear_errors(tmp_path):
  with pytest.raises(load_lib.ExportError, match="no saved_model.pb"):
    load_lib.read_meta(str(tmp_path))
  module = tf.Module()
  module.f = tf.function(lambda x: x, input_signature=[tf.TensorSpec([None])])
  tf.saved_model.save(module, str(tmp_path / "foreign"))
  with pytest.raises(load_lib.ExportError, match="not written by simclr-tf"):
    load_lib.read_meta(str(tmp_path / "foreign"))


def test_reexport_is_exact(exported, tmp_path):
  _, path, _ = exported
  model, _, _ = load_lib.load_model(path)
  again = str(tmp_path / "again")
  export_lib.export_saved_model(model, again, 32)
  x = _images()
  first = tf.saved_model.load(path)(x, training=False)
  second = tf.saved_model.load(again)(x, training=False)
  for key in first:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_export_replaces_atomically_and_survives_a_failed_write(
    exported, tmp_path, monkeypatch):
  net, _, _ = exported
  path = str(tmp_path / "saved_model")
  export_lib.export_saved_model(net, path, 32, global_step=1)

  def broken_save(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(tf.saved_model, "save", broken_save)
  with pytest.raises(OSError):
    export_lib.export_saved_model(net, path, 32, global_step=2)
  assert load_lib.read_meta(path).global_step == 1
  assert [n for n in os.listdir(tmp_path) if n != "saved_model"] == []


def test_interrupted_swap_falls_back_to_previous_export(exported, tmp_path):
  net, _, _ = exported
  path = str(tmp_path / "saved_model")
  export_lib.export_saved_model(net, path, 32, global_step=3)
  os.rename(path, path + ".old-123")   # killed between the two renames
  assert load_lib.read_meta(path).global_step == 3


HUB_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np, tensorflow as tf, tensorflow_hub as hub, tf_keras
    path = sys.argv[1]
    x = np.random.default_rng(0).uniform(size=(8, 32, 32, 3)).astype("float32")
    expected = np.load(sys.argv[2])
    layer = hub.KerasLayer(path, trainable=True, output_key="logits_sup")
    got = layer(x).numpy()
    assert np.allclose(got, expected, atol=1e-5), np.abs(got - expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    model = tf_keras.Sequential([tf_keras.Input((32, 32, 3)), layer])
    model.compile(tf_keras.optimizers.SGD(0.1),
                  tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [v.numpy().copy() for v in layer.variables]
    model.fit(x, np.arange(8) % 10, epochs=1, verbose=0)
    moved = [bool(np.abs(v.numpy() - b).max() > 0)
             for v, b in zip(layer.variables, before)]
    trainable = [any(v is t for t in layer.trainable_variables)
                 for v in layer.variables]
    assert any(m for m, t in zip(moved, trainable) if t), "weights frozen"
    assert any(m for m, t in zip(moved, trainable) if not t), "BN stats frozen"
    print("HUB_OK", len(layer.trainable_variables), len(layer.variables))
""")


@pytest.mark.slow
def test_hub_keras_layer_loads_and_fine_tunes_under_tf_keras(exported,
                                                             tmp_path):
  net, path, _ = exported
  x = np.random.default_rng(0).uniform(size=(8, 32, 32, 3)).astype("float32")
  np.save(tmp_path / "expected.npy", net(x)["logits_sup"].numpy())
  script = tmp_path / "hub_check.py"
  script.write_text(HUB_SCRIPT)
  proc = subprocess.run(
      [sys.executable, str(script), path, str(tmp_path / "expected.npy")],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "HUB_OK" in proc.stdout
