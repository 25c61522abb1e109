"""The loss terms of the paper (Sec. 3.3), one function each; every term is averaged over
the batch so weights do not depend on the batch size.

Landmark coordinates enter L_land and L_land_error divided by the image size S (so a 1 px error
at S = 224 costs (1/224)^2): with that normalisation the paper's weights (w_land 400, w_photo
100, w_reg 1) give terms of comparable size, as in Deep3DFaceRecon whose pixel-unit landmark
weight 1.6e-3 equals 400 / 224^2 x ~0.2. See BUILD_NOTES.md, "Losses".
"""

import flax
import jax.numpy as jnp

from dff3d import landmarks as lm

# Regulariser weights of L_reg (paper): identity, albedo, expression.
REG_IDENTITY, REG_ALBEDO, REG_EXPRESSION = 2e-5, 2e-2, 4e-4


@flax.struct.dataclass
class LossWeights:
  """Weights of the total loss; defaults are the paper's (Sec. 3.3)."""
  land: float = 400.0
  land_error: float = 2000.0
  photo: float = 100.0
  dff: float = 1e-6
  reg: float = 1.0
  reg_identity: float = REG_IDENTITY
  reg_albedo: float = REG_ALBEDO
  reg_expression: float = REG_EXPRESSION
  # Not in the paper: a supervised head-rotation term (rotation_loss) on pose labels, e.g. the
  # pseudo-68 fit's rotation of real AFLW crops; 0 (off) by default.
  pose: float = 0.0


LANDMARK_LOSSES = ("l2", "l1", "wing")
# Wing loss shape (Feng et al. 2018) in units of the crop side: logarithmic below WING_WIDTH
# (10 px at 96 px), linear above; WING_CURVATURE sets how sharply small errors are weighted.
WING_WIDTH, WING_CURVATURE = 0.1, 0.02


def point_penalty(dist, kind="l2"):
  """Per-point penalty of a normalised landmark distance.

  Args:
    dist: (...) Euclidean distances divided by the crop side (>= 0).
    kind: "l2" (the paper: dist^2), "l1" (dist itself, the quantity NME averages) or "wing"
      (Feng et al. 2018: w ln(1 + dist / eps) below w, dist - C above, C = w - w ln(1 + w / eps),
      which makes it continuous at w; small errors weigh far more than under l2).
  Returns:
    (...) penalties.
  """
  if kind == "l2":
    return jnp.square(dist)
  if kind == "l1":
    return dist
  if kind == "wing":
    w, eps = WING_WIDTH, WING_CURVATURE
    c = w - w * jnp.log1p(w / eps)
    return jnp.where(dist < w, w * jnp.log1p(dist / eps), dist - c)
  raise ValueError(f"landmark loss {kind!r} is not one of {LANDMARK_LOSSES}")


def _distance(pred, target, image_size):
  """(B, K) Euclidean distances / image_size; the square root's gradient stays finite at 0."""
  d2 = jnp.sum(jnp.square((pred - target) / image_size), -1)
  safe = jnp.where(d2 > 0, d2, 1.0)
  return jnp.where(d2 > 0, jnp.sqrt(safe), 0.0)


def landmark_loss(pred, target, weights=None, image_size=224.0, kind="l2"):
  """L_land = sum_i w_i rho(||v_i - v_hat_i|| / S); rho = square for the paper's "l2".

  Args:
    pred, target: (B, 68, 2) pixels.
    weights: (68,) or (B, 68); default 1 inner / 0.5 contour (paper Fig. 2). Multiply by a
      visibility mask to drop missing ground-truth points.
    image_size: S, the crop side in pixels.
    kind: the penalty rho (point_penalty): "l2" (paper), "l1" or "wing".
  Returns:
    scalar, mean over the batch of the per-image weighted sum.
  """
  if weights is None:
    weights = jnp.asarray(lm.landmark_weights())
  if kind == "l2":  # the paper's term, without a square root
    pen = jnp.sum(jnp.square((pred - target) / image_size), -1)  # (B, 68)
  else:
    pen = point_penalty(_distance(pred, target, image_size), kind)
  return jnp.mean(jnp.sum(weights * pen, -1))


