r"""Face detectors on AFLW2000-3D: faces found per |yaw| group and ms per image, as JSON lines.

  python -m benchmarks.detectors                       # 50 per group of aflw2000_3d_dev
  python -m benchmarks.detectors --modes=hog,auto --per_group=20
  python -m benchmarks.detectors --calibrate           # BOX_CALIBRATION's measurement
  python -m benchmarks.detectors --grid=6 --grid_sides=640,1024,1600,0   # large photos

Images: --per_group per |yaw| group (metrics.yaw_groups of Pose_Para's yaw) of --data_dir,
a deterministic, evenly spaced choice from each group's name-sorted list. A face is "found"
when one of the detections of detect.detect_boxes has a crop box (detect.crop_box, the box
the regressor crops) with IoU >= 0.5 with augment.face_box of the ground-truth 68 points
(pt3d_68 x, y + 0.5: dff3d pixels). "extra": detections not matching the annotated face
(AFLW2000-3D annotates one face per image: some extras are real other faces). Modes:

  hog       detector="hog" (default upsample: 0, then 1 where 0 finds nothing; 450 px as is)
  hog0      detector="hog", upsample 0
  hog1      detector="hog", upsample 1 (the default before session 6)
  cnn       detector="cnn" (upsample 0 on a copy of longer side detect.CNN_FIRST_SIDE, then
            twice that where it finds nothing, up to detect.CNN_MAX_SIDE)
  cnn300    detector="cnn" on one copy of 300 px
  cnn_full  detector="cnn", upsample 1 on the full image (about 7 s per image here: only
            the first --full_per_group images of each group's choice)
  auto      detector="auto" (HOG; the CNN as "cnn" where HOG finds nothing)
  both      detector="both" (HOG and the CNN always, merged)
  auto0     detector="auto", upsample=0 (HOG then finds faces of 80 px and more only)
  auto1     detector="auto", upsample=1 (HOG always at upsample 1)
  auto200   detector="auto", the CNN on one copy of 200 px
  auto225   detector="auto", the CNN on one copy of 225 px (the default before session 10)
  auto900   detector="auto", cnn_max_side=900 (copies of 225, 450 and 900 px)

Each line: mode, images and found per group (0-30, 30-60, 60-90), extra, cnn_runs (images
where the CNN ran), ms per image (median, mean; time of detect_boxes on the float image
io.read_image gives, after one untimed call that loads the models), crop_iou_median (best
matching crop box vs face_box(ground truth), over found faces) and landmark_nme_median per
group (dlib's 68 points, detect.landmarks_in_box on the matching box, bbox-normalised NME in
percent against pt3d_68: only to see whether the points are usable beyond frontal faces).

--calibrate prints, per detector, the box_from_rectangle constants measured as
detect.BOX_CALIBRATION's comment says over every image of --calibration_dirs, and exits.
--grid=K tiles K x K images of the 0-30 group (450 px each) into one large photo and prints
found (of K*K) and ms for detector "hog" and "auto" at each max_side of --grid_sides
(0: no downscaling).
--paste=S1,S2,... runs --modes on the chosen images of the 60-90 group, each resized by S and
pasted into a 1920 x 1080 photo of smooth noise (turned faces in a large photo), a line per
mode and scale (the "found" of the 60-90 group is the figure).
"""

import argparse
import json
import os
import time

import numpy as np
from PIL import Image

from dff3d import detect, io, metrics
from dff3d.data import augment
from dff3d.datasets import aflw2000_3d

_HERE = os.path.dirname(os.path.abspath(__file__))
_DATA = os.path.join(_HERE, "..", "..", "shared", "data")

MODES = {
    "hog": dict(detector="hog"),
    "hog0": dict(detector="hog", upsample=0),
    "hog1": dict(detector="hog", upsample=1),
    "cnn": dict(detector="cnn"),
    "cnn300": dict(detector="cnn", cnn_first_side=300, cnn_max_side=300),
    "cnn_full": dict(detector="cnn", upsample=1, cnn_first_side=1 << 30,
                     cnn_max_side=1 << 30),
    "auto": dict(detector="auto"),
    "both": dict(detector="both"),
    "auto0": dict(detector="auto", upsample=0),
    "auto1": dict(detector="auto", upsample=1),
    "auto200": dict(detector="auto", cnn_first_side=200, cnn_max_side=200),
    "auto225": dict(detector="auto", cnn_first_side=225, cnn_max_side=225),
    "auto900": dict(detector="auto", cnn_max_side=900),
}


