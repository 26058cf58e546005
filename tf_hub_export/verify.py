"""Checks an export's files before anything is built from them.

Every reader of an export (fine-tuning's `--init_from`, distillation's
`--teacher`, `--mode=eval`, `embed`, `predict`, and `load_export`) calls
`verify` first, so a damaged or inconsistent export fails in one line,
before a model is built or a step is trained:

  1. `saved_model.pb` parses, and its object graph lists the exported
     variables (`obj.variables`) with their names, shapes and dtypes;
  2. `variables/variables.index` reads, and every variable's tensor reads
     back from `variables.data-*` with its stored checksum (truncated or
     bit-flipped data fails here) and the shape the graph declares;
  3. the manifest (`assets.extra/simclr_tf.json`) names the same variables
     in the same order, and its architecture predicts the shapes the graph
     declares: every named output's width (block groups, encoder,
     projection layers, classes), the number of residual blocks of each
     group, selective kernels and squeeze-excite where the manifest says.

Nothing is built or run: the expected widths come from an unbuilt
`SimCLR`, which creates no variable. A verified export is remembered by
the size and modification time of its files, so several readers in one
process check it once.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from simclr_tf.models.config import ModelConfig

DATA_GLOB = "variables.data-"
VARIABLES = os.path.join("variables", "variables")
_BLOCK = re.compile(r"/(block_group\d+)/(block_\d+)/")

_verified: dict = {}


class VerifyError(ValueError):
  """What is wrong with an export's files (one line, without the fix)."""


def first_line(error: BaseException, limit: int = 160) -> str:
  """The first line of an error's message (its type if empty), shortened."""
  text = str(error).strip().splitlines()
  line = text[0] if text else type(error).__name__
  return line if len(line) <= limit else line[:limit - 3] + "..."


class ProtoFileError(ValueError):
  """A protocol buffer file could not be read or parsed (one line)."""


def read_proto(path: str, proto):
  """`proto` parsed from the file at `path`.

  Raises:
    ProtoFileError: unreadable, truncated or damaged; the message is the
      reason in one line (callers name the file and the fix).
  """
  # pylint: disable-next=g-import-not-at-top
  from google.protobuf.message import DecodeError
  try:
    with open(path, "rb") as f:
      proto.ParseFromString(f.read())
  except (DecodeError, OSError, RuntimeError, RuntimeWarning,
          ValueError) as e:
    raise ProtoFileError(first_line(e)) from e
  return proto


def _stamp(path: str) -> tuple:
  """Size and mtime of every file of the export: its identity for the cache."""
  stamp = []
  for folder, _, files in os.walk(path):
    for name in sorted(files):
      full = os.path.join(folder, name)
      info = os.stat(full)
      stamp.append((os.path.relpath(full, path), info.st_size,
                    info.st_mtime_ns))
  return tuple(sorted(stamp))


def _graph_variables(path: str) -> tuple:
  """[(name, shape, dtype)] of `obj.variables`, read from saved_model.pb."""
  # pylint: disable-next=g-import-not-at-top
  from tensorflow.core.protobuf import saved_model_pb2
  pb = os.path.join(path, "saved_model.pb")
  try:
    proto = read_proto(pb, saved_model_pb2.SavedModel())
  except ProtoFileError as e:
    raise VerifyError(f"{pb} is damaged (it does not parse: {e})") from e
  if not proto.meta_graphs or not proto.meta_graphs[0].HasField(
      "object_graph_def"):
    raise VerifyError(f"{pb} is damaged (it holds no object graph)")
  graph = proto.meta_graphs[0].object_graph_def
  root = graph.nodes[0]
  ids = [c.node_id for c in root.children if c.local_name == "variables"]
  if not ids:
    raise VerifyError(f"{pb} has no 'variables' list (not a reusable "
                      "SavedModel of simclr-tf)")
  variables = []
  for child in graph.nodes[ids[0]].children:
    node = graph.nodes[child.node_id]
    if node.WhichOneof("kind") != "variable":
      raise VerifyError(f"{pb} is damaged (variables/{child.local_name} is "
                        "not a variable)")
    shape = tuple(int(d.size) for d in node.variable.shape.dim)
    variables.append((node.variable.name, shape, int(node.variable.dtype)))
  outputs = _serve_outputs(graph)
  return tuple(variables), outputs


