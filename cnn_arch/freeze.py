"""The lecture's prefix freezing in three coarse labels, a view of `cnn_arch.finetune`'s plan.

  * 'frozen'   - the first k stages (and the auxiliary heads hanging from them);
  * 'backbone' - the trained stages before the head;
  * 'head'     - the classifier and any auxiliary heads of a trained stage.
"""

from typing import Sequence

import jax

from cnn_arch import finetune
from cnn_arch.models.common import HEAD

LABELS = ('frozen', 'backbone', 'head')


def frozen_stages(stage_names: Sequence[str], depth: int) -> tuple[str, ...]:
  """The names of the first `depth` stages; raises a ValueError naming the valid range."""
  return finetune.prefix_plan(stage_names, depth).model_frozen()


def labels(params: dict, stage_names: Sequence[str], depth: int,
           attached: dict[str, str] | None = None) -> dict:
  """A pytree like `params` with one label of LABELS per leaf, for `freeze_depth=depth`."""
  plan = finetune.prefix_plan(stage_names, depth, attached)

  def role(key):
    if plan.stage_of(key) in plan.phases[0].frozen:
      return 'frozen'
    return 'head' if key == HEAD or key in plan.attached else 'backbone'

  return {k: jax.tree.map(lambda _, v=role(k): v, sub) for k, sub in params.items()}
