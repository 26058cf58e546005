"""pretrain -> finetune -> distill -> eval through exports, a few steps each.

Four in-process training runs (and reruns of the finished pretraining): in
`make test-slow`.
"""

import glob
import json
import logging
import os
import shutil

import numpy as np
import pytest

import simclr_tf
import tensorflow as tf

from simclr_tf import atomic
from simclr_tf import identity
from simclr_tf import runner
from simclr_tf import tasks
from simclr_tf.config import Config, ConfigError
from simclr_tf.data import pipeline
from tf_hub_export import load as load_lib

pytestmark = pytest.mark.slow

TINY = Config(resnet_depth=18, width_multiplier=0.25, image_size=32,
              train_batch_size=8, eval_batch_size=100, train_steps=2, log_images=False,
              proj_out_dim=32, cache_dataset=False, mode="train_then_eval",
              checkpoint_steps=2, precision="float32")


# What the default --recompute_blocks resolves to for TINY here: the stem
# and first block on a CPU (GPUs are left at 0).
AUTO_RECOMPUTE_HERE = 0 if tf.config.list_physical_devices("GPU") else 1


def _run(tmp, name, **changes):
  cfg = TINY.replace(model_dir=str(tmp / name), **changes)
  return simclr_tf.run(cfg), cfg.model_dir


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("chain")
  pre, pre_dir = _run(tmp, "pretrain", train_mode="pretrain")
  ft, ft_dir = _run(tmp, "finetune", train_mode="finetune", label_fraction=0.1,
                    init_from=os.path.join(pre_dir, "saved_model"),
                    optimizer="momentum", learning_rate=0.1)
  dist, dist_dir = _run(tmp, "distill", train_mode="distill",
                        teacher=os.path.join(ft_dir, "saved_model"),
                        init_from=os.path.join(pre_dir, "saved_model"))
  ev, ev_dir = _run(tmp, "eval", train_mode="distill", mode="eval",
                    init_from=os.path.join(dist_dir, "saved_model"))
  return dict(tmp=tmp, pre=(pre, pre_dir), ft=(ft, ft_dir),
              dist=(dist, dist_dir), ev=(ev, ev_dir))


def _evaluate_by_hand(export_dir: str) -> dict:
  """Loss, top-1 and top-5 of an export on the bundled test split."""
  loaded = tf.saved_model.load(export_dir)
  ds = pipeline.build_dataset(dataset=TINY.dataset, data_dir="",
                              split=TINY.eval_split, stage="eval",
                              image_size=32, batch_size=50, cache=False)
  losses, top1, top5 = [], [], []
  for batch in ds:
    logits = loaded(batch["image"], training=False)["logits_sup"]
    labels = batch["label"]
    z = logits.numpy().astype(np.float64)
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    losses.append(-log_p[np.arange(len(z)), labels.numpy()])
    top1.append(tasks.top_k_correct(labels, logits, 1).numpy())
    top5.append(tasks.top_k_correct(labels, logits, 5).numpy())
  return {"loss": float(np.mean(np.concatenate(losses))),
          "top1": float(np.mean(np.concatenate(top1))),
          "top5": float(np.mean(np.concatenate(top5)))}


def test_every_stage_writes_result_checkpoint_logs_and_export(chain):
  for stage in ("pre", "ft", "dist"):
    result, model_dir = chain[stage]
    assert result["global_step"] == 2
    # The reported figures are the export's on the 200 test images.
    by_hand = _evaluate_by_hand(os.path.join(model_dir, "saved_model"))
    for key in ("top1", "top5", "loss"):
      assert result[key] == pytest.approx(by_hand[key], abs=1e-4), (
          stage, key, result, by_hand)
    assert result["top1"] <= result["top5"]
    saved = json.load(open(os.path.join(model_dir, "result.json")))
    assert saved["global_step"] == 2
    assert saved["top1"] == result["top1"]
    assert os.path.exists(os.path.join(model_dir, "flags.json"))
    assert os.listdir(os.path.join(model_dir, "checkpoints"))
    assert os.listdir(os.path.join(model_dir, "train"))
    loaded = tf.saved_model.load(os.path.join(model_dir, "saved_model"))
    out = loaded(tf.zeros([2, 32, 32, 3]), training=False)
    assert out["logits_sup"].shape == (2, 10)
    # However the run computed its steps (on a CPU, recomputing a block),
    # the export's architecture says nothing of it: loading it gives a plain
    # network.
    arch = load_lib.read_meta(os.path.join(model_dir, "saved_model"),
                              "init_from").model_config
    assert (arch.recompute_blocks, arch.global_bn) == (0, False)


