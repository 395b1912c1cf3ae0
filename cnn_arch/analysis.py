"""Per-layer output shapes, parameters, MACs and receptive fields of any Flax model.

`analyze` is the library behind `python -m cnn_arch.summary` (which formats it). The forward pass
is traced to a jaxpr (parameters as shapes only) and walked as a dataflow analysis, so branches
need no special case. Every value carries, per spatial dimension, its receptive field and
cumulative stride ("jump"); convolutions and pools grow them (Araujo, Norris & Sim, "Computing
Receptive Fields of Convolutional Neural Networks", Distill 2019: rf_out = rf_in +
(k-1)*dilation*jump_in, jump_out = jump_in*stride) and every other op takes the maximum over its
inputs, so a shortcut never widens a block's field. Layers are named by the Flax module scopes on
the equations' name stacks (`stage1/block0/conv2`).

MACs are the multiply-accumulates of convolutions and dense layers, the convention of
torchvision's 1.81 GFLOPS for ResNet-18. XLA's cost analysis is reported beside them: it counts 2
FLOPs per MAC but skips taps on padding, and adds elementwise work (bias, ReLU, norms, pools).
"""

import dataclasses
import math
from fractions import Fraction
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from cnn_arch.ops import conv as conv_ops

_POOLS = {'reduce_window_max': 'max_pool', 'reduce_window_sum': 'avg_pool',
          'reduce_window_min': 'min_pool', 'reduce_window': 'pool'}
_REDUCTIONS = {'reduce_sum': 'avg_pool', 'reduce_max': 'max_pool', 'reduce_min': 'min_pool',
               'argmax': 'argmax'}
_RELAYOUTS = ('reshape', 'broadcast_in_dim', 'transpose', 'squeeze')
_MAC_OPS = ('conv', 'dense', 'matmul')
_IDENTITY = (1, 1, 1, 1)  # (kernel, dilation, stride, base dilation) of a pixel-wise op


@dataclasses.dataclass(frozen=True)
class _Field:
  """Per spatial dimension (H, W) of one value, in input pixels: the receptive field of one
  element, the jump between neighbours, the span seen by the whole tensor; and the array axes
  holding H and W (None once pooled or flattened away)."""
  rf: tuple
  jump: tuple
  axes: tuple
  span: tuple


def _grow(f: _Field, rule, out_shape=None) -> _Field:
  """Applies `rule(axis) -> (kernel, dilation, stride, base_dilation, new_axis)` to H and W; a
  windowed op (with `out_shape`) makes a new regular grid, whose span follows.

  A base (input) dilation b, as in a transposed convolution, puts input pixels jump/b apart.
  """
  rf, jump, axes, span = list(f.rf), list(f.jump), list(f.axes), list(f.span)
  for d, ax in enumerate(f.axes):
    if ax is None:
      continue
    k, dilation, stride, base, axes[d] = rule(ax)
    step = jump[d] if base == 1 else Fraction(jump[d], base)
    rf[d] += (k - 1) * dilation * step
    jump[d] = step * stride
    if out_shape is not None and axes[d] is not None:
      span[d] = rf[d] + (out_shape[axes[d]] - 1) * jump[d]
  return _Field(tuple(rf), tuple(jump), tuple(axes), tuple(span))


def _collapse(f: _Field, shape, gone, keep, grow: bool = True) -> _Field:
  """Spatial axes in `gone` are summarised away (with `grow`, the result sees their whole
  extent); the others move to `keep(axis)`."""
  return _grow(f, lambda ax: (shape[ax] if grow else 1, 1, 1, 1, None) if ax in gone
               else (*_IDENTITY, keep(ax)))


def _merge(fields: Sequence[_Field | None]) -> _Field | None:
  """Elementwise ops, concatenation, residual additions: the union of the inputs' views."""
  fs = [f for f in fields if f is not None]
  if not fs:
    return None
  axes = next((f.axes for f in fs if f.axes != (None, None)), fs[0].axes)
  top = lambda attr: tuple(map(max, zip(*(getattr(f, attr) for f in fs))))
  return _Field(top('rf'), top('jump'), axes, top('span'))


