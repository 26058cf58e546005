r"""Where the time of a training step goes: a TensorFlow profile, summarised.

Builds the bare step of one `throughput.py` configuration (the model, the
task's loss and the optimizer in one tf.function, on a synthetic batch),
warms it up, records a few steps with the TensorFlow profiler and sums the
time of the executed ops by category: convolutions (forward, backward),
batch norm (forward, backward), the optimizer's update, matrix products,
the rest of the forward and backward passes, and variable bookkeeping.

Op times are wall times of the ops on TensorFlow's executor threads; ops
may overlap (inter-op parallelism), so the column can sum to more than the
step. The trace itself stays in --logdir for TensorBoard's profile plugin.

Usage:
  python benchmarks/profile_step.py --config pretrain-bare-bf16-b256 \
      [--steps 2] [--logdir /tmp/simclr-profile] [--top 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position

CONV_FORWARD = re.compile(r"Conv2D$|FusedConv2D|Conv2DWithBias")
CONV_BACKWARD = re.compile(r"Conv2DBackprop")
BATCH_NORM_OP = re.compile(r"FusedBatchNorm")
# Layer names of batch norms in the model (resnet.py, heads.py); Keras adds
# "_1", "_2", ... to the scope of a layer called more than once.
BATCH_NORM_SCOPE = re.compile(r"(^|/)(bn|shortcut_bn|reduce_bn)(_\d+)*(/|$)")
MATMUL = re.compile(r"MatMul")
BOOKKEEPING = re.compile(r"^(_Mkl)?(ReadVariableOp|AssignVariableOp|"
                         r"AssignAddVariableOp|AssignSubVariableOp|Identity|"
                         r"Const|NoOp|_Arg|_Retval|VarHandleOp)$")
OPTIMIZER_SCOPE = re.compile(r"(^|/)(lars|SGD|adam)(_\d+)*/")


def categorise(name: str, op_type: str) -> str:
  """The category of one executed op.

  Args:
    name: the op's name (scopes joined by '/').
    op_type: its type, e.g. Conv2D or _MklNativeFusedBatchNormV3.
  Returns:
    A category name.
  """
  backward = name.startswith("gradient_tape/")
  if OPTIMIZER_SCOPE.search(name) and not backward:
    return "optimizer update (LARS)"
  if CONV_BACKWARD.search(op_type):
    return "conv backward"
  if CONV_FORWARD.search(op_type) and not backward:
    return "conv forward"
  if BATCH_NORM_OP.search(op_type) or BATCH_NORM_SCOPE.search(name):
    return "batch norm backward" if backward else "batch norm forward"
  if BOOKKEEPING.search(op_type):
    return "variables and bookkeeping"
  if MATMUL.search(op_type):
    return "matmul (heads, loss)" + (" backward" if backward else "")
  return "other backward" if backward else "other forward (relu, pad, " \
      "add, pool, loss)"


def summarise_trace(logdir: str) -> dict:
  """Sums op times of the newest trace under `logdir`.

  Args:
    logdir: the directory given to the profiler.
  Returns:
    {'step_s': wall time of the traced steps, 'ops_s': summed op time,
     'categories': {category: seconds}, 'op_types': {type: seconds}}.
  """
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"),
                           recursive=True), key=os.path.getmtime)
  space = xplane_pb2.XSpace()
  with open(paths[-1], "rb") as f:
    space.ParseFromString(f.read())
  categories = collections.Counter()
  op_types = collections.Counter()
  step_s = 0.0
  for plane in space.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      for event in line.events:
        meta = plane.event_metadata[event.metadata_id]
        seconds = event.duration_ps * 1e-12
        if line.name == "python" and meta.name == "step":
          step_s += seconds
        # Op events are "name:type"; "ExecutorState::Process" and the like
        # are the executor's own spans, which contain the ops.
        if (not line.name.startswith("tf_Compute") or ":" not in meta.name
            or "::" in meta.name):
          continue
        name, op_type = meta.name.rsplit(":", 1)
        categories[categorise(name, op_type)] += seconds
        op_types[op_type] += seconds
  return {"step_s": step_s, "ops_s": sum(categories.values()),
          "categories": dict(categories.most_common()),
          "op_types": dict(op_types.most_common())}


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--config", default="pretrain-bare-bf16-b256",
                      help="a bare-tier configuration of throughput.py")
  parser.add_argument("--steps", type=int, default=2,
                      help="profiled steps (after two warm-up steps)")
  parser.add_argument("--logdir", default="",
                      help="profiler output (default: a new temp folder)")
  parser.add_argument("--top", type=int, default=20,
                      help="op types listed")
  parser.add_argument("--json", default="", help="also write the summary")
  args = parser.parse_args()
  config = throughput.parse_config(args.config)
  if config["kind"] != "tf" or config["tier"] != "bare":
    parser.error("--config must be a TASK-bare-PREC[-xla]-bBATCH "
                 "configuration")
  work_dir = tempfile.mkdtemp(prefix="simclr-profile-")
  logdir = args.logdir or os.path.join(work_dir, "trace")
  tf, cfg, plan = throughput.prepare(config, work_dir, "")
  step, data = throughput.build_bare_step(cfg, plan)
  for _ in range(2):
    step(data).numpy()
  start = time.perf_counter()
  step(data).numpy()
  untraced_s = time.perf_counter() - start
  tf.profiler.experimental.start(logdir)
  for _ in range(args.steps):
    step(data).numpy()
  tf.profiler.experimental.stop()
  summary = summarise_trace(logdir)
  summary.update(config=args.config, steps=args.steps,
                 untraced_step_s=untraced_s, logdir=logdir,
                 load_average=os.getloadavg())

  per_step = summary["ops_s"] / args.steps
  print(f"{args.config}: {summary['step_s'] / args.steps:.2f} s a step "
        f"while profiled ({untraced_s:.2f} s without the profiler); op time "
        f"{per_step:.2f} s a step; load average {os.getloadavg()[0]:.1f}")
  print(f"\n{'category':42s} {'s/step':>7s} {'share':>6s}")
  for name, seconds in summary["categories"].items():
    print(f"{name:42s} {seconds / args.steps:7.3f} "
          f"{seconds / summary['ops_s']:6.1%}")
  print(f"\n{'op type':42s} {'s/step':>7s} {'share':>6s}")
  for name, seconds in list(summary["op_types"].items())[:args.top]:
    print(f"{name:42s} {seconds / args.steps:7.3f} "
          f"{seconds / summary['ops_s']:6.1%}")
  print(f"\ntrace: {logdir}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)


if __name__ == "__main__":
  main()
