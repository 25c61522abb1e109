"""Quarter turns (dff3d.orientation): the upright crops' geometry, the photo-frame pose, the
classifier file, and the shipped classifier on real faces turned every way."""

import json

import numpy as np
import pytest

from dff3d import camera
from dff3d import morphable_model as mm
from dff3d import orientation
from dff3d import reconstruction
from dff3d import render as render_lib
from dff3d.data import augment
from tests.conftest import AFLW_SAMPLE_DIR


turn_photo = augment.quarter_turn


def face_points(seed=0):
  rng = np.random.default_rng(seed)
  base = np.stack([np.linspace(40, 90, 68), 30 + 40 * np.abs(np.sin(np.arange(68)))], -1)
  return base + rng.normal(0, 1, base.shape)


def test_quarter_turn_turns_counter_clockwise_like_rotation_affine():
  image = np.arange(40 * 60 * 3, dtype=np.float32).reshape(40, 60, 3)
  pts = np.array([[50.0, 10.0, 7.0], [12.0, 33.0, -2.0]])
  out, turned = turn_photo(image, pts, 1)
  assert out.shape == (60, 40, 3)
  # rotation_affine(90) about the photo centre, then moved so the turned photo starts at 0
  a = augment.rotation_affine(90.0, (30.0, 20.0))
  expected = augment.transform_points(a, pts[:, :2]) + np.array([20.0 - 30.0, 30.0 - 20.0])
  np.testing.assert_allclose(turned[:, :2], expected, atol=1e-4)
  np.testing.assert_array_equal(turned[:, 2], pts[:, 2])
  # the pixel under a point moves with it (pixel centres at integer + 0.5)
  x, y = 50.5, 10.5
  tx, ty = turn_photo(image, np.array([[x, y]]), 1)[1][0]
  np.testing.assert_array_equal(out[int(ty), int(tx)], image[int(y), int(x)])
  for k in range(4):  # four turns are the identity; k and k + 4 agree
    np.testing.assert_array_equal(turn_photo(image, pts, k + 4)[0], turn_photo(image, pts, k)[0])
  back = turn_photo(*turn_photo(image, pts, 3), 1)
  np.testing.assert_array_equal(back[0], image)
  np.testing.assert_allclose(back[1], pts, atol=1e-9)