def test_finetune_used_the_label_subset(chain):
  _, model_dir = chain["ft"]
  lines = open(os.path.join(model_dir, "label_subset.txt")).read().split()
  assert len(lines) == 50          # 10% of the 500 bundled images
  classes = {os.path.basename(os.path.dirname(p)) for p in lines}
  assert len(classes) == 10


def test_finetune_head_sits_on_the_first_projection_layer(chain):
  _, model_dir = chain["ft"]
  loaded = tf.saved_model.load(os.path.join(model_dir, "saved_model"))
  out = loaded(tf.zeros([1, 32, 32, 3]), training=False)
  assert "proj_head_layer_1" in out and "proj_head_layer_2" not in out


def test_eval_of_an_export_measures_it_as_it_is(chain):
  ev, ev_dir = chain["ev"]
  dist, dist_dir = chain["dist"]
  # The export's own step and network: what the distillation run measured
  # on the same split at its end.
  assert ev["global_step"] == dist["global_step"] > 0
  assert ev["top1"] == pytest.approx(dist["top1"])
  assert ev["loss"] == pytest.approx(dist["loss"], rel=1e-5)
  # Evaluating writes a result, never an export or a checkpoint.
  assert os.path.exists(os.path.join(ev_dir, "result.json"))
  assert not os.path.exists(os.path.join(ev_dir, "saved_model"))
  assert not os.path.exists(os.path.join(ev_dir, "checkpoints"))
  assert os.path.exists(os.path.join(dist_dir, "saved_model"))


def test_teacher_without_logits_sup_is_rejected(chain, tmp_path):
  _, pre_dir = chain["pre"]
  no_head, _ = _run(tmp_path, "nohead", train_mode="pretrain",
                    lineareval_while_pretraining=False, train_steps=1,
                    mode="train")
  with pytest.raises(ConfigError, match="no 'logits_sup'"):
    _run(tmp_path, "bad_teacher", train_mode="distill",
         teacher=no_head["export"])


def test_init_from_with_other_architecture_is_rejected(chain, tmp_path):
  _, pre_dir = chain["pre"]
  with pytest.raises(ConfigError, match="--resnet_depth=34 does not match"):
    _run(tmp_path, "bad_arch", train_mode="finetune", resnet_depth=34,
         init_from=os.path.join(pre_dir, "saved_model"))


def _files_and_mtimes(folder):
  return {os.path.relpath(os.path.join(d, f), folder):
          os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(folder) for f in files}


def test_rerun_resumes_and_does_not_retrain(chain, caplog):
  _, pre_dir = chain["pre"]
  checkpoints = os.path.join(pre_dir, "checkpoints")
  export = os.path.join(pre_dir, "saved_model")
  result_file = os.path.join(pre_dir, "result.json")
  before = {f: os.path.getmtime(os.path.join(checkpoints, f))
            for f in os.listdir(checkpoints)}
  export_before = _files_and_mtimes(export)
  digest_before = identity.export_digest(export)
  with open(result_file) as f:
    result_text = f.read()
  result_mtime = os.stat(result_file).st_mtime_ns
  cfg = Config(**json.load(open(os.path.join(pre_dir, "flags.json"))))
  # The default --recompute_blocks is recorded as such (it resolves on the
  # machine that runs), and is not part of the run's identity.
  assert cfg.recompute_blocks == -1
  with open(os.path.join(pre_dir, "run.json")) as f:
    assert "recompute_blocks" not in json.load(f)["architecture"]
  with caplog.at_level(logging.INFO, logger="simclr_tf"):
    result = simclr_tf.run(cfg)
  assert result["global_step"] == 2
  assert "Already trained 2/2 steps; nothing to do." in caplog.text
  assert f"float32, --recompute_blocks={AUTO_RECOMPUTE_HERE}." in caplog.text
  after = {f: os.path.getmtime(os.path.join(checkpoints, f))
           for f in os.listdir(checkpoints)}
  assert after == before     # no step taken, no checkpoint written
  # A finished stage keeps its export (later stages record its sha256) and
  # its result, and gives back what result.json records.
  assert (f"pretrain is already finished at step 2: keeping its export "
          f"{export}") in caplog.text
  assert _files_and_mtimes(export) == export_before
  assert identity.export_digest(export) == digest_before
  assert os.stat(result_file).st_mtime_ns == result_mtime
  with open(result_file) as f:
    assert f.read() == result_text
  assert result == json.loads(result_text)
  assert result["export"] == export
  # Another --recompute_blocks continues the same run.
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="simclr_tf"):
    assert simclr_tf.run(cfg.replace(recompute_blocks=0)) == result
  assert "float32, --recompute_blocks=0." in caplog.text
  assert "Already trained 2/2 steps; nothing to do." in caplog.text


