import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from dff3d import camera


def np_rotation(p, y, r):
  rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
  ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
  rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
  return rz @ ry @ rx


def test_rotation_matches_reference_orthonormal_det1():
  rng = np.random.default_rng(0)
  angles = rng.uniform(-np.pi, np.pi, (50, 3))
  r = np.asarray(camera.rotation_matrix(jnp.asarray(angles, jnp.float32)), np.float64)
  ref = np.stack([np_rotation(*a) for a in angles])
  np.testing.assert_allclose(r, ref, atol=2e-6)
  np.testing.assert_allclose(r @ np.swapaxes(r, 1, 2), np.broadcast_to(np.eye(3), r.shape),
                             atol=2e-6)
  np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=2e-6)


def test_positive_yaw_turns_face_towards_image_right():
  nose = jnp.array([[[0.0, 0.0, 1.0]]])
  moved = camera.to_camera(nose, jnp.array([[0.0, 0.3, 0.0]]), jnp.zeros((1, 3)))
  assert moved[0, 0, 0] > 0  # +x is image right for a camera looking along -z


def test_angles_roundtrip():
  rng = np.random.default_rng(1)
  angles = rng.uniform(-1.2, 1.2, (20, 3)).astype(np.float32)
  back = camera.angles_from_matrix(camera.rotation_matrix(angles))
  np.testing.assert_allclose(back, angles, atol=2e-5)


def test_projection_matches_reference_and_pixel_centre_convention():
  rng = np.random.default_rng(2)
  pts = rng.normal(size=(2, 30, 3)) * 5 + np.array([0, 0, -130.0])
  f, pp = camera.default_camera(112, 96)
  scr = np.asarray(camera.project(jnp.asarray(pts, jnp.float32), f, pp), np.float64)
  ref_x = 48.0 + f * pts[..., 0] / -pts[..., 2]
  ref_y = 56.0 - f * pts[..., 1] / -pts[..., 2]
  np.testing.assert_allclose(scr[..., 0], ref_x, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(scr[..., 1], ref_y, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(scr[..., 2], -pts[..., 2], rtol=1e-6)
  # A point on the optical axis lands on the image centre, the corner shared by 4 pixels.
  centre = camera.project(jnp.array([[[0.0, 0.0, -10.0]]]), f, pp)
  np.testing.assert_allclose(centre[0, 0, :2], [48.0, 56.0])


def test_projection_and_rotation_gradients_match_finite_differences():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    pts = jnp.asarray(rng.normal(size=(1, 5, 3)) * 5 + np.array([0, 0, 0.0]))
    angles = jnp.asarray(rng.uniform(-0.5, 0.5, (1, 3)))
    trans = jnp.asarray([[0.5, -0.3, -100.0]])

    def f(pts, angles, trans):
      return camera.project(camera.to_camera(pts, angles, trans), 500.0, jnp.array([56.0, 56.0]))

    check_grads(f, (pts, angles, trans), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_crop_transform_roundtrip_and_pixel_areas():
  box = jnp.array([10.0, 20.0, 110.0, 120.0])
  a = camera.crop_transform(box, 50)
  pts = jnp.array([[10.0, 20.0], [110.0, 120.0], [60.0, 70.0]])
  np.testing.assert_allclose(camera.apply_affine(a, pts), [[0, 0], [50, 50], [25, 25]], atol=1e-5)
  back = camera.apply_affine(camera.invert_affine(a), camera.apply_affine(a, pts))
  np.testing.assert_allclose(back, pts, atol=1e-4)
  comp = camera.compose_affine(camera.invert_affine(a), a)
  np.testing.assert_allclose(comp, [[1, 0, 0], [0, 1, 0]], atol=1e-5)
