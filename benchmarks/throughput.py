r"""Training throughput (images/s) and peak memory of simclr-tf on this machine.

Every configuration runs in its own worker process, so its peak resident
memory (`ru_maxrss`) is its own and its settings (precision, XLA, threads,
oneDNN) cannot leak into the others. The workers are started one at a time,
warmed up, and then timed in alternating passes (A B C A B C ...; the order
rotates every pass), so that they all see the same machine load, and ratios
between configurations taken in one run are meaningful on a shared machine.

Figures: images/s is the median over all timed steps of the wall time;
img/cpu-s divides by the CPU time of the worker process instead (all its
threads), which other users of the machine disturb much less, so it is the
steadier A/B measure on a busy machine (not an absolute speed: it also
counts threads spinning while they wait). Ratios between configurations are
given three ways: of the medians, "paired" (the median over passes of the
ratio within one pass) and of the CPU figures. Peak memory is the worker's
`ru_maxrss`.

Configurations (`--configs`, comma separated; `--list` shows the presets):

  TASK-TIER-PREC[-xla]-bBATCH[@KNOB=VALUE...]
    TASK   pretrain (2 views of BATCH images: 2 x BATCH images a step),
           finetune or distill (BATCH images a step; distill has a frozen
           teacher of the same ResNet-18).
    TIER   bare: the model, the task's loss and the optimizer in a minimal
                 tf.function (no Keras fit, callbacks or metrics);
           step: `Learner` (the real train_step, metrics included) built by
                 `runner.build_learner`, run by `fit` on a batch held in
                 memory, without callbacks;
           full: the real training loop, `runner.train`: `fit` on the real
                 input pipeline (--data_dir) with the real callbacks.
    PREC   fp32 or bf16 (mixed_bfloat16); -xla compiles the step with XLA.
  pipeline-STAGE-bBATCH   the input pipeline alone (STAGE pretrain counts
                          both views).
  torch-{eager,compile}-{fp32,bf16}-bBATCH   the PyTorch reference
                          (../shared/anchors/torch_simclr_step.py), run by
                          --with_torch PYTHON; always 2 x BATCH images.

  Knobs: @bn=keras (Keras' unfused batch norm instead of ours),
  @pad=copy (strided convolutions convolve a padded copy of their input,
  as the official code does, instead of simclr_tf.models.strided_conv),
  @relu=keep (the backward pass keeps the ReLU outputs inside the blocks
  instead of recomputing them, simclr_tf.models.bn_relu_conv),
  @recompute=N (--recompute_blocks: the stem and the first N residual blocks
  recompute their activations in the backward pass, simclr_tf.models.recompute;
  without it, the default -1 as a run resolves it on this machine:
  1 on CPUs, the JSON's recompute_blocks),
  @intra=N / @inter=N (TensorFlow thread pools), @onednn=0|1
  (TF_ENABLE_ONEDNN_OPTS; default: simclr_tf.cpu's choice for this CPU),
  @isa=ISA (ONEDNN_MAX_CPU_ISA, e.g. AVX2: oneDNN's kernels as on a CPU
  without AVX-512, to measure the choice for such CPUs on a newer one),
  @spe=N (steps_per_execution, step and full tiers),
  @xla_flags=FLAGS (XLA_FLAGS, ';' between flags),
  @env=NAME:VALUE[;NAME:VALUE] (environment of the worker process, set
  before it starts: allocator variables such as MALLOC_MMAP_THRESHOLD_ are
  read at process start), @depth=D / @size=PX (ResNet depth and image
  size of the bare and step tiers; default 18 and 32, the CIFAR recipe;
  >= 64 px takes the ImageNet stem).

The model is the CIFAR recipe of SimCLR: ResNet-18 with the CIFAR stem at
32 px, a 3-layer projection head 512-512-128, NT-Xent at temperature 0.5,
LARS; pretraining keeps the linear head trained alongside (as `run.py`
does); fine-tuning and distillation use the head cut at its first layer.

Usage:
  python benchmarks/throughput.py --configs quick --steps 2 --repeats 2
  python benchmarks/throughput.py --configs full \
      --with_torch /tmp/torch-venv/bin/python --json throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_ANCHOR = os.path.normpath(
    os.path.join(REPO, "..", "shared", "anchors", "torch_simclr_step.py"))
SHARED_CIFAR10 = os.path.normpath(
    os.path.join(REPO, "..", "shared", "data", "cifar10"))

PRESETS = {
    # About 3 minutes on a quiet 2-core machine with --steps 2 --repeats 2.
    "quick": ("pretrain-step-fp32-b256,pretrain-step-bf16-b256,"
              "pipeline-pretrain-b256"),
    # Bare step against the full loop (the 10% target).
    "loop": ("pretrain-bare-fp32-b256,pretrain-full-fp32-b256,"
             "pretrain-bare-bf16-b256,pretrain-full-bf16-b256"),
    # The table of the issue.
    "full": ",".join(
        [f"pretrain-step-{p}{x}-b{b}" for b in (256, 512)
         for p in ("fp32", "bf16") for x in ("", "-xla")] +
        [f"{t}-step-{p}{x}-b512" for t in ("finetune", "distill")
         for p in ("fp32", "bf16") for x in ("", "-xla")] +
        ["pretrain-bare-fp32-b256", "pretrain-full-fp32-b256",
         "pretrain-bare-bf16-b256", "pretrain-full-bf16-b256",
         "pipeline-pretrain-b256", "pipeline-finetune-b512"]),
}
TORCH_DEFAULT = "torch-eager-fp32-b256,torch-compile-bf16-b256"
TASKS = ("pretrain", "finetune", "distill")
TIERS = ("bare", "step", "full")
PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16"}
KNOBS = ("bn", "pad", "relu", "recompute", "intra", "inter", "onednn", "isa",
         "spe", "xla_flags", "env", "depth", "size")
# Knobs that switch one thing away from the default, and their one value.
SWITCHES = {"bn": "keras", "pad": "copy", "relu": "keep"}
# Input pipelines: batches drained before each timed pass, and timed batches
# per step of the other configurations.
PIPELINE_DRAIN = 16
PIPELINE_BATCHES_PER_STEP = 8


# --- Configuration names -----------------------------------------------------

def parse_config(name: str) -> dict:
  """Parses a configuration name (see the module docstring).

  Args:
    name: e.g. 'pretrain-step-bf16-xla-b256@bn=keras'.
  Returns:
    A dict with 'name', 'kind' (tf, pipeline or torch), the fields of the
    kind, and 'knobs'.
  Raises:
    ValueError: for a name that does not parse.
  """
  base, *knob_parts = name.split("@")
  knobs = {}
  for part in knob_parts:
    key, _, value = part.partition("=")
    if key not in KNOBS or not value:
      raise ValueError(f"Unknown knob {part!r} in {name!r}; use one of "
                       f"{', '.join(KNOBS)} as KNOB=VALUE.")
    if key in SWITCHES and value != SWITCHES[key]:
      raise ValueError(f"Knob {part!r} in {name!r} takes one value: "
                       f"@{key}={SWITCHES[key]}.")
    if key == "recompute" and not value.isdigit():
      raise ValueError(f"Knob {part!r} in {name!r}: @recompute takes the "
                       "number of residual blocks, e.g. 1.")
    knobs[key] = value
  tokens = base.split("-")
  if not tokens[-1].startswith("b") or not tokens[-1][1:].isdigit():
    raise ValueError(f"{name!r} must end with -bBATCH, e.g. -b256.")
  batch = int(tokens[-1][1:])
  tokens = tokens[:-1]
  config = {"name": name, "batch": batch, "knobs": knobs}
  if tokens[0] == "pipeline" and len(tokens) == 2 and tokens[1] in TASKS:
    return dict(config, kind="pipeline", task=tokens[1])
  if (tokens[0] == "torch" and len(tokens) == 3 and
      tokens[1] in ("eager", "compile") and tokens[2] in PRECISIONS):
    return dict(config, kind="torch", variant=f"{tokens[1]}_{tokens[2]}",
                task="pretrain", precision=tokens[2])
  xla = tokens[-1] == "xla"
  if xla:
    tokens = tokens[:-1]
  if (len(tokens) == 3 and tokens[0] in TASKS and tokens[1] in TIERS and
      tokens[2] in PRECISIONS):
    return dict(config, kind="tf", task=tokens[0], tier=tokens[1],
                precision=tokens[2], xla=xla)
  raise ValueError(f"Cannot parse configuration {name!r}; see --help.")


def images_per_step(config: dict) -> int:
  """Images one step consumes: both views when pretraining."""
  return 2 * config["batch"] if config["task"] == "pretrain" else (
      config["batch"])


def expand_configs(spec: str) -> list:
  names = []
  for item in spec.split(","):
    item = item.strip()
    if not item:
      continue
    names.extend(PRESETS[item].split(",") if item in PRESETS else [item])
  return [parse_config(n) for n in dict.fromkeys(names)]


# --- Worker side: the protocol -----------------------------------------------

class Channel:
  """JSON lines with the parent: commands on stdin, replies on a private fd.

  Anything else the worker prints (TensorFlow, Keras) goes to stderr, which
  the parent keeps in a log file.
  """

  def __init__(self):
    self._out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

  def send(self, **message) -> None:
    self._out.write(json.dumps(message) + "\n")
    self._out.flush()

  def receive(self) -> dict:
    line = sys.stdin.readline()
    return json.loads(line) if line.strip() else {"cmd": "quit"}


def time_calls(fn, n: int):
  """Calls `fn` n times.

  Returns:
    (wall seconds, CPU seconds of the whole process) of each call. On a
    shared machine the CPU time is the steadier measure of the work done.
  """
  walls, cpus = [], []
  for _ in range(n):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
  return walls, cpus


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def serve(channel: Channel, run_steps, info: dict) -> None:
  """Answers 'run' commands with step times until 'quit'.

  Args:
    channel: the Channel.
    run_steps: function(n) -> (wall, CPU) seconds of n steps (lists).
    info: sent with the 'ready' message (build and warm-up figures).
  """
  channel.send(ready=True, **info)
  while True:
    command = channel.receive()
    if command["cmd"] != "run":
      break
    walls, cpus = run_steps(command["steps"])
    channel.send(times=walls, cpu_times=cpus)
  channel.send(done=True, peak_rss_gib=peak_rss_gib())


def make_pacer(channel: Channel, warmup: int, info: dict, per_call: int):
  """A `keras.callbacks.Callback` that hands `fit`'s steps out in passes.

  After the warm-up it blocks between passes until the parent asks for the
  next one, and records the time between consecutive batch ends: what a step
  of the loop costs, data, train function and callbacks included.

  Args:
    channel: the Channel.
    warmup: calls of the train function before timing.
    info: build figures to send with 'ready'.
    per_call: steps per train-function call (steps_per_execution).
  Returns:
    The callback; it sets `stop_training` when the parent says 'quit'.
  """
  import keras  # pylint: disable=g-import-not-at-top

  class _Pacer(keras.callbacks.Callback):
    """See `make_pacer`."""

    def __init__(self):
      super().__init__()
      self.calls = 0
      self.remaining = 0
      self.times = []
      self.cpu_times = []
      self.warmup_times = []
      self.last = (time.perf_counter(), time.process_time())

    def on_train_begin(self, logs=None):
      self.last = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, batch, logs=None):
      now = (time.perf_counter(), time.process_time())
      wall, cpu = now[0] - self.last[0], now[1] - self.last[1]
      self.last = now
      self.calls += 1
      if self.calls <= warmup:
        self.warmup_times.append(wall)
        if self.calls == warmup:
          channel.send(ready=True, warmup_s=self.warmup_times, **info)
          self._next()
        return
      if self.remaining > 0:
        self.times.extend([wall / per_call] * per_call)
        self.cpu_times.extend([cpu / per_call] * per_call)
        self.remaining -= 1
        if self.remaining == 0:
          channel.send(times=self.times, cpu_times=self.cpu_times)
          self._next()

    def _next(self):
      command = channel.receive()
      if command["cmd"] != "run":
        self.model.stop_training = True
        return
      self.remaining = max(1, -(-command["steps"] // per_call))
      self.times, self.cpu_times = [], []
      self.last = (time.perf_counter(), time.process_time())

  return _Pacer()


# --- Worker side: TensorFlow -------------------------------------------------

def _setup_tensorflow(knobs: dict):
  """Environment and threads before TensorFlow runs its first op."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if "onednn" in knobs:
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = knobs["onednn"]
  if "isa" in knobs:
    os.environ["ONEDNN_MAX_CPU_ISA"] = knobs["isa"]
  if "xla_flags" in knobs:
    os.environ["XLA_FLAGS"] = knobs["xla_flags"].replace(";", " ")
  sys.path.insert(0, REPO)
  import simclr_tf  # pylint: disable=g-import-not-at-top,unused-import
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if "intra" in knobs:
    tf.config.threading.set_intra_op_parallelism_threads(int(knobs["intra"]))
  if "inter" in knobs:
    tf.config.threading.set_inter_op_parallelism_threads(int(knobs["inter"]))
  if knobs.get("bn") == "keras":
    from simclr_tf.models import batch_norm  # pylint: disable=g-import-not-at-top
    batch_norm.BatchNormalization.fused = False
  if knobs.get("relu") == "keep":
    from simclr_tf.models import batch_norm  # pylint: disable=g-import-not-at-top
    batch_norm.BatchNormalization.recompute_relu = False
  if knobs.get("pad") == "copy":
    from simclr_tf.models import blocks  # pylint: disable=g-import-not-at-top
    blocks.PAD_INSIDE = False
  return tf


