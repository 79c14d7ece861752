"""XLA compile options: the CPU matmul table and the fallback when XLA rejects an option."""

import jax
import jax.numpy as jnp
import pytest

from stop_jax.runtime import compiler


def test_options_by_backend_and_library():
  for library in ('onednn', 'eigen', 'ynnpack'):
    assert compiler.compiler_options(library, 'gpu') == {}
    assert compiler.compiler_options(library, 'tpu') == {}
  assert compiler.compiler_options('ynnpack', 'cpu') == {}  # XLA:CPU's own default
  assert compiler.compiler_options('eigen', 'cpu') == {'xla_cpu_experimental_ynn_fusion_type': ''}
  onednn = compiler.compiler_options('onednn', 'cpu')
  assert onednn['xla_cpu_use_onednn'] is True
  onednn['xla_cpu_use_onednn'] = False  # a copy: the table is not changed
  assert compiler.CPU_MATMUL_OPTIONS['onednn']['xla_cpu_use_onednn'] is True
  with pytest.raises(KeyError):
    compiler.compiler_options('mkl', 'cpu')


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU kernels')
def test_the_library_picks_the_dot_kernels():
  x = jnp.ones((64, 64), jnp.float32)
  lowered = jax.jit(lambda a: jnp.tanh(a @ a) @ a).lower(x)
  kernels = {}
  for library in ('onednn', 'eigen', 'ynnpack'):
    compiled = compiler.compile_lowered(lowered, library)
    hlo = compiled.as_text()
    kernels[library] = {k for k in ('__ynn_fusion', '__onednn_fusion') if k in hlo}
    assert float(compiled(x)[0, 0]) == pytest.approx(64.0)
  assert kernels == {'onednn': {'__onednn_fusion'}, 'eigen': set(), 'ynnpack': {'__ynn_fusion'}}


class _Lowered:
  """A stand-in for jax's Lowered whose compile rejects any option (as an older jaxlib would)."""

  def __init__(self, error: str):
    self.error, self.calls = error, []

  def compile(self, options=None):
    self.calls.append(options)
    if options:
      raise RuntimeError(self.error)
    return 'compiled with defaults'


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='options exist on CPU only')
def test_an_unknown_option_falls_back_to_xla_defaults_and_other_errors_raise(caplog):
  lowered = _Lowered('INVALID_ARGUMENT: no such option xla_cpu_use_onednn')
  assert compiler.compile_lowered(lowered, 'onednn') == 'compiled with defaults'
  assert lowered.calls == [compiler.compiler_options('onednn'), None]
  assert 'compiling with its defaults' in caplog.text
  with pytest.raises(RuntimeError, match='out of memory'):
    compiler.compile_lowered(_Lowered('RESOURCE_EXHAUSTED: out of memory'), 'onednn')
