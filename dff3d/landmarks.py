"""68-point iBUG landmark index sets: contour / inner split (Fig. 2) and the flip permutation.

Index sets refer to positions 0..67 in the iBUG 300-W / Multi-PIE 68-point scheme (0-based):
jaw 0-16, right brow 17-21, left brow 22-26, nose 27-35, right eye 36-41, left eye 42-47,
outer lip 48-59, inner lip 60-67 ("right" is the subject's right, image left in a frontal view).
"""

import numpy as np

NUM_LANDMARKS = 68

# The jaw line 0..16 without the chin point 8: the 16 contour points whose model vertex may
# slide along the silhouette; weight 0.5 in L_land (paper Fig. 2).
CONTOUR = np.array([i for i in range(17) if i != 8], dtype=np.int32)
# The remaining 52 "inner" points (chin, brows, nose, eyes, mouth); weight 1 in L_land.
INNER = np.array([i for i in range(NUM_LANDMARKS) if i not in set(CONTOUR.tolist())],
                 dtype=np.int32)


def _flip_permutation():
  """Position i of a mirrored face takes the landmark flip[i] of the original."""
  pairs = [(0, 16), (1, 15), (2, 14), (3, 13), (4, 12), (5, 11), (6, 10), (7, 9),
           (17, 26), (18, 25), (19, 24), (20, 23), (21, 22),
           (31, 35), (32, 34),
           (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
           (48, 54), (49, 53), (50, 52), (55, 59), (56, 58),
           (60, 64), (61, 63), (65, 67)]
  perm = np.arange(NUM_LANDMARKS)
  for a, b in pairs:
    perm[a], perm[b] = b, a
  return perm.astype(np.int32)


FLIP_PERMUTATION = _flip_permutation()


def landmark_weights(contour_weight=0.5, inner_weight=1.0):
  """Per-landmark weights of L_land: (68,) float32, 0.5 on CONTOUR and 1 on INNER by default."""
  w = np.full((NUM_LANDMARKS,), inner_weight, dtype=np.float32)
  w[CONTOUR] = contour_weight
  return w


def flip_landmarks(points, width):
  """Mirror landmarks of a horizontally flipped image.

  Args:
    points: (..., 68, D) float, D >= 2, x in pixels (pixel centres at integer + 0.5).
    width: image width in pixels; a point at x maps to width - x.

  Returns:
    (..., 68, D): mirrored x, and the points re-ordered with FLIP_PERMUTATION so that index i
    still names the same semantic landmark (e.g. the subject's right eye corner).
  """
  points = np.asarray(points)
  flipped = points[..., FLIP_PERMUTATION, :].copy()
  flipped[..., 0] = width - flipped[..., 0]
  return flipped
