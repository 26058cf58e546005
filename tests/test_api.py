"""The public Python API: names, arguments, errors naming the argument, and
the data forms it takes (runs are tiny: a few steps of an 8-channel net)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import simclr_tf
from simclr_tf import api
from simclr_tf.data import sources

TINY = dict(width_multiplier=0.125, train_steps=2, train_batch_size=16,
            seed=0, log_images=False)


def test_import_is_light_and_lists_the_api():
  code = ("import sys, simclr_tf; "
          "print('tensorflow' in sys.modules, sorted(simclr_tf.__all__))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True).stdout
  loaded, names = out.split(" ", 1)
  assert loaded == "False"
  for name in ("pretrain", "finetune", "distill", "evaluate", "embed",
               "predict", "load_export", "import_official", "run",
               "TrainResult", "Config", "ModelConfig", "SimCLR"):
    assert name in names
    assert getattr(simclr_tf, name) is not None
  with pytest.raises(AttributeError):
    simclr_tf.not_a_name  # pylint: disable=pointless-statement


@pytest.mark.parametrize("call, expected", [
    (lambda: simclr_tf.finetune("cifar10_sample", label_fraction=0.0,
                                **TINY),
     "label_fraction=0.0 is outside (0.0, 1.0]"),
    (lambda: simclr_tf.pretrain("cifar10_sample", resnet_depth=20, **TINY),
     "resnet_depth=20 is not allowed"),
    (lambda: simclr_tf.pretrain("cifar10_sample", epochs=3),
     "Unknown argument epochs="),
    (lambda: simclr_tf.pretrain("cifar10_sample", train_mode="finetune"),
     "train_mode is not an option here"),
    (lambda: simclr_tf.pretrain("cifar10_sample", label_fraction=0.1, **TINY),
     "label_fraction=0.1 is only used by train_mode=finetune"),
    (lambda: simclr_tf.distill("cifar10_sample", teacher="", **TINY),
     "teacher is empty"),
    (lambda: simclr_tf.finetune("cifar10_sample", init_from="/nonexistent",
                                **TINY),
     "init_from='/nonexistent' is not a SavedModel"),
    (lambda: simclr_tf.pretrain("./no/such/folder", **TINY),
     "data='./no/such/folder' is not a folder"),
    (lambda: simclr_tf.pretrain(np.zeros((4, 32, 32)), **TINY),
     "data must be images [N, H, W, 3]"),
    (lambda: simclr_tf.pretrain(np.full((4, 32, 32, 3), 2.0), **TINY),
     "data holds floats outside [0, 1]"),
    (lambda: simclr_tf.pretrain(np.zeros((4, 32, 32, 3), np.uint8),
                                labels=[0, 1], **TINY),
     "4 images but 2 labels"),
    (lambda: simclr_tf.pretrain("cifar10_sample", labels=[0], **TINY),
     "labels= and eval_data= are for in-memory images"),
    (lambda: simclr_tf.embed("/nonexistent", "cifar10_sample"),
     "'/nonexistent' is not a SavedModel"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(call, expected,
                                                             tmp_path,
                                                             monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError) as err:
    call()
  message = str(err.value)
  assert expected in message
  assert "--" not in message, message     # Python names, not flags
  assert "\n" not in message


def test_the_cli_still_names_the_flag(tmp_path):
  from conftest import run_cli  # pylint: disable=g-import-not-at-top
  proc = run_cli("--train_mode=finetune", "--label_fraction=0",
                 f"--model_dir={tmp_path}", timeout=120)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("run.py: error: --label_fraction=0.0 is outside")


def test_python_m_simclr_tf_is_the_cli(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "simclr_tf", "--mode=fit"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "--mode=fit" in proc.stderr.strip().splitlines()[-1]


def test_images_become_in_memory_data():
  floats = np.linspace(0, 1, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
  data = api._data_options(floats, [0, 2], None, None, {})["dataset"]  # pylint: disable=protected-access
  images, labels = data.splits["train"]
  assert images.dtype == np.uint8 and images.max() == 255
  assert data.class_names == ("class_0", "class_1", "class_2")
  source = sources.ArraySource(data, "train")
  assert source.num_classes == 3
  assert list(source.labels()) == [0, 2]
  # PNG round trip: the pipeline decodes exactly the given pixels.
  from simclr_tf.data import folder  # pylint: disable=g-import-not-at-top
  for (contents, _), image in zip(source.encoded(np.arange(2)), images):
    assert (folder.decode_image_uint8(contents).numpy() == image).all()


def test_a_tf_data_dataset_is_read_once():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), np.uint8)
  labels = np.arange(6) % 2
  pairs = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
  x, y = api._arrays(pairs, None, "data")  # pylint: disable=protected-access
  assert (x == images).all() and list(y) == list(labels)
  dicts = tf.data.Dataset.from_tensor_slices({"image": images})
  x, y = api._arrays(dicts, None, "data")  # pylint: disable=protected-access
  assert (x == images).all() and y is None


@pytest.mark.slow
def test_pretrain_and_finetune_from_numpy_then_use_the_export(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(48, 32, 32, 3), dtype=np.uint8)
  labels = np.arange(48) % 3
  pre = simclr_tf.pretrain(images, labels, model_dir=str(tmp_path / "pre"),
                           **TINY)
  assert pre.metrics["global_step"] == 2
  assert os.path.isdir(pre.export_path)
  assert "logits_sup" in pre.model(images[:2] / 255.0)
  flags = json.load(open(tmp_path / "pre" / "flags.json"))
  assert flags["dataset"].startswith("in-memory data (train: 48 images")
  ft = simclr_tf.finetune(images, labels, init_from=pre.export_path,
                          eval_data=images[:16], eval_labels=labels[:16],
                          model_dir=str(tmp_path / "ft"), train_steps=2,
                          train_batch_size=16, seed=0)
  assert 0.0 <= ft.metrics["top1"] <= 1.0
  # Fine-tuning took the architecture from init_from (width 0.125).
  assert ft.model.model_config.width_multiplier == 0.125
  assert ft.model.model_config.proj_layers_kept == 1
  probabilities = simclr_tf.predict(ft.export_path, images[:5])
  assert probabilities.shape == (5, 3)
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
  features = simclr_tf.embed(ft.export_path, images[:5])
  loaded = simclr_tf.load_export(ft.export_path)
  direct = loaded(images[:5] / 255.0)["final_avg_pool"].numpy()
  np.testing.assert_allclose(features, direct, rtol=1e-4, atol=1e-5)
  metrics = simclr_tf.evaluate(ft.export_path, images[:16], labels[:16],
                               model_dir=str(tmp_path / "eval"))
  assert metrics["top1"] == pytest.approx(ft.metrics["top1"])
  with pytest.raises(ValueError, match="has no supervised head"):
    simclr_tf.predict(_headless(pre, tmp_path), images[:2])


def _headless(pre, tmp_path):
  """An export of the pretrained network without its linear head."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from simclr_tf.models import simclr as simclr_lib  # pylint: disable=g-import-not-at-top
  from tf_hub_export.export import export_saved_model  # pylint: disable=g-import-not-at-top
  config = dataclasses.replace(pre.model.model_config, num_classes=0)
  net = simclr_lib.build_float32(config, 32)
  for v in net.variables:
    v.assign(dict((w.path, w) for w in pre.model.variables)[v.path])
  path = str(tmp_path / "headless")
  export_saved_model(net, path, 32)
  return path
