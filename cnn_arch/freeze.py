"""Freezing as data: `freeze_depth=k` names the parameter subtrees that fine-tuning leaves alone.

A model's stages are `('stem', 'stage1', ..., 'head')` and they are the top-level keys of its
parameters, so freezing the first k stages is a labelling of the parameter tree:
  * 'frozen'   - the first k stages: updates set to zero by `optax.set_to_zero`, so no optimizer
                 state is allocated for them and weight decay cannot move them;
  * 'backbone' - the unfrozen stages before the head (optionally at a smaller learning rate);
  * 'head'     - the classifier (and any auxiliary heads of a trainable stage).
The model itself stops the gradient at the frozen boundary (`common.run_stages`), so the step
does not compute what the mask would throw away (masking alone does not save work: optax#290).
"""

from typing import Sequence

import jax
import optax

from cnn_arch.models.common import HEAD, check_frozen

LABELS = ('frozen', 'backbone', 'head')


def max_depth(stage_names: Sequence[str]) -> int:
  """The largest freeze depth: every stage but the head frozen."""
  return len([s for s in stage_names if s != HEAD])


def frozen_stages(stage_names: Sequence[str], depth: int) -> tuple[str, ...]:
  """The names of the first `depth` stages; raises a ValueError naming the valid range."""
  check_frozen(depth, stage_names)
  return tuple(s for s in stage_names if s != HEAD)[:depth]


def labels(params: dict, stage_names: Sequence[str], depth: int,
           attached: dict[str, str] | None = None) -> dict:
  """A pytree like `params` with one label of LABELS per leaf.

  `attached` maps extra top-level keys (GoogLeNet's auxiliary heads) to the stage they hang
  from: they are frozen with it, else trained as heads. Every top-level key must be covered.
  """
  frozen = set(frozen_stages(stage_names, depth))
  attached = attached or {}
  unknown = set(params) - set(stage_names) - set(attached)
  if unknown:
    raise ValueError(f'Parameters {sorted(unknown)} belong to no stage of {tuple(stage_names)}.')

  def label(key):
    if key in frozen or attached.get(key) in frozen:
      return 'frozen'
    return 'head' if key == HEAD or key in attached else 'backbone'

  return {key: jax.tree_util.tree_map(lambda _, v=label(key): v, subtree)
          for key, subtree in params.items()}


def partition(transforms: dict[str, optax.GradientTransformation], param_labels: dict):
  """Routes each label to its transformation; frozen leaves get `set_to_zero` (no state)."""
  return optax.multi_transform({'frozen': optax.set_to_zero(), **transforms}, param_labels)
