"""dff3d.detect.detect_boxes: HOG, CNN and "auto" face boxes, downscaling, NMS, calibration."""

import numpy as np
import pytest

from dff3d import detect
from tests.conftest import AFLW_SAMPLE_DIR, require

# Sample images picked with benchmarks/detectors.py's per-image detections: a frontal face
# (yaw 1 degree) both detectors find, and a profile (yaw 71) that HOG misses at upsample 1.
FRONTAL, PROFILE = "image00050", "image02420"


def _need_dlib():
  pytest.importorskip("dlib", reason="dlib not installed (pip install 'dff3d[detect]')")
  pytest.importorskip("face_recognition_models", reason="face_recognition_models not installed")


def _sample(stem):
  _need_dlib()
  from dff3d import io
  from dff3d.data import augment
  from dff3d.datasets import aflw2000_3d
  folder = require(AFLW_SAMPLE_DIR)
  lab = aflw2000_3d.load_aflw2000_3d_mat(folder / f"{stem}.mat")
  gt_box = augment.face_box(lab["landmarks_3d"][:, :2] + 0.5)
  return io.read_image(folder / f"{stem}.jpg"), gt_box


def _matches(boxes, gt_box):
  return [b for b in boxes if detect.box_iou(detect.crop_box(b), gt_box) >= 0.5]


def _box(rect, score=1.0, source="hog"):
  return detect.Box(np.asarray(rect, np.float32), score, source)


def test_box_from_rectangle_and_its_inverse():
  # side 100, centre (150, 100) + (0.1, -0.2) * 100 = (160, 80); half side 1.5 * 100 / 2
  np.testing.assert_allclose(
      detect.box_from_rectangle([100, 50, 200, 150], scale=1.5, offset=(0.1, -0.2)),
      [85, 5, 235, 155])
  rects = np.array([[0, 0, 100, 100], [10, 20, 60, 70]], np.float32)
  for source, (scale, offset) in detect.BOX_CALIBRATION.items():
    boxes = detect.box_from_rectangle(rects, scale, offset)
    np.testing.assert_allclose(detect.rectangle_from_box(boxes, scale, offset), rects, atol=1e-4)
    np.testing.assert_allclose(detect.crop_box(_box(rects[1], source=source)), boxes[1])
  # the defaults are HOG's constants, those reconstruct.box_from_rectangle was calibrated with
  np.testing.assert_allclose(detect.box_from_rectangle(rects[0]),
                             [50 + 3.4 - 76, 50 + 1.6 - 76, 50 + 3.4 + 76, 50 + 1.6 + 76],
                             atol=1e-4)
  assert detect.BOX_CALIBRATION["hog"] != detect.BOX_CALIBRATION["cnn"]


def test_nms_merges_duplicates_across_detectors():
  a = _box([100, 100, 200, 200], 2.0)
  near = _box([104, 98, 203, 201], 1.0)  # the same face, a few px off: dropped
  far = _box([300, 100, 400, 200], 0.5)  # another face: kept
  assert [b.score for b in detect.nms([a, near, far])] == [2.0, 0.5]
  # a CNN rectangle of the same face is framed differently, but its crop box is the same
  s_h, o_h = detect.BOX_CALIBRATION["hog"]
  s_c, o_c = detect.BOX_CALIBRATION["cnn"]
  cnn_rect = detect.rectangle_from_box(detect.box_from_rectangle(a.rect, s_h, o_h), s_c, o_c)
  cnn = _box(cnn_rect, 0.9, "cnn")
  assert np.abs(cnn.rect - a.rect).max() > 3  # framed differently, same crop box:
  np.testing.assert_allclose(detect.crop_box(cnn), detect.crop_box(a), atol=1e-3)
  kept = detect.nms([cnn, a, far])  # one face
  assert [(b.source, b.score) for b in kept] == [("cnn", 0.9), ("hog", 0.5)]
  assert len(detect.nms([a, near, far], iou=0.99)) == 3


def test_box_iou():
  np.testing.assert_allclose(detect.box_iou([0, 0, 10, 10], [[0, 0, 10, 10], [5, 0, 15, 10],
                                                              [20, 20, 30, 30]]),
                             [1.0, 1 / 3, 0.0])


def test_downscaled_copy_maps_outer_edges_exactly():
  """A square at columns [100, 200) of a 1000-px image lies at [25, 50) in a 250-px copy."""
  image = np.zeros((600, 1000, 3), np.uint8)
  image[200:300, 100:200] = 255
  small, (sx, sy) = detect._downscaled(image, 250)
  assert small.shape == (150, 250, 3) and (sx, sy) == (4.0, 4.0)
  col = small[..., 0].astype(np.float64).sum(0) / 255.0
  width = col.sum() / 25.0  # the square's width in copy pixels (antialiased edges)
  centre = (col * (np.arange(250) + 0.5)).sum() / col.sum()  # pixel centres at j + 0.5
  np.testing.assert_allclose([width * sx, centre * sx], [100, 150], atol=0.05)
  same, scale = detect._downscaled(image, 1000)
  assert same is image and scale == (1.0, 1.0)


