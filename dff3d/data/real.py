"""Random-access sources of real faces for training and validation (see dff3d.data.sources).

AflwSource: the 3DDFA AFLW crops (dff3d.datasets.aflw_3ddfa), labelled either with their 21
hand points (set "aflw21", missing points visibility 0) or with pseudo-68 points fitted to
them (set "ibug68", data_prep/aflw_pseudo68.py). With pseudo-68 points available, every
example also carries "box_landmarks" (the 68 points) so the pipeline frames the crop exactly as
it frames 68-point faces (face_box of 68 points, the AFLW2000-3D protocol's box).

Aflw2000Source: AFLW2000-3D images with their 68 ground-truth points (pt3d_68 x, y moved to
dff3d's pixel-centre convention) and yaw, for validation; a file that does not load is listed in
`.failures` (one line each) and left out.

fit_pseudo68 / write_pseudo68: the landmark-only fit of every AFLW crop (pseudo-68 points and
coefficients). load_real_crops / real_pair_batch: decoded training-split crops with their
fitted coefficients, and random cross-identity pairs of them, for the DFF's real pairs
(dff3d.dff_training.real_views renders their dense pseudo-correspondence).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dff3d import camera
from dff3d import coefficients as coeffs_lib
from dff3d import fitting
from dff3d import landmark_sets
from dff3d import losses
from dff3d import metrics
from dff3d import morphable_model as mm
from dff3d import render as render_lib
from dff3d.datasets import aflw2000_3d
from dff3d.datasets import aflw_3ddfa

_SCREEN = jax.jit(render_lib.camera_vertices, static_argnums=2)


# Priors of the pseudo-68 fit: 10x the per-image fit's (fitting.FIT_WEIGHTS). The 21 hand points
# are few (median 13 visible on AFLW2000-3D dev) and clicked with ~2.5 % of the face box of
# scatter against the 68-point ground truth; the weaker prior fits that scatter. Chosen on the
# 16 aflw2000_3d_sample images (pseudo-68 of their hand points against their 68 ground-truth
# points: 3.50 % NME against 4.01 % at FIT_WEIGHTS, both with the calibrated ear lobes); on dev
# 4.14 against 4.46 % (BUILD_NOTES, session 16).
PSEUDO68_FIT_WEIGHTS = losses.LossWeights(reg_identity=0.1, reg_expression=2.0)


def fit_pseudo68(model, landmarks_21, visible_21, crop_size: int, chunk: int = 512,
                 return_coefficients: bool = False):
  """Fit each crop's 21 points; returns (landmarks_68 (N, 68, 2), fit_error (N,)).

  Args:
    landmarks_21: (N, 21, 2) crop pixels; visible_21: (N, 21) bool.
    crop_size: crop side S in pixels (the fit's camera).
    return_coefficients: also return the fitted coefficients (N, P) float32, the flat
      dff3d.coefficients vector (model.sizes layout; albedo 0, default lighting). The default
      camera scales with the crop, so they render the same face at any crop size.
  Returns:
    (landmarks_68, fit_error) or, with return_coefficients, (landmarks_68, fit_error,
    coefficients).
  """
  config = fitting.FitConfig(image_size=int(crop_size), contour="fixed", photo_steps=0,
                             weights=PSEUDO68_FIT_WEIGHTS)
  table = landmark_sets.set_table(model)
  out68, err, flat = [], [], []
  n = len(landmarks_21)
  for start in range(0, n, chunk):
    pts = np.asarray(landmarks_21[start:start + chunk], np.float32)
    vis = np.asarray(visible_21[start:start + chunk], np.float32)
    m = len(pts)
    if m < chunk:  # pad to one compiled shape
      pts = np.concatenate([pts, np.repeat(pts[-1:], chunk - m, 0)])
      vis = np.concatenate([vis, np.repeat(vis[-1:], chunk - m, 0)])
    c = fitting.fit_landmarks(model, pts, config, vis, landmark_sets.AFLW21)
    _, screen, _ = _SCREEN(model, c, (int(crop_size), int(crop_size)))
    p68 = np.asarray(mm.landmark_points(model, screen)[..., :2])
    p21 = np.asarray(landmark_sets.points(screen, table, jnp.full((chunk,), 1)))[:, :21, :2]
    d = np.linalg.norm(p21 - pts, axis=-1)
    e = (d * vis).sum(1) / np.maximum(vis.sum(1), 1) / crop_size
    out68.append(p68[:m])
    err.append(e[:m])
    flat.append(np.asarray(coeffs_lib.concat(c))[:m])
  out = np.concatenate(out68).astype(np.float32), np.concatenate(err).astype(np.float32)
  return out + (np.concatenate(flat).astype(np.float32),) if return_coefficients else out




def write_pseudo68(aflw_dir, output, chunk: int = 512, limit: int = 0) -> np.ndarray:
  """Fits every crop of a 3DDFA AFLW folder (the first `limit` when > 0) and writes the
  pseudo-68 .npz (format: data_prep/aflw_pseudo68.py, including the fitted "coefficients"
  (N, P) that re-render each crop's face); returns the fit errors (N,)."""
  listing = aflw_3ddfa.load_aflw_3ddfa(aflw_dir)
  n = limit or len(listing.names)
  p68, err, flat = fit_pseudo68(mm.default_model(), listing.landmarks[:n], listing.visible[:n],
                                listing.crop_size, chunk, return_coefficients=True)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tmp = str(output) + ".tmp.npz"
  np.savez_compressed(tmp, names=np.asarray(listing.names[:n]), landmarks_68=p68,
                      fit_error=err, visible_21=listing.visible[:n].sum(1).astype(np.int32),
                      coefficients=flat)
  os.replace(tmp, output)
  return err


class RealCrops(NamedTuple):
  """Decoded real crops with the model fitted to each (load_real_crops).

  names: M crop file names.  images: (M, S, S, 3) uint8.  coefficients: (M, P) float32 flat
  fitted vectors (dff3d.coefficients).  fit_error: (M,) float32 (fraction of the crop side).
  yaw_deg: (M,) float32 AFLW's head yaw label, degrees.
  """
  names: list
  images: np.ndarray
  coefficients: np.ndarray
  fit_error: np.ndarray
  yaw_deg: np.ndarray


def _decode_resized(path, size: int) -> np.ndarray:
  """(size, size, 3) uint8 RGB of an image file, resized (bilinear, area-aligned)."""
  with Image.open(path) as im:
    im = im.convert("RGB")
    return np.asarray(im if im.size == (size, size) else im.resize((size, size), Image.BILINEAR))


def load_real_crops(aflw_dir, pseudo68_path, size: int, max_crops: int = 0,
                    max_fit_error: float = 0.0, model=None) -> RealCrops:
  """The training-split AFLW crops that have fitted coefficients, decoded to size x size.

  Args:
    aflw_dir: the 3DDFA AFLW folder; pseudo68_path: its pseudo-68 .npz with "coefficients"
      (write_pseudo68; it may cover only some crops).
    size: output side S (the fitted coefficients hold at any S: the camera scales with it).
    max_crops: keep the first M (list order) when > 0.
    max_fit_error: drop crops whose fit error exceeds it when > 0.
    model: the morphable model of the fit (default: mm.default_model()), to check P.
  Returns:
    RealCrops; validation crops (aflw_3ddfa.split_of) are never included.
  Raises:
    aflw_3ddfa's DatasetNotFoundError / DatasetFormatError naming the file; ValueError when
    no crop is left.
  """
  model = mm.default_model() if model is None else model
  listing = aflw_3ddfa.load_aflw_3ddfa(aflw_dir)
  flat, err, found = aflw_3ddfa.load_pseudo68_coefficients(
      pseudo68_path, listing.names, coeffs_lib.size(model.sizes))
  rows = aflw_3ddfa.split_indices(listing, "train")
  rows = rows[found[rows]]
  if max_fit_error > 0:
    rows = rows[err[rows] <= max_fit_error]
  rows = rows[:max_crops] if max_crops > 0 else rows
  if not len(rows):
    raise ValueError(f"{pseudo68_path}: no training crop of {aflw_dir} has coefficients"
                     + (f" with fit error <= {max_fit_error}" if max_fit_error > 0 else ""))
  images = np.stack([_decode_resized(listing.image_paths[k], size) for k in rows])
  return RealCrops(names=[listing.names[k] for k in rows], images=images,
                   coefficients=flat[rows], fit_error=err[rows],
                   yaw_deg=np.asarray(listing.yaw_deg, np.float32)[rows])


def pose_balanced_weights(yaw_deg) -> np.ndarray:
  """(n,) float64 sampling probabilities that give every |yaw| group (metrics.yaw_groups:
  0-30, 30-60, 60+) the same total; a crop's weight is 1 / (its group's size x groups present).

  AFLW holds ~60 % of its crops below 30 degrees, so uniform pairs are mostly small yaw
  differences while a pose-stratified test set (aflw2000_3d_dev: 100 per group) is not.
  """
  group = metrics.yaw_groups(yaw_deg)
  counts = np.bincount(group, minlength=3).astype(np.float64)
  return 1.0 / (counts[group] * np.count_nonzero(counts))


def real_pair_batch(rng: np.random.Generator, crops: RealCrops, count: int,
                    pose_balance: bool = False):
  """`count` pairs of two different crops: (real_a, real_b) dicts of "image" (count, S, S, 3)
  uint8 and "coefficients" (count, P) (dff_training.mixed_pairs' input).

  Crops are drawn uniformly, or with pose_balance each crop of a pair independently with
  pose_balanced_weights (a pair that draws one crop twice redraws its second crop).
  """
  n = len(crops.names)
  if n < 2:
    raise ValueError(f"real pairs need two crops or more, got {n}")
  if pose_balance:
    p = pose_balanced_weights(crops.yaw_deg)
    i, j = rng.choice(n, count, p=p), rng.choice(n, count, p=p)
    while (same := i == j).any():
      j[same] = rng.choice(n, int(same.sum()), p=p)
  else:
    i = rng.integers(0, n, count)
    j = (i + rng.integers(1, n, count)) % n  # never i
  pick = lambda k: {"image": crops.images[k], "coefficients": crops.coefficients[k]}
  return pick(i), pick(j)


def _read_bytes(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


class AflwSource:
  """AFLW crops of one split.

  Args:
    listing: aflw_3ddfa.Aflw3ddfa (load_aflw_3ddfa(dir)).
    indices: (n,) int rows of the listing (e.g. aflw_3ddfa.split_indices(listing, "train")).
    pseudo68: optional (N, 68, 2) crop-pixel pseudo-68 points of every listing row.
    labels: "pts21" or "pseudo68" (needs pseudo68).
    rotations: optional (N, 3, 3) head rotation labels of every listing row (the pseudo-68
      fit's, pose_labels); NaN rows (crops the fit did not cover) carry none.
  Examples: "image" (JPEG bytes), "landmarks" (21 or 68, 2), "landmarks_visible", "landmark_set",
  "yaw_deg", "box_landmarks" (68, 2) when pseudo68 is given and "rotation" (3, 3) when
  rotations are.
  """

  def __init__(self, listing, indices, pseudo68=None, labels: str = "pts21", rotations=None):
    if labels not in ("pts21", "pseudo68"):
      raise ValueError(f"labels must be 'pts21' or 'pseudo68', got {labels!r}")
    if labels == "pseudo68" and pseudo68 is None:
      raise ValueError("labels='pseudo68' needs the pseudo-68 points (data_prep.aflw_pseudo68)")
    self._listing, self._idx = listing, np.asarray(indices, np.int64)
    self._p68, self._labels, self._rot = pseudo68, labels, rotations

  def __len__(self):
    return len(self._idx)

  def __getitem__(self, i):
    k = int(self._idx[int(i)])
    ls = self._listing
    ex = {"image": _read_bytes(ls.image_paths[k]), "yaw_deg": np.float32(ls.yaw_deg[k])}
    if self._labels == "pseudo68":
      ex.update(landmarks=self._p68[k], landmarks_visible=np.ones(68, bool),
                landmark_set="ibug68")
    else:
      ex.update(landmarks=ls.landmarks[k], landmarks_visible=ls.visible[k],
                landmark_set="aflw21")
    if self._p68 is not None:
      ex["box_landmarks"] = self._p68[k]
    if self._rot is not None and np.all(np.isfinite(self._rot[k])):
      ex["rotation"] = self._rot[k]
    return ex


def pose_labels(pseudo68_path, names, model=None) -> np.ndarray:
  """(N, 3, 3) float32 head rotations of the pseudo-68 fit (camera.rotation_matrix of its
  coefficients' rotation) in the row order of `names`; NaN for crops the file lacks.

  The landmark-only fit turns the head as AFLW's yaw labels say (BUILD_NOTES: median |yaw|
  within 0.9-4.8 degrees up to 90) where the regressor trained on the 68 points alone
  under-turns it; a rotation term on these labels (LossWeights.pose) supervises the pose
  directly.

  Raises:
    aflw_3ddfa's DatasetNotFoundError / DatasetFormatError (e.g. a file without coefficients).
  """
  model = mm.default_model() if model is None else model
  flat, _, found = aflw_3ddfa.load_pseudo68_coefficients(pseudo68_path, names,
                                                         coeffs_lib.size(model.sizes))
  angles = np.nan_to_num(coeffs_lib.split(flat, model.sizes).rotation)
  rot = np.array(camera.rotation_matrix(angles), np.float32)
  rot[~found] = np.nan
  return rot


def pose_balanced_rows(yaw_deg, seed: int = 0) -> np.ndarray:
  """Rows of a set repeated so that every |yaw| group (metrics.yaw_groups: 0-30, 30-60, 60+)
  holds as many as the largest one.

  The shipped regressor under-turns heads (BUILD_NOTES: median |yaw| 41 against 71 degrees at
  60-90, on its own training crops too) and AFLW holds ~60 % of its crops below 30 degrees.
  Every row is kept once; a smaller group is filled up by cycling through its rows in a seeded
  order. An empty group stays empty.

  Args:
    yaw_deg: (n,) head yaw in degrees.
  Returns:
    (m,) int64 row indices into the n rows, m = groups present x the largest group's size,
    grouped in ascending |yaw| (the pipeline shuffles each epoch).
  """
  group = metrics.yaw_groups(yaw_deg)
  members = [np.flatnonzero(group == g) for g in range(3)]
  largest = max(len(m) for m in members)
  rng = np.random.default_rng(seed)
  out = []
  for m in members:
    if len(m):
      out.append(np.concatenate([m, np.resize(rng.permutation(m), largest - len(m))]))
  return np.concatenate(out).astype(np.int64)


def aflw_sources(directory, pseudo68_path: str = "", labels: str = "pts21",
                 max_train: int = 0, pose_balance: bool = False, with_pose: bool = False):
  """(train, validation) AflwSources of a 3DDFA AFLW folder (split by aflw_3ddfa.split_of);
  pose_balance: the training rows repeated by pose_balanced_rows (validation as it is);
  with_pose: training examples carry the fit's "rotation" (pose_labels; needs a pseudo-68
  file with coefficients)."""
  listing = aflw_3ddfa.load_aflw_3ddfa(directory)
  p68 = aflw_3ddfa.load_pseudo68(pseudo68_path, listing.names)[0] if pseudo68_path else None
  if with_pose and not pseudo68_path:
    raise ValueError("pose labels need a pseudo-68 file with coefficients "
                     "(data_prep.aflw_pseudo68)")
  rot = pose_labels(pseudo68_path, listing.names) if with_pose else None
  train = aflw_3ddfa.split_indices(listing, "train")
  if max_train:
    train = train[:max_train]
  if pose_balance:
    train = train[pose_balanced_rows(listing.yaw_deg[train])]
  val = aflw_3ddfa.split_indices(listing, "validation")
  return (AflwSource(listing, train, p68, labels, rot),
          AflwSource(listing, val, p68, "pts21"))


class Aflw2000Source:
  """AFLW2000-3D images of a folder: "image" (JPEG bytes), "landmarks" (68, 2) (pt3d_68 x, y
  + 0.5), "landmarks_visible" (all), "landmark_set" "ibug68", "yaw_deg", "name"."""

  def __init__(self, directory):
    listing = aflw2000_3d.list_aflw2000_3d(directory)
    self.items, self.failures = [], []
    for image, mat in listing.pairs:
      try:
        lab = aflw2000_3d.load_aflw2000_3d_mat(mat)
      except (aflw2000_3d.DatasetFormatError, aflw2000_3d.DatasetNotFoundError) as e:
        self.failures.append(str(e).splitlines()[0])
        continue
      self.items.append((Path(image), lab["landmarks_3d"][:, :2] + 0.5, lab["yaw_deg"]))

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    image, pts, yaw = self.items[int(i)]
    return {"image": _read_bytes(image), "landmarks": pts.astype(np.float32),
            "landmarks_visible": np.ones(68, bool), "landmark_set": "ibug68",
            "yaw_deg": np.float32(yaw), "name": image.name}