def _conv(eqn, f):
  dn, p = eqn.params['dimension_numbers'], eqn.params
  kernel = eqn.invars[1].aval.shape
  lhs_sp, rhs_sp, out_sp = dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:]

  def rule(ax):
    if ax not in lhs_sp:
      return (*_IDENTITY, None)
    i = lhs_sp.index(ax)
    return (kernel[rhs_sp[i]], p['rhs_dilation'][i], p['window_strides'][i],
            p['lhs_dilation'][i], out_sp[i])
  # The kernel's input-feature dimension already holds C_in / feature_group_count.
  macs = math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel) // kernel[dn.rhs_spec[0]]
  return (f and _grow(f, rule, eqn.outvars[0].aval.shape)), macs


def _pool(eqn, f):
  p = eqn.params
  return _grow(f, lambda ax: (p['window_dimensions'][ax], p['window_dilation'][ax],
                              p['window_strides'][ax], p['base_dilation'][ax], ax),
               eqn.outvars[0].aval.shape)


def _dot(eqn, fields):
  """dense (one operand is data) or matmul (both are): each output sees the whole span of the
  spatial axes it contracts or that were pooled before (by adaptive pooling, say)."""
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  macs = math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[c] for c in lc)
  n_lhs_free = len(lhs) - len(lc) - len(lb)
  outs = []
  for f, shape, contract, batch, offset in ((fields[0], lhs, lc, lb, len(lb)),
                                            (fields[1], rhs, rc, rb, len(lb) + n_lhs_free)):
    if f is not None:  # output axes: batch dims, then lhs free dims, then rhs free dims
      free = [a for a in range(len(shape)) if a not in contract and a not in batch]
      outs.append(_collapse(f, shape, contract, lambda ax, b=batch, fr=free, o=offset:
                            b.index(ax) if ax in b else o + fr.index(ax)))
  outs = [dataclasses.replace(f, rf=tuple(r if a is not None else max(r, s)
                                          for r, s, a in zip(f.rf, f.span, f.axes)))
          for f in outs]
  return _merge(outs), macs


def _relayout(eqn, f: _Field) -> _Field:
  """Ops that move or drop axes without mixing pixels (reshape, broadcast, transpose, squeeze)."""
  prim, p = eqn.primitive.name, eqn.params
  shape, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
  if prim == 'transpose':
    return _collapse(f, shape, (), p['permutation'].index)
  if prim == 'broadcast_in_dim':
    return _collapse(f, shape, (), lambda ax: p['broadcast_dimensions'][ax])
  if prim == 'squeeze':
    dims = p['dimensions']
    return _collapse(f, shape, dims, lambda ax: ax - sum(d < ax for d in dims))
  # reshape: an axis survives if everything up to it is unchanged. Flattening it away (before a
  # dense layer) means the consumer sees its whole extent.
  gone = [ax for ax in f.axes if ax is not None and shape[:ax + 1] != out[:ax + 1]]
  return _collapse(f, shape, gone, lambda ax: ax)


def _propagate(eqn, fields, statistics: bool):
  """Returns (output field, layer kind or None, MACs) of one equation.

  `statistics`: the equation belongs to a parameterised module other than a conv or dense layer
  (BatchNorm, GroupNorm): its spatial means are statistics, not part of the receptive field.
  """
  prim, f = eqn.primitive.name, fields[0] if fields else None
  if not any(fields):  # parameters and constants
    return None, None, 0
  if prim == 'conv_general_dilated':
    field, macs = _conv(eqn, f)
    return field, 'conv', macs
  if prim == 'dot_general':
    field, macs = _dot(eqn, fields)
    return field, ('matmul' if all(fields) else 'dense'), macs
  if prim in _POOLS and f is not None:
    return _pool(eqn, f), _POOLS[prim], 0
  if prim in _REDUCTIONS and f is not None:
    axes, shape = eqn.params['axes'], eqn.invars[0].aval.shape
    spatial = not statistics and set(axes) & set(f.axes)
    field = _collapse(f, shape, axes, lambda ax: ax - sum(a < ax for a in axes), grow=spatial)
    if not spatial:
      return field, None, 0
    # A mean over one bin of an adaptive pool (a slice) sees less than the whole span.
    whole = all(field.rf[d] >= f.span[d] for d, ax in enumerate(f.axes) if ax in axes)
    return field, ('global_' if whole else 'adaptive_') + _REDUCTIONS[prim], 0
  if prim in _RELAYOUTS and f is not None:
    return _relayout(eqn, f), None, 0
  ndim = eqn.outvars[0].aval.ndim
  same_rank = [g if g is None or v.aval.ndim == ndim else dataclasses.replace(g, axes=(None,) * 2)
               for g, v in zip(fields, eqn.invars)]
  return _merge(same_rank), None, 0


