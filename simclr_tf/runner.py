"""Trains one stage end to end: data, model, training, export.

Pretraining, fine-tuning and distillation share everything here; they differ
only in the model's wiring (`config.model_config`), the task
(`simclr_tf.tasks`) and the fields of their `simclr_tf.stages.Stage`.
Checkpoints and resuming are `simclr_tf.checkpoints`; evaluation is its own
path (`simclr_tf.evaluation`), which a training run calls at its end when
asked to; what an export handed over must satisfy is `simclr_tf.handover`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Optional

import keras

from simclr_tf import atomic
from simclr_tf import callbacks as cb
from simclr_tf import checkpoints
from simclr_tf import config as config_lib
from simclr_tf import distribute
from simclr_tf import evaluation
from simclr_tf import handover
from simclr_tf import monitor
from simclr_tf import projector
from simclr_tf import stages
from simclr_tf import tasks as tasks_lib
from simclr_tf.config import Config, ConfigError
from simclr_tf.data import pipeline
from simclr_tf.plan import Plan, make_plan, prepare_model_dir, record_flags
from simclr_tf.learner import Learner
from simclr_tf.memory import Memory
from simclr_tf.models import simclr as simclr_lib
from simclr_tf.optim.lars import LARS
from simclr_tf.optim.schedules import WarmUpAndCosineDecay
from tf_hub_export import load as load_lib
from tf_hub_export import verify as verify_lib
from tf_hub_export.export import export_saved_model

log = logging.getLogger("simclr_tf")

EXPORT_DIR = "saved_model"
RESULT_FILE = evaluation.RESULT_FILE


@dataclasses.dataclass(frozen=True)
class TrainOutcome:
  """What a training run gives back.

  Attributes:
    net: the trained network (`simclr_tf.models.simclr.SimCLR`).
    metrics: global_step, train_seconds and, when evaluated, the eval
      split's top1/top5/loss (what result.json records).
    export_path: the SavedModel written, or kept by a rerun of a finished
      stage ("" on a non-chief worker, or when preempted).
    model_dir: the run's folder.
    preempted: stopped by SIGTERM or SIGINT after saving a checkpoint
      (`metrics["signal"]` names it).
  """

  net: object
  metrics: dict
  export_path: str
  model_dir: str
  preempted: bool = False


# --- Model, optimizer, learner ---------------------------------------------

def load_init(cfg: Config, plan: Plan):
  """The --init_from export as a Keras model (checked), and its report."""
  source, _, report = load_lib.load_model(
      cfg.init_from, dataclasses.replace(plan.model_config, global_bn=False),
      new_weights=handover.new_weights(cfg))
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
  """The --teacher's frozen logits function, or None (no teacher)."""
  if not stages.get(cfg.train_mode).teacher:
    return None
  logits_fn, _ = load_lib.load_logits_fn(cfg.teacher, "teacher")
  return logits_fn


def build_learner(cfg: Config, plan: Plan, exports=None):
  """The learner and its schedule; `exports` from `load_exports` (or None)."""
  init, teacher = exports if exports is not None else load_exports(cfg, plan)
  net = build_net(cfg, plan, init)
  opt, schedule, groups = build_optimizer(cfg, plan, net)
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
          chief: bool) -> tuple[int, Optional[str]]:
  """Trains until plan.total_steps, from the step the learner is at.

  Returns:
    (the step reached, the name of the signal that stopped training after a
    checkpoint (SIGTERM, SIGINT), or None).
  """
  step = int(learner.optimizer.iterations.numpy())
  if step >= plan.total_steps:
    log.info("Already trained %d/%d steps; nothing to do.", step,
             plan.total_steps)
    return step, None
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
  return int(learner.optimizer.iterations.numpy()), checkpointer.stopped_by


def export(cfg: Config, plan: Plan, learner, step: int) -> str:
  path = os.path.join(cfg.model_dir, EXPORT_DIR)
  export_saved_model(learner.net, path, cfg.image_size,
                     class_names=plan.info.class_names,
                     train_mode=cfg.train_mode, global_step=step)
  return path


