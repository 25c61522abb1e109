r"""Evaluate on AFLW2000-3D (or AFLW-LFPA) with the paper's protocol (Table 1).

  python -m experiments.evaluate --dataset=aflw2000_3d --data_dir=DIR [--checkpoint=CKPT]
      [--face_box=ground_truth|detector] [--landmarks=detector|ground_truth]
      [--output_json=results.json]

DIR is the dataset as distributed (imageNNNNN.jpg + .mat). With --checkpoint (a training
workdir, or `shipped`), a trained regressor predicts each face from a crop at its own input
size: --face_box=ground_truth crops around the ground-truth landmarks (the usual protocol of
3DDFA / PRNet: the box is given); --face_box=detector starts from dlib's face rectangle
(detect.box_from_rectangle), predicts, re-crops around the predicted landmarks and
predicts again: the photo-only figure (an image without a detection is a failure, counted in
"faces_not_found"). Without a checkpoint, faces are fitted per image
(dff3d.fitting) to 68 input landmarks: --landmarks=detector (dlib, the honest setting) or
ground_truth (an oracle: it measures how well the model can represent the annotation, not
alignment; the figure issue #7 asks for).

NME: 68 points, x and y, divided by sqrt(w h) of the ground-truth box; groups by |yaw| from
Pose_Para; "mean" is the mean of the group means, on all images and on a seeded balanced
subset; 3D: similarity-aligned (Umeyama) 3D landmark error normalised by the same box.
With --dense_gt (users who hold dense ground-truth meshes), "nme_3d_dense": the predicted mesh
ICP-aligned (rigid + scale, started from the 68-landmark similarity fit) to each ground-truth
cloud, mean point distance normalised by the 68-point box.
AFLW-LFPA: NME over the visible of its 34 points; it needs --lfpa_vertices, a .npy of the 34
model vertex ids (the 34-point scheme has no established mapping to the ICT model).
--turn_photos=90|180|270 turns every photo and its ground truth counter-clockwise first (a
robustness check: faces on their side or upside down; --upright is the library's answer).
An image whose labels or pixels cannot be read, or without a detected face, is one line on
stderr and in "failed_images"; the run goes on.
"""

import os
import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from dff3d import detect
from dff3d import fitting
from dff3d import io
from dff3d import metrics
from dff3d import morphable_model as mm
from dff3d import reconstruction
from dff3d import render as render_lib
from dff3d.data import augment
from dff3d.datasets import aflw2000_3d, aflw_lfpa

_DATASET = flags.DEFINE_enum("dataset", "aflw2000_3d", ["aflw2000_3d", "aflw_lfpa"], "Dataset.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset folder as distributed.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Regressor: a training workdir, or "
                                   "'shipped' (weights in dff3d/assets/) (optional).")
_FACE_BOX = flags.DEFINE_enum("face_box", "ground_truth", ["ground_truth", "detector"],
                              "With --checkpoint, the crop box: from the ground-truth 68 "
                              "landmarks, or from the dlib face rectangle (two passes).")
_LANDMARKS = flags.DEFINE_enum("landmarks", "detector", ["detector", "ground_truth"],
                               "Input landmarks of the per-image fit (no checkpoint).")
_OUTPUT = flags.DEFINE_string("output_json", None, "Write the figures here.")
_SIZE = flags.DEFINE_integer("image_size", 224, "Crop side of the per-image fit (a "
                             "checkpoint crops at its regressor's size).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Faces per compiled batch.")
_PHOTO = flags.DEFINE_integer("photo_steps", 40, "Photometric steps (0 with a checkpoint: "
                              "pure regression).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the balanced subset.")
_DETECTOR = flags.DEFINE_enum("detector", "auto", ["auto", "cnn", "hog", "both"], "Face detector of "
                              "--face_box=detector and --landmarks=detector (detect.py).")
_REFINE = flags.DEFINE_integer("refine_steps", 0, "With --checkpoint: photometric refinement "
                               "steps after the regressor (as experiments.reconstruct).")
_PASSES = flags.DEFINE_integer("passes", 1, "With --checkpoint and --face_box=ground_truth: 1 "
                               "regresses the ground-truth crop; 2 re-crops at that pass's "
                               "68 landmarks and regresses again (the detector box always "
                               "takes 2 passes).")
_FLIP = flags.DEFINE_bool("flip_average", False, "With --checkpoint: also regress each crop's "
                          "mirror image and average the two estimates (twice the cost).")
