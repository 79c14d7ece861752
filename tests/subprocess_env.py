"""The environment of the processes the tests start, and the XLA flags of the whole session.

LLVM runs at -O0 in tests: compiling is most of a short test process's time on 2 cores, and a
test runs a handful of steps. XLA's HLO passes (fusions, the oneDNN / YNNPACK matmul kernels,
sharding) still run as in production; only machine-code optimisation is skipped.
"""

import os

TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'


def cpu_env(devices: int | None = None, **extra: str) -> dict:
  """os.environ for a CPU-only child: no cluster variables (SLURM_, OMPI_, JAX_, TPU_) from the
  machine running the tests, the test XLA flags and `devices` host devices if given."""
  env = {
    k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'OMPI_', 'JAX_', 'TPU_'))
  }
  flags = [TEST_XLA_FLAGS]
  if devices:
    flags.append(f'--xla_force_host_platform_device_count={devices}')
  env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', XLA_FLAGS=' '.join(flags), **extra)
  return env
