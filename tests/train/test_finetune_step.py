"""Fine-tuning math: layer-wise LR decay, the LR schedule, Mixup/CutMix, label smoothing."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from stop_jax.train import finetune_step as fs


def _params(scan: bool, depth: int = 3):
  block = {'attn': {'qkv': {'kernel': np.zeros((4, 12)), 'bias': np.zeros((12,))}}}
  if scan:
    blocks = {'layers': jax.tree.map(lambda x: np.zeros((depth,) + x.shape), block)}
  else:
    blocks = {f'layers_{i}': block for i in range(depth)}
  return {
    'encoder': {
      'patch_embed': {'kernel': np.zeros((2, 2, 3, 4))},
      'blocks': blocks,
      'norm': {'scale': np.zeros((4,))},
    },
    'fc_norm': {'scale': np.zeros((4,))},
    'head': {'kernel': np.zeros((4, 10)), 'bias': np.zeros((10,))},
  }


@pytest.mark.parametrize('scan', [False, True])
def test_llrd_scales_follow_mae_layer_ids(scan):
  # MAE param_groups_lrd with 3 blocks: num_layers 4; patch embed 0.5^4, block i 0.5^(3 - i),
  # the final norm, fc_norm and head 1.
  s = fs.llrd_scales(_params(scan), depth=3, decay=0.5)
  assert float(s['encoder']['patch_embed']['kernel'].squeeze()) == 0.5**4
  assert float(s['encoder']['norm']['scale'].squeeze()) == 1.0
  assert (
    float(s['head']['kernel'].squeeze()) == 1.0 and float(s['fc_norm']['scale'].squeeze()) == 1.0
  )
  if scan:
    k = s['encoder']['blocks']['layers']['attn']['qkv']['kernel']
    assert k.shape == (3, 1, 1)
    np.testing.assert_allclose(k.reshape(-1), [0.5**3, 0.5**2, 0.5])
  else:
    got = [
      float(s['encoder']['blocks'][f'layers_{i}']['attn']['qkv']['bias'].squeeze())
      for i in range(3)
    ]
    assert got == [0.5**3, 0.5**2, 0.5]


def test_llrd_scales_each_update_as_a_param_group_lr():
  # AdamW with the factors equals AdamW run with lr * factor on that leaf alone (decay included).
  params = {'a': jnp.ones((3,)) * 2.0, 'b': jnp.ones((2, 3))}
  grads = {'a': jnp.asarray([0.1, -0.2, 0.3]), 'b': jnp.full((2, 3), 0.5)}
  scales = {'a': jnp.asarray(0.25), 'b': jnp.asarray([[1.0], [0.5]])}
  tx = optax.chain(optax.adamw(0.1, weight_decay=0.05), fs.scale_by_tree(scales))
  upd, _ = tx.update(grads, tx.init(params), params)
  ref = optax.adamw(0.1 * 0.25, weight_decay=0.05)
  ref_a, _ = ref.update(grads['a'], ref.init(params['a']), params['a'])
  np.testing.assert_allclose(upd['a'], ref_a, rtol=1e-6)
  ref_b, _ = ref.update(grads['b'][1], ref.init(params['b'][1]), params['b'][1])
  np.testing.assert_allclose(upd['b'][1], ref_b * 2.0, rtol=1e-6)  # 0.5 = 0.25 * 2


def test_lr_schedule_is_mae_warmup_then_cosine():
  lr = fs.lr_schedule(1.0, 0.1, warmup_steps=10, total_steps=110)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
  assert float(lr(110)) == pytest.approx(0.1) and float(lr(500)) == pytest.approx(0.1)


def test_label_smoothing_loss_by_hand():
  # C = 4, smoothing 0.1: target 0.925 on the label, 0.025 elsewhere.
  t = fs.smooth_one_hot(jnp.asarray([2]), 4, 0.1)
  np.testing.assert_allclose(t, [[0.025, 0.025, 0.925, 0.025]], rtol=1e-6)
  logits = jnp.asarray([[1.0, 2.0, 3.0, 0.0]])
  logz = math.log(math.e + math.e**2 + math.e**3 + 1.0)
  want = -(0.925 * (3.0 - logz) + 0.025 * ((1.0 - logz) + (2.0 - logz) + (0.0 - logz)))
  assert float(fs.soft_cross_entropy(logits, t)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize('mixup,cutmix', [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_mix_images_and_labels_alike(mixup, cutmix):
  b, c = 6, 5
  images = jnp.arange(b, dtype=jnp.float32)[:, None, None, None] * jnp.ones((b, 8, 8, 3))
  targets = fs.smooth_one_hot(jnp.arange(b) % c, c, 0.1)
  for seed in range(5):
    out, mixed, lam = fs.mixup_cutmix(
      jax.random.key(seed), images, targets, mixup, cutmix, 1.0, 0.5
    )
    assert out.shape == images.shape and mixed.shape == targets.shape
    np.testing.assert_allclose(mixed.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(mixed, lam * targets + (1 - lam) * targets[::-1], rtol=1e-6)
    # Row i is a mix of image i and image b-1-i whose share of image i is lam (pixel mean).
    share = (out[0].mean() - images[-1, 0, 0, 0]) / (images[0, 0, 0, 0] - images[-1, 0, 0, 0])
    assert float(share) == pytest.approx(float(lam), abs=1e-5)


def test_cutmix_lambda_is_the_kept_area():
  box, lam = fs.cutmix_box(jax.random.key(3), jnp.asarray(0.6), 20, 30)
  assert float(lam) == pytest.approx(1 - float(box.mean()))


def test_mixup_off_and_prob_zero_leave_the_batch():
  images, t = jnp.ones((4, 2, 2, 3)), fs.smooth_one_hot(jnp.arange(4), 4, 0.0)
  out, tt, lam = fs.mixup_cutmix(jax.random.key(0), images, t, 0.0, 0.0, 1.0, 0.5)
  assert out is images and float(lam) == 1.0
  out, tt, lam = fs.mixup_cutmix(
    jax.random.key(0), images * jnp.arange(4.0)[:, None, None, None], t, 0.8, 1.0, 0.0, 0.5
  )
  np.testing.assert_array_equal(tt, t)
  assert float(lam) == 1.0


class _Pool(nn.Module):
  """A stand-in encoder: the images' pixels as 3 tokens of width 4 (no params)."""

  @nn.compact
  def __call__(self, images, train=False):
    return images.reshape(images.shape[0], 3, 4)


