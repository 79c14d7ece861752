"""Every config key, declared once with its default and its meaning.

Config files in `configs/` start from `base_config()` and change values; they never add keys
(the config is locked, so a typo such as `--config.stop.sgima=0.1` fails at once). One builder
per group declares that group's keys; the allowed values of a key sit next to the group that
uses them. `checks.validate` checks the groups in the order they are declared here.
"""

from __future__ import annotations

import ml_collections

# The official ViT table (I-JEPA `vision_transformer.py`): width, depth, heads, mlp ratio.
VIT_VARIANTS = {
  'tiny': (192, 12, 3, 4.0),
  'small': (384, 12, 6, 4.0),
  'base': (768, 12, 12, 4.0),
  'large': (1024, 24, 16, 4.0),
  'huge': (1280, 32, 16, 4.0),
  'giant': (1408, 40, 16, 48 / 11),
}


def _model() -> ml_collections.ConfigDict:
  """The encoder (a ViT); the target encoder is its EMA copy."""
  m = ml_collections.ConfigDict()
  m.variant = 'base'  # One of VIT_VARIANTS.
  # Overrides of the variant's shape (-1 = take it from the variant), for small custom models.
  m.width = -1
  m.depth = -1
  m.num_heads = -1
  m.mlp_ratio = -1.0
  m.patch_size = 16
  m.image_size = 224
  m.dtype = 'float32'  # Compute dtype: float32 | bfloat16 (params stay float32).
  m.gelu = 'exact'  # exact (official, erf) | tanh (faster on some backends).
  # Activation rematerialisation: none | block (recompute each block in the backward pass) |
  # dots (keep the Dense outputs, recompute attention and elementwise ops).
  m.remat = 'none'
  # Storage dtype of the EMA target encoder: float32 | bfloat16 (halves its memory; the EMA is
  # computed in float32 and stochastically rounded, so updates far below bf16's resolution still
  # move the target on average).
  m.target_dtype = 'float32'
  m.scan_blocks = True  # nn.scan over blocks: compile time flat in depth.
  # Attention kernel: auto (cuDNN flash attention on GPUs in bf16, else einsum) | einsum (ours,
  # float32 logits; fastest on XLA:CPU) | xla (jax.nn.dot_product_attention) | cudnn.
  m.attention = 'auto'
  return m


def _predictor() -> ml_collections.ConfigDict:
  """The narrow transformer that predicts target features from context features."""
  p = ml_collections.ConfigDict()
  p.width = 384
  p.depth = 6
  p.num_heads = -1  # -1 = the encoder's head count (official).
  p.pos_embed = 'sincos'  # sincos (official) | learned (paper ablation).
  return p


STOP_MODES = ('masked', 'off', 'context', 'both', 'fixed_cov', 'untied')


def _stop() -> ml_collections.ConfigDict:
  """StoP: where the noise goes and how big it is.

  sigma is a standard deviation, as in the official code (the paper writes N(0, sigma I)).
  """
  s = ml_collections.ConfigDict()
  s.mode = 'masked'  # One of STOP_MODES; 'off' is the I-JEPA baseline.
  s.sigma = 0.25
  s.reg = 'none'  # none | l1 | l2: penalty on A (paper ablation, with mode='off').
  s.reg_weight = 0.0
  return s


MASK_MODES = ('official', 'corrected')


def _mask() -> ml_collections.ConfigDict:
  """The multi-block masks: one context block and num_targets target blocks per image."""
  k = ml_collections.ConfigDict()
  k.mode = 'corrected'  # official (bit-faithful quirks) | corrected. See masking.py.
  k.num_targets = 4
  k.target_scale = (0.15, 0.2)
  k.target_aspect = (0.75, 1.5)
  k.context_scale = (0.85, 1.0)
  k.min_keep = 10
  # Fixed token counts per image (static shapes); -1 = the official sampler's average at this
  # grid (what the official code keeps after truncating to the batch minimum at 64 per device).
  k.num_context_tokens = -1
  k.num_target_tokens = -1
  return k


MULTI_LAYER_TARGETS = ('norm_of_mean', 'mean_of_norms')
LOWRES_TARGETS = ('none', 'max', 'bilinear')


