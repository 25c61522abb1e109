"""Training on mixed landmark sets: pipeline rows, fitting to AFLW-21, per-point error
bookkeeping, the fixed training-loop defects, real-data sources and regressor loading."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.io

from dff3d import fitting
from dff3d import io
from dff3d import landmark_sets as ls
from dff3d import morphable_model as mm
from dff3d import render as render_lib
from dff3d import synthetic
from dff3d import train
from dff3d.data import augment, pipeline, real, sources
from dff3d.datasets import aflw_3ddfa
from experiments import configs
from tests import test_aflw_3ddfa


@pytest.fixture(scope="module")
def model():
  return mm.default_model()


def _aflw21_example(model, yaw=0.3, size=120):
  """A rendered face with its exact AFLW-21 points (crop pixels) and pseudo-68 points."""
  c = mm.zero_coefficients(model, 1).replace(
      rotation=jnp.asarray([[0.1, yaw, 0.05]]),
      identity=jnp.asarray(np.random.default_rng(3).normal(size=(1, model.sizes[0])) * 0.5,
                           jnp.float32))
  r = render_lib.render(model, c, (size, size))
  table = ls.set_table(model)
  p21 = np.asarray(ls.points(r.screen_vertices, table, jnp.array([1])))[0, :21, :2]
  p68 = np.asarray(r.landmarks_2d[0])
  return np.asarray(r.image[0]), p21, p68, c


# ---- pipeline ---------------------------------------------------------------------------------
def test_pipeline_pads_flips_and_frames_aflw21_examples(model):
  image, p21, p68, _ = _aflw21_example(model)
  vis = np.ones(21, bool)
  vis[16] = False
  ex = {"image": (image * 255).astype(np.uint8), "landmarks": p21, "landmarks_visible": vis,
        "landmark_set": "aflw21", "box_landmarks": p68}
  flip = augment.AugmentConfig(flip_prob=1.0, max_rotation_deg=0.0, colour_range=None)
  pipe = pipeline.InputPipeline([ex], pipeline.PipelineConfig(batch_size=1, image_size=64,
                                                              augment=flip))
  row = pipe.example(0)
  assert row["landmark_set"] == ls.INDEX["aflw21"]
  assert row["landmarks"].shape == (68, 2) and not row["landmarks_visible"][21:].any()
  # framed by the 68 points' box, then mirrored; point i of the output is flip[i] of the input
  a = augment.crop_affine(augment.face_box(p68), 64)
  moved = augment.transform_points(a, p21)
  want, want_vis = ls.flip_points(moved, vis, 64, ls.AFLW21)
  np.testing.assert_allclose(row["landmarks"][:21], want, atol=1e-3)
  np.testing.assert_array_equal(row["landmarks_visible"][:21], want_vis)
  assert row["landmarks_visible"][12] == 0  # the hidden right lobe is now point 12


def test_pipeline_rejects_a_point_count_that_is_not_its_sets(model):
  ex = {"image": np.zeros((40, 40, 3), np.uint8), "landmarks": np.ones((21, 2)) * 20,
        "landmark_set": "ibug68"}
  pipe = pipeline.InputPipeline([ex], pipeline.eval_config(1, image_size=32))
  with pytest.raises(ValueError, match="21 landmarks for the 68-point set"):
    pipe.example(0)


# ---- fitting to AFLW-21 -----------------------------------------------------------------------
def test_fit_to_visible_aflw21_points_recovers_the_68(model):
  _, p21, p68, _ = _aflw21_example(model, yaw=0.5)
  vis = np.ones((1, 21), np.float32)
  vis[0, [11, 16, 15]] = 0.0  # far side hidden, as at large yaw in AFLW
  p = p21[None].copy()
  p[0, [11, 16, 15]] = -50.0  # garbage where hidden: must not matter
  cfg = fitting.FitConfig(image_size=120, contour="fixed", photo_steps=0)
  c = fitting.fit_landmarks(model, p, cfg, vis, ls.AFLW21)
  _, screen, _ = render_lib.camera_vertices(model, c, (120, 120))
  got = np.asarray(mm.landmark_points(model, screen)[0, :, :2])
  err = np.linalg.norm(got - p68, axis=-1)
  assert np.mean(err) < 1.5 and np.max(err) < 5.0, err


def test_initial_pose_ignores_zero_weight_points(model):
  ref = np.asarray(model.mean_shape)[np.asarray(model.landmarks)]
  _, _, p68, c = _aflw21_example(model, yaw=0.4)
  w = np.ones((1, 68))
  w[0, :10] = 0
  bad = p68[None].copy()
  bad[0, :10] = 1e3
  focal, pp = 240.0, np.array([60.0, 60.0])
  r1, t1 = fitting.initial_pose(ref, p68[None], focal, pp, w)
  r2, t2 = fitting.initial_pose(ref, bad, focal, pp, w)
  np.testing.assert_allclose(r1, r2, atol=1e-5)
  np.testing.assert_allclose(t1, t2, atol=1e-3)
  assert abs(r1[0, 1] - 0.4) < 0.1  # the yaw is recovered
  r3, _ = fitting.initial_pose(ref, bad, focal, pp)  # unweighted: the outliers win
  assert abs(r3[0, 1] - r1[0, 1]) > 1e-3


# ---- loss bookkeeping -------------------------------------------------------------------------
def _tiny():
  return configs.get_config("cpu").replace(image_size=32, width=0.125, batch_size=4,
                                           use_dff=False)


def _untrained(model):
  """(config, network, fresh state, SetTable) of a tiny landmark-only regressor."""
  cfg = _tiny().replace(weights=train.losses.LossWeights(photo=0.0, dff=0.0))
  net = train.make_network(cfg, model)
  tx, _ = train.make_optimizer(cfg, 10)
  return cfg, net, train.create_train_state(jax.random.PRNGKey(0), net, tx, 32), \
      ls.set_table(model)


def test_point_errors_are_each_points_own_mean_over_labelled_examples(model):
  cfg, net, state, table = _untrained(model)
  rng = np.random.default_rng(0)
  sets = np.array([0, 1, 1, 0], np.int32)
  vis = (rng.uniform(size=(4, 68)) > 0.3).astype(np.float32)
  vis[1:3, 21:] = 0  # AFLW-21 rows are padded
  batch = {"image": rng.uniform(size=(4, 32, 32, 3)).astype(np.float32),
           "landmarks": rng.uniform(4, 28, (4, 68, 2)).astype(np.float32),
           "landmarks_visible": vis, "landmark_set": sets}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  _, aux = train.compute_losses(state.params, batch, net=net, model=model, table=table,
                                config=cfg, point_error=state.point_error,
                                land_error_on=jnp.float32(1.0))
  # The untrained network predicts the mean face, frontal: build its points independently.
  c = mm.zero_coefficients(model, 1)
  _, screen, _ = render_lib.camera_vertices(model, c, (32, 32))
  pred = {s: np.asarray(ls.points(screen, table, jnp.array([s])))[0, :, :2] for s in (0, 1)}
  have = np.asarray(table.weights) > 0
  want_sum, want_cnt = np.zeros((2, 68)), np.zeros((2, 68))
  for b, s in enumerate(sets):
    v = vis[b] * have[s]
    d = np.linalg.norm(pred[s] - np.asarray(batch["landmarks"][b]), axis=-1) / 32
    want_sum[s] += d * v
    want_cnt[s] += v
  np.testing.assert_allclose(aux["point_error_batch"], want_sum, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(aux["point_count"], want_cnt)
  # end_epoch: each point's own mean; points never labelled keep their previous value.
  st = state.replace(error_sum=jnp.asarray(want_sum), error_count=jnp.asarray(want_cnt))
  pe = np.asarray(train.end_epoch(st).point_error)
  mean = np.where(want_cnt > 0, want_sum / np.maximum(want_cnt, 1), 1.0)
  np.testing.assert_allclose(pe, mean, rtol=1e-5)


def test_land_error_ignores_hidden_points(model):
  cfg, net, state, table = _untrained(model)
  rng = np.random.default_rng(1)
  vis = np.ones((2, 68), np.float32)
  vis[:, 36:48] = 0
  pts = rng.uniform(4, 28, (2, 68, 2)).astype(np.float32)
  moved = pts.copy()
  moved[:, 36:48] = 0.0  # hidden points' targets: (0, 0) in the files
  def terms(p):
    batch = {"image": jnp.zeros((2, 32, 32, 3)), "landmarks": jnp.asarray(p),
             "landmarks_visible": jnp.asarray(vis), "landmark_set": jnp.zeros((2,), jnp.int32)}
    return train.compute_losses(state.params, batch, net=net, model=model, table=table,
                                config=cfg, point_error=state.point_error,
                                land_error_on=jnp.float32(1.0))[1]
  a, b = terms(pts), terms(moved)
  assert float(a["land_error"]) > 0
  np.testing.assert_allclose(a["land_error"], b["land_error"], rtol=1e-6)
  np.testing.assert_allclose(a["land"], b["land"], rtol=1e-6)



def test_config_landmark_loss_is_the_penalty_of_l_land_and_l_land_error(model):
  cfg, net, state, table = _untrained(model)
  rng = np.random.default_rng(2)
  vis = (rng.uniform(size=(2, 68)) > 0.2).astype(np.float32)
  batch = {"image": jnp.zeros((2, 32, 32, 3)),
           "landmarks": jnp.asarray(rng.uniform(4, 28, (2, 68, 2)), jnp.float32),
           "landmarks_visible": jnp.asarray(vis), "landmark_set": jnp.zeros((2,), jnp.int32)}
  c = mm.zero_coefficients(model, 2)  # what the untrained network predicts
  _, screen, _ = render_lib.camera_vertices(model, c, (32, 32))
  pred = ls.points(screen, table, batch["landmark_set"])[..., :2]
  w = table.weights[batch["landmark_set"]] * batch["landmarks_visible"]
  inner = w / jnp.maximum(w, 1e-9) * table.inner[batch["landmark_set"]]
  got = {}
  for kind in train.losses.LANDMARK_LOSSES:
    aux = train.compute_losses(state.params, batch, net=net, model=model, table=table,
                               config=cfg.replace(landmark_loss=kind),
                               point_error=state.point_error, land_error_on=jnp.float32(1.0))[1]
    want = train.losses.landmark_loss(pred, batch["landmarks"], w, 32, kind)
    np.testing.assert_allclose(aux["land"], want, rtol=1e-5, err_msg=kind)
    np.testing.assert_allclose(
        aux["land_error"], train.losses.landmark_loss(pred, batch["landmarks"], inner, 32, kind),
        rtol=1e-5, err_msg=kind)
    got[kind] = float(aux["land"])
  assert len(set(got.values())) == 3  # each kind is a different term

# ---- the loop's defects -----------------------------------------------------------------------
def test_hold_out_never_validates_on_training_examples():
  src = [{"i": i} for i in range(200)]
  tr, va = train.hold_out(src)
  seen_t = {tr[i]["i"] for i in range(len(tr))}
  seen_v = {va[i]["i"] for i in range(len(va))}
  assert not seen_t & seen_v and len(seen_t | seen_v) == 200 and len(seen_v) >= 4


def test_checkpoint_at_an_epoch_end_that_is_also_a_checkpoint_step(tmp_path):
  # 4 batches per epoch with checkpoint_every_steps=4: epoch ends and interval saves share
  # steps 4 and 8 (Orbax raised on the second save of a step); then a resumed run that stops
  # at once saves its restored step again.
  cfg = configs.get_config("cpu").replace(
      image_size=32, width=0.125, batch_size=4, synthetic_train=16, synthetic_val=8,
      use_dff=False, log_every_steps=4, eval_every_steps=0, decay_epoch=1, num_epochs=2,
      checkpoint_every_steps=4, weights=train.losses.LossWeights(photo=0.0, dff=0.0))
  srcs = (train.synthetic_pool(16, 40, seed=0, chunk=16),
          train.synthetic_pool(8, 40, seed=1, chunk=8))
  st = train.train_and_evaluate(cfg, str(tmp_path), sources_override=srcs, verbose=False)
  assert int(st.step) == 8
  again = train.train_and_evaluate(cfg, str(tmp_path), max_steps=8, sources_override=srcs,
                                   verbose=False)
  assert int(again.step) == 8
  # load_regressor restores only the parameters, equal to the trained ones
  fn = train.load_regressor(str(tmp_path))
  assert fn.image_size == 32
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 3)), jnp.float32)
  want = train.predict(st.params, x, net=train.make_network(cfg, mm.default_model()),
                       model=mm.default_model())
  np.testing.assert_allclose(fn(x).rotation, want.rotation, atol=2e-5)  # jit vs eager
  # the shipped-weights format round-trips (float16: close, not equal)
  path = str(tmp_path / "r.npz")
  train.save_params_npz(path, st.params, cfg)
  fn16 = train.load_regressor(path)
  assert fn16.config == cfg
  np.testing.assert_allclose(fn16(x).rotation, want.rotation, atol=2e-3)


def test_load_regressor_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    train.load_regressor(str(tmp_path))
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="bad.npz: not a dff3d regressor file"):
    train.load_regressor(str(bad))


def test_parse_weights():
  w = train.parse_weights(train.losses.LossWeights(), ["photo=0", "dff=0.5"])
  assert w.photo == 0 and w.dff == 0.5 and w.land == 400
  with pytest.raises(ValueError, match="'phot=1'"):
    train.parse_weights(w, ["phot=1"])


def test_ablation_rows_differ_only_in_their_terms_and_share_the_rest():
  from experiments import ablate
  shared = dict(init_params="shipped", learning_rate=3e-5, decayed_learning_rate=None,
                decay_epoch=1, land_error_start_epoch=0, aflw_pose_balance=True,
                box_scale_jitter=0.15, box_shift_jitter=0.12, box_jitter_prob=0.5)
  rows = {name: ablate.row_config(name, 0, 1, "p.npz", base_weights=["pose=100"], **shared)
          for name in ablate.ROWS}
  for cfg in rows.values():
    assert (cfg.init_params, cfg.learning_rate, cfg.decay_epoch, cfg.land_error_start_epoch,
            cfg.aflw_pose_balance, cfg.box_jitter_prob, cfg.weights.pose) == (
                "shipped", 3e-5, 1, 0, True, 0.5, 100)
    assert cfg.decayed_learning_rate == configs.get_config("real").decayed_learning_rate
  w = {name: cfg.weights for name, cfg in rows.items()}
  assert w["land"].photo == w["land"].dff == w["land"].land_error == 0
  assert w["photo"].photo > 0 and w["photo"].dff == 0
  assert w["dff"].dff > 0 and w["dff"].land_error == 0 and w["land_error"].land_error > 0
  assert rows["land_seed1"].seed == rows["land"].seed + 1
  assert rows["land_seed1"].replace(seed=rows["land"].seed) == rows["land"]
  assert rows["pts21"].aflw_labels == "pts21" and rows["land"].aflw_labels == "pseudo68"
  # Defaults: from scratch, decay and L_land_error after half the epochs.
  cfg = ablate.row_config("land_error", 2400, 4, "p.npz")
  assert (cfg.init_params, cfg.decay_epoch, cfg.land_error_start_epoch) == ("", 2, 2)
  with pytest.raises(ValueError, match="'pos=1'"):
    ablate.row_config("land", 0, 1, "p.npz", base_weights=["pos=1"])


# ---- real-data sources ------------------------------------------------------------------------
def test_aflw_sources_label_modes(tmp_path):
  names, *_ = test_aflw_3ddfa._write_layout(tmp_path)
  by_name = test_aflw_3ddfa._write_pseudo68(tmp_path, names)
  npz = str(tmp_path / "AFLW_GT_pseudo68.npz")
  tr, va = real.aflw_sources(str(tmp_path), npz, "pseudo68")
  assert len(tr) == 4 and len(va) == 2
  ex = tr[0]
  assert ex["landmark_set"] == "ibug68" and ex["landmarks"].shape == (68, 2)
  np.testing.assert_array_equal(ex["box_landmarks"], ex["landmarks"])
  v = va[0]  # validation keeps the 21 hand points, framed by the pseudo-68 box
  assert v["landmark_set"] == "aflw21" and v["landmarks"].shape == (21, 2)
  assert any(np.array_equal(v["box_landmarks"], p) for p, _ in by_name.values())
  tr21, _ = real.aflw_sources(str(tmp_path), "", "pts21")
  assert tr21[0]["landmark_set"] == "aflw21" and "box_landmarks" not in tr21[0]
  with pytest.raises(ValueError, match="needs the pseudo-68"):
    real.aflw_sources(str(tmp_path), "", "pseudo68")
  rows = pipeline.InputPipeline(tr, pipeline.eval_config(2, image_size=32))
  batch = next(rows.epoch(0))
  assert batch["landmarks"].shape == (2, 68, 2) and (batch["landmark_set"] == 0).all()


def test_pose_balanced_rows_fill_every_yaw_group_to_the_largest():
  yaw = np.array([5.0, -12.0, 29.9, 3.0, 0.0, 45.0, -31.0, 88.0, 120.0, 35.0, -61.0])
  # groups (|yaw|): 0-30 rows 0, 1, 2, 3, 4 | 30-60 rows 5, 6, 9 | 60+ rows 7, 8, 10
  rows = real.pose_balanced_rows(yaw, seed=3)
  assert rows.dtype == np.int64 and len(rows) == 15
  groups = np.searchsorted([30.0, 60.0], np.abs(yaw[rows]), side="right")
  np.testing.assert_array_equal(np.bincount(groups), [5, 5, 5])
  assert set(rows.tolist()) == set(range(11))  # every row kept
  counts = np.bincount(rows, minlength=11)
  assert counts[[0, 1, 2, 3, 4]].tolist() == [1] * 5  # the largest group is not repeated
  assert sorted(counts[[5, 6, 9]].tolist()) == [1, 2, 2]  # even repeats (5 = 3 + 2)
  np.testing.assert_array_equal(rows, real.pose_balanced_rows(yaw, seed=3))
  assert len(real.pose_balanced_rows(np.array([10.0, 20.0]))) == 2  # empty groups stay empty


def test_aflw_sources_pose_balance_repeats_turned_training_crops(tmp_path):
  test_aflw_3ddfa._write_layout(tmp_path)
  plain, val = real.aflw_sources(str(tmp_path))
  tr, val_b = real.aflw_sources(str(tmp_path), pose_balance=True)
  yaw = lambda src: np.array([src[i]["yaw_deg"] for i in range(len(src))])
  groups = np.bincount(np.searchsorted([30.0, 60.0], np.abs(yaw(tr)), side="right"))
  # the layout's 4 training crops: yaw -80, -48, -16, 16 -> groups 2, 1, 1 -> 2, 2, 2
  assert len(plain) == 4 and len(tr) == 6 and groups.tolist() == [2, 2, 2]
  assert sorted(set(yaw(tr).tolist())) == sorted(set(yaw(plain).tolist()))
  np.testing.assert_array_equal(yaw(val_b), yaw(val))  # validation untouched


def test_aflw2000_source_skips_a_broken_file(tmp_path):
  for i in range(2):
    ex = synthetic.generate(seed=5, index=i, size=64)
    io.write_image(tmp_path / f"image{i:05d}.jpg", ex["image"])
    pt3d = np.concatenate([ex["landmarks"] - 0.5, np.zeros((68, 1))], 1).T
    scipy.io.savemat(tmp_path / f"image{i:05d}.mat", {
        "pt3d_68": pt3d, "Pose_Para": np.array([[0.0, 0.7, 0.0, 0, 0, 0, 1.0]]),
        "pt2d": np.zeros((2, 23))})
  io.write_image(tmp_path / "image00009.jpg", np.zeros((8, 8, 3)))
  (tmp_path / "image00009.mat").write_bytes(b"garbage")
  src = real.Aflw2000Source(tmp_path)
  assert len(src) == 2 and len(src.failures) == 1 and "image00009.mat" in src.failures[0]
  ex = src[1]
  np.testing.assert_allclose(ex["landmarks"],
                             synthetic.generate(seed=5, index=1, size=64)["landmarks"],
                             atol=1e-4)
  assert ex["yaw_deg"] == pytest.approx(np.degrees(0.7), rel=1e-5)


def test_write_pseudo68_is_read_back_by_name(tmp_path, model):
  names, *_ = test_aflw_3ddfa._write_layout(tmp_path)
  out = tmp_path / "p68.npz"
  err = real.write_pseudo68(tmp_path, out, chunk=4)
  listing = aflw_3ddfa.load_aflw_3ddfa(tmp_path)
  p68, err2 = aflw_3ddfa.load_pseudo68(out, listing.names)
  assert p68.shape == (len(names), 68, 2) and np.all(np.isfinite(p68))
  np.testing.assert_array_equal(err, err2)
  assert not list(tmp_path.glob("*.tmp.npz"))  # written atomically


def test_pose_labels_reach_the_batch_and_the_pose_term(tmp_path, model):
  """with_pose: training crops carry their fit's rotation, the pipeline moves it with the
  augmentation, rows without a label weigh 0, and L_pose = ||R - R_hat||_F^2 pulls the
  network's rotation."""
  from dff3d import camera
  from dff3d import coefficients as coeffs_lib
  names, *_ = test_aflw_3ddfa._write_layout(tmp_path)
  p = coeffs_lib.size(model.sizes)
  flat = np.zeros((len(names), p), np.float32)
  angles = np.stack([np.zeros(len(names)), np.linspace(-1.0, 1.0, len(names)),
                     np.full(len(names), 0.1)], 1).astype(np.float32)
  flat[:, p - 33:p - 30] = angles  # the rotation field (before translation 3, lighting 27)
  test_aflw_3ddfa._write_pseudo68(tmp_path, names, order=range(len(names) - 1),
                                  overrides={"coefficients": flat[:-1]})  # last crop: none
  partial = tmp_path / "partial.npz"
  npz = str(tmp_path / aflw_3ddfa.PSEUDO68_FILE)
  os.replace(npz, partial)
  listing = aflw_3ddfa.load_aflw_3ddfa(tmp_path)
  rot = real.pose_labels(partial, listing.names, model)
  want = np.asarray(camera.rotation_matrix(jnp.asarray(angles)))
  row = {n: k for k, n in enumerate(names)}
  for k, n in enumerate(listing.names):
    if row[n] == len(names) - 1:
      assert np.isnan(rot[k]).all()
    else:
      np.testing.assert_allclose(rot[k], want[row[n]], atol=1e-6)
  test_aflw_3ddfa._write_pseudo68(tmp_path, names, overrides={"coefficients": flat})
  labelled, va = real.aflw_sources(str(tmp_path), npz, "pseudo68", with_pose=True)
  plain, _ = real.aflw_sources(str(tmp_path), npz, "pseudo68")
  assert all("rotation" in labelled[i] and "rotation" not in plain[i]
             for i in range(len(plain)))
  tr = sources.ConcatSource(labelled, plain)
  assert "rotation" not in va[0]
  with pytest.raises(ValueError, match="pose labels need"):
    real.aflw_sources(str(tmp_path), "", "pts21", with_pose=True)
  aug = augment.AugmentConfig(flip_prob=0.5, max_rotation_deg=30.0, colour_range=None)
  pipe = pipeline.InputPipeline(tr, pipeline.PipelineConfig(batch_size=len(tr), image_size=32,
                                                            augment=aug, shuffle=False))
  batch = next(pipe.epoch(0))
  for b in range(len(tr)):
    ex = tr[b]
    if "rotation" in ex:
      assert batch["rotation_weight"][b] == 1.0
      np.testing.assert_allclose(batch["rotation"][b],
                                 augment.transform_rotation(ex["rotation"], batch["affine"][b]),
                                 atol=1e-6)
    else:
      assert batch["rotation_weight"][b] == 0.0
      np.testing.assert_array_equal(batch["rotation"][b], np.eye(3))
  assert batch["rotation_weight"].sum() == len(plain)
  # The term: the untrained network predicts rotation 0, i.e. R = I.
  cfg, net, state, table = _untrained(model)
  cfg = cfg.replace(weights=cfg.weights.replace(pose=10.0))
  target = np.asarray(camera.rotation_matrix(jnp.asarray([[0.0, 0.5, 0.0], [0.0, 1.0, 0.0]])))
  host = {"image": jnp.zeros((2, 32, 32, 3)), "landmarks": jnp.full((2, 68, 2), 16.0),
          "landmarks_visible": jnp.ones((2, 68)), "landmark_set": jnp.zeros((2,), jnp.int32),
          "rotation": jnp.asarray(target), "rotation_weight": jnp.asarray([1.0, 0.0])}
  f = lambda params, bt: train.compute_losses(params, bt, net=net, model=model, table=table,
                                              config=cfg, point_error=state.point_error,
                                              land_error_on=jnp.float32(0.0))
  total, aux = f(state.params, host)
  assert float(aux["pose"]) == pytest.approx(4 * (1 - np.cos(0.5)) / 2, rel=1e-5)
  no_pose = {k: v for k, v in host.items() if k not in ("rotation", "rotation_weight")}
  total0, aux0 = f(state.params, no_pose)
  assert "pose" not in aux0
  assert float(total - total0) == pytest.approx(10.0 * float(aux["pose"]), rel=1e-4)
  grads = jax.grad(lambda prm: f(prm, host)[0] - f(prm, no_pose)[0])(state.params)
  bias = np.asarray(grads["head"]["dense"]["bias"])
  assert np.abs(bias[p - 33:p - 30]).max() > 0 and np.abs(bias[:p - 33]).max() == 0
