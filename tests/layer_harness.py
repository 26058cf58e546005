"""One check that a Keras layer (or model) of simclr_tf can be saved.

`run_layer_test(cls, init_kwargs, input_shape)` does, for one layer class
and its constructor arguments:

1. builds the layer and calls it on a fixed random batch, after giving
   every weight a seeded random value (so that zero-initialised gammas and
   heads do not hide a weight that failed to come back);
2. checks that the class is registered under `package` and that
   `get_config` has one entry per named `__init__` argument; rebuilds the
   layer with `cls.from_config(layer.get_config())` and checks that the
   clone has an equal config, the same variable paths and output shapes,
   and, with the weights copied, the same outputs;
3. saves it to `.keras` in a temporary folder (a `keras.Model` itself, any
   other layer inside a one-layer functional model) and reloads it with
   `keras.saving.load_model` (no custom objects: the registration must be
   enough), checking that the reloaded layer is of the class, has the same
   variable paths and computes the same outputs;
4. under the `mixed_bfloat16` policy builds a new instance and checks the
   dtype of every output (bfloat16 unless `mixed_dtypes` says otherwise,
   e.g. float32 for the supervised head) and that its variables stay
   float32; the global policy is restored afterwards, whatever happens.

Failures are `AssertionError`s naming the layer and the step.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import tempfile
from typing import Any, Callable, Optional, Union

import keras
import numpy as np

MIXED_POLICY = "mixed_bfloat16"


@dataclasses.dataclass
class LayerTestResult:
  """What `run_layer_test` built, for further checks by the caller."""

  layer: Any                 # the layer, its weights randomised
  inputs: np.ndarray         # the fixed batch
  outputs: Any               # layer(inputs), as numpy, same structure
  config: dict               # layer.get_config()
  reloaded: Any = None       # the layer (or model) load_model gave back


def _to_numpy(tree):
  return keras.tree.map_structure(
      lambda t: np.asarray(keras.ops.convert_to_numpy(
          keras.ops.cast(t, "float32"))), tree)


def _shapes(tree):
  return keras.tree.map_structure(lambda t: tuple(t.shape), tree)


def _normalize_shapes(tree):
  """Shapes as tuples, sequences of them as lists, dicts as dicts."""
  if isinstance(tree, dict):
    return {k: _normalize_shapes(v) for k, v in tree.items()}
  if all(d is None or isinstance(d, (int, np.integer)) for d in tree):
    return tuple(None if d is None else int(d) for d in tree)
  return [_normalize_shapes(t) for t in tree]


def _dtypes(tree):
  return keras.tree.map_structure(
      lambda t: keras.backend.standardize_dtype(t.dtype), tree)


def _flat_items(tree):
  """[(key, leaf)] with dict keys (or list positions) as the keys."""
  if isinstance(tree, (list, tuple)) and len(tree) == 1:
    tree = tree[0]   # a functional model returns a 1-list as its element
  if isinstance(tree, dict):
    return [(k, tree[k]) for k in sorted(tree)]
  if isinstance(tree, (list, tuple)):
    return list(enumerate(tree))
  return [(None, tree)]


def randomize_weights(layer, seed: int = 0) -> None:
  """Gives every weight of `layer` a seeded random value near its own.

  Kernels (2+ dimensions) get noise of half their spread; moving variances
  a value in [0.5, 1.5]; other vectors (gamma, beta, biases, moving means)
  their value plus N(0, 0.2^2), so zero-initialised gammas become non-zero.
  """
  rng = np.random.default_rng(seed)
  for variable in layer.weights:
    value = np.asarray(keras.ops.convert_to_numpy(variable), np.float32)
    if value.ndim >= 2:
      spread = float(value.std()) or 0.1
      value = value + rng.normal(0.0, 0.5 * spread, value.shape)
    elif variable.path.endswith("moving_variance"):
      value = rng.uniform(0.5, 1.5, value.shape)
    else:
      value = value + rng.normal(0.0, 0.2, value.shape)
    variable.assign(value.astype(np.float32))


def _call(layer, x, call_kwargs):
  return layer(x, **call_kwargs)


def _check_close(name, step, got, want, rtol, atol):
  got_items, want_items = _flat_items(got), _flat_items(want)
  assert [k for k, _ in got_items] == [k for k, _ in want_items], (
      f"{name}: {step}: output keys {[k for k, _ in got_items]} != "
      f"{[k for k, _ in want_items]}")
  for (key, a), (_, b) in zip(got_items, want_items):
    np.testing.assert_allclose(
        a, b, rtol=rtol, atol=atol,
        err_msg=f"{name}: {step}: output {key!r} differs")


def check_config_is_complete(layer_cls, config: dict) -> None:
  """Every named argument of `layer_cls.__init__` is a key of `config`."""
  params = inspect.signature(layer_cls.__init__).parameters.values()
  names = [p.name for p in params
           if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
           and p.name != "self"]
  missing = [n for n in names if n not in config]
  assert not missing, (
      f"{layer_cls.__name__}.get_config() lacks the __init__ argument(s) "
      f"{missing}; it has {sorted(config)}")


def check_registered(layer_cls, package: str) -> None:
  registered = f"{package}>{layer_cls.__name__}"
  assert keras.saving.get_registered_name(layer_cls) == registered, (
      f"{layer_cls.__name__} is not registered as {registered!r} (it is "
      f"{keras.saving.get_registered_name(layer_cls)!r})")
  assert keras.saving.get_registered_object(registered) is layer_cls


def _wrap(layer, input_shape, call_kwargs):
  """A one-layer functional model around `layer`."""
  inputs = keras.Input(batch_shape=tuple(input_shape), dtype="float32")
  return keras.Model(inputs, _call(layer, inputs, call_kwargs))


def run_layer_test(
    layer_cls,
    init_kwargs: dict,
    input_shape: tuple,
    *,
    call_kwargs: Optional[dict] = None,
    input_data: Optional[np.ndarray] = None,
    expected_output_shape: Any = None,
    mixed_dtypes: Union[str, dict, Callable, None] = "bfloat16",
    package: Optional[str] = "simclr_tf",
    save_dir: Optional[str] = None,
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> LayerTestResult:
  """Builds, configures, saves, reloads and mixed-precision-checks a layer.

  Args:
    layer_cls: the layer (or `keras.Model`) class.
    init_kwargs: its constructor arguments (no `dtype`: step 4 relies on
      the global policy).
    input_shape: the batch shape, fully known, e.g. (2, 8, 8, 4).
    call_kwargs: extra call arguments (default: none; a layer taking
      `training` then runs in inference mode, so outputs are deterministic).
    input_data: the batch (default: seeded N(0, 1) float32 of input_shape).
    expected_output_shape: if given, the structure of output shapes.
    mixed_dtypes: output dtype under mixed_bfloat16: one dtype for every
      output, a {output key: dtype} dict (keys not in it: bfloat16), a
      function of the key, or None to skip step 4.
    package: the registration package checked (None: not checked).
    save_dir: folder for the `.keras` file (default: a temporary one).
    seed: seed of the batch and of the weights.
    rtol, atol: tolerance of the output comparisons.
  Returns:
    A `LayerTestResult`.
  """
  name = layer_cls.__name__
  call_kwargs = dict(call_kwargs or {})
  saved_policy = keras.config.dtype_policy()
  try:
    keras.config.set_dtype_policy("float32")
    if input_data is None:
      input_data = np.random.default_rng(seed).normal(
          size=input_shape).astype(np.float32)
    x = input_data

    # 1. Build and call.
    layer = layer_cls(**init_kwargs)
    first = _call(layer, x, call_kwargs)
    assert layer.built, f"{name}: not built by its first call"
    randomize_weights(layer, seed)
    outputs = _call(layer, x, call_kwargs)
    assert _shapes(first) == _shapes(outputs)
    if expected_output_shape is not None:
      got = _normalize_shapes(_shapes(outputs))
      want = _normalize_shapes(expected_output_shape)
      assert got == want, f"{name}: output shapes {got} != {want}"
    numpy_outputs = _to_numpy(outputs)
    for key, value in _flat_items(numpy_outputs):
      assert np.all(np.isfinite(value)), f"{name}: output {key!r} not finite"
    paths = [v.path for v in layer.weights]
    assert len(set(paths)) == len(paths), f"{name}: duplicate paths {paths}"

    # 2. Registration and config round trip.
    if package is not None:
      check_registered(layer_cls, package)
    config = layer.get_config()
    check_config_is_complete(layer_cls, config)
    clone = layer_cls.from_config(config)
    assert type(clone) is layer_cls
    assert clone.get_config() == config, (
        f"{name}: from_config(get_config()) has another config:\n"
        f"{clone.get_config()}\n!=\n{config}")
    clone_outputs = _call(clone, x, call_kwargs)
    assert _shapes(clone_outputs) == _shapes(outputs), (
        f"{name}: clone output shapes {_shapes(clone_outputs)} != "
        f"{_shapes(outputs)}")
    assert [v.path for v in clone.weights] == paths, (
        f"{name}: the clone has other variable paths")
    assert ([tuple(v.shape) for v in clone.weights] ==
            [tuple(v.shape) for v in layer.weights])
    clone.set_weights(layer.get_weights())
    _check_close(name, "from_config with copied weights",
                 _to_numpy(_call(clone, x, call_kwargs)), numpy_outputs,
                 rtol, atol)

    # 3. .keras round trip, without custom objects.
    is_model = isinstance(layer, keras.Model)
    saveable = layer if is_model else _wrap(layer, input_shape, call_kwargs)
    _check_close(name, "wrapped in a model", _to_numpy(
        saveable(x, **call_kwargs) if is_model else saveable(x)),
                 numpy_outputs, rtol, atol)
    with tempfile.TemporaryDirectory(dir=save_dir) as folder:
      path = os.path.join(folder, f"{name}.keras")
      saveable.save(path)
      reloaded = keras.saving.load_model(path)
    inner = reloaded if is_model else reloaded.get_layer(layer.name)
    assert type(inner) is layer_cls, f"{name}: reloaded as {type(inner)}"
    assert inner.get_config() == config, f"{name}: reloaded config differs"
    assert [v.path for v in inner.weights] == paths, (
        f"{name}: reloaded variable paths differ:\n"
        f"{[v.path for v in inner.weights]}\n!=\n{paths}")
    reloaded_outputs = (reloaded(x, **call_kwargs) if is_model
                        else reloaded(x))
    _check_close(name, ".keras save and load_model",
                 _to_numpy(reloaded_outputs), numpy_outputs, rtol, atol)

    # 4. Mixed precision.
    if mixed_dtypes is not None:
      keras.config.set_dtype_policy(MIXED_POLICY)
      mixed = layer_cls(**init_kwargs)
      mixed_outputs = _call(mixed, x, call_kwargs)
      assert mixed.dtype_policy.name in (MIXED_POLICY, "float32")
      for key, dtype in _flat_items(_dtypes(mixed_outputs)):
        if isinstance(mixed_dtypes, str):
          want = mixed_dtypes
        elif isinstance(mixed_dtypes, dict):
          want = mixed_dtypes.get(key, "bfloat16")
        else:
          want = mixed_dtypes(key)
        assert dtype == want, (
            f"{name}: under {MIXED_POLICY} output {key!r} is {dtype}, "
            f"expected {want}")
      assert all(keras.backend.standardize_dtype(v.dtype) == "float32"
                 for v in mixed.weights), (
                     f"{name}: variables not float32 under {MIXED_POLICY}")
      assert _shapes(mixed_outputs) == _shapes(outputs)
  finally:
    keras.config.set_dtype_policy(saved_policy)
  return LayerTestResult(layer=layer, inputs=x, outputs=numpy_outputs,
                         config=config, reloaded=reloaded)