def train_stage(cfg: Config, evaluate: Optional[bool] = False) -> TrainOutcome:
  """Trains `cfg.train_mode` to its last step (resuming from model_dir's
  newest checkpoint), exports the network and, if `evaluate`, measures it
  on the eval split. A rerun of a finished stage keeps the export and
  result.json it wrote (`_export_of_step`, `_result_of_step`).

  Args:
    cfg: the run's config (validated here).
    evaluate: also evaluate the trained network (True: --mode=
      train_then_eval, which needs an eval split; None: when the data has
      an eval split and the network a supervised head).
  Returns:
    A `TrainOutcome`; result.json records its metrics and export.
  Raises:
    ConfigError: bad values, data, exports or model_dir (nothing trained).
  """
  config_lib.validate(cfg)
  prepare_model_dir(cfg)
  # Before any TensorFlow op: a multi-worker strategy configures the
  # collective ops of the runtime, which must not be initialised yet.
  strategy = distribute.make_strategy(cfg.strategy, cfg.tpu, cfg.cpu_replicas)
  given = cfg   # flags.json records it: "auto" reruns anywhere
  cfg = resolve_hardware(cfg, strategy)
  keras.utils.set_random_seed(cfg.seed)
  plan = make_plan(cfg)
  if evaluate is None:
    evaluate = bool(plan.info.num_eval_examples and
                    plan.model_config.num_classes)
  elif evaluate and not plan.info.num_eval_examples:
    raise ConfigError(
        f"--mode=train_then_eval: --eval_split={cfg.eval_split!r} of "
        f"--dataset={cfg.dataset} has no examples; give an existing split or "
        "use --mode=train.")
  if evaluate:   # the record says what the run does
    cfg = cfg.replace(mode="train_then_eval")
  record_flags(given.replace(mode=cfg.mode), plan)
  chief = distribute.is_chief(strategy)
  with distribute.dtype_policy(cfg.precision):
    return _train(cfg, plan, strategy, chief, evaluate)


def resolve_hardware(cfg: Config, strategy) -> Config:
  """`cfg` with what its defaults choose on `strategy`'s hardware:
  --precision (`distribute.resolve_precision`), then --recompute_blocks
  (`distribute.resolve_recompute`); refuses a recompute that cannot run."""
  cfg = cfg.replace(
      precision=distribute.resolve_precision(cfg.precision, strategy))
  cfg = cfg.replace(recompute_blocks=distribute.resolve_recompute(
      cfg.recompute_blocks, cfg.precision, cfg.global_bn, strategy))
  check_recompute(cfg, strategy)
  return cfg


def check_recompute(cfg: Config, strategy) -> None:
  """Raises ConfigError where --recompute_blocks cannot run: it runs the
  blocks' batch norms twice, which only the fused batch norm with local
  statistics can (simclr_tf.models.recompute)."""
  if not cfg.recompute_blocks:
    return
  if cfg.precision == "mixed_float16":
    raise ConfigError(
        f"--recompute_blocks={cfg.recompute_blocks} needs float32 or "
        "mixed_bfloat16, not mixed_float16 (its batch norms would update "
        "their statistics twice); use --recompute_blocks=0 or another "
        "--precision.")
  replicas = strategy.num_replicas_in_sync
  if cfg.global_bn and replicas > 1:
    raise ConfigError(
        f"--recompute_blocks={cfg.recompute_blocks} with --global_bn over "
        f"{replicas} replicas would run the batch norms' all-reduces again "
        "in the backward pass; use --global_bn=false or "
        "--recompute_blocks=0.")


