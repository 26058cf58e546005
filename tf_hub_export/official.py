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
from typing import Optional

import numpy as np
import tensorflow as tf

from simclr_tf.config import ModelConfig, whole_channels
from simclr_tf.models import resnet as resnet_lib

FORMS = ("tf1_checkpoint", "tf1_hub", "tf2_checkpoint", "tf2_saved_model")
PAPER_SK_RATIO = 0.0625     # SimCLRv2, section 2: 1/16
BN_PARAMS = ("gamma", "beta", "moving_mean", "moving_variance")
_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# Optimizer state, step counters and bookkeeping: never part of the model.
_TF1_IGNORED = re.compile(
    r"(^|/)(global_step|beta[12]_power)$|/(Momentum|Adam|Adam_1|RMSProp|"
    r"RMSProp_1|ExponentialMovingAverage)$")
_TF2_IGNORED = re.compile(
    r"^(_CHECKPOINTABLE_OBJECT_GRAPH|global_step|save_counter|optimizer)"
    r"(/|$)|\.OPTIMIZER_SLOT/")
# Object-graph edges that list variables a second time (Keras bookkeeping).
_ALIAS_EDGES = frozenset((
    "variables", "trainable_variables", "non_trainable_variables",
    "keras_api", "trainable_variables_list", "trainable_weights",
    "non_trainable_weights", "weights", "signatures", "__call__",
    "_self_unconditional_dependency_names"))


class OfficialFormatError(ValueError):
  """Not an official SimCLR checkpoint, or one this importer cannot read."""


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
    mapping, leftovers = _map_tf1(keys, shapes, ema)
  elif kind == "checkpoint" and any(
      k.startswith("model/resnet_model/") for k in keys):
    form = "tf2_checkpoint"
    _no_ema(ema, form)
    mapping, leftovers = _map_tf2(
        {k[:-len(_VALUE_SUFFIX)]: k for k in keys
         if k.endswith(_VALUE_SUFFIX) and ".OPTIMIZER_SLOT" not in k}, keys)
  elif kind == "saved_model":
    form = "tf2_saved_model"
    _no_ema(ema, form)
    structural = _saved_model_paths(os.path.dirname(os.path.dirname(prefix)),
                                    reader)
    if not any(p.startswith("model/resnet_model/") for p in structural):
      raise _not_simclr(prefix, keys)
    mapping, leftovers = _map_tf2(structural, [])
  else:
    raise _not_simclr(prefix, keys)
  step = 0
  for key in ("global_step", "global_step" + _VALUE_SUFFIX):
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


# --- TF2: attribute paths ---------------------------------------------------

_TF2_STEM = re.compile(r"^model/resnet_model/initial_conv_relu_max_pool/"
                       r"(\d+)/(.+)$")
_TF2_BLOCK = re.compile(r"^model/resnet_model/block_groups/(\d+)/layers/(\d+)/"
                        r"(projection_layers|shortcut_layers|"
                        r"conv_relu_dropblock_layers|conv2d_bn_layers)/(\d+)/"
                        r"(.+)$")
_TF2_BLOCK_SE = re.compile(r"^model/resnet_model/block_groups/(\d+)/layers/"
                           r"(\d+)/se_layer/(.+)$")
_TF2_HEAD = re.compile(r"^model/_projection_head/linear_layers/(\d+)/"
                       r"(dense/kernel|bn_relu/bn/\w+)$")
_TF2_SUP = re.compile(r"^model/supervised_head/linear_layer/dense/"
                      r"(kernel|bias)$")
_TF2_SK = {"conv2d_fixed_padding/conv2d/kernel": "conv/kernel",
           "conv2d_0/kernel": "reduce/kernel",
           "conv2d_1/kernel": "expand/kernel"}
_TF2_SK.update({f"batch_norm_relu/bn/{p}": f"bn/{p}" for p in BN_PARAMS})
_TF2_SK.update({f"batch_norm_relu_1/bn/{p}": f"reduce_bn/{p}"
                for p in BN_PARAMS})
