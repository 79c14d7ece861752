"""Encoder and predictor: positions, shapes, parameter counts, padding, StoP noise paths."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax import models
from stop_jax.models.layers import sincos_2d
from stop_jax.models.predictor import Predictor
from stop_jax.models.vit import VisionTransformer


def test_sincos_matches_hand_computed_entries():
  # grid h=2, w=3, dim 8: channels [sin(x w0), sin(x w1), cos(x w0), cos(x w1),
  # sin(y w0), sin(y w1), cos(y w0), cos(y w1)] with w_k = 1 / 10000^(k/2), token = y*3 + x.
  table = sincos_2d(2, 3, 8)
  assert table.shape == (6, 8)
  x, y = 2, 1  # token 5
  w1 = 1 / 100.0
  expected = [
    np.sin(x),
    np.sin(x * w1),
    np.cos(x),
    np.cos(x * w1),
    np.sin(y),
    np.sin(y * w1),
    np.cos(y),
    np.cos(y * w1),
  ]
  np.testing.assert_allclose(table[5], expected, rtol=1e-6, atol=1e-7)
  # Token 1 is (x=1, y=0): the first half moves along a row, the second half stays at y=0.
  np.testing.assert_allclose(table[1, 4:], [0, 0, 1, 1], atol=1e-7)
  assert table[1, 0] == pytest.approx(np.sin(1.0))


@pytest.mark.parametrize(
  'variant,patch,expected',
  [('base', 16, 85_646_592), ('huge', 14, 630_434_560)],
)
def test_exact_parameter_counts(variant, patch, expected):
  c = config_lib.base_config()
  c.model.variant, c.model.patch_size = variant, patch
  shapes = jax.eval_shape(
    models.build_encoder(c).init, jax.random.key(0), jnp.zeros((1, 224, 224, 3))
  )
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected


def test_every_official_variant_builds_with_its_width():
  c = config_lib.base_config()
  for name, (width, depth, heads, ratio) in config_lib.VIT_VARIANTS.items():
    c.model.variant = name
    enc = models.build_encoder(c)
    assert (enc.width, enc.depth, enc.num_heads) == (width, depth, heads)
    assert enc.mlp_dim == int(width * ratio)
  assert models.build_encoder(c).mlp_dim == 6144  # giant: 1408 * 48/11


def _small_encoder(**kw):
  return VisionTransformer(patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64, **kw)


@functools.cache
def _small_encoder_variables():
  """The small scanned encoder's variables, initialised once: they do not depend on the image
  size (the sin-cos positions are computed per call, not stored)."""
  return nn.unbox(_small_encoder().init(jax.random.key(1), jnp.zeros((1, 16, 16, 3))))


def test_non_square_image_and_keep_idx_shapes():
  enc = _small_encoder()
  images = jax.random.normal(jax.random.key(0), (2, 16, 24, 3))
  params = _small_encoder_variables()
  assert enc.apply(params, images).shape == (2, 24, 32)  # 4 x 6 grid
  idx = jnp.array([[0, 5, 23], [1, 2, 3]])
  assert enc.apply(params, images, idx).shape == (2, 3, 32)
  out, blocks = enc.apply(params, images, return_blocks=True)
  assert blocks.shape == (2, 2, 24, 32)
  np.testing.assert_allclose(blocks[-1], out, atol=1e-6)
  with pytest.raises(ValueError, match='not divisible by patch_size=4'):
    enc.apply(params, jnp.zeros((1, 18, 24, 3)))


def test_padding_is_invisible_to_valid_tokens():
  enc = _small_encoder()
  images = jax.random.normal(jax.random.key(0), (1, 16, 16, 3))
  params = _small_encoder_variables()
  idx = jnp.array([[0, 3, 7, 9]])
  ref = enc.apply(params, images, idx)
  padded = jnp.array([[0, 3, 7, 9, 0, 0]])  # two padded slots copying a valid index
  valid = jnp.array([[True, True, True, True, False, False]])
  out = enc.apply(params, images, padded, valid)
  np.testing.assert_allclose(out[:, :4], ref, atol=1e-5)


def test_scan_and_unrolled_blocks_compute_the_same_function():
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  scan, loop = _small_encoder(scan_blocks=True), _small_encoder(scan_blocks=False)
  p_scan = _small_encoder_variables()['params']
  layers = p_scan['blocks']['layers']
  p_loop = dict(p_scan)
  p_loop['blocks'] = {f'layers_{i}': jax.tree.map(lambda x, i=i: x[i], layers) for i in range(2)}
  np.testing.assert_allclose(
    scan.apply({'params': p_scan}, images), loop.apply({'params': p_loop}, images), atol=1e-5
  )


def test_official_init_statistics():
  c = config_lib.base_config()
  params = nn.unbox(models.build_encoder(c).init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  p = params['params']
  qkv = np.asarray(p['blocks']['layers']['attn']['qkv']['kernel'])
  assert qkv.std() == pytest.approx(0.02, rel=0.02)  # untruncated N(0, 0.02^2) as official
  assert np.all(np.asarray(p['blocks']['layers']['attn']['qkv']['bias']) == 0)
  assert np.all(np.asarray(p['norm']['scale']) == 1)


# ---- predictor and StoP ------------------------------------------------------------------


def _predictor(mode='masked', sigma=0.5, **kw):
  return Predictor(
    grid=(4, 4),
    encoder_width=32,
    width=16,
    depth=1,
    num_heads=2,
    mlp_dim=32,
    stop_mode=mode,
    sigma=sigma,
    **kw,
  )


CTX_IDX = jnp.array([[0, 1, 2, 4, 5], [8, 9, 10, 12, 13]])
TGT_IDX = jnp.array([[[10, 11], [2, 3]], [[14, 15], [6, 7]]])  # [n=2, B=2, Kt=2]


@functools.cache
def _init(mode='masked', **kw):
  """The predictor's params, initialised once per mode and fields: they depend on neither sigma
  (the noise comes from the 'stop' stream) nor the values of the context features."""
  variables = _predictor(mode, **kw).init(
    {'params': jax.random.key(0), 'stop': jax.random.key(1)}, CTX, CTX_IDX, TGT_IDX
  )
  return nn.unbox(variables['params'])


def _run(pred, params, ctx, key, **kw):
  return pred.apply({'params': params}, ctx, CTX_IDX, TGT_IDX, rngs={'stop': key}, **kw)


CTX = jax.random.normal(jax.random.key(9), (2, 5, 32))


def test_a_is_the_predictor_input_dense_in_its_param_tree():
  params = _init()
  assert params['predictor_embed']['kernel'].shape == (32, 16)  # d_e -> d_p
  assert 'bias' in params['predictor_embed']
  assert 'mask_token' not in params  # the bias of A plays the mask token's role
  assert 'mask_token' in _init('off')


def test_sigma_zero_is_deterministic_and_sigma_positive_is_key_dependent_and_reproducible():
  p0 = _predictor(sigma=0.0)
  params = _init()
  np.testing.assert_array_equal(
    _run(p0, params, CTX, jax.random.key(1)), _run(p0, params, CTX, jax.random.key(2))
  )
  p = _predictor(sigma=0.5)
  a, b = _run(p, params, CTX, jax.random.key(1)), _run(p, params, CTX, jax.random.key(2))
  assert float(jnp.abs(a - b).max()) > 1e-3
  np.testing.assert_array_equal(a, _run(p, params, CTX, jax.random.key(1)))
  # deterministic=True switches the noise off and needs no key.
  det = p.apply({'params': params}, CTX, CTX_IDX, TGT_IDX, deterministic=True)
  np.testing.assert_allclose(det, _run(p0, params, CTX, jax.random.key(1)), atol=1e-6)


def test_predictor_padding_is_invisible_to_valid_tokens():
  pred = _predictor()
  params = _init()
  ref = pred.apply({'params': params}, CTX, CTX_IDX, TGT_IDX, deterministic=True)
  # Two padded context slots and one padded slot per target block, copying valid indices.
  ctx = jnp.concatenate([CTX, CTX[:, :2]], axis=1)  # [B, 7, d_e]
  ctx_idx = jnp.concatenate([CTX_IDX, CTX_IDX[:, :2]], axis=1)
  ctx_valid = jnp.broadcast_to(jnp.arange(7) < 5, (2, 7))
  tgt_idx = jnp.concatenate([TGT_IDX, TGT_IDX[..., :1]], axis=-1)  # [n, B, 3]
  tgt_valid = jnp.broadcast_to(jnp.arange(3) < 2, (2, 2, 3))
  out = pred.apply(
    {'params': params}, ctx, ctx_idx, tgt_idx, ctx_valid, tgt_valid, deterministic=True
  )
  assert out.shape == (2, 2, 3, 32)
  np.testing.assert_allclose(out[..., :2, :], ref, atol=1e-5)


def _embed_calls(mode, key):
  """The outputs of the two calls of A: (context tokens, masked tokens or None)."""
  pred = _predictor(mode)
  params = _init(mode)
  _, state = _run(pred, params, CTX, key, capture_intermediates=True)
  outs = state['intermediates']['predictor_embed']['__call__']
  return outs[0], (outs[1] if len(outs) > 1 else None)


@pytest.mark.parametrize(
  'mode,ctx_noisy,masked_noisy',
  [('masked', False, True), ('context', True, False), ('both', True, True)],
)
def test_noise_reaches_only_the_tokens_the_mode_says(mode, ctx_noisy, masked_noisy):
  c1, m1 = _embed_calls(mode, jax.random.key(1))
  c2, m2 = _embed_calls(mode, jax.random.key(2))
  assert (float(jnp.abs(c1 - c2).max()) > 1e-4) == ctx_noisy
  if m1 is not None:
    assert (float(jnp.abs(m1 - m2).max()) > 1e-4) == masked_noisy
  else:
    assert not masked_noisy


def test_gradient_wrt_a_gets_a_contribution_from_the_noise_path():
  # With all-zero context features the context path A s contributes nothing to dL/dA, so
  # any gradient on A's kernel comes through the noise tokens A n.
  zeros = jnp.zeros_like(CTX)

  def grad_a(sigma):
    pred = _predictor(sigma=sigma)
    params = _init()
    loss = lambda p: jnp.sum(_run(pred, p, zeros, jax.random.key(3)) ** 2)  # noqa: E731
    return jax.grad(loss)(params)['predictor_embed']['kernel']

  assert float(jnp.abs(grad_a(0.5)).max()) > 1e-6
  np.testing.assert_array_equal(grad_a(0.0), 0.0)


def test_untied_and_fixed_cov_modes_have_their_own_noise():
  params = _init('untied')
  assert params['noise_proj']['kernel'].shape == (32, 16)
  for mode in ('untied', 'fixed_cov'):
    pred = _predictor(mode)
    params = _init(mode)
    a, b = _run(pred, params, CTX, jax.random.key(1)), _run(pred, params, CTX, jax.random.key(2))
    assert float(jnp.abs(a - b).max()) > 1e-4, mode


def test_learned_positions_are_a_parameter():
  params = _init('off', pos_embed='learned')
  assert params['predictor_pos_embed'].shape == (16, 16)


def test_learned_position_table_is_the_one_the_predictor_uses():
  pred = _predictor('off', pos_embed='learned')
  params = _init('off', pos_embed='learned')
  out = lambda p: pred.apply({'params': p}, CTX, CTX_IDX, TGT_IDX, deterministic=True)  # noqa: E731
  # With the sin-cos table put into the learned slot, it computes the sin-cos predictor.
  sincos = _predictor('off').apply(
    {'params': {k: v for k, v in params.items() if k != 'predictor_pos_embed'}},
    CTX,
    CTX_IDX,
    TGT_IDX,
    deterministic=True,
  )
  table = jnp.asarray(sincos_2d(4, 4, 16))
  np.testing.assert_allclose(out({**params, 'predictor_pos_embed': table}), sincos, atol=1e-5)
  assert float(jnp.abs(out(params) - sincos).max()) > 1e-3
  grad = jax.grad(lambda p: jnp.sum(out(p) ** 2))(params)['predictor_pos_embed']
  assert float(jnp.abs(grad).max()) > 0


def _noise_and_ratio(mode):
  """The noise our predictor drew and its noise-to-position stat, for one key."""
  pred = _predictor(mode)
  params = _init(mode)
  _, state = _run(pred, params, CTX, jax.random.key(4), mutable=['intermediates', 'stats'])
  return params, state['intermediates']['noise'][0], float(state['stats']['noise_to_pos'])


def test_untied_noise_goes_through_its_own_matrix_and_fixed_cov_is_drawn_at_d_p():
  psi = jnp.take(jnp.asarray(sincos_2d(4, 4, 16)), TGT_IDX, axis=0)
  rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.sum(jnp.square(x), -1))))  # noqa: E731
  params, noise, _ = _noise_and_ratio('untied')
  assert noise.shape == (2, 2, 2, 32)  # n_j at d_e
  # The noise reaches the masked tokens through A' only: with A' = 0 the predictor is the
  # noiseless one, whatever A is (a predictor that reused A would still be noisy).
  pred = _predictor('untied')
  zero = {**params, 'noise_proj': {'kernel': jnp.zeros_like(params['noise_proj']['kernel'])}}
  quiet = pred.apply({'params': zero}, CTX, CTX_IDX, TGT_IDX, deterministic=True)
  np.testing.assert_allclose(_run(pred, zero, CTX, jax.random.key(4)), quiet, atol=1e-6)
  assert float(jnp.abs(_run(pred, params, CTX, jax.random.key(4)) - quiet).max()) > 1e-4
  _, noise, ratio = _noise_and_ratio('fixed_cov')
  assert noise.shape == (2, 2, 2, 16)  # e_j at d_p, added without any matrix
  assert ratio == pytest.approx(rms(noise) / rms(psi), rel=1e-5)


def test_noise_to_position_ratio_scales_with_sigma():
  ratios = []
  for sigma in (0.25, 1.0):
    pred = _predictor(sigma=sigma)
    params = _init()
    _, state = _run(pred, params, CTX, jax.random.key(1), mutable=['stats'])
    ratios.append(float(state['stats']['noise_to_pos']))
  assert ratios[1] == pytest.approx(4 * ratios[0], rel=0.15)


def test_bf16_compute_keeps_float32_params():
  pred = _predictor(dtype=jnp.bfloat16)
  params = _init(dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert _run(pred, params, CTX, jax.random.key(1)).dtype == jnp.bfloat16


def test_modules_take_plain_fields_not_configs():
  for cls in (VisionTransformer, Predictor):
    for f in cls.__dataclass_fields__.values():
      assert 'ConfigDict' not in str(f.type), (cls, f.name)
  assert issubclass(Predictor, nn.Module)


def test_exact_gelu_is_pytorchs_and_tanh_is_the_approximation():
  import torch

  from stop_jax.models import layers

  x = np.linspace(-8, 8, 4001, dtype=np.float32)
  exact = np.asarray(layers.gelu_fn('exact')(jnp.asarray(x)))
  np.testing.assert_allclose(
    exact, torch.nn.functional.gelu(torch.from_numpy(x)).numpy(), atol=2e-6
  )
  # The same function as jax.nn.gelu's erfc form, value and derivative.
  np.testing.assert_allclose(exact, jax.nn.gelu(x, approximate=False), atol=2e-6)
  grad = jax.vmap(jax.grad(layers.gelu_fn('exact')))(jnp.asarray(x))
  ref = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(jnp.asarray(x))
  np.testing.assert_allclose(grad, ref, atol=2e-6)
  # tanh differs from exact by up to ~5e-4: a test this tight tells the two apart.
  tanh = np.asarray(layers.gelu_fn('tanh')(jnp.asarray(x)))
  assert np.abs(tanh - exact).max() > 1e-4


def test_dense_multiplies_a_flat_view_on_cpu_and_computes_nn_dense():
  from stop_jax.models import layers

  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 8))  # [B, n, N, D_in]: leading axes kept
  ours = layers.dense(16, ('embed', 'mlp'), jnp.float32, 'fc')
  ref = nn.Dense(16, kernel_init=layers.INIT, name='fc')
  params = nn.unbox(ours.init(jax.random.key(1), x))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref.init(jax.random.key(1), x))
  loss = lambda m: lambda p, v: jnp.sum(jnp.sin(m.apply(p, v)))  # noqa: E731
  y, y_ref = ours.apply(params, x), ref.apply(params, x)
  assert y.shape == (2, 3, 5, 16)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  g, g_ref = jax.grad(loss(ours), (0, 1))(params, x), jax.grad(loss(ref), (0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, g_ref)
  # On CPU the matmul is the 2-D one (the point of it); the gradient's dots are 2-D as well.
  jaxpr = str(jax.make_jaxpr(jax.grad(loss(ours), (0, 1)))(params, x))
  dots = re.findall(r'f32\[([\d,]+)\] = dot_general', jaxpr)
  assert len(dots) == 3 and all(d.count(',') == 1 for d in dots), jaxpr  # y, dW, dx: all 2-D
  # A contraction that is not a Dense's is passed through unchanged.
  a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
  dims = (((2,), (1,)), ((0,), (0,)))
  np.testing.assert_array_equal(
    layers.flat_dot_general(a, b, dims), jax.lax.dot_general(a, b, dims)
  )