def test_dlib_rectangle_to_outer_corners():
  dlib = pytest.importorskip("dlib", reason="dlib not installed")
  # inclusive pixel indices 10..29 x 20..39 -> outer corners (10, 20, 30, 40), scaled
  np.testing.assert_array_equal(detect._rect_array(dlib.rectangle(10, 20, 29, 39), (2.0, 3.0)),
                                [20, 60, 60, 120])


def test_unknown_detector_and_blank_images():
  with pytest.raises(ValueError, match="detector must be one of auto, cnn, hog, both"):
    detect.detect_boxes(np.zeros((64, 64, 3), np.float32), detector="bogus")
  with pytest.raises(ValueError, match="detector must be one of"):
    detect.require_detector("bogus")
  _need_dlib()
  for detector in detect.DETECTORS:
    assert detect.detect_boxes(np.zeros((300, 200, 3), np.float32), detector=detector) == []
    # dlib's CNN itself fails on images under 16 px; detect_boxes returns nothing there
    assert detect.detect_boxes(np.full((8, 8, 3), 0.5, np.float32), detector=detector) == []


def test_missing_cnn_model_file(monkeypatch):
  _need_dlib()
  import face_recognition_models
  detect._cnn_model.cache_clear()
  monkeypatch.setattr(face_recognition_models, "cnn_face_detector_model_location",
                      lambda: "/nonexistent/mmod_human_face_detector.dat")
  try:
    with pytest.raises(detect.DetectorUnavailableError, match="mmod_human_face_detector.dat"):
      detect.detect_boxes(np.zeros((64, 64, 3), np.float32), detector="cnn")
    assert detect.detect_boxes(np.zeros((64, 64, 3), np.float32), detector="hog") == []
  finally:
    monkeypatch.undo()
    detect._cnn_model.cache_clear()


def test_auto_finds_a_profile_that_hog_misses():
  image, gt_box = _sample(PROFILE)
  assert not _matches(detect.detect_boxes(image, detector="hog"), gt_box)
  boxes = detect.detect_boxes(image)  # "auto"
  found = _matches(boxes, gt_box)
  assert len(found) == 1 and found[0].source == "cnn" and found[0] is boxes[0]
  assert detect.box_iou(detect.crop_box(found[0]), gt_box) > 0.7
  lm = detect.landmarks_in_box(image, found[0])
  assert lm.shape == (68, 2) and lm.dtype == np.float32
  c = lm.mean(0)  # dlib's points on a profile are rough, but on the face
  assert np.all(c > gt_box[:2]) and np.all(c < gt_box[2:])


def _record_cnn(monkeypatch, found_at=None):
  """Replace the CNN by a stub that records the copy sides it is run at and finds one face
  only on copies of longer side >= found_at (never when None)."""
  sides = []

  def fake(img, upsample, min_score, max_side):
    sides.append(max_side)
    hit = found_at is not None and max_side >= found_at
    return [_box([10, 10, 60, 60], 0.9, "cnn")] if hit else []

  monkeypatch.setattr(detect, "_cnn_boxes", fake)
  monkeypatch.setattr(detect, "_hog_boxes", lambda *a: [])
  return sides


@pytest.mark.parametrize("detector", ["cnn", "auto", "both"])
def test_cnn_copies_double_until_a_face_is_found(monkeypatch, detector):
  photo = np.zeros((1080, 1920, 3), np.uint8)
  sides = _record_cnn(monkeypatch, found_at=450)
  assert len(detect.detect_boxes(photo, detector)) == 1
  assert sides == [detect.CNN_FIRST_SIDE, 450]  # stops at the first copy that finds a face
  sides = _record_cnn(monkeypatch)
  assert detect.detect_boxes(photo, detector) == []
  assert sides == [225, detect.CNN_MAX_SIDE]  # nothing found: up to CNN_MAX_SIDE only
  sides = _record_cnn(monkeypatch)
  detect.detect_boxes(photo, detector, cnn_max_side=900)
  assert sides == [225, 450, 900]
  sides = _record_cnn(monkeypatch)
  detect.detect_boxes(photo, detector, cnn_max_side=900, max_side=640)  # bounded by max_side
  assert sides == [225, 450, 640]
  sides = _record_cnn(monkeypatch)
  detect.detect_boxes(np.zeros((300, 200, 3), np.uint8), detector, cnn_max_side=900)
  assert sides == [225, 450]  # the second copy is the image itself: no larger one is tried
  sides = _record_cnn(monkeypatch)
  detect.detect_boxes(photo, detector, cnn_first_side=300, cnn_max_side=300)
  assert sides == [300]