def _versions() -> dict:
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {"tensorflow": tf.__version__, "keras": keras.__version__,
          "numpy": np.__version__, "python": platform.python_version(),
          "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
          "onednn_choice": sys.modules["simclr_tf"].ONEDNN.describe(),
          "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "intra_op_threads":
              tf.config.threading.get_intra_op_parallelism_threads(),
          "inter_op_threads":
              tf.config.threading.get_inter_op_parallelism_threads()}


def _run_config(config: dict, work_dir: str, data_dir: str):
  """The `Config` of a TF configuration (flags as run.py would pass them)."""
  from simclr_tf import config as config_lib  # pylint: disable=g-import-not-at-top
  task = config["task"]
  full = config.get("tier") == "full"
  # The bare and step tiers read only the data's size and classes (for the
  # schedule and the heads); the full loop reads the images.
  values = dict(
      mode="train", train_mode=task, model_dir=os.path.join(work_dir, "run"),
      dataset=config_lib.IMAGE_FOLDER if data_dir else
      config_lib.BUNDLED_DATASET,
      data_dir=data_dir, image_size=int(config["knobs"].get("size", 32)),
      resnet_depth=int(config["knobs"].get("depth", 18)),
      color_jitter_strength=0.5, use_blur=False, temperature=0.5,
      proj_head_mode="nonlinear", num_proj_layers=3, proj_out_dim=128,
      ft_proj_selector=1, optimizer="lars",
      train_batch_size=config["batch"], train_steps=10**7,
      precision=PRECISIONS[config["precision"]],
      jit_compile=config["xla"],
      steps_per_execution=int(config["knobs"].get("spe", 1)),
      log_images=task == "pretrain")
  if "recompute" in config["knobs"]:
    values.update(recompute_blocks=int(config["knobs"]["recompute"]))
  if task == "pretrain":
    values.update(learning_rate=1.0, weight_decay=1e-4)
  elif task == "finetune":
    values.update(learning_rate=0.005, learning_rate_scaling="sqrt",
                  weight_decay=0.0, label_fraction=0.1 if full else 1.0)
  else:
    values.update(learning_rate=0.1, weight_decay=1e-6,
                  distill_temperature=0.1,
                  teacher=os.path.join(work_dir, "teacher"))
  return config_lib.validate(config_lib.Config(**values))