def _loss() -> ml_collections.ConfigDict:
  """The regression loss between predictions and target-encoder features."""
  loss = ml_collections.ConfigDict()
  loss.type = 'smooth_l1'  # smooth_l1 (official, beta 1) | l2.
  # Targets from the last K blocks (K = 1 in every official config) after the final norm; K > 1
  # combines them as one of MULTI_LAYER_TARGETS: norm_of_mean = LN(mean_k norm(x_k)) (official
  # StoP code) or mean_of_norms = mean_k LN(norm(x_k)); LN has no params, eps 1e-5.
  loss.num_target_layers = 1
  loss.multi_layer_target = 'norm_of_mean'
  # Table 8 (train/lowres.py), one of LOWRES_TARGETS: 'none', or also predict the 2x-downscaled
  # target map ('max' pool | 'bilinear') at the coarse cells of each block, + weight x its loss.
  loss.lowres = 'none'
  loss.lowres_weight = 1.0
  return loss


GRAD_CLIP_SCOPES = ('encoder', 'all')


def _optim() -> ml_collections.ConfigDict:
  """AdamW with the official schedules (LR, weight decay, EMA momentum), in epochs."""
  o = ml_collections.ConfigDict()
  o.epochs = 600
  o.warmup_epochs = 15.0
  o.ipe_scale = 1.0  # Schedule horizon T = ipe_scale * epochs * steps_per_epoch.
  o.start_lr = 2e-4
  o.lr = 8e-4
  o.final_lr = 1e-6
  # From this epoch on the LR keeps its value at the epoch's first step (-1 = never). Official
  # `fix_lr_thres` with `fix_lr_strategy: const`; StoP ViT-H: 250.
  o.constant_lr_after_epoch = -1.0
  o.weight_decay = 0.04
  o.final_weight_decay = 0.4
  # The same hold for the weight decay (official `fix_wd_thres`, `const`; StoP ViT-H: 250).
  o.constant_wd_after_epoch = -1.0
  o.b1 = 0.9
  o.b2 = 0.999
  o.grad_clip_norm = 0.0  # Global-norm clipping threshold; 0 = no clipping (every official yaml).
  # What the clipping covers: encoder (official: `clip_grad_norm_(encoder.parameters())`, the
  # predictor is never clipped) | all (encoder and predictor under one global norm).
  o.grad_clip_scope = 'encoder'
  o.ema_start = 0.996
  o.ema_end = 1.0
  return o


DATA_SOURCES = ('digits', 'tfds', 'synthetic', 'folder', 'shapes')
INTERPOLATIONS = ('bilinear', 'bicubic')


def _data() -> ml_collections.ConfigDict:
  """The pretraining data and its augmentation."""
  d = ml_collections.ConfigDict()
  # One of DATA_SOURCES: tfds | folder (data_dir/<split>/<class>/*.JPEG, the official layout;
  # classes sorted -> labels) | digits (sklearn, offline) | synthetic (noise, for benchmarks).
  d.source = 'tfds'
  d.name = 'imagenet2012'  # tfds name (source=tfds).
  d.train_split = 'train'  # tfds split, or the folder's split directory ('train').
  d.eval_split = 'validation'  # Probe test split (folder: usually 'val').
  d.data_dir = ''  # tfds data_dir ('' = the tfds default), or the folder root.
  d.global_batch_size = 2048
  # Examples per epoch; -1 = read from the dataset's metadata. Sets steps_per_epoch.
  d.num_train_examples = -1
  # Augmentation, defaults = StoP's official runs (torchvision semantics, in this order):
  # RandomResizedCrop(scale, ratio) -> flip -> colour jitter -> grayscale -> blur -> normalise.
  d.crop_scale = (0.3, 1.0)
  d.crop_ratio = (3 / 4, 4 / 3)
  d.interpolation = 'bilinear'  # RandomResizedCrop resize: bilinear (torchvision) | bicubic.
  d.flip = True  # Horizontal flip with probability 1/2 (I-JEPA's own configs: off).
  # ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with strength s, applied with color_jitter_prob; 0 = off
  # (StoP and I-JEPA: color_jitter_strength 0).
  d.color_jitter = 0.0
  d.color_jitter_prob = 0.8
  d.grayscale_prob = 0.2  # RandomGrayscale (StoP: on, 0.2; 0 = off).
  d.blur_prob = 0.5  # Gaussian blur (StoP: on, 0.5; 0 = off) ...
  d.blur_sigma = (0.1, 2.0)  # ... with a standard deviation uniform in this range (pixels).
  # tfds: each epoch reads a process's shard in windows of this many consecutive records, in a
  # random order, each shuffled in memory (about 2-3 windows of encoded images are in RAM).
  d.shuffle_window = 10_000
  d.digits_upscale = 'bilinear'  # digits: how 8x8 digits are resized to image_size.
  # shapes (stop_jax/data/shapes.py, offline CLEVR-like scenes): the label the in-training probe
  # and k-NN read, one of SHAPES_LABELS (count: objects - 3; dist: nearest depth bin; shape).
  d.shapes_label = 'count'

  return d


