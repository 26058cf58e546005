"""Scaling out: the strategy factory, TPU-safe steps, mirrored == one device.

The equality of a mirrored step and a single-device step runs in a fresh
process (`tests/distributed_step_check.py`): the CPU must be split into
logical devices before TensorFlow initialises. The multi-worker and
stage-chain tests start `run.py` processes and are marked slow.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import distribute
from simclr_tf import runner
from simclr_tf.config import Config
from simclr_tf.models.batch_norm import BatchNormalization

from conftest import (ROOT, TINY_FLAGS, WORKERS, FakeStrategy, run_cli,
                      run_fresh)

# Ops that run Python or need the host: a TPU step cannot contain them.
HOST_ONLY_OPS = {"PyFunc", "EagerPyFunc", "PyFuncStateless", "PrintV2",
                 "Print", "ReadFile", "WriteFile", "DecodeImage",
                 "DecodeJpeg", "DecodePng"}


# --- The strategy factory ----------------------------------------------------

@pytest.mark.parametrize("kwargs, expected", [
    (dict(name="auto", tpu="local"), "tpu"),
    (dict(name="auto", tpu="my-tpu", num_gpus=8), "tpu"),
    (dict(name="auto", cpu_replicas=2, num_gpus=0), "mirrored"),
    (dict(name="auto", cpu_replicas=1, num_gpus=0), "one_device"),
    (dict(name="auto", num_gpus=4), "mirrored"),
    (dict(name="auto", num_gpus=1), "one_device"),
    (dict(name="auto", num_gpus=0), "one_device"),
    (dict(name="one_device", num_gpus=4), "one_device"),
    (dict(name="multi_worker_mirrored"), "multi_worker_mirrored"),
    (dict(name="tpu", tpu="local"), "tpu"),
])
def test_resolve_strategy_name(kwargs, expected):
  assert distribute.resolve_strategy_name(**kwargs) == expected


class _Recorder:
  """Stands in for TensorFlow's TPU functions; records the calls in order."""

  def __init__(self):
    self.calls = []

  def resolver(self, **kwargs):
    self.calls.append(("resolver", kwargs))
    return self

  def __getattr__(self, name):
    def record(*args, **kwargs):
      self.calls.append((name, args, kwargs))
      return name
    return record


@pytest.fixture
def fake_tpu(monkeypatch):
  rec = _Recorder()
  monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver",
                      rec.resolver)
  monkeypatch.setattr(tf.config, "experimental_connect_to_cluster",
                      rec.connect)
  monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system",
                      rec.initialize)
  monkeypatch.setattr(tf.distribute, "TPUStrategy", rec.strategy)
  return rec


@pytest.mark.parametrize("flag, expected", [
    ("", "local"), ("local", "local"), ("my-tpu", "my-tpu"),
    ("grpc://10.0.0.2:8470", "grpc://10.0.0.2:8470")])
def test_tpu_resolver_gets_local_or_the_name(fake_tpu, flag, expected):
  assert distribute.tpu_resolver(flag) is fake_tpu
  assert fake_tpu.calls == [("resolver", {"tpu": expected})]


@pytest.mark.parametrize("name", ["tpu", "auto"])
def test_make_strategy_tpu_connects_then_initialises(fake_tpu, name):
  strategy = distribute.make_strategy(name, tpu="local")
  assert strategy == "strategy"
  assert fake_tpu.calls == [
      ("resolver", {"tpu": "local"}),
      ("connect", (fake_tpu,), {}),
      ("initialize", (fake_tpu,), {}),
      ("strategy", (fake_tpu,), {}),
  ]


def test_make_strategy_multi_worker_uses_tf_config(monkeypatch):
  made = []
  monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy",
                      lambda *a, **k: made.append((a, k)) or "mwms")
  assert distribute.make_strategy("multi_worker_mirrored") == "mwms"
  assert made == [((), {})]   # cluster and task come from TF_CONFIG


def test_make_strategy_local_kinds():
  one = distribute.make_strategy("one_device")
  assert isinstance(one, tf.distribute.OneDeviceStrategy)
  assert one.num_replicas_in_sync == 1
  mirrored = distribute.make_strategy("mirrored")
  assert isinstance(mirrored, tf.distribute.MirroredStrategy)
  assert distribute.is_chief(one) and distribute.is_chief(mirrored)
  assert distribute.num_workers(mirrored) == 1
  assert distribute.task_name(one) == "chief"


