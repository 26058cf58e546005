"""Runs one stage end to end: data, model, training, evaluation, export.

Pretraining, fine-tuning and distillation share everything here; they differ
only in the model's wiring (`config.model_config`), the task
(`simclr_tf.tasks`) and the fields of their `simclr_tf.stages.Stage`.
Checkpoints and resuming are `simclr_tf.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import sys
import time
from typing import Optional

import keras

from simclr_tf import callbacks as cb
from simclr_tf import checkpoints
from simclr_tf import config as config_lib
from simclr_tf import distribute
from simclr_tf import export_checks
from simclr_tf import monitor
from simclr_tf import projector
from simclr_tf import stages
from simclr_tf import tasks as tasks_lib
from simclr_tf.config import Config, ConfigError, ModelConfig
from simclr_tf.data import pipeline
from simclr_tf.data import sources
from simclr_tf.learner import Learner
from simclr_tf.memory import Memory
from simclr_tf.models import simclr as simclr_lib
from simclr_tf.optim.lars import LARS
from simclr_tf.optim.schedules import WarmUpAndCosineDecay
from tf_hub_export import load as load_lib
from tf_hub_export.export import export_saved_model

log = logging.getLogger("simclr_tf")

EXPORT_DIR = "saved_model"
RESULT_FILE = "result.json"


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything decided before any model is built."""

  info: sources.DatasetInfo
  model_config: ModelConfig
  num_train_examples: int
  total_steps: int
  steps_per_epoch: int
  chunk_steps: int
  init_meta: Optional[object] = None
  teacher_meta: Optional[object] = None


# --- Checks that need files but no model -----------------------------------

