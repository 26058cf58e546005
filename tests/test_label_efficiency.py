"""benchmarks/label_efficiency.py: its stages are valid run.py commands that
chain as SimCLRv2 does, and --budget scales them."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import label_efficiency as le  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_tf import cli  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def data_root(tmp_path):
  """A CIFAR-shaped folder: 2 classes x 20 train images, 2 test images."""
  source = tmp_path / "cifar"
  for split, count in (("train", 20), ("test", 2)):
    for cls in ("cat", "dog"):
      (source / split / cls).mkdir(parents=True)
      for i in range(count):
        (source / split / cls / f"{i:03d}.jpg").write_bytes(b"")
  return le.make_split_folder(str(source), str(tmp_path / "out"), 0.1)


def _config(flags):
  return cli.config_from_args(flags)


def _stages(data_root, *argv):
  a = le.parse_args(["--out", os.path.dirname(data_root), *argv])
  return {(m, c): _config(f) for m, c, f in le.plan(a, data_root)}


def test_split_folder_holds_out_val_from_train(data_root):
  count = lambda split: le.count_images(os.path.join(data_root, split))
  assert (count("train"), count("val"), count("all"), count("test")) == (
      36, 4, 40, 4)
  assert not set(os.listdir(os.path.join(data_root, "train", "cat"))) & set(
      os.listdir(os.path.join(data_root, "val", "cat")))


def test_stages_are_valid_and_chain_like_simclr_v2(data_root):
  stages = _stages(data_root)
  assert [m for m, _ in stages] == ["pretrain"] + [
      "supervised", "linear eval", "fine-tuned", "distilled"] * 2
  pretrain = stages["pretrain", "-"]
  assert (pretrain.train_split, pretrain.eval_split) == ("all", "val")
  export = lambda cfg: os.path.join(cfg.model_dir, "saved_model")
  for pct in ("1%", "10%"):
    sup, lin, ft, dist = (stages[m, pct] for m in (
        "supervised", "linear eval", "fine-tuned", "distilled"))
    assert not sup.init_from and sup.label_fraction == ft.label_fraction
    # Linear evaluation: frozen encoder, head on its output.
    assert (lin.fine_tune_after_block, lin.ft_proj_selector) == (4, 0)
    assert lin.init_from == ft.init_from == export(pretrain)
    # SimCLRv2 fine-tunes from the first projection layer.
    assert (ft.ft_proj_selector, ft.fine_tune_after_block) == (1, -1)
    assert dist.teacher == dist.init_from == export(ft)
    assert not dist.init_head       # a new head: the better on val
    assert dist.train_split == "train" and dist.eval_split == "test"
    assert {sup.eval_split, lin.eval_split, ft.eval_split} == {"test"}


def test_distill_init_head_restores_the_teachers_head(data_root):
  stages = _stages(data_root, "--distill_init_head=1")
  assert stages["distilled", "1%"].init_head


def test_budget_scales_every_stage(data_root):
  full = _stages(data_root)
  half = _stages(data_root, "--budget=0.5")
  for key, cfg in full.items():
    assert half[key].train_epochs == max(1, round(cfg.train_epochs / 2)), key


def test_smoke_steps_caps_every_stage(data_root):
  assert {cfg.train_steps for cfg in _stages(
      data_root, "--smoke_steps=3").values()} == {3}


def test_chart_has_a_series_per_method(tmp_path):
  pytest.importorskip("matplotlib")
  cell = lambda top1: {"top1": top1, "seconds": 1.0}
  rows = {m: {"1%": cell(0.1 * i), "10%": cell(0.1 * i + 0.05)}
          for i, m in enumerate(["supervised", "linear eval", "fine-tuned",
                                 "distilled"], start=1)}
  path = str(tmp_path / "chart.png")
  le.chart(rows, ["1%", "10%"], path)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  text = le.table(rows, ["1%", "10%"])
  assert "linear eval" in text and "40.0%" in text and "45.0%" in text
