"""Shared test harness: quiet TensorFlow, tiny configs, a CLI runner, and a
fresh process with the CPU split into logical devices."""

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _share_the_cores_between_test_processes() -> None:
  """Each pytest-xdist process (and the runs it starts) gets its share of the
  cores for TensorFlow's thread pools, not a pool per core each: two
  processes of two threads on 2 cores spend their time switching and
  spinning (the default suite took 13% less test time with one thread each;
  docs/design.md, "Development"). Settings in the environment are kept."""
  workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
  if workers > 1:
    share = str(max(1, len(os.sched_getaffinity(0)) // workers))
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", share)
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", share)


_share_the_cores_between_test_processes()

# What run.py and `make demo` do first: choose oneDNN before TensorFlow is
# imported (simclr_tf.cpu), so the suite runs the same kernels they do.
import simclr_tf  # noqa: E402,F401
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
SHARED_CIFAR = os.path.join(ROOT, "..", "shared", "data", "cifar10")
RESULT_PREFIX = "FRESH_PROCESS_RESULT "


XDIST_GROUP_LOST = (
    "this test lost its xdist_group under --dist loadgroup (pytest 9.2 drops "
    "them, pytest-xdist issue 1386), so module fixtures would be built again "
    "in each process: install the pinned pytest (pip install -c "
    "requirements/constraints.txt -e '.[test]').")


def pytest_runtest_setup(item):
  """Fails a test whose xdist_group mark pytest-xdist lost (a worker
  process that raised at collection would only crash, without the reason)."""
  if (getattr(item.config.option, "loadgroup", False) and   # xdist workers
      item.get_closest_marker("xdist_group") and "@" not in item.nodeid):
    pytest.fail(XDIST_GROUP_LOST, pytrace=False)


def export_small_classifier(out, class_names, **overrides):
  """Exports a quarter-width ResNet-18 with a random supervised head."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from simclr_tf.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from simclr_tf.models.simclr import build_float32  # pylint: disable=g-import-not-at-top
  from tf_hub_export.export import export_saved_model  # pylint: disable=g-import-not-at-top
  config = ModelConfig(resnet_depth=18, width_multiplier=0.25,
                       global_bn=False, proj_out_dim=16,
                       num_classes=len(class_names), **overrides)
  model = build_float32(config, 32)
  head = model.sup_head.dense
  head.kernel.assign(np.random.default_rng(0).normal(
      size=head.kernel.shape).astype(np.float32))
  export_saved_model(model, out, 32, class_names=class_names)
  return out


# The bundled sample's (and CIFAR-10's) classes, in their order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                   "frog", "horse", "ship", "truck")


@pytest.fixture(scope="session")
def small_classifier(tmp_path_factory, worker_id):
  """One export of `export_small_classifier` for CIFAR10_CLASSES, shared by
  the whole run (written once for all pytest-xdist workers). Read it only:
  a test that damages an export copies it first."""
  if worker_id == "master":
    root = tmp_path_factory.getbasetemp()
  else:                                   # the folder all workers share
    root = tmp_path_factory.getbasetemp().parent
  path = root / "small_classifier" / "saved_model"
  with open(root / "small_classifier.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)      # the first worker writes it
    if not (path / "saved_model.pb").exists():
      export_small_classifier(str(path), CIFAR10_CLASSES)
  return str(path)


def _env(extra=None) -> dict:
  path = os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")])
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=path,
              **(extra or {}))


def run_cli(*args, timeout=600, env=None, cwd=ROOT):
  """Runs `python run.py ARGS` and returns the CompletedProcess."""
  return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"),
                         *args], capture_output=True, text=True,
                        timeout=timeout, env=_env(env), cwd=cwd)


_FRESH = textwrap.dedent("""
    import importlib.util, json, sys
    from simclr_tf import distribute
    distribute.split_cpu({cpus})   # before TensorFlow initialises
    spec = importlib.util.spec_from_file_location("fresh_worker", {path!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = getattr(module, {function!r})(*sys.argv[1:])
    print({prefix!r} + json.dumps(result))
""")


def run_fresh(path, function, *args, cpus=2, timeout=300):
  """Calls `function(*args)` of the module file `path` in a fresh process.

  The process splits its CPU into `cpus` logical devices before TensorFlow
  initialises (what a mirrored strategy over CPUs needs, and what cannot be
  done inside the pytest process), so `function` can build
  `MirroredStrategy(["/cpu:0", "/cpu:1"])`.

  Args:
    path: a test module (loaded under another name: its tests do not run).
    function: name of a function of it returning something JSON can write.
    *args: string arguments of the function.
    cpus: logical CPU devices (<= 1: the CPU left whole).
    timeout: seconds.
  Returns:
    What the function returned, read back from JSON.
  """
  code = _FRESH.format(cpus=int(cpus), path=os.path.abspath(path),
                       function=function, prefix=RESULT_PREFIX)
  proc = subprocess.run([sys.executable, "-c", code, *map(str, args)],
                        capture_output=True, text=True, timeout=timeout,
                        env=_env(), cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
  assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
  return json.loads(lines[-1][len(RESULT_PREFIX):])


class _Spec:
  def __init__(self, spec):
    self.spec = spec

  def as_dict(self):
    return self.spec


class _Resolver:
  def __init__(self, spec, task_type, task_id):
    self._spec, self.task_type, self.task_id = spec, task_type, task_id

  def cluster_spec(self):
    return _Spec(self._spec)


class FakeStrategy:
  """What `distribute` reads of a multi-worker strategy: its cluster."""

  def __init__(self, spec, task_type, task_id):
    self.cluster_resolver = _Resolver(spec, task_type, task_id)


WORKERS = {"worker": ["a:1", "b:2"]}


# Flags of a run small enough for a test: ResNet-18 0.25x at 32 px, a few
# steps.
TINY_FLAGS = (
    "--resnet_depth=18", "--width_multiplier=0.25", "--image_size=32",
    "--train_batch_size=16", "--eval_batch_size=64", "--train_steps=3",
    "--log_images=false",
    "--proj_out_dim=32", "--cache_dataset=false",
    # Not `auto`: the same numerics on every machine the tests run on.
    "--precision=float32",
)


@pytest.fixture
def tiny_flags():
  return list(TINY_FLAGS)


def snapshot(*roots, dirs: bool = False) -> dict:
  """{path: sha256} of every file under `roots` (files or folders), and
  {path: '<dir>'} of every folder with `dirs`: what a refused or failed run
  must leave byte-identical."""
  digests = {}
  for root in roots:
    root = str(root)
    paths = [root] if os.path.isfile(root) else []
    for folder, subdirs, files in os.walk(root):
      paths += [os.path.join(folder, name) for name in files]
      if dirs:
        digests.update({os.path.join(folder, d): "<dir>" for d in subdirs})
    for path in paths:
      with open(path, "rb") as f:
        digests[path] = hashlib.sha256(f.read()).hexdigest()
  return digests


def assert_refused(proc, status, *phrases):
  """Exit `status`, and the last line of stderr is run.py's one-line error
  holding every phrase; returns that line."""
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == status, proc.stderr[-3000:]
  assert lines and lines[-1].startswith("run.py: error: "), lines[-5:]
  for phrase in phrases:
    assert phrase in lines[-1], lines[-1]
  return lines[-1]


@pytest.fixture
def log_text(caplog):
  """What simclr_tf logs during the test (its logger may not propagate)."""
  logger = logging.getLogger("simclr_tf")
  logger.addHandler(caplog.handler)
  caplog.set_level(logging.INFO, logger="simclr_tf")
  yield lambda: caplog.text
  logger.removeHandler(caplog.handler)
