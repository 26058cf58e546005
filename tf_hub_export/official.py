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
the architecture off the mapped shapes, and the official graph where there is
one (a SavedModel's or hub module's `saved_model.pb`, a TF1 `model.ckpt-N.meta`,
or the `saved_model/` that tf2/run.py writes beside its checkpoints) says
which projection output feeds `head_supervised`.

Damage is found before any model is built: `verify` reads every tensor the
import needs (TensorFlow checks each one's CRC32C, so a flipped bit or a
truncated file fails there), and the graph files must parse. Tensors the
import does not need (optimizer slots, the unused EMA copy) are read too, and
the unreadable ones are only counted: they cannot change the import.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Optional

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.core.protobuf import trackable_object_graph_pb2

from tf_hub_export import verify as verify_lib
# The importer's architecture readers, re-exported.
from tf_hub_export.official_arch import (  # noqa: F401
    HeadInput, infer_model_config, read_architecture)
from tf_hub_export.official_arch import selector_from_graph
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
    graph_selector: the projection output feeding `head_supervised` in the
      official graph (None: no graph, or none that shows it).
    graph_file: the file that graph was read from.
  """

  form: str
  prefix: str
  keys: dict
  shapes: dict
  leftovers: tuple
  global_step: int
  reader: object = dataclasses.field(repr=False, default=None)
  graph_selector: Optional[int] = None
  graph_file: str = ""

  def value(self, path: str) -> np.ndarray:
    """The tensor of our `path`; OfficialFormatError if it cannot be read."""
    return _get(self.reader, self.prefix, self.keys[path], path)

  def unused_keys(self) -> list:
    """Checkpoint keys the import does not take (optimizer slots, counters,
    the other EMA copy, bookkeeping)."""
    used = set(self.keys.values())
    return sorted(k for k in self.reader.get_variable_to_shape_map()
                  if k not in used)


_READ_ERRORS = (tf.errors.OpError, ValueError, IndexError, RuntimeError,
                OSError)


def _get(reader, prefix: str, key: str, ours: str = "") -> np.ndarray:
  try:
    return reader.get_tensor(key)
  except _READ_ERRORS as e:
    reason = re.sub(r"^TensorBundle at .*? \(\d+ bytes\): ", "",
                    verify_lib.first_line(e, limit=10000))
    ours = f" (our {ours})" if ours else ""
    raise OfficialFormatError(
        f"{_data_files(prefix)} is truncated or damaged: tensor {key!r}"
        f"{ours} cannot be read ({reason[:120]}); download or copy it again "
        "(nothing was written).") from e


def _data_files(prefix: str) -> str:
  """The checkpoint's data file(s), as named in messages."""
  found = sorted(glob.glob(glob.escape(prefix) + ".data-*"))
  return found[0] if len(found) == 1 else prefix + ".data-*"


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
        f"cannot open checkpoint {prefix!r} ({verify_lib.first_line(e)}); "
        "the .index file is missing, truncated or not a TensorFlow "
        "checkpoint.") from e


# === Reading one form =========================================================

def read(src: str, ema: bool = False) -> OfficialWeights:
  """Opens SRC, recognises its form and maps it onto our layers."""
  kind, prefix = resolve_source(src)
  saved = None
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
    saved = _parse_saved_model(_export_dir(prefix))
    structural = _saved_model_paths(saved, reader, prefix)
    if not any(p.startswith("model/resnet_model/") for p in structural):
      raise _not_simclr(prefix, keys)
    mapping, leftovers = map_tf2(structural, [])
  else:
    raise _not_simclr(prefix, keys)
  step = 0
  for key in ("global_step", "global_step" + VALUE_SUFFIX):
    if key in shapes:
      step = int(np.asarray(_get(reader, prefix, key)).reshape(-1)[0])
  weights = OfficialWeights(
      form=form, prefix=prefix, keys=mapping,
      shapes={p: tuple(shapes[k]) for p, k in mapping.items()},
      leftovers=tuple(leftovers), global_step=step, reader=reader)
  weights.graph_selector, weights.graph_file = _read_graph(weights, saved)
  return weights


def verify(weights: OfficialWeights) -> list:
  """Reads every tensor the import needs, before any model is built.

  Each read checks the tensor's CRC32C, so a truncated or bit-flipped data
  file raises OfficialFormatError (one line naming the file and tensor).
  The tensors the import does not need are read as well; those that fail
  are returned, not raised: they cannot change what is imported.

  Returns:
    The unused checkpoint keys that cannot be read.
  """
  for path in sorted(weights.keys):
    weights.value(path)
  unreadable = []
  for key in weights.unused_keys():
    try:
      weights.reader.get_tensor(key)
    except _READ_ERRORS:
      unreadable.append(key)
  return unreadable


def describe_unused(keys: list) -> str:
  """'3 optimizer-slot tensors' / '2 EMA-copy and 1 other tensors'."""
  kinds = {}
  for key in keys:
    if ".OPTIMIZER_SLOT/" in key or key.startswith("optimizer/") or re.search(
        r"/(Momentum|Adam|Adam_1|RMSProp|RMSProp_1)$", key):
      kind = "optimizer-slot"
    elif key.startswith("ema_model/") or key.endswith(
        "/ExponentialMovingAverage"):
      kind = "EMA-copy"
    else:
      kind = "other"
    kinds[kind] = kinds.get(kind, 0) + 1
  parts = [f"{n} {kind}" for kind, n in sorted(kinds.items())]
  noun = "tensor" if len(keys) == 1 else "tensors"
  return " and ".join(parts) + f" {noun}"


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


