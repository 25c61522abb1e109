import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from data_prep import convert_ict
from dff3d import coefficients as coeffs_lib
from dff3d import landmarks as lm
from dff3d import morphable_model as mm
from dff3d import rasterizer
from tests.conftest import ICT_DIR, require


@pytest.fixture(scope="module")
def model():
  return mm.default_model()


def test_embedded_model_sizes(model):
  assert model.mean_shape.shape == (9409, 3)
  assert model.identity_basis.shape == (80, 9409, 3)
  assert model.expression_basis.shape == (53, 9409, 3)
  assert model.albedo_basis.shape == (80, 9409, 3)
  assert model.triangles.shape == (18460, 3)
  assert model.sizes == (80, 80, 53, 3, 3, 27)
  assert len(model.expression_names) == 53 and model.units == "cm"
  assert model.contour.shape == (16,) and model.inner.shape == (52,)


def test_embedded_model_matches_source_within_float16_error(model):
  src = np.load(require(ICT_DIR) / "ict_face_model.npz")
  np.testing.assert_array_equal(model.mean_shape, src["mean_shape"])
  # float16 storage: relative error 2**-11 plus the subnormal floor.
  np.testing.assert_allclose(model.identity_basis, src["identity_basis"][:80], rtol=5e-4,
                             atol=1e-6)
  np.testing.assert_allclose(model.expression_basis, src["expression_basis"], rtol=5e-4,
                             atol=1e-6)
  # ICT's landmarks, the jaw line moved to AFLW2000-3D's definition (data_prep.calibrate_jaw).
  np.testing.assert_array_equal(model.landmarks, convert_ict.landmarks_68(src["landmarks_68"]))
  np.testing.assert_array_equal(model.landmarks[17:], src["landmarks_68"][17:])
  assert not np.any(model.landmarks[:17] == src["landmarks_68"][:17])


def test_geometry_matches_float64_reference(model):
  rng = np.random.default_rng(0)
  c = coeffs_lib.split(jnp.asarray(rng.normal(size=(2, coeffs_lib.size(model.sizes))),
                                   jnp.float32), model.sizes)
  verts, alb = mm.geometry(model, c)
  ref_v = (np.asarray(model.mean_shape, np.float64)
           + np.einsum("bk,knc->bnc", np.asarray(c.identity, np.float64),
                       np.asarray(model.identity_basis, np.float64))
           + np.einsum("bk,knc->bnc", np.asarray(c.expression, np.float64),
                       np.asarray(model.expression_basis, np.float64)))
  ref_a = (np.asarray(model.albedo_mean, np.float64)
           + np.einsum("bk,knc->bnc", np.asarray(c.albedo, np.float64),
                       np.asarray(model.albedo_basis, np.float64)))
  np.testing.assert_allclose(verts, ref_v, atol=2e-4)
  np.testing.assert_allclose(alb, ref_a, atol=2e-5)


def test_default_albedo_is_smooth_plausible_skin(model):
  rng = np.random.default_rng(1)
  alb = np.asarray(mm.albedo(model, jnp.asarray(rng.normal(size=(8, 80)), jnp.float32)))
  inside = ((alb > 0.0) & (alb < 1.0)).mean()
  assert inside > 0.999  # unit-variance coefficients keep albedo in [0, 1]
  # Smooth: neighbouring vertices differ far less than the albedo varies overall.
  tri = np.asarray(model.triangles)
  edge_diff = np.abs(alb[:, tri[:, 0]] - alb[:, tri[:, 1]]).mean()
  assert edge_diff < 0.1 * alb.std(axis=1).mean()


def test_geometry_gradients_match_finite_differences():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    small = mm.make_model(rng.normal(size=(5, 3)), rng.normal(size=(2, 5, 3)),
                          rng.normal(size=(3, 5, 3)), rng.uniform(size=(5, 3)),
                          rng.normal(size=(2, 5, 3)), [[0, 1, 2]], np.zeros(68, int))
    small = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64)
                                   if jnp.issubdtype(a.dtype, jnp.floating) else a, small)
    a, d = jnp.asarray(rng.normal(size=(1, 2))), jnp.asarray(rng.normal(size=(1, 3)))
    check_grads(lambda a, d: mm.shape(small, a, d), (a, d), order=1, modes=("rev",))


