"""Speed of the networks: one JSON line per configuration.

  python -m benchmarks.vgg                      # every configuration below
  python -m benchmarks.vgg --only vgg16-cpu,dff  # a subset, by name prefix

Fields: network, input (H = W), width, batch, params, forward_ms_per_image,
forward_backward_ms_per_image, compile_s, device, iters.
- forward: the jitted apply on a random batch in [0, 1].
- forward_backward: for the regressors, value_and_grad of sum(outputs ** 2) w.r.t. the params
  (a training step without the optimiser); for DFF, value_and_grad w.r.t. the *input image*
  through the frozen network (how L_dff uses it).
- times are the median over `iters` timed calls after one warm-up call (at least one call and
  at least --min_time seconds each); compile_s is lowering + XLA compilation of both functions.
Params are initialised with an 'unsafe_rbg' key (threefry init compiles slowly on XLA:CPU; the
values do not change the timings).
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from dff3d import morphable_model as mm
from dff3d.models import dff, heads, vgg

# name, kind, input size, width, batch, extra module kwargs
CONFIGS = (
    ("vgg16-paper", "vgg16", 224, 1.0, 1, dict(fc_width=4096)),
    ("vgg16-paper", "vgg16", 224, 1.0, 8, dict(fc_width=4096)),
    ("vgg16-cpu", "vgg16", 112, 0.25, 8, dict(fc_width=512)),
    ("light", "light", 112, 0.5, 8, {}),
    ("light", "light", 224, 1.0, 8, {}),
    ("dff", "dff", 224, 32, 1, {}),
    ("dff", "dff", 224, 32, 8, {}),
    ("dff-cpu", "dff", 112, 16, 8, {}),
)


def _time(fn, args, min_time):
  jax.block_until_ready(fn(*args))  # warm-up
  times, start = [], time.perf_counter()
  while not times or time.perf_counter() - start < min_time:
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times), len(times)


def bench(name, kind, size, width, batch, kwargs, min_time):
  x = jax.random.uniform(jax.random.PRNGKey(1), (batch, size, size, 3))
  if kind == "dff":
    net = dff.DFFNet(width=width, **kwargs)
  else:
    net = vgg.make_regressor(mm.default_model(), kind, width=width, **kwargs)
  params = jax.jit(net.init)(jax.random.key(0, impl="unsafe_rbg"), x[:1])["params"]
  n_params = heads.count_params(params)

  def forward(p, images):
    return net.apply({"params": p}, images)

  if kind == "dff":
    def loss(p, images):
      return jnp.sum(forward(jax.lax.stop_gradient(p), images) ** 2)
    fb = jax.value_and_grad(loss, argnums=1)
  else:
    fb = jax.value_and_grad(lambda p, images: jnp.sum(forward(p, images) ** 2))

  t = time.perf_counter()
  fwd_c = jax.jit(forward).lower(params, x).compile()
  fb_c = jax.jit(fb).lower(params, x).compile()
  compile_s = time.perf_counter() - t
  fwd_s, n1 = _time(fwd_c, (params, x), min_time)
  fb_s, n2 = _time(fb_c, (params, x), min_time)
  dev = jax.devices()[0]
  return dict(network=name, input=size, width=width, batch=batch, params=n_params,
              forward_ms_per_image=round(1e3 * fwd_s / batch, 2),
              forward_backward_ms_per_image=round(1e3 * fb_s / batch, 2),
              compile_s=round(compile_s, 2), device=f"{dev.platform}:{dev.device_kind}",
              iters=[n1, n2])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="comma-separated name prefixes")
  parser.add_argument("--min_time", type=float, default=2.0,
                      help="seconds of timed calls per function (at least one call)")
  args = parser.parse_args()
  prefixes = [p for p in args.only.split(",") if p]
  for cfg in CONFIGS:
    if prefixes and not any(cfg[0].startswith(p) for p in prefixes):
      continue
    print(json.dumps(bench(*cfg, min_time=args.min_time)), flush=True)


if __name__ == "__main__":
  main()
