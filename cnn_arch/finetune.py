"""Fine-tuning as data: the `finetune` config section becomes one `Plan` that the whole run reads.

A model's stages are `('stem', 'stage1', ..., 'head')`, the top-level keys of its parameters.
For each stage the plan says, in each phase of the run, whether it is trained or frozen; whether
it is loaded from `finetune.init_from` or re-initialised; and its learning-rate multiplier. A
frozen stage runs in inference mode (BatchNorm keeps its running statistics, dropout is off),
its parameters are constants for autodiff, so the backward pass stops below the lowest trained
stage (masking alone would still compute those gradients, optax#290), it holds no optimizer
state (`optax.set_to_zero`) and it comes out of every step bit-identical.

The methods, each a config key or two:
  * `freeze_depth=k`: freeze the first k stages, the lecture's recipe and Yosinski et al.
    (NeurIPS 2014), "How transferable are features in deep neural networks?".
  * `train_stages=('stem',)`: train exactly these stages (and the head unless
    `train_head=False`), freeze the rest: surgical fine-tuning, Lee et al. (ICLR 2023).
  * `reinit_above=True`: the stages above the frozen prefix start from a fresh initialisation
    instead of `init_from`, Yosinski et al.'s AnB (and BnB with the target's own base network).
  * `copy_depth=k`: only the first k stages come from `init_from`, the rest and the head start
    fresh, whatever is frozen: with `freeze_depth=0` Yosinski et al.'s AnB+; with k = every
    stage before the head, the lecture's re-initialised last layer even when the class count
    is unchanged.
  * `head_init_scale=s`: a freshly initialised head's kernel times s; 0 is the zero head of BiT
    (Kolesnikov et al., ECCV 2020) and big_vision.
  * `optim.layer_decay=d`: the i-th stage below the head learns at lr * d**i, the head at lr
    (layer-wise learning-rate decay: Clark et al., ICLR 2020; Bao et al., ICLR 2022).
  * `phases=((epochs, stages), ...)`: the run in phases that each train their own stages, e.g.
    LP-FT (Kumar et al., ICLR 2022: a linear probe, then everything) or gradual unfreezing
    (Howard & Ruder, ACL 2018: one more stage per phase). `stages` is a freeze depth k, a tuple
    of stage names, or 'all'. A phase change rebuilds the optimizer for the new labels and keeps
    the optimizer state of the stages that stay trained (`optim.carry_over`).
"""

import dataclasses
import math
from typing import Sequence

import jax
from ml_collections import ConfigDict

from cnn_arch.models.common import HEAD, check_frozen

FROZEN = 'frozen'  # the optimizer label of every frozen leaf
ALL = 'all'


@dataclasses.dataclass(frozen=True)
class Phase:
  """Steps `first_step..last_step` (1-based, inclusive) train every stage not in `frozen`."""
  first_step: int
  last_step: int
  frozen: tuple[str, ...]  # stage names, in model order; 'head' when the head is frozen


@dataclasses.dataclass(frozen=True)
class Plan:
  stage_names: tuple[str, ...]
  attached: dict  # extra top-level keys (GoogLeNet's auxiliary heads) -> the stage they hang from
  phases: tuple[Phase, ...]
  lr_mult: dict  # stage -> learning-rate multiplier
  reinit: tuple[str, ...]  # stages re-initialised instead of loaded from finetune.init_from
  head_init_scale: float

  @property
  def body(self) -> tuple[str, ...]:
    return tuple(s for s in self.stage_names if s != HEAD)

  def phase_at(self, step: int) -> int:
    """The index of the phase that runs `step`; a state after step N belongs to N's phase."""
    for i, phase in enumerate(self.phases):
      if step <= phase.last_step:
        return i
    return len(self.phases) - 1

  def stage_of(self, key: str) -> str:
    if key in self.stage_names:
      return key
    if key in self.attached:
      return self.attached[key]
    raise ValueError(f'Parameters {key!r} belong to no stage of {self.stage_names}.')

  @property
  def keys(self) -> tuple[str, ...]:
    """The top-level parameter keys: the stages and the heads attached to them."""
    return self.stage_names + tuple(self.attached)

  def frozen_keys(self, phase: int = 0) -> tuple[str, ...]:
    """The top-level parameter keys that `phase` keeps bit-identical."""
    return tuple(k for k in self.keys if self.stage_of(k) in self.phases[phase].frozen)

  def model_frozen(self, phase: int = 0) -> tuple[str, ...]:
    """What `model.apply(frozen=...)` takes: the frozen body stages."""
    return tuple(s for s in self.phases[phase].frozen if s != HEAD)

  def labels(self, params, phase: int = 0) -> dict:
    """A pytree like `params`: each leaf labelled with its top-level key, or FROZEN."""
    frozen = self.phases[phase].frozen
    return {k: jax.tree.map(lambda _, v=FROZEN if self.stage_of(k) in frozen else k: v, sub)
            for k, sub in params.items()}

  def key_lr_mult(self, key: str) -> float:
    """Auxiliary heads learn at the head's rate, like the classifier they stand beside."""
    return self.lr_mult[HEAD if key in self.attached else key]

  def trained(self, key: str) -> bool:
    """Whether any phase trains the stage of `key`."""
    return any(self.stage_of(key) not in p.frozen for p in self.phases)

  @property
  def cached_prefix(self) -> int:
    """Leading body stages frozen in every phase: what feature caching can precompute."""
    n = 0
    while n < len(self.body) and all(self.body[n] in p.frozen for p in self.phases):
      n += 1
    return n

  def describe(self) -> dict:
    """What results.json records of the plan."""
    return {'phases': [{'steps': [p.first_step, p.last_step], 'frozen': list(p.frozen)}
                       for p in self.phases],
            'lr_mult': {s: round(m, 6) for s, m in self.lr_mult.items()},
            'reinit': list(self.reinit)}


