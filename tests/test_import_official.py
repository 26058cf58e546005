"""The official-checkpoint importer (tf_hub_export.import_official).

Two kinds of cases:
* synthetic checkpoints, written here with the official key layouts (TF1
  names numbered in creation order, TF2 attribute paths, a TF1 `.meta` graph
  with the official node names), from a model of ours with random weights:
  the import must give back that model's outputs. They run everywhere.
* the fixtures of ../shared/official_simclr, written by the official code
  itself, with the official model's outputs on fixed images: the import must
  reproduce them to 1e-4 (relative max error). Skipped without ../shared.

Damaged files, bad flags and failed writes run the command line as a user
does and check its promise: the documented exit status, one line naming the
problem and the fix as the last line of stderr, and every file that was
there before byte-identical (digests), with no staging folder left behind.
"""

import contextlib
import dataclasses
import errno
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import simclr_tf
from conftest import ROOT, TINY_FLAGS, run_cli, snapshot
from simclr_tf.config import ModelConfig
from simclr_tf.models.simclr import build_float32
from tensorflow.core.framework import node_def_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tf_hub_export import import_official, load, official, official_arch

SHARED_OFFICIAL = os.path.join(ROOT, "..", "shared", "official_simclr")
SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
REFERENCE_TOLERANCE = 1e-4

# One process runs this file's tests, so that its module fixtures (the
# synthetic checkpoints, their import) run once (`make test` distributes by
# xdist_group).
pytestmark = pytest.mark.xdist_group(__name__)


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
  """Through the Python API: the SavedModel (and the Keras model that
  `load_export` rebuilds from it) gives the written model's outputs."""
  model = _random_model(config, image_size, seed=1)
  if layout == "tf1":
    tensors = _with_training_state_tf1(tf1_tensors(model))
    prefix = write_checkpoint(str(tmp_path / "ckpt" / "model.ckpt-1234"),
                              tensors)
  else:
    tensors = _with_training_state_tf2(tf2_tensors(model))
    prefix = write_checkpoint(str(tmp_path / "ckpt" / "ckpt-77"), tensors)
  path = simclr_tf.import_official(prefix, str(tmp_path / "out"),
                                   image_size=image_size)
  assert path == str(tmp_path / "out")
  meta = load.read_meta(path)
  for name in ("resnet_depth", "width_multiplier", "sk_ratio", "se_ratio",
               "cifar_stem", "proj_head_mode", "num_proj_layers",
               "proj_out_dim", "num_classes"):
    assert getattr(meta.model_config, name) == getattr(config, name), name
  assert meta.global_step == (1234 if layout == "tf1" else 77)
  assert meta.train_mode == f"import:{layout}_checkpoint"
  images = np.random.default_rng(0).uniform(
      size=(3, image_size, image_size, 3)).astype(np.float32)
  ours = {k: v.numpy() for k, v in model(images, training=False).items()}
  loaded = {"SavedModel": _outputs(path, images)}
  if layout == "tf2":   # (load_export reads the export, whatever the source)
    loaded["load_export"] = {k: v.numpy() for k, v in simclr_tf.load_export(
        path)(images, training=False).items()}
  for source, theirs in loaded.items():
    for key in ("final_avg_pool", "proj_head_output", "logits_sup"):
      assert _max_rel_err(theirs[key], ours[key]) < 1e-5, (source, key)


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


@pytest.fixture(scope="module")
def cli_import(tmp_path_factory, synthetic):
  """`import_official.main` on the synthetic TF2 checkpoint with one
  optimizer slot damaged (a slot the import does not need): (export folder,
  the checkpoint's copy, the damaged slot's key, what main printed)."""
  root = tmp_path_factory.mktemp("cli_import")
  folder = _copy(synthetic, "tf2", root)
  damaged = synthetic["slots"][2]
  _flip_inside(folder / "ckpt-7.data-00000-of-00001",
               synthetic["tf2"][damaged])
  out = root / "out"
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    status = import_official.main([str(folder), f"--output={out}"])
  assert status == 0
  return out, folder, damaged, printed.getvalue()


def test_architecture_flags_printed_match_the_export(cli_import, synthetic):
  out, _, _, printed = cli_import
  assert "--resnet_depth=18 --width_multiplier=0.25" in printed
  assert "--se_ratio=0.25" in printed
  # No graph, and projection outputs 0, 1 and 2 all have the head's width:
  # the summary says 0 was assumed, the run flags carry it (run.py's own
  # default is 1).
  summary, use = printed.strip().splitlines()[-2:]
  assert "ft_proj_selector=0 ASSUMED" in summary, summary
  assert "--ft_proj_selector decides it" in summary
  assert use.startswith("Use it with:") and use.endswith(
      "--ft_proj_selector=0"), use
  # Fine-tunable under Keras 3 like any export of ours.
  layer = keras.layers.TFSMLayer(str(out), call_endpoint="serve",
                                 call_training_endpoint="train",
                                 trainable=True)
  images = tf.random.uniform([2, 32, 32, 3], seed=1)
  with tf.GradientTape() as tape:
    outputs = layer(images, training=True)
    loss = (tf.reduce_sum(outputs["logits_sup"] ** 2) +
            tf.reduce_sum(outputs["proj_head_output"] ** 2))
  grads = tape.gradient(loss, layer.trainable_weights)
  assert len(grads) == len(synthetic["model"].trainable_variables)
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


