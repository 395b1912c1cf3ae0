"""A 2-D convolution whose gradients run on matrix-multiply kernels (fast training on XLA:CPU).

XLA:CPU can lower the weight gradient of a convolution to a slow generic kernel
(openxla/xla#34273), and it lowers the input gradient of a strided convolution to a convolution
with `lhs_dilation`, another slow path (jax-ml/jax#23783). Measurements: docs/performance.md.
This op keeps XLA's forward convolution and replaces the backward pass (a `jax.custom_vjp`):

* weight gradient: for every kernel tap (i, j), the strided slice of the padded input that the
  tap sees, contracted with the output gradient over batch and space -- kh*kw matrix products
  (the im2col identity of Chellapilla et al., 2006, without materialising the im2col matrix),
  in a scan so that one slice is alive at a time;
* input gradient: a stride-1 convolution of the output gradient with the flipped kernel; for a
  strided convolution, one such convolution per input phase (the sub-pixel decomposition of
  Shi et al., 2016), so no `lhs_dilation` and no multiplications by inserted zeros.

`_Spec.weight_grad='lax'` keeps XLA's own weight gradient instead of the taps (the CPU default
for dense strided convolutions, where only the input gradient is worth replacing).

Both are exact reformulations (same sums, different order), so results match
`lax.conv_general_dilated` to float32 rounding. Anything outside NHWC/HWIO layouts, 2-D,
unit dilation and non-negative padding falls back to `lax.conv_general_dilated` unchanged.

`use_eigen_cpu_convolutions` is the CPU fix for the weight gradients: XLA:CPU (jaxlib 0.10 and
0.12) hands every convolution, gradients included, to YNNPACK, whose weight-gradient kernel is
slower than XLA's own Eigen convolution on ResNet's 3x3 layers; the flag sends convolutions back
to Eigen (docs/performance.md). It is an XLA flag, so it applies to the whole program and only
to the CPU backend; GPU and TPU compiles never read it.

`default_conv_general_dilated` also passes the input of every CPU convolution through
`_fusion_barrier`. Eigen needs the weight gradient's input transposed (NHWC -> CHWN), and XLA
fuses that transpose with the elementwise ops that produced the activation -- BatchNorm, ReLU
and, through the residual additions, every earlier block of the stage -- recomputing them in a
strided loop, several times slower than the bare transpose.
XLA does not fuse across a `conditional`, and `optimization_barrier` is removed before fusion, so
the barrier is a `lax.cond` on a run-time predicate whose branches both return the input: the
activation is computed once, and the forward convolution and the transpose both read that buffer
(docs/performance.md).
"""

import contextlib
import functools
import os
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_NHWC_DN = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                    out_spec=(0, 3, 1, 2))


