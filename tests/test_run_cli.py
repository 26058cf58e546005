"""The command line: every flag documented; bad values exit 2 at once."""

import dataclasses
import os
import time

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
    (["--mode=fit"], "--mode"),
    (["--train_mode=pretraining"], "--train_mode"),
    (["--bogus_flag=1"], "bogus_flag"),
    (["--train_batch_size=abc"], "--train_batch_size"),
    (["--resnet_depth=20"], "--resnet_depth=20 is not allowed"),
    (["--label_fraction=0"], "--label_fraction=0.0 is outside (0.0, 1.0]"),
    (["--label_fraction=1.2"], "--label_fraction=1.2 is outside"),
    (["--image_size=4"], "--image_size=4 is too small"),
    (["--train_mode=distill"], "--teacher is empty"),
    (["--dataset=no_such_dataset"], "no_such_dataset"),
    (["--dataset=image_folder", "--data_dir=/nonexistent/folder"],
     "/nonexistent/folder"),
    (["--train_batch_size=100000"], "--train_batch_size=100000 is larger"),
    (["--init_from=/nonexistent/export"], "--init_from='/nonexistent/export'"),
    (["--train_mode=distill", "--teacher=/nonexistent/teacher"],
     "--teacher='/nonexistent/teacher'"),
]


@pytest.mark.parametrize("args, expected", BAD_FLAGS,
                         ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line(args, expected, tmp_path):
  start = time.time()
  proc = run_cli(f"--model_dir={tmp_path / 'run'}", *args, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("run.py: ")]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert expected in errors[0]
  assert time.time() - start < 60
  # Nothing was trained or exported.
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
  assert not os.path.exists(tmp_path / "run" / "saved_model")
