"""Mirror symmetry of the model and its coefficients (dff3d.symmetry) and the flip-averaged
regressor (train.load_regressor(flip_average=True))."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dff3d import coefficients as coeffs_lib
from dff3d import morphable_model as mm
from dff3d import render as render_lib
from dff3d import shading
from dff3d import symmetry
from dff3d import train

S = 96
GEOMETRY_FIELDS = ("identity", "expression", "rotation", "translation", "lighting")


@pytest.fixture(scope="module")
def model():
  return mm.default_model()


@pytest.fixture(scope="module")
def maps(model):
  return symmetry.mirror_maps(model)


def _faces(model, seed=0, batch=4):
  rng = np.random.default_rng(seed)
  c = mm.zero_coefficients(model, batch)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return c.replace(identity=f32(rng.normal(size=c.identity.shape) * 0.7),
                   expression=f32(rng.uniform(0, 0.5, size=c.expression.shape)),
                   albedo=f32(rng.normal(size=c.albedo.shape) * 0.5),
                   rotation=f32(rng.uniform(-0.6, 0.6, size=(batch, 3))),
                   translation=c.translation + f32(rng.normal(size=(batch, 3)) * [2, 2, 5]),
                   lighting=c.lighting + f32(rng.normal(size=c.lighting.shape) * 0.1))


def test_vertex_partners_mirror_the_mean_shape(model, maps):
  perm = np.asarray(maps.vertex)
  shape = np.asarray(model.mean_shape)
  np.testing.assert_array_equal(perm[perm], np.arange(len(perm)))  # an involution
  np.testing.assert_allclose(shape[perm] * [-1, 1, 1], shape, atol=1e-2)
  lopsided = shape.copy()
  lopsided[shape[:, 0] > 2.0, 1] += 1.0  # one cheek raised by 1 cm
  with pytest.raises(ValueError, match="not mirror-symmetric"):
    symmetry.vertex_mirror(lopsided)


def test_mirrored_coefficients_project_to_the_flipped_image(model, maps):
  """Every vertex of the mirrored face lands where its partner's mirror image is."""
  c = _faces(model)
  _, screen, _ = render_lib.camera_vertices(model, c, (S, S))
  _, screen_m, _ = render_lib.camera_vertices(model, symmetry.mirror_coefficients(c, maps),
                                              (S, S))
  want = np.asarray(screen)[:, np.asarray(maps.vertex)]
  want[..., 0] = S - want[..., 0]
  np.testing.assert_allclose(np.asarray(screen_m)[..., :2], want[..., :2], atol=0.35)
  np.testing.assert_allclose(np.asarray(screen_m)[..., 2], want[..., 2], atol=0.05)
  assert maps.residual < 0.02  # cm: the ICT bases span their own mirror images
  # Not a mere x flip of the pose: the identity and expression must mirror too.
  plain = c.replace(rotation=c.rotation * jnp.array([1.0, -1.0, -1.0]),
                    translation=c.translation * jnp.array([-1.0, 1.0, 1.0]))
  _, screen_p, _ = render_lib.camera_vertices(model, plain, (S, S))
  assert np.abs(np.asarray(screen_p)[..., :2] - want[..., :2]).max() > 1.0


def test_mirrored_albedo_and_light_colour_the_partner_vertices_alike(model, maps):
  """Shaded with mirrored normals (the ICT triangulation is not itself symmetric: its vertex
  normals differ from their partners' mirror images by up to ~0.4 at the mesh border), the
  mirrored face's colours are its partners' colours; without the SH signs they are not."""
  c = _faces(model, seed=1)
  m = symmetry.mirror_coefficients(c, maps)
  perm = np.asarray(maps.vertex)
  cam, _, _ = render_lib.camera_vertices(model, c, (S, S))
  normals = np.asarray(shading.vertex_normals(cam, model.triangles))
  mirrored_normals = jnp.asarray(normals[:, perm] * [-1.0, 1.0, 1.0], jnp.float32)
  colours = np.asarray(shading.shade(mm.geometry(model, c)[1], jnp.asarray(normals),
                                     c.lighting))[:, perm]
  albedo_m = mm.geometry(model, m)[1]
  got = np.asarray(shading.shade(albedo_m, mirrored_normals, m.lighting))
  np.testing.assert_allclose(got, colours, atol=0.04)  # the albedo basis's asymmetry
  unsigned = np.asarray(shading.shade(albedo_m, mirrored_normals,
                                      c.lighting))  # the light not mirrored
  assert np.abs(unsigned - colours).max() > 0.1


def test_mirroring_twice_gives_the_face_back(model, maps):
  c = _faces(model, seed=2)
  back = symmetry.mirror_coefficients(symmetry.mirror_coefficients(c, maps), maps)
  for f in GEOMETRY_FIELDS:
    np.testing.assert_allclose(getattr(back, f), getattr(c, f), atol=5e-3, err_msg=f)
  # ICT's albedo modes are not all symmetric: the coefficients do not come back, the colours
  # nearly do.
  np.testing.assert_allclose(mm.geometry(model, back)[1], mm.geometry(model, c)[1], atol=0.05)


def test_flip_averaged_regressor_is_flip_equivariant(tmp_path, model, maps):
  """Averaged over a crop and its mirror image, the estimate of a flipped crop is the mirror
  of the crop's estimate; the plain network's is not."""
  cfg = train.TrainConfig(backbone="light", width=0.125, image_size=32)
  net = train.make_network(cfg, model)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  kernel = params["head"]["dense"]["kernel"]
  params["head"]["dense"]["kernel"] = 0.05 * jax.random.normal(jax.random.PRNGKey(1),
                                                               kernel.shape)
  path = str(tmp_path / "r.npz")
  train.save_params_npz(path, params, cfg, dtype=np.float32)
  avg = train.load_regressor(path, model, flip_average=True)
  plain = train.load_regressor(path, model)
  assert avg.flip_average and not plain.flip_average and avg.image_size == 32
  x = jax.random.uniform(jax.random.PRNGKey(2), (3, 32, 32, 3))
  flipped = x[:, :, ::-1]
  for fn, equivariant in ((avg, True), (plain, False)):
    a = symmetry.mirror_coefficients(fn(x), maps)
    b = fn(flipped)
    close = all(np.allclose(getattr(a, f), getattr(b, f), atol=1e-3, rtol=1e-3)
                for f in GEOMETRY_FIELDS)
    assert close == equivariant
  # The average is the mean of the two estimates.
  want = symmetry.flip_average(plain(x), plain(flipped), maps)
  for f in coeffs_lib.FIELDS:
    np.testing.assert_allclose(getattr(avg(x), f), getattr(want, f), atol=2e-4, rtol=1e-4)


def test_mirror_maps_are_cached_per_model_arrays(model, maps):
  assert symmetry.mirror_maps(model) is maps  # same arrays: the cached maps
  edited = model.replace(albedo_basis=model.albedo_basis * 2.0)
  assert symmetry.model_fingerprint(edited) != symmetry.model_fingerprint(model)
  other = symmetry.mirror_maps(edited)
  assert other is not maps
  # a basis twice as long: the same mirror map, in its own cache entry
  np.testing.assert_allclose(other.albedo, maps.albedo, atol=1e-5)
  np.testing.assert_array_equal(other.vertex, maps.vertex)
