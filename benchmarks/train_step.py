r"""Training-step throughput (network + rendering + DFF + losses + Adam), as JSON lines.

  python -m benchmarks.train_step [--configs=cpu,paper] [--steps=3] [--dff_paths=a.npz,b.npz]

For each config (and each --dff_paths file): "config", "backbone", "image_size", "batch", "dff"
(the DFF used: the shipped weights or a --dff_paths file, or an untrained net of the default
shape when they are missing), "images_per_s" (median over --steps timed steps after one
compiling step), "step_ms", "compile_s", "device". Inputs are random crops with random
landmarks: the cost does not depend on content.
"""

import json
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from dff3d import landmark_sets
from dff3d import morphable_model as mm
from dff3d import train
from dff3d.models import dff as dff_lib
from experiments import configs

_CONFIGS = flags.DEFINE_list("configs", ["cpu", "paper"], "Configs to time.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Override the configs' batch size.")
_DFF_PATHS = flags.DEFINE_list("dff_paths", None, "DFF .npz files to time in turn (default: "
                               "the config's, i.e. the shipped one).")
_WEIGHTS = flags.DEFINE_list("loss_weights", None, "Override loss weights, e.g. photo=0,dff=0 "
                             "(L_land only: no rendering).")


def dff_for(config):
  path = config.dff_path or os.path.join(mm.ASSET_DIR, "dff.npz")
  if os.path.isfile(path):
    kind = "shipped" if not config.dff_path else path
    return train._frozen_dff(path), kind  # pylint: disable=protected-access
  net = dff_lib.DFFNet()
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  return (lambda im: dff_lib.frozen_apply(net, params, im)), "untrained-default"


def main(_):
  model = mm.default_model()
  for name, dff_path in [(c, p) for c in _CONFIGS.value for p in (_DFF_PATHS.value or [None])]:
    config = configs.get_config(name)
    if dff_path:
      config = config.replace(dff_path=dff_path)
    if _BATCH.value:
      config = config.replace(batch_size=_BATCH.value)
    if _WEIGHTS.value:
      config = config.replace(weights=train.parse_weights(config.weights, _WEIGHTS.value))
    net = train.make_network(config, model)
    tx, _ = train.make_optimizer(config, 100)
    use_dff = config.use_dff and config.weights.dff > 0
    dff_fn, dff_kind = dff_for(config) if use_dff else (None, "none")
    state = train.create_train_state(jax.random.PRNGKey(0), net, tx, config.image_size)
    rng = np.random.default_rng(0)
    s, b = config.image_size, config.batch_size
    batch = {"image": jnp.asarray(rng.uniform(size=(b, s, s, 3)), jnp.float32),
             "landmarks": jnp.asarray(rng.uniform(0.3 * s, 0.7 * s, (b, 68, 2)), jnp.float32),
             "landmarks_visible": jnp.ones((b, 68), jnp.float32),
             "landmark_set": jnp.zeros((b,), jnp.int32)}
    table = landmark_sets.set_table(model)
    step = lambda st: train.train_step(st, batch, jnp.float32(1.0), model, table, net=net,
                                       tx=tx, config=config, dff_fn=dff_fn)
    t = time.perf_counter()
    state, aux = step(state)
    jax.block_until_ready(aux)
    first = time.perf_counter() - t
    times = []
    for _ in range(_STEPS.value):
      t = time.perf_counter()
      state, aux = step(state)
      jax.block_until_ready(aux)
      times.append(time.perf_counter() - t)
    med = float(np.median(times))
    print(json.dumps({"config": name, "backbone": config.backbone, "width": config.width,
                      "image_size": s, "batch": b, "dff": dff_kind,
                      "photo": config.weights.photo > 0,
                      "images_per_s": round(b / med, 2), "step_ms": round(med * 1000, 1),
                      "compile_s": round(first - med, 2),
                      "device": jax.devices()[0].device_kind}), flush=True)


if __name__ == "__main__":
  app.run(main)
