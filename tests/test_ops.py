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
    (2, 2, 2, 8, 8, 3, 1, ((1, 1), (1, 1)), 1),      # ResNet-50 stage 4 at 64x64: output < kernel
    (2, 4, 3, 8, 8, 3, 2, ((1, 1), (1, 1)), 1),
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


def test_default_strided_conv_backward_is_phase_split_input_grad_and_xla_weight_grad():
  """CPU default for a dense strided 3x3 convolution: no lhs-dilated convolution (XLA:CPU's slow
  transposed convolution), and the weight gradient is XLA's own (Eigen), not the tap scan."""
  x, kernel = _inputs(2, 9, 9, 4, 6, 3, 1)
  grad = jax.grad(lambda x, w: jnp.sum(_conv(ops_conv.default_conv_general_dilated, 2,
                                             ((1, 1), (1, 1)), 1)(x, w)), (0, 1))
  jaxpr = str(jax.make_jaxpr(grad)(x, kernel))
  if jax.default_backend() != 'cpu':
    assert 'custom_vjp' not in jaxpr
    return
  assert 'lhs_dilation=(2, 2)' not in jaxpr
  # forward + one per input phase + the weight gradient; no matrix products, no scan
  assert jaxpr.count('conv_general_dilated') == 1 + 4 + 1
  assert 'dot_general' not in jaxpr and 'scan' not in jaxpr


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


