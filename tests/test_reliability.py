"""Reliability: kills, preemption, non-finite loss, unwritable model_dir.

The slow tests start real training subprocesses of a tiny pretraining run,
kill them (SIGKILL, SIGTERM) at a random point and rerun the same command:
the resumed run must end with exactly the weights, optimizer slots, step and
batch-norm statistics of one uninterrupted run (the input pipeline and the
CPU kernels are deterministic for a given --seed, so equality is exact).
The random delays are printed, to replay a failure.
"""

import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, run_cli, snapshot
from simclr_tf import callbacks as cb
from simclr_tf import checkpoints
from simclr_tf import runner
from simclr_tf.config import Config, ConfigError
from tf_hub_export import export as export_lib
from tf_hub_export import load as load_lib

STEPS = 8
CHUNK = 2
FLAGS = ("--mode=train", "--train_mode=pretrain", "--resnet_depth=18",
         "--width_multiplier=0.25",
         "--image_size=32", "--train_batch_size=16", "--proj_out_dim=32",
         "--log_images=false", "--cache_dataset=false",
         f"--checkpoint_steps={CHUNK}", f"--train_steps={STEPS}", "--seed=1",
         "--precision=float32")
EXIT_PREEMPTED = 143
EXIT_TRAINING_FAILED = 3


# --- Helpers -----------------------------------------------------------------

def _start(model_dir, *extra):
  """Starts a training subprocess; its output goes to files beside it."""
  log = open(f"{model_dir}.log", "w")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "run.py"), *FLAGS,
       f"--model_dir={model_dir}", *extra],
      stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
  proc.log_path = log.name
  return proc


def _output(proc) -> str:
  with open(proc.log_path) as f:
    return f.read()


def _saved_steps(model_dir) -> list:
  """Steps of the checkpoints listed in the index (what a rerun sees)."""
  state = tf.train.get_checkpoint_state(os.path.join(model_dir,
                                                     "checkpoints"))
  if state is None:
    return []
  return [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths]


def _latest_step(model_dir) -> int:
  return max(_saved_steps(model_dir), default=0)


def _wait_for_checkpoint(proc, model_dir, step, timeout=600):
  start = time.time()
  while _latest_step(model_dir) < step:
    assert proc.poll() is None, _output(proc)[-3000:]
    assert time.time() - start < timeout, "no checkpoint in time"
    time.sleep(0.05)
  return time.time()


def _weights(model_dir) -> dict:
  """Every tensor of the latest checkpoint but the save counter."""
  reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if "save_counter" not in k and "CHECKPOINTABLE_OBJECT_GRAPH" not in k}