def test_auto_finds_a_turned_face_in_a_large_photo():
  """A profile at 1.8x its 450-px AFLW2000-3D size (rectangle ~300 px) in a 1920 x 1080 photo
  is too small for the CNN's first copy (225 px) and found on the next (450 px)."""
  from benchmarks import detectors as bench  # the benchmark's --paste photos
  image, gt_box = _sample(PROFILE)
  photo, corners = bench.paste(image, gt_box.reshape(2, 2), 1.8, np.random.default_rng(0))
  gt = corners.reshape(4)
  assert not _matches(detect.detect_boxes(photo, cnn_max_side=detect.CNN_FIRST_SIDE), gt)
  found = _matches(detect.detect_boxes(photo), gt)  # "auto", copies up to CNN_MAX_SIDE
  assert len(found) == 1 and found[0].source == "cnn"


def test_frontal_face_hog_cnn_both():
  image, gt_box = _sample(FRONTAL)
  hog = detect.detect_boxes(image, detector="hog")
  cnn = detect.detect_boxes(image, detector="cnn")
  assert [b.source for b in hog] == ["hog"] and [b.source for b in cnn] == ["cnn"]
  assert _matches(hog, gt_box) and _matches(cnn, gt_box)
  # auto stops at HOG's box; both runs the two and merges their boxes of the one face
  auto = detect.detect_boxes(image)
  assert len(auto) == 1 and auto[0].source == "hog"
  np.testing.assert_array_equal(auto[0].rect, hog[0].rect)
  both = detect.detect_boxes(image, detector="both")
  assert len(both) == 1 and both[0].source == "cnn"
  np.testing.assert_array_equal(both[0].rect, cnn[0].rect)
  # the calibrated crop boxes of the two detectors frame the face alike
  assert detect.box_iou(detect.crop_box(hog[0]), detect.crop_box(cnn[0])) > 0.7
  # landmarks of a HOG box are detect_faces' own (the face is large: found at upsample 0)
  face = detect.detect_faces(image, upsample=0)[0]
  np.testing.assert_array_equal(face.bbox, hog[0].rect)
  np.testing.assert_array_equal(detect.landmarks_in_box(image, hog[0]), face.landmarks)
  lm_cnn = detect.landmarks_in_box(image, cnn[0])
  assert np.abs(lm_cnn - face.landmarks).mean() < 0.03 * (gt_box[2] - gt_box[0])


def test_hog_upsamples_only_when_the_coarse_pass_finds_nothing(monkeypatch):
  image, gt_box = _sample(FRONTAL)
  calls = []
  hog_boxes = detect._hog_boxes
  monkeypatch.setattr(detect, "_hog_boxes", lambda img, up, *a: calls.append(up) or
                      hog_boxes(img, up, *a))
  # a large face: the coarse pass (a quarter of the pixels of upsample 1) finds it
  assert _matches(detect.detect_boxes(image, detector="hog"), gt_box) and calls == [0]
  # the same photo at a sixth of the size: a ~50 px face, below HOG's 80 px window (at a
  # quarter, 73 px, the coarse pass still found it)
  small = image[2::6, 2::6]
  calls.clear()
  assert not detect.detect_boxes(small, detector="hog", upsample=0)
  found = detect.detect_boxes(small, detector="hog")
  assert calls == [0, 0, 1]
  assert _matches(found, gt_box / 6.0)


@pytest.mark.parametrize("detector,max_side", [("hog", 450), ("cnn", 450)])
def test_rectangles_map_back_under_downscaling(detector, max_side):
  """The same photo at 2x: downscaled to the same detection image, its boxes are 2x."""
  image, _ = _sample(FRONTAL)
  big = np.repeat(np.repeat(image, 2, 0), 2, 1)  # 900 px
  small_boxes = detect.detect_boxes(image, detector=detector, max_side=max_side)
  big_boxes = detect.detect_boxes(big, detector=detector, max_side=max_side)
  assert len(small_boxes) == len(big_boxes) == 1
  assert big_boxes[0].rect.dtype == np.float32
  np.testing.assert_allclose(big_boxes[0].rect, 2 * small_boxes[0].rect, atol=4)
  # without downscaling, HOG on the 900-px image frames the face on a different pyramid
  # level: the boxes still agree, but not to the pixel (the test above is not vacuous)
  if detector == "hog":
    full = detect.detect_boxes(big, detector="hog", max_side=900)
    assert np.abs(full[0].rect - 2 * small_boxes[0].rect).max() > 4