def write_atomic(path: str, text: str) -> None:
  """Writes a small file so that a kill leaves the old or the new content."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def prepare_model_dir(cfg: Config) -> None:
  """Creates model_dir, proves it is writable, records the flags."""
  probe = os.path.join(cfg.model_dir,
                       f".write_probe.{socket.gethostname()}.{os.getpid()}")
  try:
    os.makedirs(cfg.model_dir, exist_ok=True)
    try:
      with open(probe, "wb") as f:
        f.write(b"\0" * (1 << 20))
        f.flush()
        os.fsync(f.fileno())
    finally:
      if os.path.exists(probe):
        os.remove(probe)
  except OSError as e:
    reason = ("a file, not a folder" if isinstance(e, FileExistsError)
              else e.strerror)
    raise ConfigError(
        f"--model_dir={cfg.model_dir!r} is not writable ({reason}); "
        "choose a folder with free space that you can write to.") from e
  write_atomic(os.path.join(cfg.model_dir, "flags.json"), cfg.to_json())


def make_plan(cfg: Config) -> Plan:
  """Opens data and exports; raises ConfigError for any bad combination."""
  stage = stages.get(cfg.train_mode)
  try:
    # `config.validate` leaves --label_fraction at 1 in other stages.
    info = sources.get_info(cfg.dataset, cfg.data_dir, cfg.train_split,
                            cfg.eval_split, strict=cfg.strict_data,
                            label_fraction=cfg.label_fraction, seed=cfg.seed)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from e
  init_meta = teacher_meta = None
  try:
    if cfg.init_from:
      init_meta = load_lib.read_meta(cfg.init_from, "init_from")
      export_checks.check_arch(cfg, init_meta, "init_from")
    if stage.teacher and cfg.mode != "eval":
      teacher_meta = load_lib.read_meta(cfg.teacher, "teacher")
      if not teacher_meta.model_config.num_classes:
        raise ConfigError(
            f"--teacher={cfg.teacher!r} has no 'logits_sup' output; give a "
            "fine-tuned export.")
  except load_lib.ExportError as e:
    raise ConfigError(str(e)) from e

  num_classes = info.num_classes
  if teacher_meta is not None:
    t_classes = teacher_meta.model_config.num_classes
    if num_classes and num_classes != t_classes:
      raise ConfigError(
          f"--teacher={cfg.teacher!r} predicts {t_classes} classes but "
          f"--dataset={cfg.dataset} has {num_classes}; distill on the data "
          "the teacher was fine-tuned for.")
    num_classes = t_classes
  if cfg.init_head and init_meta is not None:
    export_checks.check_head(cfg, init_meta, num_classes)
  if stage.needs_labels and not num_classes:
    raise ConfigError(
        f"--dataset={cfg.dataset} has no labels (no class folders); "
        f"--train_mode={stage.name} needs labeled data.")
  model_config = config_lib.model_config(cfg, num_classes)

  num_train = info.num_train_examples
  if cfg.mode != "eval" and cfg.train_batch_size > num_train:
    raise ConfigError(
        f"--train_batch_size={cfg.train_batch_size} is larger than the "
        f"{num_train} training examples; use at most {num_train}.")
  spe = config_lib.steps_per_epoch(num_train, cfg.train_batch_size)
  total = config_lib.total_train_steps(cfg, num_train)
  chunk = cfg.checkpoint_steps or max(1, spe * max(1, cfg.checkpoint_epochs))
  chunk = min(chunk, max(total, 1))
  return Plan(info=info, model_config=model_config, num_train_examples=num_train,
              total_steps=total, steps_per_epoch=spe, chunk_steps=chunk,
              init_meta=init_meta, teacher_meta=teacher_meta)


# --- Model, optimizer, learner ---------------------------------------------

def is_supervised_head(path: str) -> bool:
  """A supervised-head weight: new (zero-initialised) in a training stage
  unless --init_head restores it."""
  return "head_supervised" in path.split("/")


def load_init(cfg: Config, plan: Plan):
  """The --init_from export as a Keras model (checked), and its report."""
  source, _, report = load_lib.load_model(
      cfg.init_from, dataclasses.replace(plan.model_config, global_bn=False),
      new_weights=(is_supervised_head
                   if cfg.mode != "eval" and not cfg.init_head else None))
  return source, report


def load_exports(cfg: Config, plan: Plan):
  """(--init_from model and report or None, --teacher logits fn or None).

  Call it outside `strategy.scope()`: a SavedModel loaded inside a
  tf.distribute scope can only be called in a replica context, and the
  loaders call it to check it.
  """
  init = load_init(cfg, plan) if plan.init_meta is not None else None
  return init, make_teacher(cfg)


def build_net(cfg: Config, plan: Plan, init=None) -> simclr_lib.SimCLR:
  """Builds the network, restored from --init_from when given (checked).

  Args:
    cfg: the run's config.
    plan: the run's plan.
    init: `load_init`'s result, loaded outside the strategy scope (None:
      loaded here).
  Returns:
    The network.
  """
  net = simclr_lib.build_model(plan.model_config, cfg.image_size)
  if plan.init_meta is not None:
    source, report = init or load_init(cfg, plan)
    simclr_lib.copy_weights(source, net)
    log.info("Restored %d weights from %s; new: %s", len(report.restored),
             cfg.init_from, list(report.missing) or "none")
  # `config.validate` leaves it at -1 in a stage that does not freeze.
  simclr_lib.freeze_before_block(net, cfg.fine_tune_after_block)
  return net


def build_optimizer(cfg: Config, plan: Plan, net):
  schedule = WarmUpAndCosineDecay(
      cfg.learning_rate, cfg.train_batch_size, plan.total_steps,
      config_lib.warmup_steps(cfg, plan.num_train_examples),
      scaling=cfg.learning_rate_scaling)
  groups = simclr_lib.decay_groups(net, cfg.optimizer)
  if cfg.optimizer == "lars":
    opt = LARS(schedule, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    undecayed = list(groups.excluded) + list(groups.loss_l2)
    opt.exclude_from_weight_decay(var_list=undecayed)
    opt.exclude_from_layer_adaptation(var_list=undecayed)
  elif cfg.optimizer == "momentum":
    opt = keras.optimizers.SGD(schedule, momentum=cfg.momentum)
  else:
    opt = keras.optimizers.Adam(schedule)
  if cfg.precision == "mixed_float16":
    opt = keras.optimizers.LossScaleOptimizer(opt)
  return opt, schedule, groups


def make_teacher(cfg: Config):
  """The --teacher's frozen logits function, or None (no teacher, or eval)."""
  if not stages.get(cfg.train_mode).teacher or cfg.mode == "eval":
    return None
  logits_fn, _ = load_lib.load_logits_fn(cfg.teacher, "teacher")
  return logits_fn


