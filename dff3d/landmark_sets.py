"""Named landmark point sets as data: iBUG-68 and AFLW-21, with model vertices per set.

A LandmarkSet names K points and carries what every consumer needs: the flip permutation
(augmentation), the L_land weights (0.5 on points that are not fixed anatomy: jaw contour, ear
lobes), an `inner` mask (L_land_error and the closed-form pose use only those) and a rule that
finds each point on a morphable model. A point is a weighted mean of up to M model vertices
(an eye centre is the mean of the eye's six corner/lid vertices), so a set works on any model
that has the iBUG-68 vertices; a point the model lacks (BFM's face-only mesh has no ears) gets
no vertices and is unavailable (weight 0 everywhere).

Losses, augmentations and metrics take a `SetTable` (every registered set stacked, padded to
MAX_POINTS) plus a per-example set index, so one batch may mix sets: example b's points are
`points(screen, table, set_index)[b, :len(set)]`, the rest is padding with weight 0.

AFLW-21 (Koestinger et al. 2011; order of the 3DDFA files, "image left" = the subject's right):
  0-2  image-left brow outer / centre / inner   -> iBUG 17, 19, 21
  3-5  image-right brow inner / centre / outer  -> iBUG 22, 24, 26
  6-8  image-left eye outer corner / centre / inner corner -> 36, mean(36..41), 39
  9-11 image-right eye inner corner / centre / outer corner -> 42, mean(42..47), 45
  12   image-left ear lobe      -> lowest vertex of the ear (see _ear_lobe)
  13   nose image-left side     -> most lateral vertex of the alar wing (see _alar)
  14   nose tip                 -> iBUG 30
  15   nose image-right side    -> mirror of 13
  16   image-right ear lobe     -> mirror of 12
  17-19 mouth left corner / centre / right corner -> 48, mean(62, 66), 54
  20   chin                     -> iBUG 8
How the non-iBUG vertices were chosen and checked is in BUILD_NOTES.md ("Landmark sets").
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Sequence

import flax
import jax.numpy as jnp
import numpy as np

from dff3d import landmarks as lm

MAX_POINTS = lm.NUM_LANDMARKS  # every set is padded to 68 points in a SetTable
MAX_VERTICES = 6               # vertices averaged into one point at most (eye centres)


@dataclasses.dataclass(frozen=True, eq=False)
class LandmarkSet:
  """K named points.

  point_names: (K,) names.  flip_permutation: (K,) int, position i of a mirrored face takes
  point flip_permutation[i].  weights: (K,) L_land weights.  inner: (K,) bool.
  vertex_rule: model -> (ids (K, M) int32, mix (K, M) float32) with rows summing to 1, or 0
  where the model lacks the point (ids are then 0).
  """
  name: str
  point_names: tuple
  flip_permutation: np.ndarray
  weights: np.ndarray
  inner: np.ndarray
  vertex_rule: Callable

  def __len__(self) -> int:
    return len(self.point_names)

  def vertices(self, model):
    """(ids (K, MAX_VERTICES) int32, mix (K, MAX_VERTICES) float32) on `model`."""
    return self.vertex_rule(model)


def _rows(groups: Sequence[Sequence[int]]):
  """Vertex groups (each a list of vertex ids, [] for a missing point) -> padded (ids, mix)."""
  ids = np.zeros((len(groups), MAX_VERTICES), np.int32)
  mix = np.zeros((len(groups), MAX_VERTICES), np.float32)
  for k, g in enumerate(groups):
    ids[k, :len(g)] = g
    mix[k, :len(g)] = 1.0 / len(g) if len(g) else 0.0
  return ids, mix


def _ibug68_vertices(model):
  return _rows([[int(v)] for v in np.asarray(model.landmarks)])


# AFLW-21 vertices placed from hand clicks on the 16 aflw2000_3d_sample images (`python -m
# data_prep.calibrate_jaw`; neither dev nor test), for the points that a geometric rule below
# places otherwise: the ear lobes (rows 12, 16) and the nose sides (13, 15). Keyed by mesh_key,
# so a model whose shape differs at all (another model, an edited mean face) gets the rules.
# Annotators click an ear lobe where it meets the cheek: on the ICT mesh 1.5 cm further
# forward, 1 cm further in and 0.4 cm lower than the rule's lowest ear vertex (RMS distance to
# the clicks 7.3 % of the face box against 12.9 %); with the rule's vertex the pseudo-68 fit
# placed a turned head's jaw too near the nose. The clicked nose sides lie 0.4 cm lower than
# the rule's alar vertex (2.5 against 3.7 %). BUILD_NOTES, session 16.
CALIBRATED_AFLW21 = {"8dd0cb0070a6bdf7": {12: 7846, 16: 7119, 13: 4560, 15: 5025}}  # ICT


def mesh_key(model) -> str:
  """Fingerprint of a model's mean face: the first 16 hex digits of the SHA-1 of its float32
  (N, 3) mean_shape bytes."""
  return hashlib.sha1(np.asarray(model.mean_shape, np.float32).tobytes()).hexdigest()[:16]


def _ear_lobe(model, side: float) -> list:
  """[vertex id] of the ear lobe on one side (side -1: -x, the subject's right), or [] when
  the model has no ear.

  The ear is taken as the vertices standing out sideways beyond 1.08 x the |x| of the upper
  jaw landmark (iBUG 0 / 16, where the jaw meets the ear; on the ICT mean face 7.36 cm, the
  head surface there reaches ~7.9 cm and the ear rim 9.2 cm); the lobe is the lowest of them.
  (Models in CALIBRATED_AFLW21 use their calibrated vertex instead.)
  """
  v = np.asarray(model.mean_shape, np.float64)
  jaw = v[np.asarray(model.landmarks)[0 if side < 0 else 16]]
  ear = np.nonzero(side * v[:, 0] > 1.08 * abs(jaw[0]))[0]
  if len(ear) == 0:
    return []
  return [int(ear[np.argmin(v[ear, 1])])]


def _alar(model, side: float) -> list:
  """[vertex id] of the nose's side (alar wing) on one side: the most lateral vertex between
  the nostril base (iBUG 31 / 35) and halfway up to the nose tip (iBUG 30), no deeper than
  0.3 model units behind the nostril base and within 2x its distance from the midline (this
  excludes the cheek, which lies deeper)."""
  v = np.asarray(model.mean_shape, np.float64)
  ids = np.asarray(model.landmarks)
  base, tip = v[ids[31 if side < 0 else 35]], v[ids[30]]
  y_lo, y_hi = base[1], base[1] + 0.5 * (tip[1] - base[1])
  sel = ((v[:, 1] >= y_lo) & (v[:, 1] <= y_hi) & (v[:, 2] >= base[2] - 0.3)
         & (side * v[:, 0] > 0) & (side * v[:, 0] <= 2.0 * abs(base[0] - tip[0])))
  cand = np.nonzero(sel)[0]
  if len(cand) == 0:
    return [int(ids[31 if side < 0 else 35])]
  return [int(cand[np.argmax(side * v[cand, 0])])]


def _aflw21_vertices(model):
  ids = [int(v) for v in np.asarray(model.landmarks)]
  one = lambda i: [ids[i]]
  groups = [one(17), one(19), one(21), one(22), one(24), one(26),
            one(36), ids[36:42], one(39), one(42), ids[42:48], one(45),
            _ear_lobe(model, -1.0), _alar(model, -1.0), one(30), _alar(model, 1.0),
            _ear_lobe(model, 1.0), one(48), [ids[62], ids[66]], one(54), one(8)]
  for row, vertex in CALIBRATED_AFLW21.get(mesh_key(model), {}).items():
    groups[row] = [vertex]
  return _rows(groups)


def _flip_from_pairs(k: int, pairs) -> np.ndarray:
  perm = np.arange(k)
  for a, b in pairs:
    perm[a], perm[b] = b, a
  return perm.astype(np.int32)


IBUG68 = LandmarkSet(
    name="ibug68",
    point_names=tuple(f"ibug{i}" for i in range(lm.NUM_LANDMARKS)),
    flip_permutation=lm.FLIP_PERMUTATION,
    weights=lm.landmark_weights(),
    inner=np.isin(np.arange(lm.NUM_LANDMARKS), lm.INNER),
    vertex_rule=_ibug68_vertices)

_AFLW21_NAMES = ("left_brow_outer", "left_brow_centre", "left_brow_inner", "right_brow_inner",
                 "right_brow_centre", "right_brow_outer", "left_eye_outer", "left_eye_centre",
                 "left_eye_inner", "right_eye_inner", "right_eye_centre", "right_eye_outer",
                 "left_ear_lobe", "nose_left", "nose_tip", "nose_right", "right_ear_lobe",
                 "mouth_left", "mouth_centre", "mouth_right", "chin")
AFLW21 = LandmarkSet(
    name="aflw21",
    point_names=_AFLW21_NAMES,
    flip_permutation=_flip_from_pairs(21, [(0, 5), (1, 4), (2, 3), (6, 11), (7, 10), (8, 9),
                                           (12, 16), (13, 15), (17, 19)]),
    weights=np.where(np.isin(np.arange(21), [12, 16]), 0.5, 1.0).astype(np.float32),
    inner=~np.isin(np.arange(21), [12, 16]),
    vertex_rule=_aflw21_vertices)

# Registered sets in the order of their integer index (examples carry "landmark_set": index).
SETS = (IBUG68, AFLW21)
INDEX = {s.name: i for i, s in enumerate(SETS)}


def get(name_or_index) -> LandmarkSet:
  """The registered set of a name ("ibug68", "aflw21") or index."""
  if isinstance(name_or_index, str):
    if name_or_index not in INDEX:
      raise ValueError(f"unknown landmark set {name_or_index!r} (known: {sorted(INDEX)})")
    return SETS[INDEX[name_or_index]]
  return SETS[int(name_or_index)]


@flax.struct.dataclass
class SetTable:
  """Every registered set on one model, padded to MAX_POINTS (S sets).

  ids, mix: (S, 68, M) vertices and their weights per point.  weights: (S, 68) L_land weights
  (0 on padding and on points the model lacks).  inner: (S, 68) float in {0, 1} (same zeros).
  """
  ids: jnp.ndarray
  mix: jnp.ndarray
  weights: jnp.ndarray
  inner: jnp.ndarray


def set_table(model, sets: Sequence[LandmarkSet] = SETS) -> SetTable:
  """The SetTable of `sets` on `model` (numpy work at the edge; arrays are float32/int32)."""
  s = len(sets)
  ids = np.zeros((s, MAX_POINTS, MAX_VERTICES), np.int32)
  mix = np.zeros((s, MAX_POINTS, MAX_VERTICES), np.float32)
  weights = np.zeros((s, MAX_POINTS), np.float32)
  inner = np.zeros((s, MAX_POINTS), np.float32)
  for i, ls in enumerate(sets):
    k = len(ls)
    ids[i, :k], mix[i, :k] = ls.vertices(model)
    have = mix[i, :k].sum(-1) > 0
    weights[i, :k] = ls.weights * have
    inner[i, :k] = ls.inner * have
  return SetTable(jnp.asarray(ids), jnp.asarray(mix), jnp.asarray(weights), jnp.asarray(inner))


def points(vertices, table: SetTable, set_index):
  """Each example's set points from its vertices (jit-friendly).

  Args:
    vertices: (B, N, D) e.g. screen vertices (x_px, y_px, depth) or camera-space vertices.
    table: SetTable; set_index: (B,) int set of each example.
  Returns:
    (B, 68, D): the weighted vertex means; rows past the set's length (and missing points) 0.
  """
  ids = table.ids[set_index]                       # (B, 68, M)
  mix = table.mix[set_index]                       # (B, 68, M)
  b = vertices.shape[0]
  gathered = vertices[jnp.arange(b)[:, None, None], ids]  # (B, 68, M, D)
  return jnp.sum(gathered * mix[..., None], axis=2)


def pad(points_k, visible_k, size: int = MAX_POINTS):
  """(K, D) points and (K,) visibility -> (size, D) and (size,) with zero padding."""
  pts = np.zeros((size,) + np.shape(points_k)[1:], np.float32)
  vis = np.zeros((size,), np.float32)
  k = len(points_k)
  pts[:k] = points_k
  vis[:k] = np.asarray(visible_k, np.float32)
  return pts, vis


def flip_points(points_k, visible_k, width: float, landmark_set: LandmarkSet):
  """Mirror K points of a horizontally flipped image (x -> width - x) and re-order them with
  the set's flip permutation: ((K, D) float32, (K,) visibility)."""
  perm = landmark_set.flip_permutation
  out = np.asarray(points_k, np.float32)[perm].copy()
  out[:, 0] = width - out[:, 0]
  return out, np.asarray(visible_k)[perm]
