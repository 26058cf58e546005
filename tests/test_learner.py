"""The shared train step: freezing, the frozen teacher, losses by hand."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import tasks
from simclr_tf.config import ModelConfig
from simclr_tf.learner import Learner
from simclr_tf.models import simclr as simclr_lib

SMALL = dict(width_multiplier=0.25, proj_out_dim=16, num_classes=4,
             sup_head_input=1,
             proj_layers_kept=1)


def _batch(n=8, size=32, seed=0, labels=True):
  rng = np.random.default_rng(seed)
  image = tf.constant(rng.uniform(size=(n, size, size, 3)), tf.float32)
  label = tf.constant(rng.integers(0, 4, n) if labels else -np.ones(n),
                      tf.int32)
  return {"image": image, "label": label}


def _fit(learner, batch, steps):
  ds = tf.data.Dataset.from_tensors(batch).repeat()
  history = learner.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
  return history.history


def _snapshot(variables):
  return {v.path: v.numpy().copy() for v in variables}


def _changed(before, variables):
  return {v.path for v in variables
          if np.abs(v.numpy() - before[v.path]).max() > 0}


@pytest.mark.parametrize("after_block", [2, 4])
def test_frozen_weights_and_bn_statistics_do_not_move(after_block):
  net = simclr_lib.build_model(ModelConfig(**SMALL), 32)
  simclr_lib.freeze_before_block(net, after_block)
  learner = Learner(net, tasks.Finetune())
  learner.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9))
  before = _snapshot(net.variables)
  _fit(learner, _batch(), steps=2)
  changed = _changed(before, net.variables)
  frozen_prefixes = ["simclr/resnet/stem/"] + [
      f"simclr/resnet/block_group{g}/" for g in range(1, after_block + 1)]
  if after_block == 4:
    frozen_prefixes.append("simclr/proj_head/")
  frozen = {p for p in before if any(p.startswith(f) for f in frozen_prefixes)}
  assert frozen and not frozen & changed
  assert any("head_supervised" in p for p in changed)
  if after_block == 2:   # group 3 trains, and its BN statistics move
    assert any("block_group3/" in p and "moving_mean" in p for p in changed)


def test_distillation_loss_by_hand_and_teacher_unchanged():
  teacher_net = simclr_lib.build_model(ModelConfig(**SMALL), 32)
  rng = np.random.default_rng(3)
  for v in teacher_net.sup_head.weights:
    v.assign(rng.standard_normal(v.shape).astype("float32"))
  teacher_net.trainable = False
  teacher = lambda images: teacher_net(images, training=False)["logits_sup"]
  before = _snapshot(teacher_net.variables)

  student = simclr_lib.build_model(ModelConfig(**SMALL), 32)
  temperature = 0.5
  task = tasks.Distill(teacher, temperature)
  batch = _batch(labels=False)
  # By hand: the zero-initialised student head gives uniform predictions, so
  # the loss is T^2 * CE(p_teacher, uniform) = T^2 * log(C), whatever p_t.
  loss, values = task(student, batch, training=False)
  np.testing.assert_allclose(float(loss), temperature ** 2 * math.log(4),
                             rtol=1e-6)
  # And with a non-trivial student, against numpy.
  for v in student.sup_head.weights:
    v.assign(rng.standard_normal(v.shape).astype("float32"))
  loss, _ = task(student, batch, training=False)
  t = teacher(batch["image"]).numpy() / temperature
  s = student(batch["image"])["logits_sup"].numpy() / temperature
  p_t = np.exp(t - t.max(1, keepdims=True))
  p_t /= p_t.sum(1, keepdims=True)
  log_p_s = s - s.max(1, keepdims=True)
  log_p_s -= np.log(np.exp(log_p_s).sum(1, keepdims=True))
  expected = temperature ** 2 * np.mean(-(p_t * log_p_s).sum(1))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)

  learner = Learner(student, task)
  learner.compile(optimizer=keras.optimizers.SGD(0.1))
  logs = _fit(learner, batch, steps=2)
  assert np.isfinite(logs["distill_loss"]).all()
  assert not _changed(before, teacher_net.variables)


def test_unlabeled_examples_do_not_count_in_the_supervised_loss():
  net = simclr_lib.build_model(ModelConfig(**SMALL), 32)
  for v in net.sup_head.weights:
    v.assign(np.random.default_rng(0).standard_normal(v.shape)
             .astype("float32"))
  batch = _batch()
  half = dict(batch, label=tf.concat([batch["label"][:4], -tf.ones(4, tf.int32)],
                                     0))
  loss_half, _ = tasks.Finetune()(net, half, training=False)
  first = {k: v[:4] for k, v in batch.items()}
  loss_first, _ = tasks.Finetune()(net, first, training=False)
  np.testing.assert_allclose(float(loss_half), float(loss_first), rtol=1e-5)


def test_weight_decay_term_is_logged_and_added():
  keras.utils.set_random_seed(0)
  nets = [simclr_lib.build_model(ModelConfig(**SMALL), 32) for _ in range(2)]
  simclr_lib.copy_weights(nets[0], nets[1])
  groups = [simclr_lib.decay_groups(net, "momentum") for net in nets]
  expected = 1e-3 * sum(float(np.sum(v.numpy() ** 2)) / 2
                        for v in groups[0].loss_l2)
  assert expected > 0
  path = sorted(v.path for v in groups[0].loss_l2
                if "head_supervised" not in v.path)[0]
  start = simclr_lib.variables_by_path(nets[0])[path].numpy().copy()
  lr, logs = 0.1, []
  for net, group, decay in zip(nets, groups, (1e-3, 0.0)):
    learner = Learner(net, tasks.Finetune(), l2_variables=group.loss_l2,
                      weight_decay=decay)
    learner.compile(optimizer=keras.optimizers.SGD(lr))
    logs.append(_fit(learner, _batch(), steps=1))
  # Logged: the term by hand, and the loss is the task's plus the term.
  with_decay, without = logs
  np.testing.assert_allclose(with_decay["weight_decay"][0], expected,
                             rtol=1e-4)
  np.testing.assert_allclose(
      with_decay["loss"][0],
      with_decay["sup_loss"][0] + with_decay["weight_decay"][0], rtol=1e-5)
  assert without["weight_decay"][0] == 0.0
  # Added to what is differentiated: one SGD step moves a decayed kernel
  # further, by lr * decay * w (the gradient of decay * |w|^2 / 2).
  decayed, plain = (simclr_lib.variables_by_path(net)[path].numpy()
                    for net in nets)
  np.testing.assert_allclose(plain - decayed, lr * 1e-3 * start,
                             atol=1e-3 * lr * 1e-3 * np.abs(start).max())


def test_top_k_breaks_ties_by_class_index():
  logits = tf.constant([[0.0, 0.0, 0.0], [1.0, 3.0, 2.0], [5.0, 5.0, 1.0]])
  labels = tf.constant([1, 2, 1])
  np.testing.assert_array_equal(tasks.top_k_correct(labels, logits, 1),
                                [0.0, 0.0, 0.0])
  np.testing.assert_array_equal(tasks.top_k_correct(labels, logits, 2),
                                [1.0, 1.0, 1.0])
  np.testing.assert_array_equal(
      tasks.top_k_correct(tf.constant([0, 1, 0]), logits, 1), [1.0, 1.0, 1.0])


@pytest.mark.slow
def test_short_pretraining_on_real_images_lowers_the_contrastive_loss():
  """A few LARS steps on the bundled CIFAR-10 images, then the loss of a
  fixed batch of augmented pairs (not trained on) is lower than before."""
  from simclr_tf.data import pipeline
  from simclr_tf.optim.lars import LARS

  def pairs(seed, batch, steps=None):
    ds = pipeline.build_dataset(
        dataset="cifar10_sample", data_dir="", split="train",
        stage="pretrain", image_size=32, batch_size=batch, seed=seed,
        cache=False)
    return ds if steps is None else ds.take(steps)

  keras.utils.set_random_seed(0)
  config = ModelConfig(width_multiplier=0.5, proj_out_dim=32)
  net = simclr_lib.build_model(config, 32)
  task = tasks.Pretrain(temperature=0.5)
  held_out = next(iter(pairs(seed=123, batch=64)))

  def held_out_loss():
    loss, _ = task(net, held_out, training=True)
    return float(loss)

  before = held_out_loss()
  groups = simclr_lib.decay_groups(net, "lars")
  opt = LARS(0.5, weight_decay=1e-4)
  opt.exclude_from_weight_decay(var_list=list(groups.excluded))
  opt.exclude_from_layer_adaptation(var_list=list(groups.excluded))
  learner = Learner(net, task)
  learner.compile(optimizer=opt)
  learner.fit(pairs(seed=0, batch=32), steps_per_epoch=12, epochs=1,
              verbose=0, shuffle=False)
  after = held_out_loss()
  print(f"held-out contrastive loss: {before:.4f} -> {after:.4f}")
  assert after < before - 0.05, (before, after)


def test_a_learner_without_task_evaluates_but_does_not_train():
  net = simclr_lib.build_model(ModelConfig(**SMALL), 32)
  for v in net.sup_head.weights:
    v.assign(np.random.default_rng(1).standard_normal(v.shape)
             .astype("float32"))
  learner = Learner(net, None)
  learner.compile(optimizer=keras.optimizers.SGD(0.1))
  batch = _batch()
  ds = tf.data.Dataset.from_tensors(batch)
  metrics = learner.evaluate(ds, return_dict=True, verbose=0)
  logits = net(batch["image"])["logits_sup"]
  want = tasks.top_k_correct(batch["label"], logits, 1).numpy().mean()
  np.testing.assert_allclose(metrics["top1"], want, rtol=1e-6)
  assert set(metrics) == {"loss", "top1", "top5"}
  with pytest.raises(ValueError, match="only evaluates"):
    learner.fit(ds.repeat(), steps_per_epoch=1, epochs=1, verbose=0,
                shuffle=False)
