"""The architecture of an official checkpoint, read off its shapes, and the
one thing the shapes cannot tell, read off the official graph.

Depth, width, selective kernels, SE, stem and projection head follow from
the tensors' shapes. Which projection output feeds `head_supervised` (the
official `--ft_proj_selector`) does not when the widths agree; where the
official code left a graph (a TF2 SavedModel, a TF1 hub module or `.meta`
graph), `selector_from_graph` finds the supervised head's MatMul and counts
the projection layers upstream of its input, without running anything.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Optional

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
                       ft_proj_selector: Optional[int] = None) -> ModelConfig:
  """The architecture of `weights` (see `read_architecture`)."""
  return read_architecture(weights, ft_proj_selector)[0]


def read_architecture(weights, ft_proj_selector: Optional[int] = None
                      ) -> tuple[ModelConfig, HeadInput]:
  """The architecture of `weights`, and how its supervised head's input was
  decided.

  Args:
    weights: an official checkpoint mapped onto our layers (its
      `graph_selector` and `graph_file`: what the official graph says, if
      one was found).
    ft_proj_selector: the user's --ft_proj_selector (None: not given). It
      must agree with the graph where there is one.
  Returns:
    (a float32-ready ModelConfig with global_bn off, a HeadInput).
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
  in_dim, num_classes = None, 0
  if "head_supervised/dense/kernel" in shapes:
    in_dim, num_classes = shapes["head_supervised/dense/kernel"]
  chosen = choose_head_input(
      head["widths"], in_dim, ft_proj_selector,
      getattr(weights, "graph_selector", None),
      getattr(weights, "graph_file", ""))
  config = ModelConfig(
      resnet_depth=depth, width_multiplier=width, sk_ratio=sk_ratio,
      se_ratio=se_ratio, cifar_stem=cifar_stem, global_bn=False,
      proj_head_mode=head["mode"], num_proj_layers=head["num_layers"],
      proj_out_dim=head["out_dim"], num_classes=int(num_classes),
      sup_head_input=chosen.selector, sup_head_stop_gradient=False)
  return config, chosen


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


# === Which projection output feeds head_supervised ===========================

@dataclasses.dataclass(frozen=True)
class HeadInput:
  """The projection output feeding `head_supervised`, and how it was decided.

  Attributes:
    selector: 0 (the encoder output) or k (projection layer k).
    how: 'graph' (read off the official graph, the flag agreeing or absent),
      'flag' (--ft_proj_selector, no graph to check it against), 'width'
      (the only output of the head's input width), 'assumed' (0: no graph,
      and the widths allow several), or 'no head'.
    allowed: the selectors the widths allow.
    graph_file: the file the graph was read from ('graph' only).
  """

  selector: int
  how: str
  allowed: tuple = ()
  graph_file: str = ""

  def describe(self) -> str:
    """A clause of the import's summary line."""
    k = self.selector
    if self.how == "graph":
      return (f"ft_proj_selector={k} read from the graph of "
              f"{self.graph_file}")
    if self.how == "flag":
      return f"ft_proj_selector={k} as --ft_proj_selector says (no graph)"
    if self.how == "width":
      return (f"ft_proj_selector={k}: the only projection output of the "
              "width head_supervised takes")
    if self.how == "assumed":
      others = ", ".join(str(a) for a in self.allowed if a != k)
      return (f"ft_proj_selector={k} ASSUMED: no graph to read it from and "
              f"outputs {others} fit too; --ft_proj_selector decides it "
              "(1 for the released finetuned_* models)")
    return "no supervised head"


