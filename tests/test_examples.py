"""examples/three_stages.py: the README's Python example runs, and the API
trains exactly what the command line trains with the same flags."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, _env, run_cli
from simclr_tf import cli

EXAMPLE = os.path.join(ROOT, "examples", "three_stages.py")
BEGIN, END = "# --- README example (begin) ---", "# --- README example (end) ---"


def _readme_python_block() -> str:
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def _example_block() -> str:
  text = open(EXAMPLE, encoding="utf-8").read()
  return text[text.index(BEGIN) + len(BEGIN):text.index(END)]


def test_the_readme_example_is_the_example_scripts():
  assert _readme_python_block().strip() == _example_block().strip()


def _variables(export: str) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  reader = tf.train.load_checkpoint(os.path.join(export, "variables",
                                                 "variables"))
  return {name: reader.get_tensor(name)
          for name in reader.get_variable_to_shape_map()
          if "OPTIMIZER_SLOT" not in name and name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


@pytest.mark.slow
def test_example_runs_and_equals_the_cli(tmp_path):
  proc = subprocess.run([sys.executable, EXAMPLE, str(tmp_path / "api")],
                        capture_output=True, text=True, timeout=900,
                        env=_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["embed_shape"] == [200, 128]
  assert "logits_sup" in summary["student_outputs"]

  # The command line with the same flags: the API wrote the same pretraining
  # configuration (apart from the folder), and fine-tuning from the API's
  # pretrained export trains the same configuration to the same weights.
  api = tmp_path / "api" / "runs"
  common = ["--mode=train_then_eval", "--width_multiplier=0.25",
            "--train_steps=10", "--seed=0"]
  pre_cli = json.loads(cli.config_from_args(
      [*common, "--train_mode=pretrain", "--train_batch_size=64",
       f"--model_dir={tmp_path / 'unused'}"]).to_json())
  pre_api = json.load(open(api / "pretrain" / "flags.json"))
  pre_cli.pop("model_dir")
  pre_api.pop("model_dir")
  assert pre_cli == pre_api
  ft = run_cli(*common, "--train_mode=finetune", "--train_batch_size=25",
               "--label_fraction=0.1",
               f"--init_from={api / 'pretrain' / 'saved_model'}",
               f"--model_dir={tmp_path / 'cli'}")
  assert ft.returncode == 0, ft.stderr[-2000:]
  api_flags = json.load(open(api / "finetune" / "flags.json"))
  cli_flags = json.load(open(tmp_path / "cli" / "flags.json"))
  for flags in (api_flags, cli_flags):
    flags.pop("model_dir")
    init_from = flags.pop("init_from")
    assert os.path.samefile(os.path.join(tmp_path, "api", init_from),
                            api / "pretrain" / "saved_model")
  assert api_flags == cli_flags
  # ... the same top-1 and bitwise the same weights.
  result = json.load(open(tmp_path / "cli" / "result.json"))
  assert result["top1"] == summary["finetune_top1"]
  ours = _variables(summary["finetune_export"])
  theirs = _variables(str(tmp_path / "cli" / "saved_model"))
  assert sorted(ours) == sorted(theirs) and len(ours) > 50
  for name, value in ours.items():
    assert np.array_equal(value, theirs[name]), name
