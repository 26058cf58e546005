"""The command line: every flag documented; bad values exit 2 at once.

Each way a run can be refused is one subprocess here: a flag absl rejects,
a value `config.validate` rejects, and a check `runner.run` makes on data,
exports or model_dir. The cases themselves are tested in-process:
`test_config.py` (values) and `test_runner.py` (data, exports, model_dir).
"""

import dataclasses
import os

import pytest

from conftest import run_cli
from simclr_tf.config import Config


def test_helpfull_lists_every_flag_with_help():
  proc = run_cli("--helpfull")
  assert proc.returncode == 0, proc.stderr
  text = proc.stdout + proc.stderr
  for field in dataclasses.fields(Config):
    assert f"--{field.name}:" in text or f"--[no]{field.name}:" in text, (
        field.name)
  assert "--flagfile" in text


BAD_FLAGS = [
    # absl's parser.
    (["--mode=fit"], "--mode"),
    (["--bogus_flag=1"], "bogus_flag"),
    (["--train_batch_size=abc"], "--train_batch_size"),
    # config.validate (no TensorFlow imported yet).
    (["--resnet_depth=20"], "--resnet_depth=20 is not allowed"),
    # runner.run: the data.
    (["--dataset=no_such_dataset"], "no_such_dataset"),
]


@pytest.mark.parametrize("args, expected", BAD_FLAGS,
                         ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line(args, expected, tmp_path):
  proc = run_cli(f"--model_dir={tmp_path / 'run'}", *args, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("run.py: ")]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert expected in errors[0]
  # Nothing was trained or exported.
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
  assert not os.path.exists(tmp_path / "run" / "saved_model")