def _error(key: str, value, problem: str, fix: str) -> ValueError:
  return ValueError(f'Config value {key}={value!r} {problem}. Fix: {fix}.')


def _names(key: str, value, body: Sequence[str]) -> tuple[str, ...]:
  """Validated stage names, unique, in model order."""
  if isinstance(value, str):
    value = (value,)
  unknown = [n for n in value if n not in body]
  valid = ', '.join(body)
  if unknown:
    hint = (' (the head trains unless finetune.train_head=False)' if HEAD in unknown else '')
    raise _error(key, value, f'names {unknown}, which are not stages before the head of this '
                 f'model{hint}', f'use stage names from: {valid}')
  if len(set(value)) != len(value):
    raise _error(key, value, 'names a stage twice', 'name each stage once')
  return tuple(n for n in body if n in value)


def _frozen(key: str, spec, body: Sequence[str], train_head: bool) -> tuple[str, ...]:
  """The frozen stages of one phase from a freeze depth, stage names or 'all'."""
  if isinstance(spec, bool) or not isinstance(spec, (int, str, tuple, list)):
    raise _error(key, spec, 'is not a freeze depth, a tuple of stage names or "all"',
                 f'use e.g. 2, ("{body[-1]}",) or "all"')
  if isinstance(spec, int):
    check_frozen(spec, list(body) + [HEAD])
    frozen = tuple(body[:spec])
  elif spec == ALL:
    frozen = ()
  else:
    trained = _names(key, spec, body)
    frozen = tuple(s for s in body if s not in trained)
  return frozen + (() if train_head else (HEAD,))


def _phase_specs(ft: ConfigDict, num_epochs: float, body) -> list[tuple[float, tuple]]:
  """[(epochs, frozen stages)] of every phase; one phase unless finetune.phases is set."""
  if ft.train_stages is not None and ft.freeze_depth:
    raise ValueError(f'Config values finetune.train_stages={tuple(ft.train_stages)!r} and '
                     f'finetune.freeze_depth={ft.freeze_depth} both say which stages train. '
                     'Fix: set one of them (freeze_depth=0 or train_stages=None).')
  if not ft.phases:
    spec = ft.freeze_depth if ft.train_stages is None else tuple(ft.train_stages)
    key = 'finetune.freeze_depth' if ft.train_stages is None else 'finetune.train_stages'
    return [(num_epochs, _frozen(key, spec, body, ft.train_head))]
  if ft.train_stages is not None or ft.freeze_depth:
    raise ValueError('Config value finetune.phases is set together with finetune.freeze_depth '
                     'or finetune.train_stages: the phases already say which stages train. '
                     'Fix: set finetune.freeze_depth=0 and finetune.train_stages=None.')
  specs = []
  for i, phase in enumerate(ft.phases):
    key = f'finetune.phases[{i}]'
    if not (isinstance(phase, (tuple, list)) and len(phase) == 2):
      raise _error(key, phase, 'is not an (epochs, stages) pair',
                   'write each phase as (epochs, stages), e.g. (2.0, ()) then (8.0, "all")')
    epochs, spec = phase
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not (
        math.isfinite(epochs) and epochs > 0):
      raise _error(key, phase, 'has no epochs: its length must be a finite number > 0',
                   'give every phase a positive length, or drop it')
    specs.append((float(epochs), _frozen(key, spec, body, ft.train_head)))
  total = sum(e for e, _ in specs)
  if not math.isclose(total, num_epochs, rel_tol=1e-9, abs_tol=1e-9):
    raise ValueError(f'Config value finetune.phases lasts {total:g} epochs but '
                     f'train.num_epochs={num_epochs:g}. Fix: pass --config.train.num_epochs='
                     f'{total:g} or change the phase lengths to add up to it.')
  for i in range(1, len(specs)):
    if specs[i][1] == specs[i - 1][1]:
      raise ValueError(f'Config values finetune.phases[{i - 1}] and [{i}] train the same '
                       'stages, so they overlap in one phase. Fix: merge them into one phase.')
  return specs