# === Damaged files, bad flags, failed writes: the command line's promise =====

STEP = 81985529216486895          # 0x0123456789abcdef: bytes found nowhere else


def _digest(root) -> dict:
  """sha256 of every file under `root`, and '<dir>' of every folder."""
  return snapshot(root, dirs=True)


def _import_cli(*args, timeout=300):
  """`python -m tf_hub_export.import_official ARGS`, as a user runs it (the
  module itself quiets TensorFlow's C++ log)."""
  env = dict(os.environ)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  return subprocess.run(
      [sys.executable, "-m", "tf_hub_export.import_official",
       *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env,
      timeout=timeout)


def _last_line(text: str) -> str:
  lines = [l for l in text.splitlines() if l.strip()]
  return lines[-1] if lines else ""


def _assert_refused(proc, status, words, root, before, out):
  """Exit `status`, our one line last on stderr, nothing changed under
  `root`, no output and no staging folder beside it."""
  last = _last_line(proc.stderr)
  print(f"exit {proc.returncode}: {last}")     # shown with pytest -s
  assert proc.returncode == status, proc.stderr[-3000:]
  assert last.startswith("import_official: error: "), proc.stderr[-3000:]
  assert [l for l in proc.stderr.splitlines()
          if "import_official: error" in l] == [last]
  for word in words:
    assert word in last, last
  assert _digest(root) == before
  assert not os.path.exists(out)
  assert not glob.glob(os.path.join(glob.escape(os.path.dirname(out)),
                                    f".{os.path.basename(out)}.tmp-*"))


def _flip_inside(path, array, at=None):
  """Flips one byte (default: the middle one) inside the stored bytes of
  `array` in file `path`."""
  with open(path, "rb") as f:
    data = bytearray(f.read())
  pattern = np.ascontiguousarray(array).tobytes()
  assert data.count(pattern) == 1, "the tensor's bytes are not unique"
  data[data.find(pattern) + (len(pattern) // 2 if at is None else at)] ^= 0xFF
  with open(path, "wb") as f:
    f.write(data)


def _truncate(path, keep=0.5):
  with open(path, "r+b") as f:
    f.truncate(int(os.path.getsize(path) * keep))


def _distinct_slots_tf2(tensors, count=5, seed=0):
  """TF2 training state whose optimizer slots hold values found nowhere
  else (so a test can damage exactly one of them)."""
  out = dict(tensors)
  out["global_step" + SUFFIX] = np.int64(77)
  out["save_counter" + SUFFIX] = np.int64(1)
  out["optimizer/iter" + SUFFIX] = np.int64(77)
  rng = np.random.default_rng(seed)
  kernels = [k for k in sorted(tensors) if k.endswith("/kernel" + SUFFIX)]
  slots = []
  for key in kernels[:count]:
    slot = key.replace(SUFFIX, "/.OPTIMIZER_SLOT/optimizer/Momentum" + SUFFIX)
    out[slot] = rng.normal(size=tensors[key].shape).astype(np.float32) + 7
    slots.append(slot)
  return out, slots


def tf1_meta_graph(num_proj_layers: int, selector: int) -> bytes:
  """A TF1 `model.ckpt-N.meta` whose head_supervised reads projection output
  `selector`, with the node names of the official TF1 code (`model_util.
  projection_head` / `supervised_head`; a tf.layers.dense is `dense/MatMul`,
  the middle layers' ReLU is `head_contrastive/Relu[_j]`), and the gradient
  MatMuls a training graph holds."""
  nodes = []

  def node(name, op, *inputs):
    nodes.append(node_def_pb2.NodeDef(name=name, op=op, input=list(inputs)))
    return name

  hiddens = [node("base_model/final_avg_pool", "Identity",
                  node("base_model/Mean", "Mean", "base_model/block_group4"))]
  node("base_model/block_group4", "Placeholder")
  for j in range(num_proj_layers):
    scope = f"head_contrastive/nl_{j}"
    kernel = node(f"{scope}/dense/kernel/read", "Identity",
                  node(f"{scope}/dense/kernel", "VariableV2"))
    x = node(f"{scope}/dense/MatMul", "MatMul", hiddens[-1], kernel)
    x = node(f"{scope}/batch_normalization/FusedBatchNormV3",
             "FusedBatchNormV3", x)
    x = node(f"{scope}/{f'nl_{j}'}_out", "Identity", x)
    if j != num_proj_layers - 1:
      x = node("head_contrastive/Relu" + (f"_{j}" if j else ""), "Relu", x)
    hiddens.append(x)
  kernel = node("head_supervised/linear_layer/dense/kernel/read", "Identity",
                node("head_supervised/linear_layer/dense/kernel",
                     "VariableV2"))
  logits = node("head_supervised/linear_layer/dense/MatMul", "MatMul",
                hiddens[selector], kernel)
  node("gradients/head_supervised/linear_layer/dense/MatMul_grad/MatMul",
       "MatMul", "gradients/fill", kernel, "^" + logits)
  node("gradients/head_contrastive/nl_0/dense/MatMul_grad/MatMul", "MatMul",
       "gradients/fill", hiddens[0])
  meta = meta_graph_pb2.MetaGraphDef()
  meta.graph_def.node.extend(nodes)
  return meta.SerializeToString()


def _tiny_saved_model(folder):
  """A SavedModel that is not SimCLR (its saved_model.pb gets damaged)."""
  module = tf.Module()
  module.v = tf.Variable(np.arange(6, dtype=np.float32))
  tf.saved_model.save(module, str(folder))
  return str(folder)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  """One R18 model written as a TF1 checkpoint (with global_step and
  Momentum slots), a TF2 training checkpoint (distinct optimizer slots), and
  a TF1 checkpoint of a model whose head reads projection layer 1 with the
  `.meta` graph saying so. Cases copy what they damage."""
  root = tmp_path_factory.mktemp("synthetic")
  model = _random_model(R18_SE, 32, seed=20)
  tf1 = _with_training_state_tf1(tf1_tensors(model))
  tf1["global_step"] = np.int64(STEP)
  write_checkpoint(str(root / "tf1" / "model.ckpt-7"), tf1)
  tf2, slots = _distinct_slots_tf2(tf2_tensors(model))
  write_checkpoint(str(root / "tf2" / "ckpt-7"), tf2)
  sel1 = _random_model(dataclasses.replace(R18_SE, sup_head_input=1), 32,
                       seed=21)
  write_checkpoint(str(root / "tf1_sel1" / "model.ckpt-9"),
                   _with_training_state_tf1(tf1_tensors(sel1)))
  (root / "tf1_sel1" / "model.ckpt-9.meta").write_bytes(
      tf1_meta_graph(R18_SE.num_proj_layers, selector=1))
  _tiny_saved_model(root / "not_simclr_saved_model")
  return {"root": root, "model": model, "tf1": tf1, "tf2": tf2,
          "slots": slots, "sel1": sel1}


def _copy(synthetic, name, src_root):
  shutil.copytree(synthetic["root"] / name, src_root / name)
  return src_root / name


def _case_tf1_global_step_damaged(src, syn):
  folder = _copy(syn, "tf1", src)
  _flip_inside(folder / "model.ckpt-7.data-00000-of-00001",
               np.int64(STEP), at=3)
  return [folder / "model.ckpt-7"]


def _case_tf1_data_truncated(src, syn):
  folder = _copy(syn, "tf1", src)
  _truncate(folder / "model.ckpt-7.data-00000-of-00001")
  return [folder / "model.ckpt-7"]


def _case_tf1_kernel_bit_flipped(src, syn):
  folder = _copy(syn, "tf1", src)
  _flip_inside(folder / "model.ckpt-7.data-00000-of-00001",
               syn["tf1"]["base_model/conv2d_5/kernel"])
  return [folder / "model.ckpt-7"]


def _case_tf1_index_deleted(src, syn):
  folder = _copy(syn, "tf1", src)
  os.remove(folder / "model.ckpt-7.index")
  return [folder / "model.ckpt-7"]


def _case_tf1_index_truncated(src, syn):
  folder = _copy(syn, "tf1", src)
  _truncate(folder / "model.ckpt-7.index")
  return [folder]


def _case_tf1_meta_truncated(src, syn):
  folder = _copy(syn, "tf1_sel1", src)
  _truncate(folder / "model.ckpt-9.meta", keep=0.6)
  return [folder / "model.ckpt-9"]


def _case_tf2_data_truncated(src, syn):
  folder = _copy(syn, "tf2", src)
  _truncate(folder / "ckpt-7.data-00000-of-00001", keep=0.3)
  return [folder / "ckpt-7"]


def _case_tf2_kernel_bit_flipped(src, syn):
  folder = _copy(syn, "tf2", src)
  key = ("model/supervised_head/linear_layer/dense/kernel" + SUFFIX)
  _flip_inside(folder / "ckpt-7.data-00000-of-00001", syn["tf2"][key])
  return [folder]


def _case_saved_model_pb_truncated(src, syn):
  folder = _copy(syn, "not_simclr_saved_model", src)
  _truncate(folder / "saved_model.pb")
  return [folder]


def _case_class_names_not_utf8(src, syn):
  names = src / "names.txt"
  names.write_bytes("chat\nb\xe9te\n".encode("latin-1"))
  return [_copy(syn, "tf1", src), f"--class_names={names}"]


def _case_class_names_missing(src, syn):
  return [_copy(syn, "tf1", src), f"--class_names={src / 'nope.txt'}"]


def _case_class_names_wrong_count(src, syn):
  names = src / "names.txt"
  names.write_text("cat\ndog\nbird\n", encoding="utf-8")
  return [_copy(syn, "tf1", src), f"--class_names={names}"]


def _image_size(value):
  return lambda src, syn: [_copy(syn, "tf1", src), f"--image_size={value}"]


def _selector(value, name="tf1_sel1"):
  return lambda src, syn: [_copy(syn, name, src),
                           f"--ft_proj_selector={value}"]


DAMAGED = {
    # case: (make SRC and flags, exit status, words the last line must hold)
    "tf1_global_step_damaged": (_case_tf1_global_step_damaged, 2,
                                ("model.ckpt-7.data-00000-of-00001",
                                 "'global_step'", "download")),
    "tf1_data_truncated": (_case_tf1_data_truncated, 2,
                           ("model.ckpt-7.data-00000-of-00001 is truncated "
                            "or damaged", "download")),
    "tf1_kernel_bit_flipped": (_case_tf1_kernel_bit_flipped, 2,
                               ("'base_model/conv2d_5/kernel'",
                                "Checksum does not match", "download")),
    "tf1_index_deleted": (_case_tf1_index_deleted, 2,
                          ("no ", "model.ckpt-7.index", "copy the whole")),
    "tf1_index_truncated": (_case_tf1_index_truncated, 2,
                            ("cannot open checkpoint", ".index")),
    "tf1_meta_truncated": (_case_tf1_meta_truncated, 2,
                           ("model.ckpt-9.meta is truncated or damaged",
                            "--ft_proj_selector")),
    "tf2_data_truncated": (_case_tf2_data_truncated, 2,
                           ("ckpt-7.data-00000-of-00001 is truncated or "
                            "damaged", "download")),
    "tf2_kernel_bit_flipped": (_case_tf2_kernel_bit_flipped, 2,
                               ("supervised_head/linear_layer/dense/kernel",
                                "Checksum does not match")),
    "saved_model_pb_truncated": (_case_saved_model_pb_truncated, 2,
                                 ("saved_model.pb is truncated or damaged",
                                  "copy the whole folder again")),
    "class_names_not_utf8": (_case_class_names_not_utf8, 2,
                             ("names.txt", "not UTF-8 text", "0xe9",
                              "one class name per line")),
    "class_names_missing": (_case_class_names_missing, 2,
                            ("nope.txt", "cannot be read", "UTF-8")),
    "class_names_wrong_count": (_case_class_names_wrong_count, 2,
                                ("lists 3 names", "7 classes",
                                 "one name per class")),
    "image_size_negative": (_image_size(-5), 2,
                            ("--image_size=-5", "use 8 to 1024")),
    "image_size_zero": (_image_size(0), 2, ("--image_size=0", "8 to 1024")),
    "image_size_huge": (_image_size(100000), 2,
                        ("--image_size=100000", "8 to 1024")),
    "image_size_too_big_for_the_cifar_stem": (
        _image_size(64), 2, ("--image_size=64", "CIFAR stem", "8 to 32")),
    "selector_negative": (_selector(-1), 2, ("--ft_proj_selector=-1",)),
    "selector_out_of_range": (_selector(4, "tf1"), 2,
                              ("--ft_proj_selector=4", "0 (encoder output) "
                               "to 3")),
    "selector_contradicts_the_graph": (
        _selector(0), 2, ("--ft_proj_selector=0 contradicts",
                          "model.ckpt-9.meta", "projection output 1",
                          "--ft_proj_selector=1")),
}


def _damaged_case(tmp_path, synthetic, case):
  """(arguments, output, digests before, exit status, words) of a case."""
  make, status, words = DAMAGED[case]
  src = tmp_path / "src"
  src.mkdir()
  args = make(src, synthetic)
  return args, tmp_path / "out", _digest(tmp_path), status, words


# Also run as a separate process (slow): the error is the last line of the
# process's stderr, after whatever TensorFlow logs.
CLI_CASES = ("tf1_data_truncated", "saved_model_pb_truncated",
             "selector_contradicts_the_graph", "class_names_not_utf8")


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_input_or_bad_flag_exits_2_and_changes_nothing(
    tmp_path, synthetic, case, capsys):
  """`main` in this process: its exit status and stderr, as run by a user."""
  # pylint: disable=g-import-not-at-top
  from tf_hub_export import import_official as importer
  args, out, before, status, words = _damaged_case(tmp_path, synthetic, case)
  capsys.readouterr()
  code = importer.main([*map(str, args), f"--output={out}"])
  proc = subprocess.CompletedProcess([], code, "", capsys.readouterr().err)
  _assert_refused(proc, status, words, tmp_path, before, str(out))


@pytest.mark.slow
@pytest.mark.parametrize("case", CLI_CASES)
def test_damaged_input_or_bad_flag_in_a_process_is_one_last_line(
    tmp_path, synthetic, case):
  args, out, before, status, words = _damaged_case(tmp_path, synthetic, case)
  proc = _import_cli(*args, f"--output={out}")
  _assert_refused(proc, status, words, tmp_path, before, str(out))


def test_bad_flags_fail_before_tensorflow_is_imported(tmp_path, synthetic):
  src = _copy(synthetic, "tf1", tmp_path)
  code = ("import sys; from tf_hub_export import import_official as m; "
          "s = m.main(sys.argv[1:]); "
          "print('tensorflow' in sys.modules, file=sys.stderr); "
          "sys.exit(s)")
  proc = subprocess.run(
      [sys.executable, "-c", code, str(src), f"--output={tmp_path / 'o'}",
       "--image_size=-5"], capture_output=True, text=True, cwd=ROOT,
      timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.splitlines()[-2].startswith("import_official: error:")
  assert proc.stderr.splitlines()[-1] == "False"


def test_unneeded_optimizer_slots_damaged_import_and_are_reported(
    cli_import, synthetic):
  out, folder, damaged, printed = cli_import
  summary = printed.splitlines()[0]
  assert ("; 1 optimizer-slot tensor unreadable and not needed: skipped"
          in summary), summary
  images = np.random.default_rng(3).uniform(size=(2, 32, 32, 3)).astype(
      np.float32)
  want = synthetic["model"](images, training=False)
  got = _outputs(str(out), images)
  for key in ("final_avg_pool", "proj_head_output", "logits_sup"):
    assert _max_rel_err(got[key], want[key].numpy()) < 1e-5, key
  # The damage is real: the slot cannot be read.
  with pytest.raises(tf.errors.OpError, match="Checksum"):
    tf.train.load_checkpoint(str(folder / "ckpt-7")).get_tensor(damaged)


def test_tf1_meta_graph_decides_the_selector(tmp_path, synthetic, capsys):
  folder = _copy(synthetic, "tf1_sel1", tmp_path)
  out = tmp_path / "out"
  assert import_official.main([str(folder), f"--output={out}"]) == 0
  summary, use = capsys.readouterr().out.strip().splitlines()[-2:]
  assert (f"ft_proj_selector=1 read from the graph of "
          f"{folder / 'model.ckpt-9.meta'}") in summary, summary
  assert use.endswith("--ft_proj_selector=1"), use
  assert load.read_meta(str(out)).model_config.sup_head_input == 1
  images = np.random.default_rng(4).uniform(size=(2, 32, 32, 3)).astype(
      np.float32)
  want = synthetic["sel1"](images, training=False)["logits_sup"].numpy()
  got = _outputs(str(out), images)["logits_sup"]
  assert _max_rel_err(got, want) < 1e-5
  # The same weights read from the encoder output: what an import that
  # ignored the graph would have exported, exit 0.
  wrong = dataclasses.replace(synthetic["sel1"].model_config,
                              sup_head_input=0)
  blind = build_float32(wrong, 32)
  for a, b in zip(blind.variables, synthetic["sel1"].variables):
    a.assign(b)
  err = _max_rel_err(blind(images, training=False)["logits_sup"], want)
  print(f"TF1 .meta selector 1: max rel err {_max_rel_err(got, want):.1e} "
        f"read from the graph, {err:.2f} if read as 0")
  assert err > 0.1


def test_selector_given_and_agreeing_with_the_graph_is_accepted(
    tmp_path, synthetic):
  weights = official.read(str(_copy(synthetic, "tf1_sel1", tmp_path)))
  assert weights.graph_selector == 1
  config, head = official.read_architecture(weights, ft_proj_selector=1)
  assert config.sup_head_input == 1 and head.how == "graph"


def test_tf1_hub_module_graph_is_read_and_must_parse(tmp_path, synthetic):
  hub = tmp_path / "release" / "hub"
  (hub / "variables").mkdir(parents=True)
  write_checkpoint(str(hub / "variables" / "variables"),
                   tf1_tensors(synthetic["sel1"]))
  (hub / "tfhub_module.pb").write_bytes(b"")
  saved = saved_model_pb2.SavedModel()
  for tags, selector in (([], 2), (["train"], 2)):
    meta = saved.meta_graphs.add()
    meta.ParseFromString(tf1_meta_graph(3, selector))
    meta.meta_info_def.tags.extend(tags)
  (hub / "saved_model.pb").write_bytes(saved.SerializeToString())
  weights = official.read(str(tmp_path / "release"))
  assert weights.form == "tf1_hub"
  assert (weights.graph_selector, weights.graph_file) == (
      2, str(hub / "saved_model.pb"))
  _truncate(hub / "saved_model.pb")
  with pytest.raises(official.OfficialFormatError,
                     match="saved_model.pb is truncated or damaged"):
    official.read(str(tmp_path / "release"))


def test_selector_from_graph_counts_the_projection_layers_upstream():
  for selector in range(4):
    meta = meta_graph_pb2.MetaGraphDef.FromString(tf1_meta_graph(3, selector))
    assert official_arch.selector_from_graph([meta.graph_def.node]) == (
        selector)
  # A graph without a supervised head (the TF1 pretraining graph) says
  # nothing; neither does one whose head input comes out of a function call.
  assert official_arch.selector_from_graph([[]]) is None
  call = [node_def_pb2.NodeDef(name="x", op="StatefulPartitionedCall"),
          node_def_pb2.NodeDef(name="head_supervised/linear_layer/dense/MatMul",
                               op="MatMul", input=["x", "k"])]
  assert official_arch.selector_from_graph([call]) is None
  # Heads that disagree (an online and an EMA copy, say) are refused.
  one = meta_graph_pb2.MetaGraphDef.FromString(tf1_meta_graph(3, 1))
  two = meta_graph_pb2.MetaGraphDef.FromString(tf1_meta_graph(3, 2))
  with pytest.raises(official.OfficialFormatError, match="at once"):
    official_arch.selector_from_graph([one.graph_def.node,
                                       two.graph_def.node])


def test_head_input_choice_without_a_graph():
  widths = [128, 128, 128, 16]
  assumed = official_arch.choose_head_input(widths, 128, None, None)
  assert (assumed.selector, assumed.how, assumed.allowed) == (
      0, "assumed", (0, 1, 2))
  assert "ASSUMED" in assumed.describe()
  only = official_arch.choose_head_input(widths, 16, None, None)
  assert (only.selector, only.how) == (3, "width")
  with pytest.raises(official.OfficialFormatError, match="has 16"):
    official_arch.choose_head_input(widths, 128, 3, None)
  with pytest.raises(official.OfficialFormatError, match="different models"):
    official_arch.choose_head_input(widths, 16, None, 1, "g.pb")
  assert official_arch.choose_head_input(widths, None, 2, None).how == (
      "no head")


# --- Failed writes: exit 3 ----------------------------------------------------

def test_no_space_left_exits_3_and_leaves_nothing(tmp_path, synthetic,
                                                  monkeypatch, capsys):
  src = _copy(synthetic, "tf1", tmp_path)
  (tmp_path / "keep.txt").write_text("mine")
  out = tmp_path / "out"
  before = _digest(tmp_path)

  def full_disk(obj, export_dir, **kwargs):
    os.makedirs(export_dir, exist_ok=True)
    with open(os.path.join(export_dir, "saved_model.pb"), "wb") as f:
      f.write(b"half")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(tf.saved_model, "save", full_disk)
  capsys.readouterr()
  status = import_official.main([str(src), f"--output={out}"])
  err = capsys.readouterr().err
  assert status == import_official.EXIT_WRITE_FAILED == 3
  last = _last_line(err)
  assert last.startswith("import_official: error: cannot write --output=")
  assert "No space left on device" in last and "free some space" in last
  assert _digest(tmp_path) == before
  assert not out.exists()
  assert not glob.glob(str(tmp_path / ".out.tmp-*"))


@contextlib.contextmanager
def _small_tmpfs(folder, size):
  """A tmpfs of `size` mounted on `folder` (root only; skips otherwise)."""
  folder.mkdir()
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root")
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}",
                         "tmpfs", str(folder)], capture_output=True)
  if proc.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {proc.stderr[-200:]!r}")
  try:
    yield folder
  finally:
    subprocess.run(["umount", "-l", str(folder)], check=False)


# Slow: a whole import into a real, small file system (about 12 s); the
# same refusal on an injected "No space left" is in the default suite above.
@pytest.mark.slow
def test_full_disk_exits_3_and_leaves_nothing(tmp_path, synthetic):
  src = _copy(synthetic, "tf1", tmp_path / "src_parent")
  with _small_tmpfs(tmp_path / "disk", "256k") as disk:
    (disk / "keep.txt").write_text("mine")
    out = disk / "imported"
    before = _digest(tmp_path)
    proc = _import_cli(src, f"--output={out}")
    _assert_refused(proc, 3, (f"cannot write --output='{out}' (No space "
                              "left on device)", "free some space"),
                    tmp_path, before, str(out))


@pytest.mark.slow
def test_a_killed_import_leaves_no_staging_after_the_next_import(
    tmp_path, synthetic):
  """SIGKILL while the export is staged: the output does not exist, and the
  next import to it removes the staging folder the kill left behind."""
  src = _copy(synthetic, "tf1", tmp_path / "src_parent")
  out = tmp_path / "outputs" / "imported"
  out.parent.mkdir()
  env = dict(os.environ)
  proc = subprocess.Popen(
      [sys.executable, "-m", "tf_hub_export.import_official", str(src),
       f"--output={out}"], stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
  staged = []
  deadline = time.time() + 300
  while not staged and proc.poll() is None and time.time() < deadline:
    staged = [n for n in os.listdir(out.parent) if n.startswith(".imported")
              and os.listdir(out.parent / n)]
    time.sleep(0.005)
  proc.kill()
  proc.wait()
  if not staged:
    pytest.skip("the import finished before it could be killed")
  leftovers = [n for n in os.listdir(out.parent) if n.startswith(".")]
  assert leftovers and not out.exists()
  proc = _import_cli(src, f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert sorted(os.listdir(out.parent)) == ["imported"]


def test_unwritable_output_folder_exits_3_and_leaves_nothing(tmp_path,
                                                            synthetic):
  src = _copy(synthetic, "tf1", tmp_path / "src_parent")
  parent = tmp_path / "locked"
  with contextlib.ExitStack() as stack:
    if os.geteuid() == 0:       # root writes through permissions
      stack.enter_context(_small_tmpfs(parent, "1m"))
      (parent / "keep.txt").write_text("mine")
      remount = subprocess.run(["mount", "-o", "remount,ro", str(parent)],
                               capture_output=True)
      if remount.returncode:
        pytest.skip("cannot remount the tmpfs read-only")
    else:
      parent.mkdir()
      (parent / "keep.txt").write_text("mine")
      parent.chmod(0o555)
      stack.callback(parent.chmod, 0o755)
    out = parent / "imported"
    before = _digest(tmp_path)
    proc = _import_cli(src, f"--output={out}")
    _assert_refused(proc, 3, (f"cannot write --output='{out}'",
                              "choose a writable folder"), tmp_path, before,
                    str(out))


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
                if not f.startswith(("--resnet_depth", "--width_multiplier",
                                     "--image_size", "--proj_out_dim",
                                     "--train_steps",
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


def test_the_python_api_refuses_a_folder_without_a_checkpoint(tmp_path):
  # (The API's successful imports: test_synthetic_checkpoint_imports_exactly.)
  with pytest.raises(ValueError, match="holds no checkpoint") as err:
    simclr_tf.import_official(_no_checkpoint(tmp_path), str(tmp_path / "o2"))
  assert "--" not in str(err.value)
  assert not (tmp_path / "o2").exists()


# --- The official graph decides the selector; damaged official files --------

def rewire_official_head(saved_model_dir, out_dir, selector):
  """A copy of an official TF2 SavedModel whose head_supervised reads
  projection output `selector`, as tf2/run.py writes one with
  --ft_proj_selector=selector: the `ProjectionHead` returns
  `hiddens_list[selector]` (`projection_head/Relu` is layer 1's output,
  `Relu_1` layer 2's), which the model passes through `tf.stop_gradient`
  to the supervised head. Only that one edge of each traced `__call__`
  changes; the weights are the same."""
  shutil.copytree(saved_model_dir, out_dir)
  path = os.path.join(out_dir, "saved_model.pb")
  saved = saved_model_pb2.SavedModel()
  with open(path, "rb") as f:
    saved.ParseFromString(f.read())
  relu = "projection_head/Relu" + (f"_{selector - 1}" if selector > 1 else "")
  changed = 0
  for function in saved.meta_graphs[0].graph_def.library.function:
    for node in function.node_def:
      if node.op == "StopGradient" and list(node.input) == [
          "projection_head/proj_head_input:output:0"]:
        node.input[0] = f"{relu}:activations:0"
        changed += 1
  assert changed == 2, changed     # the trainable=True and False traces
  with open(path, "wb") as f:
    f.write(saved.SerializeToString())
  return str(out_dir)


@pytest.mark.official
def test_official_graph_says_which_output_feeds_the_head(official_dir,
                                                         tmp_path):
  r18 = _unpack(official_dir, "tf2_r18_cifar")
  graph = str(r18 / "saved_model" / "saved_model.pb")
  for src in (r18 / "saved_model", r18 / "checkpoint"):
    weights = official.read(str(src))
    assert (weights.graph_selector, weights.graph_file) == (0, graph), src
  r50 = official.read(str(_unpack(official_dir, "tf2_r50_sk1_64px")))
  assert r50.graph_selector == 0
  tf1 = official.read(str(_unpack(official_dir, "tf1_r50_sk1_ema")))
  _, head = official.read_architecture(tf1)
  assert tf1.graph_selector is None and head.how == "assumed"
  for selector in (1, 2):
    rewired = rewire_official_head(r18 / "saved_model",
                                   tmp_path / f"sel{selector}", selector)
    assert official.read(rewired).graph_selector == selector


@pytest.mark.official
@pytest.mark.slow
def test_official_saved_model_with_selector_1_imports_exactly(
    official_dir, imported, tmp_path, capsys):
  r18 = _unpack(official_dir, "tf2_r18_cifar")
  reference = dict(np.load(r18 / "reference.npz"))
  rewired = rewire_official_head(r18 / "saved_model", tmp_path / "src" /
                                 "saved_model", 1)
  # The official model's own outputs: its SavedModel, called as the
  # official README does.
  want = tf.saved_model.load(rewired)(
      tf.constant(reference["images"]), trainable=False)["logits_sup"].numpy()

  before = _digest(tmp_path)
  out = tmp_path / "out"
  refused = _import_cli(rewired, f"--output={out}", "--ft_proj_selector=0")
  _assert_refused(refused, 2, ("--ft_proj_selector=0 contradicts",
                               "projection output 1"), tmp_path, before,
                  str(out))

  assert import_official.main([rewired, f"--output={out}"]) == 0
  summary, use = capsys.readouterr().out.strip().splitlines()[-2:]
  assert "ft_proj_selector=1 read from the graph of" in summary, summary
  assert use.endswith("--ft_proj_selector=1"), use
  got = _outputs(str(out), reference["images"])["logits_sup"]
  # What an import blind to the graph exports: the same weights, the head
  # on the encoder output (the selector-0 import of the same fixture).
  blind = _outputs(imported("tf2_r18_cifar_saved_model")[0],
                   reference["images"])["logits_sup"]
  err, blind_err = _max_rel_err(got, want), _max_rel_err(blind, want)
  print(f"official SavedModel, ft_proj_selector=1: logits_sup max rel err "
        f"{err:.1e} read from the graph, {blind_err:.2f} if read as 0")
  assert err < REFERENCE_TOLERANCE
  assert blind_err > 0.5


def _official_pb_truncated(r18, src):
  folder = shutil.copytree(r18 / "saved_model", src / "saved_model")
  _truncate(folder / "saved_model.pb")
  return folder


def _official_variables_bit_flipped(r18, src):
  folder = shutil.copytree(r18 / "saved_model", src / "saved_model")
  reader = tf.train.load_checkpoint(str(folder / "variables" / "variables"))
  key = next(k for k, s in reader.get_variable_to_shape_map().items()
             if s == [512, 10])            # head_supervised's kernel
  _flip_inside(folder / "variables" / "variables.data-00000-of-00001",
               reader.get_tensor(key))
  return folder


def _official_variables_index_deleted(r18, src):
  folder = shutil.copytree(r18 / "saved_model", src / "saved_model")
  os.remove(folder / "variables" / "variables.index")
  return folder


OFFICIAL_DAMAGED = {
    "saved_model_pb_truncated": (_official_pb_truncated,
                                 ("saved_model.pb is truncated or damaged",)),
    "variables_bit_flipped": (_official_variables_bit_flipped,
                              ("variables.data-00000-of-00001 is truncated "
                               "or damaged", "Checksum does not match")),
    "variables_index_deleted": (_official_variables_index_deleted,
                                ("without variables/variables.index",
                                 "copy the whole folder")),
}


@pytest.mark.official
@pytest.mark.parametrize("case", sorted(OFFICIAL_DAMAGED))
def test_official_saved_model_damaged_exits_2_and_changes_nothing(
    official_dir, tmp_path, case):
  make, words = OFFICIAL_DAMAGED[case]
  (tmp_path / "src").mkdir()
  src = make(_unpack(official_dir, "tf2_r18_cifar"), tmp_path / "src")
  out = tmp_path / "out"
  before = _digest(tmp_path)
  _assert_refused(_import_cli(src, f"--output={out}"), 2, words, tmp_path,
                  before, str(out))


def _flip_longest_zero_run(path):
  """Flips the middle byte of the file's longest run of zero bytes (in the
  official training checkpoint: its optimizer slots, all still zero)."""
  data = np.fromfile(path, np.uint8)
  edges = np.diff(np.concatenate([[1], data, [1]]) == 0).nonzero()[0]
  starts, ends = edges[::2], edges[1::2]
  longest = np.argmax(ends - starts)
  data[(starts[longest] + ends[longest]) // 2] ^= 0xFF
  data.tofile(path)


@pytest.mark.official
@pytest.mark.slow
def test_official_checkpoint_with_a_damaged_slot_imports_and_says_so(
    official_dir, tmp_path, capsys):
  r18 = _unpack(official_dir, "tf2_r18_cifar")
  src = tmp_path / "src"
  shutil.copytree(r18 / "checkpoint", src / "checkpoint")
  shutil.copytree(r18 / "saved_model", src / "saved_model")
  _flip_longest_zero_run(src / "checkpoint" / "ckpt-1234.data-00000-of-00001")
  out = tmp_path / "out"
  assert import_official.main([str(src / "checkpoint"),
                               f"--output={out}"]) == 0
  summary = capsys.readouterr().out.splitlines()[0]
  assert ("1 optimizer-slot tensor unreadable and not needed: skipped"
          in summary), summary
  assert "ft_proj_selector=0 read from the graph of" in summary
  reference = dict(np.load(r18 / "reference.npz"))
  got = _outputs(str(out), reference["images"])
  for key in ("final_avg_pool", "proj_head_output", "logits_sup"):
    assert _max_rel_err(got[key], reference[key]) < REFERENCE_TOLERANCE, key