def choose_head_input(widths: list, in_dim: Optional[int],
                      flag: Optional[int], graph: Optional[int],
                      graph_file: str = "") -> HeadInput:
  """Decides which projection output feeds `head_supervised`.

  Args:
    widths: [encoder output, projection layer 1, ...] widths.
    in_dim: the supervised head's input width (None: no supervised head).
    flag: --ft_proj_selector (None: not given).
    graph: the selector the official graph shows (None: no graph).
    graph_file: where that graph was read.
  Returns:
    A HeadInput. Raises OfficialFormatError (one line) when the flag is out
    of range, contradicts the graph, or does not fit the head's width.
  """
  last = len(widths) - 1
  if flag is not None and not 0 <= flag <= last:
    raise OfficialFormatError(
        f"--ft_proj_selector={flag} is out of range: this checkpoint's "
        f"projection head has {last} layer(s), so use 0 (encoder output) to "
        f"{last}.")
  if in_dim is None:
    return HeadInput(0 if flag is None else flag, "no head")
  allowed = tuple(k for k, w in enumerate(widths) if w == in_dim)
  if graph is not None:
    if flag is not None and flag != graph:
      raise OfficialFormatError(
          f"--ft_proj_selector={flag} contradicts the official graph in "
          f"{graph_file}, whose head_supervised reads projection output "
          f"{graph}; drop the flag (or give --ft_proj_selector={graph}).")
    if graph not in allowed:
      raise OfficialFormatError(
          f"the graph in {graph_file} feeds head_supervised from projection "
          f"output {graph} ({widths[graph] if graph <= last else 'absent'} "
          f"features) but its kernel takes {in_dim}; the graph and the "
          "weights are of different models: import the checkpoint alone.")
    return HeadInput(graph, "graph", allowed, graph_file)
  if flag is not None:
    if flag not in allowed:
      raise OfficialFormatError(
          f"--ft_proj_selector={flag}: head_supervised takes {in_dim} "
          f"features but projection output {flag} has {widths[flag]}; "
          f"use one of {', '.join(map(str, allowed)) or 'none'} (the "
          "selector it was trained on).")
    return HeadInput(flag, "flag", allowed)
  if not allowed:
    raise OfficialFormatError(
        f"head_supervised takes {in_dim} features but no projection output "
        f"has that width (widths {widths}); the checkpoint mixes "
        "architectures.")
  if len(allowed) == 1:
    return HeadInput(allowed[0], "width", allowed)
  return HeadInput(0 if 0 in allowed else allowed[0], "assumed", allowed)


_SUP_MATMUL = re.compile(
    r"(^|/)head_supervised/linear_layer/dense(_\d+)?/MatMul$")
_PROJ_MATMUL = re.compile(
    r"(^|/)(projection_head|head_contrastive)/n?l_(\d+)/dense(_\d+)?/"
    r"MatMul$")
# Ops that run another function: what they compute is not in the node list.
_CALL_OPS = frozenset(("PartitionedCall", "StatefulPartitionedCall", "If",
                       "StatelessIf", "While", "StatelessWhile", "Case"))


def selector_from_graph(node_lists: Iterable,
                        function_names: Iterable = ()) -> Optional[int]:
  """The --ft_proj_selector an official graph was built with, or None.

  For each MatMul of `head_supervised/linear_layer/dense`, walks back from
  its data input over the data edges and counts the projection layers
  (`head_contrastive/nl_J` in TF1, `projection_head/nl_J` in TF2, `l_0` for
  a linear head) it passes: their highest J + 1, or 0 when the head reads
  the encoder output. Nothing is run.

  Args:
    node_lists: the NodeDef lists of a graph (a GraphDef's nodes and each
      library function's node_def).
    function_names: the graph's library functions (a node whose op is one
      of them calls it).
  Returns:
    The selector, or None when no list holds a supervised head whose input
    is fully visible (none at all, or one fed through a function call).
    Raises OfficialFormatError when the graph's heads disagree.
  """
  calls = _CALL_OPS | frozenset(function_names)
  found = set()
  for nodes in node_lists:
    by_name = {node.name: node for node in nodes}
    for node in nodes:
      if node.op == "MatMul" and _SUP_MATMUL.search(node.name) and node.input:
        selector = _proj_layers_upstream(by_name, node.input[0], calls)
        if selector is not None:
          found.add(selector)
  if len(found) > 1:
    raise OfficialFormatError(
        f"the official graph feeds head_supervised from projection outputs "
        f"{sorted(found)} at once; import the checkpoint alone and give "
        "--ft_proj_selector.")
  return found.pop() if found else None


def _node_name(edge: str) -> str:
  return edge.split(":")[0]


def _proj_layers_upstream(by_name: dict, edge: str,
                          calls: frozenset) -> Optional[int]:
  """Highest projection layer index + 1 among the ancestors of `edge`."""
  layers, seen, stack = [], set(), [_node_name(edge)]
  while stack:
    name = stack.pop()
    if name in seen or name not in by_name:
      continue            # a function argument (the images, a variable)
    seen.add(name)
    node = by_name[name]
    if node.op in calls:
      return None         # the path runs through a function we do not see
    if node.op == "MatMul" and (m := _PROJ_MATMUL.search(name)):
      layers.append(int(m[3]))
    stack.extend(_node_name(i) for i in node.input if not i.startswith("^"))
  return max(layers) + 1 if layers else 0
