"""One .npz per trained network: its params flattened with "/" keys, plus a JSON config entry.

The DFF (models.dff) and the quarter-turn classifier (dff3d.orientation) files share this
layout and these checks; each names its own config entry and error class, so a bad file is
one line naming the file and what is wrong with it.
"""

import json
import os
from typing import Any, Callable, Mapping, Tuple, Type

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def write(path, params, config_key: str, config: Mapping[str, Any], dtype=np.float16) -> None:
  """Write params (a pytree; a {'params': ...} variables dict is accepted too) as `dtype`
  arrays and `config` as JSON under config_key, compressed."""
  if set(params) == {"params"}:
    params = params["params"]
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  arrays = {k: np.asarray(v).astype(dtype) for k, v in flat.items()}
  arrays[config_key] = np.array(json.dumps(dict(config), sort_keys=True))
  np.savez_compressed(path, **arrays)


def read(path, config_key: str, error: Type[Exception], what: str
         ) -> Tuple[dict, Mapping[str, Any]]:
  """(flat arrays {key: ndarray}, config dict) of a file written by `write`.

  Raises `error` (one line naming the file) when it is missing, not a readable .npz, or has
  no readable config entry; `what` names the kind of file in the message.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise error(f"{path}: {what} file not found")
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except Exception as e:  # noqa: BLE001 - any numpy/zip failure is a bad file
    raise error(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from None
  if config_key not in arrays:
    raise error(f"{path}: no '{config_key}' entry (not a {what} file?)")
  try:
    config = json.loads(str(arrays.pop(config_key)))
  except ValueError as e:
    raise error(f"{path}: bad '{config_key}' entry: {e}") from None
  return arrays, config


def unflatten_checked(path, arrays: dict, init: Callable[[], Any], error: Type[Exception],
                      described: str) -> Any:
  """The float32 params pytree of flat `arrays`, checked key by key and shape by shape
  against init() (e.g. lambda: net.init(key, x)["params"], only its shapes are evaluated);
  `error` names the file and `described` (the network's config) when they differ."""
  expected = traverse_util.flatten_dict(jax.eval_shape(init), sep="/")
  if set(expected) != set(arrays):
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    raise error(f"{os.fspath(path)}: params do not match {described}: "
                f"missing {missing[:5]}, unexpected {extra[:5]}")
  for k, v in expected.items():
    if arrays[k].shape != v.shape:
      raise error(f"{os.fspath(path)}: '{k}' has shape {arrays[k].shape}, expected {v.shape}")
  return traverse_util.unflatten_dict(
      {k: jnp.asarray(v.astype(np.float32)) for k, v in arrays.items()}, sep="/")