def _assert_same_weights(expected_dir, actual_dir):
  expected, actual = _weights(expected_dir), _weights(actual_dir)
  assert sorted(actual) == sorted(expected)
  assert any("moving_mean" in k for k in expected), "BN statistics not saved"
  assert expected["optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"] == STEPS
  different = [k for k in expected
               if not np.array_equal(expected[k], actual[k])]
  assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _rerun_to_the_end(model_dir, resumed_from):
  proc = run_cli(*FLAGS, f"--model_dir={model_dir}", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (f"Resumed from {os.path.join(model_dir, 'checkpoints')}/"
          f"ckpt-{resumed_from}\n") in proc.stderr
  assert f"global_step: {STEPS}" in proc.stdout
  # The default recompute (-1: the stem and first block on a CPU) is what
  # resumes bitwise here.
  auto = 0 if tf.config.list_physical_devices("GPU") else 1
  assert f"float32, --recompute_blocks={auto}." in proc.stderr
  assert _latest_step(model_dir) == STEPS
  leftovers = [n for n in os.listdir(os.path.join(model_dir, "checkpoints"))
               if "_temp" in n]
  assert not leftovers
  return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run, and how long it takes per checkpoint chunk."""
  model_dir = str(tmp_path_factory.mktemp("reference") / "run")
  proc = _start(model_dir)
  times = [_wait_for_checkpoint(proc, model_dir, step)
           for step in range(CHUNK, STEPS, CHUNK)]
  assert proc.wait(timeout=600) == 0, _output(proc)[-3000:]
  assert _saved_steps(model_dir)[-1] == STEPS
  return types.SimpleNamespace(model_dir=model_dir,
                               chunk_seconds=float(np.median(np.diff(times))))


def _random_delay(reference, name):
  """A random point within the next ~1.5 chunks, printed for replay."""
  seed = random.SystemRandom().randrange(1 << 30)
  delay = random.Random(seed).uniform(0, 1.5 * reference.chunk_seconds)
  print(f"{name}: seed={seed} delay={delay:.2f}s "
        f"chunk={reference.chunk_seconds:.2f}s")
  return delay


# --- Preemption --------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_at_a_random_point_then_rerun_equals_uninterrupted(
    reference, tmp_path):
  model_dir = str(tmp_path / "run")
  proc = _start(model_dir)
  _wait_for_checkpoint(proc, model_dir, CHUNK)
  time.sleep(_random_delay(reference, "sigkill"))
  assert proc.poll() is None, "the run ended before the kill; see the delay"
  proc.kill()
  proc.wait()
  saved = _saved_steps(model_dir)
  print(f"sigkill: checkpoints {saved} on disk after the kill")
  # A checkpoint every CHUNK steps: at most CHUNK steps are redone.
  assert saved == list(range(CHUNK, saved[-1] + 1, CHUNK))[-len(saved):]
  _rerun_to_the_end(model_dir, resumed_from=saved[-1])
  _assert_same_weights(reference.model_dir, model_dir)


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_then_rerun_equals_uninterrupted(
    reference, tmp_path):
  model_dir = str(tmp_path / "run")
  proc = _start(model_dir)
  _wait_for_checkpoint(proc, model_dir, CHUNK)
  time.sleep(_random_delay(reference, "sigterm"))
  assert proc.poll() is None, "the run ended before the signal"
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  returncode = proc.wait(timeout=300)
  waited = time.time() - sent
  output = _output(proc)
  print(f"sigterm: exited {returncode} after {waited:.1f}s")
  assert returncode == EXIT_PREEMPTED, output[-3000:]
  assert "Traceback" not in output
  step = int(re.search(r"Stopped by SIGTERM at step (\d+)", output).group(1))
  assert CHUNK <= step < STEPS
  assert _latest_step(model_dir) == step   # nothing done is lost
  assert not os.path.exists(os.path.join(model_dir, "saved_model"))
  # It finishes the step under way, saves and exits: no more than a chunk.
  assert waited < max(30.0, 2 * reference.chunk_seconds), waited
  _rerun_to_the_end(model_dir, resumed_from=step)
  _assert_same_weights(reference.model_dir, model_dir)


# --- Non-finite loss ---------------------------------------------------------

@pytest.mark.slow
def test_non_finite_loss_stops_and_leaves_checkpoint_and_export_untouched(
    reference, tmp_path):
  model_dir = str(tmp_path / "run")
  shutil.copytree(reference.model_dir, model_dir)
  kept = (os.path.join(model_dir, "checkpoints"),
          os.path.join(model_dir, "saved_model"))
  before = snapshot(*kept)
  assert before
  proc = run_cli(*FLAGS, f"--model_dir={model_dir}", "--learning_rate=1e30",
                 f"--train_steps={STEPS + 4 * CHUNK}", timeout=600)
  assert proc.returncode == EXIT_TRAINING_FAILED, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("run.py: ")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr
  assert re.search(r"(Loss became|became NaN or Inf at step) .*\d", errors[0])
  assert "--learning_rate" in errors[0]
  assert snapshot(*kept) == before
  assert _saved_steps(model_dir)[-1] == STEPS


def _tiny_model():
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
  model.optimizer.build(model.trainable_variables)
  return model


def test_checkpointer_never_saves_non_finite_weights(tmp_path):
  model = _tiny_model()
  ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
  manager = tf.train.CheckpointManager(ckpt, str(tmp_path), max_to_keep=3)
  saver = checkpoints.Checkpointer(manager, handle_sigterm=False)
  saver.set_model(model)
  saver.save()
  good = manager.latest_checkpoint
  model.optimizer.iterations.assign(1)
  # The step that breaks the weights can still report a finite loss.
  model.layers[0].kernel.assign([[np.nan], [1.0]])
  with pytest.raises(cb.NonFiniteLossError, match=r"at step 1 .*learning"):
    saver.on_epoch_end(0)
  assert manager.latest_checkpoint == good
  saver.on_train_end()   # nothing more is saved after that
  assert tf.train.get_checkpoint_state(str(tmp_path)).model_checkpoint_path \
      == good


def test_checkpointer_skips_saving_after_a_non_finite_loss(tmp_path):
  model = _tiny_model()
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model),
                                       str(tmp_path), max_to_keep=3)
  saver = checkpoints.Checkpointer(manager, handle_sigterm=False)
  saver.set_model(model)
  saver.on_train_batch_end(0, {"loss": float("inf")})
  saver.on_epoch_end(0)
  assert manager.latest_checkpoint is None


def test_check_numerics_names_the_step_and_causes():
  model = _tiny_model()
  model.optimizer.iterations.assign(42)
  check = cb.CheckNumerics()
  check.set_model(model)
  check.on_train_batch_end(0, {"loss": 1.0})
  with pytest.raises(cb.NonFiniteLossError) as error:
    check.on_train_batch_end(0, {"loss": float("nan")})
  message = str(error.value)
  assert "\n" not in message
  assert "at step 42" in message and "--learning_rate" in message


def test_checkpoint_write_failure_is_one_clear_line(tmp_path, monkeypatch):
  model = _tiny_model()
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model),
                                       str(tmp_path), max_to_keep=3)
  saver = checkpoints.Checkpointer(manager, handle_sigterm=False)
  saver.set_model(model)

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(manager, "save", full)
  with pytest.raises(checkpoints.CheckpointWriteError) as error:
    saver.save()
  assert "No space left on device" in str(error.value)
  assert "--model_dir" in str(error.value) and "\n" not in str(error.value)


# --- Checkpoints: a kill mid-save --------------------------------------------

SAVE_LOOP = textwrap.dedent("""
    import sys
    import tensorflow as tf
    value = tf.Variable(tf.zeros([16 << 20]))   # 64 MB: a save takes a while
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(value=value),
                                         sys.argv[1], max_to_keep=2)
    for step in range(1, 100000):
      value.assign(tf.fill([16 << 20], float(step)))
      manager.save(checkpoint_number=step)
      print("saved", step, flush=True)
