"""Chooses the tf.distribute strategy: one code path from a CPU to TPU pods."""

from __future__ import annotations

import logging
from typing import Optional

import tensorflow as tf

log = logging.getLogger("simclr_tf")


def split_cpu(num_replicas: int) -> None:
  """Splits the CPU into `num_replicas` logical devices.

  Must run before TensorFlow initialises its devices (before any op), which
  is why `run.py` calls it first.
  """
  if num_replicas <= 1:
    return
  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration()] * num_replicas)


def resolve_strategy_name(name: str, tpu: str = "", cpu_replicas: int = 0,
                          num_gpus: Optional[int] = None) -> str:
  """Maps 'auto' to a concrete strategy name."""
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
  """The cluster resolver for `--tpu` ('local' on a Cloud TPU VM)."""
  if tpu in ("local", ""):
    return tf.distribute.cluster_resolver.TPUClusterResolver(tpu="local")
  return tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)


def make_strategy(name: str = "auto", tpu: str = "",
                  cpu_replicas: int = 0) -> tf.distribute.Strategy:
  """Builds the strategy named by `--strategy` (see README, 'Scaling out')."""
  name = resolve_strategy_name(name, tpu, cpu_replicas)
  if name == "tpu":
    resolver = tpu_resolver(tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  if name == "multi_worker_mirrored":
    return tf.distribute.MultiWorkerMirroredStrategy()
  if name == "mirrored":
    devices = None
    if cpu_replicas > 1:
      devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)
  gpus = tf.config.list_logical_devices("GPU")
  device = gpus[0].name if gpus else "/cpu:0"
  return tf.distribute.OneDeviceStrategy(device)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the worker that writes checkpoints, exports and summaries."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not getattr(resolver, "cluster_spec", None):
    return True
  spec = resolver.cluster_spec().as_dict()
  if not spec:
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type in ("chief", None):
    return True
  return task_type == "worker" and task_id == 0 and "chief" not in spec
