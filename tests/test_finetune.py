"""The fine-tuning plan (`cnn_arch.finetune`): for each key, which leaves move and which stay
bit-identical, the optimizer state it holds, what results.json reports, phases and their resume,
ghost BatchNorm, and the errors of impossible plans."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_arch import checkpoint, finetune, models, optim, train
from cnn_arch.train_setup import make_setup
from tests.test_train import ROOT, leaves_equal, run_steps, tiny_config

BODY = ('stem', 'stage1', 'stage2', 'stage3', 'stage4')


def moved(before, after, key) -> tuple[bool, bool]:
  """(parameters moved, BatchNorm statistics moved) of one top-level key."""
  return (not leaves_equal(before.params[key], after.params[key]),
          not leaves_equal(before.batch_stats.get(key, {}), after.batch_stats.get(key, {})))


def float_state(state) -> int:
  return opt_floats(state.opt_state)


def opt_floats(opt_state) -> int:
  """Optimizer-state floats but the learning rate (a scalar of the state, `optim.make`)."""
  return sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
             if x.dtype == np.float32 and 'hyperparams' not in jax.tree_util.keystr(p))


def size(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('finetune_cfg, trained', [
    (dict(train_stages=('stem',)), ('stem', 'head')),
    (dict(train_stages=('stage2', 'stage4')), ('stage2', 'stage4', 'head')),
    (dict(train_stages=('stage4',), train_head=False), ('stage4',)),
    (dict(train_stages=()), ('head',)),
    (dict(freeze_depth=2, train_head=False), ('stage2', 'stage3', 'stage4')),
])
def test_train_stages_move_exactly_the_stages_named(finetune_cfg, trained):
  c = tiny_config(finetune=finetune_cfg, optim=dict(weight_decay=0.1))
  s, before, after = run_steps(c, 3)
  for key in s.stage_names:
    params, stats = moved(before, after, key)
    assert params == (key in trained), key
    if key in before.batch_stats:
      assert stats == (key in trained), key
  # Frozen leaves hold no optimizer state: one momentum buffer per trained parameter.
  assert float_state(after) == sum(size(after.params[k]) for k in trained)


def test_surgical_first_stage_gets_gradients_through_frozen_stages_above_it():
  # train_stages=('stem',): stages 1-4 run frozen (inference mode) but pass the gradient down.
  s = make_setup(tiny_config(finetune=dict(train_stages=('stem',))))
  assert s.plan.model_frozen() == BODY[1:] and s.plan.frozen_keys() == BODY[1:]
  # The backward pass stops below the lowest trained stage: with stage4 alone trained the model
  # stops the gradient at stage3's output, exactly as freeze_depth=4 does.
  surgical = make_setup(tiny_config(finetune=dict(train_stages=('stage4',)))).plan
  prefix = make_setup(tiny_config(finetune=dict(freeze_depth=4))).plan
  assert surgical.phases == prefix.phases and surgical.cached_prefix == 4


def test_layer_decay_scales_each_stage_update_by_its_power():
  c = tiny_config(optim=dict(layer_decay=0.5, weight_decay=0.0))
  s = make_setup(c)
  assert s.plan.lr_mult == {'stem': 0.5**5, 'stage1': 0.5**4, 'stage2': 0.5**3,
                            'stage3': 0.5**2, 'stage4': 0.5, 'head': 1.0}
  flat = make_setup(tiny_config(optim=dict(weight_decay=0.0)))
  params = train.init_state(s, c).params
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25) + p, params)
  decayed, _ = s.optimizers[0].update(grads, s.optimizers[0].init(params), params)
  full, _ = flat.optimizers[0].update(grads, flat.optimizers[0].init(params), params)
  for key, mult in s.plan.lr_mult.items():  # powers of 2: the products are exact
    for a, b in zip(jax.tree.leaves(decayed[key]), jax.tree.leaves(full[key])):
      np.testing.assert_array_equal(a, mult * b)


def test_backbone_lr_mult_and_layer_decay_multiply():
  s = make_setup(tiny_config(optim=dict(layer_decay=0.5, backbone_lr_mult=0.1)))
  assert s.plan.lr_mult['stage4'] == pytest.approx(0.05) and s.plan.lr_mult['head'] == 1.0


@pytest.mark.parametrize('scale', [0.0, 0.5])
def test_head_init_scale_scales_the_fresh_head_only(scale, pretrained):
  plain = tiny_config()
  kernel = train.init_state(make_setup(plain), plain).params['head']['kernel']
  c = tiny_config(finetune=dict(head_init_scale=scale))
  state = train.init_state(make_setup(c), c)
  np.testing.assert_array_equal(state.params['head']['kernel'], kernel * scale)
  # A head loaded from init_from (same class count) is kept as it was saved.
  loaded, _ = checkpoint.load_pretrained(pretrained)
  c = tiny_config(finetune=dict(head_init_scale=scale, init_from=pretrained))
  state = train.init_state(make_setup(c), c)
  assert leaves_equal(state.params['head'], loaded['params']['head'])


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  train.train_and_evaluate(tiny_config(train=dict(num_epochs=1.0)), workdir)
  return workdir


def test_reinit_above_copies_the_frozen_prefix_and_reinitialises_the_rest(pretrained):
  loaded, _ = checkpoint.load_pretrained(pretrained)
  scratch = tiny_config()
  fresh = train.init_state(make_setup(scratch), scratch)
  c = tiny_config(finetune=dict(init_from=pretrained, freeze_depth=2, reinit_above=True))
  s = make_setup(c)
  assert s.plan.reinit == ('stage2', 'stage3', 'stage4', 'head')
  state = train.init_state(s, c)
  for key in s.stage_names:
    source = loaded if key in ('stem', 'stage1') else {'params': fresh.params,
                                                       'batch_stats': fresh.batch_stats}
    assert leaves_equal(state.params[key], source['params'][key]), key
    assert leaves_equal(state.batch_stats.get(key, {}), source['batch_stats'].get(key, {})), key
  assert not leaves_equal(state.params['stage3'], loaded['params']['stage3'])


def test_copy_depth_copies_a_prefix_and_trains_everything(pretrained):
  """AnB+: the first 2 stages from the checkpoint, the rest fresh, nothing frozen."""
  loaded, _ = checkpoint.load_pretrained(pretrained)
  scratch = tiny_config()
  fresh = train.init_state(make_setup(scratch), scratch)
  c = tiny_config(finetune=dict(init_from=pretrained, copy_depth=2))
  s = make_setup(c)
  assert s.plan.reinit == ('stage2', 'stage3', 'stage4', 'head')
  assert s.plan.phases[0].frozen == ()
  state = train.init_state(s, c)
  for key in s.stage_names:
    source = loaded['params'] if key in ('stem', 'stage1') else fresh.params
    assert leaves_equal(state.params[key], source[key]), key
  with pytest.raises(ValueError, match=r'copy_depth=6 exceeds the 5 stages before the head '
                     r'\(stem, stage1, stage2, stage3, stage4\).*use 0..5'):
    make_setup(tiny_config(finetune=dict(init_from=pretrained, copy_depth=6)))
  head_only = make_setup(tiny_config(finetune=dict(init_from=pretrained, copy_depth=5)))
  assert head_only.plan.reinit == ('head',)


LP_FT = dict(phases=((1.0, ()), (1.0, 'all')))  # 5 steps of linear probe, then 5 of everything


def test_phases_split_the_steps_and_each_trains_its_stages():
  s = make_setup(tiny_config(finetune=LP_FT))
  assert [(p.first_step, p.last_step) for p in s.plan.phases] == [(1, 5), (6, 10)]
  assert s.plan.phases[0].frozen == BODY and s.plan.phases[1].frozen == ()
  assert [s.plan.phase_at(n) for n in (0, 1, 5, 6, 10)] == [0, 0, 0, 1, 1]
  gradual = make_setup(tiny_config(
      train=dict(num_epochs=3.0), finetune=dict(phases=((1.0, 5), (1.0, 4), (1.0, 0))))).plan
  assert [p.frozen for p in gradual.phases] == [BODY, BODY[:4], ()]


def test_a_phase_change_keeps_the_optimizer_state_of_keys_that_stay_trained():
  c = tiny_config(finetune=dict(phases=((1.0, 4), (1.0, 3))))
  s = make_setup(c)
  params = train.init_state(s, c).params
  grads = jax.tree.map(jnp.ones_like, params)
  first, second = s.optimizers
  _, state = first.update(grads, first.init(params), params)
  carried = optim.carry_over(state, second.init(params))
  old, new = state[0].inner_states, carried[0].inner_states
  assert leaves_equal(old['stage4'], new['stage4']) and leaves_equal(old['head'], new['head'])
  assert size(old['stage4']) > 0 and 'stage3' not in old
  assert all(np.all(x == 0) for x in jax.tree.leaves(new['stage3']))  # fresh momentum
  assert int(carried[1].count) == 1  # the schedule keeps counting the run's steps
  # Frozen leaves hold no state in either phase.
  assert opt_floats(state) == sum(size(params[k]) for k in ('stage4', 'head'))
  assert opt_floats(carried) == sum(size(params[k]) for k in ('stage3', 'stage4', 'head'))


@pytest.fixture(scope='module')
def lp_ft(tmp_path_factory):
  """An uninterrupted LP-FT run keeping every checkpoint (steps 3, 6, 9, 10)."""
  c = tiny_config(finetune=LP_FT, checkpoint=dict(keep=10))
  workdir = str(tmp_path_factory.mktemp('lp_ft'))
  return c, workdir, train.train_and_evaluate(c, workdir)


def test_lp_ft_run_trains_the_head_then_everything(lp_ft):
  c, workdir, results = lp_ft
  s = make_setup(c)
  init = train.init_state(s, c)
  mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'))
  assert mngr.all_steps() == [3, 6, 9, 10]
  at3, _ = checkpoint.load_pretrained(workdir, step=3)
  final, _ = checkpoint.load_pretrained(workdir)
  for key in BODY:  # the linear probe leaves the body alone, fine-tuning moves it
    assert leaves_equal(at3['params'][key], init.params[key]), key
    assert not leaves_equal(final['params'][key], init.params[key]), key
  assert not leaves_equal(at3['params']['head'], init.params['head'])
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [(l['step'], l['phase']) for l in lines if l['split'] == 'phase'] == [(6, 1.0)]
  assert results['trainable_params'] == size(init.params) and results['frozen_params'] == 0
  assert results['finetune']['phases'][0] == {'steps': [1, 5], 'frozen': list(BODY)}


@pytest.mark.parametrize('killed_after', [3, 6, 9])  # inside phase 0, at its end, inside phase 1
def test_a_run_killed_in_any_phase_resumes_bit_identically(lp_ft, tmp_path, killed_after):
  c, workdir, full = lp_ft
  stopped = str(tmp_path / 'stopped')
  train.train_and_evaluate(c, stopped)
  mngr = checkpoint.manager(os.path.join(stopped, 'checkpoints'))
  for step in mngr.all_steps():  # as if killed right after `killed_after`'s checkpoint
    if step > killed_after:
      mngr.delete(step)
  resumed = train.train_and_evaluate(c, stopped)
  a, _ = checkpoint.load_pretrained(workdir)
  b, _ = checkpoint.load_pretrained(stopped)
  assert leaves_equal(a, b)
  assert resumed['top1'] == full['top1'] and resumed['loss'] == full['loss']


def test_results_count_what_really_moved(tmp_path):
  c = tiny_config(finetune=dict(train_stages=('stage1',)))
  s = make_setup(c)
  init = train.init_state(s, c)
  results = train.train_and_evaluate(c, str(tmp_path))
  final, _ = checkpoint.load_pretrained(str(tmp_path))
  moved_size = sum(size(init.params[k]) for k in init.params
                   if not leaves_equal(init.params[k], final['params'][k]))
  assert results['trainable_params'] == moved_size
  assert results['trainable_params'] + results['frozen_params'] == size(init.params)
  assert results['finetune']['phases'] == [{'steps': [1, 10],
                                            'frozen': ['stem', 'stage2', 'stage3', 'stage4']}]


def test_ghost_batch_norm_normalises_each_group_by_itself():
  c = tiny_config(model=dict(bn_group_size=4))
  s = make_setup(c)
  state = train.init_state(s, c)
  apply = lambda params, x, rng: s.model.apply(
      {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
      mutable=['batch_stats'])
  x = jax.random.uniform(jax.random.key(0), (16, 16, 16, 3))
  logits, stats = train._apply_in_groups(apply, state.params, x, jax.random.key(1), 4)
  changed = x.at[0].multiply(2.0)
  other, _ = train._apply_in_groups(apply, state.params, changed, jax.random.key(1), 4)
  differs = np.any(np.asarray(logits) != np.asarray(other), axis=-1)
  assert differs[:4].all() and not differs[4:].any()  # only example 0's group sees the change
  # The running statistics take the mean of the groups' own updates.
  per_group = [apply(state.params, x[i:i + 4], None)[1] for i in range(0, 16, 4)]
  expected = jax.tree.map(lambda *g: np.mean(g, axis=0), *per_group)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Synchronised BatchNorm (the default) couples the whole batch.
  sync, _ = train._apply_in_groups(apply, state.params, changed, None, 0)
  base, _ = train._apply_in_groups(apply, state.params, x, None, 0)
  assert np.any(np.asarray(sync)[8:] != np.asarray(base)[8:])


def test_ghost_batch_norm_trains_every_stage():
  s, before, after = run_steps(tiny_config(model=dict(bn_group_size=2)), 2)
  assert all(moved(before, after, key) == (True, True) for key in BODY)


@pytest.mark.parametrize('sections, message', [
    (dict(finetune=dict(train_stages=('stem', 'layer1'))),
     r"names \['layer1'\].*use stage names from: stem, stage1, stage2, stage3, stage4"),
    (dict(finetune=dict(train_stages=('head',))), 'the head trains unless finetune.train_head'),
    (dict(finetune=dict(train_stages=('stem', 'stem'))), 'names a stage twice'),
    (dict(finetune=dict(train_stages=('stem',), freeze_depth=2)), 'both say which stages train'),
    (dict(finetune=dict(train_stages=(), train_head=False)), 'leaves nothing to train'),
    (dict(finetune=dict(freeze_depth=5, train_head=False)), 'leaves nothing to train'),
    (dict(finetune=dict(phases=((1.0, ()), (1.0, 'all')), freeze_depth=1)),
     'set together with finetune.freeze_depth'),
    (dict(finetune=dict(phases=((1.0, ()), (0.0, 'all')))), 'has no epochs'),
    (dict(finetune=dict(phases=((1.0, ()), (2.0, 'all')))),
     r'lasts 3 epochs but train.num_epochs=2.*--config.train.num_epochs=3'),
    (dict(finetune=dict(phases=((1.95, ()), (0.05, 'all')))), r'phases\[1\].*is empty'),
    (dict(finetune=dict(phases=((1.0, 'all'), (1.0, 0)))), 'overlap in one phase'),
    (dict(finetune=dict(phases=((1.0, ('stem', 'stage9')), (1.0, 'all')))),
     r"phases\[0\].*names \['stage9'\]"),
    (dict(finetune=dict(phases=((1.0, 7), (1.0, 'all')))), 'freeze depth 7 is out of range'),
    (dict(finetune=dict(phases=((2.0,),))), r'is not an \(epochs, stages\) pair'),
    (dict(finetune=dict(phases=((1.0, 'most'), (1.0, 'all')))), r"names \['most'\]"),
    (dict(finetune=dict(reinit_above=True)), 'reinit_above=True needs a network'),
    (dict(finetune=dict(copy_depth=2)), 'copy_depth=2 needs a network'),
    (dict(finetune=dict(copy_depth=2, reinit_above=True, init_from='x')),
     'both say which stages are copied'),
    (dict(finetune=dict(copy_depth=-1)), 'finetune.copy_depth=-1 is out of range'),
    (dict(model=dict(bn_group_size=3)), r'bn_group_size=3 does not divide the 16 examples'),
    (dict(model=dict(bn_group_size=4, options=dict(norm='group', width=0.125, cifar_stem=True))),
     'bn_group_size=4 needs BatchNorm'),
    (dict(optim=dict(layer_decay=1.5)), r'optim.layer_decay=1.5 is out of range'),
    (dict(finetune=dict(head_init_scale=-1.0)), 'finetune.head_init_scale=-1.0 is out of range'),
    (dict(finetune=dict(train_stages=('stem', 3))), 'finetune.train_stages=.* is out of range'),
])
def test_impossible_plans_fail_before_compiling(sections, message):
  with pytest.raises(ValueError, match=message):
    make_setup(tiny_config(**sections))


def test_feature_cache_covers_the_prefix_frozen_in_every_phase():
  gradual = dict(phases=((1.0, 4), (1.0, 2)), cache_features='on')
  assert make_setup(tiny_config(finetune=gradual)).cache_stages == 2
  with pytest.raises(ValueError, match='no stage is frozen under the trained ones'):
    make_setup(tiny_config(finetune=dict(train_stages=('stem',), cache_features='on')))


def test_every_key_works_from_the_command_line(tmp_path):
  config = tmp_path / 'tiny.py'
  config.write_text(f'import sys\nsys.path.insert(0, {ROOT!r})\n'
                    'from tests.test_train import tiny_config\n'
                    'def get_config():\n  return tiny_config()\n')
  proc = subprocess.run(
      [sys.executable, '-m', 'cnn_arch.main', f'--config={config}', f'--workdir={tmp_path}/run',
       '--config.finetune.phases=((1.0, ()), (1.0, ("stage3", "stage4")))',
       '--config.finetune.head_init_scale=0', '--config.optim.layer_decay=0.5',
       '--config.model.bn_group_size=4', '--config.finetune.train_head=True'],
      cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.load(open(tmp_path / 'run' / 'results.json'))
  assert results['finetune']['phases'][1] == {'steps': [6, 10],
                                              'frozen': ['stem', 'stage1', 'stage2']}
  assert results['finetune']['lr_mult']['stage3'] == 0.25
  proc = subprocess.run(
      [sys.executable, '-m', 'cnn_arch.main', f'--config={config}', f'--workdir={tmp_path}/bad',
       "--config.finetune.train_stages=('stem', 'conv1')"],
      cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode != 0 and 'use stage names from: stem, stage1' in proc.stderr


def test_the_learning_rate_is_a_value_of_the_optimizer_state():
  """One compiled update serves every learning rate: the rate comes from the state it is given
  (`optim.make`), and the update is exactly proportional to it."""
  s = make_setup(tiny_config(optim=dict(weight_decay=0.1)))
  params = train.init_state(s, tiny_config()).params
  grads = jax.tree.map(jnp.ones_like, params)
  make = lambda lr: optim.make(tiny_config(optim=dict(learning_rate=lr, weight_decay=0.1)).optim,
                               s.plan, params, 0, s.steps_per_epoch, s.total_steps)
  slow, fast = make(0.05), make(0.1)
  update = jax.jit(slow.update)  # compiled for 0.05
  want, _ = jax.jit(fast.update)(grads, fast.init(params), params)
  got, _ = update(grads, fast.init(params), params)
  half, _ = update(grads, slow.init(params), params)
  assert leaves_equal(got, want)
  assert all(np.array_equal(2 * np.asarray(h), np.asarray(g))
             for h, g in zip(jax.tree.leaves(half), jax.tree.leaves(got)))
