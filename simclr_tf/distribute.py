"""Chooses the tf.distribute strategy: one code path from a CPU to TPU pods.

`--strategy` names one of:
  one_device             one GPU (the first) or the CPU;
  mirrored               every local GPU, or `--cpu_replicas` logical CPUs;
  multi_worker_mirrored  one process per machine, the cluster read from the
                         standard `TF_CONFIG` environment variable;
  tpu                    a Cloud TPU (`--tpu=local` on a TPU VM);
  auto                   tpu if `--tpu` is given, mirrored with several GPUs
                         or `--cpu_replicas` > 1, else one_device.

Only the chief (see `is_chief`) writes checkpoints, exports, summaries and
result files; the other workers of a multi-worker run save their
checkpoints to a scratch folder (`simclr_tf.checkpoints.scratch_dir`) that
is deleted at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from simclr_tf import cpu
from simclr_tf.config import ConfigError

def split_cpu(num_replicas: int) -> None:
  """Splits the CPU into `num_replicas` logical devices.

  Must run before TensorFlow initialises its devices (before any op), which
  is why `run.py` calls it first.

  Args:
    num_replicas: number of logical CPU devices; <= 1 leaves the CPU whole.
  """
  if num_replicas <= 1:
    return
  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration()] * num_replicas)


def resolve_strategy_name(name: str, tpu: str = "", cpu_replicas: int = 0,
                          num_gpus: Optional[int] = None) -> str:
  """Maps 'auto' to a concrete strategy name.

  Args:
    name: the `--strategy` value.
    tpu: the `--tpu` value; non-empty selects the TPU.
    cpu_replicas: the `--cpu_replicas` value; > 1 selects mirrored.
    num_gpus: GPUs visible (None: ask TensorFlow).
  Returns:
    'one_device', 'mirrored', 'multi_worker_mirrored' or 'tpu'.
  """
  if name != "auto":
    return name
  if tpu:
    return "tpu"
  if cpu_replicas > 1:
    return "mirrored"
  if num_gpus is None:
    num_gpus = len(tf.config.list_physical_devices("GPU"))
  return "mirrored" if num_gpus > 1 else "one_device"


def tpu_resolver(tpu: str):
  """The cluster resolver for `--tpu`.

  Args:
    tpu: 'local' (or empty) on a Cloud TPU VM, whose TPU chips are attached
      to this host; otherwise the TPU's name (a TPU node in this project and
      zone) or its grpc:// address.
  Returns:
    A `tf.distribute.cluster_resolver.TPUClusterResolver`.
  """
  return tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "local")


def make_tpu_strategy(tpu: str) -> tf.distribute.Strategy:
  """Connects to the TPU system, initialises it, returns a TPUStrategy."""
  resolver = tpu_resolver(tpu)
  tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  return tf.distribute.TPUStrategy(resolver)


def make_strategy(name: str = "auto", tpu: str = "",
                  cpu_replicas: int = 0) -> tf.distribute.Strategy:
  """Builds the strategy named by `--strategy` (see the module docstring).

  Args:
    name: the `--strategy` value.
    tpu: the `--tpu` value.
    cpu_replicas: the `--cpu_replicas` value (after `split_cpu`).
  Returns:
    A `tf.distribute.Strategy`.
  """
  name = resolve_strategy_name(name, tpu, cpu_replicas)
  if name == "tpu":
    return make_tpu_strategy(tpu)
  if name == "multi_worker_mirrored":
    # Reads the cluster and this task from TF_CONFIG; RING collectives on
    # CPUs, NCCL on GPUs.
    return tf.distribute.MultiWorkerMirroredStrategy()
  if name == "mirrored":
    devices = None
    if cpu_replicas > 1:
      devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)
  gpus = tf.config.list_logical_devices("GPU")
  device = gpus[0].name if gpus else "/cpu:0"
  return tf.distribute.OneDeviceStrategy(device)


def resolve_precision(precision: str, strategy: tf.distribute.Strategy,
                      cpu_flags: Optional[set] = None) -> str:
  """The Keras dtype policy that `--precision` names on this hardware.

  `auto` picks the fastest policy that trains correctly: mixed_bfloat16 on
  TPUs, on GPUs of compute capability 8.0 or more (A100, H100) and on CPUs
  with native bfloat16 arithmetic (AVX512_BF16 or AMX-BF16: on such a 2-core
  CPU the CIFAR pretraining step ran 1.6x faster than in float32 with 42%
  less memory); float32 elsewhere, where bfloat16 is emulated (8.6x slower
  on a 2-core AVX2 CPU). Any other value is returned as given.

  Args:
    precision: the `--precision` value.
    strategy: the run's strategy (its devices decide).
    cpu_flags: the CPU's feature flags (default: read from /proc/cpuinfo).
  Returns:
    float32, mixed_bfloat16 or mixed_float16.
  """
  if precision != "auto":
    return precision
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return "mixed_bfloat16"
  devices = strategy.extended.worker_devices
  gpus = [d for d in devices if "GPU" in d.upper()]
  if gpus:
    details = tf.config.experimental.get_device_details(
        tf.config.list_physical_devices("GPU")[0])
    major, _ = details.get("compute_capability", (0, 0))
    return "mixed_bfloat16" if major >= 8 else "float32"
  flags = cpu.cpu_flags() if cpu_flags is None else cpu_flags
  if flags & {"avx512_bf16", "amx_bf16"}:
    return "mixed_bfloat16"
  return "float32"


def resolve_recompute(recompute_blocks: int, precision: str, global_bn: bool,
                      strategy: tf.distribute.Strategy) -> int:
  """The blocks `--recompute_blocks` recomputes on this hardware.

  -1 (auto, the default) recomputes the stem with the first block (1) on
  CPUs where the batch norms can run twice (float32 or mixed_bfloat16, and
  local statistics or one replica; `simclr_tf.models.recompute`): there it
  takes the CIFAR ResNet-18's float32 step from 3.6 to 2.9 GiB, PyTorch's
  peak, for 1-15% of its speed (docs/performance.md). Elsewhere auto gives
  0: on GPUs and TPUs it was not measured, and their global batch norm over
  several replicas cannot run twice. Any other value is returned as given.

  Args:
    recompute_blocks: the `--recompute_blocks` value.
    precision: the run's resolved precision (`resolve_precision`).
    global_bn: the run's `--global_bn`.
    strategy: the run's strategy (its devices decide).
  Returns:
    0 or more blocks.
  """
  if recompute_blocks >= 0:
    return recompute_blocks
  devices = strategy.extended.worker_devices
  on_cpu = all("CPU" in d.upper() for d in devices) and not isinstance(
      strategy, tf.distribute.TPUStrategy)
  local = not global_bn or strategy.num_replicas_in_sync == 1
  return int(on_cpu and local and precision in ("float32", "mixed_bfloat16"))


@contextlib.contextmanager
def dtype_policy(name: str):
  """Sets Keras' global dtype policy for a run and gives the caller's back
  (also after an exception)."""
  saved = keras.config.dtype_policy()
  keras.config.set_dtype_policy(name)
  try:
    yield
  finally:
    keras.config.set_dtype_policy(saved)


def _task(strategy: tf.distribute.Strategy):
  """(cluster spec as a dict, task type, task id); ({}, None, None) alone."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not getattr(resolver, "cluster_spec", None):
    return {}, None, None
  return (resolver.cluster_spec().as_dict(), resolver.task_type,
          resolver.task_id)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the worker that writes checkpoints, exports and summaries.

  TF_CONFIG's 'chief' task if the cluster has one, else worker 0 (the
  convention of `MultiWorkerMirroredStrategy`); a single process (one
  device, mirrored, a TPU) is always the chief.

  Args:
    strategy: the run's strategy.
  Returns:
    Whether this process is the chief.
  """
  spec, task_type, task_id = _task(strategy)
  if not spec or task_type in ("chief", None):
    return True
  return task_type == "worker" and task_id == 0 and "chief" not in spec


def task_name(strategy: tf.distribute.Strategy) -> str:
  """This process's task in the cluster, e.g. 'worker_1' ('chief' alone)."""
  spec, task_type, task_id = _task(strategy)
  if not spec or task_type is None:
    return "chief"
  return f"{task_type}_{task_id}"


