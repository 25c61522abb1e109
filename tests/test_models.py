"""Networks: VGG-16 regressor, light backbone, shared head, DFF encoder-decoder and sampling.

Small widths and inputs keep this file fast on a CPU: shapes come from jax.eval_shape, every
real forward / backward pass is jitted (eager Flax compiles op by op), and params are
initialised with an 'unsafe_rbg' key, whose init compiles several times faster on XLA:CPU
than threefry's (the values do not matter to these tests; the head's are zeros either way).
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dff3d import camera
from dff3d import coefficients as coeffs_lib
from dff3d import morphable_model as mm
from dff3d.models import dff, heads, light, vgg

SMALL_VGG = dict(width=0.125, fc_width=64)


@pytest.fixture(scope="module")
def model():
  return mm.default_model()


@pytest.fixture(scope="module")
def zero_vector(model):
  return np.asarray(coeffs_lib.concat(mm.zero_coefficients(model, 1)))[0]


def images(batch, size, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (batch, size, size, 3))


def init(net, x, seed=0):
  return jax.jit(net.init)(jax.random.key(seed, impl="unsafe_rbg"), x)


def shape_init(net, x):
  return jax.eval_shape(net.init, jax.random.PRNGKey(0), x)


# ---- regressors ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [64, 112])
def test_vgg_output_shape(model, size):
  net = vgg.make_regressor(model, "vgg16", **SMALL_VGG)
  x = images(2, size)
  out = jax.eval_shape(net.apply, shape_init(net, x), x)
  assert out.shape == (2, coeffs_lib.size(model.sizes))


def test_bfm_sizes_give_257_outputs():
  p = coeffs_lib.size(coeffs_lib.layout(80, 80, 64))
  assert p == 257
  net = vgg.VGG16Regressor(num_outputs=p, **SMALL_VGG)
  x = jnp.zeros((1, 64, 64, 3))
  assert jax.eval_shape(net.apply, shape_init(net, x), x).shape == (1, 257)


def test_light_output_shape(model):
  net = vgg.make_regressor(model, "light", width=0.25)
  x = images(2, 64)
  out = jax.eval_shape(net.apply, shape_init(net, x), x)
  assert out.shape == (2, coeffs_lib.size(model.sizes))
  assert isinstance(net, light.ResNet18Regressor)


@pytest.mark.parametrize("size,grid", [(64, 2), (96, 3), (100, 4)])
def test_flatten_pool_sees_the_grid_and_expand_head_keeps_the_function(model, size, grid):
  assert light.grid_size(size) == grid
  mean_net = vgg.make_regressor(model, "light", width=0.25)
  flat_net = vgg.make_regressor(model, "light", width=0.25, pool="flatten")
  x = images(2, size, seed=3)
  params = init(mean_net, x)["params"]
  kernel = params["head"]["dense"]["kernel"]  # zero at init: give the head a real function
  params["head"]["dense"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), kernel.shape)
  flat_shapes = shape_init(flat_net, x)["params"]
  assert flat_shapes["head"]["dense"]["kernel"].shape == (grid * grid * kernel.shape[0],
                                                          kernel.shape[1])
  expanded = light.expand_head(params, size)
  assert expanded["stem"] is params["stem"]
  a = np.asarray(jax.jit(mean_net.apply)({"params": params}, x))
  b = np.asarray(jax.jit(flat_net.apply)({"params": expanded}, x))
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4 * np.abs(a).max())
  # ... and the flattened head can tell where a feature is, which the mean cannot.
  k = np.asarray(expanded["head"]["dense"]["kernel"]).copy()
  k[: kernel.shape[0]] *= 3.0  # weight the top-left cell more
  expanded["head"]["dense"]["kernel"] = jnp.asarray(k)
  c = np.asarray(jax.jit(flat_net.apply)({"params": expanded}, x))
  assert np.abs(c - a).max() > 1e-3 * np.abs(a).max()


@pytest.mark.parametrize("pool", ["mean", "flatten"])
def test_widen_keeps_the_function_and_noise_lets_the_copies_part(model, pool):
  narrow = vgg.make_regressor(model, "light", width=0.25, pool=pool)
  wide = vgg.make_regressor(model, "light", width=0.5, pool=pool)
  x = images(2, 64, seed=4)
  params = init(narrow, x)["params"]
  kernel = params["head"]["dense"]["kernel"]  # zero at init: give the head a real function
  params["head"]["dense"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), kernel.shape)
  # Norm scales start at 1 (or 0): random ones make every copy's statistics matter.
  flat = traverse_util.flatten_dict(params)
  for i, path in enumerate(p for p in flat if p[-1] in ("scale", "bias")):
    flat[path] = jax.random.uniform(jax.random.PRNGKey(10 + i), flat[path].shape, minval=0.5)
  params = traverse_util.unflatten_dict(flat)
  widened = light.widen(params)
  shapes = lambda t: jax.tree_util.tree_map(np.shape, t)
  assert shapes(widened) == shapes(shape_init(wide, x)["params"])
  a = np.asarray(jax.jit(narrow.apply)({"params": params}, x))
  b = np.asarray(jax.jit(wide.apply)({"params": widened}, x))
  np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
  noisy = light.widen(params, jax.random.PRNGKey(2), noise=0.02)
  k = np.asarray(noisy["stage3_block1"]["conv1"]["kernel"])
  i = light.duplicate_index(k.shape[-1] // 2)
  first = np.flatnonzero(i == 0)  # the two copies of narrow channel 0
  assert len(first) == 2 and not np.allclose(k[..., first[0]], k[..., first[1]])
  c = np.asarray(jax.jit(wide.apply)({"params": noisy}, x))
  assert 0 < np.abs(c - a).max() < 0.1 * np.abs(a).max()
  with pytest.raises(ValueError, match="noise > 0 needs a key"):
    light.widen(params, noise=0.02)
  assert light.doubles(0.25) and light.doubles(0.5) and not light.doubles(0.3)  # 16 -> 40


def test_pool_option_is_checked(model):
  with pytest.raises(ValueError, match="vgg16 backbone has no pool option"):
    vgg.make_regressor(model, "vgg16", pool="flatten", **SMALL_VGG)
  net = vgg.make_regressor(model, "light", width=0.25, pool="max")
  with pytest.raises(ValueError, match="unknown pool 'max'"):
    shape_init(net, images(1, 32))


@pytest.mark.parametrize("backbone,kwargs", [("vgg16", SMALL_VGG), ("light", dict(width=0.25))])
def test_untrained_regressor_predicts_zero_coefficients(model, zero_vector, backbone, kwargs):
  net = vgg.make_regressor(model, backbone, **kwargs)
  x = images(3, 32, seed=1)
  out = np.asarray(jax.jit(net.apply)(init(net, x), x))
  np.testing.assert_array_equal(out, np.broadcast_to(zero_vector, out.shape))
  c = coeffs_lib.split(jnp.asarray(out), model.sizes)
  np.testing.assert_array_equal(c.rotation, 0.0)
  np.testing.assert_array_equal(c.identity, 0.0)
  np.testing.assert_array_equal(c.translation[0], [0.0, 0.0, -camera.DEFAULT_DISTANCE])


def test_output_scale_balances_translation(model):
  sizes = model.sizes
  scale = heads.output_scale(sizes)
  c = coeffs_lib.split(jnp.asarray(scale), sizes)
  np.testing.assert_array_equal(c.translation, 10.0)
  for name in ("identity", "albedo", "expression", "rotation", "lighting"):
    np.testing.assert_array_equal(getattr(c, name), 1.0)
  custom = coeffs_lib.split(jnp.asarray(heads.output_scale(sizes, {"translation": (1, 1, 10)})),
                            sizes)
  np.testing.assert_array_equal(custom.translation, [1.0, 1.0, 10.0])
  with pytest.raises(ValueError, match="unknown coefficient fields"):
    heads.output_scale(sizes, {"pose": 2.0})
  # A unit step of the head's dense bias moves translation by 10 and rotation by 1.
  head = heads.RegressorHead(len(scale), heads.as_tuple(heads.initial_bias(model)),
                             heads.as_tuple(scale))
  feats = jnp.ones((1, 4))
  params = init(head, feats)
  stepped = jax.tree_util.tree_map(lambda a: a, params)
  stepped["params"]["dense"]["bias"] = params["params"]["dense"]["bias"] + 1.0
  delta = coeffs_lib.split(head.apply(stepped, feats) - head.apply(params, feats), sizes)
  np.testing.assert_allclose(delta.translation, 10.0, rtol=1e-5)
  np.testing.assert_allclose(delta.rotation, 1.0, rtol=1e-5)


def test_vgg_layer_structure():
  net = vgg.VGG16Regressor(num_outputs=7, **SMALL_VGG)
  size = 64
  x = jnp.zeros((1, size, size, 3))
  params = shape_init(net, x)["params"]
  flat = traverse_util.flatten_dict(params, sep="/")
  kernels = {k[:-len("/kernel")]: v.shape for k, v in flat.items() if k.endswith("/kernel")}
  convs = [k for k, s in kernels.items() if len(s) == 4]
  dense = [k for k, s in kernels.items() if len(s) == 2]
  assert len(convs) == 13 and len(dense) == 3
  assert all(kernels[k][:2] == (3, 3) for k in convs)
  widths = vgg.conv_widths(SMALL_VGG["width"])
  assert sorted(convs) == sorted(f"conv{s + 1}_{i + 1}" for s, st in enumerate(widths)
                                 for i in range(len(st)))
  assert [kernels[f"conv{s + 1}_{i + 1}"][3] for s, st in enumerate(widths)
          for i in range(len(st))] == [c for st in widths for c in st]
  assert [c for st in vgg.conv_widths(1.0) for c in st] == [64, 64, 128, 128, 256, 256, 256,
                                                           512, 512, 512, 512, 512, 512]
  # Pools after conv 2, 4, 7, 10, 13: each stage runs at half the previous resolution and the
  # flattened fc6 input is (size / 32)^2 * channels.
  inter = jax.eval_shape(lambda p: net.apply(p, x, capture_intermediates=True,
                                             mutable=["intermediates"])[1],
                         {"params": params})["intermediates"]
  conv_index = 0
  for s, stage in enumerate(widths):
    for i in range(len(stage)):
      conv_index += 1
      out = inter[f"conv{s + 1}_{i + 1}"]["__call__"][0].shape
      assert out[1:3] == (size >> s, size >> s), (conv_index, out)
  assert kernels["fc6"] == ((size // 32) ** 2 * widths[-1][-1], SMALL_VGG["fc_width"])
  assert kernels["fc7"] == (SMALL_VGG["fc_width"], SMALL_VGG["fc_width"])
  assert kernels["head/dense"] == (SMALL_VGG["fc_width"], 7)


def test_full_vgg16_parameter_count():
  # The paper's network with a 257-output head: ImageNet VGG-16's 138,357,544 params minus its
  # 1000-way fc8 (4,097,000) plus a 257-way one (1,052,929).
  net = vgg.VGG16Regressor(num_outputs=257)
  assert heads.num_params(net, (1, 224, 224, 3)) == 138_357_544 - 4_097_000 + 1_052_929


def test_make_regressor_rejects_unknown_backbone(model):
  with pytest.raises(ValueError, match="unknown backbone"):
    vgg.make_regressor(model, "resnet152")


def test_group_counts_divide_channels():
  for c in (8, 16, 24, 40, 64, 136, 512):
    g = light.num_groups(c)
    assert c % g == 0 and g <= 32 and c // g >= 2


# ---- DFF ----------------------------------------------------------------------------------

SMALL_DFF = dict(width=8, levels=3, descriptor_dim=32)


@pytest.fixture(scope="module")
def small_dff():
  net = dff.DFFNet(**SMALL_DFF)
  return net, init(net, jnp.zeros((1, 32, 32, 3)))["params"]


@pytest.fixture(scope="module")
def dff_apply(small_dff):
  """One jitted forward of the small DFF, params as an argument (compiled once per shape)."""
  net, _ = small_dff
  return jax.jit(lambda params, x: net.apply({"params": params}, x))


def test_dff_shape_and_unit_descriptors(small_dff, dff_apply):
  _, params = small_dff
  out = dff_apply(params, jax.random.uniform(jax.random.PRNGKey(3), (2, 32, 24, 3)))
  assert out.shape == (2, 32, 24, 32)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=-1), 1.0, atol=1e-5)


def test_dff_default_maps_224_to_224x224x32():
  net = dff.DFFNet()
  x = jnp.zeros((1, 224, 224, 3))
  assert jax.eval_shape(net.apply, shape_init(net, x), x).shape == (1, 224, 224, 32)


def test_dff_rejects_indivisible_size(small_dff):
  net, params = small_dff
  with pytest.raises(ValueError, match="divisible by 8"):
    net.apply({"params": params}, jnp.zeros((1, 30, 32, 3)))


def test_l2_normalize_zero_vector_is_safe():
  x = jnp.array([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0]])
  np.testing.assert_allclose(dff.l2_normalize(x), [[0, 0, 0], [0.6, 0, 0.8]], atol=1e-7)
  g = jax.grad(lambda x: jnp.sum(dff.l2_normalize(x)))(x)
  assert np.all(np.isfinite(np.asarray(g)))


def test_dff_save_load_round_trip(tmp_path, small_dff, dff_apply):
  net, params = small_dff
  x = jax.random.uniform(jax.random.PRNGKey(4), (2, 32, 24, 3))
  ref = dff_apply(params, x)
  for dtype, atol in ((np.float32, 0.0), (np.float16, 2e-2)):
    path = tmp_path / f"dff_{np.dtype(dtype).name}.npz"
    dff.save_dff_params(path, {"params": params}, net, dtype=dtype)
    loaded_net, loaded = dff.load_dff(path)
    assert loaded_net == net
    flat, flat_loaded = (traverse_util.flatten_dict(p, sep="/") for p in (params, loaded))
    assert set(flat) == set(flat_loaded)
    for k, v in flat.items():
      assert flat_loaded[k].dtype == jnp.float32
      np.testing.assert_array_equal(flat_loaded[k],
                                    np.asarray(v).astype(dtype).astype(np.float32))
    np.testing.assert_allclose(dff_apply(loaded, x), ref, atol=atol, rtol=0)


def test_dff_load_errors_name_the_file(tmp_path, small_dff):
  net, params = small_dff
  with pytest.raises(dff.DFFFileError, match="not found"):
    dff.load_dff(tmp_path / "missing.npz")
  bad = tmp_path / "noconfig.npz"
  np.savez(bad, a=np.zeros(3))
  with pytest.raises(dff.DFFFileError, match="noconfig.npz.*__config__"):
    dff.load_dff(bad)
  wrong = tmp_path / "wrong.npz"
  dff.save_dff_params(wrong, params, dict(SMALL_DFF, levels=2, max_width=512, norm=True))
  with pytest.raises(dff.DFFFileError, match="wrong.npz.*do not match"):
    dff.load_dff(wrong)


def test_frozen_dff_has_no_params_and_passes_image_gradients(tmp_path, small_dff, dff_apply):
  net, params = small_dff
  path = tmp_path / "dff.npz"
  dff.save_dff_params(path, params, net, dtype=np.float32)
  frozen = dff.load_frozen_dff(path)
  assert list(inspect.signature(frozen).parameters) == ["images"]
  assert frozen.config == net.config()
  # The weights are constants of the traced function: its only input is the image.
  jaxpr = jax.make_jaxpr(frozen)(jnp.zeros((1, 8, 8, 3)))
  assert [v.aval.shape for v in jaxpr.jaxpr.invars] == [(1, 8, 8, 3)]
  x = images(1, 8, seed=5)
  target = jax.random.normal(jax.random.PRNGKey(6), (1, 8, 8, 32))
  value, g = jax.jit(jax.value_and_grad(lambda im: jnp.sum(frozen(im) * target)))(x)
  np.testing.assert_allclose(value, jnp.sum(dff_apply(params, x) * target), rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0
  # The explicit-argument form: differentiating w.r.t. the weights gives exact zeros.
  gp = jax.jit(jax.grad(lambda p: jnp.sum(dff.frozen_apply(net, p, x) * target)))(params)
  assert all(not np.any(np.asarray(a)) for a in jax.tree_util.tree_leaves(gp))


# ---- bilinear sampling --------------------------------------------------------------------

def np_bilinear(desc, points):
  b, h, w, _ = desc.shape
  out = np.zeros(points.shape[:2] + desc.shape[-1:])
  for n in range(b):
    for k, (x, y) in enumerate(points[n]):
      u = min(max(x - 0.5, 0.0), w - 1.0)
      v = min(max(y - 0.5, 0.0), h - 1.0)
      j0, i0 = int(np.floor(u)), int(np.floor(v))
      j1, i1 = min(j0 + 1, w - 1), min(i0 + 1, h - 1)
      a, c = u - j0, v - i0
      out[n, k] = ((1 - c) * ((1 - a) * desc[n, i0, j0] + a * desc[n, i0, j1])
                   + c * ((1 - a) * desc[n, i1, j0] + a * desc[n, i1, j1]))
  return out


def test_sample_descriptors_matches_numpy_reference():
  rng = np.random.default_rng(0)
  desc = rng.normal(size=(2, 5, 7, 4)).astype(np.float32)
  points = rng.uniform(-2.0, 9.0, size=(2, 40, 2)).astype(np.float32)  # some outside
  points[:, :3] = [[0.0, 0.0], [7.0, 5.0], [3.2, 5.0]]  # corner, far corner, bottom border
  out = dff.sample_descriptors(jnp.asarray(desc), jnp.asarray(points))
  np.testing.assert_allclose(out, np_bilinear(desc, points.astype(np.float64)), atol=1e-5)


def test_sample_descriptors_pixel_centres_are_exact():
  rng = np.random.default_rng(1)
  desc = rng.normal(size=(1, 4, 6, 3)).astype(np.float32)
  ii, jj = np.meshgrid(np.arange(4), np.arange(6), indexing="ij")
  points = np.stack([jj.ravel() + 0.5, ii.ravel() + 0.5], -1)[None].astype(np.float32)
  out = dff.sample_descriptors(jnp.asarray(desc), jnp.asarray(points))
  np.testing.assert_array_equal(out[0], desc[0, ii.ravel(), jj.ravel()])
  # Beyond the border the value is the border pixel's.
  out = dff.sample_descriptors(jnp.asarray(desc), jnp.array([[[-3.0, 0.5], [10.0, 9.0]]]))
  np.testing.assert_array_equal(out[0], desc[0, [0, 3], [0, 5]])


def test_sample_descriptors_gradient_spreads_bilinear_weights():
  desc = jnp.zeros((1, 3, 3, 2))
  points = jnp.array([[[1.0, 1.5]]])  # halfway between pixels (1, 0) and (1, 1)
  g = jax.grad(lambda d: jnp.sum(dff.sample_descriptors(d, points)))(desc)
  expected = np.zeros((1, 3, 3, 2))
  expected[0, 1, 0] = expected[0, 1, 1] = 0.5
  np.testing.assert_allclose(g, expected, atol=1e-7)


def test_frozen_dff_native_size_keeps_the_input_grid(tmp_path):
  net = dff.DFFNet(width=4, levels=2, descriptor_dim=8)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  path = tmp_path / "tiny.npz"
  dff.save_dff_params(path, params, net)
  fn = dff.load_frozen_dff(path, native_size=16)
  out = fn(jnp.full((2, 40, 40, 3), 0.5))
  assert out.shape == (2, 40, 40, 8)
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), 1.0, atol=1e-4)


def test_window_mask_covers_the_pixel_centres_inside_the_fractions():
  m = np.asarray(heads.window_mask(10, 20, (0.1, 0.2, 0.5, 1.0)))
  # columns whose centre (j + 0.5) / 20 lies in [0.1, 0.5]: 2..9; rows (i + 0.5) / 10 >= 0.2: 2..9
  want = np.zeros((10, 20), np.float32)
  want[2:, 2:10] = 1.0
  np.testing.assert_array_equal(m, want)
  x = jnp.ones((1, 4, 4, 3))
  assert heads.apply_window(x, ()) is x and heads.apply_window(x, None) is x
  for bad in [(0.5, 0.0, 0.4, 1.0), (0.0, 0.0, 1.0, 1.2), (0.1, 0.2, 0.3)]:
    with pytest.raises(ValueError, match="input window"):
      heads.check_window(bad)
  assert heads.check_window([0, 0.1, 1, 1]) == (0.0, 0.1, 1.0, 1.0)


@pytest.mark.parametrize("backbone,kwargs", [("light", dict(width=0.125)),
                                             ("vgg16", dict(width=0.125, fc_width=16))])
def test_input_window_hides_the_outside_and_keeps_the_parameters(model, backbone, kwargs):
  window = (0.25, 0.25, 0.75, 1.0)
  net = vgg.make_regressor(model, backbone, input_window=window, **kwargs)
  plain = vgg.make_regressor(model, backbone, **kwargs)
  key = jax.random.PRNGKey(0)
  params = plain.init(key, jnp.zeros((1, 32, 32, 3)))["params"]
  shapes = lambda t: jax.tree_util.tree_map(jnp.shape, t)
  assert shapes(net.init(key, jnp.zeros((1, 32, 32, 3)))["params"]) == shapes(params)
  # A trained-looking head so the output depends on the image.
  params["head"]["dense"]["kernel"] = 0.05 * jax.random.normal(
      jax.random.PRNGKey(1), params["head"]["dense"]["kernel"].shape)
  x = jax.random.uniform(jax.random.PRNGKey(2), (2, 32, 32, 3))
  outside = x.at[:, :, :8].set(0.3).at[:, :8].set(0.9)   # left quarter and top quarter changed
  inside = x.at[:, 12:20, 12:20].set(0.0)
  f = jax.jit(lambda p, im: net.apply({"params": p}, im))
  g = jax.jit(lambda p, im: plain.apply({"params": p}, im))
  np.testing.assert_array_equal(f(params, x), f(params, outside))
  assert not np.allclose(f(params, x), f(params, inside))
  assert not np.allclose(g(params, x), g(params, outside))   # the window is what hides it
  np.testing.assert_allclose(f(params, x), g(params, x * heads.window_mask(32, 32, window)
                                              [None, :, :, None]), rtol=1e-6, atol=1e-6)


def test_dff_widen_keeps_the_function_and_noise_lets_the_copies_part(small_dff):
  net, params = small_dff
  # Random norm scales / biases and output bias: every copy's statistics and input matter.
  flat = traverse_util.flatten_dict(params)
  for i, path in enumerate(p for p in flat if p[-1] in ("scale", "bias")):
    flat[path] = jax.random.uniform(jax.random.PRNGKey(20 + i), flat[path].shape, minval=0.5)
  params = traverse_util.unflatten_dict(flat)
  wide, widened = dff.widen(params, net)
  assert wide == dff.DFFNet(**dict(SMALL_DFF, width=16))
  x = jax.random.uniform(jax.random.PRNGKey(5), (2, 32, 32, 3))
  shapes = lambda t: jax.tree_util.tree_map(np.shape, t)
  assert shapes(widened) == shapes(shape_init(wide, x)["params"])
  a = np.asarray(net.apply({"params": params}, x))
  b = np.asarray(wide.apply({"params": widened}, x))
  np.testing.assert_allclose(b, a, atol=2e-5)
  _, noisy = dff.widen(params, net, jax.random.PRNGKey(2), noise=0.02)
  k = np.asarray(noisy["dec1"]["conv0"]["kernel"])  # reads concat(up, skip), both copied
  i = light.duplicate_index(k.shape[-1] // 2)
  first = np.flatnonzero(i == 0)
  assert len(first) == 2 and not np.allclose(k[..., first[0]], k[..., first[1]])
  c = np.asarray(wide.apply({"params": noisy}, x))
  cos = np.sum(a * c, -1)
  assert 0.9 < cos.mean() < 1.0 - 1e-7
  with pytest.raises(ValueError, match="max_width 32 caps"):
    dff.widen(params, net.clone(max_width=32))
