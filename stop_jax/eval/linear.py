"""Full linear probe (VISSL protocol): linear heads on a frozen encoder, trained with optax.

Training images get RandomResizedCrop + horizontal flip, test images a resize and a center crop
(`data.labelled`). The trunk is frozen (its params are an input of the step, never differentiated);
the heads are plain BatchNorm-free linear layers on the chosen pooled features (`features`).
By default the features are first standardised with a fixed mean/std measured once on
un-augmented train images (`eval.linear_standardize_examples`): an affine map, so each head is
still one linear layer, but without it plain SGD crawls on ViT features, whose per-dimension
spread across images is small next to their common offset (on the tiny digits encoder a short
probe without it stays at chance).

One forward pass of the trunk feeds several heads at once, one per (feature type, base LR):
their losses are summed, but every head's gradient only depends on its own loss and each has
its own optimiser, so training them together is the same as training them one at a time, for
the price of one. Reported: every head's test accuracy, and per feature type the best head (the
VISSL/DINO practice of reporting the best of an LR sweep).

Optimiser per head: SGD with momentum (weight decay added to the gradient, as torch's SGD) or
LARS (`optax.lars`); neither decays nor trust-ratio-scales the bias. LR = base * batch / 256,
optional linear warmup, then cosine to 0 over `linear_epochs`.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stop_jax.data import batch as batch_lib
from stop_jax.data import labelled
from stop_jax.eval import features

_HEAD_INIT_STD = 0.01  # DINO's LinearClassifier: N(0, 0.01^2) weights, zero bias.


def head_name(feature_type: str, lr: float) -> str:
  return f'{feature_type}/lr={lr:g}'


def init_heads(rng: jax.Array, dims: Mapping[str, int], num_classes: int) -> dict:
  """{name: {'w': [dim, C], 'b': [C]}} for every head name -> feature dim.

  Each head's key is folded from its name, so a head starts the same whichever others train
  beside it.
  """
  heads = {}
  for name, dim in dims.items():
    key = jax.random.fold_in(rng, zlib.crc32(name.encode()))
    heads[name] = {
      'w': _HEAD_INIT_STD * jax.random.normal(key, (dim, num_classes), jnp.float32),
      'b': jnp.zeros((num_classes,), jnp.float32),
    }
  return heads


def _kernel_mask(params):
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == 'w', params)


def make_optimizer(
  peak_lrs: Mapping[str, float],
  total_steps: int,
  warmup_steps: int = 0,
  kind: str = 'sgd',
  momentum: float = 0.9,
  weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """One optimiser per head (multi_transform), each with its own warmup-cosine LR.

  Args:
    peak_lrs: head name -> peak LR (already scaled by the batch size).
    total_steps: length of the cosine schedule (decays to 0).
    warmup_steps: linear warmup from 0.
    kind: 'sgd' (momentum) or 'lars'.
    momentum: momentum of either.
    weight_decay: on the kernel only.
  """
  if kind not in ('sgd', 'lars'):
    raise ValueError(f"optimizer kind={kind!r} is not allowed: 'sgd' or 'lars'.")
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f'warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}).')

  def one(lr):
    if warmup_steps:
      schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, total_steps, 0.0)
    else:
      schedule = optax.cosine_decay_schedule(lr, total_steps)
    if kind == 'lars':
      return optax.lars(
        schedule,
        weight_decay=weight_decay,
        weight_decay_mask=_kernel_mask,
        trust_ratio_mask=_kernel_mask,
        momentum=momentum,
      )
    return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=_kernel_mask),
      optax.sgd(schedule, momentum=momentum or None),
    )

  labels = {name: {'w': name, 'b': name} for name in peak_lrs}
  return optax.multi_transform({name: one(lr) for name, lr in peak_lrs.items()}, labels)


def _logits(head: dict, x: jax.Array) -> jax.Array:
  return jnp.dot(x, head['w'], precision=jax.lax.Precision.HIGHEST) + head['b']  # [B, C]


def feature_norm(stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None, dims, eps=1e-6):
  """{type: {'mean': [dim], 'scale': [dim]}} from (mean, std) per type; identity if None."""
  if stats is None:
    return {
      t: {'mean': np.zeros((d,), np.float32), 'scale': np.ones((d,), np.float32)}
      for t, d in dims.items()
    }
  return {
    t: {
      'mean': np.asarray(m, np.float32),
      'scale': np.asarray(1.0 / np.where(sd > eps, sd, 1.0), np.float32),
    }
    for t, (m, sd) in stats.items()
  }


def _standardised(encoder, trunk_params, norm, images, feature_types):
  feats = features.pooled_features(encoder, trunk_params, images, feature_types)
  return {t: (feats[t] - norm[t]['mean']) * norm[t]['scale'] for t in feature_types}


def make_train_step(encoder, tx, head_types: Mapping[str, str]):
  """(heads, opt_state, trunk_params, norm, images [B,H,W,3], labels [B]) -> (heads, opt_state,
  losses); `norm` as `feature_norm`."""
  feature_types = tuple(sorted(set(head_types.values())))

  def step(heads, opt_state, trunk_params, norm, images, labels):
    feats = _standardised(encoder, trunk_params, norm, images, feature_types)
    feats = jax.lax.stop_gradient(feats)  # frozen trunk

    def loss_fn(heads):
      losses = {
        name: jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(_logits(heads[name], feats[t]), labels)
        )
        for name, t in head_types.items()
      }
      return sum(losses.values()), losses

    grads, losses = jax.grad(loss_fn, has_aux=True)(heads)
    updates, opt_state = tx.update(grads, opt_state, heads)
    return optax.apply_updates(heads, updates), opt_state, losses

  return step


def make_eval_step(encoder, head_types: Mapping[str, str], top: int = 5):
  """(heads, trunk_params, norm, images, labels, valid) -> ({name: [2] top-1 / top-k hits},
  valid rows).

  Counts are over the global batch (padding rows excluded), so every process gets the totals.
  """
  feature_types = tuple(sorted(set(head_types.values())))

  def step(heads, trunk_params, norm, images, labels, valid):
    feats = _standardised(encoder, trunk_params, norm, images, feature_types)
    out = {}
    for name, t in head_types.items():
      logits = _logits(heads[name], feats[t])  # [B, C]
      _, top_idx = jax.lax.top_k(logits, min(top, logits.shape[-1]))  # [B, k]
      hit = top_idx == labels[:, None]  # [B, k]
      out[name] = jnp.stack([jnp.sum(hit[:, 0] & valid), jnp.sum(jnp.any(hit, -1) & valid)])
    return out, jnp.sum(valid)

  return step


def feature_stats(
  encoder, params, train_spec, max_examples: int, batch: int, feature_types, mesh
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Per-dimension (mean, std) of each feature type over the first un-augmented train images."""
  n = max_examples if train_spec.max_examples < 0 else min(max_examples, train_spec.max_examples)
  spec = dataclasses.replace(train_spec, max_examples=n)
  extractor = features.FeatureExtractor(encoder, params, batch, feature_types, mesh)
  feats, _ = features.extract_from_batches(
    extractor, labelled.eval_batches(spec, extractor.global_batch)
  )
  # float64 sums: a million rows of float32 would lose digits.
  return {t: (x.astype(np.float64).mean(0), x.astype(np.float64).std(0)) for t, x in feats.items()}


