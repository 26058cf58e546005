"""--mode=embed / --mode=predict (simclr_tf.inference) on real images."""

import csv
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import CIFAR10_CLASSES, ROOT, run_cli
from simclr_tf import inference
from simclr_tf.config import ModelConfig
from simclr_tf.data import augment, folder
from simclr_tf.models.simclr import build_float32
from tf_hub_export.export import export_saved_model

SAMPLE = os.path.join(ROOT, "simclr_tf", "data", "cifar10_sample", "test")
CLASSES = CIFAR10_CLASSES[:3]   # the folders of the test data


@pytest.fixture(scope="module")
def export_dir(small_classifier):
  return small_classifier


@pytest.fixture
def images(tmp_path):
  """ROOT/test/<class>/ with 4 real images each and one unreadable file."""
  root = tmp_path / "data"
  for name in CLASSES:
    (root / "test" / name).mkdir(parents=True)
    for f in sorted(os.listdir(os.path.join(SAMPLE, name)))[:4]:
      shutil.copy(os.path.join(SAMPLE, name, f), root / "test" / name / f)
  (root / "test" / "bird" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  return str(root)


def _expected(export, paths, key):
  loaded = tf.saved_model.load(export)
  batch = tf.stack([augment.preprocess_for_eval(
      folder.decode_image(tf.io.read_file(p)), 32, 32) for p in paths])
  return loaded.serve(batch)[key].numpy()


def test_embed_writes_rows_in_file_order_and_lists_skipped(export_dir, images,
                                                           tmp_path):
  out = tmp_path / "out"
  result = inference.run("embed", export_dir, images, "test", str(out),
                         batch_size=5)
  files = open(out / "embeddings_files.txt").read().splitlines()
  emb = np.load(out / "embeddings.npy")
  assert len(files) == 12 and emb.shape == (12, 128)   # 512 x 0.25
  listing = folder.list_image_folder(images, "test")
  assert tuple(files) == listing.paths == result.files
  np.testing.assert_allclose(emb[[0, 7, 11]], _expected(
      export_dir, [files[0], files[7], files[11]], "final_avg_pool"),
                             rtol=1e-4, atol=1e-5)
  skipped = open(out / "skipped.txt").read()
  assert "broken.jpg" in skipped and len(result.skipped) == 1


def test_embed_csv_has_a_header_and_one_row_per_file(export_dir, images,
                                                     tmp_path):
  inference.run("embed", export_dir, images, "test", str(tmp_path / "o"),
                output_format="csv")
  rows = list(csv.reader(open(tmp_path / "o" / "embeddings.csv")))
  assert rows[0][:2] == ["file", "f0"] and len(rows[0]) == 129
  assert len(rows) == 13 and rows[1][0].endswith(".jpg")


def test_predict_writes_top5_with_the_export_class_names(export_dir, images,
                                                         tmp_path):
  inference.run("predict", export_dir, images, "test", str(tmp_path / "p"))
  rows = list(csv.reader(open(tmp_path / "p" / "predictions.csv")))
  assert rows[0] == ["file"] + [f"{c}{k}" for k in range(1, 6)
                                for c in ("top", "p")]
  assert len(rows) == 13
  logits = _expected(export_dir, [rows[1][0]], "logits_sup")[0]
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  order = np.argsort(-probs)[:5]      # 10 classes: the top 5
  assert rows[1][1::2] == [CIFAR10_CLASSES[c] for c in order]
  np.testing.assert_allclose([float(p) for p in rows[1][2::2]], probs[order],
                             atol=1e-5)


def test_missing_or_foreign_export_is_a_clear_error(images, tmp_path):
  with pytest.raises(inference.InferenceError, match="not a SavedModel"):
    inference.run("embed", str(tmp_path / "nothing"), images, "test",
                  str(tmp_path / "o"))
  foreign = str(tmp_path / "foreign")
  module = tf.Module()
  module.f = tf.function(lambda x: x, input_signature=[tf.TensorSpec([None])])
  tf.saved_model.save(module, foreign)
  with pytest.raises(inference.InferenceError, match="not written by"):
    inference.run("embed", foreign, images, "test", str(tmp_path / "o"))
  assert not os.path.exists(tmp_path / "o")


def test_predict_needs_a_supervised_head(images, tmp_path):
  model = build_float32(ModelConfig(resnet_depth=18, width_multiplier=0.25,
                                  global_bn=False, proj_out_dim=16), 32)
  out = str(tmp_path / "pre")
  export_saved_model(model, out, 32)
  with pytest.raises(inference.InferenceError, match="no supervised head"):
    inference.run("predict", out, images, "test", str(tmp_path / "o"))


# Slow: two run.py processes (about 16 s); inference.run, which they call,
# is tested in-process above.
@pytest.mark.slow
def test_command_line_predict_and_a_foreign_export(export_dir, images,
                                                   tmp_path):
  ok = run_cli("--mode=predict", f"--init_from={export_dir}",
               "--dataset=image_folder", f"--data_dir={images}",
               f"--model_dir={tmp_path / 'p'}")
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert len(open(tmp_path / "p" / "predictions.csv").readlines()) == 13
  foreign = str(tmp_path / "foreign")
  module = tf.Module()
  module.f = tf.function(lambda x: x, input_signature=[tf.TensorSpec([None])])
  tf.saved_model.save(module, foreign)
  # (A missing export is refused in-process above, with the same error.)
  bad = run_cli("--mode=embed", f"--init_from={foreign}",
                "--dataset=image_folder", f"--data_dir={images}",
                f"--model_dir={tmp_path / 'e'}")
  assert bad.returncode == 2
  errors = [l for l in bad.stderr.splitlines() if l.startswith("run.py: ")]
  assert len(errors) == 1 and foreign in errors[0], bad.stderr[-2000:]
  assert not os.path.exists(tmp_path / "e" / "embeddings.npy")
