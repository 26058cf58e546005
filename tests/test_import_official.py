"""The official-checkpoint importer (tf_hub_export.import_official).

Two kinds of cases:
* synthetic checkpoints, written here with the official key layouts (TF1
  names numbered in creation order, TF2 attribute paths), from a model of
  ours with random weights: the import must give back that model's outputs.
  They run everywhere.
* the fixtures of ../shared/official_simclr, written by the official code
  itself, with the official model's outputs on fixed images: the import must
  reproduce them to 1e-4 (relative max error). Skipped without ../shared.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import simclr_tf
from conftest import ROOT, TINY_FLAGS, run_cli
from simclr_tf.config import ModelConfig
from simclr_tf.models.simclr import build_float32
from tf_hub_export import import_official, load, official

SHARED_OFFICIAL = os.path.join(ROOT, "..", "shared", "official_simclr")
SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
REFERENCE_TOLERANCE = 1e-4


# === Synthetic checkpoints in the official layouts ============================

def _random_model(config: ModelConfig, image_size: int, seed: int) -> keras.Model:
  model = build_float32(config, image_size)
  rng = np.random.default_rng(seed)
  for v in model.variables:
    shape = tuple(v.shape)
    if v.path.endswith("moving_variance"):
      value = rng.uniform(0.5, 1.5, shape)
    elif v.path.endswith("gamma"):
      value = rng.uniform(0.5, 1.5, shape)
    elif v.path.endswith("kernel"):
      value = rng.normal(0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
    else:
      value = rng.normal(0, 0.1, shape)
    v.assign(value.astype(np.float32))
  return model


def _official_block_order(model):
  """(conv layers, batch-norm layers) in the official creation order."""
  convs, bns = [], []
  stem = model.backbone.stem
  for conv, bn in zip(stem.convs, stem.bns):
    convs.append(conv)
    bns.append(bn)
  for group in model.backbone.block_groups:
    for blk in group.blocks:
      if blk.use_projection:
        convs.append(blk.shortcut_conv)
        bns.append(blk.shortcut_bn)
      convs.append(blk.conv_0)
      bns.append(blk.bn_0)
      if blk.use_sk:
        convs.append(blk.sk_1.conv)
        bns.append(blk.sk_1.bn)
        convs.append(blk.sk_1.reduce)
        bns.append(blk.sk_1.reduce_bn)
        convs.append(blk.sk_1.expand)
      last_conv, last_bn = ((blk.conv_2, blk.bn_2) if blk.bottleneck
                            else (blk.conv_1, blk.bn_1))
      if blk.bottleneck and not blk.use_sk:
        convs.append(blk.conv_1)
        bns.append(blk.bn_1)
      convs.append(last_conv)
      bns.append(last_bn)
      if blk.se is not None:
        convs.append(blk.se.reduce)
        convs.append(blk.se.expand)
  return convs, bns


def _bn_tensors(bn, prefix):
  out = {f"{prefix}/gamma": bn.gamma, f"{prefix}/moving_mean": bn.moving_mean,
         f"{prefix}/moving_variance": bn.moving_variance}
  if bn.center:
    out[f"{prefix}/beta"] = bn.beta
  return out


def tf1_tensors(model, scope=""):
  """The model's weights under TF1 names (`base_model/conv2d_K/...`)."""
  convs, bns = _official_block_order(model)
  out = {}
  for k, conv in enumerate(convs):
    name = f"{scope}base_model/conv2d{'_%d' % k if k else ''}"
    out[f"{name}/kernel"] = conv.kernel
    if conv.use_bias:
      out[f"{name}/bias"] = conv.bias
  for k, bn in enumerate(bns):
    out.update(_bn_tensors(
        bn, f"{scope}base_model/batch_normalization{'_%d' % k if k else ''}"))
  for j, layer in enumerate(model.proj_head.proj_layers):
    out[f"{scope}head_contrastive/nl_{j}/dense/kernel"] = layer.dense.kernel
    out.update(_bn_tensors(
        layer.bn, f"{scope}head_contrastive/nl_{j}/batch_normalization"))
  if model.sup_head is not None:
    out[f"{scope}head_supervised/linear_layer/dense/kernel"] = (
        model.sup_head.dense.kernel)
    out[f"{scope}head_supervised/linear_layer/dense/bias"] = (
        model.sup_head.dense.bias)
  return {k: np.asarray(v) for k, v in out.items()}


