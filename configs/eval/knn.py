r"""k-NN sanity metric on IN-1k: weighted 20-NN on cosine similarity (DINO protocol).

Command:
  python -m stop_jax.evaluate --config=configs/eval/knn.py --workdir=$WORKDIR \
    --config.eval.data_dir=$TFDS_DIR

Features of tfds `imagenet2012` train (by default the first 100,000 images, to keep the
similarity matrix and the run short; `--config.eval.max_train_examples=-1` for all 1.28M) and the
50,000 validation images, both un-augmented at 224. Each validation image is labelled by the
vote of its k=20 most similar train images weighted by exp(cos / 0.07). No training: minutes on
one accelerator, a quick check that a checkpoint is healthy. Features are cached, so rerunning
with another k or temperature only repeats the vote.
"""

from stop_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.eval.protocol = 'knn'
  c.eval.source = 'tfds'
  c.eval.dataset = 'imagenet2012'
  c.eval.train_split, c.eval.test_split = 'train', 'validation'
  c.eval.max_train_examples = 100_000
  c.eval.name = 'knn_in1k'
  c.eval.image_size = 224
  c.eval.knn_k, c.eval.knn_temperature = 20, 0.07
  return config_lib.lock(c)
