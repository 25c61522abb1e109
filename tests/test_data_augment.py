"""Augmentations and face crops (dff3d.data.augment): images and landmarks move together."""

import numpy as np
import pytest

from dff3d import landmarks as landmarks_lib
from dff3d.data import augment


def blob_image(h, w, centres, sigma=1.5, channel=None, amplitude=0.7):
  """(h, w, 3) float32 with Gaussian dots at `centres` (dff3d pixels: centre (j+.5, i+.5))."""
  ys, xs = np.mgrid[0:h, 0:w] + 0.5
  img = np.zeros((h, w, 3), np.float32)
  for k, (cx, cy) in enumerate(np.asarray(centres, np.float64)):
    g = amplitude * np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma ** 2))
    chans = [k % 3] if channel is None else [channel]
    for c in chans:
      img[..., c] += g.astype(np.float32)
  return img


def centroid(channel_image):
  """Intensity-weighted centre of a single-channel image, in dff3d pixels."""
  h, w = channel_image.shape
  ys, xs = np.mgrid[0:h, 0:w] + 0.5
  m = channel_image.sum()
  return np.array([(xs * channel_image).sum() / m, (ys * channel_image).sum() / m])


def face_points(rng, centre=(40.0, 44.0), radius=14.0):
  return (np.asarray(centre) + rng.uniform(-radius, radius, (68, 2))).astype(np.float32)


def test_warp_identity_and_integer_shift_are_exact():
  rng = np.random.default_rng(0)
  img = rng.uniform(size=(12, 10, 3)).astype(np.float32)
  ident = np.array([[1.0, 0, 0], [0, 1.0, 0]])
  np.testing.assert_allclose(augment.warp_affine(img, ident, 12, 10), img, atol=1e-6)
  shift = np.array([[1.0, 0, 3], [0, 1.0, 2]])  # content moves 3 right, 2 down
  out = augment.warp_affine(img, shift, 12, 10)
  np.testing.assert_allclose(out[2:, 3:], img[:-2, :-3], atol=1e-6)
  assert not out[:2].any() and not out[:, :3].any()  # outside the source: black
  u8 = (img * 255).astype(np.uint8)
  np.testing.assert_allclose(augment.warp_affine(u8, ident, 12, 10), u8 / 255.0, atol=1e-6)


def test_flip_twice_is_identity():
  rng = np.random.default_rng(1)
  img = rng.uniform(size=(20, 17, 3)).astype(np.float32)
  pts = face_points(rng, (8.0, 10.0), 6.0)
  i1, p1 = augment.flip(img, pts)
  i2, p2 = augment.flip(i1, p1)
  np.testing.assert_array_equal(i2, img)
  np.testing.assert_allclose(p2, pts, atol=1e-5)


def test_flip_keeps_landmark_semantics():
  """A dot at the subject's right jaw end (0) sits, after the flip, at landmark 16's place."""
  rng = np.random.default_rng(2)
  pts = face_points(rng)
  img = blob_image(80, 90, [pts[0]], channel=0)
  fimg, fpts = augment.flip(img, pts)
  np.testing.assert_allclose(centroid(fimg[..., 0]), fpts[16], atol=0.05)
  np.testing.assert_allclose(fpts[16], [90 - pts[0, 0], pts[0, 1]], atol=1e-5)


def test_random_flip_draws_both_ways():
  rng = np.random.default_rng(3)
  img = np.zeros((4, 6, 3), np.float32)
  img[:, 0] = 1.0
  pts = face_points(rng, (3.0, 2.0), 1.0)
  flipped = [augment.random_flip(img, pts, rng)[0][0, -1, 0] == 1.0 for _ in range(40)]
  assert 5 < sum(flipped) < 35
  never = [augment.random_flip(img, pts, rng, prob=0.0)[0][0, -1, 0] for _ in range(5)]
  assert not any(never)


@pytest.mark.parametrize("angle", [-30.0, 17.0, 90.0])
def test_rotation_moves_landmarks_with_the_image(angle):
  rng = np.random.default_rng(4)
  pts = face_points(rng)
  img = blob_image(80, 90, [pts[5]], channel=1)
  rimg, rpts = augment.rotate(img, pts, angle)
  np.testing.assert_allclose(centroid(rimg[..., 1]), rpts[5], atol=0.08)
  # Counter-clockwise on screen: a point right of the centre moves up (smaller y).
  _, p = augment.rotate(img, np.array([[55.0, 40.0]]), 30.0, centre=(45.0, 40.0))
  assert p[0, 1] < 40.0 and p[0, 0] < 55.0


