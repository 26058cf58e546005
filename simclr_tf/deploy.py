"""Export for deployment: one self-contained LiteRT or ONNX file, checked.

  from simclr_tf import deploy
  train, _ = deploy.read_split("cifar10_sample", "", "train", 32, count=300)
  test, labels = deploy.read_split("cifar10_sample", "", "test", 32)
  report = deploy.export("runs/st/saved_model", "runs/st_int8",
                         export_format="litert", quantize="int8",
                         representative_images=train, eval_images=test,
                         eval_labels=labels)

`output_dir` (new) then holds:
  model.tflite, model_dynamic.tflite, model_int8.tflite or model.onnx
                      (`model_filename`): the network with its
                      preprocessing inside;
  class_names.txt     one name a line, in the order of `probabilities`
                      (when the export has class names);
  export_report.json  the check (below), the file's size, its latency and
                      the versions that wrote it.

The model takes images as an app has them: uint8 [N, H, W, 3] RGB at the
export's image size (input `images`), and converts them to float32 in
[0, 1] inside. Its outputs are named: `probabilities` (softmax of the
supervised head, float32 [N, classes]) and `embedding` (the encoder's
`final_avg_pool`, float32 [N, D]), or `embedding` alone for an export
without a supervised head. int8 is full-integer quantisation calibrated on
representative images (`representative_sample` chooses a few hundred
reproducibly); its input stays uint8 and its outputs float32.

Every export is checked before it is kept: the written file runs (LiteRT's
`ai_edge_litert` interpreter, or onnxruntime) beside the SavedModel on the
eval images. With a supervised head the gated figure is their top-1
agreement; without one, the agreement of each image's nearest neighbour
(cosine) among the eval images. Below `min_agreement` a `DeployError` names
the figure and nothing is kept: everything is built in a temporary folder
beside `output_dir` and renamed into place only after the check.

Needs the `deploy` extra (`pip install 'simclr-tf[deploy]'`): ai-edge-litert,
tf2onnx, onnx and onnxruntime.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import logging
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from simclr_tf import atomic
from simclr_tf import cpu

log = logging.getLogger("simclr_tf")

FORMATS = ("litert", "onnx")
QUANTIZE = ("none", "dynamic", "int8")
PROBABILITIES = "probabilities"
EMBEDDING = "embedding"
OUTPUTS = (PROBABILITIES, EMBEDDING)
INPUT_NAME = "images"
REPORT_FILE = "export_report.json"
CLASS_NAMES_FILE = "class_names.txt"
DEFAULT_MIN_AGREEMENT = 0.98
REPRESENTATIVE_COUNT = 300
ONNX_OPSET = 17
LATENCY_RUNS = 30
_BATCH = 64
_INSTALL = "pip install 'simclr-tf[deploy]' (or -e '.[deploy]' in a clone)"
# Python package behind each module the deploy extra brings.
_PACKAGES = {"ai_edge_litert": "ai-edge-litert", "tf2onnx": "tf2onnx",
             "onnx": "onnx", "onnxruntime": "onnxruntime"}


class DeployError(ValueError):
  """Bad input for the deployment export, or an export that failed its
  check; the message is one line naming the problem and the fix."""


class AgreementError(DeployError):
  """The converted model disagrees with the SavedModel beyond
  `min_agreement` (nothing was kept); run.py exits 4."""


# === Arguments ===============================================================

def model_filename(export_format: str, quantize: str = "none") -> str:
  """The model file's name: model.tflite, model_<quantize>.tflite or
  model.onnx."""
  check_options(export_format, quantize)
  if export_format == "onnx":
    return "model.onnx"
  return "model.tflite" if quantize == "none" else f"model_{quantize}.tflite"


def check_options(export_format: str, quantize: str = "none",
                  min_agreement: float = DEFAULT_MIN_AGREEMENT) -> None:
  """Raises DeployError for a format, quantisation or threshold not offered
  (cheap: call it before reading any data)."""
  if export_format not in FORMATS:
    raise DeployError(f"--export_format={export_format!r} is not offered; "
                      f"use one of: {', '.join(FORMATS)}.")
  if quantize not in QUANTIZE:
    raise DeployError(f"--quantize={quantize!r} is not offered; use one of: "
                      f"{', '.join(QUANTIZE)}.")
  if export_format == "onnx" and quantize != "none":
    raise DeployError(f"--quantize={quantize} is for --export_format=litert; "
                      "ONNX exports are float32 (use --quantize=none).")
  if not 0.0 <= float(min_agreement) <= 1.0:
    raise DeployError(f"--min_agreement={min_agreement} is not a fraction; "
                      f"give a value in [0, 1] (default "
                      f"{DEFAULT_MIN_AGREEMENT}).")


def missing_packages(export_format: str) -> list:
  """The deploy extra's packages that `export_format` needs and lacks."""
  modules = (("ai_edge_litert",) if export_format == "litert"
             else ("tf2onnx", "onnx", "onnxruntime"))
  missing = []
  for module in modules:
    try:
      importlib.import_module(module)
    except ImportError:
      missing.append(_PACKAGES[module])
  return missing