def _export_teacher(cfg, work_dir: str) -> None:
  """A fine-tuned-shaped R18 export (random weights) to distill from."""
  from simclr_tf import runner  # pylint: disable=g-import-not-at-top
  from simclr_tf.models import simclr as simclr_lib  # pylint: disable=g-import-not-at-top
  from tf_hub_export.export import export_saved_model  # pylint: disable=g-import-not-at-top
  ft = cfg.replace(train_mode="finetune", teacher="", precision="float32")
  plan = runner.make_plan(ft)
  net = simclr_lib.build_model(plan.model_config, ft.image_size)
  export_saved_model(net, cfg.teacher, ft.image_size,
                     class_names=plan.info.class_names, train_mode="finetune")


def _synthetic_batch(tf, task: str, batch: int, size: int = 32) -> dict:
  images = lambda seed: tf.random.stateless_uniform(  # pylint: disable=g-long-lambda
      [batch, size, size, 3], [seed, 0], dtype=tf.float32)
  labels = tf.random.stateless_uniform([batch], [9, 0], maxval=10,
                                       dtype=tf.int32)
  if task == "pretrain":
    return {"view1": images(1), "view2": images(2), "label": labels}
  return {"image": images(1), "label": labels}


def prepare(config: dict, work_dir: str, data_dir: str):
  """Sets TensorFlow up for `config`; returns (tf, run Config, Plan)."""
  tf = _setup_tensorflow(config["knobs"])
  import keras  # pylint: disable=g-import-not-at-top
  from simclr_tf import runner  # pylint: disable=g-import-not-at-top
  from simclr_tf import distribute  # pylint: disable=g-import-not-at-top
  cfg = _run_config(config, work_dir, data_dir)
  # What the run's defaults choose on this machine, as run.py's would
  # (--recompute_blocks=-1 unless @recompute is given).
  cfg = runner.resolve_hardware(cfg, distribute.make_strategy(
      cfg.strategy, cfg.tpu, cfg.cpu_replicas))
  if cfg.train_mode == "distill":
    _export_teacher(cfg, work_dir)
  runner.prepare_model_dir(cfg)
  keras.utils.set_random_seed(cfg.seed)
  return tf, cfg, runner.make_plan(cfg)


