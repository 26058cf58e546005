"""Never silently wrong: every fault gets one line, its exit status, and
leaves every file that was there before byte-identical.

Each test takes a digest of every file it could touch before the fault and
compares it after (`snapshot`). The readers of an export are checked
in-process for every kind of damage, and through the command line (exit
status, last line of stderr) once per reader; the faults that need a trained
run are in the slow suite. docs/reliability.md has the table of faults.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import simclr_tf
from conftest import (CIFAR10_CLASSES, ROOT, TINY_FLAGS, _env, assert_refused,
                      run_cli, snapshot)
from simclr_tf import atomic
from simclr_tf import checkpoints
from simclr_tf import cli
from simclr_tf import inference
from simclr_tf.config import ConfigError
from tf_hub_export import load as load_lib
from tf_hub_export import verify as verify_lib

DATA = os.path.join("variables", "variables.data-00000-of-00001")
INDEX = os.path.join("variables", "variables.index")
META = os.path.join("assets.extra", "simclr_tf.json")
CLASSES = CIFAR10_CLASSES   # the bundled sample's 10 classes


# --- Harness -------------------------------------------------------------------

def _truncate(path, keep):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:keep if keep >= 0 else len(data) + keep])


def _flip(path, at):
  with open(path, "rb") as f:
    data = bytearray(f.read())
  data[at % len(data)] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))


def _edit_meta(edit):
  def damage(export):
    path = os.path.join(export, META)
    with open(path) as f:
      meta = json.load(f)
    edit(meta)
    with open(path, "w") as f:
      json.dump(meta, f)
  return damage


def _config(meta, **changes):
  meta["model_config"].update(changes)


# name -> (damage(export_dir), phrase of the error line)
DAMAGES = {
    "truncated_data": (lambda d: _truncate(os.path.join(d, DATA), -1000),
                       "variables.data-00000-of-00001 is damaged"),
    "bit_flipped_data": (lambda d: _flip(os.path.join(d, DATA), 3_000_000),
                         "variables.data-00000-of-00001 is damaged"),
    "deleted_index": (lambda d: os.remove(os.path.join(d, INDEX)),
                      "variables.index is missing"),
    "truncated_index": (lambda d: _truncate(os.path.join(d, INDEX), 100),
                        "variables.index is damaged"),
    "truncated_graph": (lambda d: _truncate(os.path.join(d, "saved_model.pb"),
                                            5000),
                        "saved_model.pb is damaged"),
    "unreadable_manifest": (
        lambda d: open(os.path.join(d, META), "w").write("{"),
        "has an unreadable simclr_tf.json"),
    "manifest_width": (_edit_meta(lambda m: _config(m, width_multiplier=0.5)),
                       "simclr_tf.json disagrees with the weights"),
    "manifest_depth": (_edit_meta(lambda m: _config(m, resnet_depth=34)),
                       "has 3 blocks in block_group1 but the SavedModel has 2"),
    "manifest_classes": (_edit_meta(lambda m: _config(m, num_classes=7)),
                         "'logits_sup' width 7"),
    "manifest_paths": (_edit_meta(lambda m: m["variable_paths"].reverse()),
                       "it names weight"),
    "manifest_stem": (_edit_meta(lambda m: _config(m, cifar_stem=False)),
                      "its stem (cifar_stem=False)"),
    "manifest_selector": (_edit_meta(lambda m: _config(m, sup_head_input=3)),
                          "its supervised head reads projection output 3"),
}

# The five readers of an export, as run.py flags ({x}: the export).
READERS = {
    "finetune_init_from": ["--mode=train", "--train_mode=finetune",
                           "--init_from={x}"],
    "distill_teacher": ["--mode=train", "--train_mode=distill",
                        "--teacher={x}"],
    "eval_init_from": ["--mode=eval", "--init_from={x}"],
    "embed": ["--mode=embed", "--init_from={x}"],
    "predict": ["--mode=predict", "--init_from={x}"],
}


@pytest.fixture(scope="module")
def classifier(small_classifier):
  """An intact export of a quarter-width ResNet-18 for the 10 classes."""
  return small_classifier


def _damaged(classifier, tmp_path, damage):
  export = str(tmp_path / "damaged" / "saved_model")
  shutil.copytree(classifier, export)
  DAMAGES[damage][0](export)
  verify_lib.forget()
  return export


def _args(reader, export, model_dir):
  flags = [f.format(x=export) for f in READERS[reader]]
  return [*TINY_FLAGS, "--proj_out_dim=16",
          "--train_steps=1", *flags, f"--model_dir={model_dir}"]


# --- Damaged exports: every reader, every damage (in-process) ------------------

@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_every_reader_refuses_a_damaged_export(classifier, tmp_path, damage):
  export = _damaged(classifier, tmp_path, damage)
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "flags.json").write_text("{}")
  before = snapshot(tmp_path)
  for reader in READERS:
    cfg = cli.config_from_args(_args(reader, export, model_dir))
    with pytest.raises((ConfigError, inference.InferenceError,
                        load_lib.ExportError)) as error:
      simclr_tf.run(cfg)
    message = str(error.value)
    assert DAMAGES[damage][1] in message, (reader, message)
    assert "\n" not in message and "re-export" in message, message
  assert snapshot(tmp_path) == before


def test_an_intact_export_passes_every_check(classifier):
  verify_lib.forget()
  meta = load_lib.read_meta(classifier)
  assert meta.model_config.num_classes == len(CLASSES)


@pytest.mark.slow
@pytest.mark.parametrize("reader,damage", [
    ("finetune_init_from", "bit_flipped_data"),
    ("distill_teacher", "deleted_index"),
    ("eval_init_from", "truncated_graph"),
    ("embed", "manifest_width"),
    ("predict", "manifest_paths"),
])
def test_command_line_refuses_a_damaged_export_in_one_line(
    classifier, tmp_path, reader, damage):
  export = _damaged(classifier, tmp_path, damage)
  model_dir = tmp_path / "run"
  before = snapshot(tmp_path)
  proc = run_cli(*_args(reader, export, model_dir), "--dataset=cifar10_sample")
  assert_refused(proc, 2, DAMAGES[damage][1])
  after = snapshot(tmp_path)
  assert {k: v for k, v in after.items() if k in before} == before
  assert not os.path.exists(model_dir / "saved_model")


# --- Bad values that used to end in a traceback --------------------------------

@pytest.mark.parametrize("args,phrase", [
    (["--image_size=100000"], "--image_size=100000 is too large: at most 1024"),
    (["--dataset=image_folder", "--data_dir={file}"], "is a file, not a folder"),
])
def test_bad_values_are_one_line(tmp_path, args, phrase):
  afile = tmp_path / "afile"
  afile.write_text("x")
  args = [a.format(file=afile) for a in args]
  with pytest.raises(ConfigError, match=phrase):
    simclr_tf.run(cli.config_from_args(
        [*args, f"--model_dir={tmp_path / 'run'}"]))


def test_embed_into_a_file_is_a_clear_error(classifier, tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(inference.InferenceError, match="is a file, not a folder"):
    inference.run("embed", classifier, str(afile), "test",
                  str(tmp_path / "out"))


# --- Checkpoint state that cannot lie ------------------------------------------

def _three_checkpoints(directory):
  value = tf.Variable(0.0)
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=value),
                                       directory, max_to_keep=5)
  for step in (1, 2, 3):
    value.assign(float(step))
    manager.save(checkpoint_number=step)
  return value


STATE_FAULTS = {
    "deleted": lambda p: os.remove(p),
    "garbled": lambda p: open(p, "w").write("model_checkpoint_path: ckpt-"),
    "empty": lambda p: open(p, "w").close(),
    "binary": lambda p: open(p, "wb").write(bytes(range(256)) * 4),
    "names_a_missing_checkpoint": lambda p: open(p, "w").write(
        'model_checkpoint_path: "ckpt-99"\n'
        'all_model_checkpoint_paths: "ckpt-99"\n'),
    "names_an_older_one": lambda p: open(p, "w").write(
        'model_checkpoint_path: "ckpt-1"\n'
        'all_model_checkpoint_paths: "ckpt-1"\n'),
}


@pytest.mark.parametrize("fault", sorted(STATE_FAULTS))
def test_checkpoint_state_file_cannot_hide_checkpoints(tmp_path, fault,
                                                       caplog):
  directory = str(tmp_path / "checkpoints")
  _three_checkpoints(directory)
  STATE_FAULTS[fault](os.path.join(directory, checkpoints.STATE_FILE))
  saved = {k: v for k, v in snapshot(directory).items()
           if os.path.basename(k).startswith("ckpt-")}
  checkpoints.repair_state(directory)
  assert "listing the checkpoints themselves" in caplog.text
  value = tf.Variable(-1.0)
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=value),
                                       directory, max_to_keep=5)
  path = checkpoints.restore_latest(manager.checkpoint, directory)
  assert path.endswith("ckpt-3") and float(value.numpy()) == 3.0
  assert manager.latest_checkpoint.endswith("ckpt-3")
  after = snapshot(directory)
  assert {k: after[k] for k in saved} == saved   # the checkpoints untouched


def test_an_intact_state_file_is_left_alone(tmp_path, caplog):
  directory = str(tmp_path / "checkpoints")
  _three_checkpoints(directory)
  before = snapshot(directory)
  checkpoints.repair_state(directory)
  assert snapshot(directory) == before and "listing" not in caplog.text


def test_a_damaged_newest_checkpoint_is_rewritten_at_its_step(tmp_path):
  import keras  # pylint: disable=g-import-not-at-top
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
  model.optimizer.build(model.trainable_variables)
  directory = str(tmp_path / "checkpoints")

  def manager():
    return tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=model.optimizer),
        directory, max_to_keep=5)

  first = manager()
  for step in (1, 2, 3):
    model.optimizer.iterations.assign(step)
    first.save(checkpoint_number=step)
  data = [n for n in os.listdir(directory) if n.startswith("ckpt-3.data")][0]
  with open(os.path.join(directory, data), "wb") as f:
    f.write(b"\0")   # a disk error
  second = manager()
  assert checkpoints.restore_latest(second.checkpoint, directory).endswith(
      "ckpt-2")
  saver = checkpoints.Checkpointer(second, handle_sigterm=False)
  saver.set_model(model)
  saver.on_train_begin()
  saver.save()                       # step 2: restored from, not saved again
  model.optimizer.iterations.assign(3)
  saver.save()                       # step 3 comes round: rewritten
  assert checkpoints.restore_latest(manager().checkpoint,
                                    directory).endswith("ckpt-3")


# --- Writes that fail: exit 3, nothing half-written ----------------------------

def test_embed_on_a_full_disk_keeps_the_old_outputs(classifier, tmp_path,
                                                    monkeypatch):
  folder = tmp_path / "images" / "test"
  folder.mkdir(parents=True)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
        folder / f"{i}.png")
  out = tmp_path / "out"
  inference.run("embed", classifier, str(tmp_path / "images"), "test",
                str(out))
  before = snapshot(out)
  real = inference._lines_writer   # pylint: disable=protected-access

  def full_after_a_few_bytes(lines):
    def write(tmp):
      real(lines)(tmp)
      raise OSError(errno.ENOSPC, "No space left on device")
    return write

  monkeypatch.setattr(inference, "_lines_writer", full_after_a_few_bytes)
  with pytest.raises(atomic.WriteError, match="No space left on device") as e:
    inference.run("embed", classifier, str(tmp_path / "images"), "test",
                  str(out))
  assert "\n" not in str(e.value)
  assert snapshot(out) == before   # embeddings.npy and its list, both old
  assert not [n for n in os.listdir(out) if ".tmp" in n]


@pytest.mark.slow
def test_write_failures_exit_3_in_one_line(tmp_path):
  """run.py maps WriteError to exit 3 with its one line as the last."""
  code = ("import sys; from simclr_tf import cli, atomic, api\n"
          "def fail(cfg): raise atomic.WriteError('Could not write X (No "
          "space left on device); nothing was changed there')\n"
          "api.run = fail\n"
          "sys.argv = ['run.py'] + sys.argv[1:]\n"
          "cli.entry_point()\n")
  proc = subprocess.run([sys.executable, "-c", code,
                         f"--model_dir={tmp_path / 'run'}"],
                        capture_output=True, text=True, env=_env(), cwd=ROOT,
                        timeout=300)
  assert_refused(proc, 3, "No space left on device")


# --- Faults of trained runs (slow) ---------------------------------------------

STAGE_FLAGS = [*TINY_FLAGS, "--train_steps=2", "--checkpoint_steps=1",
               "--proj_out_dim=16"]


def _train(model_dir, *flags):
  """A run of run.py's flags, in this process (what run.py runs)."""
  return simclr_tf.run(cli.config_from_args(
      [*STAGE_FLAGS, f"--model_dir={model_dir}", *flags]))


