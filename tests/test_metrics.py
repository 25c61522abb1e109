"""Tests of dff3d.metrics against hand-computed values."""

import numpy as np
import pytest

from dff3d import metrics


def _square_landmarks(size=100.0, k=68, seed=0):
  """(1, k, 2) points inside [0, size]^2 whose bounding box is exactly size x size."""
  rng = np.random.default_rng(seed)
  pts = rng.uniform(0.0, size, (k, 2))
  pts[0], pts[1] = (0.0, 0.0), (size, size)
  return pts[None]


def _rotation(axis, angle):
  axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
  k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
  return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _face_like_cloud(n=2000, seed=0):
  """An anisotropic, asymmetric surface patch (no rotational symmetry for ICP to slip on)."""
  rng = np.random.default_rng(seed)
  x, y = rng.uniform(-1.0, 1.0, (2, n))
  x *= 8.0
  y = 10.0 * y + 1.5 * x
  z = 5.0 - 0.08 * x**2 - 0.04 * y**2 + 2.0 * np.exp(-(x**2 + (y - 2) ** 2) / 4.0) + 0.3 * x
  return np.stack([x, y, z], axis=1)


# ---------------------------------------------------------------------------- 2D NME


def test_nme_2d_known_offset():
  gt = _square_landmarks()
  pred = gt + np.array([3.0, 4.0])
  np.testing.assert_allclose(metrics.nme_2d(pred, gt), [5.0 / 100.0], rtol=1e-12)


def test_nme_2d_ignores_z_and_uses_gt_box():
  gt = np.concatenate([_square_landmarks(), np.zeros((1, 68, 1))], axis=-1)
  pred = gt + np.array([3.0, 4.0, 1000.0])
  # A 200 x 50 box: sqrt(w h) = 100 as well.
  gt_rect = gt * np.array([2.0, 0.5, 1.0])
  pred_rect = gt_rect + np.array([3.0, 4.0, -7.0])
  out = metrics.nme_2d(np.concatenate([pred, pred_rect]), np.concatenate([gt, gt_rect]))
  np.testing.assert_allclose(out, [0.05, 0.05], rtol=1e-12)


def test_nme_2d_explicit_normaliser():
  gt = _square_landmarks()
  pred = gt + np.array([3.0, 4.0])
  np.testing.assert_allclose(metrics.nme_2d(pred, gt, norm=50.0), [0.1], rtol=1e-12)
  np.testing.assert_allclose(metrics.nme_2d(pred, gt, norm=np.array([10.0])), [0.5])
  with pytest.raises(ValueError, match="norm"):
    metrics.nme_2d(pred, gt, norm="interocular")


def test_nme_2d_shape_errors():
  with pytest.raises(ValueError, match="disagree"):
    metrics.nme_2d(np.zeros((1, 68, 2)), np.zeros((1, 67, 2)))
  with pytest.raises(ValueError, match="expected shape"):
    metrics.nme_2d(np.zeros((68, 2)), np.zeros((68, 2)))


def test_nme_visible_uses_visible_points_and_their_box():
  # 4 points; only the first 3 are visible; their box is 40 x 10 -> sqrt = 20.
  gt = np.array([[[0.0, 0.0], [40.0, 10.0], [20.0, 5.0], [500.0, 500.0]]])
  pred = gt.copy()
  pred[0, 0] += (3.0, 4.0)  # error 5
  pred[0, 1] += (0.0, 2.0)  # error 2
  pred[0, 3] += (300.0, 0.0)  # invisible, ignored
  mask = np.array([[True, True, True, False]])
  # mean error over visible = (5 + 2 + 0) / 3; normaliser 20.
  np.testing.assert_allclose(metrics.nme_visible(pred, gt, mask), [7.0 / 3.0 / 20.0])


def test_nme_visible_all_visible_matches_nme_2d_and_empty_is_nan():
  gt = np.concatenate([_square_landmarks(seed=1)[:, :34], _square_landmarks(seed=2)[:, :34]])
  pred = gt + np.random.default_rng(3).normal(size=gt.shape)
  mask = np.ones(gt.shape[:2], bool)
  np.testing.assert_allclose(metrics.nme_visible(pred, gt, mask), metrics.nme_2d(pred, gt))
  mask[1] = False
  out = metrics.nme_visible(pred, gt, mask)
  assert np.isfinite(out[0]) and np.isnan(out[1])


# ---------------------------------------------------------------------------- yaw groups


