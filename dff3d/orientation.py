"""Which way is up: a small classifier of a face's quarter turn, and crops that undo it.

The regressor, the DFF and the landmark fit were trained on faces within +-30 degrees of
upright (the paper's rotation augmentation), so a face lying on its side or upside down
(a person lying down, a photo turned in the camera, AFLW2000-3D's image04157) is read as
noise. This module finds the quarter turn of a face from a small crop around it and frames
the crop the regressor sees in the turned frame, where the face stands upright:

    classify = orientation.load_orientation()                 # the shipped classifier
    k = orientation.quarter_turns(classify, [(image, points)])[0]   # 0, 1, 2 or 3
    affine = orientation.upright_crop_affine(points, k, 96)   # photo -> upright crop

Convention: a face "turned by k" is rotated by k * 90 degrees counter-clockwise on screen
(augment.rotation_affine's direction) from upright; its crop is made in the photo turned by
-k * 90 degrees about the centre of the points' bounding box, so everything downstream (the
regressor, the landmarks' way back to the photo through the crop's affine) is unchanged.
`points` is anything whose bounding box locates the face: 68 landmarks, or a detector box's
four corners.

The classifier is the regressor's network (light.ResNet18Regressor, width 1/2) with 4
outputs (the logits of k = 0..3), on 96 px crops centred on the points' box, side CROP_SCALE
times its larger side (centred, with no shift up, so a quarter turn of the face is a quarter
turn of the crop). experiments/train_orientation.py fine-tunes it from the shipped
regressor's backbone on AFLW crops turned by a random k plus a uniform +-40 degree tilt (a
width-1/4 network trained from scratch reached 96 % at tilts up to 30 degrees, too few for a
step that must not turn an upright face); BUILD_NOTES ("Session 18") has the data, command
and accuracy.
"""

import os
from typing import Callable, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dff3d import morphable_model as mm
from dff3d.data import augment
from dff3d.models import light
from dff3d.models import param_files

INPUT_SIZE = 96
CROP_SCALE = 1.6
WIDTH = 0.5
NUM_TURNS = 4
# A face is turned only when the turn's (dihedral-averaged) probability reaches this; chosen
# on AFLW validation crops, not on AFLW2000-3D (BUILD_NOTES, "Session 18").
TURN_PROBABILITY = 0.7
SHIPPED_ORIENTATION = os.path.join(mm.ASSET_DIR, "orientation.npz")
CONFIG_KEY = "orientation_config_json"


class OrientationFileError(ValueError):
  """A classifier file that is missing, unreadable or does not match its network."""


def make_network(width: float = WIDTH) -> light.ResNet18Regressor:
  """The classifier: crops (B, S, S, 3) in [0, 1] -> logits (B, 4) of k = 0..3."""
  return light.ResNet18Regressor(num_outputs=NUM_TURNS, width=width)


def from_regressor(params, regressor_params):
  """The classifier's params with every backbone array taken from a regressor of the same
  width (light backbone): only the head (features -> 4 logits) keeps its own values."""
  out = dict(regressor_params)
  out["head"] = params["head"]
  shapes = lambda t: jax.tree_util.tree_map(np.shape, t)
  if shapes(out) != shapes(dict(params)):
    raise ValueError("the regressor's backbone does not match the classifier's "
                     f"(width {WIDTH}, light backbone)")
  return out


def points_centre(points) -> np.ndarray:
  """(2,) centre of the bounding box of points (K, >=2) (finite rows only)."""
  pts = np.asarray(points, np.float64)[:, :2]
  pts = pts[np.all(np.isfinite(pts), 1)]
  return (pts.min(0) + pts.max(0)) / 2


def turn_affine(points, quarter_turns: int) -> np.ndarray:
  """(2, 3) the photo turned by -quarter_turns * 90 degrees about points_centre(points): a
  face turned by quarter_turns stands upright in it (the identity for 0)."""
  return augment.rotation_affine(-90.0 * (int(quarter_turns) % NUM_TURNS), points_centre(points))


def upright_crop_affine(points, quarter_turns: int, size: int, scale: float = 1.6,
                        shift_up: float = 0.1) -> np.ndarray:
  """(2, 3) photo -> crop pixels: augment.face_box of the points in the turned frame
  (turn_affine), resampled to size x size. quarter_turns=0 is augment.crop_affine(
  augment.face_box(points), size), the framing every crop of the library uses."""
  turn = turn_affine(points, quarter_turns)
  box = augment.face_box(augment.transform_points(turn, np.asarray(points, np.float64)[:, :2]),
                         scale=scale, shift_up=shift_up)
  return augment.compose(augment.crop_affine(box, size), turn)


def upright_box_affine(box, quarter_turns: int, size: int) -> np.ndarray:
  """(2, 3) photo -> crop pixels of a square box (4,) x0, y0, x1, y1 turned about its centre
  (augment.crop_affine(box, size) for 0): a quarter turn of a square keeps its corners."""
  box = np.asarray(box, np.float64)
  corners = np.array([[box[0], box[1]], [box[2], box[3]]])
  return augment.compose(augment.crop_affine(box, size), turn_affine(corners, quarter_turns))


def box_points(box, scale: float = 1.6) -> np.ndarray:
  """(2, 2) corners of the face inside a crop box (4,) x0, y0, x1, y1 framed like
  augment.face_box at `scale` (detect.crop_box's boxes are): the box shrunk by 1 / scale
  about its centre, the extent the classifier's crop expects of `points`."""
  box = np.asarray(box, np.float64)
  centre, half = (box[:2] + box[2:]) / 2, (box[2:] - box[:2]) / (2 * scale)
  return np.stack([centre - half, centre + half])


