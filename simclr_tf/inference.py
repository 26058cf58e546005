"""`--mode=embed` and `--mode=predict`: an export applied to a folder of images.

Any export of ours (a stage's `saved_model/`, or an official checkpoint
brought in by `tf_hub_export.import_official`) on `ROOT/<split>/...` images,
with or without class folders:

* embed: `embeddings.npy` ([N, D] float32 `final_avg_pool` features, the
  encoder output) and `embeddings_files.txt` (the N files, in row order), or
  with `--output_format=csv` one `embeddings.csv` (file, then D columns);
* predict: `predictions.csv`: each file with its top-5 classes and their
  softmax probabilities, named with the export's class names (or
  `class_<k>` when the export has none).

Images get the evaluation preprocessing of training (center crop, resize).
Unreadable files are skipped, logged and listed in `skipped.txt`. Results
are written to temporary files and renamed, so a kill leaves none half
written.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import sys
import time
from typing import Optional

import numpy as np
import tensorflow as tf

from simclr_tf import atomic
from simclr_tf.config import OUTPUT_FORMATS
from simclr_tf.data import augment
from simclr_tf.data import folder as folder_lib
from simclr_tf.data import sources

log = logging.getLogger("simclr_tf")

TOP_K = 5
EMBED_OUTPUT = "final_avg_pool"


class InferenceError(ValueError):
  """Bad input for embed/predict; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class InferenceResult:
  mode: str
  files: tuple          # in output order
  skipped: tuple        # (path, reason)
  outputs: tuple        # files written
  seconds: float

  def summary(self) -> dict:
    return {"mode": self.mode, "num_files": len(self.files),
            "num_skipped": len(self.skipped), "outputs": list(self.outputs),
            "seconds": round(self.seconds, 2)}


def _read_meta(path: str):
  """The meta of one of our exports; InferenceError otherwise."""
  # pylint: disable=g-import-not-at-top
  from tf_hub_export import load as load_lib
  try:
    return load_lib.read_meta(path, "init_from")
  except load_lib.ExportError as e:
    raise InferenceError(str(e)) from e


def _load_export(path: str):
  """(SavedModel, meta) of one of our exports; InferenceError otherwise."""
  # pylint: disable=g-import-not-at-top
  from tf_hub_export import load as load_lib
  meta = _read_meta(path)
  return tf.saved_model.load(load_lib.resolve_export(path)), meta


def _images(listing, image_size: int, batch_size: int) -> tf.data.Dataset:
  """(index, image) batches in listing order; undecodable files drop out."""
  paths = tf.constant(list(listing.paths), tf.string)

  def load(index):
    image = folder_lib.decode_image(tf.io.read_file(paths[index]))
    return index, augment.preprocess_for_eval(image, image_size, image_size)

  ds = tf.data.Dataset.range(len(listing.paths))
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors()
  return ds.batch(batch_size).prefetch(2)


class _Progress:
  """A progress bar on a terminal, a log line every ~10 s elsewhere."""

  def __init__(self, total: int, label: str):
    self.total, self.label, self.done = total, label, 0
    self.last = time.time()
    self.bar = None
    if sys.stderr.isatty():
      import keras  # pylint: disable=g-import-not-at-top
      self.bar = keras.utils.Progbar(total, unit_name="image")

  def add(self, count: int) -> None:
    self.done += count
    if self.bar is not None:
      self.bar.update(self.done)
    elif time.time() - self.last > 10 or self.done == self.total:
      self.last = time.time()
      log.info("%s: %d / %d images", self.label, self.done, self.total)


def _run(model, listing, image_size: int, batch_size: int, key: str,
         label: str):
  """Runs the export on every image: (indices, [N, ...] outputs)."""
  indices, outputs = [], []
  progress = _Progress(len(listing.paths), label)
  for index, images in _images(listing, image_size, batch_size):
    out = model.serve(images)
    if key not in out:
      raise InferenceError(
          f"the export has no {key!r} output (it has {sorted(out)}); "
          "--mode=predict needs a fine-tuned export with a supervised head.")
    indices.append(index.numpy())
    outputs.append(out[key].numpy())
    progress.add(int(index.shape[0]))
  if not indices:
    return np.zeros([0], np.int64), None
  return np.concatenate(indices), np.concatenate(outputs)