EVAL_PROTOCOLS = ('logreg', 'linear', 'knn', 'davis')
DAVIS_POS_EMBED = ('interpolate', 'recompute')
EVAL_SOURCES = ('tfds', 'folder', 'digits', 'synthetic', 'shapes')
EVAL_LABELS = (
  'label',
  'clevr_count',
  'clevr_distance',
  'shapes_count',
  'shapes_dist',
  'shapes_shape',
)
SHAPES_LABELS = ('count', 'dist', 'shape')
FEATURE_TYPES = ('last', 'last4')


def _eval() -> ml_collections.ConfigDict:
  """Evaluation: the trainer's probe and k-NN, and `stop_jax.evaluate`'s protocols."""
  e = ml_collections.ConfigDict()
  e.probe = True  # Linear probe of the target encoder at the end of training.
  e.probe_random_init = True  # Also probe a randomly initialised encoder (reference).
  # Rerunning a finished run changes nothing ("already complete at step N"); True runs its
  # end-of-run evaluators (the probe) again and rewrites summary.json. Evaluators the rerun's
  # config asks for that summary.json lacks (e.g. --config.eval.probe=True) run without it.
  e.rerun_final = False
  e.probe_l2 = (1e-4, 1e-3, 1e-2, 1e-1)  # Swept on a held-out part of the train split.
  e.probe_max_examples = 50_000
  # k-NN sanity metric during pretraining (stop_jax/eval/knn.py: knn_eval) on the run's own data
  # (config.data splits, un-augmented), avg-pooled last layer. 0 = off.
  e.knn_every_steps = 0
  e.knn_max_examples = 10_000  # Per split; -1 = all.
  e.knn_k = 20  # Neighbours (DINO protocol: 20).
  e.knn_temperature = 0.07  # Vote weight exp(cos_sim / T) (DINO protocol: 0.07).
  # Collapse health (stop_jax/eval/health.py): RankMe and feature spread of the avg-pooled
  # target features of a fixed held-out batch (the first health_examples of the probe's test
  # split), every health_every_steps steps; -1 = every log step, 0 = off.
  e.health_every_steps = -1
  e.health_examples = 256
  # `python -m stop_jax.evaluate --config=configs/eval/X.py --workdir=W`: the keys below (model
  # keys come from the run's config.json). Results go to W/eval/<name>.json.
  e.name = ''  # '' = '<protocol>_<dataset>'.
  # logreg: StoP's IN-1k 1% probe, L2 logistic regression (L-BFGS) on standardised features,
  #   l2 swept over probe_l2 on a held-out 20% of the train split (one value: no sweep).
  # linear: full linear probe (VISSL): a linear head trained with SGD/LARS on augmented images.
  # knn: weighted k-NN on cosine similarity (knn_k, knn_temperature).
  e.protocol = 'logreg'
  # Features of the frozen target encoder: 'last' = avg-pooled last layer (after the final norm),
  # 'last4' = concat of the avg-pooled last 4 blocks, each after the final norm. Both are reported.
  e.feature_types = ('last', 'last4')
  # tfds | folder (data_dir/<split>/<class>/*.jpg) | digits | synthetic | shapes.
  e.source = 'tfds'
  e.dataset = 'imagenet2012'  # tfds name (source=tfds); also names the result file.
  e.data_dir = ''  # tfds data_dir ('' = the tfds default), or the root for source=folder.
  e.train_split = 'train'
  e.test_split = 'validation'
  # label | clevr_count | clevr_distance (tfds CLEVR: the VTAB task definitions) |
  # shapes_count | shapes_dist | shapes_shape (source=shapes; 'label' there means shapes_count).
  e.label = 'label'
  e.max_train_examples = -1  # First N of each split (-1 = all): quick runs.
  e.max_test_examples = -1
  e.image_size = -1  # Eval resolution; -1 = the run's model.image_size.
  e.resize_ratio = 256 / 224  # Test images: shorter side to image_size * this, center crop.
  # False: test images are resized whole to image_size x image_size instead (VTAB; CLEVR labels
  # depend on every object, which a center crop of a 3:2 scene can cut off).
  e.center_crop = True
  e.batch_size = 256  # Global batch of feature extraction (rounded up to the devices).
  e.cache_features = True  # Reuse features in W/eval/cache (logreg, knn).
  # protocol=linear: one BatchNorm-free linear head per (feature type, lr), all trained on the
  # same frozen forward pass. LR = lr * linear_batch_size / 256, cosine to 0.
  e.linear_optimizer = 'sgd'  # sgd (with momentum) | lars.
  e.linear_lrs = (0.01,)
  e.linear_momentum = 0.9
  e.linear_weight_decay = 0.0  # On the head's kernel only.
  e.linear_epochs = 100
  e.linear_warmup_epochs = 0.0
  e.linear_batch_size = 256
  e.linear_crop_scale = (0.08, 1.0)  # RandomResizedCrop area range for training images.
  e.linear_flip = True  # Random horizontal flip for training images.
  # Features enter the heads standardised with the mean/std of this many un-augmented train
  # images: a fixed affine map (so the heads stay linear, no BatchNorm) that makes plain SGD
  # converge on features with a large common component. 0 = raw features.
  e.linear_standardize_examples = 10_000
  e.log_every_steps = 100  # protocol=linear: training-loss log interval.
  # protocol=davis (eval/davis.py): DAVIS 2017 label propagation; data_dir = the DAVIS root.
  e.davis_split, e.davis_resolution = 'val', '480p'  # ImageSets/2017/<split>.txt, 480p/ dirs
  e.davis_sequences = ()  # Names to run (quick runs); () = every sequence of the split.
  # Frames: shorter side davis_short_side, longer floored to a multiple of davis_long_multiple
  # (DINO: 854x480 -> 832x480), then both floored to a multiple of the patch size.
  e.davis_short_side, e.davis_long_multiple = 480, 64
  e.davis_n_last_frames = 7  # Context: the first frame plus this many previous frames.
  e.davis_size_mask_neighborhood = 12  # Keys within this many tokens of the query; 0 = all.
  e.davis_topk, e.davis_temperature = 5, 0.1  # Top-k keys per query; affinity exp(cos / T).
  e.davis_pos_embed = 'interpolate'  # Trained table resized bicubically (official) | recompute
  e.davis_bound_th = 0.008  # F's boundary tolerance: x image diagonal (< 1), or pixels (>= 1).
  return e


