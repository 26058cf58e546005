"""The Python API: SimCLRv2's three stages, evaluation, embedding, prediction,
importing the released checkpoints and loading exports, as functions.

  import simclr_tf
  pre = simclr_tf.pretrain("cifar10_sample", model_dir="runs/pre")
  ft = simclr_tf.finetune("cifar10_sample", init_from=pre.export_path,
                          label_fraction=0.1, model_dir="runs/ft")
  student = simclr_tf.distill("cifar10_sample", teacher=ft.export_path,
                              width_multiplier=0.5, model_dir="runs/st")
  simclr_tf.evaluate(student.export_path, "cifar10_sample")

Every keyword option is the command-line flag of the same name
(`python run.py --helpfull`, or the fields of `simclr_tf.Config`), so a
recipe moves between the CLI and Python unchanged; the CLI is a thin
adaptor over `run`. `data` is an image folder (ROOT/<split>/<class>/<image>
or ROOT/<split>/<image>), 'cifar10_sample' (bundled), a TFDS name, a
`tf.data.Dataset`, or NumPy images with optional `labels`.

A bad argument raises `ValueError` (`ArgumentError`) naming it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
from typing import Any, Optional

import numpy as np

from simclr_tf import config as config_lib
from simclr_tf.config import Config, ConfigError
from simclr_tf.data import BUNDLED_DATASET, IMAGE_FOLDER

log = logging.getLogger("simclr_tf")

# Config fields that the functions set from their own arguments.
_SET_BY_FUNCTION = ("mode", "train_mode", "model_dir", "dataset", "teacher",
                    "init_from")
_OPTIONS = tuple(f.name for f in dataclasses.fields(Config)
                 if f.name not in _SET_BY_FUNCTION)
# Flags whose Python argument has another name.
_ARGUMENT_OF_FLAG = {"dataset": "data", "data_dir": "data"}


class ArgumentError(ConfigError):
  """A bad argument of the Python API; the message names the argument."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What a training stage gives back.

  Attributes:
    model: the trained network, a `keras.Model` (`simclr_tf.SimCLR`) whose
      call returns a dict of named outputs.
    metrics: global_step, train_seconds and, when evaluated, the eval
      split's top1, top5 and loss (what model_dir/result.json records).
    export_path: the reusable SavedModel the next stage takes.
    model_dir: the run's folder (checkpoints, TensorBoard logs, records).
    preempted: stopped by SIGTERM after saving a checkpoint (call again
      with the same arguments to continue).
  """

  model: Any
  metrics: dict
  export_path: str
  model_dir: str
  preempted: bool = False


# === Errors ==================================================================

def _as_argument_error(error: Exception) -> ArgumentError:
  """The same message, naming Python arguments instead of --flags."""
  def name(match):
    flag = match.group(1)
    return _ARGUMENT_OF_FLAG.get(flag, flag)
  message = re.sub(r"--no([a-z_]+)\b", r"\1=False", str(error))
  return ArgumentError(re.sub(r"--([a-z_]+)", name, message))


def _call(fn, *args, **kwargs):
  """Runs `fn`, turning the library's one-line errors into ArgumentError."""
  # pylint: disable=g-import-not-at-top
  from simclr_tf.deploy import DeployError
  from simclr_tf.inference import InferenceError
  from tf_hub_export.load import ExportError
  try:
    return fn(*args, **kwargs)
  except ArgumentError:
    raise
  except (ConfigError, InferenceError, ExportError, DeployError) as e:
    raise _as_argument_error(e) from e


# === Data ====================================================================