def choose(data_dir, per_group):
  """[(image path, gt (68, 2) dff3d pixels, group)], per_group evenly spaced per yaw group."""
  pairs = aflw2000_3d.list_aflw2000_3d(data_dir).pairs
  labels = [aflw2000_3d.load_aflw2000_3d_mat(m) for _, m in pairs]
  groups = metrics.yaw_groups(np.array([lab["yaw_deg"] for lab in labels]))
  chosen = []
  for g in range(3):
    idx = np.flatnonzero(groups == g)
    if per_group < len(idx):
      idx = idx[np.round(np.linspace(0, len(idx) - 1, per_group)).astype(int)]
    chosen += [(pairs[i][0], labels[i]["landmarks_3d"][:, :2] + 0.5, g) for i in idx]
  return chosen


def best_match(boxes, gt_box):
  """(index of the box whose crop box overlaps gt_box most, that IoU); (None, 0) if none."""
  if not boxes:
    return None, 0.0
  ious = detect.box_iou(np.stack([detect.crop_box(b) for b in boxes]), gt_box)
  k = int(np.argmax(ious))
  return k, float(ious[k])


def paste(image, gt, scale, rng):
  """(1920 x 1080 photo of smooth noise holding `image` resized by `scale` at a random place,
  gt (68, 2) moved with it)."""
  h, w = image.shape[:2]
  size = (int(round(w * scale)), int(round(h * scale)))
  if size[0] > 1920 or size[1] > 1080:
    raise SystemExit(f"--paste scale {scale}: {size} does not fit into 1920 x 1080")
  face = Image.fromarray((image * 255).round().astype(np.uint8)).resize(size, Image.BILINEAR)
  noise = rng.integers(70, 180, (135, 240, 3), dtype=np.uint8)
  photo = np.array(Image.fromarray(noise).resize((1920, 1080), Image.BICUBIC))
  x0, y0 = int(rng.integers(0, 1921 - size[0])), int(rng.integers(0, 1081 - size[1]))
  photo[y0:y0 + size[1], x0:x0 + size[0]] = np.asarray(face)
  return photo.astype(np.float32) / 255, gt * scale + np.array([x0, y0])


def run_mode(name, images):
  """One JSON dict for a MODES entry over [(image, gt (68, 2), yaw group)]."""
  kwargs = MODES[name]
  detect.detect_boxes(images[0][0], **kwargs)  # loads the models
  found, n = [0, 0, 0], [0, 0, 0]
  extra, cnn_runs, ms, ious = 0, 0, [], []
  nmes = [[], [], []]
  for image, gt, g in images:
    t = time.perf_counter()
    boxes = detect.detect_boxes(image, **kwargs)
    ms.append((time.perf_counter() - t) * 1e3)
    gt_box = augment.face_box(gt)
    k, iou = best_match(boxes, gt_box)
    hit = k is not None and iou >= 0.5
    n[g] += 1
    extra += len(boxes) - int(hit)
    det = kwargs["detector"]  # "auto" runs the CNN exactly where it returns no HOG box
    cnn_runs += det in ("cnn", "both") or (det == "auto" and
                                            not any(b.source == "hog" for b in boxes))
    if hit:
      found[g] += 1
      ious.append(iou)
      lm = detect.landmarks_in_box(image, boxes[k])
      nmes[g].append(100 * float(metrics.nme_2d(lm[None], gt[None])[0]))
  return dict(mode=name, **{k: v for k, v in kwargs.items()}, images=n, found=found,
              extra=extra, cnn_runs=cnn_runs, ms_median=round(float(np.median(ms)), 1),
              ms_mean=round(float(np.mean(ms)), 1),
              crop_iou_median=round(float(np.median(ious)), 3) if ious else None,
              landmark_nme_median=[round(float(np.median(v)), 2) if v else None
                                   for v in nmes])


