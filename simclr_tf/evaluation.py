"""Evaluation: top-1, top-5 and loss of a network on the eval split.

Its own path, not a mode threaded through training: `evaluate_run` measures
an export (`--init_from`, as it is) or the newest checkpoint of a model_dir
(`--mode=eval`); a training run calls `measure` on the network it has just
trained (`--mode=train_then_eval`). Both use the same `Learner.test_step`.
"""

from __future__ import annotations

import json
import logging
import os

import keras

from simclr_tf import atomic
from simclr_tf import callbacks as cb
from simclr_tf import checkpoints
from simclr_tf import config as config_lib
from simclr_tf import distribute
from simclr_tf import projector
from simclr_tf.config import Config, ConfigError
from simclr_tf.data import pipeline
from simclr_tf.learner import Learner
from simclr_tf.models import simclr as simclr_lib
from simclr_tf.plan import make_plan, prepare_model_dir

log = logging.getLogger("simclr_tf")

RESULT_FILE = "result.json"
METRICS = ("loss", "top1", "top5")


def eval_dataset(cfg: Config, strategy):
  """The --eval_split, centre-cropped, one pass, distributed."""
  def fn(ctx):
    return pipeline.build_dataset(
        dataset=cfg.dataset, data_dir=cfg.data_dir, split=cfg.eval_split,
        stage="eval", image_size=cfg.image_size,
        batch_size=ctx.get_per_replica_batch_size(cfg.eval_batch_size),
        cache=False, input_context=ctx, strict=cfg.strict_data)

  return strategy.distribute_datasets_from_function(fn)


def measure(cfg: Config, strategy, learner, step: int, chief: bool) -> dict:
  """Top-1/top-5/loss of `learner.net` on --eval_split (TensorBoard on the
  chief); {} with a warning for a network without a supervised head."""
  result = {"eval_split": cfg.eval_split, "train_mode": cfg.train_mode}
  if learner.net.sup_head is None:
    log.warning("The model has no supervised head (unlabeled data, or "
                "--nolineareval_while_pretraining): nothing to evaluate.")
    return result
  metrics = learner.evaluate(eval_dataset(cfg, strategy), return_dict=True,
                             verbose=0)
  result.update({k: float(v) for k, v in metrics.items()})
  if chief:
    cb.write_scalars(os.path.join(cfg.model_dir, "eval"), step,
                     {k: result[k] for k in METRICS}, prefix="eval")
  return result


def _network(cfg: Config, plan, strategy):
  """(the network to evaluate, its step): the --init_from export as it is,
  or the run's architecture restored from model_dir's newest checkpoint."""
  if plan.init_meta is not None:
    # pylint: disable=g-import-not-at-top
    from tf_hub_export import load as load_lib
    source, meta, _ = load_lib.load_model(cfg.init_from)
    with strategy.scope():
      net = simclr_lib.build_model(meta.model_config, cfg.image_size)
    simclr_lib.copy_weights(source, net)
    log.info("Evaluating the export %s (step %d of %s).", cfg.init_from,
             meta.global_step, meta.train_mode or "an import")
    return net, meta.global_step
  with strategy.scope():
    net = simclr_lib.build_model(plan.model_config, cfg.image_size)
  restored = checkpoints.restore_network(cfg, net)
  if restored is None:
    raise ConfigError(
        f"--mode=eval found no checkpoint in --model_dir={cfg.model_dir!r}; "
        "train first or pass --init_from=EXPORT.")
  log.info("Evaluating %s.", restored)
  return net, checkpoints.step_of(restored)


def evaluate_run(cfg: Config) -> dict:
  """Evaluates an export or a model_dir's newest checkpoint (--mode=eval).

  Writes result.json (and a TensorBoard projector view) into model_dir;
  never a checkpoint or an export.

  Args:
    cfg: the run's config: --init_from to evaluate that export, else the
      checkpoints of --model_dir with the run's architecture flags.
  Returns:
    {global_step, eval_split, train_mode, loss, top1, top5}.
  Raises:
    ConfigError: bad values, data, export, or no checkpoint to evaluate.
  """
  config_lib.validate(cfg)
  prepare_model_dir(cfg)
  strategy = distribute.make_strategy(cfg.strategy, cfg.tpu, cfg.cpu_replicas)
  keras.utils.set_random_seed(cfg.seed)
  plan = make_plan(cfg, training=False)
  chief = distribute.is_chief(strategy)
  precision = distribute.resolve_precision(cfg.precision, strategy)
  with distribute.dtype_policy(precision):
    net, step = _network(cfg, plan, strategy)
    with strategy.scope():
      learner = Learner(net, task=None)
      learner.compile()
    result = {"global_step": step}
    result.update(measure(cfg, strategy, learner, step, chief))
    if chief:
      result["projector"] = projector.write_run_projector(cfg, plan, net)
      atomic.write_text(os.path.join(cfg.model_dir, RESULT_FILE),
                        json.dumps(result, indent=2))
  distribute.barrier(strategy)
  return result