def test_random_rotation_range():
  rng = np.random.default_rng(5)
  img = np.zeros((32, 32, 3), np.float32)
  for _ in range(20):
    _, p = augment.random_rotation(img, np.array([[26.0, 16.0]]), rng, max_degrees=30.0)
    angle = np.degrees(np.arctan2(-(p[0, 1] - 16.0), p[0, 0] - 16.0))
    assert -30.0 <= angle <= 30.0


def test_colour_scaling_within_bounds():
  rng = np.random.default_rng(6)
  img = rng.uniform(0.05, 0.7, (16, 16, 3)).astype(np.float32)
  pts = face_points(rng, (8.0, 8.0), 4.0)
  for _ in range(10):
    out, p = augment.random_colour_scale(img, pts, rng)
    ratio = out / img
    per_channel = ratio.reshape(-1, 3)
    np.testing.assert_allclose(per_channel, per_channel[:1].repeat(len(per_channel), 0),
                               rtol=1e-5)  # one factor per channel
    assert np.all((ratio >= 0.7 - 1e-6) & (ratio <= 1.3 + 1e-6))
    np.testing.assert_array_equal(p, pts)
  bright = np.ones((4, 4, 3), np.float32)
  out = augment.scale_colours(bright, [1.3, 1.0, 0.7])
  assert out.max() <= 1.0 and out.min() >= 0.0
  np.testing.assert_allclose(out[0, 0], [1.0, 1.0, 0.7])


def test_face_box_square_enlarged_and_shifted():
  pts = np.array([[10.0, 20.0], [30.0, 20.0], [20.0, 60.0]] + [[20.0, 40.0]] * 65)
  box = augment.face_box(pts, scale=1.5, shift_up=0.1)
  np.testing.assert_allclose(box[2] - box[0], 60.0)  # 1.5 x max(20, 40)
  np.testing.assert_allclose(box[3] - box[1], 60.0)
  np.testing.assert_allclose([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], [20.0, 36.0])
  vis = np.zeros(68, bool)
  vis[:2] = True  # only the two brow-level points count
  with pytest.raises(ValueError, match="no usable landmarks"):
    augment.face_box(pts, np.zeros(68, bool))
  np.testing.assert_allclose(augment.face_box(pts, np.zeros(68, bool), image_shape=(30, 50)),
                             [0, -10, 50, 40])
  np.testing.assert_allclose(augment.face_box(pts, vis, scale=1.0, shift_up=0.0),
                             [10, 10, 30, 30])


def test_crop_maps_landmarks_to_the_image_content():
  rng = np.random.default_rng(8)
  pts = face_points(rng, (60.0, 50.0), 20.0)
  img = blob_image(100, 120, [pts[30]], channel=2, sigma=2.0)
  cimg, cpts, a = augment.crop_to_landmarks(img, pts, 48)
  assert cimg.shape == (48, 48, 3) and cimg.dtype == np.float32
  np.testing.assert_allclose(centroid(cimg[..., 2]), cpts[30], atol=0.08)
  # the affine is the one that moved the points
  np.testing.assert_allclose(cpts, pts @ a[:, :2].T + a[:, 2], atol=1e-4)
  box = augment.face_box(pts)
  np.testing.assert_allclose(augment.transform_points(a, box.reshape(2, 2)), [[0, 0], [48, 48]],
                             atol=1e-4)


def test_augmented_crop_matches_sequential_steps():
  rng = np.random.default_rng(9)
  pts = face_points(rng, (60.0, 50.0), 20.0)
  img = blob_image(100, 120, pts[[30, 36, 8]], sigma=2.0)
  cfg = augment.AugmentConfig(flip_prob=1.0, max_rotation_deg=25.0, colour_range=None)
  out = augment.augmented_crop(img, pts, None, np.random.default_rng(0), 64, cfg)
  angle = np.random.default_rng(0)
  angle.uniform()  # the flip draw
  angle = angle.uniform(-25.0, 25.0)
  cimg, cpts, _ = augment.crop_to_landmarks(img, pts, 64)
  rimg, rpts = augment.rotate(cimg, cpts, angle)
  fimg, fpts = augment.flip(rimg, rpts)
  np.testing.assert_allclose(out["landmarks"], fpts, atol=1e-3)
  assert np.abs(out["image"] - fimg).max() < 0.15  # one resampling versus three
  for k, idx in enumerate([30, 36, 8]):  # each dot sits on its (re-ordered) landmark
    where = int(np.flatnonzero(landmarks_lib.FLIP_PERMUTATION == idx)[0])
    np.testing.assert_allclose(centroid(out["image"][..., k]), out["landmarks"][where], atol=0.1)


