"""A model_dir is one run (simclr_tf/identity.py): a rerun that asks for
another stage, architecture or starting export is refused before anything is
built, and `--mode=eval --init_from` evaluates that export, never a
checkpoint it did not name. Every refusal leaves the folder byte-identical.
"""

import json
import os
import shutil

import pytest

from conftest import assert_refused, run_cli, snapshot
from simclr_tf.config import ConfigError
from test_faults import CLASSES, STAGE_FLAGS, _train


@pytest.fixture(scope="module")
def classifier(small_classifier):
  return small_classifier


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, classifier):
  """A 2-step distillation run (the teacher: `classifier`)."""
  model_dir = tmp_path_factory.mktemp("distilled") / "run"
  _train(model_dir, "--mode=train", "--train_mode=distill",
         f"--teacher={classifier}")
  return model_dir


@pytest.mark.slow
def test_a_rerun_of_another_stage_is_refused(distilled, classifier, tmp_path,
                                             log_text):
  before = snapshot(distilled)
  proc = run_cli(*STAGE_FLAGS, f"--model_dir={distilled}", "--mode=train",
                 "--train_mode=finetune", f"--init_from={classifier}")
  line = assert_refused(proc, 2, "holds a distill run", "not a finetune run",
                        "choose another --model_dir")
  assert "train_mode" in line
  assert snapshot(distilled) == before
  # A teacher whose files changed makes another run.
  teacher = tmp_path / "teacher"
  shutil.copytree(classifier, teacher)
  manifest = os.path.join(teacher, "assets.extra", "simclr_tf.json")
  with open(manifest) as f:
    meta = json.load(f)
  with open(manifest, "w") as f:   # the same values, other bytes: valid
    json.dump(meta, f, indent=3)
  with pytest.raises(ConfigError, match=r"differs in teacher \(content\)"):
    _train(distilled, "--mode=train", "--train_mode=distill",
           f"--teacher={teacher}")
  assert snapshot(distilled) == before
  # The same flags continue the run (here: nothing is left to train).
  _train(distilled, "--mode=train", "--train_mode=distill",
         f"--teacher={classifier}")
  assert "Already trained 2/2" in log_text()


@pytest.mark.slow
def test_eval_of_an_export_evaluates_it_and_touches_no_other_run(
    distilled, classifier, tmp_path, log_text):
  before = snapshot(distilled)
  with pytest.raises(ConfigError, match="holds another run"):
    _train(distilled, "--mode=eval", f"--init_from={classifier}")
  assert snapshot(distilled) == before
  out = tmp_path / "eval"
  result = _train(out, "--mode=eval", f"--init_from={classifier}")
  assert "Evaluating the export" in log_text()
  assert result["global_step"] == 0      # the export's, not a checkpoint's
  with open(out / "result.json") as f:
    assert json.load(f)["top1"] == result["top1"]
  assert not os.path.exists(out / "saved_model")