_TF2_SE = {f"se_{a}/{b}": f"{a}/{b}" for a in ("reduce", "expand")
           for b in ("kernel", "bias")}
# Sublayer names of our blocks, by the kinds of the official list entries.
_BLOCK_LAYOUTS = {
    ("conv", "bn", "conv", "bn", "conv", "bn"):
        ("conv_0", "bn_0", "conv_1", "bn_1", "conv_2", "bn_2"),
    ("conv", "bn", "sk", "conv", "bn"):
        ("conv_0", "bn_0", "sk_1", "conv_2", "bn_2"),
    ("conv", "bn", "conv", "bn"): ("conv_0", "bn_0", "conv_1", "bn_1"),
}


def _entry_kind(rests: dict) -> str:
  names = set(rests)
  if names == {"conv2d/kernel"}:
    return "conv"
  if names and all(n.startswith("bn/") for n in names):
    return "bn"
  if names and names <= set(_TF2_SK):
    return "sk"
  if names and names <= set(_TF2_SE):
    return "se"
  return "unknown(" + ", ".join(sorted(names)) + ")"


def _entry_params(kind: str, rests: dict) -> dict:
  if kind == "conv":
    return {"kernel": rests["conv2d/kernel"]}
  if kind == "bn":
    return {n[len("bn/"):]: k for n, k in rests.items()}
  return {(_TF2_SK if kind == "sk" else _TF2_SE)[n]: k
          for n, k in rests.items()}


def _map_tf2(structural: dict, all_keys: list) -> tuple[dict, list]:
  """Our path -> key from TF2 attribute paths (path -> checkpoint key)."""
  mapping, leftovers = {}, []
  stem, blocks = {}, {}
  for path, key in sorted(structural.items()):
    if m := _TF2_STEM.match(path):
      stem.setdefault(int(m[1]), {})[m[2]] = key
    elif m := _TF2_BLOCK.match(path):
      block = blocks.setdefault((int(m[1]), int(m[2])), {})
      block.setdefault(m[3], {}).setdefault(int(m[4]), {})[m[5]] = key
    elif m := _TF2_BLOCK_SE.match(path):
      block = blocks.setdefault((int(m[1]), int(m[2])), {})
      block.setdefault("se_layer", {}).setdefault(0, {})[m[3]] = key
    elif m := _TF2_HEAD.match(path):
      name = m[2].replace("bn_relu/bn/", "bn/")
      mapping[f"proj_head/layer_{int(m[1]) + 1}/{name}"] = key
    elif m := _TF2_SUP.match(path):
      mapping[f"head_supervised/dense/{m[1]}"] = key
    elif not _TF2_IGNORED.search(path):
      leftovers.append(path)
  for key in all_keys:
    if not key.endswith(_VALUE_SUFFIX) and not _TF2_IGNORED.search(key):
      leftovers.append(key)

  kinds = [_entry_kind(stem[i]) for i in sorted(stem)]
  if kinds not in (["conv", "bn"], ["conv", "bn"] * 3):
    raise OfficialFormatError(
        f"unknown TF2 stem layout {kinds}; expected one conv + batch norm "
        "(CIFAR or 7x7 stem) or three (ResNet-D stem).")
  for n, i in enumerate(sorted(stem)):
    name = f"conv_{n // 2}" if n % 2 == 0 else f"bn_{n // 2}"
    for param, key in _entry_params(kinds[n], stem[i]).items():
      mapping[f"resnet/stem/{name}/{param}"] = key

  for (g, b), lists in sorted(blocks.items()):
    prefix = f"resnet/block_group{g + 1}/block_{b}"
    for list_name, entries in lists.items():
      kinds = tuple(_entry_kind(entries[i]) for i in sorted(entries))
      if list_name in ("projection_layers", "shortcut_layers"):
        names = ("shortcut_conv", "shortcut_bn")
        if kinds != ("conv", "bn"):
          names = ()
      elif list_name == "se_layer":
        names = ("se",) if kinds == ("se",) else ()
      else:
        se = kinds[-1:] == ("se",)
        names = _BLOCK_LAYOUTS.get(kinds[:-1] if se else kinds, ())
        names = names + ("se",) if names and se else names
      if not names:
        raise OfficialFormatError(
            f"unknown TF2 layout of {prefix} ({list_name}: {list(kinds)}); "
            "expected the official basic or bottleneck block.")
      for name, i in zip(names, sorted(entries)):
        for param, key in _entry_params(_entry_kind(entries[i]),
                                        entries[i]).items():
          mapping[f"{prefix}/{name}/{param}"] = key
  return mapping, leftovers