def calibrate(dirs):
  """BOX_CALIBRATION's measurement for each detector, as in its comment."""
  settings = {"hog": dict(detector="hog"), "cnn": dict(detector="cnn")}
  items = [it for d in dirs for it in choose(d, 1 << 30)]
  for source, kwargs in settings.items():
    scales, offsets = [], []
    for path, gt, _ in items:
      image = io.read_image(path)
      gt_box = augment.face_box(gt)
      centre = (gt_box[:2] + gt_box[2:]) / 2
      inside = []
      for b in detect.detect_boxes(image, **kwargs):
        c = (b.rect[:2] + b.rect[2:]) / 2
        if np.all(c >= gt_box[:2]) and np.all(c <= gt_box[2:]):
          inside.append(b)
      if not inside:
        continue
      b = min(inside, key=lambda b: np.linalg.norm((b.rect[:2] + b.rect[2:]) / 2 - centre))
      side = ((b.rect[2] - b.rect[0]) + (b.rect[3] - b.rect[1])) / 2
      scales.append((gt_box[2] - gt_box[0]) / side)
      offsets.append((centre - (b.rect[:2] + b.rect[2:]) / 2) / side)
    offsets = np.array(offsets)
    print(json.dumps(dict(
        calibration=source, **kwargs, images=len(items), measured=len(scales),
        scale=round(float(np.median(scales)), 3),
        offset=[round(float(v), 3) for v in np.median(offsets, 0)],
        scale_quartiles=[round(float(v), 3) for v in np.percentile(scales, [25, 75])],
        current=detect.BOX_CALIBRATION[source])), flush=True)


def grid(items, k, sides):
  """K x K tiles of frontal images as one photo: found and ms per detector and max_side."""
  tiles = [(io.read_image(p), gt) for p, gt, g in items if g == 0][:k * k]
  if len(tiles) < k * k:
    raise SystemExit(f"--grid={k} needs {k * k} images of the 0-30 group, have {len(tiles)}")
  s = tiles[0][0].shape[0]
  photo = np.zeros((k * s, k * s, 3), np.float32)
  gt_boxes = []
  for i, (image, gt) in enumerate(tiles):
    y, x = divmod(i, k)
    photo[y * s:(y + 1) * s, x * s:(x + 1) * s] = image[:s, :s]
    gt_boxes.append(augment.face_box(gt + np.array([x * s, y * s])))
  for detector in ("hog", "auto"):
    for side in sides:
      kwargs = dict(detector=detector, max_side=side or 1 << 30)
      ms = []
      for _ in range(2):
        t = time.perf_counter()
        boxes = detect.detect_boxes(photo, **kwargs)
        ms.append((time.perf_counter() - t) * 1e3)
      crops = np.stack([detect.crop_box(b) for b in boxes]) if boxes else np.zeros((0, 4))
      found = sum(bool(len(crops)) and bool(np.max(detect.box_iou(crops, g)) >= 0.5)
                  for g in gt_boxes)
      print(json.dumps(dict(grid=k, photo_side=k * s, detector=detector, max_side=side or None,
                            faces=k * k, found=int(found), extra=len(boxes) - int(found),
                            ms=round(min(ms), 1))), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data_dir", default=os.path.join(_DATA, "aflw2000_3d_dev"))
  p.add_argument("--per_group", type=int, default=50)
  p.add_argument("--full_per_group", type=int, default=10, help="images per group for cnn_full")
  p.add_argument("--modes", default="hog,cnn,auto,both", help=",".join(MODES))
  p.add_argument("--calibrate", action="store_true")
  p.add_argument("--calibration_dirs", default=",".join(
      os.path.join(_DATA, d) for d in ("aflw2000_3d_dev", "aflw2000_3d_sample")))
  p.add_argument("--grid", type=int, default=0)
  p.add_argument("--grid_sides", default="640,1024,1600,0")
  p.add_argument("--paste", default="", help="scales, e.g. 1,1.8 (see the module doc)")
  a = p.parse_args()
  if a.calibrate:
    calibrate(a.calibration_dirs.split(","))
    return
  items = choose(a.data_dir, a.per_group)
  if a.grid:
    grid(items, a.grid, [int(v) for v in a.grid_sides.split(",")])
    return
  for name in a.modes.split(","):
    if name not in MODES:
      raise SystemExit(f"unknown mode {name!r}; one of {', '.join(MODES)}")
  if a.paste:
    turned = [(io.read_image(p), gt, g) for p, gt, g in items if g == 2]
    for scale in [float(v) for v in a.paste.split(",")]:
      rng = np.random.default_rng(0)
      photos = [paste(image, gt, scale, rng) + (g,) for image, gt, g in turned]
      for name in a.modes.split(","):
        print(json.dumps(dict(paste_scale=scale, photo="1920x1080", **run_mode(name, photos))),
              flush=True)
    return
  for name in a.modes.split(","):
    subset = items
    if name == "cnn_full":
      subset = [it for g in range(3) for it in [x for x in items if x[2] == g][:a.full_per_group]]
    print(json.dumps(run_mode(name, [(io.read_image(p), gt, g) for p, gt, g in subset])),
          flush=True)


if __name__ == "__main__":
  main()
