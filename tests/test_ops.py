"""cnn_arch.ops.conv against lax.conv_general_dilated: value, input and weight gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnn_arch.ops import conv as ops_conv

DN = ('NHWC', 'HWIO', 'NHWC')

# (batch, height, width, in channels, out channels, kernel, stride, padding, groups)
CASES = [
    (2, 8, 8, 4, 6, 3, 1, ((1, 1), (1, 1)), 1),
    (2, 9, 9, 4, 6, 3, 2, ((1, 1), (1, 1)), 1),
    (2, 10, 11, 4, 6, 3, 2, ((0, 1), (1, 0)), 1),    # asymmetric, even size (Flax 'SAME')
    (2, 8, 8, 4, 8, 1, 1, ((0, 0), (0, 0)), 1),
    (2, 9, 8, 4, 8, 1, 2, ((0, 0), (0, 0)), 1),      # ResNet downsample shortcut
    (1, 13, 12, 3, 5, 5, 1, ((2, 2), (2, 2)), 1),
    (2, 15, 13, 4, 8, 5, 4, ((2, 1), (0, 3)), 2),
    (1, 23, 21, 3, 8, 11, 4, ((2, 2), (2, 2)), 1),   # AlexNet conv1, odd sizes
    (2, 11, 11, 3, 4, 7, 2, ((3, 3), (3, 3)), 1),    # ResNet ImageNet stem
    (2, 7, 7, 64, 64, 3, 1, ((1, 1), (1, 1)), 32),   # ResNeXt grouped conv
    (2, 8, 8, 64, 64, 3, 2, ((1, 1), (1, 1)), 32),
    (2, 6, 6, 4, 4, 1, 1, ((2, 2), (2, 2)), 1),      # padding wider than the kernel
    (2, 9, 9, 4, 4, 2, 3, ((0, 0), (0, 0)), 1),      # stride larger than the kernel
    (2, 8, 8, 6, 6, 3, 1, ((1, 1), (1, 1)), 2),
]


def _conv(fn, stride, padding, groups, **kw):
  return lambda x, w: fn(x, w, (stride, stride), padding, dimension_numbers=DN,
                         feature_group_count=groups, **kw)


def _value_and_grads(fn, stride, padding, groups):
  """Jitted (y, dL/dx, dL/dw) for output cotangent g: one compilation per configuration."""
  def run(x, w, g):
    y, vjp = jax.vjp(_conv(fn, stride, padding, groups), x, w)
    return (y, *vjp(g))
  return jax.jit(run)


def _inputs(n, h, w, c, o, k, groups, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((k, k, c // groups, o)), jnp.float32)
  return x, kernel


def _assert_close(actual, expected):
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize('n,h,w,c,o,k,s,pad,groups', CASES)
def test_value_and_both_gradients_match_lax(n, h, w, c, o, k, s, pad, groups):
  x, kernel = _inputs(n, h, w, c, o, k, groups)
  y_shape = jax.eval_shape(_conv(lax.conv_general_dilated, s, pad, groups), x, kernel).shape
  g = jnp.asarray(np.random.default_rng(1).standard_normal(y_shape), jnp.float32)
  want = _value_and_grads(lax.conv_general_dilated, s, pad, groups)(x, kernel, g)
  got = _value_and_grads(ops_conv.conv_general_dilated, s, pad, groups)(x, kernel, g)
  for a, b in zip(got, want):
    assert a.shape == b.shape
    _assert_close(a, b)


@pytest.mark.parametrize('padding', ['SAME', 'VALID'])
def test_string_padding_matches_lax(padding):
  x, kernel = _inputs(2, 10, 9, 4, 6, 3, 1)
  loss = lambda fn: lambda x, w: jnp.sum(jnp.sin(_conv(fn, 2, padding, 1)(x, w)))
  want = jax.jit(jax.grad(loss(lax.conv_general_dilated), (0, 1)))(x, kernel)
  got = jax.jit(jax.grad(loss(ops_conv.conv_general_dilated), (0, 1)))(x, kernel)
  for a, b in zip(got, want):
    _assert_close(a, b)


def test_backward_uses_no_lhs_dilation_or_generic_weight_gradient():
  """The point of the op: its backward pass has no transposed (lhs-dilated) convolution, and
  the weight gradient is matrix products, not a convolution."""
  x, kernel = _inputs(2, 9, 9, 4, 6, 3, 1)
  grad = jax.grad(lambda x, w: jnp.sum(_conv(ops_conv.conv_general_dilated, 2,
                                             ((1, 1), (1, 1)), 1)(x, w)), (0, 1))
  jaxpr = str(jax.make_jaxpr(grad)(x, kernel))
  assert 'lhs_dilation=(2, 2)' not in jaxpr
  assert jaxpr.count('conv_general_dilated') == 1 + 4  # forward + one per input phase
  assert jaxpr.count('dot_general') == 1 and 'length=9' in jaxpr  # scan over the 9 taps


def test_jit_vmap_and_grad_of_grad_match_lax():
  x, kernel = _inputs(3, 7, 7, 4, 6, 3, 1)
  fast = _conv(ops_conv.conv_general_dilated, 2, ((1, 1), (1, 1)), 1)
  ref = _conv(lax.conv_general_dilated, 2, ((1, 1), (1, 1)), 1)
  _assert_close(jax.jit(fast)(x, kernel), ref(x, kernel))
  per_example = lambda f: jax.jit(jax.vmap(
      jax.grad(lambda x, w: jnp.sum(f(x[None], w) ** 2), 1), (0, None)))
  _assert_close(per_example(fast)(x, kernel), per_example(ref)(x, kernel))
  # Reverse-over-reverse: the backward pass is itself differentiable.
  gg = lambda f: jax.jit(jax.grad(lambda w: jnp.sum(jax.grad(
      lambda x: jnp.sum(jnp.tanh(f(x, w))))(x) ** 2)))(kernel)
  _assert_close(gg(fast), gg(ref))


def test_forward_mode_autodiff_raises():
  x, kernel = _inputs(1, 5, 5, 2, 2, 3, 1)
  fast = _conv(ops_conv.conv_general_dilated, 1, ((1, 1), (1, 1)), 1)
  with pytest.raises(TypeError, match='custom_vjp'):
    jax.jvp(fast, (x, kernel), (x, kernel))


def test_unsupported_configurations_fall_back_to_lax():
  x, kernel = _inputs(2, 9, 9, 4, 6, 3, 1)
  pad = ((1, 1), (1, 1))
  for kw in [dict(rhs_dilation=(2, 2)), dict(lhs_dilation=(2, 1)),
             dict(preferred_element_type=jnp.float32)]:
    fast = _conv(ops_conv.conv_general_dilated, 1, pad, 1, **kw)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(fast(x, w))))(kernel))
    assert 'custom_vjp' not in jaxpr and 'dot_general' not in jaxpr
    _assert_close(jax.jit(fast)(x, kernel),
                  jax.jit(_conv(lax.conv_general_dilated, 1, pad, 1, **kw))(x, kernel))
  nchw = jnp.transpose(x, (0, 3, 1, 2))
  want = lax.conv_general_dilated(nchw, jnp.transpose(kernel, (3, 2, 0, 1)), (1, 1), pad)
  got = ops_conv.conv_general_dilated(nchw, jnp.transpose(kernel, (3, 2, 0, 1)), (1, 1), pad)
  _assert_close(got, want)


def test_flax_conv_with_fast_op_matches_plain_flax_conv():
  x, _ = _inputs(2, 8, 8, 4, 1, 1, 1)
  make = lambda fn: nn.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)),
                            feature_group_count=2, conv_general_dilated=fn)
  params = jax.jit(make(None).init)(jax.random.key(0), x)
  loss = lambda fn: lambda p, x: jnp.sum(make(fn).apply(p, x) ** 2)
  want = jax.jit(jax.grad(loss(lax.conv_general_dilated), (0, 1)))(params, x)
  got = jax.jit(jax.grad(loss(ops_conv.conv_general_dilated), (0, 1)))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _assert_close(a, b)


def test_default_dispatch_uses_fast_op_only_on_cpu():
  x, kernel = _inputs(1, 5, 5, 2, 2, 3, 1)
  fn = _conv(ops_conv.default_conv_general_dilated, 1, ((1, 1), (1, 1)), 1)
  jaxpr = str(jax.make_jaxpr(fn)(x, kernel))
  assert ('custom_vjp' in jaxpr) == (jax.default_backend() == 'cpu')


def test_benchmark_smoke_and_frozen_step_moves_only_the_head(tmp_path):
  """experiments/benchmark.py end to end on a tiny ResNet-18, and its frozen-prefix step."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).parents[1] / 'experiments' / 'benchmark.py'
  spec = importlib.util.spec_from_file_location('benchmark', path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = tmp_path / 'bench.jsonl'
  args = bench.parse_args(['--cifar_stem', '--width=0.125', '--batch=2', '--image_size=8',
                           '--freeze_depth=5', '--conv=xla', f'--out={out}'])
  s = bench.setup_jax(args)
  bench.emit(s['info'], str(out))
  line = json.loads(out.read_text())
  assert (line['conv'], line['frozen'], line['batch']) == ('xla', 5, 2)
  assert line['macs_per_image'] > 0
  step, (params, *rest) = s['train']
  new_params = step(params, *rest)[0]
  changed = {k for k in params
             if any(np.any(a != b) for a, b in zip(jax.tree.leaves(params[k]),
                                                   jax.tree.leaves(new_params[k])))}
  assert changed == {'head'}