def _uint8_images(images, argument: str) -> np.ndarray:
  """[N, H, W, 3] uint8 from uint8 (0-255) or float (0-1) images."""
  x = np.asarray(images)
  if x.ndim == 4 and x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ArgumentError(
        f"{argument} must be images [N, H, W, 3] (or [N, H, W, 1]); received "
        f"shape {list(x.shape)}.")
  if x.dtype == np.uint8:
    return x
  if np.issubdtype(x.dtype, np.floating):
    if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 1 or
                   not np.isfinite(x).all()):
      raise ArgumentError(
          f"{argument} holds floats outside [0, 1]; give uint8 images (0-255) "
          "or floats in [0, 1].")
    return np.round(x * 255).astype(np.uint8)
  if np.issubdtype(x.dtype, np.integer):
    if x.size and (x.min() < 0 or x.max() > 255):
      raise ArgumentError(f"{argument} holds integers outside 0-255.")
    return x.astype(np.uint8)
  raise ArgumentError(f"{argument} has dtype {x.dtype}; give uint8 images "
                      "or floats in [0, 1].")


def _from_dataset(ds, argument: str):
  """(images, labels or None) of a finite tf.data.Dataset, read once."""
  images, labels = [], []
  for element in ds.as_numpy_iterator():
    if isinstance(element, dict):
      if "image" not in element:
        raise ArgumentError(f"{argument}: dict elements need an 'image' key; "
                            f"received keys {sorted(element)}.")
      image, label = element["image"], element.get("label")
    elif isinstance(element, tuple):
      image, label = element[0], element[1] if len(element) > 1 else None
    else:
      image, label = element, None
    images.append(np.asarray(image))
    labels.append(label)
  if not images:
    raise ArgumentError(f"{argument} is an empty dataset.")
  batched = images[0].ndim == 4
  stack = np.concatenate if batched else np.stack
  has_labels = labels[0] is not None
  y = (np.concatenate([np.reshape(l, [-1]) for l in labels]) if has_labels
       else None)
  return stack(images), y


def _arrays(data, labels, argument: str):
  if hasattr(data, "as_numpy_iterator"):       # a tf.data.Dataset
    if labels is not None:
      raise ArgumentError(f"labels= is for NumPy images; a dataset given as "
                          f"{argument} carries its own labels.")
    data, labels = _from_dataset(data, argument)
  return _uint8_images(data, argument), labels


def _is_in_memory(data) -> bool:
  return not isinstance(data, str)


def _data_options(data, labels, eval_data, eval_labels, options: dict,
                  class_names=()) -> dict:
  """Config values (dataset, data_dir) for `data`."""
  # pylint: disable=g-import-not-at-top
  from simclr_tf.data import sources
  if isinstance(data, os.PathLike):
    data = os.fspath(data)
  if not _is_in_memory(data):
    if labels is not None or eval_data is not None:
      raise ArgumentError(
          "labels= and eval_data= are for in-memory images; an image folder "
          "or dataset name brings its own labels and splits.")
    if data == BUNDLED_DATASET:
      return {"dataset": BUNDLED_DATASET, "data_dir": ""}
    if os.path.isdir(data):
      return {"dataset": IMAGE_FOLDER, "data_dir": data}
    if os.sep in data or data.startswith("."):
      raise ArgumentError(f"data={data!r} is not a folder; give an image "
                          "folder ROOT, 'cifar10_sample' or a TFDS name.")
    return {"dataset": data, "data_dir": options.get("data_dir", "")}
  if data is None:
    raise ArgumentError("data is None; give an image folder, a dataset name, "
                        "a tf.data.Dataset or NumPy images.")
  train_split = options.get("train_split", "train")
  eval_split = options.get("eval_split", "test")
  splits = {train_split: _arrays(data, labels, "data")}
  if eval_data is not None:
    splits[eval_split] = _arrays(eval_data, eval_labels, "eval_data")
  elif eval_labels is not None:
    raise ArgumentError("eval_labels= needs eval_data=.")
  try:
    memory = sources.InMemoryData(splits, class_names=class_names)
  except ValueError as e:
    raise ArgumentError(str(e)) from e
  return {"dataset": memory, "data_dir": ""}


# === Configurations ==========================================================

def _check_options(options: dict) -> None:
  for name in options:
    if name in _SET_BY_FUNCTION:
      raise ArgumentError(f"{name} is not an option here; it is set by the "
                          "function called (or its own argument).")
    if name not in _OPTIONS:
      raise ArgumentError(
          f"Unknown argument {name}=; the options are the command-line flags "
          "(see `simclr_tf.Config`).")