def replicas_per_pipeline(input_context) -> int:
  """Replicas fed by one input pipeline (one worker, one TPU host).

  `distribute_datasets_from_function` gives consecutive per-replica batches
  of a pipeline to consecutive local replicas, so one training step takes
  this many batches from each pipeline.

  Args:
    input_context: a `tf.distribute.InputContext` (None: one replica).
  Returns:
    num_replicas_in_sync / num_input_pipelines, at least 1.
  """
  if input_context is None:
    return 1
  return max(1, input_context.num_replicas_in_sync //
             max(1, input_context.num_input_pipelines))


def num_workers(strategy: tf.distribute.Strategy) -> int:
  """Processes taking part in training (1 unless multi-worker)."""
  spec, _, _ = _task(strategy)
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 1
  return max(1, len(spec.get("chief", ())) + len(spec.get("worker", ())))


def check_same_step(strategy: tf.distribute.Strategy, step: int) -> None:
  """Fails if the workers of a multi-worker run resumed at different steps.

  That happens when --model_dir is not shared: the chief resumes from its
  checkpoints and another worker starts from scratch, and the first
  collective op would wait forever.

  Args:
    strategy: the run's strategy.
    step: the step this worker resumed at.
  Raises:
    ConfigError: the steps differ (raised on every worker).
  """
  if num_workers(strategy) <= 1:
    return
  value = tf.constant([step], tf.int64)
  steps = strategy.gather(strategy.run(lambda: tf.identity(value)), axis=0)
  steps = sorted(set(int(s) for s in steps.numpy()))
  if len(steps) > 1:
    raise ConfigError(
        f"The workers resumed at different steps {steps} (this one, "
        f"{task_name(strategy)}, at {step}): --model_dir must be one folder "
        "that every worker reads (a shared file system or a GCS bucket), so "
        "that all resume from the chief's checkpoints.")


def digest_arrays(arrays: dict) -> str:
  """SHA-256 of {path: array}, in path order: first 16 hex digits."""
  digest = hashlib.sha256()
  for path in sorted(arrays):
    digest.update(path.encode())
    digest.update(np.ascontiguousarray(np.asarray(arrays[path])).tobytes())
  return digest.hexdigest()[:16]


def weights_digest(model) -> str:
  """`digest_arrays` of every variable of `model`, for the logs.

  Workers of a synchronous run hold bit-identical weights; each logs this
  digest at the end of training so that a mismatch shows.

  Args:
    model: a Keras model (its variables may be distributed).
  Returns:
    16 hex digits.
  """
  return digest_arrays({v.path: v.numpy() for v in model.variables})


def barrier(strategy: tf.distribute.Strategy) -> None:
  """Waits until every worker of a multi-worker run gets here.

  The workers end together, after the chief's export: a worker that exits
  while the chief still works makes the chief's coordination service report
  it as crashed.

  Args:
    strategy: the run's strategy (nothing to wait for unless multi-worker).
  """
  if num_workers(strategy) <= 1:
    return
  one = tf.constant(1.0)
  strategy.reduce(tf.distribute.ReduceOp.SUM,
                  strategy.run(lambda: tf.identity(one)), axis=None)