def _scopes(name_stack: str) -> list[str]:
  """Flax module scopes of an equation: `M/stage2/block0/block0.shortcut/downsample_conv` ->
  [M, stage2, block0, downsample_conv] (a module's own methods add `name.method` scopes)."""
  scopes = []
  for scope in name_stack.split('/'):
    module = scope.split('.')[0]
    if module and not (module != scope and scopes[-1:] == [module]):
      scopes.append(module)
  return scopes


def _sub_jaxpr(eqn):
  """The body of call-like equations (jit, custom_jvp/custom_vjp calls, remat), else None."""
  if eqn.primitive.name in _POOLS or eqn.primitive.name in ('scan', 'while', 'cond'):
    return None
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    sub = eqn.params.get(key)
    sub = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
    if isinstance(sub, jcore.Jaxpr) and len(sub.invars) == len(eqn.invars):
      return sub
  return None


def _owner(params, path) -> tuple[tuple, dict] | tuple[None, None]:
  """The longest prefix of `path` naming a module that holds parameters itself (a conv, dense or
  norm layer, not a container of them), and its parameters."""
  node, found = params, (None, None)
  for i, name in enumerate(path):
    if not isinstance(node, dict) or name not in node:
      break
    node = node[name]
    if isinstance(node, dict) and any(not isinstance(v, dict) for v in node.values()):
      found = tuple(path[:i + 1]), node
  return found


def _pair(values):
  """An (H, W) pair as one number when square."""
  a, b = (int(v) if v == int(v) else float(v) for v in values)
  return a if a == b else [a, b]


class _Walker:
  """Walks a jaxpr, propagating fields and recording one row per layer."""

  def __init__(self, params, root: str, batch: int):
    self.params, self.root, self.batch = params, root, batch
    self.rows, self.names = [], set()
    self.by_owner = {}  # module path -> its row; a module's parameters are counted there, once.
    self.tail = {}  # value -> the pooling row it completes (keepdims reshapes, bin concatenation)

  def walk(self, jaxpr, fields, scope: list[str]):
    env = dict(zip(jaxpr.invars, fields))
    read = lambda v: None if isinstance(v, jcore.Literal) else env.get(v)
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      # Name stacks inside a sub-jaxpr are relative to the calling equation's.
      path = _scopes('/'.join(scope + [str(eqn.source_info.name_stack)]))
      sub = _sub_jaxpr(eqn)
      outs = self.walk(sub, ins, path) if sub is not None else self._visit(eqn, ins, path)
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  def _visit(self, eqn, ins, path):
    path = path[1:] if path[:1] == [self.root] else path
    owner, owned = _owner(self.params, path)
    field, kind, macs = _propagate(eqn, ins, statistics=owner is not None)
    shape = eqn.outvars[0].aval.shape
    tails = [self.tail[v] for v in eqn.invars if isinstance(v, jcore.Var) and v in self.tail]
    if kind in _MAC_OPS:
      row = self.by_owner.get(owner)
      if row is not None and row['op'] not in _MAC_OPS:
        row['op'] = kind  # the module ran pixel-wise ops (padding) before its convolution
      else:  # first use, or a second convolution of the same module
        row = self._new('/'.join(owner or path + [kind]), kind, owner, owned)
      row['macs'] += macs // self.batch
    elif kind:
      name, last = '/'.join(path + [kind]), self.rows[-1] if self.rows else None
      pooled = kind.startswith(('global', 'adaptive'))
      # Adaptive pooling takes means over H, then W, bin by bin: one layer, not many.
      merge = pooled and last is not None and (last['op'], last['_base']) == (kind, name)
      row = last if merge else self._new(name, kind)
      if pooled:
        self.tail.update((v, row) for v in eqn.outvars)
    elif tails and owner is None and len(shape) > len(tails[0]['output_shape']):
      row = tails[0]  # completes the pooling (keepdims reshape, division, concatenated bins)
      self.tail.update((v, row) for v in eqn.outvars)
    elif owner is not None and field is not None:
      op = 'norm' if set(owned) <= {'scale', 'bias'} else 'params'
      row = self.by_owner.get(owner) or self._new('/'.join(owner), op, owner, owned)
    else:
      row = None
    if row is not None and (kind or row['op'] not in _MAC_OPS):
      self._output(row, shape, field)
    return [field] * len(eqn.outvars)

  def _new(self, name: str, op: str, owner: tuple | None = None, owned: dict | None = None):
    unique, n = name, 0
    while unique in self.names:
      n += 1
      unique = f'{name}_{n}'
    self.names.add(unique)
    row = {'name': unique, 'op': op, 'output_shape': [], 'params': 0, 'macs': 0,
           'receptive_field': None, 'stride': None, '_base': name}
    if owner is not None and owner not in self.by_owner:
      row['params'] = sum(math.prod(v.shape) for v in owned.values() if not isinstance(v, dict))
      self.by_owner[owner] = row
    self.rows.append(row)
    return row

  @staticmethod
  def _output(row, shape, field):
    row['output_shape'] = list(shape[1:])  # per image
    if field is not None:
      row['receptive_field'] = _pair(field.rf)
      row['stride'] = None if field.axes == (None, None) else _pair(field.jump)


