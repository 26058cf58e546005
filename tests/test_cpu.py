"""Tests of simclr_tf.cpu: the CPU's flags and the oneDNN choice."""

import os
import subprocess
import sys

import pytest

import simclr_tf
from simclr_tf import cpu

from conftest import run_cli

# /proc/cpuinfo flags of the CPU kinds the choice is about (abridged).
ZEN3_AVX2 = {"sse4_2", "avx", "avx2", "fma", "bmi2", "sha_ni"}
ZEN4_AVX512 = ZEN3_AVX2 | {"avx512f", "avx512bw", "avx512_vnni",
                           "avx512_bf16"}
SAPPHIRE_RAPIDS_AMX = ZEN3_AVX2 | {"avx512f", "avx512_vnni", "avx512_bf16",
                                   "avx_vnni", "amx_bf16", "amx_tile",
                                   "amx_int8"}
ALDER_LAKE_AVX_VNNI = ZEN3_AVX2 | {"avx_vnni"}
OLD_SSE = {"sse2", "sse4_1", "sse4_2", "avx"}


def test_cpu_flags_and_model_are_read_from_cpuinfo(tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nmodel name\t: Some CPU\n"
                  "flags\t\t: fpu sse2 avx512_bf16 avx2\n\n"
                  "processor\t: 1\nmodel name\t: Some CPU\n"
                  "flags\t\t: fpu sse2 avx512_bf16 avx2\n\n")
  assert cpu.cpu_flags(str(info)) == {"fpu", "sse2", "avx512_bf16", "avx2"}
  assert cpu.cpu_model(str(info)) == "Some CPU"
  missing = str(tmp_path / "missing")
  assert cpu.cpu_flags(missing) == set()
  assert cpu.cpu_model(missing) == ""


def test_avx2_cpu_gets_onednn_on():
  choice = cpu.decide_onednn(ZEN3_AVX2, environ={})
  assert (choice.value, choice.enabled, choice.source) == ("1", True, "auto")
  assert "AVX2" in choice.reason
  assert choice.describe().startswith("oneDNN on (auto): ")


@pytest.mark.parametrize("flags", [ZEN4_AVX512, SAPPHIRE_RAPIDS_AMX,
                                   ALDER_LAKE_AVX_VNNI])
def test_cpus_tensorflow_already_enables_keep_its_default(flags):
  choice = cpu.decide_onednn(flags, environ={})
  assert choice.value is None   # nothing set: TensorFlow's own default
  assert (choice.enabled, choice.source) == (True, "auto")
  assert "TensorFlow's default" in choice.reason


@pytest.mark.parametrize("flags", [OLD_SSE, set(), {"fp", "asimd"}])
def test_cpus_without_avx2_or_unknown_keep_tensorflows_default(flags):
  choice = cpu.decide_onednn(flags, environ={})
  assert (choice.value, choice.enabled) == (None, None)
  assert choice.describe().startswith("oneDNN TensorFlow's default (auto)")


@pytest.mark.parametrize("given, enabled", [("0", False), ("1", True),
                                            ("true", True), ("bogus", None)])
def test_environment_variable_is_the_users_choice(given, enabled):
  for flags in (ZEN3_AVX2, SAPPHIRE_RAPIDS_AMX):
    choice = cpu.decide_onednn(flags, environ={cpu.ENV_VAR: given})
    assert (choice.value, choice.enabled, choice.source) == (
        given, enabled, "user")
    assert f"{cpu.ENV_VAR}={given}" in choice.reason


def test_flag_wins_over_environment_and_cpu():
  env = {cpu.ENV_VAR: "1"}
  off = cpu.decide_onednn(SAPPHIRE_RAPIDS_AMX, "off", env)
  on = cpu.decide_onednn(OLD_SSE, "on", {cpu.ENV_VAR: "0"})
  assert (off.value, off.enabled, off.source) == ("0", False, "user")
  assert (on.value, on.enabled, on.source) == ("1", True, "user")
  with pytest.raises(ValueError, match="setting='yes'"):
    cpu.decide_onednn(ZEN3_AVX2, "yes", env)