""")


def _manager(directory):
  value = tf.Variable(tf.zeros([16 << 20]))
  return tf.train.CheckpointManager(tf.train.Checkpoint(value=value),
                                    directory, max_to_keep=2), value


@pytest.mark.slow
def test_kill_during_a_checkpoint_save_restores_the_last_complete_one(
    tmp_path):
  directory = str(tmp_path / "checkpoints")
  script = tmp_path / "save_loop.py"
  script.write_text(SAVE_LOOP)
  proc = subprocess.Popen([sys.executable, str(script), directory],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, env=dict(os.environ,
                                              TF_CPP_MIN_LOG_LEVEL="2"))
  assert proc.stdout.readline().startswith("saved 1")
  # Kill as soon as a save is under way (its temporary files exist).
  start = time.time()
  while not any("_temp" in n for n in os.listdir(directory)):
    assert time.time() - start < 120 and proc.poll() is None
    time.sleep(0.002)
  proc.kill()
  proc.wait()
  manager, value = _manager(directory)
  restored = checkpoints.restore_latest(manager.checkpoint, manager.directory)
  step = int(restored.rsplit("-", 1)[1])
  assert step >= 1
  np.testing.assert_array_equal(value.numpy()[[0, -1]], [step, step])
  assert not any("_temp" in n for n in os.listdir(directory))


def test_restore_falls_back_from_a_damaged_checkpoint(tmp_path, caplog):
  directory = str(tmp_path)
  variable = tf.Variable(0.0)
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=variable),
                                       directory, max_to_keep=3)
  for step in (2, 4):
    variable.assign(float(step))
    manager.save(checkpoint_number=step)
  data = [n for n in os.listdir(directory) if n.startswith("ckpt-4.data")]
  with open(os.path.join(directory, data[0]), "wb") as f:
    f.write(b"\0")   # damaged (a disk error; kills cannot do this)
  os.makedirs(os.path.join(directory, "ckpt-6_temp"))   # a killed save
  variable.assign(-1.0)
  reopened = tf.train.CheckpointManager(tf.train.Checkpoint(v=variable),
                                        directory, max_to_keep=3)
  assert checkpoints.restore_latest(reopened.checkpoint, reopened.directory).endswith("ckpt-2")
  assert float(variable.numpy()) == 2.0
  assert "Cannot restore" in caplog.text
  assert not os.path.exists(os.path.join(directory, "ckpt-6_temp"))


def test_restore_of_incompatible_checkpoints_is_a_config_error(tmp_path):
  manager = tf.train.CheckpointManager(
      tf.train.Checkpoint(v=tf.Variable(1.0)), str(tmp_path / "checkpoints"),
      max_to_keep=3)
  manager.save(checkpoint_number=1)
  other = tf.train.CheckpointManager(
      tf.train.Checkpoint(w=tf.Variable([1.0, 2.0])),
      str(tmp_path / "checkpoints"), max_to_keep=3)
  with pytest.raises(ConfigError, match="none can be restored") as error:
    checkpoints.restore_latest(other.checkpoint, other.directory)
  assert "--model_dir=" in str(error.value) and "\n" not in str(error.value)


# --- Exports: a kill mid-export ----------------------------------------------

EXPORT_LOOP = textwrap.dedent("""
    import sys, time
    from simclr_tf.config import ModelConfig
    from simclr_tf.models import simclr as simclr_lib
    from tf_hub_export.export import export_saved_model
    net = simclr_lib.build_model(ModelConfig(proj_out_dim=16), 32)
    for step in range(1, 1000):
      start = time.time()
      export_saved_model(net, sys.argv[1], 32, global_step=step)
      print("exported", step, time.time() - start, flush=True)
