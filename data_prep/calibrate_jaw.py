r"""Choose the model vertices of the iBUG jaw line (points 0-16) from AFLW2000-3D's 3D labels.

  python -m data_prep.calibrate_jaw --aflw2000_dir=../shared/data/aflw2000_3d_sample

A jaw landmark is a fixed model vertex, but models disagree on which: ICT's jaw vertices lie
on a frontal face's outline too far forward for the BFM fits behind AFLW2000-3D (and 3DDFA's
training labels), so on a turned head they project up to 19 % of the face box away from the
benchmark's points. For each image this tool fits the model to the 51 inner points (2D,
fixed contour, dff3d.fitting.fit_landmarks), maps the image's 3D ground truth
(pt3d_68 as (x, -y, z): right-handed, y up) into the fitted face's model space by the
similarity that takes its inner points onto the fit's inner landmark vertices
(metrics.similarity_align), and then picks for each jaw point the vertex of the fitted faces
that is nearest to its mapped ground truth over all images (least squares), the left and
right points of each pair as mirror vertices of each other (the chin on the midline). The
embedded ICT asset's JAW_VERTICES (data_prep/convert_ict.py) are this tool's output on the 16
`aflw2000_3d_sample` images (neither dev nor test images).

It also places the AFLW-21 points that have no iBUG counterpart and no 3D label, the ear lobes
and the nose sides (landmark_sets.CALIBRATED_AFLW21): with each image fitted to its 51 inner
points as above, a point's vertex is the one of a mirror pair whose projections lie nearest
(least squares, in units of the face box) to the images' hand clicks (pt2d, where visible).
Annotators click an ear lobe where it meets the cheek, 1.5 cm further forward than the lowest
ear vertex that the geometric rule picks: on a turned head the rule's vertex pulled the
pseudo-68 fit's jaw towards the nose (BUILD_NOTES, session 16).
"""

from typing import NamedTuple

from absl import app, flags
import numpy as np
from scipy.spatial import cKDTree

from dff3d import fitting
from dff3d import landmark_sets
from dff3d import metrics
from dff3d import morphable_model as mm
from dff3d import render as render_lib
from dff3d.data import augment
from dff3d.datasets import aflw2000_3d

_DATA = flags.DEFINE_string("aflw2000_dir", "../shared/data/aflw2000_3d_sample",
                            "AFLW2000-3D folder (image .jpg + .mat pairs).")

JAW = np.arange(17)
INNER = np.arange(17, 68)
CROP = 120
# Mean-shape |x| (model units) below which a vertex counts as on the midline (the chin).
MIDLINE = 0.15


class JawCalibration(NamedTuple):
  """vertices (17,) int chosen ids; rms (17,) their RMS distance to the mapped labels and
  rms_before (17,) the model's current jaw vertices' (model units); align_rms (B,) each
  image's similarity residual over the inner points."""
  vertices: np.ndarray
  rms: np.ndarray
  rms_before: np.ndarray
  align_rms: np.ndarray


def crop_affines(points_2d) -> np.ndarray:
  """(B, 2, 3) photo -> CROP-pixel affines of the face boxes of (B, 68, 2) photo points."""
  return np.stack([augment.crop_affine(augment.face_box(p), CROP)
                   for p in np.asarray(points_2d, np.float32)])


def crop_points(affines, points) -> np.ndarray:
  """(B, K, 2) float32: each image's (K, 2) photo points through its (2, 3) crop affine."""
  return np.stack([augment.transform_points(a, p)
                   for a, p in zip(affines, np.asarray(points, np.float64))]).astype(np.float32)


def fit_inner(model, crop_68):
  """Coefficients (batched pytree) of the model fitted to each image's 51 inner points (no jaw
  point, so the result does not depend on the model's jaw vertices).

  Args:
    crop_68: (B, 68, 2) the 68 points in CROP-pixel face-box crops (crop_points).
  """
  vis = np.zeros(crop_68.shape[:2], np.float32)
  vis[:, INNER] = 1.0
  config = fitting.FitConfig(image_size=CROP, contour="fixed", photo_steps=0)
  return fitting.fit_landmarks(model, np.asarray(crop_68, np.float32), config, vis)


def fitted_shapes(model, points_2d) -> np.ndarray:
  """(B, N, 3) model-space shapes (identity and expression, no pose) fitted (fit_inner) to
  each image's (68, 2) photo points (dff3d convention) in its face-box crop."""
  c = fit_inner(model, crop_points(crop_affines(points_2d), points_2d))
  return np.asarray(mm.shape(model, c.identity, c.expression), np.float64)