def test_yaw_group_boundaries():
  yaw = np.array([0.0, 30.0, 30.0001, -30.0, -30.0001, 60.0, 60.0001, 90.0, -89.0, 120.0])
  np.testing.assert_array_equal(metrics.yaw_groups(yaw), [0, 0, 1, 0, 1, 1, 2, 2, 2, 2])


def test_yaw_groups_rejects_nan():
  with pytest.raises(ValueError, match="non-finite"):
    metrics.yaw_groups(np.array([1.0, np.nan]))


def test_grouped_nme_mean_of_group_means():
  yaw = np.array([10.0, -20.0, 5.0, 45.0, -70.0, 80.0])
  nme = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.07])
  out = metrics.grouped_nme(nme, yaw)
  assert out["nme_0_30"] == pytest.approx(0.02)
  assert out["nme_30_60"] == pytest.approx(0.04)
  assert out["nme_60_90"] == pytest.approx(0.06)
  assert out["nme_mean"] == pytest.approx(0.04)  # not the plain mean 0.0367
  assert (out["count_0_30"], out["count_30_60"], out["count_60_90"], out["count"]) == (3, 1, 2, 6)


def test_grouped_nme_empty_group_is_nan_and_skipped_in_mean():
  out = metrics.grouped_nme(np.array([0.01, 0.03, 0.05]), np.array([0.0, 10.0, 75.0]))
  assert np.isnan(out["nme_30_60"]) and out["count_30_60"] == 0
  assert out["nme_mean"] == pytest.approx((0.02 + 0.05) / 2)
  assert np.isnan(metrics.grouped_nme(np.zeros(0), np.zeros(0))["nme_mean"])


def test_balanced_subset_equal_counts_and_determinism():
  rng = np.random.default_rng(0)
  yaw = np.concatenate([rng.uniform(-30, 30, 50), rng.uniform(31, 60, 20),
                        rng.uniform(-90, -61, 12)])
  rng.shuffle(yaw)
  idx = metrics.balanced_subset(yaw, seed=1)
  assert idx.size == 36 and np.unique(idx).size == 36
  np.testing.assert_array_equal(np.bincount(metrics.yaw_groups(yaw[idx])), [12, 12, 12])
  np.testing.assert_array_equal(idx, metrics.balanced_subset(yaw, seed=1))
  assert not np.array_equal(idx, metrics.balanced_subset(yaw, seed=2))
  small = metrics.balanced_subset(yaw, seed=1, per_group=5)
  np.testing.assert_array_equal(np.bincount(metrics.yaw_groups(yaw[small])), [5, 5, 5])
  with pytest.raises(ValueError, match="per_group"):
    metrics.balanced_subset(yaw, seed=1, per_group=13)


def test_balanced_grouped_nme_matches_manual_subset():
  rng = np.random.default_rng(4)
  yaw = rng.uniform(-90, 90, 60)
  nme = rng.uniform(0.01, 0.1, 60)
  idx = metrics.balanced_subset(yaw, seed=7)
  assert metrics.balanced_grouped_nme(nme, yaw, seed=7) == metrics.grouped_nme(nme[idx], yaw[idx])


# ---------------------------------------------------------------------------- 3D alignment


def test_similarity_align_recovers_known_transform():
  src = np.random.default_rng(5).normal(size=(68, 3)) * [30.0, 40.0, 20.0]
  rot = _rotation([0.3, -1.0, 0.4], np.radians(70.0))
  scale, trans = 2.7, np.array([100.0, -50.0, 12.0])
  dst = scale * src @ rot.T + trans
  fit = metrics.similarity_align(src, dst)
  assert fit.scale == pytest.approx(scale, abs=1e-6)
  np.testing.assert_allclose(fit.rotation, rot, atol=1e-6)
  np.testing.assert_allclose(fit.translation, trans, atol=1e-6)
  np.testing.assert_allclose(fit.aligned, dst, atol=1e-6)
  s, r, t, aligned = fit  # also unpacks as (s, R, t, aligned)
  assert np.linalg.det(r) == pytest.approx(1.0)


def test_similarity_align_excludes_reflection_and_rigid_mode():
  src = np.random.default_rng(6).normal(size=(20, 3))
  mirrored = src * [-1.0, 1.0, 1.0]
  assert np.linalg.det(metrics.similarity_align(src, mirrored).rotation) == pytest.approx(1.0)
  rot = _rotation([0, 0, 1], 0.5)
  fit = metrics.similarity_align(src, 3.0 * src @ rot.T, with_scale=False)
  assert fit.scale == 1.0
  np.testing.assert_allclose(fit.rotation, rot, atol=1e-9)