def tf2_tensors(model):
  """The model's weights under the TF2 attribute paths of tf2/run.py."""
  out = {}
  stem = model.backbone.stem
  base = "model/resnet_model"
  if len(stem.convs) == 3:                       # conv bn conv bn conv id bn
    slots = [(0, 1), (2, 3), (4, 6)]
  else:                                          # conv id bn
    slots = [(0, 2)]
  for (ci, bi), conv, bn in zip(slots, stem.convs, stem.bns):
    out[f"{base}/initial_conv_relu_max_pool/{ci}/conv2d/kernel"] = conv.kernel
    out.update(_bn_tensors(bn, f"{base}/initial_conv_relu_max_pool/{bi}/bn"))
  for g, group in enumerate(model.backbone.block_groups):
    for b, blk in enumerate(group.blocks):
      p = f"{base}/block_groups/{g}/layers/{b}"
      short = "projection_layers" if blk.bottleneck else "shortcut_layers"
      if blk.use_projection:
        # ResNet-D lists a FixedPadding (stride 2) and an AveragePooling2D
        # first; they have no weights.
        first = (0 if not blk.resnet_d else 2 if blk.strides > 1 else 1)
        out[f"{p}/{short}/{first}/conv2d/kernel"] = blk.shortcut_conv.kernel
        out.update(_bn_tensors(blk.shortcut_bn, f"{p}/{short}/{first + 1}/bn"))
      if blk.bottleneck:
        main = f"{p}/conv_relu_dropblock_layers"   # DropBlocks in between
        out[f"{main}/0/conv2d/kernel"] = blk.conv_0.kernel
        out.update(_bn_tensors(blk.bn_0, f"{main}/1/bn"))
        if blk.use_sk:
          sk = blk.sk_1
          out[f"{main}/3/conv2d_fixed_padding/conv2d/kernel"] = sk.conv.kernel
          out.update(_bn_tensors(sk.bn, f"{main}/3/batch_norm_relu/bn"))
          out[f"{main}/3/conv2d_0/kernel"] = sk.reduce.kernel
          out.update(_bn_tensors(sk.reduce_bn, f"{main}/3/batch_norm_relu_1/bn"))
          out[f"{main}/3/conv2d_1/kernel"] = sk.expand.kernel
          nxt = 5
        else:
          out[f"{main}/3/conv2d/kernel"] = blk.conv_1.kernel
          out.update(_bn_tensors(blk.bn_1, f"{main}/4/bn"))
          nxt = 6
        out[f"{main}/{nxt}/conv2d/kernel"] = blk.conv_2.kernel
        out.update(_bn_tensors(blk.bn_2, f"{main}/{nxt + 1}/bn"))
        se = f"{main}/{nxt + 3}"
      else:
        main = f"{p}/conv2d_bn_layers"
        out[f"{main}/0/conv2d/kernel"] = blk.conv_0.kernel
        out.update(_bn_tensors(blk.bn_0, f"{main}/1/bn"))
        out[f"{main}/2/conv2d/kernel"] = blk.conv_1.kernel
        out.update(_bn_tensors(blk.bn_1, f"{main}/3/bn"))
        se = f"{p}/se_layer"
      if blk.se is not None:
        for ours, theirs in (("reduce", "se_reduce"), ("expand", "se_expand")):
          layer = getattr(blk.se, ours)
          out[f"{se}/{theirs}/kernel"] = layer.kernel
          out[f"{se}/{theirs}/bias"] = layer.bias
  for j, layer in enumerate(model.proj_head.proj_layers):
    h = f"model/_projection_head/linear_layers/{j}"
    out[f"{h}/dense/kernel"] = layer.dense.kernel
    out.update(_bn_tensors(layer.bn, f"{h}/bn_relu/bn"))
  if model.sup_head is not None:
    h = "model/supervised_head/linear_layer/dense"
    out[f"{h}/kernel"] = model.sup_head.dense.kernel
    out[f"{h}/bias"] = model.sup_head.dense.bias
  return {k + SUFFIX: np.asarray(v) for k, v in out.items()}


def write_checkpoint(prefix: str, tensors: dict) -> str:
  """A TensorFlow V2 checkpoint with exactly these keys."""
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                    shape_and_slices=[""] * len(names),
                    tensors=[tf.constant(tensors[n]) for n in names])
  return prefix


def _with_training_state_tf1(tensors):
  out = dict(tensors)
  out["global_step"] = np.int64(1234)
  for key in list(tensors)[:5]:
    out[f"{key}/Momentum"] = np.zeros_like(tensors[key])
  return out