def _require(export_format: str) -> None:
  missing = missing_packages(export_format)
  if missing:
    raise DeployError(
        f"--export_format={export_format} needs {', '.join(missing)} (the "
        f"deploy extra), which is not installed; run: {_INSTALL}.")


# === Images ==================================================================

def prepare_images(images, image_size: int,
                   argument: str = "images") -> np.ndarray:
  """Images as the deployed model takes them: uint8 [N, S, S, 3].

  Args:
    images: [N, H, W, 3] (or [N, H, W, 1]) uint8, or floats in [0, 1].
      Images not already S x S get the evaluation preprocessing of
      training (centre crop unless small, resize), then are rounded to
      uint8.
    image_size: S, the export's image size.
    argument: the argument's name, for messages.
  Returns:
    uint8 [N, S, S, 3].
  """
  x = np.asarray(images)
  if x.ndim == 4 and x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if x.ndim != 4 or x.shape[-1] != 3 or not len(x):
    raise DeployError(f"{argument} must be images [N, H, W, 3] with N >= 1; "
                      f"received shape {list(x.shape)}.")
  if np.issubdtype(x.dtype, np.floating):
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
      raise DeployError(f"{argument} holds floats outside [0, 1]; give uint8 "
                        "images (0-255) or floats in [0, 1].")
  elif x.dtype != np.uint8:
    raise DeployError(f"{argument} has dtype {x.dtype}; give uint8 images or "
                      "floats in [0, 1].")
  if x.dtype == np.uint8 and x.shape[1:3] == (image_size, image_size):
    return x
  # pylint: disable=g-import-not-at-top
  from simclr_tf.data import augment
  out = np.empty([len(x), image_size, image_size, 3], np.uint8)
  for i, image in enumerate(x):
    view = augment.preprocess_for_eval(image, image_size, image_size)
    out[i] = np.round(view.numpy() * 255).astype(np.uint8)
  return out


def representative_sample(images: np.ndarray,
                          count: int = REPRESENTATIVE_COUNT,
                          seed: int = 0) -> np.ndarray:
  """`count` of `images` (all if fewer), chosen by `seed`, in index order."""
  images = np.asarray(images)
  if len(images) <= count:
    return images
  rng = np.random.default_rng(seed)
  return images[np.sort(rng.choice(len(images), size=count, replace=False))]