def landmark_error_loss(pred, target, point_error, image_size=224.0):
  """L_land_error = sum over the 52 inner points of e_i ||v_i - v_hat_i||^2.

  Args:
    pred, target: (B, 68, 2) pixels.
    point_error: (68,) each landmark's mean error over the previous epoch (any consistent unit;
      the training loop uses the normalised distance); contour entries are ignored.
  Returns:
    scalar, mean over the batch.
  """
  mask = jnp.zeros((lm.NUM_LANDMARKS,)).at[lm.INNER].set(1.0)
  return landmark_loss(pred, target, mask * point_error, image_size)


def photometric_loss(image, rendered, mask, eps=1e-6):
  """L_photo = (1 / |V|) sum_{i in V} ||I_i - I'_i||_2 over rendered face pixels V.

  Args:
    image, rendered: (B, H, W, 3) in [0, 1].
    mask: (B, H, W) in [0, 1], the rendered face's coverage (soft at the outline).
    eps: keeps the gradient of the norm finite where the colours agree exactly.
  Returns:
    scalar, mean over the batch of each image's masked mean colour distance.
  """
  diff = image - rendered
  # Channels summed one by one: a reduction over the length-3 channel axis goes to YNNPACK on
  # XLA:CPU and is several times slower.
  dist = jnp.sqrt(sum(jnp.square(diff[..., k]) for k in range(diff.shape[-1])) + eps)
  per_image = jnp.sum(mask * dist, (1, 2)) / jnp.maximum(jnp.sum(mask, (1, 2)), 1.0)
  return jnp.mean(per_image)


def dff_loss(desc_image, desc_rendered, visible):
  """L_dff = sum_i f_i ||d_i - d_hat_i||^2 at the 68 landmarks.

  Args:
    desc_image, desc_rendered: (B, 68, D) descriptors of the photo and of the rendering,
      sampled at the same (predicted) landmark positions.
    visible: (B, 68) f_i, 1 where the landmark's vertex normal faces the camera, else 0.
  Returns:
    scalar, mean over the batch.
  """
  d2 = jnp.sum(jnp.square(desc_image - desc_rendered), -1)
  return jnp.mean(jnp.sum(visible * d2, -1))


def rotation_loss(pred, target, weight):
  """L_pose = ||R - R_hat||_F^2 = 4 (1 - cos theta) for a relative rotation by theta.

  Unlike L_land, whose gradient with respect to yaw fades as cos(yaw) towards a profile view,
  this one pulls every pose alike.

  Args:
    pred, target: (B, 3, 3) rotation matrices (camera.rotation_matrix).
    weight: (B,) per-example weight (0 where an example has no pose label).
  Returns:
    scalar, mean over the batch.
  """
  d2 = jnp.sum(jnp.square(pred - target), (-2, -1))
  return jnp.mean(weight * d2)


def regularization(identity, albedo, expression, w_identity=REG_IDENTITY, w_albedo=REG_ALBEDO,
                   w_expression=REG_EXPRESSION):
  """L_reg = 2e-5 ||a||^2 + 2e-2 ||b||^2 + 4e-4 ||d||^2 (paper defaults; the three weights
  are arguments): (B, K*) each -> scalar batch mean."""
  return jnp.mean(w_identity * jnp.sum(jnp.square(identity), -1)
                  + w_albedo * jnp.sum(jnp.square(albedo), -1)
                  + w_expression * jnp.sum(jnp.square(expression), -1))


def weighted_regularization(c, w: LossWeights):
  """L_reg of Coefficients `c` with the three weights of `w`."""
  return regularization(c.identity, c.albedo, c.expression, w.reg_identity, w.reg_albedo,
                        w.reg_expression)


def landmark_visibility(normals_cam, points_cam):
  """f_i: 1 where a landmark vertex faces the camera, else 0.

  Args:
    normals_cam: (B, 68, 3) unit normals in camera space.
    points_cam: (B, 68, 3) positions in camera space (camera at the origin).
  Returns:
    (B, 68) float32 in {0, 1}: normal . (camera - point) > 0.
  """
  facing = jnp.sum(normals_cam * -points_cam, -1) > 0
  return facing.astype(jnp.float32)