def analyze(model: nn.Module, input_shape: Sequence[int], *, name: str | None = None,
            xla: bool = False, call_kwargs: dict[str, Any] | None = None) -> dict:
  """Analyses `model.apply(variables, x, **call_kwargs)` (default `train=False`) on NHWC inputs.

  Returns {'model', 'image_size', 'total_params', 'total_macs', 'xla_flops' (None unless `xla`:
  compiling big models takes seconds), 'layers': [{'name', 'op', 'output_shape', 'params', 'macs',
  'receptive_field', 'stride'}] in forward order}, figures per image. Receptive fields and
  strides are in input pixels, one number when square; `stride` is None once the spatial grid is
  pooled or flattened away.
  """
  kwargs = {'train': False} if call_kwargs is None else call_kwargs
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  apply = lambda variables, x: model.apply(variables, x, **kwargs)
  # Module scopes on the name stack are what name the layers; flax_profile could turn them off.
  # Plain lax convolutions: one per layer, not the CPU's im2col or fusion barriers.
  with nn.override_named_call(True), conv_ops.plain_lax():
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kwargs), x)
    closed = jax.make_jaxpr(apply)(variables, x)
  params = variables.get('params', {})
  walker = _Walker(params, model.name or type(model).__name__, batch=input_shape[0])
  image = _Field(rf=(1, 1), jump=(1, 1), axes=(1, 2), span=tuple(input_shape[1:3]))
  n_vars = len(jax.tree.leaves(variables))
  walker.walk(closed.jaxpr, [None] * n_vars + [image], [])
  total_params = sum(math.prod(v.shape) for v in jax.tree.leaves(params))
  rows = [{k: v for k, v in row.items() if k != '_base'} for row in walker.rows]
  unattributed = total_params - sum(row['params'] for row in rows)
  if unattributed:  # Parameters used outside any module scope, or not used at all.
    rows.append({'name': '(unattributed)', 'op': 'params', 'output_shape': [],
                 'params': unattributed, 'macs': 0, 'receptive_field': None, 'stride': None})
  height, width = input_shape[1:3]
  return {'model': name or type(model).__name__,
          'image_size': height if height == width else [height, width],
          'total_params': total_params,
          'total_macs': sum(row['macs'] for row in rows),
          'xla_flops': _xla_flops(apply, variables, x) / input_shape[0] if xla else None,
          'layers': rows}


def _xla_flops(apply, variables, x) -> float:
  """XLA's flop count of the compiled forward pass (compiled from shapes, never run)."""
  with conv_ops.plain_lax():
    lowered = jax.jit(apply).lower(variables, x)
  cost = lowered.compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])
