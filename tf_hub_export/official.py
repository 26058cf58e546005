"""Reads the official SimCLR checkpoints (TF1 and TF2) by structure.

The released SimCLRv2 models come in four forms, all read here from their
checkpoint files with `tf.train.load_checkpoint` (the official graph is never
run):

  tf2_checkpoint   `ckpt-N` written by the official tf2/run.py through
                   tf.train.Checkpoint(model=..., global_step=...,
                   optimizer=...): keys follow the Python attributes,
                   `model/resnet_model/block_groups/G/layers/B/...`.
  tf2_saved_model  `saved_model/` exported by tf2/run.py. Its variables are
                   stored under flattened keys (`model/resnet_model/
                   variables/N`); the same attribute path as in a training
                   checkpoint is recovered from the SavedModel's object graph.
  tf1_checkpoint   `model.ckpt-N` of the TF1 code: name-based keys
                   (`base_model/conv2d_K/kernel`, `base_model/
                   batch_normalization_K/...`, `head_contrastive/nl_J/...`,
                   `head_supervised/linear_layer/dense/...`, and an
                   `ema_model/` copy of each).
  tf1_hub          a TF1 Hub module, whose variables/ is such a checkpoint.

Each form is mapped onto the paths of our own layers (`resnet/stem/conv_0/
kernel`, `resnet/block_group2/block_0/sk_1/reduce_bn/gamma`, `proj_head/
layer_1/dense/kernel`, `head_supervised/dense/bias`). TF2 keys name the
layer directly. TF1 keys only number layers in creation order, so the TF1
sequence is parsed with the official block grammar (shortcut, 1x1, 3x3 or
selective kernel, 1x1, SE), checking every shape on the way; indices are
compared as numbers, never sorted as strings. `infer_model_config` then reads
the architecture off the mapped shapes.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow as tf

from tf_hub_export.official_arch import infer_model_config  # noqa: F401
from tf_hub_export.official_layouts import (VALUE_SUFFIX, OfficialFormatError,
                                            map_tf1, map_tf2)

FORMS = ("tf1_checkpoint", "tf1_hub", "tf2_checkpoint", "tf2_saved_model")
# Object-graph edges that list variables a second time (Keras bookkeeping).
_ALIAS_EDGES = frozenset((
    "variables", "trainable_variables", "non_trainable_variables",
    "keras_api", "trainable_variables_list", "trainable_weights",
    "non_trainable_weights", "weights", "signatures", "__call__",
    "_self_unconditional_dependency_names"))


@dataclasses.dataclass
class OfficialWeights:
  """An official checkpoint mapped onto our layer paths.

  Attributes:
    form: one of FORMS.
    prefix: the checkpoint prefix read.
    keys: our path (without the model name) -> checkpoint key.
    shapes: our path -> shape.
    leftovers: model tensors of the checkpoint that map to none of our
      layers (an import refuses them).
    global_step: the checkpoint's step (0 if absent).
  """

  form: str
  prefix: str
  keys: dict
  shapes: dict
  leftovers: tuple
  global_step: int
  reader: object = dataclasses.field(repr=False, default=None)

  def value(self, path: str) -> np.ndarray:
    """The tensor of our `path`; OfficialFormatError if it cannot be read."""
    key = self.keys[path]
    try:
      return self.reader.get_tensor(key)
    except (tf.errors.OpError, ValueError, IndexError, RuntimeError) as e:
      raise OfficialFormatError(
          f"cannot read tensor {key!r} of {self.prefix!r} "
          f"({_first_line(e)}): the data file is truncated or damaged; "
          "download the checkpoint again.") from e


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__


# === Finding the checkpoint ===================================================

def _is_prefix(path: str) -> bool:
  return os.path.exists(path + ".index")


def resolve_source(src: str) -> tuple[str, str]:
  """(kind, checkpoint prefix) for SRC; kind is 'checkpoint', 'hub' or
  'saved_model'.

  SRC may be a checkpoint prefix (`.../model.ckpt-N`, `.../ckpt-N`), a folder
  with a `checkpoint` state file, a SavedModel or TF1 Hub module folder, or a
  released model folder holding one of those (`checkpoint/`, `saved_model/`,
  `hub/`); a folder's own checkpoint is preferred to its exports.
  """
  src = src.rstrip("/") or src
  # A file of the checkpoint itself names its prefix.
  src = re.sub(r"\.(index|data-\d+-of-\d+)$", "", src)
  if not os.path.exists(src) and not _is_prefix(src):
    data = [f for f in _listdir(os.path.dirname(src) or ".")
            if f.startswith(os.path.basename(src) + ".data-")]
    if data:
      raise OfficialFormatError(
          f"{src!r} has a data file ({data[0]}) but no {src}.index; copy the "
          "whole checkpoint (the .index and every .data-* file).")
    raise OfficialFormatError(
        f"{src!r} does not exist; give a checkpoint prefix (model.ckpt-N, "
        "ckpt-N) or a folder holding a checkpoint, saved_model/ or hub/.")
  parent = os.path.dirname(os.path.dirname(src))
  if (_is_prefix(src) and os.path.basename(os.path.dirname(src)) == "variables"
      and os.path.exists(os.path.join(parent, "saved_model.pb"))):
    return resolve_source(parent)      # the variables of an export
  if os.path.isdir(src):
    if os.path.exists(os.path.join(src, "saved_model.pb")):
      variables = os.path.join(src, "variables", "variables")
      if not _is_prefix(variables):
        raise OfficialFormatError(
            f"{src!r} is a SavedModel without variables/variables.index; "
            "copy the whole folder.")
      hub = os.path.exists(os.path.join(src, "tfhub_module.pb"))
      return ("hub" if hub else "saved_model"), variables
    if os.path.exists(os.path.join(src, "checkpoint")) and not os.path.isdir(
        os.path.join(src, "checkpoint")):
      prefix = tf.train.latest_checkpoint(src)
      if prefix is None or not _is_prefix(prefix):
        raise OfficialFormatError(
            f"{src!r} has a 'checkpoint' file naming a checkpoint that is not "
            "there (no .index); copy the whole checkpoint.")
      return "checkpoint", prefix
    indexes = [f[:-len(".index")] for f in _listdir(src)
               if f.endswith(".index")]
    if indexes:   # checkpoint files without a state file: take the latest
      return "checkpoint", os.path.join(src, max(indexes, key=_step_of))
    for sub in ("checkpoint", "saved_model", "hub"):
      if os.path.isdir(os.path.join(src, sub)):
        try:
          return resolve_source(os.path.join(src, sub))
        except OfficialFormatError:
          continue
    raise OfficialFormatError(
        f"{src!r} holds no checkpoint (no 'checkpoint' file, *.index, "
        "saved_model.pb, or checkpoint/, saved_model/, hub/ folder); give "
        "the folder of a released SimCLR model or a checkpoint prefix.")
  return "checkpoint", src


def _step_of(prefix: str) -> tuple:
  digits = re.findall(r"\d+", prefix)
  return (int(digits[-1]) if digits else -1, prefix)


def _listdir(folder: str) -> list:
  try:
    return sorted(os.listdir(folder))
  except OSError:
    return []


def _open(prefix: str):
  try:
    return tf.train.load_checkpoint(prefix)
  except (tf.errors.OpError, ValueError) as e:
    raise OfficialFormatError(
        f"cannot open checkpoint {prefix!r} ({_first_line(e)}); the .index "
        "file is missing, truncated or not a TensorFlow checkpoint.") from e


# === Reading one form =========================================================

def read(src: str, ema: bool = False) -> OfficialWeights:
  """Opens SRC, recognises its form and maps it onto our layers."""
  kind, prefix = resolve_source(src)
  reader = _open(prefix)
  shapes = reader.get_variable_to_shape_map()
  keys = sorted(shapes)
  if any(k.startswith(("base_model/", "ema_model/base_model/")) for k in keys):
    form = "tf1_hub" if kind == "hub" else "tf1_checkpoint"
    mapping, leftovers = map_tf1(keys, shapes, ema)
  elif kind == "checkpoint" and any(
      k.startswith("model/resnet_model/") for k in keys):
    form = "tf2_checkpoint"
    _no_ema(ema, form)
    mapping, leftovers = map_tf2(
        {k[:-len(VALUE_SUFFIX)]: k for k in keys
         if k.endswith(VALUE_SUFFIX) and ".OPTIMIZER_SLOT" not in k}, keys)
  elif kind == "saved_model":
    form = "tf2_saved_model"
    _no_ema(ema, form)
    structural = _saved_model_paths(os.path.dirname(os.path.dirname(prefix)),
                                    reader)
    if not any(p.startswith("model/resnet_model/") for p in structural):
      raise _not_simclr(prefix, keys)
    mapping, leftovers = map_tf2(structural, [])
  else:
    raise _not_simclr(prefix, keys)
  step = 0
  for key in ("global_step", "global_step" + VALUE_SUFFIX):
    if key in shapes:
      step = int(reader.get_tensor(key))
  return OfficialWeights(
      form=form, prefix=prefix, keys=mapping,
      shapes={p: tuple(shapes[k]) for p, k in mapping.items()},
      leftovers=tuple(leftovers), global_step=step, reader=reader)


def _no_ema(ema: bool, form: str) -> None:
  if ema:
    raise OfficialFormatError(
        f"--ema: a {form} has no ema_model/ copy (only the TF1 checkpoints "
        "carry one); import it without --ema.")


def _not_simclr(prefix: str, keys: list) -> OfficialFormatError:
  shown = ", ".join(repr(k) for k in keys[:2]) or "no tensors"
  return OfficialFormatError(
      f"{prefix!r} is not an official SimCLR checkpoint: found {len(keys)} "
      f"tensors ({shown}, ...); expected 'base_model/...' (TF1) or "
      "'model/resnet_model/...' (TF2) keys.")


def _saved_model_paths(export_dir: str, reader) -> dict:
  """Attribute path -> checkpoint key for every variable of a TF2 export.

  Walks the SavedModel's object graph from the root, skipping the edges that
  only list variables again, so each variable is reached through its layers
  (`model/resnet_model/block_groups/1/layers/0/...`). Node ids are shared
  with the checkpoint's own object graph, which gives the key of each.
  """
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  from tensorflow.core.protobuf import trackable_object_graph_pb2  # pylint: disable=g-import-not-at-top
  saved = saved_model_pb2.SavedModel()
  with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
    saved.ParseFromString(f.read())
  nodes = saved.meta_graphs[0].object_graph_def.nodes
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
  found, stack, seen = {}, [(0, "")], set()
  while stack:
    node_id, path = stack.pop()
    if node_id in seen:
      continue
    seen.add(node_id)
    if nodes[node_id].WhichOneof("kind") == "variable":
      keys = [a.checkpoint_key for a in graph.nodes[node_id].attributes
              if a.name == "VARIABLE_VALUE"]
      if keys:
        found[path] = keys[0]
      continue
    for child in nodes[node_id].children:
      if child.local_name not in _ALIAS_EDGES:
        stack.append((child.node_id,
                      f"{path}/{child.local_name}" if path else
                      child.local_name))
  return found


