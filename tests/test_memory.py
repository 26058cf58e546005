"""SimCLRv2's memory: moving average, FIFO queue, loss, checkpoint, replicas."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_cli, run_fresh
from simclr_tf import distribute
from simclr_tf import losses
from simclr_tf import tasks
from simclr_tf.config import ModelConfig
from simclr_tf.memory import Memory
from simclr_tf.models import simclr as simclr_lib

SIZE = 8           # smallest input of the CIFAR stem: fast tests
DIM = 8
CONFIG = ModelConfig(resnet_depth=18, proj_out_dim=DIM, num_classes=3)


@pytest.fixture(scope="module")
def net():
  return simclr_lib.build_model(CONFIG, SIZE)


def _memory(net, size=5, momentum=0.9):
  memory = Memory(CONFIG, SIZE, size=size, momentum=momentum)
  memory.initialize_from(net)
  return memory


def _images(n, seed=0):
  rng = np.random.default_rng(seed)
  return tf.constant(rng.uniform(size=(n, SIZE, SIZE, 3)), tf.float32)


def _keys(n, seed=0):
  rng = np.random.default_rng(seed)
  keys = rng.normal(size=(n, DIM)).astype("float32")
  return keys / np.linalg.norm(keys, axis=1, keepdims=True)


def _perturb(variables, seed=1):
  rng = np.random.default_rng(seed)
  saved = [v.numpy().copy() for v in variables]
  for v in variables:
    v.assign(v.numpy() + 0.1 * rng.normal(size=v.shape).astype("float32"))
  return saved


def _restore(variables, saved):
  for v, value in zip(variables, saved):
    v.assign(value)


def _rel(variable):
  return variable.path.split("/", 1)[1]


def test_initialize_copies_backbone_and_projection_head_only(net):
  memory = _memory(net)
  online = {_rel(v): v.numpy() for v in net.variables}
  paths = [_rel(v) for v in memory.memory_net.variables]
  assert not any("head_supervised" in p for p in paths)
  assert len(paths) == len(online) - 2          # all but the head's 2
  for v in memory.memory_net.variables:
    np.testing.assert_array_equal(v.numpy(), online[_rel(v)])
  assert memory.key_dim == DIM
  assert memory.fill_level().numpy() == 0.0


def test_ema_update_by_hand(net):
  m = 0.75
  memory = _memory(net, momentum=m)
  _perturb(memory.memory_net.variables, seed=2)   # memory != online
  saved = _perturb(net.variables, seed=3)
  try:
    mem_before = {_rel(v): v.numpy().copy()
                  for v in memory.memory_net.variables}
    online = {_rel(v): v.numpy() for v in net.variables}
    memory.ema_update(net)
    trainable = {_rel(v) for v in memory.memory_net.trainable_variables}
    assert any(p.endswith("moving_mean") for p in mem_before)
    for v in memory.memory_net.variables:
      p = _rel(v)
      if p in trainable:     # theta_m <- m theta_m + (1 - m) theta_online
        want = m * mem_before[p] + (1 - m) * online[p]
        np.testing.assert_allclose(v.numpy(), want, rtol=1e-6, atol=1e-7)
      else:                  # BN statistics: the memory net's own
        np.testing.assert_array_equal(v.numpy(), mem_before[p])
  finally:
    _restore(net.variables, saved)


def test_contrast_kwargs_updates_then_returns_old_queue_and_keys(net):
  memory = _memory(net, size=6, momentum=0.5)
  memory.enqueue(tf.constant(_keys(2)))
  saved = _perturb(net.trainable_variables, seed=4)
  try:
    kernel = memory.memory_net.trainable_variables[0]
    online_kernel = net.trainable_variables[0].numpy()
    before = kernel.numpy().copy()
    images = _images(4)
    kwargs, keys = memory.contrast_kwargs(net, images)
    np.testing.assert_allclose(kernel.numpy(),
                               0.5 * before + 0.5 * online_kernel, rtol=1e-6)
    assert keys.shape == (4, DIM) and keys.dtype == tf.float32
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-5)
    proj = memory.memory_net(images, training=True)["proj_head_output"]
    np.testing.assert_allclose(keys, tf.math.l2_normalize(proj, -1),
                               atol=1e-5)
    np.testing.assert_array_equal(kwargs["extra_negatives"][:2], _keys(2))
    np.testing.assert_array_equal(kwargs["extra_negatives_mask"],
                                  [True, True, False, False, False, False])
    # training=False: no update.
    after = kernel.numpy().copy()
    memory.contrast_kwargs(net, images, training=False)
    np.testing.assert_array_equal(kernel.numpy(), after)
  finally:
    _restore(net.trainable_variables, saved)


def test_queue_is_fifo_and_wraps(net):
  memory = _memory(net, size=5)
  keys = _keys(20)
  queue = lambda: memory.queue.numpy()
  mask = lambda: memory.valid_mask().numpy().tolist()

  memory.enqueue(keys[0:2])
  assert mask() == [True, True, False, False, False]
  assert memory.pointer.numpy() == 2 and memory.count.numpy() == 2
  np.testing.assert_allclose(memory.fill_level(), 0.4)
  memory.enqueue(keys[2:4])
  memory.enqueue(keys[4:6])     # 4 -> slot 4, 5 wraps to slot 0
  np.testing.assert_array_equal(queue(), keys[[5, 1, 2, 3, 4]])
  assert memory.pointer.numpy() == 1 and memory.count.numpy() == 5
  assert mask() == [True] * 5 and memory.fill_level().numpy() == 1.0
  # A block longer than the queue keeps its last 5 keys, in FIFO slots.
  memory.enqueue(keys[6:13])    # keys 8..12 -> slots 3, 4, 0, 1, 2
  np.testing.assert_array_equal(queue(), keys[[10, 11, 12, 8, 9]])
  assert memory.pointer.numpy() == (1 + 7) % 5
  # In tf.function as in eager.
  tf.function(memory.enqueue)(tf.constant(keys[13:16]))
  np.testing.assert_array_equal(queue(), keys[[15, 11, 12, 13, 14]])
  assert memory.pointer.numpy() == 1 and memory.count.numpy() == 5


def test_without_memory_the_loss_is_plain_nt_xent(net):
  images = _images(8)
  batch = {"view1": images[:4], "view2": images[4:],
           "label": tf.constant([0, 1, -1, 2])}
  task = tasks.Pretrain(0.5)
  assert "memory_fill" not in task.metric_names
  _, metrics = task(net, batch, training=False)
  z1, z2 = tf.split(net(images, training=False)["proj_head_output"], 2)
  plain = losses.nt_xent(z1, z2, 0.5)
  np.testing.assert_array_equal(metrics["contrast_loss"], plain.loss)
  # An empty queue (every slot masked) changes nothing either.
  empty = losses.nt_xent(
      z1, z2, 0.5, extra_negatives=tf.constant(_keys(6)),
      extra_negatives_mask=tf.zeros([6], tf.bool))
  np.testing.assert_allclose(empty.loss, plain.loss, rtol=1e-6)


def _nt_xent_by_hand(z1, z2, queue, temperature):
  """SimCLR eq. 1 with queue negatives, in float64, one example at a time."""
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  z1, z2 = norm(z1.astype(np.float64)), norm(z2.astype(np.float64))
  out = []
  for i in range(len(z1)):
    total = 0.0
    for a, b in ((z1, z2), (z2, z1)):
      pos = a[i] @ b[i] / temperature
      negs = [a[i] @ b[j] / temperature for j in range(len(a)) if j != i]
      negs += [a[i] @ a[j] / temperature for j in range(len(a)) if j != i]
      negs += [a[i] @ q / temperature for q in queue]
      logits = np.array([pos] + negs)
      total += np.log(np.exp(logits).sum()) - pos
    out.append(total)
  return np.array(out)


def test_loss_with_queue_by_hand(net):
  memory = _memory(net, size=5)
  queue = _keys(3, seed=7)
  memory.enqueue(queue)      # 3 of 5 slots hold keys
  images = _images(8, seed=3)
  batch = {"view1": images[:4], "view2": images[4:],
           "label": tf.constant([0, 1, 2, 0])}
  task = tasks.Pretrain(0.2, memory=memory)
  assert task.metric_names[-1] == "memory_fill"
  z1, z2 = tf.split(net(images, training=True)["proj_head_output"], 2)
  _, metrics = task(net, batch, training=True)
  want = _nt_xent_by_hand(z1.numpy(), z2.numpy(), queue, 0.2)
  np.testing.assert_allclose(metrics["contrast_loss"], want, rtol=1e-4)
  # Without the queue the loss is smaller (fewer negatives).
  assert (_nt_xent_by_hand(z1.numpy(), z2.numpy(), [], 0.2) < want).all()
  # The batch's 8 keys were pushed after the loss: 3 + 8 > 5, full.
  assert float(metrics["memory_fill"]) == 1.0
  assert memory.pointer.numpy() == (3 + 8) % 5


def test_checkpoint_round_trip(net, tmp_path):
  memory = _memory(net, size=7, momentum=0.5)
  saved = _perturb(net.trainable_variables, seed=5)
  try:
    memory.contrast_kwargs(net, _images(4))
  finally:
    _restore(net.trainable_variables, saved)
  memory.enqueue(_keys(9))
  path = tf.train.Checkpoint(memory=memory).save(str(tmp_path / "ckpt"))

  fresh = Memory(CONFIG, SIZE, size=7, momentum=0.5)   # random weights
  status = tf.train.Checkpoint(memory=fresh).restore(path)
  status.assert_existing_objects_matched()
  assert fresh.pointer.numpy() == 2 and fresh.count.numpy() == 7
  np.testing.assert_array_equal(fresh.queue.numpy(), memory.queue.numpy())
  assert len(fresh.memory_net.variables) == len(memory.memory_net.variables)
  for a, b in zip(fresh.memory_net.variables, memory.memory_net.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
  # Both continue identically.
  for m in (memory, fresh):
    m.enqueue(_keys(3, seed=9))
  np.testing.assert_array_equal(fresh.queue.numpy(), memory.queue.numpy())


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="size"):
    Memory(CONFIG, SIZE, size=0, momentum=0.9)
  with pytest.raises(ValueError, match="momentum"):
    Memory(CONFIG, SIZE, size=4, momentum=1.5)


def _mirrored_check():
  """In `run_fresh`'s process: 2 logical CPUs exist before TF starts."""
  strategy = distribute.make_strategy("mirrored", cpu_replicas=2)
  assert strategy.num_replicas_in_sync == 2
  config = ModelConfig(resnet_depth=18, proj_out_dim=8, num_classes=3)
  rng = np.random.default_rng(0)
  with strategy.scope():
    net = simclr_lib.SimCLR(config).build_for(8)
    memory = Memory(config, 8, size=12, momentum=0.5)
    memory.initialize_from(net)
    for v in net.trainable_variables:
      v.assign(v.numpy() + 0.1 * rng.normal(size=v.shape).astype("float32"))
  rel = lambda v: v.path.split("/", 1)[1]
  before = {rel(v): v.numpy() for v in memory.memory_net.variables}
  online = {rel(v): v.numpy() for v in net.variables}

  def components(v):
    return [c.numpy() for c in strategy.experimental_local_results(v.value)]

  def assert_identical_on_replicas():
    for v in memory.weights:
      c = components(v)
      assert np.array_equal(c[0], c[1]), v.path

  # Each replica gets its own 4 images (2 examples, 2 views).
  images = tf.constant(rng.uniform(size=(2, 4, 8, 8, 3)), tf.float32)
  batch = {"view1": images[:, :2], "view2": images[:, 2:],
           "label": tf.zeros([2, 2], tf.int32)}
  per_replica = strategy.experimental_distribute_values_from_function(
      lambda ctx: {k: v[ctx.replica_id_in_sync_group]
                   for k, v in batch.items()})
  task = tasks.Pretrain(0.5, memory=memory)

  @tf.function
  def step(batch):
    def fn(batch):
      images = tf.concat([batch["view1"], batch["view2"]], 0)
      _, keys = memory.contrast_kwargs(net, images)
      memory.enqueue(keys)
      return keys
    return strategy.run(fn, args=(batch,))

  keys = [k.numpy() for k in
          strategy.experimental_local_results(step(per_replica))]
  assert_identical_on_replicas()
  queue = components(memory.queue)[0]
  # The global batch, in replica order.
  np.testing.assert_array_equal(queue[:8], np.concatenate(keys))
  assert not queue[8:].any()
  assert int(memory.pointer.numpy()) == 8
  assert int(memory.count.numpy()) == 8
  for v in memory.memory_net.trainable_variables:
    np.testing.assert_allclose(
        v.numpy(), 0.5 * before[rel(v)] + 0.5 * online[rel(v)],
        rtol=1e-6, atol=1e-7)

  @tf.function
  def task_step(batch):
    return strategy.run(lambda b: task(net, b, training=True), args=(batch,))

  _, metrics = task_step(per_replica)
  assert_identical_on_replicas()
  assert int(memory.pointer.numpy()) == 4
  assert int(memory.count.numpy()) == 12
  fill = strategy.experimental_local_results(metrics["memory_fill"])
  assert [float(f) for f in fill] == [1.0, 1.0], fill
  return "MIRRORED_OK"


