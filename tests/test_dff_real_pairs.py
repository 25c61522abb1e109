"""DFF training on real cross-crop pairs: views of crops from their fitted coefficients, mixed
synthetic + real batches, and the fitted coefficients stored by write_pseudo68.

Synthetic faces with known coefficients stand in for real crops with fitted ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dff3d import coefficients as coeffs_lib
from dff3d import dff_training
from dff3d import morphable_model as mm
from dff3d import render as render_lib
from dff3d import synthetic
from dff3d.data import real
from dff3d.datasets import aflw_3ddfa
from dff3d.datasets.aflw2000_3d import DatasetFormatError
from dff3d.models import dff as dff_lib
from tests import test_aflw_3ddfa

SIZE = 32
FRONTAL = synthetic.SamplerConfig(max_yaw=25.0, max_pitch=10.0, max_roll=10.0, max_shift=0.5)
_real_views = jax.jit(dff_training.real_views)


@pytest.fixture(scope="module")
def model():
  return mm.default_model()


@pytest.fixture(scope="module")
def faces(model):
  """Three near-frontal synthetic faces at 32 px: the 'real crops' and their coefficients."""
  return synthetic.sample_batch(jax.random.PRNGKey(7), model, 3, SIZE, FRONTAL)


def _crops(faces):
  """uint8 crops as a photo folder would give them."""
  return jnp.asarray(np.round(np.asarray(faces["image"]) * 255).astype(np.uint8))


def test_real_view_is_the_synthetic_render_of_its_coefficients(model, faces):
  view = _real_views(model, _crops(faces), faces["coefficients"])
  assert set(view) == set(dff_training.VIEW_KEYS)
  np.testing.assert_array_equal(np.asarray(view["mask"]), np.asarray(faces["mask"]))
  np.testing.assert_allclose(np.asarray(view["mean_face_position"]),
                             np.asarray(faces["mean_face_position"]), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(view["vertex_id"]), np.asarray(faces["vertex_id"]))
  assert view["image"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(view["image"]), np.asarray(faces["image"]), atol=0.5 / 255)
  assert np.asarray(faces["mask"]).mean(axis=(1, 2)).min() > 0.2  # faces fill the crops


def test_coefficients_hold_at_any_crop_size(model, faces):
  """The default camera scales with the crop: the same fit projects to 2x pixels at 2x size."""
  c = coeffs_lib.split(faces["coefficients"], model.sizes)
  _, small, _ = render_lib.camera_vertices(model, c, (SIZE, SIZE))
  _, large, _ = render_lib.camera_vertices(model, c, (2 * SIZE, 2 * SIZE))
  np.testing.assert_allclose(np.asarray(large[..., :2]), 2 * np.asarray(small[..., :2]),
                             rtol=1e-5, atol=1e-3)


def test_cross_identity_matches_agree_in_mean_face_space_and_hit_the_landmarks(model, faces):
  """Two different faces: matched pixels share mean-face points, and A's nose / eye / mouth
  landmark pixels land on B's pixels of the same landmarks."""
  view = _real_views(model, _crops(faces), faces["coefficients"])
  a = {k: v[:1] for k, v in view.items()}
  b = {k: v[1:2] for k, v in view.items()}
  threshold = 0.3 * 96 / SIZE  # the training threshold scaled to one 32 px pixel footprint
  idx, in_mask = dff_training.sample_mask_pixels(jax.random.PRNGKey(0), a["mask"], 200)
  idx_b, valid = dff_training.match_pixels(idx, a, b, threshold)
  valid = np.asarray(valid & in_mask)[0]
  assert valid.mean() > 0.5
  pos_a = np.asarray(a["mean_face_position"]).reshape(-1, 3)[np.asarray(idx)[0]]
  pos_b = np.asarray(b["mean_face_position"]).reshape(-1, 3)[np.asarray(idx_b)[0]]
  assert np.linalg.norm(pos_a - pos_b, axis=-1)[valid].max() < threshold
  # semantic check: inner landmarks (brows, nose, eyes, mouth: iBUG 17-67) of A -> B
  inner = np.arange(17, 68)
  lm_a, lm_b = (np.asarray(faces["landmarks"][i])[inner] for i in (0, 1))
  seen = np.asarray(faces["landmarks_visible"][0] & faces["landmarks_visible"][1])[inner]
  flat_a = (np.floor(lm_a[:, 1]) * SIZE + np.floor(lm_a[:, 0])).astype(np.int32)
  got, ok = dff_training.match_pixels(jnp.asarray(flat_a[None]), a, b, threshold)
  ok = np.asarray(ok)[0] & seen
  assert ok.sum() > 30
  xy = np.asarray(dff_training.pixel_centres(SIZE, SIZE))[np.asarray(got)[0]]
  assert np.median(np.linalg.norm(xy - lm_b, axis=-1)[ok]) < 1.0