def _configure(setting, flags, environ, modules=(), tf_onednn=None):
  return cpu.configure_onednn(setting, flags=flags, environ=environ,
                              modules=dict.fromkeys(modules),
                              tensorflow_onednn=lambda: tf_onednn)


def test_configure_sets_the_environment_before_tensorflow():
  env = {}
  choice = _configure("auto", ZEN3_AVX2, env)
  assert choice.enabled and env[cpu.ENV_VAR] == "1"
  # A child process inheriting our choice makes it again (not 'user') ...
  again = _configure("auto", ZEN3_AVX2, dict(env))
  assert (again.source, again.value) == ("auto", "1")
  # ... and run.py's --onednn=off replaces it.
  off = _configure("off", ZEN3_AVX2, env)
  assert (off.source, env[cpu.ENV_VAR]) == ("user", "0")
  assert cpu.CHOSEN_VAR not in env
  # Now the environment holds the user's value: 'auto' keeps it.
  kept = _configure("auto", ZEN3_AVX2, env)
  assert (kept.source, kept.enabled, env[cpu.ENV_VAR]) == ("user", False, "0")


def test_configure_leaves_tensorflows_default_unset():
  env = {"OTHER": "x"}
  choice = _configure("auto", SAPPHIRE_RAPIDS_AMX, env)
  assert choice.enabled and env == {"OTHER": "x"}
  # Our own earlier value (inherited by a child on another CPU) is dropped.
  env = {cpu.ENV_VAR: "1", cpu.CHOSEN_VAR: "1"}
  _configure("auto", SAPPHIRE_RAPIDS_AMX, env)
  assert env == {}


def test_tensorflow_imported_first_changes_nothing_and_says_so():
  env = {}
  choice = _configure("auto", ZEN3_AVX2, env, modules=["tensorflow"],
                      tf_onednn=False)
  assert env == {}
  assert (choice.source, choice.enabled, choice.conflict) == (
      "tensorflow", False, True)
  assert "imported before simclr_tf" in choice.reason
  assert f"{cpu.ENV_VAR}=1" in choice.reason
  agreed = _configure("auto", SAPPHIRE_RAPIDS_AMX, env, modules=["tensorflow"],
                      tf_onednn=True)
  assert (agreed.enabled, agreed.conflict) == (True, False)
  assert agreed.describe().startswith("oneDNN on (tensorflow): ")


def _run_python(code, env):
  return subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=300, env=env, check=True).stdout


def test_import_simclr_tf_sets_what_tensorflow_then_runs():
  """The real thing, in a fresh process: the choice reaches TensorFlow."""
  code = ("import simclr_tf, sys\n"
          "assert 'tensorflow' not in sys.modules\n"
          "from tensorflow.python.util import _pywrap_util_port as p\n"
          "print(simclr_tf.ONEDNN.enabled, p.IsMklEnabled())\n")
  base = {k: v for k, v in os.environ.items()
          if k not in (cpu.ENV_VAR, cpu.CHOSEN_VAR)}
  base["TF_CPP_MIN_LOG_LEVEL"] = "2"
  wanted = cpu.decide_onednn(cpu.cpu_flags(), environ={}).enabled
  auto = _run_python(code, base).split()
  assert auto[0] == str(wanted)
  if wanted is not None:
    assert auto[1] == str(wanted)
  user = _run_python(code, dict(base, **{cpu.ENV_VAR: "0"})).split()
  assert user == ["False", "False"]


def test_run_py_logs_the_choice_this_suite_runs_with(tmp_path):
  """run.py (what `make demo` runs per stage) and the suite choose alike."""
  missing = f"--data_dir={tmp_path / 'missing'}"
  args = ("--dataset=image_folder", missing, f"--model_dir={tmp_path / 'm'}")
  proc = run_cli(*args, timeout=300)
  assert proc.returncode == 2   # the missing data, after the choice
  assert f"INFO: {simclr_tf.ONEDNN.describe()}\n" in proc.stderr
  off = run_cli("--onednn=off", *args, timeout=300)
  assert "INFO: oneDNN off (user): --onednn=off\n" in off.stderr