def _model_dir(model_dir: Optional[str], stage: str) -> str:
  if model_dir:
    return os.fspath(model_dir)
  path = tempfile.mkdtemp(prefix=f"simclr_tf_{stage}_")
  log.info("model_dir=None: writing the %s run to %s", stage, path)
  return path


def _inherited(options: dict, init_from: str, teacher: str) -> dict:
  """Options left out that the run takes from the export it starts from:
  the architecture from `init_from`, the image size from it or the
  teacher."""
  # pylint: disable=g-import-not-at-top
  from simclr_tf.models.config import fields_of_kind
  values = {}
  source = init_from or teacher
  if not source:
    return values
  meta = _meta(source, "init_from" if init_from else "teacher")
  if "image_size" not in options:
    values["image_size"] = meta.image_size
  if init_from:
    for name in fields_of_kind("arch"):
      if name not in options:
        values[name] = getattr(meta.model_config, name)
  return values


def _train_config(train_mode: str, data, labels, eval_data, eval_labels,
                  model_dir, options, **stage_values) -> Config:
  _check_options(options)
  values = _inherited(options, stage_values.get("init_from", ""),
                      stage_values.get("teacher", ""))
  values.update(options)
  values.update(_data_options(data, labels, eval_data, eval_labels, options))
  values.update(stage_values)
  cfg = Config(mode="train", train_mode=train_mode,
               model_dir=_model_dir(model_dir, train_mode), **values)
  return config_lib.validate(cfg)


def _train(cfg: Config) -> TrainResult:
  # pylint: disable=g-import-not-at-top
  from simclr_tf import runner
  outcome = runner.train_stage(cfg, evaluate=None)
  return TrainResult(model=outcome.net, metrics=outcome.metrics,
                     export_path=outcome.export_path,
                     model_dir=outcome.model_dir,
                     preempted=outcome.preempted)


# === Stages ==================================================================

def pretrain(data, labels=None, *, model_dir: Optional[str] = None,
             eval_data=None, eval_labels=None, **options) -> TrainResult:
  """Stage 1: contrastive pretraining (NT-Xent on two augmented views).

  Labels are never used by the contrastive loss; when the data has them, a
  linear classifier trains beside it on the stop-gradient features
  (`lineareval_while_pretraining`) and is evaluated on the eval split.

  Args:
    data: an image folder, 'cifar10_sample', a TFDS name, a
      `tf.data.Dataset` or NumPy images [N, H, W, 3] (uint8, or floats in
      [0, 1]).
    labels: int labels [N] of NumPy `data` (optional).
    model_dir: the run's folder (None: a new temporary folder). Calling
      again with the same folder resumes from its newest checkpoint.
    eval_data, eval_labels: in-memory images (and labels) to evaluate on.
    **options: run options named as the command-line flags, e.g.
      resnet_depth, width_multiplier, sk_ratio, image_size, train_epochs,
      train_steps, train_batch_size, learning_rate, temperature, seed.
  Returns:
    A `TrainResult`.
  Raises:
    ArgumentError (a ValueError): a bad argument, named.
  """
  return _call(lambda: _train(_train_config(
      "pretrain", data, labels, eval_data, eval_labels, model_dir, options)))


def finetune(data, labels=None, *, init_from: Optional[str] = None,
             model_dir: Optional[str] = None, eval_data=None,
             eval_labels=None, **options) -> TrainResult:
  """Stage 2: supervised fine-tuning on (a fraction of) the labels.

  SimCLRv2 fine-tunes from the projection head's first layer
  (`ft_proj_selector=1`, the default) with a new zero-initialised linear
  head; `label_fraction=0.01` or `0.1` keeps a class-balanced subset chosen
  by `seed`.

  Args:
    data, labels, model_dir, eval_data, eval_labels: as in `pretrain`.
    init_from: the pretraining export to start from (None: from scratch,
      the supervised baseline).
    **options: as in `pretrain`, plus label_fraction,
      fine_tune_after_block (4: linear evaluation).
  Returns:
    A `TrainResult`.
  """
  return _call(lambda: _train(_train_config(
      "finetune", data, labels, eval_data, eval_labels, model_dir, options,
      init_from=os.fspath(init_from or ""))))


