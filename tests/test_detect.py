"""dff3d.detect: .pts files, the dlib detector, and the CelebA labeller launcher."""

import builtins

import numpy as np
import pytest

from dff3d import detect


def test_pts_round_trip(tmp_path):
  pts = np.random.default_rng(0).uniform(0, 300, (68, 2)).astype(np.float32)
  detect.write_pts(tmp_path / "a.pts", pts)
  text = (tmp_path / "a.pts").read_text().splitlines()
  assert text[:3] == ["version: 1", "n_points: 68", "{"] and text[-1] == "}"
  np.testing.assert_allclose(detect.read_pts(tmp_path / "a.pts"), pts, atol=1e-3)


def test_read_hand_written_pts(tmp_path):
  """300-W files are 1-based (top-left pixel centre at (1, 1)): dff3d = file - 0.5."""
  (tmp_path / "b.pts").write_text(
      "version: 1\r\nn_points:  3\r\n{\r\n1 1\r\n446.000 91.000\r\n\t12.5 7.25 \r\n}\r\n")
  np.testing.assert_allclose(detect.read_pts(tmp_path / "b.pts"),
                             [[0.5, 0.5], [445.5, 90.5], [12.0, 6.75]])


@pytest.mark.parametrize("content,message", [
    ("version: 1\n{\n1 2\n}\n", "expected 'n_points: N'"),
    ("version: 1\nn_points: 2\n{\n1 2\n}\n", "n_points is 2 but 1 point lines follow"),
    ("version: 1\nn_points: 1\n{\n1 2\n", "missing closing"),
    ("version: 1\nn_points: 1\n{\n1 x\n}\n", "non-numeric"),
    ("version: 1\nn_points: 1\n{\n1 2 3\n}\n", "exactly 'x y'"),
])
def test_read_pts_errors(tmp_path, content, message):
  (tmp_path / "c.pts").write_text(content)
  with pytest.raises(detect.PtsFileError, match=message) as e:
    detect.read_pts(tmp_path / "c.pts")
  assert "c.pts" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(detect.PtsFileError, match="no such file"):
    detect.read_pts(tmp_path / "missing.pts")


def test_missing_dlib_gives_install_hint(monkeypatch):
  real_import = builtins.__import__

  def fake_import(name, *args, **kwargs):
    if name == "dlib":
      raise ImportError("No module named 'dlib'")
    return real_import(name, *args, **kwargs)

  detect._models.cache_clear()
  monkeypatch.setattr(builtins, "__import__", fake_import)
  try:
    with pytest.raises(detect.DetectorUnavailableError, match=r"pip install 'dff3d\[detect\]'"):
      detect.detect_faces(np.zeros((8, 8, 3), np.float32))
    assert not detect.detector_available()
  finally:
    monkeypatch.undo()
    detect._models.cache_clear()


def _astronaut():
  pytest.importorskip("dlib", reason="dlib not installed (pip install 'dff3d[detect]')")
  pytest.importorskip("face_recognition_models", reason="face_recognition_models not installed")
  data = pytest.importorskip("skimage.data", reason="scikit-image not installed")
  return data.astronaut().astype(np.float32) / 255.0  # public domain photo, 512 x 512


def test_detector_on_a_real_photo():
  image = _astronaut()
  faces = detect.detect_faces(image, upsample=0)
  assert len(faces) == 1
  bbox, lm = faces[0]
  assert bbox.shape == (4,) and lm.shape == (68, 2) and lm.dtype == np.float32
  assert 150 < bbox[0] < bbox[2] < 300 and 50 < bbox[1] < bbox[3] < 200  # the face, top centre
  m = 0.1 * (bbox[2] - bbox[0])  # dlib's HOG box is tight: the chin may end a few px below
  inside = ((lm[:, 0] >= bbox[0] - m) & (lm[:, 0] <= bbox[2] + m) &
            (lm[:, 1] >= bbox[1] - m) & (lm[:, 1] <= bbox[3] + m))
  assert inside.all()
  eyes, mouth = lm[36:48], lm[48:68]
  assert eyes[:, 1].max() < mouth[:, 1].min()
  assert lm[36, 0] < lm[45, 0]  # subject's right eye corner is on the image left
  np.testing.assert_array_equal(lm % 1.0, 0.5)  # dlib's integer pixels + 0.5
  # upsample=1 also finds a weak false positive; the real face comes first (best score).
  more = detect.detect_faces(image, upsample=1)
  assert len(more) >= 1 and abs(more[0].bbox[0] - bbox[0]) < 15
  assert detect.detect_faces(np.zeros((64, 64, 3), np.float32)) == []


def test_labeller_reports_the_blank_image(tmp_path, capsys):
  image = _astronaut()
  from dff3d import io as dio
  from dff3d.datasets import celeba
  from data_prep import labelling as label_landmarks
  folder = tmp_path / "img_align_celeba"
  folder.mkdir()
  dio.write_image(folder / "000001.jpg", image[::2, ::2])  # 256 px, face about 45 px
  dio.write_image(folder / "000002.jpg", np.full((218, 178, 3), 0.5, np.float32))
  (folder / "000003.jpg").write_bytes(b"not a jpeg")
  report = label_landmarks.label_folder(folder)
  assert (report.labelled, report.failed) == (1, 2)
  out = capsys.readouterr().out
  assert "000002.jpg: no face found; skipped" in out and "000003.jpg: unreadable" in out
  lms = celeba.read_landmarks_file(tmp_path / celeba.LANDMARKS_FILE)
  fails = celeba.read_failures_file(tmp_path / celeba.FAILURES_FILE)
  assert list(lms) == ["000001.jpg"] and sorted(fails) == ["000002.jpg", "000003.jpg"]
  assert fails["000002.jpg"] == "no face found"
  assert 75 < lms["000001.jpg"][:, 0].mean() < 150 and 25 < lms["000001.jpg"][:, 1].mean() < 100
  again = label_landmarks.label_folder(folder)  # resumable: nothing new to do
  assert (again.labelled, again.failed, again.already_done) == (0, 0, 3)