FINETUNE_SOURCES = ('tfds', 'folder', 'digits', 'synthetic')
HEAD_NORMS = ('layernorm', 'batchnorm')


def _finetune() -> ml_collections.ConfigDict:
  """Full fine-tuning (`python -m stop_jax.finetune`): a pretrained target encoder plus a linear
  head on its average-pooled tokens, trained end to end with the MAE/BEiT recipe. Defaults: MAE's
  ViT-L/16 fine-tuning (configs/finetune/in1k_1pct_vitl16.py gives the sources)."""
  f = ml_collections.ConfigDict()
  # Where the encoder comes from: a pretraining run, an export or a converted official
  # checkpoint (stop_jax/eval/load.py); its config sets the architecture. Required.
  f.init = ''
  f.init_step = -1  # Checkpoint step of a run (-1 = the latest).
  f.random_init = False  # The same architecture with random weights (the reference baseline).
  # Labelled data: one of FINETUNE_SOURCES. folder: data_dir/<split>/<class>/<image>, with
  # file_list (optional) a text file naming the train images to keep, one per line, as a file
  # name or <class>/<file> (e.g. the 1% lists of SimCLR / MSN).
  f.source = 'tfds'
  f.dataset = 'imagenet2012_subset/1pct'  # tfds name (source=tfds).
  f.data_dir = ''  # tfds data_dir ('' = the tfds default), or the folder root.
  f.file_list = ''
  f.train_split = 'train'
  f.test_split = 'validation'
  f.max_train_examples = -1  # First N train examples (-1 = all): the label fraction of a test.
  f.max_test_examples = -1
  f.image_size = -1  # -1 = the encoder's model.image_size.
  f.resize_ratio = 256 / 224  # Test images: shorter side to image_size * this, center crop.
  f.batch_size = 1024  # Global batch.
  f.epochs = 50.0
  f.warmup_epochs = 5.0  # Linear warmup from 0, then cosine to min_lr (per step).
  f.blr = 1e-3  # Base LR: lr = blr * batch_size / 256 (MAE).
  f.min_lr = 1e-6
  f.weight_decay = 0.05  # AdamW, not on biases, norms or the head's bias.
  f.b1 = 0.9
  f.b2 = 0.999
  f.grad_clip_norm = 0.0  # Global-norm clipping; 0 = off (MAE).
  # Layer-wise LR decay: block i of L gets lr * layer_decay^(L - i); the patch embedding
  # layer_decay^(L + 1) (BEiT / MAE's param_groups_lrd, patch embedding = layer 0).
  f.layer_decay = 0.75
  f.drop_path = 0.2  # Stochastic depth rate of the last block (linear in depth).
  f.head_init_std = 2e-5  # The head's kernel ~ N(0, std^2) (MAE), bias 0.
  # What normalises the pooled features before the head, one of HEAD_NORMS: 'layernorm' (MAE
  # fine-tuning's fc_norm) or 'batchnorm' (affine-free, running stats: MAE's linear-probe head),
  # which also removes what every image shares (large in weakly trained encoders' features).
  f.head_norm = 'layernorm'
  f.label_smoothing = 0.1
  # Mixup / CutMix on the device (timm's Mixup, mode 'batch'): per batch, with mixup_prob, mix
  # with the reversed batch; CutMix instead of Mixup with mixup_switch_prob. Alpha 0 = off.
  f.mixup, f.cutmix, f.mixup_prob, f.mixup_switch_prob = 0.8, 1.0, 1.0, 0.5
  # Train images: RandomResizedCrop(crop_scale, 3/4..4/3, interpolation), flip, RandAugment
  # (timm's rand-m9-mstd0.5-inc1: randaug_num_ops ops, each applied with randaug_prob, magnitude
  # ~ N(randaug_magnitude, randaug_magnitude_std) of 10; 0 ops = off), normalise, random erasing
  # with probability reprob (timm's 'pixel' mode, one box).
  f.crop_scale = (0.08, 1.0)
  f.interpolation = 'bicubic'
  f.flip = True
  f.randaug_num_ops, f.randaug_magnitude, f.randaug_magnitude_std, f.randaug_prob = 2, 9.0, 0.5, 0.5
  f.reprob = 0.25
  f.eval_every_epochs = 5.0  # Test accuracy every this many epochs, and at the end.
  f.eval_batch_size = 256
  f.log_every_steps = 20
  return f


