"""simclr_tf.deploy: LiteRT / ONNX files of a tiny export, checked against
the SavedModel with the runtimes themselves, and bad input refused."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import CIFAR10_CLASSES, snapshot

for _module in ("ai_edge_litert", "tf2onnx", "onnxruntime"):
  pytest.importorskip(
      _module, reason="the deploy extra is not installed: pip install -c "
      "requirements/constraints.txt -e '.[deploy]'")

# pylint: disable=g-import-not-at-top,wrong-import-position
from ai_edge_litert.interpreter import Interpreter
import onnxruntime

from simclr_tf import deploy
from simclr_tf.config import ModelConfig
from simclr_tf.models.simclr import build_float32
from tf_hub_export.export import export_saved_model

# One process runs this file's tests, so that its module fixtures (which
# export models) run once (`make test` distributes by xdist_group).
pytestmark = pytest.mark.xdist_group(__name__)

CLASSES = CIFAR10_CLASSES


@pytest.fixture(scope="module")
def classifier(small_classifier):
  return small_classifier


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """An export with no supervised head (what pretraining on unlabeled data
  writes)."""
  config = ModelConfig(resnet_depth=18, width_multiplier=0.25,
                       global_bn=False, proj_out_dim=16, num_classes=0)
  path = str(tmp_path_factory.mktemp("pre") / "saved_model")
  export_saved_model(build_float32(config, 32), path, 32,
                     train_mode="pretrain")
  return path


@pytest.fixture(scope="module")
def data():
  """40 bundled CIFAR-10 test images of every class, 30 train images."""
  test, labels = deploy.read_split("cifar10_sample", "", "test", 32)
  keep = np.sort(np.random.default_rng(1).choice(len(test), 40,
                                                 replace=False))
  train, _ = deploy.read_split("cifar10_sample", "", "train", 32, count=30)
  return test[keep], labels[keep], train


def _export(source, out, data, **kwargs):
  images, labels, train = data
  kwargs.setdefault("min_agreement", 0.0)
  return deploy.export(source, str(out), representative_images=train,
                       eval_images=images, eval_labels=labels, **kwargs)


@pytest.fixture(scope="module")
def exports(classifier, data, tmp_path_factory):
  """{(format, quantize): (folder, report)}, made on first use."""
  made = {}

  def get(export_format, quantize):
    key = (export_format, quantize)
    if key not in made:
      out = tmp_path_factory.mktemp("deploy") / f"{export_format}_{quantize}"
      made[key] = out, _export(classifier, out, data,
                               export_format=export_format, quantize=quantize)
    return made[key]
  return get


def _savedmodel(export, images):
  """Softmax probabilities and embedding of the SavedModel itself."""
  loaded = tf.saved_model.load(export)
  out = loaded.serve(tf.constant(images, tf.float32) / 255.0)
  return (tf.nn.softmax(out["logits_sup"]).numpy(),
          out["final_avg_pool"].numpy())


def _litert(path, images):
  interpreter = Interpreter(model_path=str(path))
  runner = interpreter.get_signature_runner()
  assert runner.get_input_details()["images"]["dtype"] == np.uint8
  out = runner(images=images)
  return out, interpreter


def _check_report(report, folder, images, labels, probs_sm, probs_conv):
  """The report's figures, recomputed from the two models' outputs."""
  assert json.loads((folder / deploy.REPORT_FILE).read_text()) == report
  model = folder / report["model_file"]
  assert report["file_bytes"] == os.path.getsize(model)
  assert report["image_size"] == 32
  assert report["input"] == {"name": "images", "dtype": "uint8",
                             "shape": [None, 32, 32, 3]}
  assert report["outputs"] == {"probabilities": [None, 10],
                               "embedding": [None, 128]}
  assert report["num_eval_images"] == len(images)
  assert report["top1_savedmodel"] == pytest.approx(
      np.mean(probs_sm.argmax(1) == labels))
  assert report["top1_converted"] == pytest.approx(
      np.mean(probs_conv.argmax(1) == labels))
  assert report["top1_agreement"] == pytest.approx(
      np.mean(probs_sm.argmax(1) == probs_conv.argmax(1)))
  assert report["max_probability_diff"] == pytest.approx(
      np.abs(probs_sm - probs_conv).max(), rel=1e-3, abs=1e-6)
  assert report["agreement_figure"] == "top1_agreement"
  assert 0 < report["latency_ms_per_image"] < 1000
  assert report["latency"]["threads"] == 1
  assert report["cpu"] == deploy.cpu.cpu_model()
  assert report["versions"]["tensorflow"] == tf.__version__
  names = (folder / deploy.CLASS_NAMES_FILE).read_text().splitlines()
  assert tuple(names) == CLASSES


def test_litert_float_equals_the_savedmodel(classifier, exports, data):
  folder, report = exports("litert", "none")
  images, labels, _ = data
  assert sorted(os.listdir(folder)) == sorted(
      ["model.tflite", "class_names.txt", "export_report.json"])
  out, _ = _litert(folder / "model.tflite", images)
  assert sorted(out) == ["embedding", "probabilities"]
  probs, emb = _savedmodel(classifier, images)
  np.testing.assert_allclose(out["probabilities"], probs, atol=1e-5)
  np.testing.assert_allclose(out["embedding"], emb, rtol=1e-4, atol=1e-5)
  _check_report(report, folder, images, labels, probs, out["probabilities"])
  assert report["top1_agreement"] == 1.0
  assert (report["format"], report["quantize"]) == ("litert", "none")
  assert "ai-edge-litert" in report["versions"]


def test_litert_dynamic_is_smaller_and_close(classifier, exports, data):
  folder, report = exports("litert", "dynamic")
  images, labels, _ = data
  out, _ = _litert(folder / "model_dynamic.tflite", images)
  probs, _ = _savedmodel(classifier, images)
  _check_report(report, folder, images, labels, probs, out["probabilities"])
  loaded = tf.saved_model.load(classifier)
  float_bytes = 4 * sum(int(np.prod(v.shape)) for v in loaded.variables)
  assert report["file_bytes"] < 0.4 * float_bytes
  assert report["embedding_min_cosine"] > 0.99


def test_litert_int8_is_full_integer(classifier, exports, data):
  folder, report = exports("litert", "int8")
  images, labels, train = data
  out, interpreter = _litert(folder / "model_int8.tflite", images)
  probs, emb = _savedmodel(classifier, images)
  _check_report(report, folder, images, labels, probs, out["probabilities"])
  assert report["representative_images"] == len(train)
  ops = interpreter._get_ops_details()  # pylint: disable=protected-access
  tensors = interpreter.get_tensor_details()
  convs = [o for o in ops if o["op_name"] == "CONV_2D"]
  assert convs and all(tensors[o["inputs"][0]]["dtype"] == np.int8
                       for o in convs)
  cos = np.sum(out["embedding"] * emb, 1) / (
      np.linalg.norm(out["embedding"], axis=1) * np.linalg.norm(emb, axis=1))
  assert report["embedding_min_cosine"] == pytest.approx(cos.min(), abs=1e-5)
  assert cos.min() > 0.9


def test_onnx_equals_the_savedmodel(classifier, exports, data):
  folder, report = exports("onnx", "none")
  images, labels, _ = data
  session = onnxruntime.InferenceSession(str(folder / "model.onnx"),
                                         providers=["CPUExecutionProvider"])
  (model_input,) = session.get_inputs()
  assert (model_input.name, model_input.type) == ("images", "tensor(uint8)")
  assert model_input.shape == ["batch", 32, 32, 3]
  names = [o.name for o in session.get_outputs()]
  out = dict(zip(names, session.run(names, {"images": images})))
  probs, emb = _savedmodel(classifier, images)
  np.testing.assert_allclose(out["probabilities"], probs, atol=1e-5)
  np.testing.assert_allclose(out["embedding"], emb, rtol=1e-4, atol=1e-5)
  _check_report(report, folder, images, labels, probs, out["probabilities"])
  assert {"tf2onnx", "onnx", "onnxruntime"} <= set(report["versions"])


def test_a_pretrain_export_gives_the_embedding_alone(pretrained, data,
                                                     tmp_path):
  out = tmp_path / "pre_litert"
  report = _export(pretrained, out, data)
  assert sorted(os.listdir(out)) == ["export_report.json", "model.tflite"]
  assert report["outputs"] == {"embedding": [None, 128]}
  assert report["class_names_file"] is None
  assert "top1_agreement" not in report and "top1_converted" not in report
  assert report["agreement_figure"] == "neighbour_agreement"
  result, _ = _litert(out / "model.tflite", data[0])
  assert sorted(result) == ["embedding"]
  loaded = tf.saved_model.load(pretrained)
  emb = loaded.serve(tf.constant(data[0], tf.float32) /
                     255.0)["final_avg_pool"].numpy()
  np.testing.assert_allclose(result["embedding"], emb, rtol=1e-4, atol=1e-5)
  same = deploy.nearest_neighbours(emb) == deploy.nearest_neighbours(
      result["embedding"])
  assert report["neighbour_agreement"] == pytest.approx(np.mean(same))


def test_nearest_neighbours_skip_the_image_itself():
  emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 1]], np.float32)
  np.testing.assert_array_equal(deploy.nearest_neighbours(emb, chunk=3),
                                [1, 0, 3, 2])


def _bad_inputs(classifier, pretrained, data, tmp_path):
  images, labels, train = data
  existing = tmp_path / "taken"
  existing.mkdir()
  (existing / "keep.txt").write_text("mine")
  new = str(tmp_path / "new")
  return {
      "format": (lambda: deploy.export(
          classifier, new, export_format="tflite", eval_images=images),
                 "--export_format='tflite' is not offered"),
      "quantize": (lambda: deploy.export(
          classifier, new, quantize="int4", eval_images=images),
                   "--quantize='int4' is not offered"),
      "int8 without data": (lambda: deploy.export(
          classifier, new, quantize="int8", eval_images=images),
                            "--quantize=int8 needs representative images"),
      "onnx int8": (lambda: deploy.export(
          classifier, new, export_format="onnx", quantize="int8",
          representative_images=train, eval_images=images),
                    "ONNX exports are float32"),
      "existing folder": (lambda: deploy.export(
          classifier, str(existing), eval_images=images),
                          "already exists and is not empty"),
      "probabilities of a pretrain export": (lambda: deploy.export(
          pretrained, new, eval_images=images,
          outputs=("probabilities", "embedding")),
                                             "has no supervised head"),
      "no eval images": (lambda: deploy.export(classifier, new),
                         "the check needs eval images"),
      "labels": (lambda: deploy.export(
          classifier, new, eval_images=images, eval_labels=labels[:3]),
                 "eval_labels has 3 labels for 40"),
      "min_agreement": (lambda: deploy.export(
          classifier, new, eval_images=images, min_agreement=98),
                        "--min_agreement=98 is not a fraction"),
      "not an export": (lambda: deploy.export(
          str(tmp_path / "nothing"), new, eval_images=images),
                        "is not a SavedModel"),
  }


@pytest.mark.parametrize("case", [
    "format", "quantize", "int8 without data", "onnx int8",
    "existing folder", "probabilities of a pretrain export",
    "no eval images", "labels", "min_agreement", "not an export"])
def test_bad_input_is_one_line_and_writes_nothing(case, classifier,
                                                  pretrained, data, tmp_path):
  call, expected = _bad_inputs(classifier, pretrained, data, tmp_path)[case]
  before = snapshot(tmp_path, dirs=True)
  with pytest.raises(deploy.DeployError) as error:
    call()
  message = str(error.value)
  assert expected in message and "\n" not in message
  assert snapshot(tmp_path, dirs=True) == before


def test_missing_extra_names_the_install_command(classifier, data, tmp_path,
                                                 monkeypatch):
  monkeypatch.setitem(__import__("sys").modules, "ai_edge_litert", None)
  assert deploy.missing_packages("litert") == ["ai-edge-litert"]
  with pytest.raises(deploy.DeployError, match=r"pip install"):
    _export(classifier, tmp_path / "out", data)
  assert not os.listdir(tmp_path)


def test_below_min_agreement_keeps_nothing(classifier, data, tmp_path,
                                           monkeypatch):
  """A converted model that disagrees (its classes shifted by one) fails the
  check: one line naming the figure, and no folder, temporary or final."""
  runner = deploy._Onnx  # pylint: disable=protected-access
  call = runner.__call__

  def shifted(self, images):
    out = call(self, images)
    return dict(out, probabilities=np.roll(out["probabilities"], 1, 1))

  monkeypatch.setattr(runner, "__call__", shifted)
  target = tmp_path / "parent" / "student_tflite"
  with pytest.raises(deploy.DeployError) as error:
    _export(classifier, target, data, export_format="onnx",
            min_agreement=0.98)
  message = str(error.value)
  assert "top1_agreement=0.0000 of 40" in message
  assert "--min_agreement=0.98" in message and "\n" not in message
  assert not os.listdir(tmp_path)   # not even the parent it had to make


def test_representative_sample_is_reproducible():
  images = np.arange(1000)[:, None, None, None] * np.ones([1, 2, 2, 3],
                                                          np.int64)
  a = deploy.representative_sample(images, 300, seed=0)
  b = deploy.representative_sample(images, 300, seed=0)
  c = deploy.representative_sample(images, 300, seed=1)
  rows = a[:, 0, 0, 0]
  assert a.shape == (300, 2, 2, 3) and np.array_equal(a, b)
  assert not np.array_equal(a, c)
  assert len(set(rows)) == 300 and np.all(np.diff(rows) > 0)
  assert deploy.representative_sample(images[:10], 300).shape[0] == 10


def test_prepare_images_takes_floats_and_other_sizes():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, [3, 32, 32, 3]).astype(np.uint8)
  assert deploy.prepare_images(images, 32) is images
  np.testing.assert_array_equal(
      deploy.prepare_images(images / 255.0, 32), images)
  assert deploy.prepare_images(images, 16).shape == (3, 16, 16, 3)
  with pytest.raises(deploy.DeployError, match="outside"):
    deploy.prepare_images(images * 2.0, 32)


def test_model_filenames():
  assert deploy.model_filename("litert") == "model.tflite"
  assert deploy.model_filename("litert", "int8") == "model_int8.tflite"
  assert deploy.model_filename("litert", "dynamic") == "model_dynamic.tflite"
  assert deploy.model_filename("onnx") == "model.onnx"


# --- The public API and run.py --mode=export -----------------------------------

def test_api_export_for_deployment_reads_the_splits(classifier, data,
                                                    tmp_path):
  import simclr_tf  # pylint: disable=g-import-not-at-top
  images, labels, train = data
  out = tmp_path / "litert"
  report = simclr_tf.export_for_deployment(
      classifier, out, train, np.zeros(len(train), np.int32),
      eval_data=images, eval_labels=labels, quantize="dynamic",
      min_agreement=0.9)
  assert report["representative_images"] == 0   # dynamic needs none
  with open(out / deploy.REPORT_FILE) as f:
    assert json.load(f)["top1_agreement"] == report["top1_agreement"]
  assert (out / deploy.model_filename("litert", "dynamic")).exists()
  with pytest.raises(simclr_tf.ArgumentError,
                     match="quantize='int4' is not allowed"):
    simclr_tf.export_for_deployment(classifier, tmp_path / "x", train,
                                    quantize="int4")
  with pytest.raises(simclr_tf.ArgumentError, match="data is None"):
    simclr_tf.export_for_deployment(classifier, tmp_path / "y")
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_command_line_export_int8_and_its_refusals(classifier, tmp_path):
  from conftest import run_cli  # pylint: disable=g-import-not-at-top
  out = tmp_path / "student"
  # This random head's classes are nearly tied, so int8 may flip some; the
  # agreement gate itself is test_below_min_agreement_keeps_nothing.
  proc = run_cli("--mode=export", f"--init_from={classifier}",
                 f"--model_dir={out}", "--quantize=int8", "--min_agreement=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / deploy.REPORT_FILE) as f:
    report = json.load(f)
  assert report["quantize"] == "int8" and report["representative_images"]
  assert (out / "model_int8.tflite").stat().st_size == report["file_bytes"]
  before = snapshot(out)
  for args, status, phrase in [
      ([f"--model_dir={out}"], 2, "already exists and is not empty"),
      ([f"--model_dir={tmp_path / 'o'}", "--export_format=onnx",
        "--quantize=int8"], 2, "ONNX exports are float32"),
      ([f"--model_dir={tmp_path / 'p'}", "--min_agreement=1.5"], 2,
       "--min_agreement=1.5 is outside"),
  ]:
    proc = run_cli("--mode=export", f"--init_from={classifier}", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status, proc.stderr[-2000:]
    assert lines[-1].startswith("run.py: error:") and phrase in lines[-1]
  assert snapshot(out) == before
  assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()