def _serve_outputs(graph) -> dict:
  """{output name: last dimension} of the export's `serve` endpoint."""
  root = graph.nodes[0]
  ids = [c.node_id for c in root.children if c.local_name == "serve"]
  if not ids:
    return {}
  names = list(graph.nodes[ids[0]].function.concrete_functions)
  if not names or names[0] not in graph.concrete_functions:
    return {}
  signature = graph.concrete_functions[names[0]].output_signature
  dims = {}
  for key, value in signature.dict_value.fields.items():
    shape = value.tensor_spec_value.shape.dim
    if shape:
      dims[key] = int(shape[-1].size)
  return dims


def _read_tensors(path: str, variables: tuple) -> None:
  """Reads every variable back from the data files (checksums checked)."""
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  prefix = os.path.join(path, VARIABLES)
  index = prefix + ".index"
  if not os.path.exists(index):
    raise VerifyError(f"{index} is missing")
  try:
    reader = tf.train.load_checkpoint(prefix)
  except (tf.errors.OpError, ValueError) as e:
    raise VerifyError(f"{index} is damaged ({_op_message(e)})") from e
  shapes = reader.get_variable_to_shape_map()
  names = {f"variables/{i}/.ATTRIBUTES/VARIABLE_VALUE": name
           for i, (name, _, _) in enumerate(variables)}
  for i, (name, shape, _) in enumerate(variables):
    key = f"variables/{i}/.ATTRIBUTES/VARIABLE_VALUE"
    if key not in shapes:
      raise VerifyError(f"{index} lacks the weight {name}")
    if tuple(shapes[key]) != shape:
      raise VerifyError(
          f"{index} gives {name} the shape {tuple(shapes[key])}, the graph "
          f"{shape}")
  for key in sorted(shapes):
    try:
      reader.get_tensor(key)
    except Exception as e:  # pylint: disable=broad-except
      # Damaged data fails in many ways (DataLossError, IndexError, ...).
      data = sorted(f for f in os.listdir(os.path.dirname(prefix))
                    if f.startswith(DATA_GLOB)) or [DATA_GLOB + "*"]
      raise VerifyError(
          f"{os.path.join(path, 'variables', data[0])} is damaged (reading "
          f"{names.get(key, key)}: {_op_message(e)})") from e


def _op_message(error: Exception) -> str:
  text = getattr(error, "message", None) or str(error) or type(error).__name__
  return text.strip().splitlines()[0][:120]


def expected_widths(config: ModelConfig, image_size: int) -> dict:
  """{output name: last dimension} the architecture gives, from an unbuilt
  model (no variable is created)."""
  # pylint: disable=g-import-not-at-top
  from simclr_tf.models.simclr import SimCLR, proj_layer_key
  net = SimCLR(config)
  size = (1, image_size, image_size, 3)
  widths = {k: int(v[-1])
            for k, v in net.backbone.compute_output_shape(size).items()}
  hidden = net.proj_head.compute_output_shape((1, net.backbone.output_dim))
  widths["default"] = widths["final_avg_pool"]
  widths["proj_head_input"] = int(hidden[0][-1])
  for j, shape in enumerate(hidden[1:], start=1):
    widths[proj_layer_key(j)] = int(shape[-1])
  widths["proj_head_output"] = int(hidden[-1][-1])
  if config.num_classes:
    widths["logits_sup"] = int(config.num_classes)
  blocks = {f"block_group{g + 1}": len(group.blocks)
            for g, group in enumerate(net.backbone.block_groups)}
  stem = {f"/stem/{conv.name}/kernel": tuple(conv.kernel_size)
          for conv in net.backbone.stem.convs}
  return {"outputs": widths, "blocks": blocks, "stem": stem,
          "sup_input": (int(hidden[config.sup_head_input][-1])
                        if config.num_classes else None)}