def test_default_dispatch_uses_custom_vjp_only_for_grouped_1x1_and_strided_on_cpu():
  x, _ = _inputs(1, 6, 6, 2, 2, 1, 1)
  on_cpu = jax.default_backend() == 'cpu'
  for k, s, groups, want_fast in [(1, 2, 1, on_cpu), (1, 1, 1, on_cpu), (3, 1, 1, False),
                                  (3, 2, 1, on_cpu), (3, 1, 2, on_cpu), (3, 2, 2, on_cpu)]:
    kernel = jnp.ones((k, k, 2 // groups, 4), jnp.float32)
    fn = _conv(ops_conv.default_conv_general_dilated, s, ((k // 2, k // 2),) * 2, groups)
    jaxpr = str(jax.make_jaxpr(fn)(x, kernel))
    assert ('custom_vjp' in jaxpr) == want_fast, (k, s, groups)
  nchw = jnp.transpose(x, (0, 3, 1, 2))  # unsupported layout: lax even for 1x1
  jaxpr = str(jax.make_jaxpr(lambda a, b: ops_conv.default_conv_general_dilated(
      a, b, (1, 1), 'VALID'))(nchw, jnp.ones((4, 2, 1, 1))))
  assert 'custom_vjp' not in jaxpr


def test_default_dispatch_uses_im2col_only_when_the_output_is_smaller_than_the_kernel():
  on_cpu = jax.default_backend() == 'cpu'
  for h, k, s, groups, want in [(2, 3, 1, 1, on_cpu), (4, 3, 2, 1, on_cpu), (3, 3, 1, 1, False),
                                (11, 7, 2, 1, on_cpu), (2, 3, 1, 2, False), (8, 3, 1, 1, False)]:
    x, kernel = _inputs(1, h, h, 4, 4, k, groups)
    fn = _conv(ops_conv.default_conv_general_dilated, s, ((k // 2, k // 2),) * 2, groups)
    jaxpr = str(jax.make_jaxpr(fn)(x, kernel))
    assert ('conv_general_dilated' not in jaxpr) == want, (h, k, s, groups)
    with ops_conv.plain_lax():  # what cnn_arch.analysis reads: one plain convolution
      fresh = _conv(ops_conv.default_conv_general_dilated, s, ((k // 2, k // 2),) * 2, groups)
      jaxpr = str(jax.make_jaxpr(fresh)(x, kernel))
    assert 'conv_general_dilated' in jaxpr and 'cond' not in jaxpr and 'custom' not in jaxpr


@pytest.mark.parametrize('n,h,w,c,o,k,s,pad,groups', CASES)
def test_default_conv_value_and_both_gradients_match_lax(n, h, w, c, o, k, s, pad, groups):
  """The CPU default (fusion barrier + per-shape backward) behind a BatchNorm-ReLU-like producer,
  so the barrier sits where it matters: value and gradients of x, w and the affine parameters."""
  x, kernel = _inputs(n, h, w, c, o, k, groups)
  scale = jnp.linspace(0.5, 1.5, c)
  def loss(fn):
    conv = _conv(fn, s, pad, groups)
    return lambda x, w, a: jnp.sum(jnp.tanh(conv(jax.nn.relu(x * a + 0.1) + x, w)))
  want = jax.jit(jax.value_and_grad(loss(lax.conv_general_dilated), (0, 1, 2)))(x, kernel, scale)
  got = jax.jit(jax.value_and_grad(loss(ops_conv.default_conv_general_dilated), (0, 1, 2)))(
      x, kernel, scale)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.shape == b.shape
    _assert_close(a, b)


def test_fusion_barrier_survives_xla_and_is_shared_by_convolutions_of_one_input():
  """On CPU the compiled step keeps one conditional per distinct convolution input (the
  weight-gradient transposes read its buffer); on other backends there is none."""
  x, w3 = _inputs(2, 8, 8, 4, 4, 3, 1)
  w1 = jnp.ones((1, 1, 4, 4), jnp.float32)
  def loss(x, w3, w1):
    h = jax.nn.relu(x * 1.5 + 0.1)
    y = _conv(ops_conv.default_conv_general_dilated, 2, ((1, 1), (1, 1)), 1)(h, w3)
    y = y + _conv(ops_conv.default_conv_general_dilated, 2, ((0, 0), (0, 0)), 1)(h, w1)
    return jnp.sum(_conv(ops_conv.default_conv_general_dilated, 1, ((1, 1), (1, 1)), 1)(
        jax.nn.relu(y) + y, w3) ** 2)
  hlo = jax.jit(jax.grad(loss, (1, 2))).lower(x, w3, w1).compile().as_text()
  want = 2 if jax.default_backend() == 'cpu' else 0  # h (shared by two convs) and relu(y) + y
  assert hlo.count('conditional(') == want


def test_default_conv_forward_mode_vmap_and_nan_inputs_match_lax():
  x, kernel = _inputs(3, 7, 7, 4, 6, 3, 1)
  jvp = lambda f: jax.jit(lambda *p: jax.jvp(f, p, p))(x, kernel)
  # Stride 1 is lax behind the barrier, whose custom JVP is the identity's.
  for a, b in zip(jvp(_conv(ops_conv.default_conv_general_dilated, 1, ((1, 1), (1, 1)), 1)),
                  jvp(_conv(lax.conv_general_dilated, 1, ((1, 1), (1, 1)), 1))):
    _assert_close(a, b)
  fast = _conv(ops_conv.default_conv_general_dilated, 2, ((1, 1), (1, 1)), 1)
  ref = _conv(lax.conv_general_dilated, 2, ((1, 1), (1, 1)), 1)
  if jax.default_backend() == 'cpu':  # strided: a custom VJP, reverse mode only ...
    with pytest.raises(TypeError, match='forward-mode'):
      jvp(fast)
  with ops_conv.plain_lax():  # ... unless traced as plain lax (the documented way out)
    plain = _conv(ops_conv.default_conv_general_dilated, 2, ((1, 1), (1, 1)), 1)
    for a, b in zip(jvp(plain), jvp(ref)):
      _assert_close(a, b)
  per_example = lambda f: jax.jit(jax.vmap(
      jax.grad(lambda x, w: jnp.sum(f(x[None], w) ** 2), (0, 1)), (0, None)))
  for a, b in zip(per_example(fast)(x, kernel), per_example(ref)(x, kernel)):
    _assert_close(a, b)
  # The barrier's other branch (taken when the first element is NaN) returns the input too.
  x_nan = x.at[0, 0, 0, 0].set(jnp.nan)
  got, want = jax.jit(fast)(x_nan, kernel), ref(x_nan, kernel)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  _assert_close(jnp.nan_to_num(got), jnp.nan_to_num(want))


@pytest.mark.parametrize('k,s,groups', [(3, 2, 1), (1, 2, 1), (3, 1, 2)])
def test_default_conv_gradients_inside_shard_map_match_lax(k, s, groups):
  """Data-parallel step as in cnn_arch.train: replicated kernel, batch split over the mesh,
  pmean loss; the kernel's gradient must be the full-batch gradient."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((len(jax.devices()),), ('batch',))
  x, kernel = _inputs(2 * len(jax.devices()), 6, 6, 4, 4, k, groups)
  def grads(fn):
    conv = _conv(fn, s, ((k // 2, k // 2),) * 2, groups)
    def step(w, x):
      loss = lambda w, x: lax.pmean(jnp.mean(jnp.tanh(conv(jax.nn.relu(x) + x, w))), 'batch')
      return jax.grad(loss)(w, x)
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P('batch')), out_specs=P()))
  x = jax.device_put(x, jax.sharding.NamedSharding(mesh, P('batch')))
  _assert_close(grads(ops_conv.default_conv_general_dilated)(kernel, x),
                grads(lax.conv_general_dilated)(kernel, x))


def test_eigen_cpu_flag_is_added_once_and_never_over_a_user_setting():
  add = lambda env, version='0.10.2': ops_conv.use_eigen_cpu_convolutions(env, version)
  env = {}
  assert add(env) and env['XLA_FLAGS'] == ops_conv.CPU_XLA_FLAG
  assert not add(env) and env['XLA_FLAGS'] == ops_conv.CPU_XLA_FLAG
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  assert add(env)
  assert env['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=2 {ops_conv.CPU_XLA_FLAG}'
  user = {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=individual_convolution'}
  assert not add(user)
  assert user['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=individual_convolution'
  untested = {}
  assert not add(untested, '0.11.0') and untested == {}  # unknown flags abort XLA


def test_importing_ops_moves_cpu_convolutions_off_ynnpack():
  """In a fresh process, `import cnn_arch.ops` makes the default compile of a weight gradient
  identical to one compiled with YNNPACK turned off (and different from YNNPACK's)."""
  import os  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    pytest.skip('the flag is CPU-only')
  code = """
import jax, jax.numpy as jnp
from jax import lax
import cnn_arch.ops
f = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: f(x, w), w)[1](g)[0])
x = jax.random.normal(jax.random.key(0), (4, 12, 12, 32))
g = jax.random.normal(jax.random.key(1), (4, 12, 12, 32))
w = jnp.ones((3, 3, 32, 32))
run = lambda t: dw.lower(x, w, g).compile(
    compiler_options={'xla_cpu_experimental_ynn_fusion_type': t} if t is not None else None)(x, w, g)
ref = run(None)
print(bool((ref == run('')).all()),
      bool((ref == run('LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION')).all()))
"""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       cwd=pathlib.Path(__file__).parents[1], timeout=120, check=True)
  assert out.stdout.split()[-2:] == ['True', 'False']
