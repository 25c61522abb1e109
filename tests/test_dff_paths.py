"""L_dff where it is used: training (`train.compute_losses` with a DFF function, and the loop
with `use_dff=True`) and fitting (`fitting.photometric_objective` / `fit_photometric` with a
`dff_fn`), each against a float64 NumPy reference of the term.

The DFF function here is a cheap stand-in with the network's contract (images (B, S, S, 3) ->
unit descriptors (B, S, S, D)): the unit vector of (r, g, b, 0.5). It is hashable (a module
function), as jitted callers need.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dff3d import fitting
from dff3d import landmark_sets
from dff3d import landmarks as lm
from dff3d import losses
from dff3d import morphable_model as mm
from dff3d import render as render_lib
from dff3d import synthetic
from dff3d import train
from experiments import configs

S = 32




def colour_descriptors(images):
  """(B, H, W, 3) -> (B, H, W, 4) unit vectors of (r, g, b, 0.5)."""
  x = jnp.concatenate([images, jnp.full(images.shape[:-1] + (1,), 0.5, images.dtype)], -1)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def np_descriptors(images):
  x = np.concatenate([np.asarray(images, np.float64),
                      np.full(np.shape(images)[:-1] + (1,), 0.5)], -1)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_bilinear(planes, points):
  """(H, W, D) sampled at (K, 2) pixel coordinates (pixel (i, j)'s centre at (j + .5, i + .5),
  clamped to the outermost centres)."""
  h, w, _ = planes.shape
  out = []
  for x, y in np.asarray(points, np.float64):
    u = min(max(x - 0.5, 0.0), w - 1.0)
    v = min(max(y - 0.5, 0.0), h - 1.0)
    j, i = int(np.floor(u)), int(np.floor(v))
    fu, fv = u - j, v - i
    j1, i1 = min(j + 1, w - 1), min(i + 1, h - 1)
    out.append((1 - fv) * ((1 - fu) * planes[i, j] + fu * planes[i, j1])
               + fv * ((1 - fu) * planes[i1, j] + fu * planes[i1, j1]))
  return np.asarray(out)


def np_dff_term(images, rendering):
  """L_dff of one batch in float64: sum over landmarks that face the camera of the squared
  descriptor difference between photo and rendering at the rendering's landmarks, batch mean."""
  ids = np.asarray(mm.default_model().landmarks)
  n = np.asarray(rendering.normals_cam, np.float64)[:, ids]
  v = np.asarray(rendering.vertices_cam, np.float64)[:, ids]
  facing = (np.sum(n * -v, -1) > 0).astype(np.float64)
  d_img, d_ren = np_descriptors(images), np_descriptors(rendering.image)
  total = 0.0
  for b in range(len(d_img)):
    pts = np.asarray(rendering.landmarks_2d[b])
    diff = np_bilinear(d_img[b], pts) - np_bilinear(d_ren[b], pts)
    total += np.sum(facing[b] * np.sum(diff ** 2, -1))
  return total / len(d_img), facing


@pytest.fixture(scope="module")
def model():
  return mm.default_model()


@pytest.fixture(scope="module")
def faces(model):
  """Two synthetic faces at S px: (true Coefficients, images, landmarks)."""
  sampler = synthetic.SamplerConfig(max_yaw=40.0)
  truth = synthetic.sample_coefficients(jax.random.PRNGKey(7), model, 2, sampler)
  ex = synthetic.render_examples(model, truth, synthetic.random_background(
      jax.random.PRNGKey(8), 2, S), S)
  return truth, ex["image"], ex["landmarks"]


def _moved(c, dx=1.5):
  """The faces moved dx cm sideways and turned 0.1 rad."""
  return c.replace(translation=c.translation + jnp.asarray([dx, 0.0, 0.0]),
                   rotation=c.rotation + jnp.asarray([0.0, 0.1, 0.0]))


# ---- training -------------------------------------------------------------------------------
def _tiny_config(dff_weight):
  return configs.get_config("cpu").replace(
      image_size=S, width=0.125, batch_size=2, synthetic_train=8, synthetic_val=4,
      log_every_steps=1, eval_every_steps=0, decay_epoch=1, num_epochs=1,
      weights=losses.LossWeights(dff=dff_weight))