def distill(data, labels=None, *, teacher: str,
            init_from: Optional[str] = None, model_dir: Optional[str] = None,
            eval_data=None, eval_labels=None, **options) -> TrainResult:
  """Stage 3: distillation of a fine-tuned teacher on unlabeled images.

  The student is the architecture of the options (resnet_depth,
  width_multiplier, sk_ratio, ...): the teacher's size for
  self-distillation, or smaller. `init_from` starts it from an export.

  Args:
    data, labels, model_dir, eval_data, eval_labels: as in `pretrain`
      (labels are only used to evaluate, and by `distill_label_weight`).
    teacher: a fine-tuned export (with a supervised head).
    init_from: an export to initialise the student from (optional).
    **options: as in `pretrain`, plus distill_temperature,
      distill_label_weight, init_head.
  Returns:
    A `TrainResult`.
  """
  return _call(lambda: _train(_train_config(
      "distill", data, labels, eval_data, eval_labels, model_dir, options,
      teacher=os.fspath(teacher or ""),
      init_from=os.fspath(init_from or ""))))


# === Using exports ===========================================================

def _meta(export: str, argument: str = "export"):
  # pylint: disable=g-import-not-at-top
  from tf_hub_export import load as load_lib
  return load_lib.read_meta(os.fspath(export), argument)


def evaluate(export: str, data, labels=None, *,
             model_dir: Optional[str] = None, **options) -> dict:
  """Top-1, top-5 and loss of an export's supervised head.

  Args:
    export: an export of ours (a stage's saved_model/ or an import).
    data: as in `pretrain`: its eval split (`eval_split`, default 'test');
      NumPy images or a tf.data.Dataset are evaluated as given.
    labels: int labels of NumPy `data`.
    model_dir: where result.json and a TensorBoard projector view go (None:
      a temporary folder).
    **options: eval_split, eval_batch_size, image_size, precision, ...
  Returns:
    {global_step, eval_split, train_mode, loss, top1, top5}.
  """
  def run():
    # pylint: disable=g-import-not-at-top
    from simclr_tf import evaluation
    _check_options(options)
    meta = _meta(export)
    values = {"image_size": meta.image_size, **options}
    if _is_in_memory(data):
      # The same images serve as both splits: nothing trains.
      eval_split = options.get("eval_split", "test")
      values.update(_data_options(data, labels, data, labels,
                                  {**options, "train_split": eval_split},
                                  class_names=meta.class_names))
      values["train_split"] = eval_split
    else:
      values.update(_data_options(data, labels, None, None, options))
    stage = meta.train_mode if meta.train_mode in config_lib.TRAIN_MODES \
        else "finetune"
    cfg = Config(mode="eval", train_mode=stage, init_from=os.fspath(export),
                 model_dir=_model_dir(model_dir, "eval"), **values)
    return evaluation.evaluate_run(cfg)
  return _call(run)


def _apply(export: str, data, key: str, batch_size: int) -> np.ndarray:
  # pylint: disable=g-import-not-at-top
  from simclr_tf import inference
  from simclr_tf.data import sources
  if _is_in_memory(data):
    images, _ = _arrays(data, None, "data")
    return inference.apply_to_images(os.fspath(export), images, key,
                                     batch_size)
  spec = _data_options(data, None, None, None, {})
  if spec["dataset"] == BUNDLED_DATASET:
    root, split = sources.bundled_sample_dir(), "test"
  elif spec["dataset"] == IMAGE_FOLDER:
    root, split = spec["data_dir"], "test"
  else:
    raise ArgumentError(f"data={data!r}: embed and predict read image "
                        "folders, tf.data.Datasets or NumPy images.")
  files, values, skipped, _ = inference.apply_to_folder(
      os.fspath(export), root, split, key, batch_size)
  if skipped:
    log.warning("Skipped %d unreadable file(s) (first: %s); the rows are "
                "the %d others, in listing order.", len(skipped),
                skipped[0][0], len(files))
  return values


