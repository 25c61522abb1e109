"""Landmark sets as data: vertex rules, the padded table, mixed-set gathering and flips."""

import jax.numpy as jnp
import numpy as np
import pytest

from dff3d import camera
from dff3d import landmark_sets as ls
from dff3d import morphable_model as mm


@pytest.fixture(scope="module")
def model():
  return mm.default_model()


def _screen(model, yaw, size=200.0):
  """(1, N, 3) screen vertices of the mean face at a yaw (radians), numpy float64."""
  r = np.asarray(camera.rotation_matrix(jnp.asarray([[0.0, yaw, 0.0]])), np.float64)[0]
  v = np.asarray(model.mean_shape, np.float64) @ r.T
  v[:, 2] -= 60.0
  f = 2.0 * size
  x = size / 2 + f * v[:, 0] / -v[:, 2]
  y = size / 2 - f * v[:, 1] / -v[:, 2]
  return np.stack([x, y, -v[:, 2]], -1)[None]


def test_ibug68_rows_are_the_model_landmarks(model):
  ids, mix = ls.IBUG68.vertices(model)
  np.testing.assert_array_equal(ids[:, 0], np.asarray(model.landmarks))
  np.testing.assert_array_equal(mix[:, 0], 1.0)
  assert not mix[:, 1:].any()


def test_flip_permutations_are_involutions():
  for s in ls.SETS:
    perm = s.flip_permutation
    assert sorted(perm) == list(range(len(s)))
    np.testing.assert_array_equal(perm[perm], np.arange(len(s)))
  # AFLW-21: left/right names swap, midline points stay.
  names = ls.AFLW21.point_names
  for i, j in enumerate(ls.AFLW21.flip_permutation):
    swapped = names[i].replace("left", "#").replace("right", "left").replace("#", "right")
    assert names[j] == swapped, (names[i], names[j])


def test_aflw21_points_mirror_with_the_face(model):
  """The mirrored face at -yaw has the flipped points of the face at +yaw (the ICT mean face
  is left-right symmetric): checks the vertex rules pick mirror-image vertices and that the
  flip permutation matches them."""
  table = ls.set_table(model)
  w = 200.0
  a = np.asarray(ls.points(jnp.asarray(_screen(model, 0.5)), table, jnp.array([1])))[0, :21]
  b = np.asarray(ls.points(jnp.asarray(_screen(model, -0.5)), table, jnp.array([1])))[0, :21]
  flipped, _ = ls.flip_points(a[:, :2], np.ones(21), w, ls.AFLW21)
  np.testing.assert_allclose(flipped, b[:, :2], atol=0.3)


def test_aflw21_vertex_rules_on_ict(model):
  v = np.asarray(model.mean_shape)
  ids, mix = ls.AFLW21.vertices(model)
  lmk = np.asarray(model.landmarks)
  # Points that are iBUG vertices.
  for k, i in [(0, 17), (2, 21), (5, 26), (6, 36), (8, 39), (14, 30), (17, 48), (20, 8)]:
    assert ids[k, 0] == lmk[i] and mix[k, 0] == 1.0
  # Eye centre: the mean of the six eye points; mouth centre between the inner lips.
  np.testing.assert_array_equal(np.sort(ids[7]), np.sort(lmk[36:42]))
  np.testing.assert_allclose(mix[7], 1 / 6)
  assert set(ids[18, :2]) == {lmk[62], lmk[66]}
  # Ear lobes and nose sides: the embedded model's calibrated pairs (mirror images); any other
  # mean face gets the geometric rules.
  calibrated = ls.CALIBRATED_AFLW21[ls.mesh_key(model)]
  assert {k: int(ids[k, 0]) for k in calibrated} == calibrated
  for a, b in [(12, 16), (13, 15)]:
    np.testing.assert_allclose(v[ids[a, 0]] * [-1, 1, 1], v[ids[b, 0]], atol=1e-3)
  moved = model.replace(mean_shape=model.mean_shape + jnp.array([0.0, 1e-3, 0.0]))
  assert ls.mesh_key(moved) not in ls.CALIBRATED_AFLW21
  rule, _ = ls.AFLW21.vertices(moved)
  # Ear lobes: below the jaw's upper end on their own side; the rule's lobe also outside it,
  # the calibrated one in front of the rule's (where the lobe meets the cheek).
  for k, side, jaw in [(12, -1, 0), (16, 1, 16)]:
    assert side * v[ids[k, 0], 0] > 0 and v[ids[k, 0], 1] < v[lmk[jaw], 1]
    p = v[rule[k, 0]]
    assert side * p[0] > abs(v[lmk[jaw], 0]) and p[1] < v[lmk[jaw], 1]
    assert v[ids[k, 0], 2] > p[2] + 1.0
  # Nose sides: more lateral than the nostril base, less than twice its distance to the tip
  # (the rule's and the calibrated ones).
  for table in (ids, rule):
    for k, base in [(13, 31), (15, 35)]:
      x, xb = abs(v[table[k, 0], 0]), abs(v[lmk[base], 0])
      assert xb < x < 2 * xb


def test_missing_points_get_no_weight(model):
  # A model whose head is narrowed to the jaw width has no ear: the lobes become unavailable.
  shape = np.asarray(model.mean_shape).copy()
  shape[:, 0] = np.clip(shape[:, 0], -7.4, 7.4)
  earless = model.replace(mean_shape=jnp.asarray(shape))
  table = ls.set_table(earless)
  w = np.asarray(table.weights[1])
  assert w[12] == 0 and w[16] == 0 and w[13] == 1 and not w[21:].any()
  assert np.asarray(table.inner[1])[[12, 16]].sum() == 0


def test_points_gather_each_examples_set(model):
  table = ls.set_table(model)
  rng = np.random.default_rng(0)
  verts = rng.normal(size=(3, model.num_vertices, 3))
  sets = np.array([1, 0, 1])
  got = np.asarray(ls.points(jnp.asarray(verts, jnp.float32), table, jnp.asarray(sets)))
  for b, s in enumerate(sets):
    ids, mix = ls.SETS[s].vertices(model)
    want = np.einsum("km,kmd->kd", mix, verts[b][ids])
    np.testing.assert_allclose(got[b, :len(ids)], want, atol=1e-5)
    assert not got[b, len(ids):].any()


def test_pad_and_flip_points_by_hand():
  pts, vis = ls.pad(np.arange(42, dtype=np.float32).reshape(21, 2), np.ones(21, bool))
  assert pts.shape == (68, 2) and vis.shape == (68,)
  assert vis[:21].all() and not vis[21:].any() and not pts[21:].any()
  p = np.zeros((21, 2), np.float32)
  p[6] = (10.0, 5.0)  # image-left eye outer corner
  v = np.zeros(21, bool)
  v[6] = True
  q, qv = ls.flip_points(p, v, 100.0, ls.AFLW21)
  assert tuple(q[11]) == (90.0, 5.0) and qv[11] and qv.sum() == 1  # -> image-right outer


def test_get_by_name_and_index():
  assert ls.get("aflw21") is ls.AFLW21 and ls.get(0) is ls.IBUG68
  with pytest.raises(ValueError, match="unknown landmark set"):
    ls.get("aflw19")