def build_learner(cfg: Config, plan: Plan, exports=None):
  """The learner and its schedule; `exports` from `load_exports` (or None)."""
  init, teacher = exports if exports is not None else load_exports(cfg, plan)
  net = build_net(cfg, plan, init)
  opt, schedule, groups = build_optimizer(cfg, plan, net)
  task = None    # --mode=eval only runs test_step, the same for every stage
  if cfg.mode != "eval":
    memory = None
    # `config.validate` leaves --memory_size at 0 in other stages.
    if cfg.memory_size > 0:
      # SimCLRv2's memory starts as a copy of the (possibly --init_from)
      # net; a checkpoint restore then overwrites it with the saved one.
      memory = Memory(plan.model_config, cfg.image_size, cfg.memory_size,
                      cfg.memory_momentum)
      memory.initialize_from(net)
    task = tasks_lib.make_task(
        cfg.train_mode, temperature=cfg.temperature,
        hidden_norm=cfg.hidden_norm,
        distill_temperature=cfg.distill_temperature,
        distill_label_weight=cfg.distill_label_weight, teacher=teacher,
        memory=memory)
  learner = Learner(net, task, l2_variables=groups.loss_l2,
                    weight_decay=cfg.weight_decay)
  learner.compile(optimizer=opt, jit_compile=cfg.jit_compile,
                  steps_per_execution=cfg.steps_per_execution)
  opt.build(net.trainable_variables)
  return learner, schedule


# --- Data --------------------------------------------------------------------

def train_dataset(cfg: Config, plan: Plan, strategy, start_step: int):
  """The distributed training stream, resumed at `start_step`."""
  stage = cfg.train_mode
  subset = (os.path.join(cfg.model_dir, "label_subset.txt")
            if cfg.label_fraction < 1.0 else None)

  def fn(ctx):
    return pipeline.build_dataset(
        dataset=cfg.dataset, data_dir=cfg.data_dir, split=cfg.train_split,
        stage=stage, image_size=cfg.image_size,
        batch_size=ctx.get_per_replica_batch_size(cfg.train_batch_size),
        seed=cfg.seed, color_jitter_strength=cfg.color_jitter_strength,
        use_blur=cfg.use_blur, cache=cfg.cache_dataset,
        label_fraction=cfg.label_fraction, subset_file=subset,
        input_context=ctx, strict=cfg.strict_data,
        # Each step takes one batch per local replica from this pipeline.
        start_step=start_step * distribute.replicas_per_pipeline(ctx))

  return strategy.distribute_datasets_from_function(fn)


def eval_dataset(cfg: Config, strategy):
  def fn(ctx):
    return pipeline.build_dataset(
        dataset=cfg.dataset, data_dir=cfg.data_dir, split=cfg.eval_split,
        stage="eval", image_size=cfg.image_size,
        batch_size=ctx.get_per_replica_batch_size(cfg.eval_batch_size),
        cache=False, input_context=ctx, strict=cfg.strict_data)

  return strategy.distribute_datasets_from_function(fn)


def log_augmented_pairs(cfg: Config, log_dir: str) -> None:
  """Writes a few augmented pairs to TensorBoard (people want to see them)."""
  ds = pipeline.build_dataset(
      dataset=cfg.dataset, data_dir=cfg.data_dir, split=cfg.train_split,
      stage=cfg.train_mode, image_size=cfg.image_size, batch_size=8,
      seed=cfg.seed, color_jitter_strength=cfg.color_jitter_strength,
      use_blur=cfg.use_blur, cache=False)
  batch = next(iter(ds))
  cb.write_image_pairs(log_dir, batch["view1"], batch["view2"])


# --- Training, evaluation, export -------------------------------------------

def train(cfg: Config, plan: Plan, strategy, learner, schedule, manager,
          chief: bool) -> tuple[int, bool]:
  """Trains until plan.total_steps, from the step the learner is at.

  Returns:
    (the step reached, whether SIGTERM stopped training first).
  """
  step = int(learner.optimizer.iterations.numpy())
  if step >= plan.total_steps:
    log.info("Already trained %d/%d steps; nothing to do.", step,
             plan.total_steps)
    return step, False
  two_views = stages.get(cfg.train_mode).two_views
  if two_views and cfg.log_images and chief and step == 0:
    log_augmented_pairs(cfg, os.path.join(cfg.model_dir, "train"))
  data = train_dataset(cfg, plan, strategy, start_step=step)
  checkpointer = checkpoints.Checkpointer(manager)
  callbacks = [
      cb.CheckNumerics(),
      cb.StopAtStep(plan.total_steps),
      checkpointer,
  ]
  if chief:
    callbacks.append(cb.Summaries(os.path.join(cfg.model_dir, "train"),
                                  every_steps=min(50, plan.chunk_steps),
                                  learning_rate=schedule))
  callbacks += monitor.knn_callbacks(cfg, plan, learner.net, chief)
  epochs = math.ceil(plan.total_steps / plan.chunk_steps)
  try:
    learner.fit(data, epochs=epochs, initial_epoch=step // plan.chunk_steps,
                steps_per_epoch=plan.chunk_steps, callbacks=callbacks,
                shuffle=False, verbose=1 if sys.stdout.isatty() else 2)
  finally:
    checkpointer.close()
    if not chief:
      checkpoints.remove_scratch(manager.directory)
  return int(learner.optimizer.iterations.numpy()), checkpointer.preempted