def test_augmented_crop_no_augment_and_visibility():
  rng = np.random.default_rng(10)
  pts = face_points(rng)
  vis = np.ones(68, bool)
  vis[36] = False
  out = augment.augmented_crop(np.zeros((80, 90, 3), np.uint8), pts, vis, rng, 32)
  cimg, cpts, a = augment.crop_to_landmarks(np.zeros((80, 90, 3)), pts, 32, visible=vis)
  np.testing.assert_allclose(out["landmarks"], cpts, atol=1e-4)
  np.testing.assert_allclose(out["affine"], a, atol=1e-5)
  np.testing.assert_array_equal(out["landmarks_visible"], vis)
  flip = augment.AugmentConfig(flip_prob=1.0, max_rotation_deg=0.0, colour_range=None)
  out = augment.augmented_crop(np.zeros((80, 90, 3)), pts, vis, rng, 32, flip)
  assert not out["landmarks_visible"][45] and out["landmarks_visible"][36]
  with pytest.raises(ValueError, match="needs a flip permutation for 34 points"):
    augment.augmented_crop(np.zeros((80, 90, 3)), pts[:34], None, rng, 32, flip)


def test_transform_rotation_follows_the_augmented_landmarks():
  """A face rendered at rotation R, cropped, turned and (half the time) mirrored by
  augmented_crop, has the landmarks of the face rendered at transform_rotation(R, affine):
  equal up to translation and scale (the crop's), to 1e-3 of the landmarks' spread."""
  import jax.numpy as jnp
  from dff3d import camera
  from dff3d import morphable_model as mm
  from dff3d import render as render_lib
  model = mm.default_model()

  def landmarks(rotation, size):
    c = mm.zero_coefficients(model, 1).replace(
        rotation=camera.angles_from_matrix(jnp.asarray(rotation, jnp.float32))[None])
    _, screen, _ = render_lib.camera_vertices(model, c, (size, size))
    return np.asarray(mm.landmark_points(model, screen)[0, :, :2], np.float64)

  def normalised(p):
    p = p - p.mean(0)
    return p / np.sqrt(np.square(p).sum(1).mean())

  rng = np.random.default_rng(0)
  cfg = augment.AugmentConfig(flip_prob=0.5, max_rotation_deg=30.0, colour_range=None)
  flips = 0
  for trial in range(8):
    angles = np.deg2rad([rng.uniform(-20, 20), rng.uniform(-70, 70), rng.uniform(-20, 20)])
    rotation = np.asarray(camera.rotation_matrix(jnp.asarray(angles, jnp.float32)))
    out = augment.augmented_crop(np.zeros((120, 120, 3), np.uint8), landmarks(rotation, 120),
                                 None, np.random.default_rng(trial), 96, cfg)
    flips += np.linalg.det(out["affine"][:, :2]) < 0
    moved = augment.transform_rotation(rotation, out["affine"])
    assert moved.dtype == np.float32 and np.linalg.det(moved) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(normalised(landmarks(moved, 96)), normalised(out["landmarks"]),
                               atol=1e-3)
  assert 0 < flips < 8  # both branches ran


def test_jitter_box_scale_and_shift_ranges():
  box = np.array([10.0, 20.0, 110.0, 220.0])  # 100 x 200
  rng = np.random.default_rng(0)
  out = np.stack([augment.jitter_box(box, rng, 0.1, 0.05) for _ in range(4000)])
  ratio = (out[:, 2:] - out[:, :2]) / [100.0, 200.0]
  np.testing.assert_allclose(ratio[:, 0], ratio[:, 1], rtol=1e-5)  # one factor for both
  assert 0.9 <= ratio.min() < 0.902 and 1.098 < ratio.max() <= 1.1
  shift = ((out[:, :2] + out[:, 2:]) / 2 - [60.0, 120.0]) / [100.0, 200.0]
  assert np.all(np.abs(shift) <= 0.05 + 1e-6) and np.all(np.abs(shift).max(0) > 0.049)
  assert abs(shift.mean()) < 0.003 and abs(ratio.mean() - 1) < 0.003
  np.testing.assert_allclose(augment.jitter_box(box, rng, 0.0, 0.0), box)