def test_no_turn_is_the_library_framing():
  pts = face_points()
  _, _, a = augment.crop_to_landmarks(np.zeros((150, 150, 3), np.float32), pts, 96)
  np.testing.assert_allclose(orientation.upright_crop_affine(pts, 0, 96), a, atol=1e-4)
  box = augment.face_box(pts)
  np.testing.assert_allclose(orientation.upright_box_affine(box, 0, 96),
                             augment.crop_affine(box, 96), atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_upright_crop_of_a_turned_photo_is_the_upright_crop(k):
  rng = np.random.default_rng(k)
  image = rng.uniform(0, 1, (150, 170, 3)).astype(np.float32)
  pts = face_points(k)
  crop0, lm0, _ = augment.crop_to_landmarks(image, pts, 64)
  turned, tpts = turn_photo(image, pts, k)
  a = orientation.upright_crop_affine(tpts, k, 64)
  np.testing.assert_allclose(augment.transform_points(a, tpts), lm0, atol=2e-3)
  crop = augment.warp_affine(turned, a, 64, 64)
  inner = (slice(2, -2), slice(2, -2))  # border pixels may sample outside differently
  np.testing.assert_allclose(crop[inner], crop0[inner], atol=2e-3)
  # the box's own turn: same crop as crop_affine of the box in the upright photo
  box0 = augment.face_box(pts)
  corners = turn_photo(image, np.reshape(box0, (2, 2)), k)[1]
  tbox = np.concatenate([corners.min(0), corners.max(0)])
  crop_b = augment.warp_affine(turned, orientation.upright_box_affine(tbox, k, 64), 64, 64)
  np.testing.assert_allclose(crop_b[inner], augment.warp_affine(
      image, augment.crop_affine(box0, 64), 64, 64)[inner], atol=2e-3)


def test_classifier_crop_turns_with_the_face():
  """The classifier's crop is centred (no shift up), so a turned photo's crop is the turned
  crop: the classifier sees the turn itself and nothing else."""
  rng = np.random.default_rng(5)
  image = rng.uniform(0, 1, (150, 170, 3)).astype(np.float32)
  pts = face_points(3)
  crop0 = orientation.classifier_crop(image, pts)
  for k in (1, 2, 3):
    turned, tpts = turn_photo(image, pts, k)
    np.testing.assert_allclose(orientation.classifier_crop(turned, tpts)[2:-2, 2:-2],
                               np.rot90(crop0, k)[2:-2, 2:-2], atol=2e-3)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_photo_rotation_turns_the_projected_face_like_the_photo(k):
  """Landmarks projected with photo_rotation's angles are the crop's landmarks turned by k
  quarter turns about the principal point (the sign and order of the roll)."""
  model = mm.default_model()
  c = mm.zero_coefficients(model, 1)
  c = c.replace(rotation=np.array([[0.2, -0.5, 0.1]], np.float32))
  _, screen, _ = render_lib.camera_vertices(model, c, (96, 96))
  lm = np.asarray(mm.landmark_points(model, screen))[0, :, :2]
  turned = c.replace(rotation=reconstruction.photo_rotation(c.rotation[0], k)[None])
  _, screen_t, _ = render_lib.camera_vertices(model, turned, (96, 96))
  lm_t = np.asarray(mm.landmark_points(model, screen_t))[0, :, :2]
  expected = augment.transform_points(augment.rotation_affine(90.0 * k, (48.0, 48.0)), lm)
  np.testing.assert_allclose(lm_t, expected, atol=1e-2)
  r = np.asarray(camera.rotation_matrix(reconstruction.photo_rotation(c.rotation[0], k)))
  assert np.allclose(r @ r.T, np.eye(3), atol=1e-5)


def test_file_round_trip_and_one_line_errors(tmp_path):
  import jax
  import jax.numpy as jnp
  s = orientation.INPUT_SIZE
  small = orientation.make_network(0.25)  # a narrower file loads as its config says
  params = small.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)))["params"]
  path = tmp_path / "o.npz"
  orientation.save_orientation(path, params, width=0.25)
  classify = orientation.load_orientation(path)
  p = np.asarray(classify(np.zeros((3, s, s, 3), np.float32)))
  assert p.shape == (3, 4) and np.allclose(p.sum(-1), 1, atol=1e-5)
  with pytest.raises(orientation.OrientationFileError, match="not found"):
    orientation.load_orientation(tmp_path / "missing.npz")
  (tmp_path / "bad.npz").write_bytes(b"not a zip")
  with pytest.raises(orientation.OrientationFileError, match="bad.npz: not a readable .npz"):
    orientation.load_orientation(tmp_path / "bad.npz")
  with np.load(path) as z:  # a file whose config lies about its arrays
    arrays = dict(z)
  arrays[orientation.CONFIG_KEY] = np.array(json.dumps(
      {"width": 0.5, "input_size": s, "crop_scale": orientation.CROP_SCALE}))
  np.savez(tmp_path / "lie.npz", **arrays)
  with pytest.raises(orientation.OrientationFileError, match="lie.npz: .*has shape") as info:
    orientation.load_orientation(tmp_path / "lie.npz")
  assert "\n" not in str(info.value) and "lie.npz" in str(info.value)
  arrays[orientation.CONFIG_KEY] = np.array(json.dumps(
      {"width": 0.25, "input_size": 64, "crop_scale": orientation.CROP_SCALE}))
  np.savez(tmp_path / "old.npz", **arrays)
  with pytest.raises(orientation.OrientationFileError, match="made for 64 px crops"):
    orientation.load_orientation(tmp_path / "old.npz")


def test_from_regressor_takes_the_backbone_and_keeps_the_head():
  import jax
  import jax.numpy as jnp
  from dff3d import train
  reg, _ = train.read_params("shipped", mm.default_model())
  s = orientation.INPUT_SIZE
  own = orientation.make_network().init(jax.random.PRNGKey(1), jnp.zeros((1, s, s, 3)))["params"]
  out = orientation.from_regressor(own, reg)
  assert out["head"] is own["head"] and out["stem"] is reg["stem"]
  small = orientation.make_network(0.25).init(jax.random.PRNGKey(1),
                                              jnp.zeros((1, s, s, 3)))["params"]
  with pytest.raises(ValueError, match="does not match"):
    orientation.from_regressor(small, reg)


def test_quarter_turns_pads_batches_and_keeps_order():
  seen = []

  def classify(x):
    seen.append(x.shape)
    # the "turn" is read from the crop's mean brightness: 0.1 -> 0, 0.9 -> 2
    m = np.asarray(x).mean(axis=(1, 2, 3))
    return np.eye(4)[np.where(m > 0.5, 2, 0)]

  faces = [(np.full((80, 80, 3), v, np.float32), face_points()) for v in (0.1, 0.9, 0.9)]
  k = orientation.quarter_turns(classify, faces, batch_size=2)
  s = orientation.INPUT_SIZE
  assert k.tolist() == [0, 2, 2] and seen == [(2, s, s, 3), (2, s, s, 3)]
  assert orientation.quarter_turns(classify, []).shape == (0,)


def sample_faces():
  from dff3d import io
  from dff3d.datasets import aflw2000_3d
  folder = AFLW_SAMPLE_DIR
  if not folder.is_dir():
    pytest.skip(f"{folder} not present (research data, not in the repository)")
  out = []
  for img, mat in aflw2000_3d.list_aflw2000_3d(folder).pairs:
    lab = aflw2000_3d.load_aflw2000_3d_mat(mat)
    out.append((io.read_image(img), lab["landmarks_3d"][:, :2] + 0.5))
  return out


