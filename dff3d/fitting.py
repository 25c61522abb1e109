"""Per-image analysis-by-synthesis: morphable-model coefficients from landmarks and the photo.

Coarse to fine, every stage an Optax Adam loop under jit and vmapped over faces:
  1. closed-form pose from the 68 landmarks (weak perspective, initial_pose);
  2. pose only, landmark loss;
  3. pose + identity + expression, landmark loss + regularisation;
  4. (with a photo) everything, adding the photometric loss on the rendered face and,
     when a DFF network is given, the DFF loss (fit_photometric).

Contour landmarks (jaw line without the chin) either keep their fixed model vertices
('fixed', right for landmarks that are projections of 3D points, as AFLW2000-3D's pt3d_68), or
slide along the face contour ('silhouette', right for detector landmarks on the visible outline
at large yaw): each contour landmark then takes, at every step, the outermost vertex in image x
among a band of candidate vertices running from its own jaw vertex towards the nose at the same
height (contour_candidates). The choice is not differentiated (like 3DDFA's re-assignment).

All functions work in crop pixels (dff3d pixel convention) with the crop's default camera;
crops come from dff3d.data.augment.crop_to_landmarks (face_box: scale 1.6).
"""

import functools
from typing import NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dff3d import camera
from dff3d import coefficients as coeffs_lib
from dff3d import landmark_sets
from dff3d import landmarks as lm
from dff3d import losses
from dff3d import morphable_model as mm
from dff3d import render as render_lib

# Each field is optimised as x = x0 + scale * u with Adam on u, so one learning rate moves every
# field by a sensible amount (translation in model units, e.g. cm).
FIELD_SCALES = {"identity": 1.0, "albedo": 1.0, "expression": 1.0, "rotation": 0.5,
                "translation": 10.0, "lighting": 1.0}


# The paper's loss weights, with stronger identity and expression priors: a single image's 68
# landmarks under-determine 80 identity modes and 53 blendshapes, and the paper's weights (set
# for training a regressor over 250k images) let them overfit (|a| ~ 17 where the prior says
# ~9, blendshape weights summing to ~13). Measured on the AFLW2000-3D sample: see BUILD_NOTES.
FIT_WEIGHTS = losses.LossWeights(reg_identity=1e-2, reg_expression=0.2)


@flax.struct.dataclass
class FitConfig:
  """Static settings of the fit (all Python values; hashable so they can key jit caches)."""
  image_size: int = flax.struct.field(pytree_node=False, default=224)
  pose_steps: int = flax.struct.field(pytree_node=False, default=60)
  shape_steps: int = flax.struct.field(pytree_node=False, default=200)
  photo_steps: int = flax.struct.field(pytree_node=False, default=40)
  # Side of the images the photometric stage renders and compares (0: image_size; 112 fits in
  # 0.7 s per face on a 2-core CPU against 1.8 s at 224, same NME, see BUILD_NOTES). The camera
  # scales with the crop, so coefficients do not depend on it; smaller is faster.
  photo_size: int = flax.struct.field(pytree_node=False, default=112)
  learning_rate: float = flax.struct.field(pytree_node=False, default=0.03)
  contour: str = flax.struct.field(pytree_node=False, default="fixed")
  weights: losses.LossWeights = flax.struct.field(pytree_node=False,
                                                  default=FIT_WEIGHTS)