def classifier_affine(points, angle_deg: float = 0.0, size: int = INPUT_SIZE,
                      scale: float = CROP_SCALE) -> np.ndarray:
  """(2, 3) photo -> the classifier's crop: the square of side scale x the points' larger
  bounding-box side, centred on the box, the photo rotated by angle_deg about that centre
  (training turns faces with it; inference uses 0)."""
  pts = np.asarray(points, np.float64)[:, :2]
  pts = pts[np.all(np.isfinite(pts), 1)]
  centre = points_centre(pts)
  half = scale * float(np.ptp(pts, 0).max()) / 2
  box = np.array([centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half])
  return augment.compose(augment.crop_affine(box, size),
                         augment.rotation_affine(angle_deg, centre))


def classifier_crop(image, points) -> np.ndarray:
  """(INPUT_SIZE, INPUT_SIZE, 3) float32: the classifier's view of the face at `points`."""
  return augment.warp_affine(image, classifier_affine(points), INPUT_SIZE, INPUT_SIZE)


# ---- files --------------------------------------------------------------------------------
def save_orientation(path, params, width: float = WIDTH, dtype=np.float16) -> None:
  """Write the classifier's params and width to one .npz (float16 by default;
  models.param_files' layout, as the DFF's)."""
  param_files.write(path, params, CONFIG_KEY, {"width": width, "input_size": INPUT_SIZE,
                                               "crop_scale": CROP_SCALE}, dtype)


def load_orientation_params(path) -> Tuple[light.ResNet18Regressor, dict]:
  """(network, params float32) of a file written by save_orientation; OrientationFileError
  (one line naming the file) when it is missing, unreadable or does not match."""
  arrays, config = param_files.read(path, CONFIG_KEY, OrientationFileError,
                                     "orientation classifier")
  if config.get("input_size") != INPUT_SIZE or config.get("crop_scale") != CROP_SCALE:
    raise OrientationFileError(f"{os.fspath(path)}: made for {config.get('input_size')} px "
                               f"crops at scale {config.get('crop_scale')}, this library crops "
                               f"{INPUT_SIZE} px at {CROP_SCALE}")
  net = make_network(float(config["width"]))
  init = lambda: net.init(jax.random.PRNGKey(0),
                          jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))["params"]
  return net, param_files.unflatten_checked(path, arrays, init, OrientationFileError,
                                            f"a width-{config['width']} classifier")


def dihedral_average(probabilities: Callable, crops: jnp.ndarray) -> jnp.ndarray:
  """(B, 4) the probabilities of k averaged over the crop's 8 turns and mirror images.

  A crop turned by j more quarter turns shows the face at k + j; its mirror image shows it at
  -k (a counter-clockwise turn becomes a clockwise one). Each of the 8 views' probabilities
  is moved back to the crop's own k and the 8 are averaged: the classifier's errors on one
  view are not its errors on another (the shipped classifier on the dev photos turned every
  way: 97.7-99.0 % one view, 99.0 % averaged; BUILD_NOTES "Session 18").
  """
  views, moves = [], []
  for mirror in (False, True):
    base = crops[:, :, ::-1] if mirror else crops
    for j in range(NUM_TURNS):
      views.append(jnp.rot90(base, j, axes=(1, 2)))
      # view class v holds the crop's class m where v = (+-m + j) mod 4
      moves.append([((-m if mirror else m) + j) % NUM_TURNS for m in range(NUM_TURNS)])
  p = probabilities(jnp.concatenate(views)).reshape(len(views), crops.shape[0], NUM_TURNS)
  return jnp.mean(jnp.stack([p[v][:, np.asarray(mv)] for v, mv in enumerate(moves)]), 0)


def load_orientation(path=None, dihedral: bool = True) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """A jitted `classify(crops (B, INPUT_SIZE, INPUT_SIZE, 3)) -> probabilities (B, 4)` of
  k = 0..3; path None: the shipped dff3d/assets/orientation.npz. dihedral: average over the
  crop's 8 turns and mirror images (dihedral_average; 8 network passes)."""
  net, params = load_orientation_params(SHIPPED_ORIENTATION if path is None else path)
  probabilities = lambda x: jax.nn.softmax(net.apply({"params": params}, x), -1)
  if dihedral:
    return jax.jit(lambda crops: dihedral_average(probabilities, crops))
  return jax.jit(probabilities)


def quarter_turns(classify: Callable, faces: Sequence, batch_size: int = 16,
                  min_probability: float = TURN_PROBABILITY) -> np.ndarray:
  """(n,) int64 k of each (image (H, W, 3), points (K, 2)) face: the most probable turn when
  its probability reaches min_probability, else 0 (a face the classifier is unsure of stays
  as it is: most faces are upright, and the regressor reads rolls up to +-30 degrees and
  more). Batches are padded to batch_size, so one compilation serves every call."""
  out = []
  for start in range(0, len(faces), batch_size):
    chunk = [classifier_crop(image, pts) for image, pts in faces[start:start + batch_size]]
    x = np.stack(chunk + [chunk[-1]] * (batch_size - len(chunk)))
    p = np.asarray(classify(jnp.asarray(x)))[:len(chunk)]
    k = np.argmax(p, -1)
    out.append(np.where(p[np.arange(len(k)), k] >= min_probability, k, 0))
  return np.concatenate(out).astype(np.int64) if out else np.zeros((0,), np.int64)
