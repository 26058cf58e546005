"""benchmarks/small_student.py: its stages are valid run.py commands that
distill a smaller student from the fine-tuned teacher, its deploy exports
are valid --mode=export commands, and its judgements (targets, paired test,
verdict) say what the figures say."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import small_student as ss  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_label_efficiency import data_root  # noqa: F401  pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
from simclr_tf import cli  # pylint: disable=g-import-not-at-top,wrong-import-position


def _args(data_root, *argv):   # pylint: disable=redefined-outer-name
  return ss.parse_args(["--out", os.path.dirname(data_root), *argv])


def test_students_are_smaller_and_learn_from_the_fine_tuned_teacher(
    data_root):  # pylint: disable=redefined-outer-name
  a = _args(data_root)
  flags = ss.labeled_stages(a, data_root)
  stages = {k: cli.config_from_args(f) for k, f in flags.items()}
  assert set(stages) == {"teacher_pretrain", "teacher_finetune",
                         "small_pretrain", "small_finetune",
                         "small_supervised"}
  teacher = ss.export_of(flags["teacher_finetune"])
  small_pre = ss.export_of(flags["small_pretrain"])
  assert stages["teacher_finetune"].width_multiplier == 0.25
  assert {stages[k].width_multiplier for k in (
      "small_pretrain", "small_finetune", "small_supervised")} == {0.125}
  # Choices on val only: test is read by the evaluations alone.
  assert {cfg.eval_split for cfg in stages.values()} == {"val"}
  distill = {k: cli.config_from_args(f) for k, f in
             ss.distill_stages(a, data_root, teacher, small_pre).items()}
  assert set(distill) == set(ss.STARTS)
  for cfg in distill.values():
    assert cfg.train_mode == "distill" and cfg.teacher == teacher
    assert cfg.width_multiplier == 0.125 and cfg.distill_label_weight == 0
    assert cfg.eval_split == "val" and cfg.train_split == "train"
  assert distill["pretrained"].init_from == small_pre
  assert not distill["scratch"].init_from


def test_every_deploy_target_is_a_valid_export_command(data_root):  # pylint: disable=redefined-outer-name
  a = _args(data_root)
  for export_format, quantize, _, _ in ss.DEPLOY_TARGETS:
    cfg = cli.config_from_args(ss.export_flags(
        a, "/some/saved_model", data_root, "s", export_format, quantize))
    assert (cfg.mode, cfg.export_format, cfg.quantize) == (
        "export", export_format, quantize)
    assert cfg.eval_split == "test" and cfg.min_agreement == 0


def _report(agreement, top1_savedmodel, top1_converted):
  return {"format": "litert", "quantize": "int8", "file_bytes": 1,
          "top1_savedmodel": top1_savedmodel,
          "top1_converted": top1_converted, "top1_agreement": agreement,
          "max_probability_diff": 0.1, "latency_ms_per_image": 0.3}


@pytest.mark.parametrize("agreement, converted, met", [
    (0.985, 0.330, True),
    (0.964, 0.330, False),           # below the agreement target
    (0.990, 0.315, False),           # top-1 more than 1 point lower
])
def test_int8_target_needs_agreement_and_top1(agreement, converted, met):
  assert ss.deploy_check(_report(agreement, 0.330, converted), 0.98,
                         1.0)["met"] is met


def test_sign_test_and_verdict():
  assert ss.sign_test_p(0, 0) == 1.0
  assert ss.sign_test_p(10, 0) == pytest.approx(2 / 2**10)
  rng = np.random.default_rng(0)
  fine_tuned = rng.random(2000) < 0.3
  tied = ss.paired(fine_tuned.copy(), fine_tuned)
  assert "did NOT HOLD" in ss.verdict(tied)
  better = fine_tuned | (rng.random(2000) < 0.2)
  assert "HELD" in ss.verdict(ss.paired(better, fine_tuned))
  slightly = fine_tuned.copy()
  slightly[np.flatnonzero(~fine_tuned)[:5]] = True
  assert "NOT SHOWN" in ss.verdict(ss.paired(slightly, fine_tuned))
