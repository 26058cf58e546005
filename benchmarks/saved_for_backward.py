r"""What a training step keeps for its backward pass, by kind of tensor.

The peak memory of a training step is, mostly, the activations the forward
pass leaves for the backward pass. This script traces the bare step of a
configuration of `benchmarks/throughput.py` (the model, the task's loss and
the optimizer in one `tf.function`) and lists the tensors of its forward
pass (the ancestors of the loss) that an op of the backward pass or the
update reads: which op made each, which op reads it, and their sizes from
the static shapes. Variables and constants are left out; a tensor passed on
unchanged (`Identity`, `IdentityN`, a `Pad` that pads nothing) counts once,
as the tensor it passes on.

It reads the graph, not the memory: what TensorFlow's allocator holds on
top (the backward pass's own gradients in flight, the runtime, the input
pipeline) is the peak of `throughput.py` minus this. docs/performance.md
("What the backward pass keeps") has the float32 pretraining step's.

  .venv/bin/python benchmarks/saved_for_backward.py \
      --config pretrain-bare-fp32-b256 [--top 12] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import simclr_tf  # noqa: F401  (chooses oneDNN before TensorFlow loads)  pylint: disable=unused-import,g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position

# Ops whose output is never kept on its own account.
_NOT_ACTIVATIONS = frozenset({"ReadVariableOp", "Const", "VarHandleOp",
                              "ResourceGather"})
_PASS_ON = frozenset({"Identity", "IdentityN"})


@dataclasses.dataclass(frozen=True)
class Kept:
  """One tensor of the forward pass that the backward pass reads."""

  name: str
  producer: str        # op type that made it
  consumers: tuple     # op types of the backward pass that read it
  num_bytes: int       # from the static shape; 0 where it is unknown


def _num_bytes(tensor) -> int:
  shape = tensor.shape
  if shape.rank is None or not shape.is_fully_defined():
    return 0
  return int(np.prod(shape.as_list(), dtype=np.int64)) * tensor.dtype.size


def _pads_nothing(op) -> bool:
  if op.type not in ("Pad", "PadV2") or op.inputs[1].op.type != "Const":
    return False
  return not np.any(tf.make_ndarray(op.inputs[1].op.get_attr("value")))


def _source(tensor):
  """The tensor that `tensor` passes on unchanged (itself if none)."""
  while True:
    op = tensor.op
    if op.type in _PASS_ON:
      tensor = op.inputs[tensor.value_index]
    elif _pads_nothing(op):
      tensor = op.inputs[0]
    else:
      return tensor


def forward_ops(loss) -> set:
  """Names of the ops `loss` depends on (the forward pass)."""
  names, todo = set(), [loss.op]
  while todo:
    op = todo.pop()
    if op.name not in names:
      names.add(op.name)
      # Data inputs only: a tf.function's outputs wait for its updates
      # (control inputs), which are not part of the forward pass.
      todo.extend(t.op for t in op.inputs)
  return names


def _run_ops(graph) -> set:
  """Names of the ops a call of `graph` runs: the ancestors, through data
  and control inputs, of its outputs and control outputs (its updates).
  Ops that nothing reads (such as the identities `tf.custom_gradient`
  leaves in the graph) are pruned before the step runs."""
  names = set()
  todo = [t.op for t in graph.outputs] + list(
      getattr(graph, "control_outputs", []))
  while todo:
    op = todo.pop()
    if op.name not in names:
      names.add(op.name)
      todo.extend(t.op for t in op.inputs)
      todo.extend(op.control_inputs)
  return names


def kept_tensors(graph, loss) -> list:
  """The forward pass's tensors that the rest of `graph` reads.

  Args:
    graph: a FuncGraph holding the forward pass, its gradient and anything
      else (the update).
    loss: the tensor whose ancestors are the forward pass.
  Returns:
    [Kept], one per tensor (tensors passed on unchanged resolved to their
    source), largest first.
  """
  forward = forward_ops(loss)
  run = _run_ops(graph)
  readers = collections.defaultdict(set)
  sources = {}
  for op in graph.get_operations():
    if op.name in forward or op.name not in run:
      continue
    for tensor in op.inputs:
      if tensor.op.name not in forward:
        continue
      source = _source(tensor)
      if (source.op.type in _NOT_ACTIVATIONS or
          source.dtype.name == "resource" or source.op.name not in forward):
        continue
      sources[source.name] = source
      readers[source.name].add(op.type)
  kept = [Kept(name, t.op.type, tuple(sorted(readers[name])), _num_bytes(t))
          for name, t in sources.items()]
  return sorted(kept, key=lambda k: (-k.num_bytes, k.name))


def by_kind(kept: list) -> list:
  """[(producer, consumers, count, bytes)], largest first."""
  groups = collections.defaultdict(lambda: [0, 0])
  for k in kept:
    group = groups[(k.producer, " ".join(k.consumers))]
    group[0] += 1
    group[1] += k.num_bytes
  return sorted(((p, c, n, b) for (p, c), (n, b) in groups.items()),
                key=lambda g: -g[3])


def trace_bare_step(name: str):
  """(graph, loss) of the bare step of throughput.py's configuration."""
  config = throughput.parse_config(name)
  if config.get("kind") != "tf" or config.get("tier") != "bare":
    raise SystemExit(f"--config={name} is not a bare TensorFlow step; use "
                     "TASK-bare-PREC-bBATCH (see benchmarks/throughput.py).")
  work_dir = tempfile.mkdtemp(prefix="saved-for-backward-")
  _, cfg, plan = throughput.prepare(config, work_dir, "")
  step, data = throughput.build_bare_step(cfg, plan)
  graph = step.get_concrete_function(data).graph
  return graph, graph.outputs[0]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="pretrain-bare-fp32-b256")
  p.add_argument("--top", type=int, default=12,
                 help="also list the N largest tensors")
  p.add_argument("--json", default="", help="write the figures here")
  a = p.parse_args(argv)
  graph, loss = trace_bare_step(a.config)
  kept = kept_tensors(graph, loss)
  total = sum(k.num_bytes for k in kept)
  print(f"{a.config}: {total / 2**30:.3f} GiB kept for the backward pass "
        f"in {len(kept)} tensors")
  print(f"{'GiB':>7s} {'count':>5s}  made by -> read by")
  kinds = by_kind(kept)
  for producer, consumers, count, num_bytes in kinds:
    if num_bytes:
      print(f"{num_bytes / 2**30:7.3f} {count:5d}  {producer} -> {consumers}")
  for k in kept[:a.top]:
    print(f"{k.num_bytes / 2**20:9.1f} MiB  {k.name}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"config": a.config, "machine": throughput.machine_info(),
                 "total_bytes": total,
                 "kinds": [dict(made_by=p, read_by=c, count=n, bytes=b)
                           for p, c, n, b in kinds],
                 "tensors": [dataclasses.asdict(k) for k in kept]},
                f, indent=1)


if __name__ == "__main__":
  main()