def test_shipped_classifier_reads_real_faces_turned_every_way():
  faces = sample_faces()
  classify = orientation.load_orientation()
  for k in range(4):
    turned = [turn_photo(image, pts, k) for image, pts in faces]
    got = orientation.quarter_turns(classify, turned)
    assert np.mean(got == k) >= 15 / 16, (k, got)


def test_regressor_reads_an_upside_down_photo_as_the_upright_one():
  """The shipped regressor on the sample photos turned by 180 degrees: cropped upright, its
  landmarks (back in the turned photo) match the upright photo's own; cropped as they are,
  they do not."""
  from dff3d import fitting
  from dff3d import metrics
  from dff3d import train
  faces = sample_faces()[:8]
  model = mm.default_model()
  reg = train.load_regressor()
  cfg = fitting.FitConfig(image_size=96, photo_steps=0, contour="fixed")
  upright = reconstruction.reconstruct_faces(model, faces, cfg, 8, reg)
  turned = [turn_photo(image, pts, 2) for image, pts in faces]
  ref = np.stack([turn_photo(image, f.landmarks_2d, 2)[1]
                  for (image, _), f in zip(faces, upright)])
  gt = np.stack([pts for _, pts in turned])
  as_is = reconstruction.reconstruct_faces(model, turned, cfg, 8, reg)
  read = reconstruction.reconstruct_faces(model, turned, cfg, 8, reg,
                                          orientation=orientation.load_orientation())
  assert [f.quarter_turns for f in read] == [2] * 8
  pred = np.stack([f.landmarks_2d for f in read])
  assert np.max(metrics.nme_2d(pred, ref)) < 1e-3
  assert np.mean(metrics.nme_2d(pred, gt)) < 0.08
  assert np.mean(metrics.nme_2d(np.stack([f.landmarks_2d for f in as_is]), gt)) > 0.2
  # the pose comes back in the photo's frame: the upright face's roll plus 180 degrees
  for f, g in zip(read, upright):
    droll = np.rad2deg(f.photo_rotation[2] - g.photo_rotation[2]) % 360
    assert abs(droll - 180) < 1, droll


def test_dihedral_average_is_equivariant_for_any_network():
  """Averaged over the 8 views, the probabilities turn with the crop (k -> k + j) and mirror
  with it (k -> -k), whatever the classifier: here one that reads arbitrary patches."""
  import jax
  import jax.numpy as jnp
  s = orientation.INPUT_SIZE

  def probs(x):
    logits = jnp.stack([x[:, :s // 2, :s // 3, 0].mean((1, 2)), x[:, :s // 4, :, 1].mean((1, 2)),
                        x[:, s // 2:, s // 2:, 2].mean((1, 2)), x[:, 5:20, 40:70, 0].mean((1, 2))],
                       -1)
    return jax.nn.softmax(30.0 * logits, -1)

  crops = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, s, s, 3)), jnp.float32)
  p = np.asarray(orientation.dihedral_average(probs, crops))
  assert np.allclose(p.sum(-1), 1, atol=1e-5) and np.ptp(p) > 0.05  # not uniform
  for j in (1, 2, 3):
    pj = np.asarray(orientation.dihedral_average(probs, jnp.rot90(crops, j, axes=(1, 2))))
    np.testing.assert_allclose(pj, np.roll(p, j, axis=1), atol=1e-5)
  pm = np.asarray(orientation.dihedral_average(probs, crops[:, :, ::-1]))
  np.testing.assert_allclose(pm, p[:, [0, 3, 2, 1]], atol=1e-5)


def test_unsure_faces_stay_as_they_are():
  faces = [(np.zeros((80, 80, 3), np.float32), face_points())] * 3
  table = np.array([[0.1, 0.85, 0.05, 0.0], [0.35, 0.0, 0.65, 0.0], [0.0, 0.0, 0.0, 1.0]])
  classify = lambda x: np.concatenate([table, np.tile(table[:1], (len(x) - 3, 1))])
  assert orientation.TURN_PROBABILITY == 0.7
  assert orientation.quarter_turns(classify, faces).tolist() == [1, 0, 3]
  assert orientation.quarter_turns(classify, faces, min_probability=0.6).tolist() == [1, 2, 3]
  assert orientation.quarter_turns(classify, faces, min_probability=0.9).tolist() == [0, 0, 3]


def test_box_points_undo_the_face_box_framing():
  pts = face_points(2)
  inner = orientation.box_points(augment.face_box(pts, shift_up=0.0))
  np.testing.assert_allclose(inner.mean(0), orientation.points_centre(pts), atol=1e-3)
  assert np.ptp(inner, 0).max() == pytest.approx(np.ptp(pts, 0).max(), rel=1e-4)