@pytest.mark.parametrize("flags, expected", [
    ({"avx512f", "avx512_bf16"}, "mixed_bfloat16"),   # e.g. AMD Zen 4
    ({"avx512f", "amx_bf16", "amx_tile"}, "mixed_bfloat16"),   # Intel AMX
    ({"avx2", "fma"}, "float32"),                     # bfloat16 emulated
    (set(), "float32"),
])
def test_auto_precision_on_cpus(flags, expected):
  one = distribute.make_strategy("one_device")
  assert distribute.resolve_precision("auto", one, cpu_flags=flags) == expected
  for explicit in ("float32", "mixed_bfloat16", "mixed_float16"):
    assert distribute.resolve_precision(explicit, one, cpu_flags=flags) == (
        explicit)


@pytest.mark.parametrize("precision, expected", [
    ("float32", 1), ("mixed_bfloat16", 1),
    ("mixed_float16", 0),   # Keras' batch norm: it would update twice
])
def test_auto_recompute_on_one_cpu(precision, expected):
  # Over two replicas: test_batch_norm.test_global_batch_norm_over_two_replicas.
  one = distribute.make_strategy("one_device")
  for global_bn in (True, False):   # one replica: statistics are local
    assert distribute.resolve_recompute(-1, precision, global_bn, one) == (
        expected)
    for explicit in (0, 1, 3):
      assert distribute.resolve_recompute(explicit, precision, global_bn,
                                          one) == explicit


WITH_CHIEF = {"chief": ["c:0"], "worker": ["a:1", "b:2"]}


@pytest.mark.parametrize("spec, task_type, task_id, chief, name", [
    (WORKERS, "worker", 0, True, "worker_0"),
    (WORKERS, "worker", 1, False, "worker_1"),
    (WITH_CHIEF, "chief", 0, True, "chief_0"),
    (WITH_CHIEF, "worker", 0, False, "worker_0"),
    (WITH_CHIEF, "evaluator", 0, False, "evaluator_0"),
    ({}, None, None, True, "chief"),
])
def test_chief_and_task_names(spec, task_type, task_id, chief, name):
  strategy = FakeStrategy(spec, task_type, task_id)
  assert distribute.is_chief(strategy) == chief
  assert distribute.task_name(strategy) == name


@pytest.mark.parametrize("pipelines, replicas, expected", [
    (1, 1, 1), (1, 2, 2), (2, 2, 1), (4, 32, 8)])
def test_replicas_per_pipeline(pipelines, replicas, expected):
  ctx = tf.distribute.InputContext(num_input_pipelines=pipelines,
                                   input_pipeline_id=0,
                                   num_replicas_in_sync=replicas)
  assert distribute.replicas_per_pipeline(ctx) == expected
  assert distribute.replicas_per_pipeline(None) == 1


def test_digest_changes_with_any_value():
  a = {"x": np.zeros(3, np.float32), "y": np.ones(2, np.float32)}
  b = dict(a, y=np.array([1.0, 1.0 + 1e-7], np.float32))
  assert distribute.digest_arrays(a) == distribute.digest_arrays(dict(a))
  assert distribute.digest_arrays(a) != distribute.digest_arrays(b)


# --- No host-only ops in the training step ------------------------------------

def _op_types_and_string_ops(graph):
  """Op types of `graph` and its functions; ops with string tensors."""
  from tensorflow.python.framework import op_def_registry  # pylint: disable=g-import-not-at-top
  graph_def = graph.as_graph_def()
  nodes = list(graph_def.node)
  for function in graph_def.library.function:
    nodes.extend(function.node_def)
  types, stringy = set(), set()
  for node in nodes:
    types.add(node.op)
    op_def = op_def_registry.get(node.op)
    if op_def is None:
      continue
    for arg in list(op_def.input_arg) + list(op_def.output_arg):
      dtype = arg.type or (node.attr[arg.type_attr].type
                           if arg.type_attr in node.attr else 0)
      if dtype == tf.string.as_datatype_enum:
        stringy.add(node.op)
  return types, stringy


def _element_spec(task, batch=8, size=32):
  image = tf.TensorSpec([batch, size, size, 3], tf.float32)
  label = tf.TensorSpec([batch], tf.int32)
  if task == "pretrain":
    return {"view1": image, "view2": image, "label": label}
  return {"image": image, "label": label}


