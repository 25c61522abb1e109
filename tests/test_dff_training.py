"""DFF training: correspondence matching, the loss, the train step, the shipped weights."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dff3d import dff_training
from dff3d import morphable_model as mm
from dff3d import synthetic
from dff3d.models import dff as dff_lib
from dff3d.models import light

SIZE = 32
ASSET = pathlib.Path(dff_lib.__file__).resolve().parents[1] / "assets" / "dff.npz"


@pytest.fixture(scope="module")
def pairs():
  """One pose pair at 32 px (|yaw difference| <= 30 degrees); batch 1 compiles fastest."""
  pose_pairs = jax.jit(synthetic.pose_pairs, static_argnames=("batch", "size", "max_yaw_diff"))
  return pose_pairs(jax.random.PRNGKey(3), mm.default_model(), 1, SIZE, 30.0)


def test_same_view_twice_matches_every_face_pixel_to_itself(pairs):
  a = pairs[0]
  idx = jnp.asarray(np.flatnonzero(np.asarray(a["mask"][0]))[None])
  got, valid = dff_training.match_pixels(idx, a, a, 0.05)  # exact search
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(idx[0]))
  assert np.asarray(valid[0]).all()
  # coarse-to-fine (training): exact except where the surface folds within a few pixels (lips
  # at this tiny size)
  got, _ = dff_training.match_pixels(idx, a, a, 0.05, stride=2)
  assert np.mean(np.asarray(got[0]) == np.asarray(idx[0])) > 0.97


def test_matching_across_views_is_exact_nearest_and_stride_agrees(pairs):
  a, b = pairs
  idx, in_mask = dff_training.sample_mask_pixels(jax.random.PRNGKey(0), a["mask"], 64)
  assert np.asarray(in_mask).all()
  pos = np.asarray(a["mean_face_position"]).reshape(1, -1, 3)
  pos_b = np.asarray(b["mean_face_position"]).reshape(1, -1, 3)
  mask_b = np.asarray(b["mask"]).reshape(1, -1)
  got, dist = dff_training.match_points(
      jnp.asarray(np.take_along_axis(pos, np.asarray(idx)[..., None], 1)),
      b["mean_face_position"], b["mask"])
  for i in range(1):
    for k in range(64):
      d = np.linalg.norm(pos_b[i] - pos[i, idx[i, k]], axis=-1)
      d[~mask_b[i]] = np.inf
      assert d[got[i, k]] == pytest.approx(d.min(), abs=1e-4)
      assert float(dist[i, k]) == pytest.approx(d.min(), abs=1e-3)
  coarse, _ = dff_training.match_pixels(idx, a, b, 1.0, stride=2)
  assert np.mean(np.asarray(coarse) == np.asarray(got)) > 0.9
  # visible in both: a fair share of A's face pixels have a partner closer than 1 cm
  _, valid = dff_training.match_pixels(idx, a, b, 1.0)
  assert np.asarray(valid).mean() > 0.3


def test_sample_mask_pixels_stays_in_the_mask():
  mask = jnp.zeros((2, 8, 8), bool).at[0, 2:4, 2:4].set(True).at[1].set(True)
  idx, valid = dff_training.sample_mask_pixels(jax.random.PRNGKey(1), mask, 6)
  flat = np.asarray(mask).reshape(2, -1)
  assert np.asarray(valid[0]).sum() == 4 and np.asarray(valid[1]).all()
  np.testing.assert_array_equal(np.take_along_axis(flat, np.asarray(idx), 1), np.asarray(valid))
  assert len(set(np.asarray(idx[0, :4]).tolist())) == 4


def test_loss_prefers_matching_descriptors(pairs):
  """Descriptors built from the ground truth (mean-face position) beat random ones."""
  a, b = pairs
  config = dff_training.LossConfig(num_anchors=32, temperature=0.05, match_stride=1)

  def truth_desc(v):
    pos = v["mean_face_position"] / 4.0
    feats = jnp.concatenate([jnp.sin(pos * 3), jnp.cos(pos * 3), pos], -1)
    feats = jnp.where(v["mask"][..., None], feats, -1.0)
    return dff_lib.l2_normalize(feats)

  loss = jax.jit(lambda da, db: dff_training.correspondence_loss(
      jax.random.PRNGKey(0), da, db, a, b, config))
  good, m = loss(truth_desc(a), truth_desc(b))
  rand = lambda k: dff_lib.l2_normalize(jax.random.normal(k, (1, SIZE, SIZE, 9)))
  bad, _ = loss(rand(jax.random.PRNGKey(1)), rand(jax.random.PRNGKey(2)))
  assert float(good) < float(bad)
  assert float(m["valid_anchors"]) > 5 and float(m["within_px"]) > 0.5


def test_loss_decreases_on_a_fixed_batch(pairs):
  a, b = pairs
  net = dff_lib.DFFNet(width=4, levels=1, descriptor_dim=8)
  state = dff_training.create_train_state(jax.random.key(0, impl="unsafe_rbg"), net, 3e-3,
                                          steps=100, image_size=SIZE, warmup_steps=1)
  config = dff_training.LossConfig(num_anchors=32, colour_jitter=0.0, noise_std=0.0)
  key = jax.random.PRNGKey(5)  # the same anchors every step
  losses = []
  for _ in range(10):
    state, m = dff_training.train_step(state, a, b, key, config)
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0] - 0.1, losses
  assert int(state.step) == 10


def test_nearest_pixels_whole_image_and_mask():
  desc = jnp.eye(4)[jnp.array([[0, 1], [2, 3]])]  # (2, 2, 4): pixel i has e_i
  q = jnp.eye(4)[jnp.array([3, 0, 2])]
  np.testing.assert_array_equal(np.asarray(dff_training.nearest_pixels(q, desc, chunk=2)),
                                [3, 0, 2])
  mask = jnp.array([[True, True], [False, False]])
  got = np.asarray(dff_training.nearest_pixels(q[1:2], desc, mask))
  np.testing.assert_array_equal(got, [0])


def test_shipped_weights_load_frozen_unit_descriptors():
  if not ASSET.exists():
    pytest.skip(f"{ASSET} not present: train it with `python -m experiments.train_dff` "
                "(see dff3d/assets/DFF_README.md)")
  dff = dff_lib.load_frozen_dff(ASSET)
  assert dff.config["descriptor_dim"] == 32
  size = 2 ** dff.config["levels"] * 3
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, size, size, 3))
  desc = jax.jit(dff)(images)
  assert desc.shape == (2, size, size, 32)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(desc), axis=-1), 1.0, atol=1e-4)
  assert ASSET.stat().st_size <= 20e6


def test_frozen_dff_gives_no_gradient_to_params(tmp_path):
  net = dff_lib.DFFNet(width=4, levels=1, descriptor_dim=8)
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, 8, 8, 3))
  params = jax.jit(net.init)(jax.random.key(0, impl="unsafe_rbg"), x)["params"]
  path = tmp_path / "dff.npz"
  dff_lib.save_dff_params(path, params, net)
  dff = dff_lib.load_frozen_dff(path)
  # the frozen function takes only images: its jaxpr has exactly one input
  assert len(jax.make_jaxpr(dff)(x).jaxpr.invars) == 1
  # gradients w.r.t. the params through frozen_apply are exactly zero; the image gets some
  _, loaded = dff_lib.load_dff(path)
  g = jax.jit(jax.grad(lambda p: jnp.sum(dff_lib.frozen_apply(net, p, x)[..., 0])))(loaded)
  assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree_util.tree_leaves(g))
  gx = jax.jit(jax.grad(lambda im: jnp.sum(dff(im)[..., 0])))(x)
  assert float(jnp.abs(gx).max()) > 0.0


def test_load_dff_as_widens_a_half_width_file_and_refuses_others(tmp_path):
  net = dff_lib.DFFNet(width=4, levels=2, descriptor_dim=8)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  path = tmp_path / "narrow.npz"
  dff_lib.save_dff_params(path, params, net, dtype=np.float32)
  same, widened = dff_lib.load_dff_as(path, net, jax.random.PRNGKey(0))
  assert not widened
  np.testing.assert_array_equal(same["out"]["kernel"], params["out"]["kernel"])
  key = jax.random.PRNGKey(3)
  got, widened = dff_lib.load_dff_as(path, net.clone(width=8), key)
  _, expected = dff_lib.widen(params, net, key, light.WIDEN_NOISE)
  assert widened
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(dff_lib.DFFFileError, match="narrow.npz.*neither"):
    dff_lib.load_dff_as(path, net.clone(width=12), key)