def initial_pose(model_points, landmarks_2d, focal, principal_point, weights=None):
  """Closed-form weak-perspective pose from 2D-3D correspondences.

  Args:
    model_points: (K, 3) model-space points (e.g. the mean face's landmark vertices).
    landmarks_2d: (B, K, 2) pixels.
    focal: focal length in pixels; principal_point: (2,) pixels.
    weights: optional (B, K) >= 0 (0 drops a missing point); at least 4 points per face
      should have weight > 0.
  Returns:
    (rotation (B, 3) radians, translation (B, 3)) such that projecting R p + m approximately
    reproduces the landmarks (the weighted least-squares affine camera, projected onto a
    rotation).
  """
  x_all = np.asarray(model_points, np.float64)
  pts_all = np.asarray(landmarks_2d, np.float64)
  w_all = (np.ones(pts_all.shape[:2]) if weights is None
           else np.asarray(weights, np.float64))
  rots, trans = [], []
  for pts, w in zip(pts_all, w_all):
    if np.count_nonzero(w > 0) < 4:  # too few points: frontal, at the default distance
      w = np.ones_like(w)
    sw = np.sqrt(w)[:, None]
    mean_x = (w[:, None] * x_all).sum(0) / w.sum()
    uv = np.stack([pts[:, 0] - principal_point[0], -(pts[:, 1] - principal_point[1])], -1)
    mean_uv = (w[:, None] * uv).sum(0) / w.sum()
    m, *_ = np.linalg.lstsq(sw * (x_all - mean_x), sw * (uv - mean_uv), rcond=None)
    m = m.T  # (2, 3): uv - mean_uv ~ m (x - mean_x)
    s = 0.5 * (np.linalg.norm(m[0]) + np.linalg.norm(m[1]))
    r = np.stack([m[0], m[1], np.cross(m[0], m[1])])
    u, _, vt = np.linalg.svd(r)
    r = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
    d = focal / s  # depth of the weighted landmark centroid, not of the model origin
    txy = mean_uv / s - (r @ mean_x)[:2]
    tz = -d - (r @ mean_x)[2]
    rots.append(np.asarray(camera.angles_from_matrix(jnp.asarray(r, jnp.float32))))
    trans.append([txy[0], txy[1], tz])
  return np.asarray(rots, np.float32), np.asarray(trans, np.float32)


def contour_candidates(model: mm.MorphableModel, band=0.6, inner_fraction=0.25, max_count=64):
  """Candidate vertices along which each contour landmark may slide.

  Args:
    model: the morphable model (uses the mean shape, +x to the subject's left).
    band: half-height in model units of the horizontal band around each jaw vertex.
    inner_fraction: candidates run from the jaw vertex's |x| down to this fraction of it.
    max_count: candidates kept per landmark (nearest to the band centre line first).
  Returns:
    (16, max_count) int32 vertex ids, padded with the landmark's own vertex; row i belongs to
    landmark lm.CONTOUR[i].
  """
  v = np.asarray(model.mean_shape)
  ids = np.asarray(model.landmarks)[lm.CONTOUR]
  out = np.empty((len(ids), max_count), np.int32)
  for row, vid in enumerate(ids):
    p = v[vid]
    side = np.sign(p[0]) if p[0] != 0 else 1.0
    sel = ((np.abs(v[:, 1] - p[1]) < band) & (side * v[:, 0] <= side * p[0] + 1e-6)
           & (side * v[:, 0] >= inner_fraction * side * p[0]) & (v[:, 2] >= p[2] - 0.5))
    cand = np.nonzero(sel)[0]
    cand = cand[np.argsort(np.abs(v[cand, 1] - p[1]))][:max_count - 1]
    out[row] = np.concatenate([[vid], cand, np.full(max_count - 1 - len(cand), vid)])
  return out


class LandmarkProblem(NamedTuple):
  """Gathered model rows needed to move only the landmark (and contour candidate) vertices.

  A landmark is the mix-weighted mean of up to M gathered rows (dff3d.landmark_sets); for
  iBUG-68 every point is one vertex."""
  mean: jnp.ndarray        # (V, 3)
  identity: jnp.ndarray    # (Ki, V, 3)
  expression: jnp.ndarray  # (Ke, V, 3)
  fixed: jnp.ndarray       # (K, M) rows of each landmark's vertices in the gathered set
  mix: jnp.ndarray         # (K, M) their weights (rows sum to 1, or 0 for a missing point)
  candidates: jnp.ndarray  # (16, C) rows of each contour landmark's candidates (iBUG-68)


def landmark_problem(model: mm.MorphableModel, with_candidates: bool, landmark_set=None):
  """Gather the model rows of a landmark set's points (default iBUG-68; contour candidates
  only for iBUG-68)."""
  landmark_set = landmark_set or landmark_sets.IBUG68
  vids, mix = landmark_set.vertices(model)
  if landmark_set.name == "ibug68":
    ids = np.asarray(model.landmarks)
    cand = contour_candidates(model) if with_candidates else ids[lm.CONTOUR][:, None]
  else:
    cand = np.zeros((0, 1), np.int64)
  all_ids, inverse = np.unique(np.concatenate([vids.ravel(), cand.ravel()]),
                               return_inverse=True)
  fixed = inverse[:vids.size].reshape(vids.shape)
  candidates = inverse[vids.size:].reshape(cand.shape)
  return LandmarkProblem(model.mean_shape[all_ids], model.identity_basis[:, all_ids],
                         model.expression_basis[:, all_ids], jnp.asarray(fixed, jnp.int32),
                         jnp.asarray(mix, jnp.float32), jnp.asarray(candidates, jnp.int32))