""")


@pytest.mark.slow
def test_kill_during_export_leaves_the_previous_export_loadable(tmp_path):
  path = str(tmp_path / "saved_model")
  script = tmp_path / "export_loop.py"
  script.write_text(EXPORT_LOOP)
  proc = subprocess.Popen(
      [sys.executable, str(script), path], stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT))
  first = proc.stdout.readline().split()
  assert first[:2] == ["exported", "1"], first
  # The second export is being written; kill it at a random point of it.
  start = time.time()
  while not any(n.startswith(".saved_model.tmp-")
                for n in os.listdir(tmp_path)):
    assert time.time() - start < 120 and proc.poll() is None
    time.sleep(0.01)
  seed = random.SystemRandom().randrange(1 << 30)
  delay = random.Random(seed).uniform(0, float(first[2]))
  print(f"export kill: seed={seed} delay={delay:.2f}s")
  time.sleep(delay)
  proc.kill()
  proc.wait()
  meta = load_lib.read_meta(path)
  assert meta.global_step >= 1
  model, _, report = load_lib.load_model(path)   # rebuilt and output-checked
  assert not report.missing
  # The next complete export removes what the killed one left behind.
  export_lib.export_saved_model(model, path, 32, global_step=99)
  assert sorted(os.listdir(tmp_path)) == ["export_loop.py", "saved_model"]
  assert load_lib.read_meta(path).global_step == 99


# --- model_dir: unwritable or full -------------------------------------------

def test_model_dir_under_a_file_is_a_config_error(tmp_path):
  (tmp_path / "a_file").write_text("x")
  for model_dir in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
    with pytest.raises(ConfigError, match="is not writable") as error:
      runner.prepare_model_dir(Config(model_dir=str(model_dir)))
    assert f"--model_dir={str(model_dir)!r}" in str(error.value)


def test_read_only_model_dir_is_a_config_error(tmp_path):
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  read_only.chmod(0o500)
  try:
    if os.access(read_only, os.W_OK):
      pytest.skip("running as root: permissions do not stop writes")
    with pytest.raises(ConfigError, match="Permission denied"):
      runner.prepare_model_dir(Config(model_dir=str(read_only / "run")))
  finally:
    read_only.chmod(0o700)


def test_full_disk_is_a_config_error_before_training(tmp_path, monkeypatch):
  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(ConfigError, match="No space left on device"):
    runner.prepare_model_dir(Config(model_dir=str(tmp_path / "run")))
  assert not [n for n in os.listdir(tmp_path / "run")
              if n.startswith(".write_probe")]


def test_too_little_space_for_checkpoints_is_a_config_error(tmp_path,
                                                             monkeypatch):
  learner = types.SimpleNamespace(
      net=types.SimpleNamespace(variables=[tf.Variable(tf.zeros([1 << 20]))]),
      optimizer=types.SimpleNamespace(
          variables=[tf.Variable(tf.zeros([1 << 20]))]))
  cfg = Config(model_dir=str(tmp_path), keep_checkpoint_max=2)
  # 3 checkpoints of 8 MB and an export of 4 MB.
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage",
                      lambda p: usage._replace(free=30_000_000))
  checkpoints.check_free_space(cfg, learner)   # enough
  monkeypatch.setattr(shutil, "disk_usage",
                      lambda p: usage._replace(free=20_000_000))
  with pytest.raises(ConfigError, match="need about 29 MB") as error:
    checkpoints.check_free_space(cfg, learner)
  assert "--keep_checkpoint_max=2" in str(error.value)