def mapped_jaw(model, shapes, gt_3d):
  """The labels' jaw points in each fitted face's model space.

  Args:
    shapes: (B, N, 3) fitted_shapes; gt_3d: (B, 68, 3) pt3d_68 rows (x, y, z), image axes.
  Returns:
    (targets (B, 17, 3), align_rms (B,)).
  """
  ids = np.asarray(model.landmarks)
  targets, residual = [], []
  for shape, gt in zip(shapes, np.asarray(gt_3d, np.float64)):
    g = gt * np.array([1.0, -1.0, 1.0])
    fit = metrics.similarity_align(g[INNER], shape[ids[INNER]])
    residual.append(np.sqrt(np.mean(np.sum(np.square(fit.aligned - shape[ids[INNER]]), -1))))
    targets.append(metrics.apply_similarity(g[JAW], fit.scale, fit.rotation, fit.translation))
  return np.stack(targets), np.asarray(residual)


def mirror_map(mean_shape) -> np.ndarray:
  """(N,) int: for each vertex, the vertex nearest to its mirror image (x -> -x)."""
  v = np.asarray(mean_shape, np.float64)
  return cKDTree(v).query(v * np.array([-1.0, 1.0, 1.0]))[1]


def choose_vertices(cost, mean_shape) -> np.ndarray:
  """(17,) int: least-squares jaw vertices, mirror pairs (j, 16 - j), the chin on the midline.

  Args:
    cost: (17, N) jaw_cost of the fitted shapes and mapped labels; mean_shape: (N, 3).
  """
  mirror = mirror_map(mean_shape)
  out = np.zeros(17, np.int64)
  for j in range(8):
    v = int(np.argmin(cost[j] + cost[16 - j][mirror]))
    out[j], out[16 - j] = v, int(mirror[v])
  midline = np.flatnonzero(np.abs(np.asarray(mean_shape)[:, 0]) < MIDLINE)
  out[8] = int(midline[np.argmin(cost[8][midline])])
  return out


def jaw_cost(shapes, targets) -> np.ndarray:
  """(17, N) summed squared distance of every vertex to each jaw point's targets."""
  cost = np.zeros((targets.shape[1], shapes.shape[1]))
  for shape, target in zip(shapes, targets):
    cost += np.sum(np.square(shape[None] - target[:, None]), -1)
  return cost


def calibrate(model, points_2d, gt_3d) -> JawCalibration:
  """Jaw vertices of `model` for labelled images: (B, 68, 2) pixels and (B, 68, 3) pt3d_68."""
  shapes = fitted_shapes(model, points_2d)
  targets, residual = mapped_jaw(model, shapes, gt_3d)
  cost = jaw_cost(shapes, targets) / len(shapes)  # computed once: it is (17, N) x B images
  chosen = choose_vertices(cost, model.mean_shape)
  before = np.asarray(model.landmarks)[JAW]
  return JawCalibration(vertices=chosen, rms=np.sqrt(cost[JAW, chosen]),
                        rms_before=np.sqrt(cost[JAW, before]), align_rms=residual)


class PairCalibration(NamedTuple):
  """rows (2,) the AFLW-21 rows of a mirror pair (landmark_sets.AFLW21); vertices (2,) int
  their chosen vertices (mirror images); rms and rms_before: RMS 2D distance of the chosen and
  of the set's current vertices to the hand points, as a fraction of the face box size (sqrt
  of its area); count: hand points used."""
  rows: tuple
  vertices: np.ndarray
  rms: float
  rms_before: float
  count: int


# AFLW-21 mirror pairs placed from hand clicks (the points a geometric rule places, see
# landmark_sets): the ear lobes and the nose sides.
CALIBRATED_PAIRS = ((12, 16), (13, 15))


def click_cost(screen, hand, visible, box_size) -> np.ndarray:
  """(N,) summed squared distance (in box sizes) of every vertex to one hand point.

  Args:
    screen: (B, N, 2) projected vertices; hand: (B, 2) the hand point, same pixels;
    visible: (B,) bool; box_size: (B,) face box sizes in those pixels.
  """
  d = (screen[visible] - hand[visible][:, None]) / box_size[visible][:, None, None]
  return np.sum(np.square(d), axis=(0, 2))