def test_icp_recovers_known_transform_on_shuffled_cloud():
  src = _face_like_cloud()
  rot = _rotation([0.2, 1.0, -0.3], np.radians(12.0))
  scale, trans = 1.3, np.array([4.0, -3.0, 2.0])
  dst = scale * src @ rot.T + trans
  dst = dst[np.random.default_rng(8).permutation(len(dst))]
  fit = metrics.icp_align(src, dst, iters=100)
  assert fit.scale == pytest.approx(scale, abs=1e-4)
  np.testing.assert_allclose(fit.rotation, rot, atol=1e-4)
  np.testing.assert_allclose(fit.translation, trans, atol=1e-3)
  assert fit.mean_distance < 1e-6


def test_icp_with_landmark_init_recovers_large_rotation():
  src = _face_like_cloud(seed=1)
  rot = _rotation([1.0, 0.5, 0.2], np.radians(100.0))
  scale, trans = 0.4, np.array([-10.0, 0.0, 30.0])
  dst = scale * src @ rot.T + trans
  order = np.random.default_rng(9).permutation(len(dst))
  # Ten known correspondences (like landmarks), perturbed, give the start.
  lm = np.arange(10)
  start = metrics.similarity_align(src[lm] + 0.05, dst[lm])
  fit = metrics.icp_align(src, dst[order], init=start[:3])
  np.testing.assert_allclose(fit.rotation, rot, atol=1e-4)
  assert fit.scale == pytest.approx(scale, abs=1e-5)


def test_nme_3d_zero_for_similarity_copy():
  rng = np.random.default_rng(10)
  gt = np.concatenate([_square_landmarks(seed=11), rng.normal(size=(1, 68, 1)) * 20], axis=-1)
  gt = np.concatenate([gt, gt * [1.0, 1.0, 0.5] + 7.0])
  rot = _rotation([0.1, 1.0, 0.0], np.radians(40.0))
  pred = 0.01 * gt @ rot.T + np.array([1.0, 2.0, 3.0])
  np.testing.assert_allclose(metrics.nme_3d(pred, gt), [0.0, 0.0], atol=1e-10)


def test_nme_3d_hand_computed_value():
  """Planar square, depths +-5 uncorrelated with x, y: the best fit is R = I, s = 800/900."""
  xy = np.array([[10.0, 10.0], [10.0, -10.0], [-10.0, 10.0], [-10.0, -10.0]])
  gt = np.concatenate([xy, np.zeros((4, 1))], axis=1) + [50.0, 60.0, 0.0]
  pred = gt + np.array([[0, 0, 5.0], [0, 0, -5.0], [0, 0, -5.0], [0, 0, 5.0]])
  # s = sum|gt_c|^2 / sum|pred_c|^2 = 800 / 900; each error
  # |s (gt_c + d) - gt_c| = sqrt((1/9)^2 * 200 + (8/9)^2 * 25) = sqrt(1800) / 9; box 20 x 20.
  expected = np.sqrt(1800.0) / 9.0 / 20.0
  np.testing.assert_allclose(metrics.nme_3d(pred[None], gt[None]), [expected], rtol=1e-9)


def test_nme_3d_dense_zero_for_transformed_shuffled_cloud():
  gt = _face_like_cloud(n=1500, seed=2)
  rot = _rotation([0.0, 1.0, 0.1], np.radians(8.0))
  pred = (0.9 * gt @ rot.T + 0.5)[np.random.default_rng(12).permutation(len(gt))]
  out = metrics.nme_3d_dense(pred[None], gt[None], iters=100)
  assert out.shape == (1,) and out[0] < 1e-6
  # An explicit normaliser divides the same error.
  out10 = metrics.nme_3d_dense([pred], [gt], norm=10.0, iters=100)
  assert out10[0] < 1e-6


def test_nme_3d_dense_known_offset_error():
  """A cloud offset along its normal by 0.1 after alignment gives error ~0.1 / box."""
  x, y = np.meshgrid(np.linspace(0, 100, 41), np.linspace(0, 100, 41))
  gt = np.stack([x.ravel(), y.ravel(), np.zeros(x.size)], axis=1)
  pred = gt + [0.0, 0.0, 0.1]
  # Rigid frames already agree, so pass the identity start and 0 iterations.
  out = metrics.nme_3d_dense([pred], [gt], iters=0, init=[(1.0, np.eye(3), np.zeros(3))])
  np.testing.assert_allclose(out, [0.1 / 100.0], rtol=1e-9)