def test_augmented_crop_box_jitter_reframes_and_keeps_points_on_the_image():
  rng = np.random.default_rng(11)
  pts = face_points(rng, (60.0, 50.0), 20.0)
  img = blob_image(100, 120, pts[[30, 36, 8]], sigma=2.0)
  kw = dict(flip_prob=0.5, max_rotation_deg=20.0, colour_range=(0.8, 1.2))
  # off (the default): exactly the draws and crops of before
  a = augment.augmented_crop(img, pts, None, np.random.default_rng(3), 64,
                             augment.AugmentConfig(**kw))
  b = augment.augmented_crop(img, pts, None, np.random.default_rng(3), 64,
                             augment.AugmentConfig(**kw, box_scale_jitter=0.0))
  np.testing.assert_array_equal(a["image"], b["image"])
  jit = augment.AugmentConfig(flip_prob=0.0, max_rotation_deg=20.0, colour_range=None,
                              box_scale_jitter=0.15, box_shift_jitter=0.1)
  sides, centres, checked = [], [], 0
  for seed in range(40):
    out = augment.augmented_crop(img, pts, None, np.random.default_rng(seed), 64, jit)
    p = out["landmarks"]
    np.testing.assert_allclose(p, augment.transform_points(out["affine"], pts), atol=1e-3)
    for k, idx in enumerate([30, 36, 8]):  # each dot still sits on its landmark (unless
      if np.all(p[idx] > 7) and np.all(p[idx] < 57):  # the re-framed crop cuts the dot)
        np.testing.assert_allclose(centroid(out["image"][..., k]), p[idx], atol=0.15)
        checked += 1
    sides.append(np.sqrt(np.mean(np.sum(np.square(p - p.mean(0)), -1))))  # any rotation
    centres.append(p.mean(0))
  q = augment.crop_to_landmarks(img, pts, 64)[1]
  sides = np.array(sides) / np.sqrt(np.mean(np.sum(np.square(q - q.mean(0)), -1)))
  # the face's size in the crop varies with the box (1 / U(0.85, 1.15)), and its place
  assert sides.min() < 0.93 and sides.max() > 1.07 and sides.max() < 1 / 0.85 + 0.01
  assert np.ptp(np.array(centres), 0).min() > 5
  assert checked > 80


def test_box_jitter_prob_jitters_that_share_of_crops_and_one_keeps_the_old_draws():
  rng = np.random.default_rng(5)
  pts = face_points(rng, (60.0, 50.0), 20.0)
  img = blob_image(100, 120, pts[[30, 36, 8]], sigma=2.0)
  plain = augment.AugmentConfig(flip_prob=0.0, max_rotation_deg=0.0, colour_range=None)
  ref = augment.augmented_crop(img, pts, None, np.random.default_rng(0), 64, plain)["affine"]
  jit = dict(flip_prob=0.0, max_rotation_deg=0.0, colour_range=None, box_scale_jitter=0.15,
             box_shift_jitter=0.1)
  def moved(prob, seed):
    cfg = augment.AugmentConfig(**jit, box_jitter_prob=prob)
    a = augment.augmented_crop(img, pts, None, np.random.default_rng(seed), 64, cfg)["affine"]
    return not np.allclose(a, ref, atol=1e-5)
  share = np.mean([moved(0.3, seed) for seed in range(400)])
  assert 0.23 < share < 0.37
  assert not any(moved(0.0, seed) for seed in range(20))
  for seed in range(5):  # prob 1 (the default): the same draws as before the option existed
    a = augment.augmented_crop(img, pts, None, np.random.default_rng(seed), 64,
                               augment.AugmentConfig(**jit))
    b = augment.augmented_crop(img, pts, None, np.random.default_rng(seed), 64,
                               augment.AugmentConfig(**jit, box_jitter_prob=1.0))
    np.testing.assert_array_equal(a["affine"], b["affine"])