def _check_manifest(meta, variables: tuple, outputs: dict) -> None:
  """The manifest names the graph's variables and predicts its shapes."""
  names = [name for name, _, _ in variables]
  paths = list(meta.variable_paths)
  if len(paths) != len(names):
    raise VerifyError(f"it names {len(paths)} weights but the SavedModel "
                      f"holds {len(names)}")
  # Exports of 0.1 name their variables by layer only ('simclr/kernel');
  # since then every name is the variable's unique path, checked here.
  for path, name in zip(paths, names if len(set(names)) == len(names)
                        else paths):
    if path != name:
      raise VerifyError(f"it names weight {path!r} where the SavedModel "
                        f"holds {name!r}")
  # From here on the weights are named by the manifest's paths (equal to
  # the graph's names where those are paths) and shaped by the graph.
  names = paths
  shapes = {path: shape for path, (_, shape, _) in zip(paths, variables)}
  expected = expected_widths(meta.model_config, meta.image_size)
  for key in sorted(set(outputs) | set(expected["outputs"])):
    want, got = expected["outputs"].get(key), outputs.get(key)
    if want != got:
      raise VerifyError(
          f"its architecture gives output {key!r} "
          f"{'no output' if want is None else f'width {want}'} but the "
          f"SavedModel's is {'missing' if got is None else f'{got} wide'}")
  counted: dict = {}
  for name in names:
    match = _BLOCK.search(name)
    if match:
      counted.setdefault(match.group(1), set()).add(match.group(2))
  for group, count in expected["blocks"].items():
    if len(counted.get(group, ())) != count:
      raise VerifyError(
          f"its architecture (--resnet_depth="
          f"{meta.model_config.resnet_depth}) has {count} blocks in {group} "
          f"but the SavedModel has {len(counted.get(group, ()))}")
  stem = {n: s[:2] for n, s in shapes.items() if "/stem/" in n and
          n.endswith("/kernel")}
  want_stem = {n: k for n, s in stem.items()
               for suffix, k in expected["stem"].items() if n.endswith(suffix)}
  if len(stem) != len(expected["stem"]) or any(
      stem[n] != k for n, k in want_stem.items()) or len(want_stem) != len(
          stem):
    raise VerifyError(
        f"its stem (cifar_stem={meta.model_config.cifar_stem}) has kernels "
        f"{sorted(expected['stem'].values())} but the SavedModel's are "
        f"{sorted(stem.values())}")
  for flag, marker, wanted in (
      ("sk_ratio", "/sk_", meta.model_config.sk_ratio > 0),
      ("se_ratio", "/se/", meta.model_config.se_ratio > 0)):
    present = any(marker in name for name in names)
    if present != wanted:
      raise VerifyError(
          f"it says {flag}={getattr(meta.model_config, flag)} but the "
          f"SavedModel {'has' if present else 'has no'} such layers")
  kernels = [s for n, s in shapes.items()
             if "head_supervised" in n and n.endswith("kernel")]
  if kernels and expected["sup_input"] is not None and \
      kernels[0][0] != expected["sup_input"]:
    raise VerifyError(
        f"its supervised head reads projection output "
        f"{meta.model_config.sup_head_input} ({expected['sup_input']} wide) "
        f"but the head's kernel takes {kernels[0][0]} inputs")


def verify(path: str, meta) -> None:
  """Raises VerifyError if the export at `path` (already resolved) is
  damaged or disagrees with its manifest `meta`."""
  stamp = _stamp(path)
  if _verified.get(path) == stamp:
    return
  variables, outputs = _graph_variables(path)
  _read_tensors(path, variables)
  try:
    _check_manifest(meta, variables, outputs)
  except VerifyError as e:
    from tf_hub_export.export import META_DIR, META_FILE  # pylint: disable=g-import-not-at-top
    raise VerifyError(
        f"{os.path.join(path, META_DIR, META_FILE)} disagrees with the "
        f"weights: {e}") from e
  _verified[path] = stamp


def forget(path: Optional[str] = None) -> None:
  """Drops remembered verifications (all, or of one export)."""
  if path is None:
    _verified.clear()
  else:
    _verified.pop(path, None)
