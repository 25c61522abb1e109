r"""Convert the ICT face model archive into dff3d's embedded asset.

  python -m data_prep.convert_ict --source=../shared/data/ict_face_model

Keeps 80 identity modes (the paper's size; the source's weights are already ~N(0, 1)) and all
53 expression blendshapes, stores the bases as float16 (error printed), moves the jaw
landmarks to AFLW2000-3D's definition (JAW_VERTICES), adds the default albedo model and copies
the MIT licence next to the asset.

Default albedo (ICT has none): a uniform skin tone, plus 80 smooth basis vectors
phi_k(vertex) * direction_c, where phi_k are the lowest eigenvectors of the mesh's
combinatorial graph Laplacian (k = 0..26, phi_0 constant) and direction_c runs over a
luminance and two chroma directions in RGB. Vector j = 3k + c, scaled so that a unit
coefficient changes the albedo by sigma_c / (1 + k / 4) RMS over the vertices (sigma = 0.04
for luminance, 0.015 for chroma). Not a statistical model of real skin.
"""

import os
import shutil

from absl import app, flags
import numpy as np
import scipy.sparse
import scipy.sparse.linalg

from dff3d import morphable_model as mm

_SOURCE = flags.DEFINE_string("source", "../shared/data/ict_face_model", "ICT archive folder.")
_OUT = flags.DEFINE_string("output", mm.DEFAULT_MODEL_PATH, "Asset to write.")

NUM_IDENTITY = 80
NUM_ALBEDO = 80
SKIN_TONE = np.array([0.78, 0.60, 0.50], np.float32)
COLOUR_DIRECTIONS = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, -1.0], [-0.5, 1.0, -0.5]])
COLOUR_SIGMA = np.array([0.04, 0.015, 0.015])

# The jaw line (iBUG points 0-16) on the vertices where AFLW2000-3D's ground truth puts it.
# ICT's own jaw vertices lie 1.4-2.6 cm further forward than those of the BFM fits behind
# AFLW2000-3D and 3DDFA's labels (the same points on a frontal face's outline, far apart on a
# turned one): fitted to AFLW2000-3D's inner points, ICT's jaw is off by 14.6 % NME at 60-90
# degrees (dev). These are the vertices that `python -m data_prep.calibrate_jaw` picks on the
# 16 aflw2000_3d_sample images (not dev, not test) from their 3D ground truth, mirror-symmetric;
# BUILD_NOTES.md "Jaw landmarks".
JAW_VERTICES = (8131, 7872, 7436, 8861, 822, 1831, 790, 2197, 969, 4388, 3031, 4033, 3063,
                9184, 6709, 7145, 7404)


def landmarks_68(source_landmarks) -> np.ndarray:
  """(68,) int32: ICT's landmark vertices with the jaw line replaced by JAW_VERTICES."""
  out = np.array(source_landmarks, np.int32)
  out[:17] = JAW_VERTICES
  return out


def graph_laplacian(triangles, num_vertices):
  """Combinatorial Laplacian L = D - A of the mesh edge graph: (N, N) sparse float64."""
  edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
  edges = np.concatenate([edges, edges[:, ::-1]])
  adj = scipy.sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])),
                                shape=(num_vertices, num_vertices)).tocsr()
  adj.data[:] = 1.0
  return scipy.sparse.diags(np.asarray(adj.sum(1)).ravel()) - adj


def smooth_albedo_basis(triangles, num_vertices, num_basis=NUM_ALBEDO):
  """(num_basis, N, 3) float32 smooth albedo basis (see module docstring)."""
  num_eig = -(-num_basis // 3)
  lap = graph_laplacian(triangles, num_vertices)
  vals, vecs = scipy.sparse.linalg.eigsh(lap, k=num_eig, sigma=-1e-3, which="LM")
  order = np.argsort(vals)
  vecs = vecs[:, order] * np.sqrt(num_vertices)  # unit RMS per vertex
  vecs *= np.sign(vecs[0:1])                      # deterministic sign
  dirs = COLOUR_DIRECTIONS / np.linalg.norm(COLOUR_DIRECTIONS, axis=1, keepdims=True)
  dirs = dirs * np.sqrt(3.0)                      # unit RMS per channel
  basis = []
  for k in range(num_eig):
    for c in range(3):
      basis.append(vecs[:, k, None] * dirs[c] * COLOUR_SIGMA[c] / (1.0 + k / 4.0))
  return np.stack(basis[:num_basis]).astype(np.float32)


def main(_):
  src = np.load(os.path.join(_SOURCE.value, "ict_face_model.npz"))
  n = src["mean_shape"].shape[0]
  model = mm.make_model(
      mean_shape=src["mean_shape"], identity_basis=src["identity_basis"][:NUM_IDENTITY],
      expression_basis=src["expression_basis"], albedo_mean=np.tile(SKIN_TONE, (n, 1)),
      albedo_basis=smooth_albedo_basis(src["triangles"], n), triangles=src["triangles"],
      landmarks=landmarks_68(src["landmarks_68"]), uv=src["uv"], triangle_uv=src["triangle_uv"],
      name="ICT-FaceKit face area (MIT)", units="cm",
      expression_names=src["expression_names"])
  mm.save_npz(_OUT.value, model, basis_dtype=np.float16)
  shutil.copy(os.path.join(_SOURCE.value, "LICENSE"), os.path.join(mm.ASSET_DIR, "ICT_LICENSE"))
  # Measured float16 error: geometry of random faces, float16 asset vs float32 source.
  back = mm.load_npz(_OUT.value)
  rng = np.random.default_rng(0)
  a = rng.standard_normal((64, NUM_IDENTITY)).astype(np.float32)
  d = rng.uniform(0, 1, (64, model.expression_basis.shape[0])).astype(np.float32)
  ref = (src["mean_shape"].astype(np.float64)
         + np.einsum("bk,knc->bnc", a, src["identity_basis"][:NUM_IDENTITY].astype(np.float64))
         + np.einsum("bk,knc->bnc", d, src["expression_basis"].astype(np.float64)))
  got = np.asarray(mm.shape(back, a, d), np.float64)
  err = np.linalg.norm(got - ref, axis=-1)
  print(f"wrote {_OUT.value} ({os.path.getsize(_OUT.value) / 1e6:.2f} MB); float16 vertex error "
        f"over 64 random faces: mean {err.mean():.2e} cm, max {err.max():.2e} cm")


if __name__ == "__main__":
  app.run(main)