def _project_points(points, rotation, translation, image_size):
  focal, pp = camera.default_camera(image_size, image_size)
  return camera.project(camera.to_camera(points, rotation, translation), focal, pp)


def screen_landmarks(problem: LandmarkProblem, c: coeffs_lib.Coefficients, image_size,
                     slide: bool):
  """(B, K, 3) projected landmarks (x_px, y_px, depth); iBUG-68 contour points slide to the
  outline when `slide` (each takes the candidate vertex furthest out in image x)."""
  pts = (problem.mean[None] + jnp.einsum("bk,kvc->bvc", c.identity, problem.identity)
         + jnp.einsum("bk,kvc->bvc", c.expression, problem.expression))
  scr = _project_points(pts, c.rotation, c.translation, image_size)
  out = jnp.sum(scr[:, problem.fixed] * problem.mix[None, ..., None], axis=2)
  if slide and problem.candidates.shape[0]:
    cand = scr[:, problem.candidates]  # (B, 16, C, 3)
    right = jnp.asarray(lm.CONTOUR < 8)[None, :, None]  # subject's right: smallest image x
    key = jnp.where(right, cand[..., 0], -cand[..., 0])
    pick = jax.lax.stop_gradient(jnp.argmin(key, -1))
    chosen = jnp.take_along_axis(cand, pick[..., None, None], 2)[:, :, 0]
    out = out.at[:, lm.CONTOUR].set(chosen)
  return out


def predicted_landmarks(problem: LandmarkProblem, c: coeffs_lib.Coefficients, image_size,
                        slide: bool):
  """(B, K, 2) projected landmarks: screen_landmarks without the depth."""
  return screen_landmarks(problem, c, image_size, slide)[..., :2]


def _to_coefficients(x0, u):
  return x0.replace(**{k: getattr(x0, k) + FIELD_SCALES[k] * u[k] for k in u})


def _adam_loop(loss_fn, x0, fields, steps, lr, blendshapes):
  """Minimise loss_fn(Coefficients) over `fields` of x0 with Adam; returns Coefficients."""
  u = {k: jnp.zeros_like(getattr(x0, k)) for k in fields}
  opt = optax.adam(lr)
  state = opt.init(u)

  def step(carry, _):
    u, state = carry
    g = jax.grad(lambda u: loss_fn(_to_coefficients(x0, u)))(u)
    upd, state = opt.update(g, state)
    u = optax.apply_updates(u, upd)
    if blendshapes and "expression" in u:  # projected step: blendshape weights in [0, 1]
      e = x0.expression + FIELD_SCALES["expression"] * u["expression"]
      u["expression"] = (jnp.clip(e, 0.0, 1.0) - x0.expression) / FIELD_SCALES["expression"]
    return (u, state), None

  (u, _), _ = jax.lax.scan(step, (u, state), None, length=steps)
  return _to_coefficients(x0, u)


@functools.partial(jax.jit, static_argnames=("config", "blendshapes"))
def _fit_landmarks_jit(problem, c0, target, weights, config: FitConfig, blendshapes: bool):
  slide = config.contour == "silhouette"
  w = config.weights
  s = config.image_size

  def land(c):
    pred = predicted_landmarks(problem, c, s, slide)
    return w.land * losses.landmark_loss(pred, target, weights, s)

  def land_reg(c):
    return land(c) + w.reg * losses.weighted_regularization(c, w)

  c = _adam_loop(land, c0, ("rotation", "translation"), config.pose_steps,
                 config.learning_rate, blendshapes)
  c = _adam_loop(land_reg, c, ("rotation", "translation", "identity", "expression"),
                 config.shape_steps, config.learning_rate, blendshapes)
  return c


def is_blendshape_model(model: mm.MorphableModel) -> bool:
  """Blendshape expressions (named, weights in [0, 1], e.g. ICT) vs PCA expressions (BFM)."""
  return len(model.expression_names) > 0


