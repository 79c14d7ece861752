"""The converted-checkpoint directory: what `write_converted` writes, `load_converted` reads back."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax.eval import converted
from stop_jax.runtime import checkpointing


def test_write_then_load_converted_round_trips(tmp_path):
  config = config_lib.lock(config_lib.base_config())
  config.model.gelu = 'exact'
  out = str(tmp_path / 'converted')
  encoder = {'patch_embed': {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3)}}
  params = {'encoder': encoder, 'target_encoder': {'norm': {'scale': np.ones(3, np.float32)}}}
  converted.write_converted(out, config, params, {'source': 'x.pth', 'checkpoint_values': {}})

  loaded_config, loaded = converted.load_converted(out)
  assert loaded_config.to_dict() == config.to_dict()
  assert sorted(loaded) == ['encoder', 'target_encoder']
  np.testing.assert_array_equal(
    loaded['encoder']['patch_embed']['kernel'], encoder['patch_embed']['kernel']
  )
  np.testing.assert_array_equal(loaded['target_encoder']['norm']['scale'], np.ones(3))
  with open(os.path.join(out, converted.CONVERSION_FILE)) as f:
    assert json.load(f) == {
      'source': 'x.pth',
      'checkpoint_values': {},
      'parts': ['encoder', 'target_encoder'],
    }
  # The layout of a training run's checkpoint: step 0, params and target_params.
  step, tree = checkpointing.load_checkpoint(out)
  assert step == 0 and sorted(tree) == ['params', 'step', 'target_params']

  with pytest.raises(FileExistsError, match='already holds config.json'):
    converted.write_converted(out, config, params, {})