def _train(cfg: Config, plan: Plan, strategy, chief: bool,
           evaluate: bool) -> TrainOutcome:
  log.info("Strategy %s with %d replica(s); %d steps of %s in %s, "
           "--recompute_blocks=%d.", type(strategy).__name__,
           strategy.num_replicas_in_sync, plan.total_steps, cfg.train_mode,
           cfg.precision, cfg.recompute_blocks)
  exports = load_exports(cfg, plan)   # outside the scope (see there)
  with strategy.scope():
    learner, schedule = build_learner(cfg, plan, exports)
  if chief:
    checkpoints.check_free_space(cfg, learner)
  manager, restored = checkpoints.resume(cfg, learner, chief, strategy)
  if restored:
    log.info("Resumed from %s", restored)
  resumed = int(learner.optimizer.iterations.numpy())
  distribute.check_same_step(strategy, resumed)
  start = time.time()
  step, stopped_by = train(cfg, plan, strategy, learner, schedule, manager,
                           chief)
  if distribute.num_workers(strategy) > 1:   # all workers must agree
    log.info("Weights digest of %s at step %d: %s",
             distribute.task_name(strategy), step,
             distribute.weights_digest(learner.net))
  if stopped_by:
    log.warning("Stopped by %s at step %d; rerun to continue.", stopped_by,
                step)
    return TrainOutcome(learner.net, {"global_step": step, "preempted": True,
                                      "signal": stopped_by},
                        "", cfg.model_dir, preempted=True)
  # A rerun of a finished stage keeps the export it wrote: the stages built
  # on it recorded its sha256, and an export written again (by another
  # version of the code, say) differs in its bytes. Every worker decides
  # alike (the evaluation below is collective): all read the shared
  # model_dir, which the chief writes only after that evaluation.
  path = os.path.join(cfg.model_dir, EXPORT_DIR)
  kept = step == resumed and _export_of_step(path, cfg.train_mode, step)
  recorded = _result_of_step(cfg, step, evaluate) if kept else None
  if recorded is not None:
    log.info("%s is already finished at step %d: keeping its export %s and "
             "%s (delete the export for a fresh one).", cfg.train_mode, step,
             path, RESULT_FILE)
    distribute.barrier(strategy)
    return TrainOutcome(learner.net, dict(recorded, export=path),
                        path if chief else "", cfg.model_dir)
  result = {"global_step": step, "train_seconds": time.time() - start}
  if evaluate:
    result.update(evaluation.measure(cfg, strategy, learner, step, chief))
  if not chief:
    path = ""
  else:
    result["export"] = path if kept else export(cfg, plan, learner, step)
    if stages.get(cfg.train_mode).monitor:
      result["projector"] = projector.write_run_projector(cfg, plan,
                                                          learner.net)
    atomic.write_text(os.path.join(cfg.model_dir, RESULT_FILE),
                      json.dumps(result, indent=2))
  distribute.barrier(strategy)   # workers leave after the chief's export
  return TrainOutcome(learner.net, result, path, cfg.model_dir)


def _export_of_step(path: str, train_mode: str, step: int) -> bool:
  """Whether `path` is an intact export of `train_mode` at `step` (the files
  `load.read_meta` verifies; the reason logged when not)."""
  # Here, not in read_meta: that would read the previous export's copy
  # left by an interrupted swap, which is not this folder's export.
  if not os.path.isfile(os.path.join(path, "saved_model.pb")):
    log.info("The stage is finished but %s is missing; exporting again.", path)
    return False
  try:
    meta = load_lib.read_meta(path, flag="model_dir")
  except load_lib.ExportError as e:
    log.warning("The stage is finished but its export does not read (%s); "
                "exporting again.",
                verify_lib.first_line(e.__cause__ or e, limit=300))
    return False
  if (meta.train_mode, meta.global_step) != (train_mode, step):
    log.warning("The stage is finished at step %d but %s is a %s export of "
                "step %d; exporting again.", step, path, meta.train_mode,
                meta.global_step)
    return False
  return True


def _result_of_step(cfg: Config, step: int, evaluate: bool) -> Optional[dict]:
  """What result.json records of `step` (with an evaluation on --eval_split
  if `evaluate`), or None when it is missing, unreadable or of another step
  or split: the run then measures and records again."""
  try:
    with open(os.path.join(cfg.model_dir, RESULT_FILE),
              encoding="utf-8") as f:
      recorded = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(recorded, dict) or recorded.get("global_step") != step:
    return None
  if evaluate and recorded.get("eval_split") != cfg.eval_split:
    return None
  return recorded
