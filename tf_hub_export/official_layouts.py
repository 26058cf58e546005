"""The official SimCLR key layouts, mapped onto the paths of our layers.

TF2 keys (`model/resnet_model/block_groups/G/layers/B/...`, from a training
checkpoint or a SavedModel's object graph) name each layer by its Python
attribute, so they map directly, entry kinds checked against the official
basic and bottleneck blocks. TF1 keys (`base_model/conv2d_K/kernel`,
`base_model/batch_normalization_K/...`) only number the layers in creation
order, so the TF1 sequence is parsed with the official block grammar
(shortcut, 1x1, 3x3 or selective kernel, 1x1, SE), checking every shape on
the way; indices are compared as numbers, never sorted as strings.

Our paths are those of `simclr_tf.models` without the model name:
`resnet/stem/conv_0/kernel`, `resnet/block_group2/block_0/sk_1/reduce_bn/
gamma`, `proj_head/layer_1/dense/kernel`, `head_supervised/dense/bias`.
"""

from __future__ import annotations

import re
from typing import Optional

from simclr_tf.models import blocks as blocks_lib

BN_PARAMS = ("gamma", "beta", "moving_mean", "moving_variance")
VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# Optimizer state, step counters and bookkeeping: never part of the model.
_TF1_IGNORED = re.compile(
    r"(^|/)(global_step|beta[12]_power)$|/(Momentum|Adam|Adam_1|RMSProp|"
    r"RMSProp_1|ExponentialMovingAverage)$")
_TF2_IGNORED = re.compile(
    r"^(_CHECKPOINTABLE_OBJECT_GRAPH|global_step|save_counter|optimizer)"
    r"(/|$)|\.OPTIMIZER_SLOT/")


class OfficialFormatError(ValueError):
  """Not an official SimCLR checkpoint, or one this importer cannot read."""


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


def map_tf2(structural: dict, all_keys: list) -> tuple[dict, list]:
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
    if not key.endswith(VALUE_SUFFIX) and not _TF2_IGNORED.search(key):
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


def map_tf1(keys: list, shapes: dict, ema: bool) -> tuple[dict, list]:
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
                   blocks_lib.BOTTLENECK_EXPANSION * filters)
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