def _checkpoint() -> ml_collections.ConfigDict:
  """When checkpoints are written and kept, and when a resume may change the config."""
  ck = ml_collections.ConfigDict()
  ck.every_steps = 1000  # 0 = only at the end.
  ck.every_minutes = 30.0  # Also save when this long has passed (0 = off).
  ck.keep = 3  # The latest k checkpoints ...
  ck.keep_every = 0  # ... plus every step that is a multiple of this, forever (0 = off).
  # Resuming in a workdir whose config.json differs (beyond run-control keys such as total_steps,
  # logging, checkpointing, eval, mesh and data_dir) is refused unless this is True.
  ck.allow_config_change = False
  return ck


def _run_control(c: ml_collections.ConfigDict):
  """The top-level keys after the groups: failure policy, XLA:CPU matmuls, logging, length."""
  # Non-finite loss or gradients: 'stop' (name the step and the last good checkpoint) or 'skip'
  # (drop that update, count it, stop after max_consecutive_skips in a row). Either way the
  # bad update never reaches the params.
  c.on_nonfinite = 'stop'
  c.max_consecutive_skips = 10  # Bad steps in a row (non-finite or divergent) that stop a run.
  # The divergence guard (stop_jax/train/guard.py), for blow-ups that stay finite. A step is
  # divergent when its update (the global norm of what the optimiser adds to the params) is
  # above max_update_ratio x the params' norm or above max_update_norm, or when, against the
  # running medians over the last `window` steps that passed, its total loss is above
  # loss_spike_factor x the loss's median or its update norm above update_spike_factor x that
  # norm's median (these two start once warmup_steps steps have passed). 0 = that rule off.
  # Its update is dropped, as a non-finite one's. action: 'stop' (name the step, the last
  # checkpoint the guard verified and how to resume from it) or 'skip' (go on; counted against
  # max_consecutive_skips). The defaults are far from anything a healthy run does (an AdamW
  # step moves the params by a small fraction of their norm; losses drift, they do not jump).
  c.divergence = ml_collections.ConfigDict()
  c.divergence.action = 'stop'
  c.divergence.loss_spike_factor = 10.0
  # Off: Adam's normalised step varies several-fold around its median in healthy runs.
  c.divergence.update_spike_factor = 0.0
  c.divergence.max_update_norm = 0.0
  c.divergence.max_update_ratio = 1.0
  c.divergence.window = 100
  c.divergence.warmup_steps = 10
  # Matmul library of XLA:CPU for the train step: onednn (measured the fastest on the ViT-Ti/16
  # reference step, now level with eigen; bench/NOTES.md) | eigen | ynnpack (XLA's own
  # default). Ignored on GPU / TPU. All float32; the sums differ only in rounding order.
  c.xla_cpu_matmul = 'onednn'
  c.log_every_steps = 50
  c.total_steps = -1  # -1 = epochs * steps_per_epoch; set to stop early (schedules unchanged).