def build_bare_step(cfg, plan):
  """The model, the task's loss and the optimizer in a minimal tf.function.

  Args:
    cfg: the run's Config (precision and jit_compile are used).
    plan: its runner Plan.
  Returns:
    (step, data): `step(data)` runs one training step on the synthetic
    batch `data` and returns the loss.
  """
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from simclr_tf import runner  # pylint: disable=g-import-not-at-top
  from simclr_tf import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  keras.config.set_dtype_policy(cfg.precision)
  net = runner.build_net(cfg, plan)
  opt, _, _ = runner.build_optimizer(cfg, plan, net)
  opt.build(net.trainable_variables)
  task = tasks_lib.make_task(
      cfg.train_mode, temperature=cfg.temperature,
      hidden_norm=cfg.hidden_norm,
      distill_temperature=cfg.distill_temperature,
      distill_label_weight=cfg.distill_label_weight,
      teacher=runner.make_teacher(cfg))
  variables = net.trainable_variables

  @tf.function(jit_compile=cfg.jit_compile)
  def step(data):
    with tf.GradientTape() as tape:
      loss, _ = task(net, data, training=True)
    grads = tape.gradient(loss, variables)
    opt.apply_gradients(zip(grads, variables))
    return loss

  return step, _synthetic_batch(tf, cfg.train_mode, cfg.train_batch_size,
                                cfg.image_size)