# --- TF1: names numbered in creation order ----------------------------------

_TF1_LAYER = re.compile(r"^base_model/(conv2d|batch_normalization)(?:_(\d+))?/"
                        r"(\w+)$")
_TF1_HEAD = re.compile(r"^head_contrastive/(?:nl|l)_(\d+)/"
                       r"(dense/kernel|batch_normalization/\w+)$")
_TF1_SUP = re.compile(r"^head_supervised/linear_layer/dense/(kernel|bias)$")


class _Sequence:
  """The TF1 convolutions and batch norms in creation order, consumed while
  parsing, each checked against the shape the grammar expects."""

  def __init__(self, convs: list, bns: list, shapes: dict):
    self.convs, self.bns, self.shapes = convs, bns, shapes
    self.ci = self.bi = 0
    self.mapping = {}

  def peek(self, ahead: int = 0) -> Optional[tuple]:
    """(kh, kw, cin, cout, has_bias) of a coming convolution, or None."""
    i = self.ci + ahead
    if i >= len(self.convs):
      return None
    params = self.convs[i]
    return tuple(self.shapes[params["kernel"]]) + ("bias" in params,)

  def conv(self, path: str, kernel: int, cin: int, cout: Optional[int],
           bias: bool = False) -> int:
    found = self.peek()
    name = f"base_model/conv2d{'_%d' % self.ci if self.ci else ''}"
    want = (kernel, kernel, cin, cout if cout is not None else found and
            found[3], bias)
    if found is None or found != want:
      raise OfficialFormatError(
          f"unknown TF1 layout at {name} (our {path}): expected a "
          f"{kernel}x{kernel} conv {cin}->{cout or '?'}"
          f"{' with bias' if bias else ''}, found "
          f"{'nothing' if found is None else found[:4]}.")
    for param, key in self.convs[self.ci].items():
      self.mapping[f"{path}/{param}"] = key
    self.ci += 1
    return found[3]

  def bn(self, path: str, channels: int) -> None:
    name = (f"base_model/batch_normalization"
            f"{'_%d' % self.bi if self.bi else ''}")
    params = self.bns[self.bi] if self.bi < len(self.bns) else None
    shape = params and tuple(self.shapes[params["gamma"]])
    if params is None or shape != (channels,) or set(params) != set(BN_PARAMS):
      raise OfficialFormatError(
          f"unknown TF1 layout at {name} (our {path}): expected a batch norm "
          f"of {channels} channels with {', '.join(BN_PARAMS)}, found "
          f"{shape if params else 'nothing'}.")
    for param, key in params.items():
      self.mapping[f"{path}/{param}"] = key
    self.bi += 1


def _numbered(keys: list, kind: str) -> list:
  """[{param: key}] of base_model/<kind>_K, in order of K (as a number)."""
  layers = {}
  for key, (k, index, param) in keys:
    if k == kind:
      layers.setdefault(index, {})[param] = key
  order = sorted(layers)
  if order != list(range(len(order))):
    missing = sorted(set(range(order[-1] + 1)) - set(order))[:3]
    raise OfficialFormatError(
        f"the TF1 checkpoint lacks base_model/{kind}_{missing[0]} (numbers "
        "must run without gaps); it is incomplete.")
  return [layers[i] for i in order]