def _tiny_config(train_mode, tmp_path):
  return Config(train_mode=train_mode, resnet_depth=18, width_multiplier=0.25,
                image_size=32,
                train_batch_size=8, proj_out_dim=16, train_steps=2,
                model_dir=str(tmp_path), teacher="unused" * (
                    train_mode == "distill"))


def assert_no_host_ops(learner, task):
  """Traces `learner.train_step` (task, L2, LARS update) and checks its ops."""
  step = tf.function(learner.train_step)
  graph = step.get_concrete_function(_element_spec(task)).graph
  types, stringy = _op_types_and_string_ops(graph)
  assert "Conv2DBackpropFilter" in types          # it is the whole step
  assert not types & HOST_ONLY_OPS, types & HOST_ONLY_OPS
  assert not stringy, f"ops with string tensors: {stringy}"


@pytest.mark.parametrize("task", ["pretrain", "finetune", "distill"])
def test_train_step_has_no_host_only_ops(task, tmp_path, monkeypatch):
  # Several replicas (a TPU) run Keras' synchronized batch norm, not the
  # fused single-replica kernel: trace that path.
  monkeypatch.setattr(BatchNormalization, "fused", False)
  cfg = _tiny_config(task, tmp_path)
  plan = runner.make_plan(cfg.replace(train_mode="finetune", teacher="")
                          if task == "distill" else cfg)
  if task == "distill":   # a Keras teacher; the export one is tested slow
    from simclr_tf.models import simclr as simclr_lib  # pylint: disable=g-import-not-at-top
    teacher = simclr_lib.build_model(plan.model_config, cfg.image_size)
    monkeypatch.setattr(runner, "make_teacher", lambda cfg: (
        lambda images: teacher(images, training=False)["logits_sup"]))
  learner, _ = runner.build_learner(cfg, plan)
  assert_no_host_ops(learner, task)


# --- One step: mirrored over 2 CPUs == one device -----------------------------

@pytest.mark.slow  # a fresh process, 4 ResNet-18 traces: ~1-2.5 min on 2 CPUs
def test_mirrored_step_equals_single_device_step():
  found = run_fresh(os.path.join(ROOT, "tests", "distributed_step_check.py"),
                    "check", "pretrain,finetune", timeout=400)
  results = {r["task"]: r for r in found}
  for task in ("pretrain", "finetune"):
    r = results[task]
    assert r["replicas"] == 2 and r["replica_spread"] == 0.0, r
    assert r["loss_diff"] <= 1e-5, r
    assert r["weights_max_diff"] <= 1e-4, r
    assert r["bn_stats_max_diff"] <= 1e-4, r
    # The step moved the weights and statistics far more than the tolerance
    # and most trainable weights changed (a real comparison).
    assert r["weights_moved"] > 1e-3 and r["bn_stats_moved"] > 1e-2, r
    assert r["num_weights_changed"] > 40, r


# --- Multi-worker: 2 processes on localhost ------------------------------------

def _free_ports(n):
  sockets = [socket.socket() for _ in range(n)]
  for s in sockets:
    s.bind(("localhost", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def _flags_without_steps():
  return [f for f in TINY_FLAGS if not f.startswith("--train_steps")]


def _start_workers(model_dir, steps, log_dir, tag):
  """Starts 2 `run.py` workers (TF_CONFIG on free ports); returns them."""
  ports = _free_ports(2)
  cluster = {"worker": [f"localhost:{p}" for p in ports]}
  procs = []
  for index in range(2):
    tf_config = json.dumps({"cluster": cluster,
                            "task": {"type": "worker", "index": index}})
    log = open(os.path.join(log_dir, f"{tag}_worker{index}.log"), "w")
    procs.append((subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "run.py"),
         "--strategy=multi_worker_mirrored", "--mode=train",
         "--train_mode=pretrain", f"--train_steps={steps}",
         f"--model_dir={model_dir}", *_flags_without_steps()],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        env=dict(os.environ, TF_CONFIG=tf_config, TF_CPP_MIN_LOG_LEVEL="2"),
        start_new_session=True), log))
  return procs


def _wait_all(procs, timeout):
  """Exit codes; kills every worker (process group) on timeout."""
  deadline = time.time() + timeout
  try:
    return [p.wait(timeout=max(1.0, deadline - time.time()))
            for p, _ in procs]
  except subprocess.TimeoutExpired:
    return None
  finally:
    for p, log in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
      log.close()