def embed(export: str, data, *, batch_size: int = 256) -> np.ndarray:
  """The encoder features (`final_avg_pool`) of images.

  Args:
    export: any export of ours.
    data: NumPy images, a tf.data.Dataset of images, or an image folder
      (its 'test' split; 'cifar10_sample' for the bundled one).
    batch_size: images per call.
  Returns:
    float32 [N, D], one row per image in order (unreadable files of a folder
    are skipped with a warning).
  """
  return _call(_apply, export, data, "final_avg_pool", batch_size)


def predict(export: str, data, *, batch_size: int = 256) -> np.ndarray:
  """Class probabilities (softmax of `logits_sup`) of a fine-tuned export.

  Args:
    export: an export with a supervised head.
    data: as in `embed`.
    batch_size: images per call.
  Returns:
    float32 [N, num_classes]; the class names are `class_names(export)`.
  """
  def run():
    if not _meta(export).model_config.num_classes:
      raise ArgumentError(f"export={export!r} has no supervised head; "
                          "predict needs a fine-tuned export (or use embed).")
    logits = _apply(export, data, "logits_sup", batch_size)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
  return _call(run)


def class_names(export: str) -> tuple:
  """The class names of an export's supervised head (may be empty)."""
  return _call(lambda: tuple(_meta(export).class_names))


def load_export(path: str):
  """Any export as a trainable float32 Keras model with named outputs.

  The model is rebuilt from the architecture the export carries and every
  weight is restored by path; its outputs are checked against the
  SavedModel's before it is returned.

  Args:
    path: an export of ours (a stage's saved_model/ or an import).
  Returns:
    A `simclr_tf.SimCLR`; `model(images)` (float32 [N, H, W, 3] in [0, 1])
    returns {'final_avg_pool', 'proj_head_output', 'proj_head_layer_j', ...,
    'logits_sup' with a supervised head}.
  """
  # pylint: disable=g-import-not-at-top
  from tf_hub_export import load as load_lib
  return _call(lambda: load_lib.load_model(os.fspath(path), flag="path")[0])


def _deploy(cfg: Config) -> dict:
  """--mode=export: the --init_from export as one file for devices."""
  # pylint: disable=g-import-not-at-top
  from simclr_tf import deploy
  from tf_hub_export import load as load_lib
  deploy.check_options(cfg.export_format, cfg.quantize, cfg.min_agreement)
  try:
    meta = load_lib.read_meta(cfg.init_from, "init_from")   # verified
  except load_lib.ExportError as e:
    raise ConfigError(str(e)) from e
  representative = None
  if cfg.quantize == "int8":
    representative, _ = deploy.read_split(
        cfg.dataset, cfg.data_dir, cfg.train_split, meta.image_size,
        count=deploy.REPRESENTATIVE_COUNT, seed=cfg.seed)
  images, labels = deploy.read_split(cfg.dataset, cfg.data_dir,
                                     cfg.eval_split, meta.image_size)
  return deploy.export(
      cfg.init_from, cfg.model_dir, export_format=cfg.export_format,
      quantize=cfg.quantize, representative_images=representative,
      eval_images=images, eval_labels=labels,
      min_agreement=cfg.min_agreement)