def _map_tf1(keys: list, shapes: dict, ema: bool) -> tuple[dict, list]:
  """Our path -> key for a TF1 checkpoint (`ema_model/` copy if `ema`)."""
  if ema and not any(k.startswith("ema_model/") for k in keys):
    raise OfficialFormatError(
        "--ema: this TF1 checkpoint has no ema_model/ copy; import it "
        "without --ema.")
  own = "ema_model/" if ema else ""
  other = "" if ema else "ema_model/"
  layers, mapping, leftovers = [], {}, []
  for key in keys:
    if _TF1_IGNORED.search(key):
      continue
    if own and not key.startswith(own):
      continue      # with --ema the online weights are the other copy
    if not own and key.startswith("ema_model/"):
      continue
    name = key[len(own):]
    if m := _TF1_LAYER.match(name):
      layers.append((key, (m[1], int(m[2] or 0), m[3])))
    elif m := _TF1_HEAD.match(name):
      param = m[2].replace("batch_normalization/", "bn/")
      mapping[f"proj_head/layer_{int(m[1]) + 1}/{param}"] = key
    elif m := _TF1_SUP.match(name):
      mapping[f"head_supervised/dense/{m[1]}"] = key
    elif not (other and key.startswith(other)):
      leftovers.append(key)
  seq = _Sequence(_numbered(layers, "conv2d"),
                  _numbered(layers, "batch_normalization"), shapes)
  _parse_tf1_resnet(seq)
  if seq.ci != len(seq.convs) or seq.bi != len(seq.bns):
    raise OfficialFormatError(
        f"unknown TF1 layout: {len(seq.convs) - seq.ci} conv(s) and "
        f"{len(seq.bns) - seq.bi} batch norm(s) left after the fourth "
        "block group.")
  mapping.update(seq.mapping)
  return mapping, leftovers


def _parse_tf1_resnet(seq: _Sequence) -> None:
  """Walks the official creation order: stem, then blocks of 4 groups."""
  channels, n = 3, 0
  while seq.peek() and seq.peek()[0] != 1:
    kernel = seq.peek()[0]
    channels = seq.conv(f"resnet/stem/conv_{n}", kernel, channels, None)
    seq.bn(f"resnet/stem/bn_{n}", channels)
    n += 1
  if n not in (1, 3):
    raise OfficialFormatError(
        f"unknown TF1 stem of {n} convolutions; expected 1 (CIFAR or 7x7) "
        "or 3 (ResNet-D).")
  if seq.peek() is None or seq.peek(1) is None:
    raise OfficialFormatError("the TF1 checkpoint has no residual blocks.")
  bottleneck = seq.peek(1)[0] == 1
  group, block = 0, 0
  while seq.peek() is not None:
    projection = seq.peek()[0] == 1 and (
        not bottleneck or (seq.peek(1) is not None and seq.peek(1)[0] == 1))
    if projection:
      group, block = group + 1, 0
    if group == 0 or group > 4:
      raise OfficialFormatError(
          "unknown TF1 layout: a block group must start with a projection "
          f"shortcut and there are 4 groups (found group {group}).")
    path = f"resnet/block_group{group}/block_{block}"
    channels = _parse_tf1_block(seq, path, channels, projection, bottleneck)
    block += 1
  if group != 4:
    raise OfficialFormatError(
        f"unknown TF1 layout: {group} block groups; expected 4.")