def test_the_batchnorm_head_standardises_with_batch_stats_in_training_and_running_stats_after():
  model = fs.Classifier(_Pool(), num_classes=2, head_init_std=0.5, head_norm='batchnorm')
  rng = np.random.default_rng(0)
  # A large part every image shares plus a small part that differs: LayerNorm keeps the shared
  # part, BatchNorm removes it.
  images = jnp.asarray(100.0 + rng.normal(size=(8, 2, 2, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), images)
  assert 'fc_norm' not in variables['params']
  stats = variables['batch_stats']['head_bn']
  np.testing.assert_allclose(stats['mean'], 0.0) and np.testing.assert_allclose(stats['var'], 1.0)
  pooled = np.asarray(images).reshape(8, 3, 4).mean(1)  # [B, 4]
  head = variables['params']['head']
  logits, updated = model.apply(variables, images, train=True, mutable=['batch_stats'])
  standard = (pooled - pooled.mean(0)) / np.sqrt(pooled.var(0) + 1e-6)
  np.testing.assert_allclose(logits, standard @ head['kernel'] + head['bias'], rtol=1e-4, atol=1e-4)
  new = updated['batch_stats']['head_bn']
  np.testing.assert_allclose(new['mean'], 0.1 * pooled.mean(0), rtol=1e-5)
  # Evaluation uses the running statistics, not the test batch's.
  evaluated = model.apply(
    {'params': variables['params'], 'batch_stats': updated['batch_stats']}, images[:2]
  )
  running = (pooled[:2] - new['mean']) / np.sqrt(np.asarray(new['var']) + 1e-6)
  np.testing.assert_allclose(
    evaluated, running @ head['kernel'] + head['bias'], rtol=1e-4, atol=1e-3
  )


def test_the_train_step_carries_the_batchnorm_statistics_in_the_state():
  model = fs.Classifier(_Pool(), num_classes=3, head_norm='batchnorm')
  images = jnp.asarray(np.random.default_rng(1).normal(size=(6, 2, 2, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), images)
  tx = optax.adamw(1e-3)
  f = ml_collections.ConfigDict(
    dict(label_smoothing=0.0, mixup=0.0, cutmix=0.0, mixup_prob=1.0, mixup_switch_prob=0.5)
  )
  step = jax.jit(fs.make_train_step(model, tx, f, lambda s: 1e-3))
  state = fs.FinetuneState(
    jnp.zeros((), jnp.int32), variables['params'], tx.init(variables['params']),
    variables['batch_stats'],
  )  # fmt: skip
  new, _ = step(state, {'image': images, 'label': jnp.arange(6) % 3}, jax.random.key(2))
  pooled = np.asarray(images).reshape(6, 3, 4).mean(1)
  np.testing.assert_allclose(new.batch_stats['head_bn']['mean'], 0.1 * pooled.mean(0), rtol=1e-5)
  hits = fs.make_eval_step(model)(new.params, new.batch_stats, {
    'image': images, 'label': jnp.arange(6) % 3, 'valid': jnp.ones(6, bool)})  # fmt: skip
  assert int(hits[2]) == 6