def test_compute_losses_dff_term_matches_numpy_and_enters_the_total(model, faces):
  _, images, landmarks = faces
  cfg = _tiny_config(0.5)
  net = train.make_network(cfg, model)
  params = net.init(jax.random.PRNGKey(2), jnp.zeros((1, S, S, 3)))["params"]
  # a non-zero head so that the prediction is not the frontal mean face
  params = jax.tree_util.tree_map(
      lambda p: p + 0.01 * jax.random.normal(jax.random.PRNGKey(3), p.shape), params)
  batch = {"image": images, "landmarks": landmarks, "landmarks_visible": jnp.ones((2, 68)),
           "landmark_set": jnp.zeros((2,), jnp.int32)}
  table = landmark_sets.set_table(model)
  kw = dict(net=net, model=model, table=table, config=cfg, point_error=jnp.ones((len(landmark_sets.SETS), 68)),
            land_error_on=jnp.float32(0.0))
  # One compilation: L_dff, the total, the terms and the gradient of L_dff alone.
  dff_and_grad = jax.jit(jax.value_and_grad(
      lambda p: (lambda t, a: (a["dff"], (t, a)))(
          *train.compute_losses(p, batch, dff_fn=colour_descriptors, **kw)), has_aux=True))
  (dff, (total, aux)), grad = dff_and_grad(params)
  c = train.predict(params, images, net=net, model=model)
  want, facing = np_dff_term(images, render_lib.render(model, c, (S, S), background=images))
  assert facing.sum() > 20 and want > 1e-3, (facing.sum(), want)
  # (jitted network and render against eager ones: float32 differences of ~4e-4 measured)
  np.testing.assert_allclose(float(dff), want, rtol=2e-3)
  w = cfg.weights
  np.testing.assert_allclose(
      float(total), w.land * float(aux["land"]) + w.photo * float(aux["photo"])
      + w.reg * float(aux["reg"]) + w.dff * float(dff), rtol=1e-5)
  # The term has a gradient of its own (through the rendering's descriptors), in the backbone
  # too.
  norms = {jax.tree_util.keystr(k): float(jnp.sum(jnp.abs(g)))
           for k, g in jax.tree_util.tree_leaves_with_path(grad)}
  assert sum(norms.values()) > 1e-3, norms
  assert any(v > 0 for k, v in norms.items() if "head" not in k), norms


def test_the_loop_with_use_dff_logs_the_term(tmp_path, monkeypatch):
  # use_dff=True loads the DFF file of the config (here replaced by the stand-in) and every
  # logged step carries L_dff; use_dff=False logs none.
  loaded = []
  monkeypatch.setattr(train, "_frozen_dff", lambda path: loaded.append(path) or
                      colour_descriptors)
  srcs = (train.synthetic_pool(4, 40, seed=0, chunk=4), train.synthetic_pool(2, 40, seed=1,
                                                                             chunk=2))
  cfg = _tiny_config(0.5).replace(use_dff=True, dff_path="/some/dff.npz")
  train.train_and_evaluate(cfg, str(tmp_path / "on"), max_steps=2, sources_override=srcs,
                           verbose=False)
  assert loaded == ["/some/dff.npz"]
  with open(os.path.join(tmp_path / "on", "metrics.jsonl")) as f:
    steps = [r for r in map(json.loads, f) if "loss" in r]
  assert [r["step"] for r in steps] == [1, 2]
  assert all(r["dff"] > 0 for r in steps), steps


# ---- fitting --------------------------------------------------------------------------------
def _fit_config(**weights):
  return fitting.FitConfig(image_size=S, photo_size=0, photo_steps=30, learning_rate=0.01,
                           weights=losses.LossWeights(**weights))


def test_photometric_objective_dff_term_matches_numpy(model, faces):
  truth, images, landmarks = faces
  c = _moved(truth)
  weights = jnp.asarray(np.tile(lm.landmark_weights(), (2, 1)))
  cfg = _fit_config(dff=2.0)
  total, terms = fitting.photometric_objective(
      model, c, images, landmarks, weights, cfg, colour_descriptors,
      colour_descriptors(images))
  want, _ = np_dff_term(images, render_lib.render(model, c, (S, S), background=images))
  assert want > 1e-3
  np.testing.assert_allclose(float(terms["dff"]), want, rtol=1e-4)
  plain, _ = fitting.photometric_objective(model, c, images, landmarks, weights, cfg)
  np.testing.assert_allclose(float(total) - float(plain), 2.0 * want, rtol=1e-4)


def test_fit_photometric_follows_the_dff_term(model, faces):
  # L_dff alone (landmark and photo weights 0): the fit from the moved faces lowers it.
  # Measured: L_dff 1.37 -> 0.64 in 30 steps. (The colour stand-in is no face descriptor: the
  # pose does not return to the truth, the term only has to fall.)
  truth, images, landmarks = faces
  start = _moved(truth)
  cfg = _fit_config(land=0.0, photo=0.0, dff=1.0)
  fitted = fitting.fit_photometric(model, start, images, landmarks, cfg,
                                   dff_fn=colour_descriptors)
  weights = jnp.ones((2, 68))
  term = lambda c: float(fitting.photometric_objective(
      model, c, images, landmarks, weights, cfg, colour_descriptors,
      colour_descriptors(images))[1]["dff"])
  before, after = term(start), term(fitted)
  assert after < 0.6 * before, (before, after)  # the other weights are 0: only L_dff moved it
  assert np.abs(np.asarray(fitted.translation - start.translation)).max() > 0.1