def _export_dir(prefix: str) -> str:
  """The SavedModel folder of its `variables/variables` prefix."""
  return os.path.dirname(os.path.dirname(prefix))


def _parse_file(path: str, proto, what: str, fix: str):
  """`proto` parsed from the file at `path`; OfficialFormatError naming the
  file, `what` it should be and the `fix` if it is unreadable or damaged."""
  try:
    return verify_lib.read_proto(path, proto)
  except verify_lib.ProtoFileError as e:
    raise OfficialFormatError(
        f"{path} is truncated or damaged (not {what}: {e}); {fix}.") from e


def _parse_saved_model(export_dir: str):
  """The SavedModel proto of `export_dir`; OfficialFormatError if damaged."""
  return _parse_file(os.path.join(export_dir, "saved_model.pb"),
                     saved_model_pb2.SavedModel(), "a SavedModel",
                     "download or copy the whole folder again (nothing was "
                     "written)")


def _saved_model_paths(saved, reader, prefix: str) -> dict:
  """Attribute path -> checkpoint key for every variable of a TF2 export.

  Walks the SavedModel's object graph from the root, skipping the edges that
  only list variables again, so each variable is reached through its layers
  (`model/resnet_model/block_groups/1/layers/0/...`). Node ids are shared
  with the checkpoint's own object graph, which gives the key of each.
  """
  export_dir = _export_dir(prefix)
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  try:
    graph.ParseFromString(_get(reader, prefix, "_CHECKPOINTABLE_OBJECT_GRAPH"))
  except DecodeError as e:
    raise OfficialFormatError(
        f"the object graph of {prefix} is damaged "
        f"({verify_lib.first_line(e)}); download or copy the whole SavedModel "
        "again (nothing was written).") from e
  if not saved.meta_graphs:
    raise OfficialFormatError(
        f"{export_dir}/saved_model.pb holds no graph; download or copy the "
        "whole SavedModel again (nothing was written).")
  try:
    return _walk_objects(saved.meta_graphs[0].object_graph_def.nodes, graph)
  except (IndexError, KeyError) as e:
    raise OfficialFormatError(
        f"{export_dir}/saved_model.pb and its variables/ disagree (their "
        "object graphs do not match): one of them is damaged or from another "
        "export; copy the whole SavedModel again (nothing was written).") from e


def _walk_objects(nodes, graph) -> dict:
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


# === The official graph: which projection output feeds head_supervised ========

def _read_graph(weights: OfficialWeights, saved=None) -> tuple:
  """(selector the official graph shows or None, file it was read from).

  A SavedModel or TF1 hub module carries its graph; a TF1 checkpoint may
  have `model.ckpt-N.meta` beside it; tf2/run.py writes `saved_model/`
  (or `saved_model/<step>/`) beside its checkpoints. A graph the source
  itself carries must parse; one found beside a TF2 checkpoint is used only
  if it parses and its variables have the checkpoint's shapes.
  """
  if weights.form in ("tf2_saved_model", "tf1_hub"):
    export_dir = _export_dir(weights.prefix)
    saved = saved or _parse_saved_model(export_dir)
    return (_selector_of(saved.meta_graphs),
            os.path.join(export_dir, "saved_model.pb"))
  if weights.form == "tf1_checkpoint":
    path = weights.prefix + ".meta"
    if not os.path.exists(path):
      return None, ""
    meta = _parse_file(path, meta_graph_pb2.MetaGraphDef(),
                       "a TensorFlow graph",
                       "download it again, or move it away to import the "
                       "weights alone with --ft_proj_selector")
    return _selector_of([meta]), path
  for export_dir in _exports_beside(weights):
    try:
      saved = _parse_saved_model(export_dir)
    except OfficialFormatError:
      continue
    if _same_shapes(weights, export_dir):
      return (_selector_of(saved.meta_graphs),
              os.path.join(export_dir, "saved_model.pb"))
  return None, ""


def _selector_of(meta_graphs) -> Optional[int]:
  lists, functions = [], set()
  for meta in meta_graphs:
    lists.append(meta.graph_def.node)
    for function in meta.graph_def.library.function:
      lists.append(function.node_def)
      functions.add(function.signature.name)
  return selector_from_graph(lists, functions)


def _exports_beside(weights: OfficialWeights) -> list:
  folder = os.path.dirname(weights.prefix)
  found = []
  for candidate in (os.path.join(folder, "saved_model"),
                    os.path.join(folder, "saved_model",
                                 str(weights.global_step)),
                    os.path.join(os.path.dirname(folder), "saved_model")):
    if os.path.exists(os.path.join(candidate, "saved_model.pb")):
      found.append(candidate)
  return found


def _same_shapes(weights: OfficialWeights, export_dir: str) -> bool:
  """The export's variables have exactly the checkpoint's model shapes."""
  try:
    shapes = tf.train.load_checkpoint(os.path.join(
        export_dir, "variables", "variables")).get_variable_to_shape_map()
  except _READ_ERRORS:
    return False
  theirs = sorted(tuple(s) for k, s in shapes.items()
                  if k.endswith(VALUE_SUFFIX) and not k.startswith(
                      ("save_counter", "global_step", "optimizer")))
  return theirs == sorted(weights.shapes.values())