def calibrate_aflw21(model, points_2d, hand_21, visible_21, pairs=CALIBRATED_PAIRS):
  """AFLW-21 vertices of `model` that best reproduce hand-clicked points, per mirror pair.

  Args:
    points_2d: (B, 68, 2) photo pixels of each image's 68 ground-truth points (for the fit).
    hand_21: (B, 21, 2) photo pixels of its AFLW-21 hand points; visible_21: (B, 21) bool.
    pairs: AFLW-21 row pairs (left, right); the right vertex is the left one's mirror_map.
  Returns:
    [PairCalibration] in the order of `pairs`.
  Raises:
    ValueError when a pair has no visible hand point.
  """
  affines = crop_affines(points_2d)
  gt, hand = crop_points(affines, points_2d), crop_points(affines, hand_21)
  box_size = np.sqrt(np.prod(gt.max(1) - gt.min(1), axis=-1))
  _, screen, _ = render_lib.camera_vertices(model, fit_inner(model, gt), (CROP, CROP))
  screen = np.asarray(screen, np.float64)[..., :2]
  visible_21 = np.asarray(visible_21, bool)
  mirror = mirror_map(model.mean_shape)
  ids, _ = landmark_sets.AFLW21.vertices(model)
  out = []
  for a, b in pairs:
    count = int(visible_21[:, [a, b]].sum())
    if count == 0:
      raise ValueError(f"AFLW-21 points {a} and {b}: no visible hand click to calibrate on")
    left, right = (click_cost(screen, hand[:, k], visible_21[:, k], box_size) for k in (a, b))
    total = left + right[mirror]
    best = int(np.argmin(total))
    before = left[ids[a, 0]] + right[ids[b, 0]]
    out.append(PairCalibration(rows=(a, b), vertices=np.array([best, mirror[best]]),
                               rms=float(np.sqrt(total[best] / count)),
                               rms_before=float(np.sqrt(before / count)), count=count))
  return out


def read_labels(directory) -> list:
  """The load_aflw2000_3d_mat dicts of an AFLW2000-3D folder, each with "pt3d": its (68, 3)
  pt3d_68 with x and y moved to dff3d's pixel convention (+ 0.5); a .mat that does not load is
  one printed line and left out."""
  out = []
  for _, mat in aflw2000_3d.list_aflw2000_3d(directory).pairs:
    try:
      lab = aflw2000_3d.load_aflw2000_3d_mat(mat)
    except (aflw2000_3d.DatasetFormatError, aflw2000_3d.DatasetNotFoundError) as e:
      print(str(e).splitlines()[0])
      continue
    pts = lab["landmarks_3d"].astype(np.float64)
    pts[:, :2] += 0.5
    out.append({**lab, "pt3d": pts})
  if not out:
    raise app.UsageError(f"{directory}: no readable AFLW2000-3D labels")
  return out


def hand_points(labels, directory=""):
  """(pt3d (B, 68, 3), pt2d (B, 21, 2), visible (B, 21) bool) of the read_labels entries that
  hold AFLW's 21 hand points, pt2d + 0.5 as pt3d; the others are left out."""
  rows = [(lab["pt3d"], lab["pt2d"].astype(np.float64) + 0.5, lab["pt2d_visible"])
          for lab in labels if lab.get("pt2d") is not None]
  if not rows:
    raise app.UsageError(f"{directory}: no AFLW2000-3D file with 21 hand points (pt2d)")
  return tuple(np.stack(a) for a in zip(*rows))


def load_hand_points(directory):
  """hand_points of read_labels(directory)."""
  return hand_points(read_labels(directory), directory)


def main(argv):
  del argv
  labels = read_labels(_DATA.value)
  gt = np.stack([lab["pt3d"] for lab in labels])
  model = mm.default_model()
  cal = calibrate(model, gt[..., :2], gt)
  print(f"{len(gt)} images; inner-point alignment RMS median {np.median(cal.align_rms):.2f} "
        f"{model.units}")
  print("jaw vertices:", tuple(int(v) for v in cal.vertices))
  print(f"RMS distance to the labels: {cal.rms.mean():.2f} {model.units} "
        f"(the model's current jaw vertices: {cal.rms_before.mean():.2f})")
  pt3d, pt2d, visible = hand_points(labels, _DATA.value)
  for cal in calibrate_aflw21(model, pt3d[..., :2], pt2d, visible):
    names = " / ".join(landmark_sets.AFLW21.point_names[k] for k in cal.rows)
    print(f"AFLW-21 {names}: vertices {tuple(int(v) for v in cal.vertices)} (RMS distance to "
          f"{cal.count} hand clicks {100 * cal.rms:.1f} % of the face box; the set's current "
          f"vertices {100 * cal.rms_before:.1f} %)")


if __name__ == "__main__":
  app.run(main)