# File names are written as they are, undecodable bytes escaped (a folder
# may hold names that are not UTF-8).
_TEXT = {"encoding": "utf-8", "errors": "backslashreplace"}


def _lines_writer(lines):
  def write(tmp):
    with open(tmp, "w", **_TEXT) as f:
      f.writelines(f"{line}\n" for line in lines)
  return write


def _csv_writer(header, rows):
  def write(tmp):
    with open(tmp, "w", newline="", **_TEXT) as f:
      writer = csv.writer(f)
      writer.writerow(header)
      writer.writerows(rows)
  return write


def _npy_writer(array):
  def write(tmp):
    with open(tmp, "wb") as f:
      np.save(f, array)
  return write


def apply_to_folder(export: str, data_dir: str, split: str, key: str,
                    batch_size: int = 256, strict: bool = False):
  """Runs an export's output `key` on every image of DATA_DIR/SPLIT.

  Returns:
    (files in output order, [N, ...] outputs, skipped (path, reason) pairs,
    the export's meta). Raises InferenceError for bad input.
  """
  model, meta = _load_export(export)
  try:
    sources.check_data_dir(data_dir)
    listing = folder_lib.list_image_folder(data_dir, split, strict=strict)
  except ValueError as e:
    raise InferenceError(str(e)) from e
  indices, values = _run(model, listing, meta.image_size, batch_size, key,
                         key)
  files = tuple(listing.paths[i] for i in indices)
  undecoded = sorted(set(range(len(listing.paths))) - set(indices.tolist()))
  skipped = tuple(zip(listing.skipped, listing.skip_reasons)) + tuple(
      (listing.paths[i], "could not be decoded") for i in undecoded)
  if not files:
    raise InferenceError(f"no image of {listing.directory} could be read.")
  return files, values, skipped, meta