def test_mixed_pairs_put_synthetic_pairs_first_then_the_real_ones(model, faces, monkeypatch):
  """B = 4 pairs, R = 3 real: one synthetic pose pair (stubbed: rendering it is tested with
  pose_pairs), then real pair r = (real_a[r], real_b[r])."""
  def fake_pose_pairs(key, model, batch, size, max_yaw_diff, sampler):
    view = {k: jnp.full((batch,) + faces[k].shape[1:], -1, faces[k].dtype)
            for k in dff_training.VIEW_KEYS}
    return view, {**view, "landmarks": faces["landmarks"][:batch]}  # extra keys are dropped
  monkeypatch.setattr(synthetic, "pose_pairs", fake_pose_pairs)
  monkeypatch.setattr(dff_training, "real_views", _real_views)  # compiled for 3 crops
  crops, flat = _crops(faces), faces["coefficients"]
  order = np.array([1, 2, 0])
  real_a = {"image": crops, "coefficients": flat}
  real_b = {"image": crops[order], "coefficients": flat[order]}
  va, vb = dff_training.mixed_pairs(jax.random.PRNGKey(1), model, 4, SIZE, 30.0,
                                    real_a=real_a, real_b=real_b)
  assert set(va) == set(vb) == set(dff_training.VIEW_KEYS)
  assert va["image"].shape == (4, SIZE, SIZE, 3) and va["mask"].shape == (4, SIZE, SIZE)
  assert (np.asarray(va["vertex_id"][0]) == -1).all()
  for view, rows in ((va, np.arange(3)), (vb, order)):
    np.testing.assert_array_equal(np.asarray(view["mask"][1:]), np.asarray(faces["mask"])[rows])
    np.testing.assert_allclose(np.asarray(view["mean_face_position"][1:]),
                               np.asarray(faces["mean_face_position"])[rows], atol=1e-5)
  with pytest.raises(ValueError, match="3 real pairs of 32 px for a batch of 2 at 32 px"):
    dff_training.mixed_pairs(jax.random.PRNGKey(1), model, 2, SIZE, 30.0,
                             real_a=real_a, real_b=real_b)


def test_train_step_on_a_mixed_batch(model, faces):
  crops, flat = _crops(faces), faces["coefficients"]
  real_a = {"image": crops[:1], "coefficients": flat[:1]}
  real_b = {"image": crops[1:2], "coefficients": flat[1:2]}
  net = dff_lib.DFFNet(width=4, levels=1, descriptor_dim=8)
  state = dff_training.create_train_state(jax.random.key(0, impl="unsafe_rbg"), net, 1e-3,
                                          steps=10, image_size=SIZE, warmup_steps=1)
  config = dff_training.LossConfig(num_anchors=16)
  state, m = dff_training.mixed_train_step(state, jax.random.PRNGKey(2), model, 2, SIZE, 30.0,
                                           config, real_a=real_a, real_b=real_b)
  assert int(state.step) == 1
  assert all(np.isfinite(float(v)) for v in m.values()), m
  assert float(m["valid_anchors"]) > 4 and float(m["grad_norm"]) > 0


# ---- the fitted coefficients on disk --------------------------------------------------------