def fit_landmarks(model: mm.MorphableModel, landmarks_2d, config: FitConfig = FitConfig(),
                  visible=None, landmark_set=None):
  """Fit pose, identity and expression to K landmarks in crop pixels.

  Args:
    model: the morphable model.
    landmarks_2d: (B, K, 2) crop pixels (crop side config.image_size).
    config: FitConfig.
    visible: optional (B, K) weights in {0, 1} for missing points.
    landmark_set: dff3d.landmark_sets set of the K points (default iBUG-68; contour sliding
      applies to iBUG-68 only).
  Returns:
    Coefficients (B, ...) with albedo 0 and default lighting.
  """
  landmark_set = landmark_set or landmark_sets.IBUG68
  landmarks_2d = jnp.asarray(landmarks_2d, jnp.float32)
  b, k = landmarks_2d.shape[:2]
  if k != len(landmark_set):
    raise ValueError(f"{k} landmarks for the {len(landmark_set)}-point set {landmark_set.name}")
  vis = np.ones((b, k), np.float32) if visible is None else np.asarray(visible, np.float32)
  focal, pp = camera.default_camera(config.image_size, config.image_size)
  vids, mix = landmark_set.vertices(model)
  have = mix.sum(-1) > 0
  ref = np.einsum("km,kmc->kc", mix, np.asarray(model.mean_shape)[vids])
  inner = landmark_set.inner & have
  rot, trans = initial_pose(ref[inner], np.asarray(landmarks_2d)[:, inner], float(focal),
                            np.asarray(pp), vis[:, inner])
  c0 = mm.zero_coefficients(model, b).replace(rotation=jnp.asarray(rot),
                                               translation=jnp.asarray(trans))
  weights = jnp.asarray(landmark_set.weights * have)[None] * jnp.asarray(vis)
  problem = landmark_problem(model, config.contour == "silhouette", landmark_set)
  return _fit_landmarks_jit(problem, c0, landmarks_2d, weights, config,
                            is_blendshape_model(model))


def photometric_objective(model: mm.MorphableModel, c: coeffs_lib.Coefficients, images,
                          target_landmarks, weights, config: FitConfig, dff_fn=None,
                          image_descriptors=None, problem=None):
  """The paper's loss for one fit step: landmarks + photo (+ DFF) + regularisation.

  Args:
    images: (B, S, S, 3) crops in [0, 1]; target_landmarks: (B, 68, 2) crop pixels;
    weights: (B, 68) landmark weights (contour / inner x visibility).
    dff_fn: optional frozen DFF network, images -> (B, S, S, D) unit descriptors;
    image_descriptors: its output on `images` (computed once per fit).
    problem: LandmarkProblem with contour candidates, needed when config.contour is
      'silhouette' (build it outside jit with landmark_problem(model, True)).
  Returns:
    (scalar loss, dict of the unweighted terms).
  """
  s = config.image_size
  w = config.weights
  r = render_lib.render(model, c, (s, s), background=images)
  # Sliding contour points: the same landmark set as the landmark stages.
  pred = (predicted_landmarks(problem, c, s, True) if config.contour == "silhouette"
          else r.landmarks_2d)
  terms = {
      "land": losses.landmark_loss(pred, target_landmarks, weights, s),
      "photo": losses.photometric_loss(images, r.image, r.skin_mask),
      "reg": losses.weighted_regularization(c, w),
  }
  total = w.land * terms["land"] + w.photo * terms["photo"] + w.reg * terms["reg"]
  if dff_fn is not None:
    from dff3d.models import dff as dff_lib  # optional network, imported only when used
    visible = losses.landmark_visibility(r.normals_cam[:, model.landmarks],
                                         r.vertices_cam[:, model.landmarks])
    d_img = dff_lib.sample_descriptors(image_descriptors, r.landmarks_2d)
    d_ren = dff_lib.sample_descriptors(dff_fn(r.image), r.landmarks_2d)
    terms["dff"] = losses.dff_loss(d_img, d_ren, visible)
    total = total + w.dff * terms["dff"]
  return total, terms