def _mesh() -> ml_collections.ConfigDict:
  """Device mesh (data, fsdp, tensor); one axis may be -1 = the devices left over.

  The batch is split over data x fsdp; params / optimiser state / EMA target over fsdp (their
  'embed' dim); heads and MLP units over tensor. See stop_jax/runtime/sharding.py.
  """
  mesh = ml_collections.ConfigDict()
  mesh.data = -1
  mesh.fsdp = 1
  mesh.tensor = 1
  # Multislice: how many slices (TPU slices joined over the data-center network) the data and
  # fsdp axes span; the sizes above stay the global ones. dcn_data x dcn_fsdp must equal the
  # slice count (each process counts as a slice on CPU/GPU); each must divide its axis. 1 = off.
  mesh.dcn_data = 1
  mesh.dcn_fsdp = 1
  return mesh


def base_config() -> ml_collections.ConfigDict:
  """Every key with its default (the ViT-B/16 StoP recipe of paper Table 10).

  The keys keep their order (that of every saved config.json): seed, the groups, the run-control
  keys, mesh.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = _model()
  c.predictor = _predictor()
  c.stop = _stop()
  c.mask = _mask()
  c.loss = _loss()
  c.optim = _optim()
  c.data = _data()
  c.eval = _eval()
  c.finetune = _finetune()
  c.checkpoint = _checkpoint()
  _run_control(c)
  c.mesh = _mesh()
  return c


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Freezes the set of keys: assigning a key that base_config() did not declare raises."""
  config.lock()
  return config


def vit_shape(model: ml_collections.ConfigDict) -> tuple[int, int, int, float]:
  """(width, depth, num_heads, mlp_ratio) of the encoder: the variant with any overrides."""
  w, d, h, r = VIT_VARIANTS[model.variant]
  return (
    model.width if model.width > 0 else w,
    model.depth if model.depth > 0 else d,
    model.num_heads if model.num_heads > 0 else h,
    model.mlp_ratio if model.mlp_ratio > 0 else r,
  )