def _parse_tf1_block(seq: _Sequence, path: str, channels: int,
                     projection: bool, bottleneck: bool) -> int:
  """One residual block; returns its output channels."""
  if projection:
    out = seq.conv(f"{path}/shortcut_conv", 1, channels, None)
    seq.bn(f"{path}/shortcut_bn", out)
  if bottleneck:
    filters = seq.conv(f"{path}/conv_0", 1, channels, None)
    seq.bn(f"{path}/bn_0", filters)
    nxt = seq.peek()
    if nxt is not None and nxt[3] == 2 * filters:   # selective kernel
      seq.conv(f"{path}/sk_1/conv", 3, filters, 2 * filters)
      seq.bn(f"{path}/sk_1/bn", 2 * filters)
      mid = seq.conv(f"{path}/sk_1/reduce", 1, filters, None)
      seq.bn(f"{path}/sk_1/reduce_bn", mid)
      seq.conv(f"{path}/sk_1/expand", 1, mid, 2 * filters)
    else:
      seq.conv(f"{path}/conv_1", 3, filters, filters)
      seq.bn(f"{path}/bn_1", filters)
    out = seq.conv(f"{path}/conv_2", 1, filters,
                   resnet_lib.BOTTLENECK_EXPANSION * filters)
  else:
    filters = seq.conv(f"{path}/conv_0", 3, channels, None)
    seq.bn(f"{path}/bn_0", filters)
    out = seq.conv(f"{path}/conv_1", 3, filters, filters)
  seq.bn(f"{path}/{'bn_2' if bottleneck else 'bn_1'}", out)
  if not projection and out != channels:
    raise OfficialFormatError(
        f"unknown TF1 layout at {path}: an identity shortcut from {channels} "
        f"to {out} channels.")
  nxt = seq.peek()
  if nxt is not None and nxt[4]:                    # SE: 1x1 convs with bias
    reduced = seq.conv(f"{path}/se/reduce", 1, out, None, bias=True)
    seq.conv(f"{path}/se/expand", 1, reduced, out, bias=True)
  return out


# === The architecture =========================================================

def _ratio(pairs: set, floor: int, candidates: tuple) -> float:
  """A ratio r with max(int(f * r), floor) == d for every (f, d) in pairs."""
  tried = list(candidates) + sorted({d / f for f, d in pairs if d > floor},
                                    reverse=True)
  for r in tried:
    if all(max(int(f * r), floor) == d for f, d in pairs):
      return r
  raise OfficialFormatError(
      f"no single ratio gives the widths {sorted(pairs)} (filters, width); "
      "the checkpoint mixes block configurations this importer does not "
      "know.")