class _Spec(NamedTuple):
  """The static description of one supported convolution (hashable: keys the custom_vjp cache)."""
  strides: tuple[int, int]
  pads: tuple[tuple[int, int], tuple[int, int]]
  groups: int
  precision: object
  weight_grad: str = 'taps'  # 'taps' (`_weight_grad`) or 'lax' (XLA's own: Eigen on CPU)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with the matmul-based backward pass (same signature and result).

  Returns the convolution output. Configurations the fast path does not cover (see module
  docstring) are computed by `lax.conv_general_dilated` itself.
  """
  spec = _fast_spec(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count, batch_group_count, precision,
                    preferred_element_type)
  if spec is None:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  return _conv_fn(spec)(lhs, rhs)


def default_conv_general_dilated(lhs, rhs, *args, **kwargs):
  """The convolution to train with on this backend (same signature as `lax`'s).

  On CPU, grouped convolutions (ResNeXt) and 1x1 convolutions get the matmul-backward op:
  XLA:CPU's grouped-convolution gradients are pathologically slow (jax-ml/jax#13800), and a 1x1
  weight gradient is one matrix product. A convolution whose output is smaller than its kernel
  (ResNet-50's 3x3 layers on 2x2 maps) is one im2col matrix product (`_im2col_conv`), where
  Eigen's kernel is slow. A dense strided convolution (ResNet's 3x3 downsampling) gets the custom
  VJP with the phase-split input gradient (no lhs-dilated convolution) and XLA's own weight
  gradient. Every other convolution is `lax.conv_general_dilated`: the per-tap 3x3 weight
  gradient is slower than Eigen's, and so is im2col on 4x4 and larger maps (docs/performance.md).
  On CPU every input also goes through `_fusion_barrier` (module docstring).
  GPU and TPU get plain `lax.conv_general_dilated`.

  The custom-VJP paths support reverse mode only: for `jax.jvp` (forward mode) through them,
  trace inside `plain_lax()`.
  """
  if jax.default_backend() != 'cpu' or _PLAIN.active:
    return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
  lhs = _fusion_barrier(lhs)
  path, spec = _cpu_path(lhs, rhs, *args, **kwargs)
  if path == 'im2col':
    return _im2col_conv(spec, lhs, rhs)
  if path == 'lax':
    return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
  return _conv_fn(spec)(lhs, rhs)


class _Plain(threading.local):
  active = False  # per thread, False until plain_lax() sets it


_PLAIN = _Plain()


@contextlib.contextmanager
def plain_lax():
  """While tracing inside it, `default_conv_general_dilated` is plain `lax.conv_general_dilated`.

  For code that reads the traced program as a model description (`cnn_arch.analysis`): one
  convolution per layer, whatever this backend would run. JAX caches traces by function, so
  trace a function object that was not traced outside it.
  """
  before, _PLAIN.active = _PLAIN.active, True
  try:
    yield
  finally:
    _PLAIN.active = before


@jax.custom_jvp
def _fusion_barrier(x):
  """x, unchanged, but materialised once: XLA cannot fuse its producers into its consumers.

  Both branches return x (XLA drops a conditional whose branches are identical, hence the
  double negation, which it simplifies away); the predicate only has to be unknown at compile
  time. Differentiation sees the identity (custom JVP), so no conditional reaches the backward
  pass and forward-mode autodiff works. Under `vmap` the cond becomes a select: still x.
  tests/test_ops.py checks that the conditional survives XLA's optimisation passes.
  """
  if x.size == 0 or not jnp.issubdtype(x.dtype, jnp.inexact):
    return x
  return lax.cond(jnp.isnan(x.reshape(-1)[0]), lambda v: -(-v), lambda v: v, x)


_fusion_barrier.defjvp(lambda primals, tangents: (_fusion_barrier(*primals), tangents[0]))


def _cpu_path(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, batch_group_count=1,
              precision=None, preferred_element_type=None):
  """('im2col' | 'fast' | 'strided' | 'lax', spec): how `default_conv_general_dilated` computes
  it on CPU ('strided': the custom VJP with the phase-split input gradient and XLA's weight
  gradient)."""
  spec = _fast_spec(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count, batch_group_count, precision,
                    preferred_element_type)
  if spec is None:
    return 'lax', None
  if spec.groups == 1 and any(o < k for o, k in zip(_out_hw(spec, lhs.shape, rhs.shape),
                                                    rhs.shape[:2])):
    return 'im2col', spec
  if spec.groups > 1 or rhs.shape[:2] == (1, 1):
    return 'fast', spec
  if spec.strides != (1, 1):
    return 'strided', spec._replace(weight_grad='lax')
  return 'lax', spec


def _out_hw(spec: _Spec, x_shape, w_shape) -> tuple[int, int]:
  return tuple((size + lo + hi - k) // s + 1 for size, k, s, (lo, hi)
               in zip(x_shape[1:3], w_shape[:2], spec.strides, spec.pads))


def _im2col_conv(spec: _Spec, x, w):
  """The convolution as one matrix product of (N*OH*OW, KH*KW*C) patches and the flat kernel.

  Autodiff of the slices and the product gives the gradients as matrix products plus
  pad-and-add, all small when the output is (the only case it is used for).
  """
  kh, kw, c, o = w.shape
  n = x.shape[0]
  (oh, ow), (sh, sw) = _out_hw(spec, x.shape, w.shape), spec.strides
  xp = jnp.pad(x, ((0, 0), *spec.pads, (0, 0)))
  taps = [lax.slice(xp, (0, i, j, 0), (n, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, c),
                    (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(taps, axis=-1).reshape(n * oh * ow, kh * kw * c)
  out = jnp.dot(patches, w.reshape(kh * kw * c, o), precision=spec.precision)
  return out.reshape(n, oh, ow, o)


# Removes only the convolution type from YNNPACK's fusions; its matmuls stay on.
CPU_XLA_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
# XLA aborts on an unknown XLA_FLAGS entry, so the (experimental) flag is only added on the
# jaxlib lines it was measured and tested on; re-measure before widening this.
_FLAG_JAXLIB_PREFIXES = ('0.10.', '0.12.')


def use_eigen_cpu_convolutions(environ=None, jaxlib_version=None) -> bool:
  """Adds `CPU_XLA_FLAG` to XLA_FLAGS unless the YNNPACK fusion option is already set there.

  XLA reads XLA_FLAGS once, when JAX creates its CPU backend, so call this before the first
  computation (`cnn_arch.ops` calls it on import). Returns True if it added the flag. To keep
  XLA's default, set `--xla_cpu_experimental_ynn_fusion_type=` to what you want in XLA_FLAGS
  yourself (an explicit setting is never overridden).
  """
  environ = os.environ if environ is None else environ
  if jaxlib_version is None:
    import jaxlib  # pylint: disable=g-import-not-at-top
    jaxlib_version = jaxlib.__version__
  flags = environ.get('XLA_FLAGS', '')
  if ('xla_cpu_experimental_ynn_fusion_type' in flags
      or not jaxlib_version.startswith(_FLAG_JAXLIB_PREFIXES)):
    return False
  environ['XLA_FLAGS'] = f'{flags} {CPU_XLA_FLAG}'.strip()
  return True


def _fast_spec(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count, batch_group_count, precision, preferred_element_type):
  """The `_Spec` of a convolution the fast path computes exactly, or None to fall back to lax."""
  if lhs.ndim != 4 or rhs.ndim != 4 or dimension_numbers is None:
    return None
  if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _NHWC_DN:
    return None
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    return None
  if batch_group_count != 1 or preferred_element_type is not None:
    return None
  if lhs.dtype != rhs.dtype or not jnp.issubdtype(lhs.dtype, jnp.floating):
    return None
  groups = feature_group_count
  if lhs.shape[3] != rhs.shape[2] * groups or rhs.shape[3] % groups:
    return None  # Let lax raise its own shape error.
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  for size, k, s, (lo, hi) in zip(lhs.shape[1:3], rhs.shape[:2], strides, pads):
    if s < 1 or lo < 0 or hi < 0 or size + lo + hi < k:
      return None
  if isinstance(precision, list):
    precision = tuple(precision)
  return _Spec(strides, pads, groups, precision)


@functools.lru_cache(maxsize=None)
def _conv_fn(spec: _Spec):
  """The custom_vjp convolution for one static configuration."""

  @jax.custom_vjp
  def conv(x, w):
    return _forward(spec, x, w)

  def fwd(x, w):
    return _forward(spec, x, w), (x, w)

  def bwd(res, g):
    x, w = res
    if spec.weight_grad == 'lax':
      dw, = jax.linear_transpose(lambda w: _forward(spec, x, w), w)(g)
    else:
      dw = _weight_grad(spec, x, g, w.shape)
    return (_invariant_like(_input_grad(spec, g, w, x.shape), x), _invariant_like(dw, w))

  conv.defvjp(fwd, bwd)
  return conv


def _invariant_like(cotangent, primal):
  """Inside shard_map, sums a cotangent over the mesh axes its primal is replicated over.

  That is JAX's own transpose rule for a replicated input (e.g. the weights under data
  parallelism), which a custom VJP must apply itself: the per-device weight gradients add up.
  """
  varying = lambda v: jax.typeof(v).manual_axis_type.varying
  axes = tuple(sorted(varying(cotangent) - varying(primal)))
  return lax.psum(cotangent, axes) if axes else cotangent


def _forward(spec: _Spec, x, w):
  return lax.conv_general_dilated(x, w, spec.strides, spec.pads, dimension_numbers=_NHWC_DN,
                                  feature_group_count=spec.groups, precision=spec.precision)


def _weight_grad(spec: _Spec, x, g, w_shape):
  """dL/dw[i, j] = sum over batch and output pixels of x_tap(i, j)^T g, one matmul per tap.

  x_tap(i, j) is the strided slice of the padded input that tap (i, j) multiplies. A scan over
  the taps keeps one slice alive at a time (unrolled, XLA materialises all kh*kw of them).
  """
  kh, kw, cg, cout = w_shape
  groups, (sh, sw) = spec.groups, spec.strides
  n, oh, ow, _ = g.shape
  phases = _input_phases(spec, x, (kh, kw), (oh, ow))
  taps = np.array([((i % sh) * sw + j % sw, i // sh, j // sw)
                   for i in range(kh) for j in range(kw)], np.int32)
  g2 = g.reshape(n * oh * ow, groups, cout // groups)

  def tap_grad(_, tap):
    phase, di, dj = tap[0], tap[1], tap[2]
    zero = jnp.zeros((), tap.dtype)  # every index of one integer type, also under jax_enable_x64
    xs = lax.dynamic_slice(phases, (phase, zero, di, dj, zero), (1, n, oh, ow, x.shape[3]))
    xs = xs.reshape(n * oh * ow, groups, cg)
    # (m, G, cg) x (m, G, og) -> (G, cg, og): contraction over m, batched over groups.
    return None, lax.dot_general(xs, g2, (((0,), (0,)), ((1,), (1,))),
                                 precision=spec.precision,
                                 preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))

  _, d = lax.scan(tap_grad, None, jnp.asarray(taps))
  return d.transpose(0, 2, 1, 3).reshape(w_shape).astype(x.dtype)


def _input_phases(spec: _Spec, x, kernel_hw, out_hw):
  """The padded input split into its sh*sw stride phases, (sh*sw, n, qh, qw, c).

  Phase (a, b) holds padded pixels (sh*q + a, sw*r + b), so tap (i, j) of output pixel
  (o, p) reads phase (i % sh, j % sw) at (o + i // sh, p + j // sw): a unit-stride slice.
  """
  (sh, sw), ((pt, _), (pl, _)) = spec.strides, spec.pads
  n, h, w, c = x.shape
  qh = (kernel_hw[0] - 1) // sh + out_hw[0]
  qw = (kernel_hw[1] - 1) // sw + out_hw[1]
  # Pad (or crop: unused trailing rows) to exactly qh*sh x qw*sw padded pixels.
  xp = lax.pad(x, jnp.zeros((), x.dtype),
               ((0, 0, 0), (pt, qh * sh - h - pt, 0), (pl, qw * sw - w - pl, 0), (0, 0, 0)))
  xp = xp.reshape(n, qh, sh, qw, sw, c).transpose(2, 4, 0, 1, 3, 5)
  return xp.reshape(sh * sw, n, qh, qw, c)


def _transposed_kernel(w, groups):
  """HWIO kernel of the adjoint convolution: spatially flipped, in/out swapped per group."""
  kh, kw, cg, cout = w.shape
  og = cout // groups
  wt = w.reshape(kh, kw, cg, groups, og).transpose(0, 1, 4, 3, 2).reshape(kh, kw, og, groups * cg)
  return wt[::-1, ::-1]


def _input_grad(spec: _Spec, g, w, x_shape):
  """dL/dx: stride-1 convolutions of g with the flipped kernel, one per input phase."""
  n, h, wd, c = x_shape
  sh, sw = spec.strides
  qh, qw = -(-h // sh), -(-wd // sw)  # Phase grid covering the input.
  if sh == sw == 1:
    return _phase_grad(spec, g, w, (0, 0), (qh, qw))
  rows = []
  for a in range(sh):
    cols = [_phase_grad(spec, g, w, (a, b), (qh, qw)) for b in range(sw)]
    rows.append(jnp.stack(cols, axis=3))  # (n, qh, qw, sw, c)
  # Interleave: input pixel (sh*q + a, sw*r + b) <- phase (a, b) at (q, r).
  dx = jnp.stack(rows, axis=2).reshape(n, qh * sh, qw * sw, c)
  return dx[:, :h, :wd].astype(g.dtype)


def _phase_plan(k, s, pad_lo, out_size, a, q):
  """Kernel taps and g padding for input pixels s*q + a (q < `q`) along one axis.

  Input pixel y sits at padded position pad_lo + y; tap ki meets it from output pixel o when
  pad_lo + y = s*o + ki, so only taps ki = c (mod s), c = (pad_lo + a) mod s, contribute, from
  o = q' + d - t for tap c + s*t, d = (pad_lo + a) // s: a stride-1 correlation with the flipped
  sub-kernel. Returns (c, (pad_lo, pad_hi) of g); negative padding crops.
  """
  c, d = (pad_lo + a) % s, (pad_lo + a) // s
  taps = len(range(c, k, s))
  return c, (taps - 1 - d, q + d - out_size)


def _phase_grad(spec: _Spec, g, w, phase, q_hw):
  """Gradient of the input pixels (sh*q + a, sw*r + b) for q < qh, r < qw (zero-padded)."""
  n, oh, ow, _ = g.shape
  kh, kw = w.shape[:2]
  (sh, sw), ((pt, _), (pl, _)) = spec.strides, spec.pads
  ch, pad_h = _phase_plan(kh, sh, pt, oh, phase[0], q_hw[0])
  cw, pad_w = _phase_plan(kw, sw, pl, ow, phase[1], q_hw[1])
  sub = w[ch::sh, cw::sw]
  if sub.shape[0] == 0 or sub.shape[1] == 0:
    return jnp.zeros((n, *q_hw, w.shape[2] * spec.groups), g.dtype)
  return lax.conv_general_dilated(g, _transposed_kernel(sub, spec.groups), (1, 1),
                                  (pad_h, pad_w), dimension_numbers=_NHWC_DN,
                                  feature_group_count=spec.groups, precision=spec.precision)
