"""Official-checkpoint import: parity with PyTorch modules laid out as the official code.

The torch modules of `reference.official_torch` are written from the official layout (I-JEPA
`vision_transformer.py` and the StoP predictor, which adds `predictor_embed(noise)` to the masked
tokens' positions and no mask token); they get random weights, are saved as an official-style
checkpoint, converted, and must agree with our models to 1e-4 relative.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax import models
from stop_jax.eval import converted
from stop_jax.tools import convert, official_layout

torch = pytest.importorskip('torch')
from reference.official_torch import official_modules  # noqa: E402 (needs torch)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- helpers -----------------------------------------------------------------------------------


def make_config(**model):
  """A small config; keyword args override model.* (and pred_* the predictor)."""
  c = config_lib.base_config()
  c.model.variant = 'tiny'
  c.model.width, c.model.depth, c.model.num_heads = 64, 2, 4
  c.model.patch_size, c.model.image_size = 4, 32
  c.predictor.width, c.predictor.depth, c.predictor.num_heads = 32, 2, 4
  c.loss.num_target_layers = 1
  for k, v in model.items():
    if k.startswith('pred_'):
      c.predictor[k[5:]] = v
    elif k == 'stop_mode':
      c.stop.mode = v
    else:
      c.model[k] = v
  return config_lib.lock(c)


def torch_models(config, seed=0):
  torch.manual_seed(seed)
  mods = official_modules(config)
  with torch.no_grad():
    for mod in mods.values():
      for name, w in mod.named_parameters():
        # Random LayerNorm scales, biases and mask token, so that every tensor matters.
        if name.endswith('norm1.weight') or name.endswith('norm2.weight') or 'norm.weight' in name:
          w.copy_(1 + 0.2 * torch.randn_like(w))
        elif name.endswith('bias') or name == 'mask_token':
          w.copy_(0.2 * torch.randn_like(w))
  return mods


def save_official(path, mods, prefix=''):
  ckpt = {k: {prefix + n: t for n, t in m.state_dict().items()} for k, m in mods.items()}
  ckpt.update(opt={'state': {}, 'param_groups': [{'lr': 1e-3}]}, epoch=300, loss=0.5, lr=1e-3)
  torch.save(ckpt, path)


def state_dicts(mods, prefix=''):
  return {k: {prefix + n: t.numpy() for n, t in m.state_dict().items()} for k, m in mods.items()}


def assert_rel_close(ours, theirs, tol=1e-4):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape
  err = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
  assert err < tol, f'max relative error {err:.3g} >= {tol}'


def inputs(config, batch=2, n_tgt=3, k_ctx=10, k_tgt=5, seed=0):
  rng = np.random.default_rng(seed)
  s, n = config.model.image_size, (config.model.image_size // config.model.patch_size) ** 2
  images = rng.normal(size=(batch, s, s, 3)).astype(np.float32)
  ctx = np.sort(np.stack([rng.choice(n, k_ctx, replace=False) for _ in range(batch)]), axis=1)
  tgt = np.sort(
    np.stack([[rng.choice(n, k_tgt, replace=False) for _ in range(batch)] for _ in range(n_tgt)]),
    axis=-1,
  )
  return images, ctx, tgt


def check_parity(config, params, mods, stop: bool):
  """Encoders (full and context subset) and predictor (noise off / injected) vs torch."""
  images, ctx, tgt = inputs(config)
  t_images = torch.from_numpy(images).permute(0, 3, 1, 2)  # NHWC -> NCHW
  t_ctx, t_tgt = torch.from_numpy(ctx), [torch.from_numpy(m) for m in tgt]
  encoder, predictor = models.build_encoder(config), models.build_predictor(config)
  with torch.no_grad():
    for part in ('encoder', 'target_encoder'):
      full = encoder.apply({'params': params[part]}, jnp.asarray(images))
      assert_rel_close(full, mods[part](t_images).numpy())
    feats = encoder.apply({'params': params['encoder']}, jnp.asarray(images), jnp.asarray(ctx))
    t_feats = mods['encoder'](t_images, [t_ctx])
    assert_rel_close(feats, t_feats.numpy())

    pvars = {'params': params['predictor']}
    t_feats = torch.from_numpy(np.array(feats))  # same input to both predictors
    det = predictor.apply(pvars, feats, jnp.asarray(ctx), jnp.asarray(tgt), deterministic=True)
    n, b, kt = tgt.shape
    zeros = torch.zeros(n, b, kt, feats.shape[-1]) if stop else None
    expect = mods['predictor'](t_feats, [t_ctx], t_tgt, noise=zeros).reshape(n, b, kt, -1)
    assert_rel_close(det, expect.numpy())
    if stop:
      pred, state = predictor.apply(
        pvars,
        feats,
        jnp.asarray(ctx),
        jnp.asarray(tgt),
        rngs={'stop': jax.random.key(3)},
        mutable=['intermediates', 'stats'],
      )
      noise = np.asarray(state['intermediates']['noise'][0])  # [n, B, Kt, d_e], times sigma
      assert noise.shape == (n, b, kt, feats.shape[-1]) and np.std(noise) > 0.1
      expect = mods['predictor'](t_feats, [t_ctx], t_tgt, noise=torch.from_numpy(noise.copy()))
      assert_rel_close(pred, expect.reshape(n, b, kt, -1).numpy())
      # The noise must change the output, or the check above proves nothing about it.
      assert np.max(np.abs(np.asarray(pred) - np.asarray(det))) > 1e-2 * np.max(np.abs(det))


# ---- tests -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stop_checkpoint_parity_scanned_with_ddp_prefix(tmp_path, caplog):
  config = make_config(scan_blocks=True)
  mods = torch_models(config)
  path = str(tmp_path / 'stop.pth.tar')
  save_official(path, mods, prefix='module.')
  sds, extra = convert.read_torch_checkpoint(path)
  assert set(sds) == set(convert.PARTS) and extra['epoch'] == 300
  assert all(k.startswith('module.') for k in sds['encoder'])
  with caplog.at_level(logging.WARNING):
    params = convert.convert_state_dicts(sds, config)
  # StoP: the bias of A is the mask token; the checkpoint's unused mask_token is dropped, loudly.
  assert 'mask_token' not in params['predictor']
  assert any("dropping the checkpoint's mask_token" in r.getMessage() for r in caplog.records)
  assert params['encoder']['blocks']['layers']['attn']['qkv']['kernel'].shape == (2, 64, 192)
  check_parity(config, params, mods, stop=True)


@pytest.mark.slow
def test_ijepa_checkpoint_parity_patch14_unrolled_no_prefix(tmp_path):
  config = make_config(patch_size=14, image_size=56, scan_blocks=False, stop_mode='off')
  mods = torch_models(config, seed=1)
  path = str(tmp_path / 'ijepa.pth.tar')
  save_official(path, mods)
  params = convert.convert_state_dicts(convert.read_torch_checkpoint(path)[0], config)
  assert params['encoder']['patch_embed']['kernel'].shape == (14, 14, 3, 64)
  # I-JEPA adds its mask token: mode 'off' keeps it.
  np.testing.assert_array_equal(
    params['predictor']['mask_token'].reshape(-1),
    mods['predictor'].mask_token.detach().numpy()[0, 0],
  )
  check_parity(config, params, mods, stop=False)


def test_ddp_prefix_is_stripped():
  config = make_config()
  mods = torch_models(config)
  plain = convert.convert_state_dicts(state_dicts(mods), config)
  prefixed = convert.convert_state_dicts(state_dicts(mods, prefix='module.'), config)
  jax.tree.map(np.testing.assert_array_equal, plain, prefixed)
  assert convert.strip_ddp_prefix({'module.a': 1, 'b': 2}) == {'a': 1, 'b': 2}
  with pytest.raises(convert.ConversionError, match="'a' appears both"):
    convert.strip_ddp_prefix({'module.a': 1, 'a': 2})


def test_wrong_width_lists_mismatched_shapes():
  sds = state_dicts(torch_models(make_config()))
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_state_dicts({'encoder': sds['encoder']}, make_config(width=128))
  msg = str(e.value)
  assert 'patch_embed.proj.weight: checkpoint [64, 3, 4, 4], config expects [128, 3, 4, 4]' in msg
  assert 'blocks.{0-1}.attn.qkv.weight: checkpoint [192, 64], config expects [384, 128]' in msg
  assert 'checkpoint: width 64, depth 2, patch 4' in msg and 'config:     width 128' in msg


def test_wrong_depth_lists_missing_and_unknown_keys():
  sds = state_dicts(torch_models(make_config()))
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_state_dicts({'target_encoder': sds['target_encoder']}, make_config(depth=3))
  msg = str(e.value)
  assert msg.startswith('target_encoder: the checkpoint does not match the config.')
  assert 'missing from the checkpoint:\n    blocks.{2}.attn.proj.bias [64]' in msg
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_state_dicts({'predictor': sds['predictor']}, make_config(pred_depth=1))
  assert 'not in the config:\n    predictor_blocks.{1}.attn.proj.bias [32]' in str(e.value)


def test_unknown_and_missing_keys_are_listed():
  sd = state_dicts(torch_models(make_config()))['encoder']
  sd['head.weight'] = np.zeros((10, 64), np.float32)
  del sd['norm.bias']
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_state_dicts({'encoder': sd}, make_config())
  assert 'head.weight [10, 64]' in str(e.value) and 'norm.bias [64]' in str(e.value)
  with pytest.raises(convert.ConversionError, match="parts \\['decoder'\\] are not allowed"):
    convert.convert_state_dicts({'decoder': sd}, make_config())


def test_pos_embed_mismatch_warns_and_learned_pos_is_mapped(caplog):
  config = make_config()
  sds = state_dicts(torch_models(config))
  sds['encoder']['pos_embed'] = sds['encoder']['pos_embed'] + 0.01
  with caplog.at_level(logging.WARNING):
    convert.convert_state_dicts({'encoder': sds['encoder']}, config)
  assert any(
    'pos_embed differs from our fixed 2D sin-cos' in r.getMessage() for r in caplog.records
  )
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    convert.convert_state_dicts({'encoder': state_dicts(torch_models(config))['encoder']}, config)
  assert not any('pos_embed' in r.getMessage() for r in caplog.records)
  learned = make_config(pred_pos_embed='learned')
  params = convert.convert_state_dicts({'predictor': sds['predictor']}, learned)
  np.testing.assert_array_equal(
    params['predictor']['predictor_pos_embed'], sds['predictor']['predictor_pos_embed'][0]
  )


def test_official_reference_draws_stop_noise_and_checkpointing_recomputes_exactly():
  """The two switches bench/torch_reference.py relies on, beyond what the parity tests cover."""
  config = make_config()
  plain = torch_models(config)
  torch.manual_seed(1)
  stop = official_modules(config, sigma=0.25, checkpoint=True)
  for part, mod in stop.items():
    mod.load_state_dict(plain[part].state_dict())
  images, ctx, tgt = inputs(config)
  t_images = torch.from_numpy(images).permute(0, 3, 1, 2)
  t_ctx, t_tgt = [torch.from_numpy(ctx)], [torch.from_numpy(m) for m in tgt]
  embedded = []  # every input of the tied Linear: the context features, then each block's noise
  hook = stop['predictor'].predictor_embed.register_forward_pre_hook(
    lambda _, args: embedded.append(args[0])
  )
  with torch.no_grad():
    feats = plain['encoder'](t_images, t_ctx)
    masked = plain['predictor'](feats, t_ctx, t_tgt)  # sigma None: the mask token
    torch.manual_seed(5)
    drawn = stop['predictor'](feats, t_ctx, t_tgt)
    noise = torch.cat(embedded[1:])  # [n * B, Kt, De]
    torch.manual_seed(5)
    again = stop['predictor'](feats, t_ctx, t_tgt)
    torch.manual_seed(6)
    other = stop['predictor'](feats, t_ctx, t_tgt)
    zeros = [torch.zeros(m.shape + (feats.shape[-1],)) for m in t_tgt]
    given = stop['predictor'](feats, t_ctx, t_tgt, noise=zeros)
  hook.remove()
  # sigma is a standard deviation, drawn in the encoder's width for each target token.
  assert noise.shape == (len(tgt) * tgt.shape[1], tgt.shape[2], feats.shape[-1])
  assert abs(noise.std().item() - 0.25) < 0.02 and abs(noise.mean().item()) < 0.02
  np.testing.assert_array_equal(drawn.numpy(), again.numpy())  # torch's seed decides the noise
  assert not torch.allclose(drawn, other, atol=1e-3)
  assert not torch.allclose(drawn, given, atol=1e-3)  # sigma draws noise when none is given
  assert not torch.allclose(masked, given, atol=1e-3)  # the random mask token is used only then
  with pytest.raises(ValueError, match='one context mask'):
    stop['predictor'](feats, t_ctx * 2, t_tgt)

  # StoP's checkpointed blocks run attn and mlp again in the backward, and compute the same
  # forward: same output, same gradients everywhere.
  outs, grads, attn_calls = {}, {}, {}
  for name, mods in (('plain', plain), ('checkpointed', stop)):
    calls = []
    counter = (
      mods['predictor']
      .predictor_blocks[0]
      .attn.register_forward_hook(lambda *_, calls=calls: calls.append(1))
    )
    for mod in mods.values():
      mod.zero_grad()
    out = mods['predictor'](mods['encoder'](t_images, t_ctx), t_ctx, t_tgt, noise=zeros)
    out.square().mean().backward()
    counter.remove()
    outs[name], attn_calls[name] = out.detach(), len(calls)
    grads[name] = {
      f'{part}.{n}': t.grad.clone()
      for part in ('encoder', 'predictor')
      for n, t in mods[part].named_parameters()
      if t.grad is not None
    }
  assert attn_calls == {'plain': 1, 'checkpointed': 2}
  torch.testing.assert_close(outs['checkpointed'], outs['plain'], rtol=1e-6, atol=1e-7)
  assert grads['plain'].keys() == grads['checkpointed'].keys()
  assert any(k.startswith('predictor.') for k in grads['plain']) and len(grads['plain']) > 20
  for n, g in grads['plain'].items():
    torch.testing.assert_close(grads['checkpointed'][n], g, rtol=1e-5, atol=1e-7)


def test_untied_mode_names_its_extra_projection():
  sds = state_dicts(torch_models(make_config()))
  with pytest.raises(convert.ConversionError, match="(?s)noise_proj.weight.*'untied'"):
    convert.convert_state_dicts({'predictor': sds['predictor']}, make_config(stop_mode='untied'))


class NotATensor:
  pass


def test_read_rejects_files_that_are_not_official_checkpoints(tmp_path):
  mods = torch_models(make_config())
  bare = str(tmp_path / 'bare.pth')
  torch.save(mods['encoder'].state_dict(), bare)
  with pytest.raises(convert.ConversionError, match=r"lacks .*top-level keys \['blocks.0"):
    convert.read_torch_checkpoint(bare)
  only_target = str(tmp_path / 'target.pth')
  torch.save({'target_encoder': mods['target_encoder'].state_dict(), 'epoch': 3}, only_target)
  sds, extra = convert.read_torch_checkpoint(only_target)  # every part it has
  assert list(sds) == ['target_encoder'] and extra == {'epoch': 3}
  with pytest.raises(convert.ConversionError, match=r"lacks \['predictor'\]"):
    convert.read_torch_checkpoint(only_target, parts=('target_encoder', 'predictor'))
  pickled = str(tmp_path / 'pickled.pth')
  torch.save({'encoder': mods['encoder'].state_dict(), 'args': NotATensor()}, pickled)
  with pytest.raises(convert.ConversionError, match='--trust_pickle'):
    convert.read_torch_checkpoint(pickled)
  assert list(convert.read_torch_checkpoint(pickled, trust_pickle=True)[0]) == ['encoder']


def test_package_works_without_torch():
  code = (
    "import sys; sys.modules['torch'] = None\n"
    'from stop_jax.eval import converted, load\n'  # evaluation reads conversions without torch
    'from stop_jax.tools import convert\n'
    'try:\n'
    "  convert.read_torch_checkpoint('x.pth')\n"
    'except ImportError as e:\n'
    '  print(e)\n'
  )
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "pip install 'stop_jax[torch]'" in proc.stdout


@pytest.mark.parametrize(
  'name,overrides',
  [
    ('vitb16.py', {}),
    ('vitl16.py', {}),
    ('vith14.py', {}),
    ('vith14.py', {'patch_size': 16}),  # the released StoP ViT-H weights
    ('vith14.py', {'variant': 'giant'}),  # I-JEPA's ViT-G/16 shapes at patch 14 and 16
    ('vith14.py', {'variant': 'giant', 'patch_size': 16, 'scan_blocks': False}),
  ],
)
def test_official_layout_of_real_configs(name, overrides):
  """Keys and shapes we expect == the official modules' state dicts (meta tensors, no memory)."""
  config = config_lib.load_config_file(name)
  for k, v in overrides.items():
    config.model[k] = v
  with torch.device('meta'):
    mods = official_modules(config)
  for part in ('encoder', 'predictor'):
    theirs = {k: tuple(v.shape) for k, v in mods[part].state_dict().items()}
    if part == 'predictor':
      del theirs['mask_token']  # StoP (stop.mode='masked') drops it
    assert official_layout.official_shapes(part, config) == theirs


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
  # configs/tiny.py (width 64, depth 4, patch 4, image 32, predictor 64 x 2) with overrides.
  config = config_lib.load_config_file('tiny.py')
  config.model.gelu, config.model.scan_blocks = 'exact', True
  mods = torch_models(config, seed=2)
  path, out = str(tmp_path / 'ckpt.pth.tar'), str(tmp_path / 'converted')
  save_official(path, mods, prefix='module.')
  cmd = [
    sys.executable,
    '-m',
    'stop_jax.tools.convert',
    f'--torch_checkpoint={path}',
    '--config=configs/tiny.py',
    '--config.model.gelu=exact',
    '--config.model.scan_blocks=True',
    f'--output={out}',
    '--which=target_encoder,predictor',
  ]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "dropping the checkpoint's mask_token" in proc.stderr
  loaded_config, params = converted.load_converted(out)
  assert loaded_config.model.gelu == 'exact' and loaded_config.model.scan_blocks is True
  assert loaded_config.data.crop_scale == config.data.crop_scale  # tuples survive JSON
  assert sorted(params) == ['predictor', 'target_encoder']
  assert json.load(open(os.path.join(out, 'conversion.json')))['checkpoint_values']['epoch'] == 300
  images = inputs(loaded_config)[0]
  ours = models.build_encoder(loaded_config).apply(
    {'params': params['target_encoder']}, jnp.asarray(images)
  )
  with torch.no_grad():
    theirs = mods['target_encoder'](torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  assert_rel_close(ours, theirs)
  # Evaluation reads the directory as a converted checkpoint (not as a training run, although it
  # has checkpoints/0 too), with the target encoder's params.
  from stop_jax.eval import load  # noqa: PLC0415

  loaded = load.load_model(out)
  assert loaded.source == 'converted' and loaded.step is None
  np.testing.assert_array_equal(
    loaded.params['norm']['scale'], params['target_encoder']['norm']['scale']
  )
  # A second conversion into the same directory is refused before anything is read.
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and 'already holds config.json' in proc.stderr