def read_split(dataset: str, data_dir: str, split: str, image_size: int,
               count: Optional[int] = None, seed: int = 0):
  """One split of a dataset as the deployed model takes it.

  Args:
    dataset: 'cifar10_sample', 'image_folder' or a TFDS name (as --dataset).
    data_dir: ROOT of an image folder, or the TFDS data directory.
    split: the split to read.
    image_size: the export's image size.
    count: read only this many examples, chosen by `seed` (None: all).
    seed: seed of the choice.
  Returns:
    (uint8 [N, S, S, 3] with the evaluation preprocessing, int32 labels [N]
    or None for unlabeled data), in index order; undecodable files are
    skipped.
  """
  # pylint: disable=g-import-not-at-top
  from simclr_tf.data import augment
  from simclr_tf.data import folder as folder_lib
  from simclr_tf.data import sources
  try:
    source = sources.open_source(dataset, data_dir, split)
  except ValueError as e:
    raise DeployError(str(e)) from e
  indices = np.arange(source.num_examples, dtype=np.int64)
  if count is not None and count < len(indices):
    indices = np.sort(np.random.default_rng(seed).choice(
        indices, size=count, replace=False))

  def view(contents, label):
    image = augment.preprocess_for_eval(
        folder_lib.decode_image_uint8(contents), image_size, image_size)
    return tf.cast(tf.round(image * 255.0), tf.uint8), label

  ds = source.encoded(indices).map(view, num_parallel_calls=tf.data.AUTOTUNE,
                                   deterministic=True)
  if not source.fully_decoded:
    ds = ds.ignore_errors()
  images, labels = [], []
  for image, label in ds.batch(256).as_numpy_iterator():
    images.append(image)
    labels.append(label)
  if not images:
    raise DeployError(f"no image of {source.name} could be read.")
  labels = np.concatenate(labels).astype(np.int32)
  return np.concatenate(images), (None if (labels < 0).all() else labels)


# === Conversion ==============================================================

@dataclasses.dataclass(frozen=True)
class _Source:
  """The SavedModel to convert, with the uint8 serving function around it."""

  holder: tf.Module          # tracks the loaded variables (for freezing)
  function: object           # tf.function: uint8 images -> named outputs
  spec: tf.TensorSpec
  outputs: tuple


def _load_source(init_from: str, image_size: int,
                 outputs: Sequence[str]) -> _Source:
  """Loads the export and wraps it: uint8 in, named float32 outputs."""
  # pylint: disable=g-import-not-at-top
  from tf_hub_export import load as load_lib
  loaded = tf.saved_model.load(load_lib.resolve_export(init_from))
  spec = tf.TensorSpec([None, image_size, image_size, 3], tf.uint8,
                       name=INPUT_NAME)

  def serve(images):
    out = loaded.serve(tf.cast(images, tf.float32) / 255.0)
    named = {EMBEDDING: out["final_avg_pool"]}
    if PROBABILITIES in outputs:
      named[PROBABILITIES] = tf.nn.softmax(out["logits_sup"])
    return named

  holder = tf.Module()
  holder.loaded = loaded
  function = tf.function(serve, input_signature=[spec])
  return _Source(holder, function, spec, tuple(outputs))


def _litert_converter(source: _Source, quantize: str,
                      representative: Optional[np.ndarray]):
  """The TFLite converter of the serving function, set for `quantize`."""
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [source.function.get_concrete_function()], source.holder)
  if quantize != "none":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  if quantize == "int8":
    # Full-integer: every op in int8, calibrated on the given images; the
    # uint8 input is cast inside, the outputs are dequantised to float32.
    converter.representative_dataset = lambda: (
        [image[None]] for image in representative)
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  return converter


def _convert_litert(source: _Source, quantize: str,
                    representative: Optional[np.ndarray]) -> bytes:
  """The TFLite flatbuffer of the serving function."""
  return _litert_converter(source, quantize, representative).convert()


def _convert_onnx(source: _Source) -> bytes:
  """The ONNX model of the serving function (tf2onnx), batch dim 'batch'."""
  import tf2onnx  # pylint: disable=g-import-not-at-top
  proto, _ = tf2onnx.convert.from_function(
      source.function, input_signature=[source.spec], opset=ONNX_OPSET)
  for value in list(proto.graph.input) + list(proto.graph.output):
    value.type.tensor_type.shape.dim[0].dim_param = "batch"
  return proto.SerializeToString()


def _convert(source: _Source, export_format: str, quantize: str,
             representative: Optional[np.ndarray]) -> bytes:
  """The converted model's bytes."""
  if export_format == "onnx":
    return _convert_onnx(source)
  return _convert_litert(source, quantize, representative)


# === Running a deployed model ================================================

class _LiteRT:
  """A .tflite file run with ai-edge-litert's interpreter."""

  def __init__(self, path: str, num_threads: Optional[int] = None):
    # pylint: disable=g-import-not-at-top
    from ai_edge_litert.interpreter import Interpreter
    self.interpreter = Interpreter(model_path=path, num_threads=num_threads)
    self.runner = self.interpreter.get_signature_runner()
    self.inputs = {name: np.dtype(d["dtype"]).name
                   for name, d in self.runner.get_input_details().items()}
    self.outputs = tuple(sorted(self.runner.get_output_details()))

  def __call__(self, images: np.ndarray) -> dict:
    return self.runner(**{INPUT_NAME: images})