_UPRIGHT = flags.DEFINE_bool("upright", False, "With --checkpoint: read each face's quarter "
                             "turn (the shipped dff3d.orientation classifier) and crop it where "
                             "it stands upright; with --face_box=detector also search photos "
                             "without a detection turned by 90, 270, 180 degrees (the job's "
                             "defaults).")
_REFINER = flags.DEFINE_string("refiner", "", "With --checkpoint: the landmark refiner "
                               "(dff3d.refine) after the regressor: 'shipped' or a file of "
                               "refine.save_refiner; empty: none (the job uses the shipped one).")
_TURN = flags.DEFINE_enum("turn_photos", "0", ["0", "90", "180", "270"], "Turn every photo and "
                          "its ground truth by this many degrees counter-clockwise first.")
_LFPA_VERTICES = flags.DEFINE_string("lfpa_vertices", None, ".npy of 34 model vertex ids.")
_DENSE_GT = flags.DEFINE_string("dense_gt", None, "Folder of <stem>.npy (P, 3) ground-truth "
                                "mesh vertices in the frame of pt3d_68 (image x, y, z pixels).")


class NoFaceDetected(ValueError):
  """The detector found no face in an image."""


def nearest(candidates, box_of, gt_points):
  """The candidate whose box (box_of(candidate): (4,) x0, y0, x1, y1) has its centre nearest
  the centre of the ground-truth points (K, 2); None when there is none."""
  centre = np.asarray(gt_points).mean(0)
  distance = lambda c: np.linalg.norm((box_of(c)[:2] + box_of(c)[2:]) / 2 - centre)
  return min(candidates, key=distance, default=None)


def closest_detection(image, gt_points, detector="auto"):
  """The detected face (detect.Box) whose rectangle centre is nearest the centre of the
  ground-truth points (K, 2); NoFaceDetected when there is none."""
  box = nearest(detect.detect_boxes(image, detector), lambda b: b.rect, gt_points)
  if box is None:
    raise NoFaceDetected("no face detected")
  return box


def locate_face(image, lab, dataset, checkpoint, landmarks, face_box, detector="auto",
                turned_photos=False):
  """What the reconstruction starts from: (68, 2) landmarks (ground truth, or dlib's in the
  detected box for the per-image fit with landmarks="detector"), or with a checkpoint and
  face_box="detector" the (4,) crop box of the detected box (detect.crop_box). With
  turned_photos, a photo where the detector finds no face is searched turned by 90, 270 and
  180 degrees (detect.detect_turned, as the job does) and the crop box comes back in the
  photo's pixels. Raises NoFaceDetected."""
  if checkpoint and face_box == "detector":
    try:
      return detect.crop_box(closest_detection(image, lab["gt_2d"], detector))
    except NoFaceDetected:
      if not turned_photos:
        raise
    found = nearest(detect.detect_turned(image, detector), lambda t: t.crop_box, lab["gt_2d"])
    if found is None:
      raise NoFaceDetected("no face detected (also turned by 90, 270, 180 degrees)")
    return found.crop_box
  if checkpoint or landmarks == "ground_truth":
    if dataset != "aflw2000_3d":
      raise ValueError("ground-truth 68 landmarks exist only for AFLW2000-3D")
    return lab["gt_2d"]
  return detect.landmarks_in_box(image, closest_detection(image, lab["gt_2d"], detector))


def failure_line(path, error):
  """'path: first line of the error', printed to stderr as a failure and returned."""
  msg = f"{path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
  print(f"failed: {msg}", file=sys.stderr)
  return msg


def vertices_in_photo(model, face, vertex_ids, image_size, with_depth=False):
  """Photo coordinates of model vertices `vertex_ids` (an index array or slice) of a
  reconstructed face: (K, 2) pixels, or (K, 3) with the pixel-unit z of landmarks_3d."""
  c = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], face.coefficients)
  _, screen, _ = render_lib.camera_vertices(model, c, (image_size, image_size))
  pts = reconstruction.landmarks_to_photo(np.asarray(screen[0])[vertex_ids], face.crop_affine,
                                          image_size)
  return pts if with_depth else pts[:, :2]