def export_for_deployment(export: str, output_dir: str, data=None,
                          labels=None, *, eval_data=None, eval_labels=None,
                          export_format: str = "litert",
                          quantize: str = "none", min_agreement: float = 0.98,
                          **options) -> dict:
  """Writes an export as one file for devices, checked against it.

  `run.py --mode=export` in Python: a LiteRT (`quantize` none, dynamic or
  int8) or ONNX file that takes uint8 images `[N, S, S, 3]` and returns
  `probabilities` and `embedding` (docs/deploy.md). int8 calibrates on a
  reproducible sample of the training images of `data`; the converted model
  runs on the eval images beside the SavedModel, and below `min_agreement`
  of unchanged predictions nothing is kept.

  Args:
    export: a stage's `saved_model/` (usually the distilled student).
    output_dir: a new (or empty) folder for the file, `class_names.txt` and
      `export_report.json`.
    data: an image folder, `cifar10_sample`, a TFDS name, or NumPy training
      images (with `labels=`, and `eval_data=`/`eval_labels=`).
    labels, eval_data, eval_labels: for NumPy `data`.
    export_format: 'litert' or 'onnx'.
    quantize: 'none', 'dynamic' or 'int8' (LiteRT).
    min_agreement: the fraction of eval images whose top-1 (or nearest
      neighbour, for an export without a supervised head) must not change.
    **options: train_split, eval_split, data_dir, seed.
  Returns:
    The report (also `output_dir/export_report.json`): top-1 of both,
    agreement, largest probability difference, size, latency.
  Raises:
    ArgumentError: bad arguments, export or data, or an agreement below
      `min_agreement`.
  """
  if data is None:
    raise ArgumentError(
        "data is None; give the images to check the export on (its eval "
        "split) and, for quantize='int8', to calibrate it (its training "
        "split): an image folder, a dataset name or NumPy images.")
  _check_options(options)
  values = dict(options, mode="export", init_from=os.fspath(export),
                model_dir=os.fspath(output_dir), export_format=export_format,
                quantize=quantize, min_agreement=min_agreement)
  values.update(_data_options(data, labels, eval_data, eval_labels, options))
  return _call(lambda: _deploy(config_lib.validate(Config(**values))))


def import_official(source: str, output: str, *,
                    ft_proj_selector: Optional[int] = None,
                    ema: bool = False, class_names=(),
                    image_size: int = 0) -> str:
  """Imports a checkpoint released by the official SimCLR code.

  Args:
    source: a TF1 checkpoint, hub module or TF2 SavedModel of the official
      code (see docs/importing.md).
    output: the export folder to create (must not exist, or be empty).
    ft_proj_selector: the projection output feeding the supervised head;
      None reads it from the checkpoint's graph where it has one (a
      SavedModel, a hub module, a `.meta` file), else assumes 0 and says
      so in the log; a value that contradicts the graph is refused.
    ema: import the TF1 `ema_model/` weights.
    class_names: the supervised head's class names, if known.
    image_size: the export's nominal image size (0: 32 or 224 by stem).
  Returns:
    The export's path.
  """
  # pylint: disable=g-import-not-at-top
  from tf_hub_export import import_official as importer
  from tf_hub_export.official import OfficialFormatError
  try:
    report = importer.import_checkpoint(
        os.fspath(source), os.fspath(output), ema=ema,
        image_size=image_size or None, ft_proj_selector=ft_proj_selector,
        class_names=tuple(class_names))
  except OfficialFormatError as e:
    raise _as_argument_error(e) from e
  return report.output


def run(cfg: Config) -> dict:
  """Runs a `Config` as the command line does (`cfg.mode` says what).

  Returns:
    What the command line prints: train / train_then_eval and eval: the
    result (result.json's content: global_step, top1, top5, loss, export,
    and preempted when SIGTERM stopped training); embed / predict: the files
    written and counts.
  Raises:
    ConfigError: with messages naming the --flags.
  """
  # pylint: disable=g-import-not-at-top
  from simclr_tf import evaluation
  from simclr_tf import inference
  if cfg.mode in config_lib.INFERENCE_MODES:
    return inference.run_config(config_lib.validate(cfg))
  if cfg.mode == "eval":
    return evaluation.evaluate_run(cfg)
  if cfg.mode == "export":
    return _deploy(config_lib.validate(cfg))
  # pylint: disable=g-import-not-at-top
  from simclr_tf import runner
  outcome = runner.train_stage(cfg, evaluate=cfg.mode == "train_then_eval")
  return outcome.metrics