def _digests(log_dir, tag, steps):
  found = []
  for index in range(2):
    with open(os.path.join(log_dir, f"{tag}_worker{index}.log")) as f:
      text = f.read()
    match = re.search(rf"Weights digest of worker_{index} at step {steps}: "
                      r"([0-9a-f]+)", text)
    assert match, text[-3000:]
    found.append((match.group(1), text))
  return found


def _checkpoint_digest(path):
  """`distribute.weights_digest` recomputed from a checkpoint's weights."""
  reader = tf.train.load_checkpoint(path)
  prefix, suffix = "net_weights/by_path/", "/.ATTRIBUTES/VARIABLE_VALUE"
  arrays = {}
  for key in reader.get_variable_to_shape_map():
    if key.startswith(prefix) and key.endswith(suffix):
      escaped = key[len(prefix):-len(suffix)]
      # TensorFlow escapes '.' as '..' and '/' as '.S' in checkpoint keys.
      path = re.sub(r"\.(.)", lambda m: {"S": "/", ".": "."}[m.group(1)],
                    escaped)
      arrays[path] = reader.get_tensor(key)
  step = int(reader.get_tensor(
      "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))
  return distribute.digest_arrays(arrays), step


def _check_run(model_dir, log_dir, tag, steps):
  (d0, log0), (d1, log1) = _digests(log_dir, tag, steps)
  assert d0 == d1, "workers ended with different weights"
  ckpt = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  assert ckpt.endswith(f"ckpt-{steps}")
  assert _checkpoint_digest(ckpt) == (d0, steps)   # the chief's checkpoint
  assert os.path.isfile(os.path.join(model_dir, "saved_model",
                                     "saved_model.pb"))
  assert not os.path.exists(os.path.join(model_dir, ".worker_scratch"))
  assert "Saved checkpoint" in log1 and ".worker_scratch/worker_1" in log1
  return log0, log1


@pytest.mark.slow  # 2 x 2 training processes: ~2-3 min on 2 CPUs
def test_multi_worker_trains_in_sync_and_resumes(tmp_path):
  model_dir, log_dir = str(tmp_path / "model"), str(tmp_path)
  procs = _start_workers(model_dir, 3, log_dir, "first")
  codes = _wait_all(procs, timeout=150)
  assert codes == [0, 0], (codes, open(
      os.path.join(log_dir, "first_worker1.log")).read()[-3000:])
  _check_run(model_dir, log_dir, "first", 3)
  # Both workers resume from the chief's checkpoint (shared model_dir).
  procs = _start_workers(model_dir, 5, log_dir, "resume")
  codes = _wait_all(procs, timeout=150)
  assert codes == [0, 0], codes
  logs = _check_run(model_dir, log_dir, "resume", 5)
  for log in logs:
    assert re.search(r"Resumed from .*checkpoints/ckpt-3", log), log[-3000:]


# --- Every stage with --cpu_replicas=2 -----------------------------------------

@pytest.mark.slow  # 2 training processes + a distill trace: ~1.5 min
def test_finetune_then_distill_on_two_cpu_replicas(tmp_path, monkeypatch,
                                                   small_classifier):
  # Pretraining on two replicas runs in test_memory (with its queue), in the
  # multi-worker test and in the step check above; here the two stages that
  # start from an export: fine-tuning from one, distilling from its result.
  common = ["--cpu_replicas=2", "--mode=train", "--train_steps=2",
            *_flags_without_steps(), "--proj_out_dim=16"]   # the export's
  stages = [
      ("finetune", [f"--init_from={small_classifier}"]),
      ("distill", [f"--teacher={tmp_path / 'finetune'}"]),
  ]
  for stage, extra in stages:
    proc = run_cli(f"--train_mode={stage}", f"--model_dir={tmp_path / stage}",
                   *common, *extra, timeout=240)
    assert proc.returncode == 0, (stage, proc.stderr[-3000:])
    assert "MirroredStrategy with 2 replica(s)" in proc.stderr, stage
    # --global_bn over two replicas: the default recomputes nothing.
    assert "--recompute_blocks=0." in proc.stderr, stage
    assert (tmp_path / stage / "saved_model" / "saved_model.pb").is_file()
    assert "global_step: 2" in proc.stdout
  # The distillation step with the real teacher (a SavedModel) is TPU-safe.
  monkeypatch.setattr(BatchNormalization, "fused", False)
  cfg = _tiny_config("distill", tmp_path / "trace").replace(
      teacher=str(tmp_path / "finetune"))
  learner, _ = runner.build_learner(cfg, runner.make_plan(cfg))
  assert_no_host_ops(learner, "distill")