def load_lfpa_vertices(path, model):
  """(34,) int vertex ids from a .npy file, validated against the model."""
  try:
    ids = np.load(path).astype(np.int64).reshape(-1)
  except Exception as e:  # noqa: BLE001 - any read failure is a bad file
    raise ValueError(f"{path}: cannot read vertex ids ({type(e).__name__})") from None
  if ids.shape != (34,) or ids.min() < 0 or ids.max() >= model.num_vertices:
    raise ValueError(f"{path}: expected 34 vertex ids in [0, {model.num_vertices})")
  return ids


def lfpa_labels(item):
  """Labels of one AFLW-LFPA item: 'gt_2d' (34, 2), 'visible' (34,), 'yaw_deg'."""
  lab = aflw_lfpa.load_aflw_lfpa(item)
  return {"gt_2d": lab["landmarks_34"], "visible": lab["landmarks_34_visible"],
          "yaw_deg": lab["yaw_deg"]}


def turned_labels(image, lab, k):
  """(image, labels) turned by k quarter turns counter-clockwise (augment.quarter_turn):
  'gt_2d' and, when present, 'gt_3d' (its z unchanged) move with the pixels."""
  lab = dict(lab)
  turned, lab["gt_2d"] = augment.quarter_turn(image, lab["gt_2d"], k)
  if "gt_3d" in lab:
    lab["gt_3d"] = augment.quarter_turn(image, lab["gt_3d"], k)[1]
  return turned, lab


def load_items(dataset, data_dir):
  """(items, failures): items a list of (image_path, labels dict with 'gt_2d' (K, 2),
  'visible', 'yaw_deg', ...); failures one line per image whose labels cannot be read."""
  if dataset == "aflw2000_3d":
    sources = aflw2000_3d.list_aflw2000_3d(data_dir).pairs  # (image, .mat) paths
    read = aflw2000_3d.ground_truth
  else:
    sources = [(item.image, item) for item in aflw_lfpa.list_aflw_lfpa(data_dir)]
    read = lfpa_labels
  items, failures = [], []
  for image_path, source in sources:
    try:
      items.append((str(image_path), read(source)))
    except Exception as e:  # noqa: BLE001 - one line per broken file, the run goes on
      failures.append(failure_line(image_path, e))
  return items, failures


def table(results):
  """The figures laid out like the paper's Table 1 (NME %)."""
  pct = lambda v: "  n/a" if v is None or not np.isfinite(v) else f"{100 * v:5.2f}"
  head = "Method | 0-30 | 30-60 | 60-90 | Mean | Balanced mean | 3D"
  row = (f"dff3d  | {pct(results['nme_0_30'])} | {pct(results['nme_30_60'])} | "
         f"{pct(results['nme_60_90'])} | {pct(results['nme_mean'])} | "
         f"{pct(results['nme_balanced_mean'])} | {pct(results['nme_3d'])}")
  paper = "paper  |  2.84 |  3.70 |  4.69 |  3.75 |   n/a |  2.19"
  return "\n".join([head, row, paper])


def summary(result):
  """The line printed under the table: images, failures, face box and faces not found."""
  n = result.get("passes")
  passes = f", {n} pass{'es' if n > 1 else ''}" if n else ""
  passes += ", flip-averaged" if result.get("flip_average") else ""
  if result.get("upright"):
    turned = sum(result["quarter_turns"][1:])
    passes += f", upright ({turned} face{'s' if turned != 1 else ''} read as turned)"
  passes += f", landmarks refined ({result['refiner']})" if result.get("refiner") else ""
  box = f"face box: {result['face_box']}{passes}; " if result["face_box"] else ""
  return (f"{result['num_images']} images, {result['failures']} failures ({box}"
          f"{result['faces_not_found']} faces not found)")


def dense_nme(model, out, kept, paths, dense_dir, image_size):
  """Per-image dense 3D NME against <stem>.npy clouds (images without one are skipped)."""
  preds, gts, inits, norms = [], [], [], []
  for face, lab, path in zip(out, kept, paths):
    stem = os.path.splitext(os.path.basename(path))[0]
    gt_path = os.path.join(dense_dir, stem + ".npy")
    if not os.path.isfile(gt_path):
      continue
    gt = np.load(gt_path).astype(np.float64)
    if gt.ndim != 2 or gt.shape[1] != 3:
      raise ValueError(f"{gt_path}: expected (P, 3) vertices, got shape {gt.shape}")
    verts = vertices_in_photo(model, face, slice(None), image_size, with_depth=True)
    fit = metrics.similarity_align(face.landmarks_3d, lab["gt_3d"])
    preds.append(verts)
    gts.append(gt)
    inits.append((fit.scale, fit.rotation, fit.translation))
    norms.append(float(metrics.bbox_size(lab["gt_3d"][None])[0]))
  if not preds:
    return None
  return float(np.mean(metrics.nme_3d_dense(preds, gts, norm=np.asarray(norms), init=inits)))


