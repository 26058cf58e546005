"""The checks a run makes before building a model: data, exports and
model_dir. Each is one line naming the flag; nothing is trained or written.

(The command line turns them into exit status 2: `test_run_cli.py`.)
"""

import os
import re

import pytest

import simclr_tf
import tensorflow as tf

from conftest import snapshot
from simclr_tf import runner
from simclr_tf.config import Config, ConfigError, ModelConfig
from simclr_tf.models import simclr as simclr_lib
from tf_hub_export import export as export_lib

# One process runs this file's tests, so that its module fixtures (which
# export models) run once (`make test` distributes by xdist_group).
pytestmark = pytest.mark.xdist_group(__name__)

# {name} is filled in by the test (see _placeholders).
BAD_RUNS = [
    ({"dataset": "no_such_dataset"}, "--dataset='no_such_dataset' is unknown"),
    ({"dataset": "image_folder", "data_dir": "/nonexistent/folder"},
     "--data_dir=/nonexistent/folder does not exist"),
    ({"dataset": "image_folder"}, "--dataset=image_folder needs --data_dir"),
    ({"train_batch_size": 100000}, "--train_batch_size=100000 is larger"),
    ({"train_mode": "finetune", "label_fraction": 0.001},
     "--train_batch_size=128 is larger than the 10 training examples"),
    ({"init_from": "/nonexistent/export"},
     "--init_from='/nonexistent/export' is not a SavedModel"),
    ({"train_mode": "distill", "teacher": "/nonexistent/teacher"},
     "--teacher='/nonexistent/teacher' is not a SavedModel"),
    ({"model_dir": "{file}"}, "--model_dir='{file}' is not writable (a file"),
    ({"model_dir": "{file}/sub"}, "is not writable (Not a directory)"),
    ({"init_from": "{foreign}"},
     "--init_from='{foreign}' is a SavedModel not written by simclr-tf"),
    ({"train_mode": "distill", "teacher": "{foreign}"},
     "--teacher='{foreign}' is a SavedModel not written by simclr-tf"),
    ({"init_from": "{export3}", "resnet_depth": 34},
     "--resnet_depth=34 does not match the --init_from export"),
    ({"init_from": "{export3}", "image_size": 64},
     "--image_size=64 does not match the --init_from export"),
    ({"train_mode": "distill", "teacher": "{export0}"},
     "--teacher='{export0}' has no 'logits_sup' output"),
    ({"train_mode": "distill", "teacher": "{export3}"},
     "predicts 3 classes but --dataset=cifar10_sample has 10"),
    ({"mode": "eval"}, "--mode=eval found no checkpoint"),
    ({"recompute_blocks": 1, "precision": "mixed_float16"},
     "--recompute_blocks=1 needs float32 or mixed_bfloat16"),
    ({"init_head": True}, "--init_head restores the supervised head of "
     "--init_from when training; give --init_from=EXPORT"),
    ({"train_mode": "finetune", "init_from": "{export0}", "init_head": True,
      "proj_out_dim": 32},
     "has no supervised classes but this run predicts 10"),
    ({"train_mode": "finetune", "init_from": "{export3}", "init_head": True,
      "proj_out_dim": 32},
     "has 3 supervised classes but this run predicts 10"),
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
    config = ModelConfig(width_multiplier=0.25, proj_out_dim=32,
                         num_classes=classes,
                         proj_layers_kept=1 if classes else None,
                         sup_head_input=1 if classes else 0)
    path = str(root / f"export{classes}")
    export_lib.export_saved_model(simclr_lib.build_model(config, 32), path, 32,
                                  class_names="abc"[:classes])
    paths[f"export{classes}"] = path
  return paths


def _placeholders(changes, request, tmp_path) -> dict:
  """Values of the {name} placeholders that `changes` uses."""
  text = " ".join(str(v) for v in changes.values())
  names = set(re.findall(r"\{(\w+)\}", text))
  values = {}
  if names - {"file"}:
    values.update(request.getfixturevalue("exports"))
  if "file" in names:
    values["file"] = str(tmp_path / "a_file")
    (tmp_path / "a_file").write_text("not a folder")
  return values


@pytest.mark.parametrize(
    "changes, expected", BAD_RUNS,
    ids=[" ".join(f"{k}={v}" for k, v in c.items()) for c, _ in BAD_RUNS])
def test_bad_runs_fail_with_one_line_before_training(changes, expected,
                                                      tmp_path, request):
  values = _placeholders(changes, request, tmp_path)
  changes = {k: v.format(**values) if isinstance(v, str) else v
             for k, v in changes.items()}
  model_dir = changes.pop("model_dir", str(tmp_path / "run"))
  cfg = Config(**{"model_dir": model_dir, "precision": "float32",
                  "width_multiplier": 0.25, **changes})
  with pytest.raises(ConfigError) as err:
    simclr_tf.run(cfg)
  assert expected.format(**values) in str(err.value)
  assert "\n" not in str(err.value)
  # Nothing was trained, exported or recorded.
  for name in ("checkpoints", "saved_model", "flags.json", "result.json"):
    assert not os.path.exists(os.path.join(model_dir, name)), name


def _train_only_folder(root):
  """An image folder with a train/ split and no test/ split."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for cls in ("a", "b"):
    os.makedirs(root / "train" / cls)
    for i in range(4):
      Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(
          root / "train" / cls / f"{i}.png")
  return str(root)


def test_a_refused_run_leaves_the_previous_record(tmp_path):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "flags.json").write_text('{"a": "previous run"}')
  cfg = Config(model_dir=str(model_dir), train_batch_size=100000)
  with pytest.raises(ConfigError, match="is larger than"):
    simclr_tf.run(cfg)
  assert (model_dir / "flags.json").read_text() == '{"a": "previous run"}'


def test_train_then_eval_without_the_eval_split_is_refused_first(tmp_path):
  cfg = Config(mode="train_then_eval", dataset="image_folder",
               data_dir=_train_only_folder(tmp_path / "data"),
               model_dir=str(tmp_path / "run"), train_batch_size=4)
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "flags.json").write_text('{"a": "previous run"}')
  before = snapshot(tmp_path)
  with pytest.raises(ConfigError, match="--eval_split='test' of "
                     "--dataset=image_folder has no examples"):
    simclr_tf.run(cfg)
  assert snapshot(tmp_path) == before   # nothing trained, written or changed


def test_init_head_starts_the_student_as_its_teacher(tmp_path):
  config = ModelConfig(width_multiplier=0.25, proj_out_dim=32, num_classes=10,
                       proj_layers_kept=1, sup_head_input=1)
  teacher = simclr_lib.build_model(config, 32)
  rng = tf.random.Generator.from_seed(0)
  for w in teacher.get_layer("head_supervised").weights:   # zeros at first
    w.assign(rng.normal(w.shape))
  path = str(tmp_path / "teacher")
  export_lib.export_saved_model(teacher, path, 32, class_names=[
      str(i) for i in range(10)])
  images = tf.random.stateless_uniform([4, 32, 32, 3], seed=(1, 2))
  want = tf.saved_model.load(path)(images, training=False)["logits_sup"]
  for init_head in (True, False):
    cfg = Config(train_mode="distill", teacher=path, init_from=path,
                 init_head=init_head, proj_out_dim=32, ft_proj_selector=1,
                 width_multiplier=0.25, precision="float32",
                 model_dir=str(tmp_path / "run"))
    net = runner.build_net(cfg, runner.make_plan(cfg))
    got = net(images, training=False)["logits_sup"].numpy()
    if init_head:
      assert abs(want.numpy()).max() > 0.1
      assert abs(got - want.numpy()).max() < 1e-4
    else:     # the default: a new zero-initialised head
      assert abs(got).max() == 0.0