@pytest.mark.slow
def test_a_garbled_state_and_a_damaged_newest_checkpoint(tmp_path, log_text):
  """The state file is rebuilt from the files, the damaged ckpt-2 is fallen
  back from, then written again when its step comes round: once only."""
  model_dir = tmp_path / "run"
  flags = ["--mode=train", "--train_mode=pretrain"]
  _train(model_dir, *flags)
  ckpt = model_dir / "checkpoints"
  (ckpt / "checkpoint").write_bytes(b"\x00\xff garbage")
  data = [n for n in os.listdir(ckpt) if n.startswith("ckpt-2.data")][0]
  (ckpt / data).write_bytes(b"\0")
  first = snapshot(*(ckpt / n for n in os.listdir(ckpt)
                     if n.startswith("ckpt-1")))
  _train(model_dir, *flags)
  assert "listing the checkpoints themselves" in log_text()
  assert "Cannot restore" in log_text() and "Resumed from" in log_text()
  assert snapshot(*first) == first                 # ckpt-1 untouched
  log_size = len(log_text())
  _train(model_dir, *flags)
  again = log_text()[log_size:]
  assert "Cannot restore" not in again, again       # ckpt-2 written again
  assert "Resumed from" in again and "ckpt-2" in again


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path):
  model_dir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "run.py"), *STAGE_FLAGS,
       "--train_steps=400", "--checkpoint_steps=1000", "--mode=train",
       "--train_mode=pretrain", f"--model_dir={model_dir}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
      cwd=ROOT)
  deadline = time.time() + 300
  while not os.path.exists(model_dir / "train") and time.time() < deadline:
    time.sleep(0.2)   # TensorBoard's folder: training has started
  time.sleep(3)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 130, stderr[-3000:]
  assert "SIGINT received: saving a checkpoint" in stderr
  steps = checkpoints.list_checkpoints(str(model_dir / "checkpoints"))
  assert steps and 0 < checkpoints.step_of(steps[-1]) < 400
  assert "Traceback" not in stderr


@pytest.mark.slow
def test_an_export_that_cannot_be_written_changes_nothing(tmp_path,
                                                          monkeypatch):
  model_dir = tmp_path / "run"
  common = dict(model_dir=str(model_dir), train_steps=1, resnet_depth=18,
                width_multiplier=0.25, proj_out_dim=16, train_batch_size=16,
                image_size=32, log_images=False, precision="float32",
                cache_dataset=False)
  simclr_tf.pretrain("cifar10_sample", **common)
  before = snapshot(model_dir / "saved_model", model_dir / "result.json")

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(tf.saved_model, "save", full)
  # One more step, so that the rerun exports (a finished stage keeps its
  # export).
  with pytest.raises(atomic.WriteError, match="No space left") as error:
    simclr_tf.pretrain("cifar10_sample", **dict(common, train_steps=2))
  assert "saved_model" in str(error.value) and "\n" not in str(error.value)
  assert snapshot(model_dir / "saved_model",
                  model_dir / "result.json") == before
  assert not [n for n in os.listdir(model_dir) if ".tmp-" in n]