def evaluate(dataset, data_dir, model, config, batch_size, checkpoint=None,
             landmarks="detector", seed=0, lfpa_vertices=None, dense_gt=None,
             face_box="ground_truth", detector="auto", passes=1, flip_average=False,
             upright=False, turn_deg=0, refiner=""):
  """Figures dict (see module doc) for a dataset folder.

  checkpoint: None (per-image fit), a training workdir or "shipped", given as is to
  train.load_regressor; its regressor's image_size replaces config.image_size.
  face_box: with a checkpoint, "ground_truth" or "detector" (see module doc).
  detector: detect.detect_boxes's detector for face_box="detector" / landmarks="detector".
  passes: with a checkpoint and face_box="ground_truth", 1 (the ground-truth crop) or 2 (then
    reconstruction.regress_from_boxes from that crop's box: re-crop at pass 1's landmarks).
  flip_average: with a checkpoint, average each crop's estimate with its mirror image's
    (train.load_regressor).
  upright: with a checkpoint, crop each face where it stands upright (the shipped
    quarter-turn classifier, dff3d.orientation; "quarter_turns" in the result counts the
    faces read as turned by 0, 1, 2, 3 quarters); with face_box="detector" also search the
    photos without a detection turned (locate_face).
  turn_deg: 0, 90, 180 or 270: each photo and its ground truth turned counter-clockwise by it
    (augment.quarter_turn) before anything else.
  refiner: with a checkpoint, "" (none), "shipped" or a refiner file (refine.load_refiner):
    the regressed faces move to the refiner's landmarks (refine.refine_faces).
  """
  if turn_deg not in (0, 90, 180, 270):
    raise ValueError(f"turn_deg must be 0, 90, 180 or 270, got {turn_deg}")
  if face_box == "detector" and not checkpoint:
    raise ValueError("--face_box=detector needs --checkpoint (the per-image fit takes its "
                     "landmarks from --landmarks)")
  if passes not in (1, 2) or (passes == 2 and (not checkpoint or face_box != "ground_truth")):
    raise ValueError(f"--passes={passes}: 1, or 2 with --checkpoint and "
                     "--face_box=ground_truth")
  if dataset == "aflw_lfpa":
    if not lfpa_vertices:
      raise ValueError("AFLW-LFPA needs --lfpa_vertices (a .npy of 34 model vertex ids)")
    lfpa_vertices = load_lfpa_vertices(lfpa_vertices, model)
  regressor = None
  if checkpoint:
    from dff3d import train
    regressor = train.load_regressor(checkpoint, model, flip_average=flip_average)
    config = config.replace(image_size=regressor.image_size)  # crops it was trained on
  if refiner and not checkpoint:
    raise ValueError("--refiner needs --checkpoint (it refines the regressor's landmarks)")
  refine_fn = None
  if refiner:
    from dff3d import refine
    refine_fn = refine.load_refiner(None if refiner == "shipped" else refiner)
  classify = None
  if checkpoint and upright:
    from dff3d import orientation
    classify = orientation.load_orientation()
  items, failures = load_items(dataset, data_dir)
  faces, kept, kept_paths, not_found = [], [], [], 0
  for path, lab in items:
    try:
      image = io.read_image(path)
      if turn_deg:
        image, lab = turned_labels(image, lab, turn_deg // 90)
      faces.append((image, locate_face(image, lab, dataset, checkpoint, landmarks, face_box,
                                       detector, turned_photos=upright)))
    except Exception as e:  # noqa: BLE001 - one line per failed image, the run goes on
      not_found += isinstance(e, NoFaceDetected)
      failures.append(failure_line(path, e))
      continue
    kept.append(lab)
    kept_paths.append(path)
  if checkpoint and face_box == "detector":
    out = reconstruction.regress_from_boxes(model, faces, config, regressor, batch_size,
                                            orientation=classify, refiner=refine_fn)
  elif passes == 2:
    boxed = [(image, augment.face_box(pts, image_shape=image.shape)) for image, pts in faces]
    out = reconstruction.regress_from_boxes(model, boxed, config, regressor, batch_size,
                                            orientation=classify, refiner=refine_fn)
  else:
    out = reconstruction.reconstruct_faces(model, faces, config, batch_size, regressor,
                                           orientation=classify, refiner=refine_fn)
  yaw = np.array([lab["yaw_deg"] for lab in kept], np.float64)
  result = {"num_images": len(kept), "failures": len(failures), "failed_images": failures,
            "face_box": face_box if checkpoint else None, "faces_not_found": not_found,
            "detector": detector if (face_box == "detector" or not checkpoint) else None,
            "refine_steps": config.photo_steps if checkpoint else None,
            "passes": (2 if face_box == "detector" else passes) if checkpoint else None,
            "flip_average": bool(flip_average) if checkpoint else None,
            "upright": bool(upright) if checkpoint else None, "turn_deg": turn_deg,
            "refiner": refiner or None,
            "quarter_turns": (np.bincount([f.quarter_turns for f in out], minlength=4).tolist()
                              if checkpoint else None)}
  if dataset == "aflw2000_3d":
    pred = np.stack([f.landmarks_2d for f in out]) if out else np.zeros((0, 68, 2))
    gt = np.stack([lab["gt_2d"] for lab in kept]) if kept else np.zeros((0, 68, 2))
    nme = metrics.nme_2d(pred, gt) if len(pred) else np.zeros(0)
    result.update({k: v for k, v in metrics.grouped_nme(nme, yaw).items()
                   if k.startswith("nme")})
    counts = np.bincount(metrics.yaw_groups(yaw), minlength=3) if len(yaw) else [0, 0, 0]
    if min(counts) > 0:
      bal = metrics.balanced_grouped_nme(nme, yaw, seed)
      result["nme_balanced_mean"] = bal["nme_mean"]
    else:
      result["nme_balanced_mean"] = None
    pred3 = np.stack([f.landmarks_3d for f in out]) if out else np.zeros((0, 68, 3))
    gt3 = np.stack([lab["gt_3d"] for lab in kept]) if kept else np.zeros((0, 68, 3))
    result["nme_3d"] = float(np.mean(metrics.nme_3d(pred3, gt3))) if len(pred3) else None
    if dense_gt:
      result["nme_3d_dense"] = dense_nme(model, out, kept, kept_paths, dense_gt,
                                         config.image_size)
  else:
    pred = np.stack([vertices_in_photo(model, f, np.asarray(lfpa_vertices), config.image_size)
                     for f in out]) if out else np.zeros((0, 34, 2))
    gt = np.stack([lab["gt_2d"] for lab in kept]) if kept else np.zeros((0, 34, 2))
    vis = np.stack([lab["visible"] for lab in kept]) if kept else np.zeros((0, 34), bool)
    nme = metrics.nme_visible(pred, gt, vis) if len(pred) else np.zeros(0)
    result["nme_lfpa"] = float(np.nanmean(nme)) if len(nme) else None
  result["per_image_nme"] = [float(v) for v in nme]
  return result


def json_safe(value):
  """The result with every non-finite float (an all-missing group's NaN) as None: JSON has
  no NaN."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (float, np.floating)) and not np.isfinite(value):
    return None
  return value


def main(argv):
  del argv
  if not _DATA_DIR.value:
    raise app.UsageError("--data_dir is required")
  config = fitting.FitConfig(image_size=_SIZE.value, contour="fixed",
                             photo_steps=_REFINE.value if _CHECKPOINT.value else _PHOTO.value)
  try:
    result = evaluate(_DATASET.value, _DATA_DIR.value, mm.default_model(), config,
                      _BATCH.value, _CHECKPOINT.value, _LANDMARKS.value, _SEED.value,
                      _LFPA_VERTICES.value, _DENSE_GT.value, _FACE_BOX.value,
                      _DETECTOR.value, _PASSES.value, _FLIP.value, _UPRIGHT.value,
                      int(_TURN.value), _REFINER.value)
  except (aflw2000_3d.DatasetFormatError, FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  if _DATASET.value == "aflw_lfpa":
    print(f"AFLW-LFPA NME (34 visible points): {100 * result['nme_lfpa']:.2f}% (paper 3.24%)")
  else:
    print(table(result))
  print(summary(result))
  if _OUTPUT.value:
    io.write_json(_OUTPUT.value, json_safe(result))


if __name__ == "__main__":
  app.run(main)