def make_plan(config: ConfigDict, stage_names: Sequence[str], attached: dict | None,
              steps_per_epoch: int, total_steps: int) -> Plan:
  """The plan of `config` for a model with these stages; raises a ValueError naming the fix."""
  ft, stage_names = config.finetune, tuple(stage_names)
  body = tuple(s for s in stage_names if s != HEAD)
  specs = _phase_specs(ft, config.train.num_epochs, body)
  phases, first, epochs = [], 1, 0.0
  for i, (length, frozen) in enumerate(specs):
    if len(body) + 1 == len(frozen):
      raise _error('finetune.phases' if ft.phases else 'finetune.train_head', ft.train_head,
                   f'leaves nothing to train{f" in phase {i}" if ft.phases else ""}',
                   'train the head (finetune.train_head=True) or at least one stage')
    epochs += length
    last = total_steps if i == len(specs) - 1 else int(round(epochs * steps_per_epoch))
    if last < first:
      raise ValueError(f'Config value finetune.phases[{i}]={tuple(ft.phases[i])!r} is empty: '
                       f'{length:g} epochs round to no step at {steps_per_epoch} steps per '
                       'epoch. Fix: lengthen the phase or drop it.')
    phases.append(Phase(first, last, frozen))
    first = last + 1
  reinit = ()
  if ft.reinit_above and ft.copy_depth is not None:
    raise ValueError(f'Config values finetune.reinit_above=True and finetune.copy_depth='
                     f'{ft.copy_depth} both say which stages are copied. Fix: set one of them '
                     '(reinit_above=False or copy_depth=None).')
  if ft.reinit_above or ft.copy_depth is not None:
    name, off = ('reinit_above', False) if ft.reinit_above else ('copy_depth', None)
    if not ft.init_from:
      raise _error(f'finetune.{name}', ft[name], 'needs a network to copy stages from',
                   f'set finetune.init_from, or {name}={off}')
    if ft.reinit_above:
      copied = next((i for i, s in enumerate(body) if s not in phases[0].frozen), len(body))
    elif ft.copy_depth > len(body):
      raise _error('finetune.copy_depth', ft.copy_depth, f'exceeds the {len(body)} stages '
                   f'before the head ({", ".join(body)})', f'use 0..{len(body)}')
    else:
      copied = ft.copy_depth
    reinit = body[copied:] + (HEAD,)
  decay, backbone = config.optim.layer_decay, config.optim.backbone_lr_mult
  lr_mult = {s: backbone * decay ** (len(body) - i) for i, s in enumerate(body)}
  lr_mult[HEAD] = 1.0
  return Plan(stage_names=stage_names, attached=dict(attached or {}), phases=tuple(phases),
              lr_mult=lr_mult, reinit=reinit, head_init_scale=ft.head_init_scale)


def prefix_plan(stage_names: Sequence[str], depth: int, attached: dict | None = None) -> Plan:
  """The plan of `freeze_depth=depth` alone: one phase, nothing re-initialised."""
  body = tuple(s for s in stage_names if s != HEAD)
  frozen = _frozen('finetune.freeze_depth', depth, body, train_head=True)
  return Plan(stage_names=tuple(stage_names), attached=dict(attached or {}),
              phases=(Phase(1, 1, frozen),), lr_mult={s: 1.0 for s in stage_names},
              reinit=(), head_init_scale=1.0)