@functools.partial(jax.jit, static_argnames=("config", "blendshapes", "dff_fn"))
def _fit_photo_jit(model, problem, c0, images, target, weights, config: FitConfig,
                   blendshapes: bool, dff_fn=None):
  desc = None if dff_fn is None else dff_fn(images)
  loss = lambda c: photometric_objective(model, c, images, target, weights, config, dff_fn,
                                         desc, problem)[0]
  return _adam_loop(loss, c0, coeffs_lib.FIELDS, config.photo_steps, config.learning_rate,
                    blendshapes)


def fit_photometric(model: mm.MorphableModel, c_init: coeffs_lib.Coefficients, images,
                    landmarks_2d, config: FitConfig = FitConfig(), visible=None, dff_fn=None):
  """Refine every coefficient with the photometric (+ DFF) loss, starting from c_init.

  Args:
    images: (B, S, S, 3) crops, S = config.image_size; landmarks_2d: (B, 68, 2) crop pixels.
    dff_fn: optional frozen DFF function (hashable: the same object reuses the compilation).
  Returns:
    Coefficients.
  """
  b = images.shape[0]
  weights = jnp.asarray(lm.landmark_weights())[None] * (
      jnp.ones((b, 68)) if visible is None else jnp.asarray(visible, jnp.float32))
  problem = landmark_problem(model, True) if config.contour == "silhouette" else None
  images = jnp.asarray(images, jnp.float32)
  landmarks_2d = jnp.asarray(landmarks_2d, jnp.float32)
  size = config.photo_size or config.image_size
  if size != config.image_size:
    images = jax.image.resize(images, (b, size, size, 3), "linear", antialias=True)
    landmarks_2d = landmarks_2d * (size / config.image_size)
    config = config.replace(image_size=size, photo_size=0)
  return _fit_photo_jit(model, problem, c_init, jnp.asarray(images, jnp.float32),
                        jnp.asarray(landmarks_2d, jnp.float32), weights, config,
                        is_blendshape_model(model), dff_fn)


def fit(model: mm.MorphableModel, images, landmarks_2d, config: FitConfig = FitConfig(),
        visible=None, dff_fn=None):
  """The whole coarse-to-fine fit: landmarks first, then the photometric stage when
  config.photo_steps > 0. Arguments as fit_photometric; returns Coefficients."""
  c = fit_landmarks(model, landmarks_2d, config, visible)
  if config.photo_steps > 0:
    c = fit_photometric(model, c, images, landmarks_2d, config, visible, dff_fn)
  return c


ANCHORED_FIELDS = ("rotation", "translation", "identity", "expression")


@functools.partial(jax.jit, static_argnames=("image_size", "steps", "blendshapes"))
def _fit_anchored_jit(problem, c0, target, anchor, learning_rate, image_size: int, steps: int,
                      blendshapes: bool):
  def loss(c):
    pred = predicted_landmarks(problem, c, image_size, False)
    land = jnp.mean(jnp.sum(jnp.square((pred - target) / image_size), (-1, -2)))
    moved = sum(jnp.sum(jnp.square((getattr(c, k) - getattr(c0, k)) / FIELD_SCALES[k]))
                for k in ANCHORED_FIELDS) / target.shape[0]
    return land + anchor * moved

  return _adam_loop(loss, c0, ANCHORED_FIELDS, steps, learning_rate, blendshapes)


def fit_anchored(model: mm.MorphableModel, c0: coeffs_lib.Coefficients, landmarks_2d,
                 image_size: int, steps: int = 60, anchor: float = 1e-4,
                 learning_rate: float = 0.03, problem: Optional[LandmarkProblem] = None
                 ) -> coeffs_lib.Coefficients:
  """Move faces c0 (B, ...) so that their 68 fixed-contour points meet landmarks_2d (B, 68, 2)
  crop pixels (crop side image_size), staying near c0: Adam on pose, identity and
  expression over  sum_i ||v_i - t_i||^2 / S^2 + anchor * ||(c - c0) / FIELD_SCALES||^2
  (every point weighted alike). Albedo and lighting are kept. Used after the landmark
  refiner (dff3d.refine), so that the mesh follows the refined points. problem: the model's
  iBUG-68 landmark_problem when the caller already has one (its fixed rows are used)."""
  problem = landmark_problem(model, False) if problem is None else problem
  return _fit_anchored_jit(problem, c0, jnp.asarray(landmarks_2d, jnp.float32),
                           jnp.float32(anchor), jnp.float32(learning_rate), int(image_size),
                           int(steps), is_blendshape_model(model))