def apply_to_images(export: str, images: np.ndarray, key: str,
                    batch_size: int = 256) -> np.ndarray:
  """Runs an export's output `key` on in-memory images.

  Args:
    export: an export folder of ours.
    images: uint8 [N, H, W, 3]; each gets the evaluation preprocessing.
    key: the output ('final_avg_pool', 'logits_sup', ...).
    batch_size: images per call of the export.
  Returns:
    float32 [N, ...] outputs, in order.
  """
  model, meta = _load_export(export)
  size = meta.image_size
  ds = tf.data.Dataset.from_tensor_slices(images).map(
      lambda image: augment.preprocess_for_eval(image, size, size),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  outputs = []
  for batch in ds.batch(batch_size):
    out = model.serve(batch)
    if key not in out:
      raise InferenceError(
          f"the export has no {key!r} output (it has {sorted(out)}); "
          "predicting needs a fine-tuned export with a supervised head.")
    outputs.append(out[key].numpy())
  if not outputs:
    raise InferenceError("received no images.")
  return np.concatenate(outputs).astype(np.float32)


def top_k_rows(probabilities: np.ndarray, class_names, k: int = TOP_K):
  """[(name_1, p_1, ..., name_k, p_k)] per row, most probable first."""
  k = min(k, probabilities.shape[1])
  order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
  rows = []
  for probs, top in zip(probabilities, order):
    row = []
    for c in top:
      row += [class_names[c], f"{probs[c]:.6f}"]
    rows.append(row)
  return rows


def run(mode: str, export: str, data_dir: str, split: str, model_dir: str,
        output_format: str = "npy", batch_size: int = 256,
        strict: bool = False) -> InferenceResult:
  """Embeds or predicts every image of DATA_DIR/SPLIT with EXPORT.

  Args:
    mode: 'embed' or 'predict'.
    export: an export folder of ours.
    data_dir: ROOT of ROOT/<split>/[<class>/]<image>.
    split: the split folder to read.
    model_dir: where the results go.
    output_format: 'npy' or 'csv' (embeddings only).
    batch_size: images per call of the export.
    strict: stop on the first unusable file instead of skipping it.
  Returns:
    An InferenceResult. Raises InferenceError for bad input.
  """
  start = time.time()
  if mode not in ("embed", "predict"):
    raise InferenceError(f"Received: mode={mode!r}; use embed or predict.")
  if output_format not in OUTPUT_FORMATS:
    raise InferenceError(f"--output_format={output_format!r} is not allowed; "
                         f"use one of: {', '.join(OUTPUT_FORMATS)}.")
  if not export:
    raise InferenceError(f"--mode={mode} needs --init_from=EXPORT (a "
                         "saved_model/ of ours or an imported official one).")
  meta = _read_meta(export)
  if mode == "predict" and not meta.model_config.num_classes:
    raise InferenceError(
        f"--init_from={export!r} has no supervised head; --mode=predict "
        "needs a fine-tuned export (or use --mode=embed).")
  key = EMBED_OUTPUT if mode == "embed" else "logits_sup"
  files, values, skipped, meta = apply_to_folder(
      export, data_dir, split, key, batch_size, strict)
  try:
    os.makedirs(model_dir, exist_ok=True)
  except OSError as e:
    raise atomic.WriteError(
        f"--model_dir={model_dir!r} cannot be created ({e.strerror}); choose "
        "a folder you can write to.") from e
  writers = {}
  if mode == "embed":
    if output_format == "npy":
      writers[os.path.join(model_dir, "embeddings.npy")] = _npy_writer(
          values.astype(np.float32))
      writers[os.path.join(model_dir, "embeddings_files.txt")] = \
          _lines_writer(files)
    else:
      header = ["file"] + [f"f{j}" for j in range(values.shape[1])]
      rows = ([f] + [f"{v:.7g}" for v in row] for f, row in zip(files, values))
      writers[os.path.join(model_dir, "embeddings.csv")] = _csv_writer(
          header, rows)
  else:
    names = list(meta.class_names) or [
        f"class_{c}" for c in range(meta.model_config.num_classes)]
    probs = tf.nn.softmax(tf.constant(values, tf.float32)).numpy()
    k = min(TOP_K, probs.shape[1])
    header = ["file"] + [h for j in range(1, k + 1)
                         for h in (f"top{j}", f"p{j}")]
    rows = ([f] + row for f, row in zip(files, top_k_rows(probs, names)))
    writers[os.path.join(model_dir, "predictions.csv")] = _csv_writer(
        header, rows)
  skipped_path = os.path.join(model_dir, "skipped.txt")
  if skipped:
    writers[skipped_path] = _lines_writer(f"{p}\t{r}" for p, r in skipped)
  # All the outputs, or none of them: a failure leaves the old ones.
  outputs = atomic.write_files(writers)
  if skipped:
    log.warning("Skipped %d unreadable file(s), listed in %s (first: %s)",
                len(skipped), skipped_path, skipped[0][0])
  return InferenceResult(mode=mode, files=files, skipped=skipped,
                         outputs=tuple(outputs), seconds=time.time() - start)


def run_config(cfg) -> Optional[dict]:
  """`run` with the values of a `simclr_tf.config.Config`."""
  # pylint: disable=g-import-not-at-top
  from simclr_tf import config as config_lib
  from simclr_tf.data import sources
  data_dir = (sources.bundled_sample_dir()
              if cfg.dataset == config_lib.BUNDLED_DATASET else cfg.data_dir)
  return run(cfg.mode, cfg.init_from, data_dir, cfg.eval_split,
             cfg.model_dir, output_format=cfg.output_format,
             batch_size=cfg.eval_batch_size,
             strict=cfg.strict_data).summary()
