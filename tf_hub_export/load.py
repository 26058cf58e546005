"""Reads exports: rebuilds the Keras model and restores every weight, checked.

Loading a SavedModel runs its graph, so load only exports you trust. An
export is recognised as one of ours by `assets.extra/simclr_tf.json`, which
carries the architecture and the path of every variable.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterable, Optional

import keras
import numpy as np
import tensorflow as tf

from simclr_tf import atomic
from simclr_tf.models.config import ModelConfig
from simclr_tf.models.simclr import (SimCLR, build_float32, copy_weights,
                                     variables_by_path)
from tf_hub_export import verify as verify_lib
from tf_hub_export.export import META_DIR, META_FILE, ExportMeta


class ExportError(ValueError):
  """An export that cannot be used; the message says why and what to do."""


def resolve_export(path: str) -> str:
  """`path` itself, or the previous export left aside by an interrupted swap."""
  if os.path.exists(os.path.join(path, "saved_model.pb")):
    return path
  for old in reversed(atomic.previous_versions(path)):
    if os.path.exists(os.path.join(old, "saved_model.pb")):
      return old
  sub = os.path.join(path, "saved_model")
  if path and os.path.isdir(sub):
    return resolve_export(sub)
  return path


def read_meta(path: str, flag: str = "init_from",
              check: bool = True) -> ExportMeta:
  """The metadata of one of our exports; ExportError for anything else.

  Args:
    path: the export (or the model_dir holding it as saved_model/).
    flag: flag name used in error messages.
    check: verify the export's files against the metadata first
      (`tf_hub_export.verify`): a damaged export fails here, in one line.
  """
  path = resolve_export(path)
  if not os.path.exists(os.path.join(path, "saved_model.pb")):
    raise ExportError(
        f"--{flag}={path!r} is not a SavedModel (no saved_model.pb); give the "
        "saved_model/ folder written by a previous stage.")
  meta_path = os.path.join(path, META_DIR, META_FILE)
  if not os.path.exists(meta_path):
    raise ExportError(
        f"--{flag}={path!r} is a SavedModel not written by simclr-tf (no "
        f"{META_DIR}/{META_FILE}); re-export it with simclr-tf.")
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = ExportMeta.from_json(f.read())
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ExportError(
        f"--{flag}={path!r} has an unreadable {META_FILE} "
        f"({str(e).splitlines()[0][:120]}); re-export it with this version "
        "of simclr-tf.") from e
  if check:
    try:
      verify_lib.verify(path, meta)
    except verify_lib.VerifyError as e:
      raise ExportError(
          f"--{flag}={path!r} cannot be used: {e}; re-export it, or give "
          "an intact copy.") from e
  return meta


@dataclasses.dataclass(frozen=True)
class RestoreReport:
  """Which weights moved from an export into a model."""

  restored: tuple    # paths found in both
  missing: tuple     # in the model, not in the export (new weights)
  unused: tuple      # in the export, not in the model (dropped layers)


def restore_weights(model: SimCLR, loaded, meta: ExportMeta,
                    skip: Callable = lambda path: False) -> RestoreReport:
  """Assigns the export's variables to `model`'s variables of the same path.

  Paths accepted by `skip` are left as initialised (new weights).
  """
  target = variables_by_path(model)
  restored, unused = [], []
  for path, value in zip(meta.variable_paths, loaded.variables):
    if path not in target or skip(path):
      unused.append(path)
      continue
    var = target[path]
    if tuple(var.shape) != tuple(value.shape):
      raise ExportError(
          f"Weight {path} has shape {tuple(value.shape)} in the export but "
          f"{tuple(var.shape)} in the model; the architecture flags do not "
          "match the export.")
    var.assign(tf.cast(value, var.dtype))
    restored.append(path)
  missing = sorted(set(target) - set(restored))
  return RestoreReport(tuple(restored), tuple(missing), tuple(unused))


def check_outputs(model: SimCLR, loaded, image_size: int,
                  keys: Optional[Iterable[str]] = None, atol=1e-4):
  """Raises ExportError unless `model` and `loaded` agree on a fixed batch."""
  rng = np.random.default_rng(0)
  images = tf.constant(rng.uniform(size=(2, image_size, image_size, 3)),
                       tf.float32)
  ours = model(images, training=False)
  theirs = loaded(images, training=False)
  keys = list(keys) if keys is not None else sorted(set(ours) & set(theirs))
  for key in keys:
    a = np.asarray(ours[key], np.float32)
    b = np.asarray(theirs[key], np.float32)
    scale = max(1.0, float(np.abs(b).max()))
    if a.shape != b.shape or not np.allclose(a, b, atol=atol * scale):
      raise ExportError(
          f"Output {key!r} of the rebuilt model differs from the export's "
          f"(max diff {np.abs(a - b).max() if a.shape == b.shape else 'shape'})"
          "; the export is damaged or was written by an incompatible version.")
  return keys


def load_model(path: str, model_config: Optional[ModelConfig] = None,
               flag: str = "init_from", new_weights: Callable = None):
  """Rebuilds a float32 Keras model from an export and restores it, checked.

  Args:
    path: the export folder.
    model_config: architecture to build (default: the export's own). It may
      drop projection layers or change the supervised head.
    flag: flag name used in error messages.
    new_weights: predicate on a variable path: weights that are new (not
      restored). The restore must leave exactly those unrestored.
  Returns:
    (model, meta, report). The model's outputs on the parts both share equal
    the SavedModel's.
  """
  meta = read_meta(path, flag)
  path = resolve_export(path)
  config = model_config or meta.model_config
  model = build_float32(config, meta.image_size)
  loaded = tf.saved_model.load(path)
  new_weights = new_weights or (lambda p: False)
  report = restore_weights(model, loaded, meta, skip=new_weights)
  wrong = [p for p in report.missing if not new_weights(p)]
  if wrong:
    raise ExportError(
        f"--{flag}={path!r} lacks {len(wrong)} weight(s) the model needs "
        f"(first: {wrong[0]}); the architecture flags do not match the export.")
  shared = ["final_avg_pool"] + [
      k for k in model(tf.zeros([1, meta.image_size, meta.image_size, 3]))
      if k.startswith("proj_head_layer_")]
  if config.num_classes and config.num_classes == \
      meta.model_config.num_classes and config.sup_head_input == \
      meta.model_config.sup_head_input and not report.missing:
    shared.append("logits_sup")
  check_outputs(model, loaded, meta.image_size, keys=shared)
  return model, meta, report


def load_logits_fn(path: str, flag: str = "teacher"):
  """A frozen `images -> logits_sup` function from any SavedModel with one.

  Our exports are rebuilt as Keras models (they then run in the session's
  precision); other reusable SavedModels are called as they are.
  """
  path = resolve_export(path)
  ours = os.path.exists(os.path.join(path, META_DIR, META_FILE))
  meta = read_meta(path, flag) if ours else None   # verified when ours
  if meta is not None:
    if not meta.model_config.num_classes:
      raise ExportError(
          f"--{flag}={path!r} has no 'logits_sup' output (it was exported "
          "without a supervised head); give a fine-tuned export.")
    model, meta, _ = load_model(path, flag=flag)
    if keras.config.dtype_policy().name != "float32":
      # The checked float32 model, copied into one of the session's policy
      # (mixed_bfloat16 makes the frozen forward pass about 2x cheaper).
      session = SimCLR(dataclasses.replace(
          meta.model_config, global_bn=False)).build_for(meta.image_size)
      copy_weights(model, session)
      model = session
    model.trainable = False
    return (lambda images: model(images, training=False)["logits_sup"]), meta
  if not os.path.exists(os.path.join(path, "saved_model.pb")):
    raise ExportError(f"--{flag}={path!r} is not a SavedModel; give the "
                      "saved_model/ folder of a fine-tuned model.")
  loaded = tf.saved_model.load(path)
  probe = loaded(tf.zeros([1, 32, 32, 3]), training=False)
  if not isinstance(probe, dict) or "logits_sup" not in probe:
    raise ExportError(f"--{flag}={path!r} has no 'logits_sup' output; give "
                      "a fine-tuned export.")
  return (lambda images: loaded(images, training=False)["logits_sup"]), None