def tf_worker(config: dict, work_dir: str, data_dir: str, warmup: int,
              channel: Channel) -> None:
  """Builds one TF configuration, warms it up and serves the parent."""
  start = time.perf_counter()
  tf, cfg, plan = prepare(config, work_dir, data_dir)
  import keras  # pylint: disable=g-import-not-at-top
  from simclr_tf import checkpoints  # pylint: disable=g-import-not-at-top
  from simclr_tf import distribute  # pylint: disable=g-import-not-at-top
  from simclr_tf import runner  # pylint: disable=g-import-not-at-top
  info = {"versions": _versions(), "recompute_blocks": cfg.recompute_blocks}
  tier = config["tier"]

  if tier == "bare":
    step, data = build_bare_step(cfg, plan)

    def run_steps(n):
      return time_calls(lambda: step(data).numpy(), n)

    info["build_s"] = time.perf_counter() - start
    info["warmup_s"] = run_steps(warmup)[0]
    serve(channel, run_steps, info)
    return

  strategy = distribute.make_strategy(cfg.strategy, cfg.tpu,
                                      cfg.cpu_replicas)
  keras.config.set_dtype_policy(cfg.precision)
  with strategy.scope():
    learner, schedule = runner.build_learner(cfg, plan)
  info["build_s"] = time.perf_counter() - start
  pacer = make_pacer(channel, warmup, info, cfg.steps_per_execution)
  if tier == "step":
    data = tf.data.Dataset.from_tensors(
        _synthetic_batch(tf, cfg.train_mode, cfg.train_batch_size,
                         cfg.image_size)).repeat()
    learner.fit(data, epochs=1, steps_per_epoch=cfg.train_steps,
                callbacks=[pacer], verbose=0)
  else:
    manager = checkpoints.make_manager(cfg, learner, True)
    real_fit = learner.fit

    def fit_with_pacer(*args, callbacks=(), **kwargs):
      return real_fit(*args, callbacks=list(callbacks) + [pacer], **kwargs)

    learner.fit = fit_with_pacer   # runner.train's own callbacks, plus ours
    runner.train(cfg, plan, strategy, learner, schedule, manager, chief=True)
  channel.send(done=True, peak_rss_gib=peak_rss_gib())


def pipeline_worker(config: dict, work_dir: str, data_dir: str, warmup: int,
                    channel: Channel) -> None:
  """Times batches of the real input pipeline (cached, augmented)."""
  del work_dir
  _setup_tensorflow(config["knobs"])
  from simclr_tf import config as config_lib  # pylint: disable=g-import-not-at-top
  from simclr_tf.data import pipeline  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  task = config["task"]
  ds = pipeline.build_dataset(
      dataset=config_lib.IMAGE_FOLDER if data_dir else
      config_lib.BUNDLED_DATASET, data_dir=data_dir, split="train",
      stage=task, image_size=32, batch_size=config["batch"], seed=0,
      color_jitter_strength=0.5, use_blur=False, cache=True)
  iterator = iter(ds)

  def run_steps(n):
    # Batches prefetched while other workers ran come out at once: drain
    # them first, untimed.
    for _ in range(PIPELINE_DRAIN):
      next(iterator)
    return time_calls(lambda: next(iterator), n)

  info = {"versions": _versions(), "build_s": time.perf_counter() - start}
  info["warmup_s"] = run_steps(warmup)[0]
  serve(channel, run_steps, info)


# --- Worker side: PyTorch -----------------------------------------------------

def torch_worker(config: dict, work_dir: str, data_dir: str, warmup: int,
                 channel: Channel) -> None:
  """Times one variant of the PyTorch reference step."""
  del work_dir, data_dir
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("torch_anchor", TORCH_ANCHOR)
  anchor = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(anchor)   # sets 2 threads, as measured
  torch = anchor.torch
  start = time.perf_counter()
  torch.manual_seed(0)
  x = torch.randn(2 * config["batch"], 3, 32, 32)
  model = anchor.SimCLR()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
  bf16 = config["precision"] == "bf16"
  fn = anchor.make_step(torch.compile(model) if config["variant"]
                        .startswith("compile") else model, opt, bf16=bf16)

  def run_steps(n):
    return time_calls(lambda: float(fn(x).detach()), n)

  info = {"versions": {"torch": torch.__version__,
                       "python": platform.python_version(),
                       "threads": torch.get_num_threads()},
          "build_s": time.perf_counter() - start}
  info["warmup_s"] = run_steps(warmup)[0]
  serve(channel, run_steps, info)