class _Onnx:
  """A .onnx file run with onnxruntime on the CPU."""

  def __init__(self, path: str, num_threads: Optional[int] = None):
    import onnxruntime as ort  # pylint: disable=g-import-not-at-top
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if num_threads:
      options.intra_op_num_threads = num_threads
      options.inter_op_num_threads = 1
    self.session = ort.InferenceSession(path, options,
                                        providers=["CPUExecutionProvider"])
    # ONNX type strings: 'tensor(uint8)'.
    self.inputs = {i.name: i.type[len("tensor("):-1]
                   for i in self.session.get_inputs()}
    self.outputs = tuple(sorted(o.name for o in self.session.get_outputs()))

  def __call__(self, images: np.ndarray) -> dict:
    names = [o.name for o in self.session.get_outputs()]
    return dict(zip(names, self.session.run(names, {INPUT_NAME: images})))


def load(path: str, num_threads: Optional[int] = None) -> Callable:
  """A deployed model file as a function: uint8 [N, S, S, 3] -> {name:
  float32 array}.

  Args:
    path: a model.tflite / model_*.tflite or model.onnx written by `export`.
    num_threads: CPU threads (None: the runtime's default).
  """
  fmt = "onnx" if path.endswith(".onnx") else "litert"
  _require(fmt)
  return _Onnx(path, num_threads) if fmt == "onnx" else _LiteRT(
      path, num_threads)


def run_batches(fn: Callable, images: np.ndarray,
                batch_size: int = _BATCH) -> dict:
  """{name: [N, ...]} of `fn` over `images`, `batch_size` at a time."""
  parts = {}
  for start in range(0, len(images), batch_size):
    for name, value in fn(images[start:start + batch_size]).items():
      parts.setdefault(name, []).append(np.asarray(value, np.float32))
  return {name: np.concatenate(values) for name, values in parts.items()}


def latency_ms(fn: Callable, image: np.ndarray,
               runs: int = LATENCY_RUNS) -> float:
  """Median milliseconds of `fn` on one image (batch 1), after a warm-up."""
  batch = image[None]
  for _ in range(3):
    fn(batch)
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn(batch)
    times.append(time.perf_counter() - start)
  return 1000.0 * float(np.median(times))


# === The check ===============================================================

