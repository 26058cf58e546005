"""The architecture of an official checkpoint, read off its shapes alone."""

from __future__ import annotations

import re

from simclr_tf.models.config import ModelConfig, whole_channels
from simclr_tf.models import blocks as blocks_lib
from simclr_tf.models import resnet as resnet_lib
from tf_hub_export.official_layouts import OfficialFormatError

PAPER_SK_RATIO = 0.0625     # SimCLRv2, section 2: 1/16


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


def infer_model_config(weights,
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
  sk_ratio = (_ratio(sk_pairs, blocks_lib.SK_MIN_DIM, (PAPER_SK_RATIO,))
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