def test_model_is_a_pytree_usable_under_jit(model):
  c = mm.zero_coefficients(model, 2)
  verts = jax.jit(lambda m, c: mm.landmark_points(m, mm.geometry(m, c)[0]))(model, c)
  np.testing.assert_allclose(verts[0], np.asarray(model.mean_shape)[np.asarray(model.landmarks)])


def test_model_carries_its_triangle_adjacency(model):
  # make_model stores the half-edge twins that render passes to antialias (so that a model
  # traced as a jit argument does not sort its edges on every call).
  twins = np.asarray(model.triangle_twins)
  np.testing.assert_array_equal(
      twins, np.asarray(rasterizer.half_edge_twins(np.asarray(model.triangles))))
  # The ICT mesh is consistently wound and manifold: twins are mutual; the rest is boundary
  # (the face area's rim, eye and mouth openings).
  inner = twins >= 0
  np.testing.assert_array_equal(twins[twins[inner]], np.flatnonzero(inner))
  assert 0 < (~inner).sum() < 0.05 * twins.size, (~inner).sum()


def test_landmark_sets_and_flip_permutation():
  assert sorted(lm.CONTOUR.tolist() + lm.INNER.tolist()) == list(range(68))
  assert 8 in lm.INNER and 8 not in lm.CONTOUR
  perm = lm.FLIP_PERMUTATION
  np.testing.assert_array_equal(perm[perm], np.arange(68))  # an involution
  assert perm[0] == 16 and perm[36] == 45 and perm[30] == 30 and perm[48] == 54
  w = lm.landmark_weights()
  assert w.sum() == 52 + 8


def test_flip_of_model_landmarks_is_symmetric(model):
  # Mirroring the mean face's landmarks about x = 0 and re-ordering them must land near the
  # original landmarks (the ICT face is close to symmetric): checks the permutation semantics.
  pts = np.asarray(model.mean_shape)[np.asarray(model.landmarks)]
  mirrored = pts[lm.FLIP_PERMUTATION] * np.array([-1, 1, 1])
  assert np.abs(mirrored - pts).max() < 0.5  # cm


def test_coefficients_split_concat_roundtrip():
  sizes = coeffs_lib.layout(80, 80, 64)
  assert coeffs_lib.size(sizes) == 257
  x = jnp.arange(2 * 257, dtype=jnp.float32).reshape(2, 257)
  c = coeffs_lib.split(x, sizes)
  assert c.expression.shape == (2, 64) and c.lighting.shape == (2, 27)
  assert float(c.rotation[0, 0]) == 224.0
  np.testing.assert_array_equal(coeffs_lib.concat(c), x)
  with pytest.raises(ValueError, match="257"):
    coeffs_lib.split(x[:, :100], sizes)


def test_npz_loader_errors_name_file(tmp_path):
  missing = tmp_path / "nope.npz"
  with pytest.raises(mm.ModelFileError, match="nope.npz: morphable model file not found"):
    mm.load_npz(missing)
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip")
  with pytest.raises(mm.ModelFileError, match="bad.npz: not a readable"):
    mm.load_npz(bad)
  partial = tmp_path / "partial.npz"
  np.savez(partial, mean_shape=np.zeros((3, 3)))
  with pytest.raises(mm.ModelFileError, match="partial.npz: missing array 'identity_basis'"):
    mm.load_npz(partial)


def test_save_load_roundtrip(tmp_path, model):
  path = tmp_path / "m.npz"
  mm.save_npz(path, model)
  back = mm.load_npz(path)
  np.testing.assert_array_equal(back.identity_basis, model.identity_basis)
  assert back.expression_names == model.expression_names
  assert back.uv is not None and back.triangle_uv.shape == (18460, 3)


def test_face_region_covers_the_landmarked_face_only(model):
  region = np.asarray(model.face_region)
  assert region.shape == (9409,)
  v = np.asarray(model.mean_shape)
  inner_ids = np.asarray(model.landmarks)[np.asarray(model.inner)]
  assert region[inner_ids].all()           # brows, eyes, nose, mouth, chin
  assert 0.4 < region.mean() < 0.8         # not the scalp, ears or neck
  assert region[v[:, 2] < 0].sum() == 0    # nothing behind the face plane
