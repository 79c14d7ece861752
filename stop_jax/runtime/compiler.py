"""Per-compile XLA options for the train step, and compiling with them.

The only knob today is the XLA:CPU matmul library (`config.xla_cpu_matmul`, passed in as its
value): oneDNN, Eigen or YNNPACK (XLA's own default). oneDNN, the default, gave the fastest
step on the reference CPU; since Dense multiplies flat views (`layers.flat_dot_general`) the
three are close (the measurements: bench/NOTES.md). On other backends there are no options.
"""

from __future__ import annotations

import jax
from absl import logging

# XLA:CPU options by matmul library. An empty list of YNN fusion kinds takes the dots away from
# YNNPACK (XLA's default); oneDNN then claims each dot as its own fusion, else Eigen runs them.
CPU_MATMUL_OPTIONS = {
  'onednn': {
    'xla_cpu_experimental_ynn_fusion_type': '',
    'xla_cpu_use_onednn': True,
    'xla_cpu_experimental_onednn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
  },
  'eigen': {'xla_cpu_experimental_ynn_fusion_type': ''},
  'ynnpack': {},
}


def compiler_options(cpu_matmul: str, backend: str | None = None) -> dict:
  """XLA options for `backend` (default: JAX's default backend).

  Args:
    cpu_matmul: the XLA:CPU matmul library, a key of CPU_MATMUL_OPTIONS (config.xla_cpu_matmul).
    backend: 'cpu', 'gpu', 'tpu'; only 'cpu' has options, elsewhere {}.
  """
  backend = backend or jax.default_backend()
  if backend != 'cpu':
    return {}
  return dict(CPU_MATMUL_OPTIONS[cpu_matmul])


def compile_lowered(lowered, cpu_matmul: str):
  """`lowered.compile(compiler_options(cpu_matmul))`; a jaxlib that no longer knows an option
  compiles with XLA's defaults instead (logged), rather than failing the run."""
  options = compiler_options(cpu_matmul)
  if not options:
    return lowered.compile()
  try:
    return lowered.compile(options)
  except Exception as e:  # XlaRuntimeError, whose import path moves between jax versions.
    if not any(k in str(e) for k in options):
      raise
    logging.warning('XLA rejected %s (%s); compiling with its defaults.', options, e)
    return lowered.compile()
