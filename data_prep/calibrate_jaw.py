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
"""

from typing import NamedTuple

from absl import app, flags
import numpy as np
from scipy.spatial import cKDTree

from dff3d import fitting
from dff3d import metrics
from dff3d import morphable_model as mm
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


def fitted_shapes(model, points_2d) -> np.ndarray:
  """(B, N, 3) model-space shapes (identity and expression, no pose) fitted to each image's
  51 inner points (no jaw point, so the result does not depend on the model's jaw vertices).

  Args:
    points_2d: (B, 68, 2) photo pixels (dff3d convention).
  """
  crops = np.stack([augment.transform_points(augment.crop_affine(augment.face_box(p), CROP), p)
                    for p in np.asarray(points_2d, np.float32)])
  vis = np.zeros(crops.shape[:2], np.float32)
  vis[:, INNER] = 1.0
  config = fitting.FitConfig(image_size=CROP, contour="fixed", photo_steps=0)
  c = fitting.fit_landmarks(model, crops, config, vis)
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


def load_labels(directory) -> np.ndarray:
  """(B, 68, 3) pt3d_68 of an AFLW2000-3D folder, x and y moved to dff3d's pixel convention
  (+ 0.5); a .mat that does not load is one printed line and left out."""
  out = []
  for _, mat in aflw2000_3d.list_aflw2000_3d(directory).pairs:
    try:
      pts = aflw2000_3d.load_aflw2000_3d_mat(mat)["landmarks_3d"].astype(np.float64)
    except (aflw2000_3d.DatasetFormatError, aflw2000_3d.DatasetNotFoundError) as e:
      print(str(e).splitlines()[0])
      continue
    pts[:, :2] += 0.5
    out.append(pts)
  if not out:
    raise app.UsageError(f"{directory}: no readable AFLW2000-3D labels")
  return np.stack(out)


def main(argv):
  del argv
  gt = load_labels(_DATA.value)
  model = mm.default_model()
  cal = calibrate(model, gt[..., :2], gt)
  print(f"{len(gt)} images; inner-point alignment RMS median {np.median(cal.align_rms):.2f} "
        f"{model.units}")
  print("jaw vertices:", tuple(int(v) for v in cal.vertices))
  print(f"RMS distance to the labels: {cal.rms.mean():.2f} {model.units} "
        f"(the model's current jaw vertices: {cal.rms_before.mean():.2f})")


if __name__ == "__main__":
  app.run(main)