def test_write_pseudo68_stores_the_fitted_coefficients(tmp_path, model):
  names, *_ = test_aflw_3ddfa._write_layout(tmp_path)
  listing = aflw_3ddfa.load_aflw_3ddfa(tmp_path)
  out = tmp_path / "p68.npz"
  real.write_pseudo68(tmp_path, out, chunk=4)
  p = coeffs_lib.size(model.sizes)
  flat, err, found = aflw_3ddfa.load_pseudo68_coefficients(out, listing.names[::-1], p)
  assert flat.shape == (len(names), p) and flat.dtype == np.float32 and found.all()
  p68, err68, flat2 = real.fit_pseudo68(model, listing.landmarks, listing.visible,
                                        listing.crop_size, chunk=4, return_coefficients=True)
  np.testing.assert_allclose(flat[::-1], flat2, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(err[::-1], err68)
  # the stored coefficients re-render the stored pseudo-68 points
  c = coeffs_lib.split(jnp.asarray(flat[::-1]), model.sizes)
  screen = real._SCREEN(model, c, (listing.crop_size, listing.crop_size))[1]
  stored68, _ = aflw_3ddfa.load_pseudo68(out, listing.names)
  np.testing.assert_allclose(np.asarray(mm.landmark_points(model, screen))[..., :2], stored68,
                             atol=1e-3)
  assert len(real.fit_pseudo68(model, listing.landmarks[:2], listing.visible[:2],
                               listing.crop_size, chunk=4)) == 2  # old callers' 2-tuple


def _write_coefficients(path, names, p, drop=()):
  rng = np.random.default_rng(0)
  arrays = {"names": np.array(names), "landmarks_68": np.zeros((len(names), 68, 2), np.float32),
            "fit_error": np.linspace(0.0, 0.05, len(names)).astype(np.float32),
            "coefficients": rng.normal(size=(len(names), p)).astype(np.float32)}
  np.savez(path, **{k: v for k, v in arrays.items() if k not in drop})
  return arrays


def test_coefficients_reader_partial_files_and_errors(tmp_path):
  names = test_aflw_3ddfa._names()
  arrays = _write_coefficients(tmp_path / "p.npz", names[:3] + ["other.jpg"], 5)
  flat, err, found = aflw_3ddfa.load_pseudo68_coefficients(tmp_path / "p.npz", names, 5)
  np.testing.assert_array_equal(found, [True] * 3 + [False] * 3)
  np.testing.assert_array_equal(flat[:3], arrays["coefficients"][:3])
  np.testing.assert_array_equal(err[:3], arrays["fit_error"][:3])
  assert np.isnan(flat[3:]).all()
  with pytest.raises(DatasetFormatError, match=r"p.npz: coefficients have 5 entries, the "
                                               r"model needs 7"):
    aflw_3ddfa.load_pseudo68_coefficients(tmp_path / "p.npz", names, 7)
  _write_coefficients(tmp_path / "old.npz", names, 5, drop=("coefficients",))
  with pytest.raises(DatasetFormatError,
                     match=r"^old.npz: no 'coefficients' .*re-run data_prep.aflw_pseudo68$"):
    aflw_3ddfa.load_pseudo68_coefficients(tmp_path / "old.npz", names)


def test_load_real_crops_keeps_training_crops_and_pairs_differ(tmp_path, model):
  names, *_ = test_aflw_3ddfa._write_layout(tmp_path)  # 4 train + 2 validation crops
  p = coeffs_lib.size(model.sizes)
  arrays = _write_coefficients(tmp_path / "p.npz", names, p)
  crops = real.load_real_crops(tmp_path, tmp_path / "p.npz", SIZE, model=model)
  assert crops.names == names[:4]  # never the validation crops
  assert crops.images.shape == (4, SIZE, SIZE, 3) and crops.images.dtype == np.uint8
  np.testing.assert_array_equal(crops.coefficients, arrays["coefficients"][:4])
  fit = real.load_real_crops(tmp_path, tmp_path / "p.npz", SIZE, max_fit_error=0.015,
                             model=model)
  assert fit.names == names[:2]  # fit errors 0, 0.01, 0.02, 0.03
  assert real.load_real_crops(tmp_path, tmp_path / "p.npz", SIZE, 3, model=model).names == \
      names[:3]
  a, b = real.real_pair_batch(np.random.default_rng(0), crops, 64)
  assert a["image"].shape == (64, SIZE, SIZE, 3) and b["coefficients"].shape == (64, p)
  row = {tuple(c[:3]): k for k, c in enumerate(crops.coefficients)}
  ia = np.array([row[tuple(c[:3])] for c in a["coefficients"]])
  ib = np.array([row[tuple(c[:3])] for c in b["coefficients"]])
  assert (ia != ib).all() and len(set(ia)) == 4 and len(set(ib)) == 4
  np.testing.assert_array_equal(a["image"], crops.images[ia])


def test_pose_balanced_pairs_draw_every_yaw_group_equally(tmp_path, model):
  names, _, _, yaws = test_aflw_3ddfa._write_layout(tmp_path)  # train yaws -80, -48, -16, 16
  _write_coefficients(tmp_path / "p.npz", names, coeffs_lib.size(model.sizes))
  crops = real.load_real_crops(tmp_path, tmp_path / "p.npz", SIZE, model=model)
  np.testing.assert_array_equal(crops.yaw_deg, yaws[:4])
  w = real.pose_balanced_weights(crops.yaw_deg)  # groups 2, 1, 0, 0
  np.testing.assert_allclose(w, [1 / 3, 1 / 3, 1 / 6, 1 / 6])
  np.testing.assert_allclose(real.pose_balanced_weights([5.0, 10.0, 70.0]), [0.25, 0.25, 0.5])
  row = {tuple(c[:3]): k for k, c in enumerate(crops.coefficients)}
  rows = lambda d: np.array([row[tuple(c[:3])] for c in d["coefficients"]])
  a, b = real.real_pair_batch(np.random.default_rng(0), crops, 6000, pose_balance=True)
  ia, ib = rows(a), rows(b)
  assert (ia != ib).all()
  # the first crop of a pair follows the weights; the second is redrawn on a collision
  np.testing.assert_allclose(np.bincount(ia, minlength=4) / 6000, w, atol=0.02)
  a, b = real.real_pair_batch(np.random.default_rng(0), crops, 6000)
  np.testing.assert_allclose(np.bincount(rows(a), minlength=4) / 6000, 0.25, atol=0.02)