@dataclasses.dataclass(frozen=True)
class ProbePlan:
  """The sizes of one linear probe, from config.eval and the data.

  head_types: head name -> its feature type; base_lrs: head name -> its base LR (before the
  batch-size scaling).
  """

  feature_types: tuple[str, ...]
  head_types: dict[str, str]
  base_lrs: dict[str, float]
  batch: int  # training batch, a multiple of the device count
  eval_batch: int  # feature statistics and test batches
  steps_per_epoch: int
  total_steps: int
  num_train: int
  num_classes: int


def make_plan(
  eval_config, train_spec, test_spec, feature_types: tuple[str, ...], mesh: jax.sharding.Mesh
) -> ProbePlan:
  """The probe's heads and step counts; raises ValueError if the data do not fit them."""
  e = eval_config
  batch = features.padded_batch_size(e.linear_batch_size, mesh)
  n_train = labelled.num_examples(train_spec)
  steps_per_epoch = n_train // batch
  if steps_per_epoch < 1:
    raise ValueError(f'{n_train} train examples do not fill one batch of {batch}.')
  num_classes = labelled.num_classes(train_spec)
  if labelled.num_classes(test_spec) != num_classes:
    raise ValueError(
      f'train split has {num_classes} classes, test split {labelled.num_classes(test_spec)}.'
    )
  return ProbePlan(
    feature_types=feature_types,
    head_types={head_name(t, lr): t for t in feature_types for lr in e.linear_lrs},
    base_lrs={head_name(t, lr): float(lr) for t in feature_types for lr in e.linear_lrs},
    batch=batch,
    eval_batch=features.padded_batch_size(e.batch_size, mesh),
    steps_per_epoch=steps_per_epoch,
    total_steps=int(e.linear_epochs * steps_per_epoch),
    num_train=n_train,
    num_classes=num_classes,
  )