def infer_model_config(weights: OfficialWeights,
                       sup_head_input: int = 0) -> ModelConfig:
  """The architecture of `weights`, from their shapes alone.

  Args:
    weights: an official checkpoint mapped onto our layers.
    sup_head_input: which projection-head output feeds the supervised head
      (the official --ft_proj_selector; not visible in the weights when the
      widths agree).
  Returns:
    A float32-ready ModelConfig with global_bn off.
  """
  shapes = weights.shapes
  stem = sorted(p for p in shapes if re.match(r"resnet/stem/conv_\d+/kernel$",
                                              p))
  groups = []
  for g in range(1, 5):
    blocks = {int(m[1]) for p in shapes
              if (m := re.match(rf"resnet/block_group{g}/block_(\d+)/", p))}
    groups.append(len(blocks))
  bottleneck = "resnet/block_group1/block_0/conv_2/kernel" in shapes
  kind = "bottleneck" if bottleneck else "basic"
  depth = next((d for d, (t, counts) in resnet_lib.BLOCK_TYPES.items()
                if t == kind and tuple(counts) == tuple(groups)), None)
  if depth is None:
    known = ", ".join(f"{d} ({t} {list(c)})"
                      for d, (t, c) in resnet_lib.BLOCK_TYPES.items())
    raise OfficialFormatError(
        f"unknown depth: block groups of {groups} {kind} blocks; this "
        f"importer knows ResNet {known}.")
  filters = shapes["resnet/block_group1/block_0/conv_0/kernel"][3]
  width = filters / resnet_lib.GROUP_FILTERS[0]
  if not whole_channels(width):
    raise OfficialFormatError(
        f"unknown width: the first block group has {filters} channels, not "
        f"a whole multiple of {resnet_lib.GROUP_FILTERS[0]} / 4.")
  width = int(width) if float(width).is_integer() else width
  cifar_stem = len(stem) == 1 and shapes[stem[0]][0] == 3
  resnet_d = len(stem) == 3

  sk_pairs = {(shapes[p.replace("sk_1/reduce/", "sk_1/conv/")][2],
               shapes[p][3])
              for p in shapes if p.endswith("sk_1/reduce/kernel")}
  if sk_pairs and not (resnet_d or cifar_stem):
    raise OfficialFormatError(
        "unknown layout: selective kernels with a 7x7 stem (the official "
        "code pairs them with the ResNet-D stem).")
  if resnet_d and not sk_pairs and bottleneck:
    raise OfficialFormatError(
        "unknown layout: a ResNet-D stem without selective kernels.")
  sk_ratio = (_ratio(sk_pairs, resnet_lib.SK_MIN_DIM, (PAPER_SK_RATIO,))
              if sk_pairs else (PAPER_SK_RATIO if resnet_d else 0.0))
  se_pairs = set()
  for p in shapes:
    if p.endswith("/se/reduce/kernel"):
      block = p[:-len("se/reduce/kernel")]
      base = shapes[block + "conv_0/kernel"][3]
      se_pairs.add((base, shapes[p][3]))
  se_ratio = _ratio(se_pairs, 1, (0.25, 0.0625)) if se_pairs else 0.0

  head = _infer_head(shapes, filters * (4 if bottleneck else 1) * 8)
  num_classes, sup_input = 0, 0
  if "head_supervised/dense/kernel" in shapes:
    in_dim, num_classes = shapes["head_supervised/dense/kernel"]
    widths = head["widths"]
    if sup_head_input > len(widths) - 1:
      raise OfficialFormatError(
          f"--ft_proj_selector={sup_head_input}: the projection head has "
          f"only {len(widths) - 1} layer(s).")
    if widths[sup_head_input] != in_dim:
      raise OfficialFormatError(
          f"--ft_proj_selector={sup_head_input}: head_supervised takes "
          f"{in_dim} features but projection output {sup_head_input} has "
          f"{widths[sup_head_input]}; choose the selector it was trained "
          "on.")
    sup_input = sup_head_input
  return ModelConfig(
      resnet_depth=depth, width_multiplier=width, sk_ratio=sk_ratio,
      se_ratio=se_ratio, cifar_stem=cifar_stem, global_bn=False,
      proj_head_mode=head["mode"], num_proj_layers=head["num_layers"],
      proj_out_dim=head["out_dim"], num_classes=int(num_classes),
      sup_head_input=sup_input, sup_head_stop_gradient=False)


def _infer_head(shapes: dict, backbone_dim: int) -> dict:
  """Mode, layers, output width and [input, layer 1, ...] widths."""
  count = 0
  while f"proj_head/layer_{count + 1}/dense/kernel" in shapes:
    count += 1
  widths = [backbone_dim]
  for j in range(1, count + 1):
    cin, cout = shapes[f"proj_head/layer_{j}/dense/kernel"]
    last = j == count
    has_beta = f"proj_head/layer_{j}/bn/beta" in shapes
    if cin != widths[-1] or (not last and cout != cin) or has_beta == last:
      raise OfficialFormatError(
          f"unknown projection head: layer {j} maps {cin} -> {cout} "
          f"features{' with' if has_beta else ' without'} a batch-norm beta; "
          "expected middle layers that keep the width (with beta) and a "
          "last layer without beta.")
    widths.append(cout)
  defaults = ModelConfig()
  if count == 0:
    return {"mode": "none", "num_layers": defaults.num_proj_layers,
            "out_dim": defaults.proj_out_dim, "widths": widths}
  if count == 1:
    return {"mode": "linear", "num_layers": defaults.num_proj_layers,
            "out_dim": widths[-1], "widths": widths}
  return {"mode": "nonlinear", "num_layers": count, "out_dim": widths[-1],
          "widths": widths}
