"""benchmarks.dff_correspondence.real_cross_identity on constructed cases with known answers.

Crops carry a per-pixel "semantic id" in channel 0; `one_hot` describes a pixel by the one-hot
code of its id, so a landmark of A finds exactly the pixel of B with the same id.
"""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import dff_correspondence as bench

S = 40  # radius 0.05 * 40 = 2 px


def one_hot(images):
  """(B, S, S, 3) with integer ids in channel 0 -> (B, S, S, S * S) one-hot descriptors."""
  return jax.nn.one_hot(images[..., 0].astype(jnp.int32), S * S)


def id_crops(shifts):
  """(N, S, S, 3) crops: crop n holds the id grid row * S + col moved by shifts[n] = (dx, dy)
  pixels (wrapping around), so id i sits at (col + dx, row + dy) in crop n."""
  ids = np.arange(S * S, dtype=np.float32).reshape(S, S)
  crops = [np.roll(ids, (dy, dx), axis=(0, 1)) for dx, dy in shifts]
  return np.repeat(np.stack(crops)[..., None], 3, -1)


def landmarks_for(shifts, base):
  """(N, K, 2): the base points (K, 2) (at pixel centres of crop 0's grid) in each crop."""
  return np.stack([base + np.float32([dx, dy]) for dx, dy in shifts]).astype(np.float32)


BASE = np.float32([[5.5, 6.5], [12.5, 20.5], [30.5, 8.5], [20.5, 25.5]])
SHIFTS = [(0, 0), (3, -2), (-4, 5)]
PAIRS = np.int32([[0, 1], [1, 2], [2, 0]])


def test_semantic_codes_hit_every_landmark():
  r = bench.real_cross_identity(one_hot, id_crops(SHIFTS), landmarks_for(SHIFTS, BASE), PAIRS,
                                points=None)
  assert r["real_landmarks_within_5pct"] == 1.0
  assert (r["hits"], r["landmarks"], r["skipped"], r["pairs"]) == (12, 12, 0, 3)
  assert r["radius_px"] == 2.0


def test_shuffled_codes_rarely_hit():
  def shuffled(images):
    keys = jax.random.split(jax.random.PRNGKey(0), images.shape[0])
    perm = jax.vmap(lambda k: jax.random.permutation(k, S * S))(keys)
    ids = images[..., 0].astype(jnp.int32)
    return one_hot(jnp.take_along_axis(perm, ids.reshape(ids.shape[0], -1), 1)
                   .reshape(ids.shape)[..., None].repeat(3, -1))
  base = np.stack(np.meshgrid(np.arange(2, 38, 4) + 0.5, np.arange(2, 38, 4) + 0.5), -1)
  base = base.reshape(-1, 2).astype(np.float32)
  shifts = [(0, 0), (1, 1)]
  r = bench.real_cross_identity(shuffled, id_crops(shifts), landmarks_for(shifts, base),
                                np.int32([[0, 1], [1, 0]]), points=None)
  assert r["landmarks"] == 2 * len(base)
  assert r["real_landmarks_within_5pct"] < 0.1


def test_points_outside_either_crop_are_skipped():
  lm = landmarks_for(SHIFTS, BASE)
  lm[1, 0] = [S + 3.0, 10.5]  # point 0 leaves crop 1: pairs (0, 1) and (1, 2) lose it
  lm[2, 3] = [-0.5, 10.5]     # point 3 leaves crop 2: pairs (1, 2) and (2, 0) lose it
  r = bench.real_cross_identity(one_hot, id_crops(SHIFTS), lm, PAIRS, points=None)
  assert (r["landmarks"], r["skipped"]) == (8, 4)
  assert r["real_landmarks_within_5pct"] == 1.0


def test_hit_radius_is_five_percent_of_the_side_inclusive():
  shifts = [(0, 0), (0, 0)]
  crops = id_crops(shifts)
  for offset, hit in ((1.9, 1), (2.0, 1), (2.1, 0), (-2.0, 1), (-2.25, 0)):
    lm = landmarks_for(shifts, BASE[:1])
    lm[1, 0, 0] += offset  # B's label moves; the found pixel stays at A's point
    r = bench.real_cross_identity(one_hot, crops, lm, np.int32([[0, 1]]), points=None)
    assert r["hits"] == hit, offset
  r = bench.real_cross_identity(one_hot, crops, lm, np.int32([[0, 1]]), radius_frac=0.1,
                                points=None)
  assert r["hits"] == 1


def test_default_scores_the_52_inner_points():
  shifts = [(0, 0), (2, 1)]
  base = np.stack([np.arange(68) % 17 * 2 + 1.5, np.arange(68) // 17 * 8 + 2.5], -1)
  r = bench.real_cross_identity(one_hot, id_crops(shifts), landmarks_for(shifts, base),
                                np.int32([[0, 1]]))
  assert (r["landmarks"], r["hits"]) == (52, 52)


def test_draw_pairs_respects_the_yaw_bound_and_seed():
  yaw = np.float32([0, 10, 50, 80, -20, 35])
  p = bench.draw_pairs(yaw, 100, 30.0, seed=3)
  assert len(p) == len({tuple(sorted(x)) for x in p.tolist()}) and np.all(p[:, 0] != p[:, 1])
  assert np.all(np.abs(yaw[p[:, 0]] - yaw[p[:, 1]]) <= 30.0)
  assert len(p) == 6  # (0,1) (0,4) (1,4) (1,5) (2,3) (2,5)
  np.testing.assert_array_equal(p, bench.draw_pairs(yaw, 100, 30.0, seed=3))
  assert len(bench.draw_pairs(yaw, 4, None, seed=0)) == 4
