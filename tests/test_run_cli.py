"""The command line: every flag documented; bad values exit 2 at once."""

import dataclasses
import os
import re

import pytest
import tensorflow as tf

from conftest import run_cli
from simclr_tf.config import Config, ModelConfig
from simclr_tf.models import simclr as simclr_lib
from tf_hub_export import export as export_lib


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
    # {name} is filled in by the test (see _placeholders).
    (["--dataset=image_folder"], "--dataset=image_folder needs --data_dir"),
    (["--label_fraction=-0.5"], "--label_fraction=-0.5 is outside (0.0, 1.0]"),
    (["--train_mode=finetune", "--label_fraction=0.001"],
     "--train_batch_size=128 is larger than the 10 training examples"),
    (["--width_multiplier=0.3"],
     "--width_multiplier=0.3 does not give whole channels"),
    (["--image_size=48"], "--image_size=48 is too small for the ImageNet stem"),
    (["--model_dir={file}"], "--model_dir='{file}' is not writable (a file"),
    (["--model_dir={file}/sub"], "is not writable (Not a directory)"),
    (["--init_from={foreign}"],
     "--init_from='{foreign}' is a SavedModel not written by simclr-tf"),
    (["--train_mode=distill", "--teacher={foreign}"],
     "--teacher='{foreign}' is a SavedModel not written by simclr-tf"),
    (["--init_from={export3}", "--resnet_depth=34"],
     "--resnet_depth=34 does not match the --init_from export"),
    (["--init_from={export3}", "--image_size=64"],
     "--image_size=64 does not match the --init_from export"),
    (["--train_mode=distill", "--teacher={export0}"],
     "--teacher='{export0}' has no 'logits_sup' output"),
    (["--train_mode=distill", "--teacher={export3}"],
     "predicts 3 classes but --dataset=cifar10_sample has 10"),
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """A foreign SavedModel and two tiny exports of ours (0 and 3 classes)."""
  root = tmp_path_factory.mktemp("exports")
  foreign = tf.Module()
  foreign.f = tf.function(tf.identity, input_signature=[tf.TensorSpec([None])])
  tf.saved_model.save(foreign, str(root / "foreign"))
  paths = {"foreign": str(root / "foreign")}
  for classes in (0, 3):
    config = ModelConfig(proj_out_dim=32, num_classes=classes,
                         proj_layers_kept=1 if classes else None,
                         sup_head_input=1 if classes else 0)
    path = str(root / f"export{classes}")
    export_lib.export_saved_model(simclr_lib.build_model(config, 32), path, 32,
                                  class_names="abc"[:classes])
    paths[f"export{classes}"] = path
  return paths


def _placeholders(args, request, tmp_path) -> dict:
  """Values of the {name} placeholders that `args` uses."""
  names = set(re.findall(r"\{(\w+)\}", " ".join(args)))
  values = {}
  if names - {"file"}:
    values.update(request.getfixturevalue("exports"))
  if "file" in names:
    values["file"] = str(tmp_path / "a_file")
    (tmp_path / "a_file").write_text("not a folder")
  return values


@pytest.mark.parametrize("args, expected", BAD_FLAGS,
                         ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line(args, expected, tmp_path, request):
  values = _placeholders(args, request, tmp_path)
  args = [a.format(**values) for a in args]
  expected = expected.format(**values)
  proc = run_cli(f"--model_dir={tmp_path / 'run'}", *args, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("run.py: ")]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert expected in errors[0]
  # Nothing was trained or exported.
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
  assert not os.path.exists(tmp_path / "run" / "saved_model")
