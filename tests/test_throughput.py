"""benchmarks/throughput.py: configuration names parse, bad ones refuse."""

import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_a_name_with_knobs_parses():
  config = throughput.parse_config(
      "pretrain-full-bf16-xla-b256@pad=copy@bn=keras@relu=keep@intra=2")
  assert (config["kind"], config["task"], config["tier"]) == (
      "tf", "pretrain", "full")
  assert (config["precision"], config["xla"], config["batch"]) == (
      "bf16", True, 256)
  assert config["knobs"] == {"pad": "copy", "bn": "keras", "relu": "keep",
                             "intra": "2"}
  assert throughput.images_per_step(config) == 512


@pytest.mark.parametrize("name,message", [
    ("pretrain-full-fp32-b256@pad=explicit", "takes one value: @pad=copy"),
    ("pretrain-full-fp32-b256@bn=fused", "takes one value: @bn=keras"),
    ("pretrain-full-fp32-b256@relu=drop", "takes one value: @relu=keep"),
    ("pretrain-full-fp32-b256@padding=copy", "Unknown knob"),
    ("pretrain-full-fp32-b256@pad", "Unknown knob"),
    ("pretrain-full-fp32", "must end with -bBATCH"),
    ("pretrain-fastest-fp32-b256", "Cannot parse"),
])
def test_a_bad_name_refuses(name, message):
  # A misspelt switch must not run the default under another name.
  with pytest.raises(ValueError, match=message):
    throughput.parse_config(name)
