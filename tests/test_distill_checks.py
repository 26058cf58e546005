"""benchmarks/distill_checks.py on a small export and real images."""

import json
import os
import shutil
import sys

import pytest

from conftest import ROOT, export_small_classifier

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import distill_checks  # pylint: disable=g-import-not-at-top,wrong-import-position

# One process runs this file's tests, so that its module fixtures (which
# export models) run once (`make test` distributes by xdist_group).
pytestmark = pytest.mark.xdist_group(__name__)

SAMPLE = os.path.join(ROOT, "simclr_tf", "data", "cifar10_sample", "test")
CLASSES = ("airplane", "automobile", "bird")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  return export_small_classifier(
      str(tmp_path_factory.mktemp("export") / "saved_model"), CLASSES,
      proj_layers_kept=1, sup_head_input=1)


def test_checks_on_a_teacher_and_itself_as_student(teacher, tmp_path):
  root = tmp_path / "data"
  for name in CLASSES:
    (root / "val" / name).mkdir(parents=True)
    for f in sorted(os.listdir(os.path.join(SAMPLE, name)))[:4]:
      shutil.copy(os.path.join(SAMPLE, name, f), root / "val" / name / f)
  out = tmp_path / "report.json"
  distill_checks.main(["--teacher", teacher, "--data_dir", str(root),
                       "--student", teacher, "--json", str(out)])
  report = json.loads(out.read_text())
  assert report["images"] == 12
  bn = report["bn_mode"]
  # The stage calls the teacher in inference mode, not with batch stats.
  assert bn["max_abs_diff_vs_training_false"] < 1e-4
  assert bn["max_abs_diff_vs_training_true"] > 1e-2
  temp = report["temperature"]
  assert temp["loss_at_student_eq_teacher"] == pytest.approx(
      temp["t2_times_entropy"], rel=1e-4)
  assert temp["max_abs_grad_at_student_eq_teacher"] < 1e-5
  soft = report["soft_labels"]
  assert soft["T=0.1"]["mean_top_prob"] > soft["T=1"]["mean_top_prob"]
  student = report["student"]
  # A zero head predicts class 0 everywhere: 4 of the 12 images.
  assert student["new_zero_head"]["top1_at_step_0"] == pytest.approx(4 / 12)
  assert student["init_head"]["agreement_with_teacher"] == 1.0
  paired = report["paired"]
  assert paired["only_teacher_right"] == paired["only_student_right"] == 0
  assert paired["student_minus_teacher_points"] == 0.0
  assert report["precision"]["top1_fp32"] == bn["top1_training_false"]