def nearest_neighbours(embedding: np.ndarray, chunk: int = 1024) -> np.ndarray:
  """Each row's most cosine-similar other row (index), [N]."""
  unit = embedding / np.maximum(
      np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
  nearest = np.empty([len(unit)], np.int64)
  for start in range(0, len(unit), chunk):
    sim = unit[start:start + chunk] @ unit.T      # [chunk, N]
    rows = np.arange(sim.shape[0])
    sim[rows, start + rows] = -np.inf             # not itself
    nearest[start:start + chunk] = sim.argmax(axis=1)
  return nearest


def compare(reference: dict, converted: dict,
            labels: Optional[np.ndarray] = None) -> dict:
  """The check's figures: converted model vs SavedModel on the same images.

  Args:
    reference, converted: {name: [N, ...]} outputs of the two.
    labels: int labels [N], or None.
  Returns:
    With probabilities: top1_agreement, max_probability_diff, and with
    labels top1_savedmodel and top1_converted; always the embedding's
    embedding_max_abs_diff, embedding_min_cosine and neighbour_agreement
    (None for a single image); `agreement` is the gated figure.
  """
  a, b = reference[EMBEDDING], converted[EMBEDDING]
  cos = np.sum(a * b, axis=1) / np.maximum(
      np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
  figures = {"num_eval_images": int(len(a)),
             "embedding_max_abs_diff": float(np.abs(a - b).max()),
             "embedding_min_cosine": float(cos.min()),
             "neighbour_agreement": None}
  if len(a) > 1:
    figures["neighbour_agreement"] = float(np.mean(
        nearest_neighbours(a) == nearest_neighbours(b)))
  figures["agreement"] = figures["neighbour_agreement"]
  figures["agreement_figure"] = "neighbour_agreement"
  if PROBABILITIES in reference:
    p, q = reference[PROBABILITIES], converted[PROBABILITIES]
    top_p, top_q = p.argmax(axis=1), q.argmax(axis=1)
    figures["top1_agreement"] = float(np.mean(top_p == top_q))
    figures["max_probability_diff"] = float(np.abs(p - q).max())
    if labels is not None:
      figures["top1_savedmodel"] = float(np.mean(top_p == labels))
      figures["top1_converted"] = float(np.mean(top_q == labels))
    figures["agreement"] = figures["top1_agreement"]
    figures["agreement_figure"] = "top1_agreement"
  return figures


def _versions(export_format: str) -> dict:
  modules = (("ai_edge_litert",) if export_format == "litert"
             else ("tf2onnx", "onnx", "onnxruntime"))
  versions = {"tensorflow": tf.__version__}
  for module in modules:
    versions[_PACKAGES[module]] = importlib.metadata.version(_PACKAGES[module])
  return versions


# === Export ==================================================================

def _check_output_dir(output_dir: str) -> None:
  if not output_dir:
    raise DeployError("no output folder given; give a new folder "
                      "(--model_dir) for the deployed model.")
  if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or
                                     os.listdir(output_dir)):
    raise DeployError(
        f"the output folder {output_dir} already exists and is not empty; "
        "give a new folder (nothing is ever overwritten).")


def _outputs(meta, outputs: Optional[Sequence[str]], init_from: str) -> tuple:
  has_head = bool(meta.model_config.num_classes)
  if outputs is None:
    return OUTPUTS if has_head else (EMBEDDING,)
  outputs = tuple(outputs)
  unknown = [o for o in outputs if o not in OUTPUTS]
  if unknown or not outputs:
    raise DeployError(f"outputs={list(outputs)} is not allowed; choose from "
                      f"{', '.join(OUTPUTS)}.")
  if EMBEDDING not in outputs:
    raise DeployError("outputs must include 'embedding' (every deployed "
                      "model gives it).")
  if PROBABILITIES in outputs and not has_head:
    raise DeployError(
        f"--init_from={init_from!r} has no supervised head, so it has no "
        "class probabilities; export a fine-tuned or distilled model, or ask "
        "for the embedding alone.")
  return OUTPUTS if PROBABILITIES in outputs else (EMBEDDING,)


def _labels(eval_labels, count: int, num_classes: int):
  if eval_labels is None:
    return None
  labels = np.asarray(eval_labels).reshape(-1)
  if len(labels) != count:
    raise DeployError(f"eval_labels has {len(labels)} labels for {count} "
                      "eval images; give one label per image.")
  if (labels < 0).all():
    return None
  if num_classes and ((labels < 0) | (labels >= num_classes)).any():
    raise DeployError(f"eval_labels holds labels outside 0-{num_classes - 1}"
                      f" (the export has {num_classes} classes).")
  return labels.astype(np.int64)


def _read_meta(init_from: str):
  # pylint: disable=g-import-not-at-top
  from tf_hub_export import load as load_lib
  try:
    return load_lib.read_meta(init_from, "init_from")
  except load_lib.ExportError as e:
    raise DeployError(str(e)) from e


def _fail_message(figures: dict, request) -> str:
  name, value = figures["agreement_figure"], figures["agreement"]
  # More calibration images do not help int8: its misses are the rounding
  # of near-ties (benchmarks/results/small_student_int8_notes_2026-12-03.md).
  hint = ("try --quantize=dynamic" if request.quantize == "int8"
          else "report it with these figures")
  return (f"the {request.export_format} {request.quantize} export agrees "
          f"with the SavedModel on {name}={value:.4f} of "
          f"{figures['num_eval_images']} eval images, below "
          f"--min_agreement={request.min_agreement:g}; nothing was kept "
          f"({hint}, or lower --min_agreement).")


@dataclasses.dataclass(frozen=True)
class _Request:
  """An export's arguments, checked and prepared."""

  init_from: str
  meta: object               # tf_hub_export.export.ExportMeta
  export_format: str
  quantize: str
  outputs: tuple
  images: np.ndarray         # uint8 [N, S, S, 3]
  labels: Optional[np.ndarray]
  representative: Optional[np.ndarray]
  min_agreement: float
  threads: int


def _request(init_from, output_dir, export_format, quantize,
             representative_images, eval_images, eval_labels, min_agreement,
             outputs, threads) -> _Request:
  """Checks every argument (cheapest first) and prepares the images."""
  check_options(export_format, quantize, min_agreement)
  _check_output_dir(output_dir)
  meta = _read_meta(init_from)
  outputs = _outputs(meta, outputs, init_from)
  if quantize == "int8" and (representative_images is None or
                             not len(representative_images)):
    raise DeployError(
        "--quantize=int8 needs representative images to calibrate on (a few "
        "hundred training images: give the training data), or use "
        "--quantize=dynamic.")
  if eval_images is None:
    raise DeployError("the check needs eval images (the eval split) to run "
                      "the export beside the SavedModel; give them.")
  _require(export_format)
  images = prepare_images(eval_images, meta.image_size, "eval_images")
  if PROBABILITIES not in outputs and len(images) < 2:
    raise DeployError("the check of an embedding needs at least 2 eval "
                      "images (it compares nearest neighbours); give more.")
  representative = None
  if quantize == "int8":
    representative = prepare_images(representative_images, meta.image_size,
                                    "representative_images")
  return _Request(
      init_from=init_from, meta=meta, export_format=export_format,
      quantize=quantize, outputs=outputs, images=images,
      labels=_labels(eval_labels, len(images), meta.model_config.num_classes),
      representative=representative, min_agreement=float(min_agreement),
      threads=int(threads))


def _check_interface(deployed, request: _Request) -> None:
  """DeployError unless the file takes uint8 `images` and gives the asked
  outputs, named."""
  found = (deployed.inputs, deployed.outputs)
  wanted = ({INPUT_NAME: "uint8"}, tuple(sorted(request.outputs)))
  if found != wanted:
    raise DeployError(
        f"the converted {request.export_format} model has inputs "
        f"{found[0]} and outputs {list(found[1])}, not {wanted[0]} and "
        f"{list(wanted[1])}; nothing was kept (report this with the "
        "versions of the deploy extra).")


def _build(staging: str, request: _Request, source: _Source,
           reference: dict, start: float) -> dict:
  """Converts into `staging`, checks the file, writes the rest: the report.

  Raises DeployError (and so keeps nothing) when the check fails.
  """
  os.makedirs(staging)
  path = os.path.join(staging, model_filename(request.export_format,
                                              request.quantize))
  with open(path, "wb") as f:
    f.write(_convert(source, request.export_format, request.quantize,
                     request.representative))
  deployed = load(path)
  _check_interface(deployed, request)
  figures = compare(reference, run_batches(deployed, request.images),
                    request.labels)
  if figures["agreement"] < request.min_agreement:
    raise AgreementError(_fail_message(figures, request))
  latency = latency_ms(load(path, request.threads), request.images[0])
  report = _report(request, reference, figures, path, latency,
                   time.time() - start)
  if request.meta.class_names:
    with open(os.path.join(staging, CLASS_NAMES_FILE), "w",
              encoding="utf-8") as f:
      f.writelines(f"{name}\n" for name in request.meta.class_names)
  with open(os.path.join(staging, REPORT_FILE), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  return report


def export(init_from: str, output_dir: str, *, export_format: str = "litert",
           quantize: str = "none",
           representative_images: Optional[np.ndarray] = None,
           eval_images: Optional[np.ndarray] = None,
           eval_labels: Optional[np.ndarray] = None,
           min_agreement: float = DEFAULT_MIN_AGREEMENT,
           outputs: Optional[Sequence[str]] = None,
           num_threads_latency: int = 1) -> dict:
  """Exports a SavedModel of ours to one deployable file, checked.

  Args:
    init_from: an export of ours (a stage's saved_model/ or an import).
    output_dir: the folder to create (it must not exist, or be empty).
    export_format: 'litert' (.tflite) or 'onnx'.
    quantize: 'none' (float32), 'dynamic' (int8 weights) or 'int8' (full
      integer; LiteRT only).
    representative_images: images to calibrate int8 on (a few hundred
      training images, e.g. `representative_sample(train_images)`).
    eval_images: the images of the check (uint8 or floats in [0, 1], any
      size: see `prepare_images`).
    eval_labels: their int labels (optional: adds the top-1 of both).
    min_agreement: the least agreement with the SavedModel to keep the
      export (top-1 agreement, or neighbour agreement without a head).
    outputs: the outputs to give, from ('probabilities', 'embedding');
      None: all the export has.
    num_threads_latency: threads of the latency measurement.
  Returns:
    The report (also written to output_dir/export_report.json).
  Raises:
    DeployError: bad input or a failed check; nothing is written.
  """
  request = _request(init_from, output_dir, export_format, quantize,
                     representative_images, eval_images, eval_labels,
                     min_agreement, outputs, num_threads_latency)
  start = time.time()
  source = _load_source(init_from, request.meta.image_size,
                        request.outputs)
  reference = run_batches(source.function, request.images)
  reports = []
  _write_new_dir(output_dir, lambda staging: reports.append(
      _build(staging, request, source, reference, start)))
  log.info("Deployable model in %s: %s", output_dir, summary_line(reports[0]))
  return reports[0]


def _write_new_dir(output_dir: str, write: Callable[[str], None]) -> None:
  """`atomic.write_dir` without replacing; a parent folder it had to create
  is removed again when the write fails."""
  parent = os.path.dirname(os.path.abspath(output_dir))
  created = []
  while not os.path.exists(parent):
    created.append(parent)
    parent = os.path.dirname(parent)
  try:
    atomic.write_dir(output_dir, write, replace=False)
  except FileExistsError as e:
    raise DeployError(f"the output folder {output_dir} appeared during the "
                      "export; give a new folder (nothing was overwritten)."
                      ) from e
  except BaseException:
    for folder in created:    # deepest first; only if still empty
      try:
        os.rmdir(folder)
      except OSError:
        pass
    raise


def _report(request: _Request, reference: dict, figures: dict, path: str,
            latency: float, seconds: float) -> dict:
  """The content of export_report.json."""
  # pylint: disable=g-import-not-at-top
  from tf_hub_export import load as load_lib
  meta, size = request.meta, request.meta.image_size
  return {
      "init_from": os.path.abspath(request.init_from),
      "format": request.export_format,
      "quantize": request.quantize,
      "model_file": os.path.basename(path),
      "file_bytes": os.path.getsize(path),
      "savedmodel_bytes": atomic.folder_bytes(
          load_lib.resolve_export(request.init_from)),
      "image_size": size,
      "input": {"name": INPUT_NAME, "dtype": "uint8",
                "shape": [None, size, size, 3]},
      "outputs": {name: [None, int(value.shape[1])]
                  for name, value in reference.items()},
      "class_names_file": CLASS_NAMES_FILE if meta.class_names else None,
      "representative_images": (0 if request.representative is None
                                else int(len(request.representative))),
      **figures,
      "min_agreement": request.min_agreement,
      "latency_ms_per_image": round(latency, 4),
      "latency": {"batch": 1, "threads": request.threads,
                  "runs": LATENCY_RUNS, "statistic": "median"},
      "cpu": cpu.cpu_model(),
      "versions": _versions(request.export_format),
      "seconds": round(seconds, 2),
  }


def summary_line(report: dict) -> str:
  """One line: format, top-1 (or agreement), size and latency."""
  parts = [f"{report['format']} {report['quantize']}"]
  if report.get("top1_converted") is not None:
    parts.append(f"top-1 {100 * report['top1_converted']:.1f}% (SavedModel "
                 f"{100 * report['top1_savedmodel']:.1f}%)")
  if report.get("agreement") is not None:
    parts.append(f"{report['agreement_figure']} "
                 f"{100 * report['agreement']:.1f}%")
  parts.append(f"{report['file_bytes'] / 1e6:.2f} MB")
  parts.append(f"{report['latency_ms_per_image']:.2f} ms/image "
               f"({report['latency']['threads']} thread)")
  return ", ".join(parts)