@pytest.mark.slow
def test_mirrored_update_is_identical_on_both_replicas():
  assert run_fresh(__file__, "_mirrored_check") == "MIRRORED_OK"


@pytest.mark.slow
def test_cli_memory_on_two_replicas_resumes_with_its_queue(tmp_path,
                                                           tiny_flags):
  model_dir = tmp_path / "run"
  flags = tiny_flags + ["--mode=train", "--train_mode=pretrain",
                        "--cpu_replicas=2", "--memory_size=40",
                        f"--model_dir={model_dir}"]
  first = run_cli(*flags)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "memory_fill" in first.stdout + first.stderr

  def read(step):
    reader = tf.train.load_checkpoint(
        str(model_dir / "checkpoints" / f"ckpt-{step}"))
    get = lambda n: reader.get_tensor(f"memory/{n}/.ATTRIBUTES/VARIABLE_VALUE")
    return get("queue"), int(get("pointer")), int(get("count"))

  queue3, pointer3, count3 = read(3)
  # 3 steps of 2 x 16 keys (the global batch) into 40 slots.
  assert (pointer3, count3) == (96 % 40, 40)
  second = run_cli(*flags, "--train_steps=4")
  assert second.returncode == 0, second.stderr[-3000:]
  queue4, pointer4, count4 = read(4)
  assert (pointer4, count4) == ((96 + 32) % 40, 40)
  # Resumed: only the 32 slots from the old pointer on were overwritten.
  kept = [(pointer3 + 32 + i) % 40 for i in range(8)]
  np.testing.assert_array_equal(queue4[kept], queue3[kept])
  assert not np.array_equal(queue4, queue3)