def evaluate(cfg: Config, strategy, learner, step: int, chief: bool) -> dict:
  """Top-1/top-5/loss on --eval_split; writes result.json and TensorBoard."""
  result = {"global_step": step, "eval_split": cfg.eval_split,
            "train_mode": cfg.train_mode}
  if learner.net.sup_head is None:
    log.warning("The model has no supervised head (unlabeled data, or "
                "--nolineareval_while_pretraining): nothing to evaluate.")
  else:
    metrics = learner.evaluate(eval_dataset(cfg, strategy), return_dict=True,
                               verbose=0)
    result.update({k: float(v) for k, v in metrics.items()})
    if chief:
      cb.write_scalars(os.path.join(cfg.model_dir, "eval"), step,
                       {k: result[k] for k in ("loss", "top1", "top5")},
                       prefix="eval")
  if chief:
    write_atomic(os.path.join(cfg.model_dir, RESULT_FILE),
                 json.dumps(result, indent=2))
  return result


def export(cfg: Config, plan: Plan, learner, step: int) -> str:
  path = os.path.join(cfg.model_dir, EXPORT_DIR)
  export_saved_model(learner.net, path, cfg.image_size,
                     class_names=plan.info.class_names,
                     train_mode=cfg.train_mode, global_step=step)
  return path


def eval_plan(cfg: Config, plan: Plan) -> Plan:
  """`--mode=eval --init_from=EXPORT` evaluates the export as it is."""
  if cfg.mode == "eval" and plan.init_meta is not None:
    return dataclasses.replace(plan, model_config=plan.init_meta.model_config)
  return plan


def run(cfg: Config) -> dict:
  """Runs `cfg.mode` for `cfg.train_mode`; returns the evaluation result."""
  config_lib.validate(cfg)
  prepare_model_dir(cfg)
  # Before any TensorFlow op: a multi-worker strategy configures the
  # collective ops of the runtime, which must not be initialised yet.
  strategy = distribute.make_strategy(cfg.strategy, cfg.tpu, cfg.cpu_replicas)
  keras.utils.set_random_seed(cfg.seed)
  plan = eval_plan(cfg, make_plan(cfg))
  chief = distribute.is_chief(strategy)
  cfg = cfg.replace(
      precision=distribute.resolve_precision(cfg.precision, strategy))
  keras.config.set_dtype_policy(cfg.precision)
  log.info("Strategy %s with %d replica(s); %d steps of %s in %s.",
           type(strategy).__name__, strategy.num_replicas_in_sync,
           plan.total_steps, cfg.train_mode, cfg.precision)
  exports = load_exports(cfg, plan)   # outside the scope (see there)
  with strategy.scope():
    learner, schedule = build_learner(cfg, plan, exports)
  if cfg.mode != "eval" and chief:
    checkpoints.check_free_space(cfg, learner)
  manager, restored = checkpoints.resume(cfg, learner, chief, strategy)
  if restored:
    log.info("Resumed from %s", restored)
  elif cfg.mode == "eval" and plan.init_meta is None:
    raise ConfigError(
        f"--mode=eval found no checkpoint in --model_dir={cfg.model_dir!r}; "
        "train first or pass --init_from=EXPORT.")
  step = int(learner.optimizer.iterations.numpy())
  distribute.check_same_step(strategy, step)
  start = time.time()
  if cfg.mode in ("train", "train_then_eval"):
    step, preempted = train(cfg, plan, strategy, learner, schedule, manager,
                            chief)
    if distribute.num_workers(strategy) > 1:   # all workers must agree
      log.info("Weights digest of %s at step %d: %s",
               distribute.task_name(strategy), step,
               distribute.weights_digest(learner.net))
    if preempted:
      log.warning("Stopped by SIGTERM at step %d; rerun to continue.", step)
      return {"global_step": step, "preempted": True}
  result = {"global_step": step, "train_seconds": time.time() - start}
  if cfg.mode in ("eval", "train_then_eval"):
    result.update(evaluate(cfg, strategy, learner, step, chief))
  if chief:
    result["export"] = export(cfg, plan, learner, step)
    if cfg.mode == "eval" or stages.get(cfg.train_mode).monitor:
      result["projector"] = projector.write_run_projector(cfg, plan,
                                                          learner.net)
    write_atomic(os.path.join(cfg.model_dir, RESULT_FILE),
                 json.dumps(result, indent=2))
  distribute.barrier(strategy)   # workers leave after the chief's export
  return result