def train_heads(config, encoder, trunk, norm, plan: ProbePlan, train_spec, mesh) -> tuple:
  """Trains the plan's heads on augmented train images: (heads, last losses {name: loss}).

  trunk and norm are replicated over mesh (frozen params, `feature_norm`'s output).
  """
  e = config.eval
  peak = {name: lr * plan.batch / 256 for name, lr in plan.base_lrs.items()}
  tx = make_optimizer(
    peak,
    plan.total_steps,
    int(e.linear_warmup_epochs * plan.steps_per_epoch),
    e.linear_optimizer,
    e.linear_momentum,
    e.linear_weight_decay,
  )
  dims = {n: features.feature_dim(t, encoder.width) for n, t in plan.head_types.items()}
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))
  heads = init_heads(jax.random.key(config.seed), dims, plan.num_classes)
  heads = jax.device_put(heads, replicated)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(heads)
  train_step = jax.jit(
    make_train_step(encoder, tx, plan.head_types),
    in_shardings=(replicated,) * 4 + (batch_sharding,) * 2,
    out_shardings=(replicated, replicated, replicated),
    donate_argnums=(0, 1),
  )
  logging.info(
    'linear probe: %d heads, %d steps (%d epochs x %d), batch %d',
    len(plan.head_types),
    plan.total_steps,
    e.linear_epochs,
    plan.steps_per_epoch,
    plan.batch,
  )
  shardings = {'image': batch_sharding, 'label': batch_sharding}
  stream = labelled.train_batches(
    train_spec, plan.batch, tuple(e.linear_crop_scale), e.linear_flip, config.seed
  )
  t0, losses = time.perf_counter(), {}
  for step in range(plan.total_steps):
    b = batch_lib.to_global(next(stream), shardings)
    heads, opt_state, losses = train_step(heads, opt_state, trunk, norm, b['image'], b['label'])
    if (step + 1) % e.log_every_steps == 0 or step + 1 == plan.total_steps:
      shown = ', '.join(f'{n} {float(v):.4f}' for n, v in sorted(losses.items()))
      rate = (step + 1) * plan.batch / (time.perf_counter() - t0)
      logging.info(
        'linear probe step %d/%d: loss %s (%.0f img/s)', step + 1, plan.total_steps, shown, rate
      )
  return heads, losses


def score_heads(encoder, heads, trunk, norm, plan: ProbePlan, test_spec, mesh) -> tuple:
  """({head name: int64 [2] top-1 / top-5 hits}, number of test images) on test_spec."""
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))
  eval_step = jax.jit(
    make_eval_step(encoder, plan.head_types),
    in_shardings=(replicated,) * 3 + (batch_sharding,) * 3,
    out_shardings=replicated,
  )
  shardings = dict.fromkeys(('image', 'label', 'valid'), batch_sharding)
  correct = {n: np.zeros(2, np.int64) for n in plan.head_types}
  n_test = 0
  for b in labelled.eval_batches(test_spec, plan.eval_batch):
    b = batch_lib.to_global(b, shardings)
    out, count = eval_step(heads, trunk, norm, b['image'], b['label'], b['valid'])
    for n, c in out.items():
      correct[n] += np.asarray(c)
    n_test += int(count)
  return correct, n_test


def summarise(plan: ProbePlan, correct: dict, n_test: int, losses: dict) -> dict:
  """`linear_eval`'s result from the hit counts and the last training losses."""
  result = {'heads': {}}
  for name, t in plan.head_types.items():
    top1, top5 = (correct[name] / max(n_test, 1)).tolist()
    result['heads'][name] = {
      'top1': top1,
      'top5': top5,
      'feature_type': t,
      'lr': plan.base_lrs[name],
      'final_loss': float(losses[name]) if losses else float('nan'),
    }
  for t in plan.feature_types:
    best = max((h for h in result['heads'].values() if h['feature_type'] == t), key=_top1)
    result[t] = {'top1': best['top1'], 'top5': best['top5'], 'lr': best['lr']}
  result.update(
    steps=plan.total_steps,
    num_train=plan.num_train,
    num_test=n_test,
    num_classes=plan.num_classes,
  )
  return result


def linear_eval(
  config,
  encoder,
  params,
  train_spec: labelled.EvalData,
  test_spec: labelled.EvalData,
  feature_types: Sequence[str] | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> dict:
  """Trains the heads of config.eval (linear_* keys) on train_spec, scores them on test_spec.

  Returns:
    {feature_type: {'top1', 'top5', 'lr'} of its best head, 'heads': {name: {'top1', 'top5',
    'feature_type', 'lr', 'final_loss'}}, 'steps', 'num_train', 'num_test', 'num_classes'}.
  """
  e = config.eval
  feature_types = features.check_feature_types(
    e.feature_types if feature_types is None else feature_types, encoder.depth
  )
  mesh = features.data_mesh() if mesh is None else mesh
  plan = make_plan(e, train_spec, test_spec, feature_types, mesh)
  replicated = NamedSharding(mesh, P())
  params = nn.meta.unbox(params)
  trunk = jax.device_put(params, replicated)
  stats = None
  if e.linear_standardize_examples:
    stats = feature_stats(
      encoder,
      params,
      train_spec,
      e.linear_standardize_examples,
      plan.eval_batch,
      feature_types,
      mesh,
    )
  type_dims = {t: features.feature_dim(t, encoder.width) for t in feature_types}
  norm = jax.device_put(feature_norm(stats, type_dims), replicated)
  heads, losses = train_heads(config, encoder, trunk, norm, plan, train_spec, mesh)
  correct, n_test = score_heads(encoder, heads, trunk, norm, plan, test_spec, mesh)
  return summarise(plan, correct, n_test, losses)


def _top1(head: dict) -> float:
  return head['top1']
