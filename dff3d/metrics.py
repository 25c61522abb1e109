"""Evaluation metrics: 2D landmark NME, yaw groups, and similarity / ICP-aligned 3D error.

These run outside ``jit`` on host arrays, so they use numpy (and scipy's k-d tree for ICP).
Inputs may be numpy or jax arrays; outputs are numpy arrays or Python scalars.

All NME values are fractions of the normaliser (multiply by 100 for the percentages that
papers report). The standard AFLW2000-3D normaliser (3DDFA, PRNet, SynergyNet) is
``sqrt(w * h)`` of the axis-aligned bounding box of the ground-truth landmarks' x, y.

Pixel coordinates: prediction and ground truth must be in the same frame. AFLW2000-3D stores
0-based pixel coordinates in which pixel ``i`` has its centre at ``i``; dff3d puts pixel centres
at ``i + 0.5`` (see camera.py), so subtract 0.5 from dff3d predictions before comparing.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

# Yaw group edges in degrees: group 0 is |yaw| in [0, 30], 1 is (30, 60], 2 is (60, inf).
YAW_GROUP_EDGES_DEG = (30.0, 60.0)
YAW_GROUP_NAMES = ("0_30", "30_60", "60_90")


# --------------------------------------------------------------------------------------------
# 2D landmark NME
# --------------------------------------------------------------------------------------------


def _as_points(x, name: str, min_dim: int = 2) -> np.ndarray:
  """Returns ``x`` as a float64 (B, K, D) array with D >= min_dim, or raises ValueError."""
  arr = np.asarray(x, dtype=np.float64)
  if arr.ndim != 3 or arr.shape[-1] < min_dim:
    raise ValueError(f"{name}: expected shape (B, K, >={min_dim}), got {arr.shape}")
  return arr


def bbox_size(points, mask=None) -> np.ndarray:
  """Geometric mean of the x, y bounding-box sides of each sample's points.

  Args:
    points: (B, K, D>=2) float, pixels; only x = [..., 0] and y = [..., 1] are used.
    mask: optional (B, K) bool; only points where it is True enter the box.

  Returns:
    (B,) float64 ``sqrt(w * h)`` in pixels, ``w = max x - min x`` and ``h = max y - min y``.
    NaN for a sample with no masked-in points.
  """
  pts = _as_points(points, "points")[..., :2]
  if mask is None:
    lo, hi = pts.min(axis=1), pts.max(axis=1)
  else:
    m = np.asarray(mask, dtype=bool)
    if m.shape != pts.shape[:2]:
      raise ValueError(f"mask: expected shape {pts.shape[:2]}, got {m.shape}")
    lo = np.where(m[..., None], pts, np.inf).min(axis=1)
    hi = np.where(m[..., None], pts, -np.inf).max(axis=1)
    empty = ~m.any(axis=1)
    lo[empty], hi[empty] = np.nan, np.nan
  w, h = (hi - lo)[:, 0], (hi - lo)[:, 1]
  return np.sqrt(w * h)


def _normalizer(norm, gt: np.ndarray, mask=None) -> np.ndarray:
  """Resolves ``norm`` ("bbox" or explicit values) to a (B,) float64 array."""
  batch = gt.shape[0]
  if isinstance(norm, str):
    if norm != "bbox":
      raise ValueError(f"norm: expected 'bbox' or an array of shape ({batch},), got {norm!r}")
    return bbox_size(gt, mask)
  return np.broadcast_to(np.asarray(norm, dtype=np.float64), (batch,))


def nme_2d(pred, gt, norm="bbox") -> np.ndarray:
  """Per-image normalised mean error of 2D landmarks (x, y only).

  ``nme_b = mean_k ||pred[b, k, :2] - gt[b, k, :2]||_2 / d_b``.

  Args:
    pred: (B, K, 2 or 3) float, pixels; a third (depth) column is ignored.
    gt: (B, K, 2 or 3) float, pixels, same frame as ``pred``.
    norm: ``"bbox"`` for ``d_b = sqrt(w * h)`` of the bounding box of ``gt[b, :, :2]`` (the
      AFLW2000-3D standard), or explicit normalisers: a scalar or (B,) float, pixels.

  Returns:
    (B,) float64 NME as a fraction (not percent).
  """
  pred, gt = _as_points(pred, "pred"), _as_points(gt, "gt")
  if pred.shape[:2] != gt.shape[:2]:
    raise ValueError(f"pred {pred.shape} and gt {gt.shape} disagree in (B, K)")
  err = np.linalg.norm(pred[..., :2] - gt[..., :2], axis=-1)  # (B, K)
  return err.mean(axis=1) / _normalizer(norm, gt)


def nme_visible(pred, gt, visible_mask, norm="bbox") -> np.ndarray:
  """Per-image NME over the visible landmarks only (the AFLW-LFPA protocol, 34 points).

  Args:
    pred: (B, K, 2 or 3) float, pixels (x, y used).
    gt: (B, K, 2 or 3) float, pixels.
    visible_mask: (B, K) bool, True where the ground-truth landmark is visible.
    norm: ``"bbox"`` for ``sqrt(w * h)`` of the box of the *visible* ground-truth points, or
      explicit normalisers: scalar or (B,) float, pixels.

  Returns:
    (B,) float64 NME fraction: mean error over visible points divided by the normaliser;
    NaN for an image with no visible point.
  """
  pred, gt = _as_points(pred, "pred"), _as_points(gt, "gt")
  if pred.shape[:2] != gt.shape[:2]:
    raise ValueError(f"pred {pred.shape} and gt {gt.shape} disagree in (B, K)")
  mask = np.asarray(visible_mask, dtype=bool)
  if mask.shape != gt.shape[:2]:
    raise ValueError(f"visible_mask: expected shape {gt.shape[:2]}, got {mask.shape}")
  err = np.linalg.norm(pred[..., :2] - gt[..., :2], axis=-1)
  count = mask.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_err = np.where(mask, err, 0.0).sum(axis=1) / count
    mean_err = np.where(count > 0, mean_err, np.nan)
    return mean_err / _normalizer(norm, gt, mask)


# --------------------------------------------------------------------------------------------
# Yaw groups
# --------------------------------------------------------------------------------------------


def yaw_groups(yaw_deg) -> np.ndarray:
  """Assigns each image to a |yaw| group.

  Args:
    yaw_deg: (B,) float, degrees (sign ignored).

  Returns:
    (B,) int64: 0 for |yaw| in [0, 30], 1 for (30, 60], 2 for (60, 90]. |yaw| > 90 (a few
    AFLW2000-3D fits exceed 90 degrees) also goes to group 2. Boundaries are inclusive on the
    upper side: exactly 30 is group 0, exactly 60 is group 1.
  """
  yaw = np.abs(np.asarray(yaw_deg, dtype=np.float64))
  if yaw.ndim != 1:
    raise ValueError(f"yaw_deg: expected shape (B,), got {yaw.shape}")
  if not np.all(np.isfinite(yaw)):
    raise ValueError("yaw_deg: contains non-finite values")
  # side="left" puts a value equal to an edge into the lower group.
  return np.searchsorted(np.asarray(YAW_GROUP_EDGES_DEG), yaw, side="left").astype(np.int64)


def grouped_nme(nme, yaw_deg) -> dict:
  """Mean NME per |yaw| group and the mean of the group means.

  Args:
    nme: (B,) float, per-image NME (fraction).
    yaw_deg: (B,) float, degrees.

  Returns:
    dict of Python floats / ints: ``"nme_0_30"``, ``"nme_30_60"``, ``"nme_60_90"`` (NaN for an
    empty group), ``"nme_mean"`` = mean of the group means over the *non-empty* groups (NaN if
    all are empty), and ``"count_0_30"``, ``"count_30_60"``, ``"count_60_90"``, ``"count"``.
  """
  nme = np.asarray(nme, dtype=np.float64)
  groups = yaw_groups(yaw_deg)
  if nme.shape != groups.shape:
    raise ValueError(f"nme {nme.shape} and yaw_deg {groups.shape} disagree in shape")
  out, means = {}, []
  for g, name in enumerate(YAW_GROUP_NAMES):
    sel = nme[groups == g]
    mean = float(sel.mean()) if sel.size else float("nan")
    out[f"nme_{name}"] = mean
    out[f"count_{name}"] = int(sel.size)
    if sel.size:
      means.append(mean)
  out["nme_mean"] = float(np.mean(means)) if means else float("nan")
  out["count"] = int(nme.size)
  return out


def balanced_subset(yaw_deg, seed: int, per_group: int | None = None) -> np.ndarray:
  """Indices of a yaw-balanced subset: the same number of images from each |yaw| group.

  The paper evaluates AFLW2000-3D on 696 images drawn so that the three groups are 1:1:1
  (232 each). Sampling is without replacement, with ``numpy.random.default_rng(seed)``, so a
  given (yaw_deg, seed, per_group) always yields the same subset.

  Args:
    yaw_deg: (B,) float, degrees.
    seed: int, RNG seed.
    per_group: images per group; default the smallest group's size.

  Returns:
    (3 * per_group,) int64 indices into ``yaw_deg``, sorted ascending.
  """
  groups = yaw_groups(yaw_deg)
  members = [np.flatnonzero(groups == g) for g in range(len(YAW_GROUP_NAMES))]
  smallest = min(m.size for m in members)
  n = smallest if per_group is None else int(per_group)
  if n < 0 or n > smallest:
    raise ValueError(f"per_group={n}: must be in [0, {smallest}] (smallest group size)")
  rng = np.random.default_rng(seed)
  picked = [rng.choice(m, size=n, replace=False) for m in members]
  return np.sort(np.concatenate(picked)).astype(np.int64)


def balanced_grouped_nme(nme, yaw_deg, seed: int, per_group: int | None = None) -> dict:
  """``grouped_nme`` restricted to ``balanced_subset(yaw_deg, seed, per_group)``."""
  idx = balanced_subset(yaw_deg, seed, per_group)
  return grouped_nme(np.asarray(nme)[idx], np.asarray(yaw_deg)[idx])


# --------------------------------------------------------------------------------------------
# 3D alignment
# --------------------------------------------------------------------------------------------


class SimilarityFit(NamedTuple):
  """A similarity transform ``x -> scale * rotation @ x + translation`` and its result.

  scale: float. rotation: (3, 3) float64, det +1. translation: (3,) float64.
  aligned: (M, 3) float64, the transformed source points.
  """

  scale: float
  rotation: np.ndarray
  translation: np.ndarray
  aligned: np.ndarray


class IcpFit(NamedTuple):
  """ICP result: the similarity transform, the aligned source, and convergence figures.

  scale, rotation (3, 3), translation (3,), aligned (M, 3) as in ``SimilarityFit``;
  mean_distance: mean nearest-neighbour distance from aligned source to target at the end;
  iterations: number of ICP iterations run.
  """

  scale: float
  rotation: np.ndarray
  translation: np.ndarray
  aligned: np.ndarray
  mean_distance: float
  iterations: int


def _as_cloud(x, name: str) -> np.ndarray:
  arr = np.asarray(x, dtype=np.float64)
  if arr.ndim != 2 or arr.shape[1] != 3:
    raise ValueError(f"{name}: expected shape (N, 3), got {arr.shape}")
  return arr


def apply_similarity(points, scale, rotation, translation) -> np.ndarray:
  """Returns ``scale * points @ rotation.T + translation``: (M, 3) float64."""
  pts = np.asarray(points, dtype=np.float64)
  return scale * pts @ np.asarray(rotation, np.float64).T + np.asarray(translation, np.float64)


def similarity_align(src, dst, with_scale: bool = True) -> SimilarityFit:
  """Least-squares similarity transform taking ``src`` onto ``dst`` (Umeyama 1991).

  Minimises ``sum_k ||s R src_k + t - dst_k||^2`` over s > 0, R in SO(3) (reflections
  excluded), t in R^3, for known correspondences ``src_k <-> dst_k``.

  Args:
    src: (K, 3) float, K >= 3 not all collinear.
    dst: (K, 3) float, same units as wanted for the result.
    with_scale: if False, s is fixed to 1 (rigid alignment).

  Returns:
    SimilarityFit(scale, rotation, translation, aligned) with ``aligned`` (K, 3) float64.
  """
  src, dst = _as_cloud(src, "src"), _as_cloud(dst, "dst")
  if src.shape != dst.shape:
    raise ValueError(f"src {src.shape} and dst {dst.shape} must have the same shape")
  if src.shape[0] < 3:
    raise ValueError(f"need at least 3 correspondences, got {src.shape[0]}")
  mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
  src_c, dst_c = src - mu_s, dst - mu_d
  var_s = (src_c**2).sum() / src.shape[0]
  if var_s <= 0.0:
    raise ValueError("src points are all identical; the transform is undefined")
  cov = dst_c.T @ src_c / src.shape[0]  # (3, 3)
  u, d, vt = np.linalg.svd(cov)
  sign = np.ones(3)
  if np.linalg.det(u) * np.linalg.det(vt) < 0:
    sign[-1] = -1.0
  rotation = (u * sign) @ vt
  scale = float((d * sign).sum() / var_s) if with_scale else 1.0
  translation = mu_d - scale * rotation @ mu_s
  return SimilarityFit(scale, rotation, translation,
                       apply_similarity(src, scale, rotation, translation))


def _centroid_scale_init(src: np.ndarray, dst: np.ndarray, with_scale: bool):
  """Identity rotation, matching centroids and RMS radii: (scale, rotation, translation)."""
  mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
  scale = 1.0
  if with_scale:
    rs = np.sqrt(((src - mu_s) ** 2).sum(axis=1).mean())
    rd = np.sqrt(((dst - mu_d) ** 2).sum(axis=1).mean())
    scale = float(rd / rs) if rs > 0 else 1.0
  return scale, np.eye(3), mu_d - scale * mu_s


def icp_align(src_points, dst_points, iters: int = 50, init="centroid",
              with_scale: bool = True, tol: float = 1e-9) -> IcpFit:
  """Iterative closest point with a similarity (rigid + scale) transform.

  Each iteration matches every transformed source point to its nearest target point
  (``scipy.spatial.cKDTree``) and re-solves the similarity transform from the *original*
  source to the matched targets with ``similarity_align``. Stops after ``iters`` iterations or
  when the mean matching distance improves by less than ``tol`` (relative).

  ICP finds the nearest local optimum: the centroid initialisation only recovers small
  rotations (tens of degrees); give a better start when one is known.

  Args:
    src_points: (M, 3) float, the cloud to move (e.g. predicted vertices).
    dst_points: (P, 3) float, the fixed cloud (e.g. ground-truth scan or vertices).
    iters: maximum number of iterations.
    init: ``"centroid"`` (identity rotation, centroids and RMS radii matched),
      ``"correspondence"`` (Umeyama on row-wise correspondences; needs M == P), or a
      ``(scale, rotation (3, 3), translation (3,))`` tuple such as a ``SimilarityFit`` computed
      on landmarks.
    with_scale: if False, only a rigid transform is fitted.
    tol: relative tolerance on the mean matching distance.

  Returns:
    IcpFit(scale, rotation, translation, aligned (M, 3), mean_distance, iterations).
  """
  src, dst = _as_cloud(src_points, "src_points"), _as_cloud(dst_points, "dst_points")
  if isinstance(init, str):
    if init == "centroid":
      scale, rotation, translation = _centroid_scale_init(src, dst, with_scale)
    elif init == "correspondence":
      fit = similarity_align(src, dst, with_scale)
      scale, rotation, translation = fit.scale, fit.rotation, fit.translation
    else:
      raise ValueError(f"init: expected 'centroid', 'correspondence' or (s, R, t), got {init!r}")
  else:
    scale, rotation, translation = init[0], init[1], init[2]
  scale = float(scale)
  rotation = np.asarray(rotation, dtype=np.float64)
  translation = np.asarray(translation, dtype=np.float64)

  tree = cKDTree(dst)
  aligned = apply_similarity(src, scale, rotation, translation)
  dist, idx = tree.query(aligned)
  prev = float(dist.mean())
  it = 0
  for it in range(1, iters + 1):
    fit = similarity_align(src, dst[idx], with_scale)
    scale, rotation, translation, aligned = fit
    dist, idx = tree.query(aligned)
    cur = float(dist.mean())
    if prev - cur <= tol * max(prev, 1e-300):
      prev = cur
      break
    prev = cur
  return IcpFit(scale, rotation, translation, aligned, prev, it)


# --------------------------------------------------------------------------------------------
# 3D NME
# --------------------------------------------------------------------------------------------


def nme_3d(pred, gt, norm="bbox") -> np.ndarray:
  """Per-image 3D landmark NME after similarity-aligning the prediction to the ground truth.

  For each image, ``pred`` is aligned to ``gt`` with ``similarity_align`` (the landmarks
  correspond row-wise, so ICP would converge to this same transform in one step); the error
  is ``mean_k ||aligned_k - gt_k||_2`` (x, y and z). Following the paper's "normalised by the
  box size", the normaliser is the 2D one of the AFLW2000-3D protocol: ``sqrt(w * h)`` of the
  bounding box of the ground-truth x, y, so 2D and 3D figures share a scale. Note that the
  alignment removes global pose and scale errors, so this measures shape only.

  Args:
    pred: (B, K, 3) float, any frame and scale (e.g. model space).
    gt: (B, K, 3) float, pixels (x, y) and depth in the same units (AFLW2000-3D pt3d_68).
    norm: ``"bbox"`` or explicit normalisers: scalar or (B,) float, in gt units.

  Returns:
    (B,) float64 NME fraction.
  """
  pred, gt = _as_points(pred, "pred", 3), _as_points(gt, "gt", 3)
  if pred.shape != gt.shape or pred.shape[-1] != 3:
    raise ValueError(f"pred {pred.shape} and gt {gt.shape} must both be (B, K, 3)")
  err = np.empty(pred.shape[0])
  for b in range(pred.shape[0]):
    aligned = similarity_align(pred[b], gt[b]).aligned
    err[b] = np.linalg.norm(aligned - gt[b], axis=-1).mean()
  return err / _normalizer(norm, gt)


def dense_error(aligned_pred, gt, direction: str = "pred_to_gt") -> float:
  """Mean nearest-neighbour distance between two (already aligned) clouds.

  Args:
    aligned_pred: (M, 3) float. gt: (P, 3) float, same units.
    direction: ``"pred_to_gt"`` (each predicted point to its nearest gt point, the quantity
      ICP minimises), ``"gt_to_pred"``, or ``"symmetric"`` (mean of the two).

  Returns:
    float, in the clouds' units.
  """
  a, g = _as_cloud(aligned_pred, "aligned_pred"), _as_cloud(gt, "gt")
  if direction not in ("pred_to_gt", "gt_to_pred", "symmetric"):
    raise ValueError(f"direction: unknown {direction!r}")
  forward = backward = 0.0
  if direction != "gt_to_pred":
    forward = float(cKDTree(g).query(a)[0].mean())
  if direction != "pred_to_gt":
    backward = float(cKDTree(a).query(g)[0].mean())
  if direction == "symmetric":
    return 0.5 * (forward + backward)
  return forward if direction == "pred_to_gt" else backward


def nme_3d_dense(pred_vertices, gt_vertices, norm="bbox", iters: int = 50, init="centroid",
                 direction: str = "pred_to_gt") -> np.ndarray:
  """Per-image dense 3D NME after ICP-aligning predicted vertices to the ground-truth cloud.

  Args:
    pred_vertices: (B, M, 3) float array, or a length-B sequence of (M_b, 3) arrays.
    gt_vertices: (B, P, 3) float array, or a length-B sequence of (P_b, 3) arrays; the point
      sets need not correspond or have the same size.
    norm: ``"bbox"`` for ``sqrt(w * h)`` of the x, y box of each gt cloud (as ``nme_3d`` but
      over the dense cloud), or explicit normalisers: scalar or (B,) float, gt units (e.g. the
      68-landmark box, to match ``nme_3d``).
    iters: ICP iterations.
    init: passed to ``icp_align``: ``"centroid"``, ``"correspondence"`` (only when vertices
      correspond row-wise), or a length-B sequence of ``(scale, rotation, translation)``
      starts, e.g. ``similarity_align`` fits on the 68 landmarks.
    direction: see ``dense_error``.

  Returns:
    (B,) float64 NME fraction.
  """
  preds, gts = list(pred_vertices), list(gt_vertices)
  if len(preds) != len(gts):
    raise ValueError(f"pred_vertices ({len(preds)}) and gt_vertices ({len(gts)}) batch sizes differ")
  inits = [init] * len(preds) if isinstance(init, str) else list(init)
  if len(inits) != len(preds):
    raise ValueError(f"init: expected {len(preds)} starts, got {len(inits)}")
  err = np.empty(len(preds))
  sizes = np.empty(len(preds))
  for b, (p, g, start) in enumerate(zip(preds, gts, inits)):
    g = _as_cloud(g, f"gt_vertices[{b}]")
    fit = icp_align(p, g, iters=iters, init=start)
    err[b] = dense_error(fit.aligned, g, direction)
    sizes[b] = bbox_size(g[None])[0]
  if isinstance(norm, str):
    if norm != "bbox":
      raise ValueError(f"norm: expected 'bbox' or an array, got {norm!r}")
    return err / sizes
  return err / np.broadcast_to(np.asarray(norm, dtype=np.float64), err.shape)