def test_rerun_of_a_finished_stage_without_its_export_exports(chain, tmp_path,
                                                              caplog):
  _, pre_dir = chain["pre"]
  model_dir = str(tmp_path / "pretrain")
  shutil.copytree(pre_dir, model_dir)
  shutil.rmtree(os.path.join(model_dir, "saved_model"))
  cfg = Config(**json.load(open(os.path.join(pre_dir, "flags.json"))))
  with caplog.at_level(logging.INFO, logger="simclr_tf"):
    result = simclr_tf.run(cfg.replace(model_dir=model_dir))
  export = os.path.join(model_dir, "saved_model")
  assert "Already trained 2/2 steps; nothing to do." in caplog.text
  assert f"{export} is missing; exporting again" in caplog.text
  assert result["export"] == export
  meta = load_lib.read_meta(export)
  assert (meta.global_step, meta.train_mode) == (2, "pretrain")
  with open(os.path.join(model_dir, "result.json")) as f:
    assert json.load(f)["export"] == export


def test_what_a_finished_stage_keeps(chain, tmp_path, caplog):
  """The checks of a rerun, on a copy of the finished pretraining folder:
  the export is kept if it reads and is of that stage and step; the result
  if result.json is of that step (and split), wherever the folder moved and
  whether or not --mode=eval rewrote it without the export's path."""
  _, pre_dir = chain["pre"]
  model_dir = str(tmp_path / "pretrain")
  shutil.copytree(pre_dir, model_dir)
  export = os.path.join(model_dir, "saved_model")
  result_file = os.path.join(model_dir, "result.json")
  with open(result_file) as f:
    recorded = json.load(f)

  # pylint: disable=protected-access
  def result(step=2, evaluate=True, **changes):
    cfg = TINY.replace(**{"model_dir": model_dir, **changes})
    return runner._result_of_step(cfg, step, evaluate)

  with caplog.at_level(logging.INFO, logger="simclr_tf"):
    assert runner._export_of_step(export, "pretrain", 2)
    assert not runner._export_of_step(export, "pretrain", 3)
    assert "saved_model is a pretrain export of step 2" in caplog.text
    assert not runner._export_of_step(export, "finetune", 2)
    assert not runner._export_of_step(str(tmp_path / "none"), "pretrain", 2)
    assert "none is missing" in caplog.text

  assert result() == recorded
  assert result(eval_split="train", evaluate=False) == recorded
  assert result(step=3) is None
  assert result(eval_split="train") is None    # not evaluated on that split
  evaluated = {k: v for k, v in recorded.items() if k != "export"}
  for value, expected in ((evaluated, evaluated), ([], None), ({}, None)):
    atomic.write_text(result_file, json.dumps(value))
    assert result() == expected, value
  with open(result_file, "w") as f:
    f.write("{not json")
  assert result() is None
  os.remove(result_file)
  assert result() is None

  data = glob.glob(os.path.join(export, "variables", "variables.data-*"))[0]
  with open(data, "r+b") as f:   # one flipped byte: a damaged export
    f.seek(os.path.getsize(data) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="simclr_tf"):
    assert not runner._export_of_step(export, "pretrain", 2)
  assert "its export does not read" in caplog.text
  assert "variables.data-00000-of-00001 is damaged" in caplog.text
