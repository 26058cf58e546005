"""simclr_tf.checkpoints: where checkpoints go, resuming, SIGTERM.

The end-to-end kills (SIGKILL, SIGTERM, a kill during a save) are in
`test_reliability.py`; the Checkpointer's non-finite guards too.
"""

import os
import signal
import types

import keras
import numpy as np
import tensorflow as tf

from conftest import WORKERS, FakeStrategy
from simclr_tf import checkpoints
from simclr_tf.config import Config


def test_scratch_dir_is_named_by_task_and_removed(tmp_path):
  strategy = FakeStrategy(WORKERS, "worker", 1)
  scratch = checkpoints.scratch_dir(str(tmp_path), strategy)
  assert scratch == str(tmp_path / ".worker_scratch" / "worker_1")
  os.makedirs(scratch)
  (tmp_path / ".worker_scratch" / "worker_1" / "ckpt-1.index").write_text("")
  checkpoints.remove_scratch(scratch)
  assert not (tmp_path / ".worker_scratch").exists()
  assert checkpoints.checkpoint_dir(str(tmp_path)) == str(
      tmp_path / "checkpoints")


def _learner(seed):
  """What `make_manager` reads of a learner: net, optimizer, task."""
  keras.utils.set_random_seed(seed)
  net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2),
                          keras.layers.BatchNormalization()])
  net.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
  net.optimizer.build(net.trainable_variables)
  return types.SimpleNamespace(net=net, optimizer=net.optimizer, task=None)


def test_non_chief_resumes_from_the_chiefs_checkpoint_and_saves_apart(
    tmp_path):
  cfg = Config(model_dir=str(tmp_path), keep_checkpoint_max=2)
  chief = _learner(seed=1)
  chief.optimizer.iterations.assign(3)
  bn = chief.net.layers[1]
  bn.moving_mean.assign([0.5, -0.5])      # not trainable: saved by path
  manager, restored = checkpoints.resume(cfg, chief, chief=True)
  assert restored is None and manager.directory == str(tmp_path /
                                                       "checkpoints")
  manager.save(checkpoint_number=3)

  worker = _learner(seed=2)
  strategy = FakeStrategy(WORKERS, "worker", 1)
  manager, restored = checkpoints.resume(cfg, worker, chief=False,
                                         strategy=strategy)
  assert restored == str(tmp_path / "checkpoints" / "ckpt-3")
  assert manager.directory == checkpoints.scratch_dir(str(tmp_path),
                                                       strategy)
  assert int(worker.optimizer.iterations.numpy()) == 3
  for ours, theirs in zip(worker.net.variables, chief.net.variables):
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def test_sigterm_saves_the_step_reached_and_sets_preempted(tmp_path):
  learner = _learner(seed=0)
  manager = checkpoints.make_manager(
      Config(model_dir=str(tmp_path)), learner, chief=True)
  saver = checkpoints.Checkpointer(manager)

  class Preempt(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
      if batch == 2:
        os.kill(os.getpid(), signal.SIGTERM)   # the handler only sets a flag

  previous = signal.getsignal(signal.SIGTERM)
  data = tf.data.Dataset.from_tensors(
      (tf.ones([4, 3]), tf.zeros([4, 2]))).repeat()
  learner.net.fit(data, steps_per_epoch=10, epochs=1, verbose=0,
                  shuffle=False, callbacks=[Preempt(), saver])
  assert saver.preempted
  step = int(learner.optimizer.iterations.numpy())
  assert step == 3        # stopped after the step it was signalled in
  assert manager.latest_checkpoint.endswith(f"ckpt-{step}")
  assert signal.getsignal(signal.SIGTERM) == previous   # handler given back