WORKERS = {"tf": tf_worker, "pipeline": pipeline_worker, "torch": torch_worker}


# --- Parent side ---------------------------------------------------------------

def worker_environment(knobs: dict) -> dict:
  """os.environ plus the knob @env=NAME:VALUE;NAME:VALUE."""
  env = dict(os.environ)
  for item in filter(None, knobs.get("env", "").split(";")):
    name, sep, value = item.partition(":")
    if not sep or not name:
      raise ValueError(f"@env wants NAME:VALUE pairs. Received: {item!r}")
    env[name] = value
  return env


class Worker:
  """One configuration's process, driven over the JSON-lines protocol."""

  def __init__(self, config: dict, python: str, args, log_dir: str):
    self.config = config
    self.times = []
    self.cpu_times = []
    self.pass_medians = {}   # pass number (over the whole run) -> median
    self.error = None
    self.ready = {}
    self.done = {}
    self.work_dir = tempfile.mkdtemp(prefix="work-", dir=log_dir)
    safe = "".join(c if c.isalnum() or c in "-_" else "_"
                   for c in config["name"])
    self.log_path = os.path.join(log_dir, f"{safe}.log")
    data_dir = args.data_dir if config["kind"] != "torch" else ""
    command = [python, os.path.abspath(__file__), "--_worker",
               json.dumps(config), "--_work_dir", self.work_dir,
               "--data_dir", data_dir, "--warmup", str(args.warmup)]
    self.log = open(self.log_path, "w")
    self.proc = subprocess.Popen(command, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self.log,
                                 text=True, bufsize=1, cwd=REPO,
                                 env=worker_environment(config["knobs"]))

  @property
  def name(self) -> str:
    return self.config["name"]

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      self.proc.wait()
      raise RuntimeError(f"worker exited with status {self.proc.returncode}"
                         f"; see {self.log_path}:\n{self._log_tail()}")
    return json.loads(line)

  def _log_tail(self, lines: int = 15) -> str:
    self.log.flush()
    with open(self.log_path) as f:
      return "".join(f.readlines()[-lines:])

  def wait_ready(self) -> bool:
    try:
      self.ready = self._read()
    except (RuntimeError, ValueError) as e:
      self.error = str(e)
      return False
    return True

  def run(self, steps: int, pass_id: int) -> None:
    if self.error:
      return
    try:
      self.proc.stdin.write(json.dumps({"cmd": "run", "steps": steps}) + "\n")
      self.proc.stdin.flush()
      reply = self._read()
      times = reply["times"]
    except (RuntimeError, ValueError, BrokenPipeError, KeyError) as e:
      self.error = str(e)
      return
    self.times.extend(times)
    self.cpu_times.extend(reply.get("cpu_times", []))
    self.pass_medians[pass_id] = statistics.median(times)

  def quit(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.flush()
        if not self.error:
          self.done = self._read()
      except (RuntimeError, ValueError, BrokenPipeError) as e:
        self.error = self.error or str(e)
      try:
        self.proc.wait(timeout=300)
      except subprocess.TimeoutExpired:
        self.proc.kill()
    self.log.close()
    shutil.rmtree(self.work_dir, ignore_errors=True)

  def images_per_s(self, times=None):
    times = self.times if times is None else times
    if not times:
      return None
    return images_per_step(self.config) / statistics.median(times)

  def result(self) -> dict:
    figures = {
        "config": self.config,
        "images_per_step": images_per_step(self.config),
        "images_per_s": _round(self.images_per_s()),
        "images_per_cpu_s": _round(self.images_per_s(self.cpu_times)),
        "pass_images_per_s": {
            p: _round(images_per_step(self.config) / t)
            for p, t in self.pass_medians.items()},
        "step_s": [round(t, 4) for t in self.times],
        "step_cpu_s": [round(t, 4) for t in self.cpu_times],
        "build_s": _round(self.ready.get("build_s")),
        "warmup_s": [round(t, 2) for t in self.ready.get("warmup_s", [])],
        "peak_rss_gib": _round(self.done.get("peak_rss_gib"), 2),
        "versions": self.ready.get("versions", {}),
    }
    if "recompute_blocks" in self.ready:   # what the TF run resolved
      figures["recompute_blocks"] = self.ready["recompute_blocks"]
    if self.error:
      figures["error"] = self.error
    return figures


def _round(value, digits=1):
  return None if value is None else round(value, digits)


def machine_info() -> dict:
  """CPU model, cores, relevant instruction-set flags, memory, load."""
  model, flags = platform.processor(), []
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() == "flags":
          flags = value.split()
  except OSError:
    pass
  wanted = ("avx2", "fma", "avx512", "amx", "vnni", "bf16")
  memory = None
  try:
    with open("/proc/meminfo") as f:
      memory = round(int(f.readline().split()[1]) / 2**20, 1)
  except (OSError, ValueError, IndexError):
    pass
  return {"cpu": model, "cores": os.cpu_count(),
          "flags": sorted(f for f in set(flags)
                          if any(w in f for w in wanted)),
          "memory_gib": memory, "platform": platform.platform(),
          "load_average_start": [round(x, 2) for x in os.getloadavg()]}


def run_group(workers: list, args, log, first_pass: int) -> None:
  """Interleaves timed passes of `workers` (order rotated every pass).

  Args:
    workers: the Workers.
    args: the command line.
    log: function(message).
    first_pass: number of the first pass (passes are numbered over the
      whole run, so that pinned workers pair up with every group).
  """
  live = [w for w in workers if not w.error]
  for p in range(args.repeats):
    order = live[p % len(live):] + live[:p % len(live)] if live else []
    for w in order:
      steps = args.steps * (PIPELINE_BATCHES_PER_STEP
                            if w.config["kind"] == "pipeline" else 1)
      w.run(steps, first_pass + p)
      rate = w.images_per_s(w.times[-steps:]) if not w.error else None
      log(f"  pass {p + 1}/{args.repeats} {w.name:38s} "
          + (f"{rate:8.1f} img/s" if rate else f"FAILED: {w.error}"))


def start(config, args, log_dir, log):
  python = args.with_torch if config["kind"] == "torch" else sys.executable
  log(f"starting {config['name']} ...")
  w = Worker(config, python, args, log_dir)
  if w.wait_ready():
    log(f"  ready: build {w.ready.get('build_s', 0):.0f} s, warm-up steps "
        f"{[round(t, 1) for t in w.ready.get('warmup_s', [])]} s")
  else:
    log(f"  FAILED: {w.error}")
  return w


def summarise(results: list, references: list) -> list:
  """Derived ratios: full loop vs bare step, pipeline vs step, vs refs.

  Each ratio is given from the median wall times ('ratio'), as the median
  over passes of the ratio within a pass ('paired_ratio': the two ran
  minutes apart, under about the same load) and from CPU time
  ('cpu_ratio', steadier on a shared machine).
  """
  by_name = {r["config"]["name"]: r for r in results}
  notes = []

  def ratio(what, a, b, target=None):
    if not (a.get("images_per_s") and b.get("images_per_s")):
      return
    note = {"what": f"{what}{a['config']['name']} / {b['config']['name']}",
            "ratio": round(a["images_per_s"] / b["images_per_s"], 3)}
    paired = [a["pass_images_per_s"][p] / b["pass_images_per_s"][p]
              for p in a["pass_images_per_s"]
              if b["pass_images_per_s"].get(p)]
    if paired:   # the median over passes of the ratio within a pass
      note["paired_ratio"] = round(statistics.median(paired), 3)
    if a.get("images_per_cpu_s") and b.get("images_per_cpu_s"):
      note["cpu_ratio"] = round(a["images_per_cpu_s"] /
                                b["images_per_cpu_s"], 3)
    if target:
      note["target"] = target
    notes.append(note)

  for r in results:
    c = r["config"]
    if c["kind"] == "tf" and c["tier"] == "full":
      bare = f"{c['task']}-bare-{c['precision']}" + (
          "-xla" if c["xla"] else "") + f"-b{c['batch']}"
      if "@" in c["name"]:
        bare += c["name"][c["name"].index("@"):]
      if bare in by_name:
        ratio("", r, by_name[bare], ">= 0.90")
    if c["kind"] == "pipeline":
      steps = [s for s in results if s["config"]["kind"] == "tf" and
               s["config"]["task"] == c["task"] and s.get("images_per_s")]
      if steps:
        ratio("", r, max(steps, key=lambda s: s["images_per_s"]), ">= 3")
  for ref in references:
    if ref not in by_name:
      continue
    for r in results:
      if r["config"]["kind"] == "tf" and r["config"]["task"] == "pretrain":
        ratio("", r, by_name[ref])
  return notes


def print_table(report: dict) -> None:
  header = (f"{'configuration':40s} {'img/s':>8s} {'img/cpu-s':>9s} "
            f"{'passes (img/s)':>22s} {'peak GiB':>8s} {'build s':>7s}")
  print()
  print(header)
  print("-" * len(header))
  for r in report["results"]:
    passes = ",".join(f"{x:.0f}" for x in r["pass_images_per_s"].values())
    rate = f"{r['images_per_s']:8.1f}" if r["images_per_s"] else "  failed"
    cpu = (f"{r['images_per_cpu_s']:9.1f}" if r.get("images_per_cpu_s")
           else "        -")
    rss = f"{r['peak_rss_gib']:8.2f}" if r["peak_rss_gib"] else "       -"
    build = f"{r['build_s']:7.0f}" if r["build_s"] is not None else "      -"
    print(f"{r['config']['name']:40s} {rate} {cpu} {passes:>22s} {rss} "
          f"{build}")
  if report["ratios"]:
    print(f"\n{'ratio':70s} {'wall':>6s} {'paired':>6s} {'cpu':>6s}")
    for note in report["ratios"]:
      target = f"  (target {note['target']})" if "target" in note else ""
      paired = (f"{note['paired_ratio']:6.3f}" if "paired_ratio" in note
                else "     -")
      cpu = f"{note['cpu_ratio']:6.3f}" if "cpu_ratio" in note else "     -"
      print(f"{note['what']:70s} {note['ratio']:6.3f} {paired} {cpu}"
            f"{target}")
  m = report["machine"]
  print(f"\n{m['cpu']}, {m['cores']} cores; load average "
        f"{m['load_average_start']} -> {m['load_average_end']}; "
        f"{report['timing']}")


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--configs", default="quick",
                      help="comma-separated configurations and presets "
                      f"({', '.join(PRESETS)}); default quick")
  parser.add_argument("--steps", type=int, default=3,
                      help="timed steps per configuration and pass "
                      f"(pipelines: {PIPELINE_BATCHES_PER_STEP}x as many "
                      "batches)")
  parser.add_argument("--repeats", type=int, default=3,
                      help="interleaved passes over the configurations")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps after building")
  parser.add_argument("--data_dir", default=SHARED_CIFAR10
                      if os.path.isdir(SHARED_CIFAR10) else "",
                      help="image folder of the full loop and the pipeline;"
                      " default ../shared/data/cifar10 if present, else the"
                      " bundled sample")
  parser.add_argument("--with_torch", default="", metavar="PYTHON",
                      help="a Python with torch: runs the PyTorch reference "
                      "interleaved with every group of ours")
  parser.add_argument("--torch_configs", default=TORCH_DEFAULT,
                      help="PyTorch variants run with --with_torch")
  parser.add_argument("--max_live", type=int, default=4,
                      help="worker processes alive at once (memory)")
  parser.add_argument("--json", default="", help="write the report here")
  parser.add_argument("--list", action="store_true",
                      help="print the presets and exit")
  parser.add_argument("--_worker", default="", help=argparse.SUPPRESS)
  parser.add_argument("--_work_dir", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args._worker:   # pylint: disable=protected-access
    config = json.loads(args._worker)   # pylint: disable=protected-access
    channel = Channel()
    WORKERS[config["kind"]](config, args._work_dir, args.data_dir,  # pylint: disable=protected-access
                            args.warmup, channel)
    return
  if args.list:
    for name, spec in PRESETS.items():
      print(f"{name}: {spec}")
    return

  configs = expand_configs(args.configs)
  torch_configs = []
  if args.with_torch:
    if not os.path.exists(TORCH_ANCHOR):
      parser.error(f"--with_torch needs {TORCH_ANCHOR}")
    torch_configs = [parse_config(n) for n in args.torch_configs.split(",")]
  machine = machine_info()
  started = time.time()
  log_dir = tempfile.mkdtemp(prefix="simclr-throughput-")

  def log(message):
    print(message, file=sys.stderr, flush=True)

  log(f"worker logs: {log_dir}")
  pinned = [start(c, args, log_dir, log) for c in torch_configs]
  room = max(1, args.max_live - len(pinned))
  workers = []
  try:
    for first in range(0, len(configs), room):
      group = [start(c, args, log_dir, log)
               for c in configs[first:first + room]]
      run_group(pinned + group, args, log, first // room * args.repeats)
      for w in group:
        w.quit()
      workers.extend(group)
  finally:
    for w in pinned + workers:
      w.quit()
  results = [w.result() for w in workers + pinned]
  machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
  report = {
      "machine": machine,
      "versions": next((r["versions"] for r in results
                        if r["config"]["kind"] == "tf" and r["versions"]),
                       {}),
      "torch_versions": next((r["versions"] for r in results
                              if r["config"]["kind"] == "torch"), {}),
      "flags": {k: v for k, v in vars(args).items()
                if not k.startswith("_")},
      "environment": {k: v for k, v in os.environ.items()
                      if k.startswith(("TF_", "OMP_", "KMP_", "ONEDNN",
                                       "DNNL", "XLA_"))},
      "timing": f"median of {args.repeats} interleaved passes x "
                f"{args.steps} steps after {args.warmup} warm-up steps; "
                f"{time.time() - started:.0f} s in all",
      "results": results,
      "ratios": summarise(results, [c["name"] for c in torch_configs]),
      "date": time.strftime("%Y-%m-%d %H:%M"),
  }
  print_table(report)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  if any("error" in r for r in results):
    log(f"Some configurations failed; their logs are in {log_dir}")
    sys.exit(1)
  shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
  main()