def _with_training_state_tf2(tensors):
  out = dict(tensors)
  out["global_step" + SUFFIX] = np.int64(77)
  out["save_counter" + SUFFIX] = np.int64(1)
  out["optimizer/iter" + SUFFIX] = np.int64(77)
  for key in list(tensors)[:5]:
    slot = key.replace(SUFFIX, "/.OPTIMIZER_SLOT/optimizer/Momentum" + SUFFIX)
    out[slot] = np.zeros_like(tensors[key])
  return out


def _max_rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _outputs(export_dir, images):
  loaded = tf.saved_model.load(export_dir)
  return {k: v.numpy() for k, v in
          loaded(tf.constant(images), training=False).items()}


R18_SE = ModelConfig(resnet_depth=18, width_multiplier=0.25, se_ratio=0.25,
                     cifar_stem=True, global_bn=False, proj_out_dim=16,
                     num_classes=7)
R50_SK_SE = ModelConfig(resnet_depth=50, width_multiplier=0.25,
                        sk_ratio=0.0625, se_ratio=0.25, cifar_stem=False,
                        global_bn=False, proj_out_dim=16, num_classes=5)


@pytest.mark.parametrize("layout,config,image_size", [
    ("tf1", R18_SE, 32),
    ("tf2", R18_SE, 32),
    pytest.param("tf2", R50_SK_SE, 64, marks=pytest.mark.slow),
    pytest.param("tf1", R50_SK_SE, 64, marks=pytest.mark.slow),
], ids=["tf1-r18-se", "tf2-r18-se", "tf2-r50-sk-se", "tf1-r50-sk-se"])
def test_synthetic_checkpoint_imports_exactly(tmp_path, layout, config,
                                              image_size):
  model = _random_model(config, image_size, seed=1)
  if layout == "tf1":
    tensors = _with_training_state_tf1(tf1_tensors(model))
    prefix = write_checkpoint(str(tmp_path / "ckpt" / "model.ckpt-1234"),
                              tensors)
  else:
    tensors = _with_training_state_tf2(tf2_tensors(model))
    prefix = write_checkpoint(str(tmp_path / "ckpt" / "ckpt-77"), tensors)
  report = import_official.import_checkpoint(
      prefix, str(tmp_path / "out"), image_size=image_size)
  got = report.model_config
  for name in ("resnet_depth", "width_multiplier", "sk_ratio", "se_ratio",
               "cifar_stem", "proj_head_mode", "num_proj_layers",
               "proj_out_dim", "num_classes"):
    assert getattr(got, name) == getattr(config, name), name
  assert report.global_step == (1234 if layout == "tf1" else 77)
  images = np.random.default_rng(0).uniform(
      size=(3, image_size, image_size, 3)).astype(np.float32)
  ours = {k: v.numpy() for k, v in model(images, training=False).items()}
  theirs = _outputs(str(tmp_path / "out"), images)
  for key in ("final_avg_pool", "proj_head_output", "logits_sup"):
    assert _max_rel_err(theirs[key], ours[key]) < 1e-5, key
  meta = load.read_meta(str(tmp_path / "out"))
  assert meta.train_mode == f"import:{layout}_checkpoint"


@pytest.mark.slow
def test_tf1_ema_copy_is_imported_with_ema_and_ignored_without(tmp_path):
  online = _random_model(R18_SE, 32, seed=2)
  averaged = _random_model(R18_SE, 32, seed=3)
  tensors = {**tf1_tensors(online), **tf1_tensors(averaged, "ema_model/")}
  prefix = write_checkpoint(str(tmp_path / "model.ckpt-9"),
                            _with_training_state_tf1(tensors))
  images = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(
      np.float32)
  for ema, source in ((False, online), (True, averaged)):
    out = str(tmp_path / f"out_{ema}")
    import_official.import_checkpoint(prefix, out, ema=ema)
    want = source(images, training=False)["logits_sup"].numpy()
    assert _max_rel_err(_outputs(out, images)["logits_sup"], want) < 1e-5


def test_tf1_hub_module_folder_reads_its_variables(tmp_path):
  model = _random_model(R18_SE, 32, seed=4)
  hub = tmp_path / "hub"
  (hub / "variables").mkdir(parents=True)
  write_checkpoint(str(hub / "variables" / "variables"), tf1_tensors(model))
  (hub / "saved_model.pb").write_bytes(b"")    # never read for TF1 modules
  (hub / "tfhub_module.pb").write_bytes(b"")
  weights = official.read(str(tmp_path))       # the released model folder
  assert weights.form == "tf1_hub"
  assert official.infer_model_config(weights).resnet_depth == 18


