"""The shipped regressor (dff3d/assets/regressor.npz): it loads by default, predicts the face of
a real photo, and the README's second example runs."""

import re

import numpy as np
import pytest

from dff3d import morphable_model as mm
from dff3d import train
from dff3d.data import augment
from tests.conftest import REPO

DEV = REPO.parent / "shared" / "data" / "aflw2000_3d_sample"


def test_loads_by_default_with_its_config():
  fn = train.load_regressor()
  assert fn.image_size == 96 and fn.config.name == "real" and fn.config.backbone == "light"
  c = fn(np.zeros((2, 96, 96, 3), np.float32))
  assert c.rotation.shape == (2, 3) and np.all(np.isfinite(c.identity))
  with np.load(train.SHIPPED_REGRESSOR) as z:
    leaves = [z[k] for k in z.files if k.startswith("params/")]
  assert leaves and all(a.dtype == np.float16 for a in leaves)


def test_readme_regressor_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
  code = next(b for b in blocks if "load_regressor" in b)
  exec(compile(code, "README.md", "exec"), {})


@pytest.mark.skipif(not DEV.is_dir(), reason="../shared/data/aflw2000_3d_sample not present "
                    "(research data, not in the repository)")
def test_predicts_real_faces_far_better_than_the_mean_face():
  from dff3d import io
  from dff3d import render as render_lib
  from dff3d.datasets import aflw2000_3d
  from dff3d import metrics
  model = mm.default_model()
  fn = train.load_regressor()
  crops, gts = [], []
  for img, mat in aflw2000_3d.list_aflw2000_3d(DEV).pairs[:8]:
    gt = aflw2000_3d.load_aflw2000_3d_mat(mat)["landmarks_3d"][:, :2] + 0.5
    crop, pts, _ = augment.crop_to_landmarks(io.read_image(img), gt, 96)
    crops.append(crop)
    gts.append(pts)
  c = fn(np.stack(crops))
  _, screen, _ = render_lib.camera_vertices(model, c, (96, 96))
  pred = np.asarray(mm.landmark_points(model, screen)[..., :2])
  nme = metrics.nme_2d(pred, np.stack(gts))
  mean_face = mm.zero_coefficients(model, len(crops))
  _, screen0, _ = render_lib.camera_vertices(model, mean_face, (96, 96))
  nme0 = metrics.nme_2d(np.asarray(mm.landmark_points(model, screen0)[..., :2]), np.stack(gts))
  assert np.mean(nme) < 0.15 and np.mean(nme) < 0.6 * np.mean(nme0), (nme, nme0)