def test_architecture_flags_printed_match_the_export(tmp_path, capsys):
  model = _random_model(R18_SE, 32, seed=5)
  prefix = write_checkpoint(str(tmp_path / "ckpt-1"), tf2_tensors(model))
  assert import_official.main([prefix, f"--output={tmp_path / 'out'}"]) == 0
  printed = capsys.readouterr().out
  assert "--resnet_depth=18 --width_multiplier=0.25" in printed
  assert "--se_ratio=0.25" in printed
  # Fine-tunable under Keras 3 like any export of ours.
  layer = keras.layers.TFSMLayer(str(tmp_path / "out"), call_endpoint="serve",
                                 call_training_endpoint="train",
                                 trainable=True)
  images = tf.random.uniform([2, 32, 32, 3], seed=1)
  with tf.GradientTape() as tape:
    out = layer(images, training=True)
    loss = (tf.reduce_sum(out["logits_sup"] ** 2) +
            tf.reduce_sum(out["proj_head_output"] ** 2))
  grads = tape.gradient(loss, layer.trainable_weights)
  assert len(grads) == len(model.trainable_variables)
  assert all(g is not None for g in grads)


# === Bad input: exit 2, one line, nothing written ============================

def _truncated(tmp_path):
  model = _random_model(R18_SE, 32, seed=6)
  prefix = write_checkpoint(str(tmp_path / "bad" / "model.ckpt-5"),
                            tf1_tensors(model))
  data = prefix + ".data-00000-of-00001"
  size = os.path.getsize(data)
  with open(data, "r+b") as f:
    f.truncate(size // 2)
  return prefix


def _missing_index(tmp_path):
  model = _random_model(R18_SE, 32, seed=7)
  prefix = write_checkpoint(str(tmp_path / "bad" / "ckpt-3"),
                            tf2_tensors(model))
  os.remove(prefix + ".index")
  return prefix


def _no_checkpoint(tmp_path):
  folder = tmp_path / "bad"
  folder.mkdir()
  (folder / "README.txt").write_text("not a model\n")
  return str(folder)


def _unknown_depth(tmp_path):
  model = _random_model(R18_SE, 32, seed=8)
  tensors = {k: v for k, v in tf2_tensors(model).items()
             if "/block_groups/3/layers/1/" not in k}   # [2, 2, 2, 1] blocks
  return write_checkpoint(str(tmp_path / "bad" / "ckpt-2"), tensors)


def _keras_resnet50(tmp_path):
  net = keras.applications.ResNet50(weights=None, include_top=False,
                                    input_shape=(64, 64, 3))
  return tf.train.Checkpoint(model=net).write(str(tmp_path / "bad" / "k"))


def _ema_on_tf2(tmp_path):
  model = _random_model(R18_SE, 32, seed=9)
  return write_checkpoint(str(tmp_path / "bad" / "ckpt-4"),
                          tf2_tensors(model))


def _leftover_tensor(tmp_path):
  model = _random_model(R18_SE, 32, seed=10)
  tensors = tf1_tensors(model)
  tensors["head_extra/dense/kernel"] = np.zeros((4, 4), np.float32)
  return write_checkpoint(str(tmp_path / "bad" / "model.ckpt-6"), tensors)


BAD_INPUTS = {
    # case: (make SRC, extra args, words the message must contain)
    "keras_resnet50": (_keras_resnet50, [], "not an official SimCLR"),
    "truncated_data": (_truncated, [], "truncated"),
    "missing_index": (_missing_index, [], "no "),
    "no_checkpoint": (_no_checkpoint, [], "holds no checkpoint"),
    "unknown_depth": (_unknown_depth, [], "unknown depth"),
    "ema_on_tf2": (_ema_on_tf2, ["--ema"], "ema_model"),
    "leftover_tensor": (_leftover_tensor, [], "head_extra"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys,
                                                            case):
  make, extra, words = BAD_INPUTS[case]
  src = make(tmp_path)
  out = tmp_path / "out"
  before = sorted(os.listdir(tmp_path))
  capsys.readouterr()
  status = import_official.main([src, f"--output={out}", *extra])
  captured = capsys.readouterr()
  assert status == import_official.EXIT_BAD_INPUT
  lines = [l for l in captured.err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("import_official: error:")
  assert words in lines[0], lines[0]
  assert not out.exists()
  assert sorted(os.listdir(tmp_path)) == before     # no staging left over


def test_existing_output_is_refused_and_left_alone(tmp_path, capsys):
  model = _random_model(R18_SE, 32, seed=11)
  prefix = write_checkpoint(str(tmp_path / "ckpt-1"), tf2_tensors(model))
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  assert import_official.main([prefix, f"--output={out}"]) == 2
  assert "already exists" in capsys.readouterr().err
  assert os.listdir(out) == ["keep.txt"]


def test_command_line_exits_2_with_one_line(tmp_path):
  src = _no_checkpoint(tmp_path)
  proc = subprocess.run(
      [sys.executable, "-m", "tf_hub_export.import_official", src,
       f"--output={tmp_path / 'out'}"], capture_output=True, text=True,
      cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), timeout=300)
  assert proc.returncode == 2
  ours = [l for l in proc.stderr.splitlines()
          if l.startswith("import_official:")]
  assert len(ours) == 1 and "holds no checkpoint" in ours[0]
  assert not (tmp_path / "out").exists()


# === The fixtures written by the official code ================================

FIXTURES = {
    # id: (archive folder, SRC inside it, --ema, reference prefix, size)
    "tf2_r18_cifar_checkpoint": ("tf2_r18_cifar", "checkpoint", False, "", 32),
    "tf2_r18_cifar_saved_model": ("tf2_r18_cifar", "saved_model", False, "",
                                  32),
    "tf2_r50_sk1_64px_saved_model": ("tf2_r50_sk1_64px", "saved_model", False,
                                     "", 64),
    "tf1_r50_sk1": ("tf1_r50_sk1_ema", "", False, "", 64),
    "tf1_r50_sk1_ema": ("tf1_r50_sk1_ema", "", True, "ema_", 64),
}


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
  if not os.path.isdir(SHARED_OFFICIAL):
    pytest.skip("../shared/official_simclr is not here (a user's clone)")
  return tmp_path_factory.mktemp("official")


def _unpack(official_dir, folder):
  target = official_dir / folder
  if not target.exists():
    with tarfile.open(os.path.join(SHARED_OFFICIAL, f"{folder}.tar.gz")) as t:
      t.extractall(official_dir, filter="data")
  return target


@pytest.fixture(scope="module")
def imported(official_dir):
  """Imports each fixture once: id -> (export dir, reference, prefix)."""
  done = {}

  def get(fixture_id):
    if fixture_id not in done:
      folder, sub, ema, ref_prefix, size = FIXTURES[fixture_id]
      root = _unpack(official_dir, folder)
      out = official_dir / "imported" / fixture_id
      import_official.import_checkpoint(str(root / sub), str(out), ema=ema,
                                        image_size=size)
      reference = dict(np.load(root / "reference.npz"))
      done[fixture_id] = (str(out), reference, ref_prefix, size)
    return done[fixture_id]
  return get


@pytest.mark.official
@pytest.mark.parametrize("fixture_id", sorted(FIXTURES))
def test_official_fixture_reproduces_reference_outputs(imported, fixture_id):
  out, reference, prefix, _ = imported(fixture_id)
  ours = _outputs(out, reference["images"])
  # --mode=eval's path: rebuild the Keras model from the export, checked.
  model, _, _ = load.load_model(out)
  keras_out = model(reference["images"], training=False)
  checked = 0
  for key in ("final_avg_pool", "proj_head_output", "logits_sup"):
    if prefix + key not in reference:
      continue
    err = _max_rel_err(ours[key], reference[prefix + key])
    keras_err = _max_rel_err(keras_out[key], reference[prefix + key])
    print(f"{fixture_id} {key}: max rel err {err:.2e} (keras {keras_err:.2e})")
    assert err < REFERENCE_TOLERANCE and keras_err < REFERENCE_TOLERANCE
    checked += 1
  assert checked >= 2
  if "saved_model_logits_sup" in reference and not prefix:
    # The official export computes the same as the official model.
    err = _max_rel_err(ours["logits_sup"], reference["saved_model_logits_sup"])
    assert err < REFERENCE_TOLERANCE


def _unlabeled_folder(tmp_path, count=24):
  """ROOT/train/<image> from the bundled sample, no classes."""
  src = os.path.join(ROOT, "simclr_tf", "data", "cifar10_sample", "train")
  dst = tmp_path / "unlabeled" / "train"
  dst.mkdir(parents=True)
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs)
  for i, f in enumerate(files[::max(1, len(files) // count)][:count]):
    shutil.copy(f, dst / f"{i:03d}.jpg")
  return str(dst.parent)


def _arch_flags(out):
  c = load.read_meta(out).model_config
  size = load.read_meta(out).image_size
  return [f"--resnet_depth={c.resnet_depth}",
          f"--width_multiplier={c.width_multiplier}",
          f"--sk_ratio={c.sk_ratio}", f"--se_ratio={c.se_ratio}",
          f"--image_size={size}", f"--proj_out_dim={c.proj_out_dim}",
          f"--num_proj_layers={c.num_proj_layers}"]


_TRAIN_FLAGS = [f for f in TINY_FLAGS
                if not f.startswith(("--resnet_depth", "--image_size",
                                     "--proj_out_dim", "--train_steps",
                                     "--train_batch_size"))]


@pytest.mark.official
@pytest.mark.parametrize("fixture_id", sorted(FIXTURES))
def test_imported_fixture_finetunes_and_distills_two_steps(imported, tmp_path,
                                                           fixture_id):
  out, _, _, _ = imported(fixture_id)
  arch = _arch_flags(out)
  common = [*_TRAIN_FLAGS, *arch, "--train_steps=2", "--train_batch_size=8",
            "--mode=train"]
  ft = run_cli("--train_mode=finetune", f"--init_from={out}",
               "--label_fraction=0.1", f"--model_dir={tmp_path / 'ft'}",
               "--optimizer=momentum", "--learning_rate=0.01", *common)
  assert ft.returncode == 0, ft.stderr[-3000:]
  assert "global_step" in (tmp_path / "ft" / "result.json").read_text()
  data = _unlabeled_folder(tmp_path)
  dist = run_cli("--train_mode=distill", f"--teacher={out}",
                 f"--init_from={out}", "--dataset=image_folder",
                 f"--data_dir={data}", f"--model_dir={tmp_path / 'dist'}",
                 *common)
  assert dist.returncode == 0, dist.stderr[-3000:]
  assert (tmp_path / "dist" / "saved_model" / "saved_model.pb").exists()
  if load.read_meta(out).model_config.num_classes == 10:
    # The CIFAR fixture's own head evaluated as it is on the bundled sample.
    ev = run_cli("--mode=eval", "--train_mode=finetune", f"--init_from={out}",
                 f"--model_dir={tmp_path / 'eval'}", *_TRAIN_FLAGS, *arch)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "result.json").read_text())
    assert 0.0 <= result["top1"] <= 100.0 and result["top5"] >= result["top1"]


def test_source_may_be_a_prefix_a_file_of_it_or_a_folder(tmp_path):
  model = _random_model(R18_SE, 32, seed=12)
  folder = tmp_path / "release"
  older = write_checkpoint(str(folder / "ckpt-9"), tf2_tensors(model))
  latest = write_checkpoint(str(folder / "ckpt-10"), tf2_tensors(model))
  # No 'checkpoint' state file: the folder's highest step (10, not "9" > "1").
  assert official.resolve_source(str(folder)) == ("checkpoint", latest)
  assert official.resolve_source(older + ".index") == ("checkpoint", older)
  assert official.resolve_source(
      latest + ".data-00000-of-00001") == ("checkpoint", latest)
  assert official.read(str(folder)).form == "tf2_checkpoint"


def test_the_python_api_imports_and_loads_exactly(tmp_path):
  model = _random_model(R18_SE, 32, seed=2)
  prefix = write_checkpoint(str(tmp_path / "ckpt" / "ckpt-5"),
                            _with_training_state_tf2(tf2_tensors(model)))
  path = simclr_tf.import_official(prefix, str(tmp_path / "out"),
                                   image_size=32)
  loaded = simclr_tf.load_export(path)
  images = np.random.default_rng(1).uniform(
      size=(2, 32, 32, 3)).astype(np.float32)
  ours = model(images, training=False)
  theirs = loaded(images, training=False)
  for key in ("final_avg_pool", "proj_head_output", "logits_sup"):
    assert _max_rel_err(theirs[key].numpy(), ours[key].numpy()) < 1e-5, key
  with pytest.raises(ValueError, match="holds no checkpoint") as err:
    simclr_tf.import_official(_no_checkpoint(tmp_path), str(tmp_path / "o2"))
  assert "--" not in str(err.value)
