"""Tests of the architecture zoo: exact sizes, shapes, options, freezing and errors.

Parameter counts and shapes come from `jax.eval_shape` (no real initialisation); the few numeric
tests use tiny widths at 32x32, numpy-made variables and a cheap XLA compile.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnn_arch.models import MODELS, get_model, model_options
from cnn_arch.models import common, inception, resnet

# torchvision's figures (torchvision.models weights metadata, `num_params`), 1000 classes.
PARAM_COUNTS = {
    'alexnet': 62_378_344,  # the paper's single-tower net (the lecture's 227x227 AlexNet)
    'alexnet_tv': 61_100_840,
    'vgg11': 132_863_336, 'vgg13': 133_047_848, 'vgg16': 138_357_544, 'vgg19': 143_667_240,
    'vgg11_bn': 132_868_840, 'vgg13_bn': 133_053_736, 'vgg16_bn': 138_365_992,
    'vgg19_bn': 143_678_248,
    'googlenet': 6_624_904,
    'resnet18': 11_689_512, 'resnet34': 21_797_672, 'resnet50': 25_557_032,
    'resnet101': 44_549_160, 'resnet152': 60_192_808,
    'resnext50_32x4d': 25_028_904, 'resnext101_32x8d': 88_791_336,
}
KEY = jax.random.key(0)


def images(size, batch=2, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


@functools.cache
def _abstract(name, size, options=()):
  model = get_model(name, **dict(options))
  return model, jax.eval_shape(model.init, KEY, jnp.zeros((1, size, size, 3)))


def abstract(name, size=64, **options):
  """(model, abstract variables) at `size`, cached across tests."""
  return _abstract(name, 227 if name == 'alexnet' and size == 64 else size,
                   tuple(sorted(options.items())))


def count(tree):
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def abstract_features(model, variables, size, **kw):
  return jax.eval_shape(lambda v, x: model.apply(v, x, features=True, **kw), variables,
                        jnp.zeros((2, size, size, 3)))


################################################################ sizes and names

@pytest.mark.parametrize('name', sorted(MODELS))
def test_param_count_and_stage_names(name):
  model, variables = abstract(name)
  assert count(variables['params']) == PARAM_COUNTS[name]
  assert set(variables['params']) == set(model.stage_names)
  assert model.stage_names[0] == 'stem' and model.stage_names[-1] == 'head'
  assert set(variables.get('batch_stats', {})) <= set(model.stage_names)


def test_table_covers_registry():
  assert set(PARAM_COUNTS) == set(MODELS)


def test_googlenet_aux_heads_count_and_keys():
  # torchvision googlenet(aux_logits=True, init_weights=True): 13,004,888 parameters.
  model, variables = abstract('googlenet', aux_logits=True)
  assert count(variables['params']) == 13_004_888
  assert set(variables['params']) == set(model.stage_names) | set(model.attached_heads)
  assert model.attached_heads == {'aux1': 'stage2', 'aux2': 'stage2'}
  assert get_model('googlenet').attached_heads == {}


def test_naive_inception_module_sizes():
  """Figure 2 of Szegedy et al.: inception 3a with and without 1x1 reductions (true 5x5)."""
  _, naive = abstract('googlenet', 224, naive=True, kernel_5x5=5)
  _, reduced = abstract('googlenet', 224, kernel_5x5=5)
  bn = 2 * (64 + 128 + 32)  # scale and bias of each output channel
  assert count(naive['params']['stage1']['inception3a']) == (
      192 * 64 + 9 * 192 * 128 + 25 * 192 * 32 + bn)
  assert count(reduced['params']['stage1']['inception3a']) == (
      192 * 64 + 192 * 96 + 9 * 96 * 128 + 192 * 16 + 25 * 16 * 32 + 192 * 32
      + bn + 2 * (96 + 16 + 32))


def test_resnext_groups_divide_scaled_width():
  _, variables = abstract('resnext50_32x4d', 32, width=0.125, cifar_stem=True)
  kernel = variables['params']['stage1']['block0']['conv2']['kernel']
  assert kernel.shape == (3, 3, 1, 32)  # 32 channels in 32 groups, not 16


################################################################ shapes

SHAPES = [  # (name, size, options, {feature: shape without the batch axis})
    ('alexnet', 227, {}, {'stem': (27, 27, 96), 'stage1': (13, 13, 256),
                          'stage4': (6, 6, 256), 'stage6': (4096,)}),
    ('alexnet', 32, dict(cifar_stem=True, width=1 / 16),
     {'stem': (32, 32, 6), 'stage4': (7, 7, 16), 'pre_logits': (256,)}),
    ('alexnet_tv', 100, dict(width=1 / 16), {'stem': (11, 11, 4), 'stage4': (2, 2, 16),
                                             'stage5': (256,)}),
    ('alexnet_tv', 32, dict(cifar_stem=True, width=1 / 16),
     {'stem': (32, 32, 4), 'stage4': (7, 7, 16)}),
    ('vgg16_bn', 64, dict(width=1 / 16), {'stem': (32, 32, 4), 'stage4': (2, 2, 32),
                                          'stage5': (256,), 'pre_logits': (256,)}),
    ('vgg11', 32, dict(cifar_stem=True, width=1 / 16),
     {'stem': (16, 16, 4), 'stage4': (1, 1, 32), 'stage6': (32,)}),
    ('googlenet', 64, dict(width=0.25), {'stem': (8, 8, 48), 'stage1': (4, 4, 120),
                                         'stage2': (2, 2, 208), 'stage3': (2, 2, 256),
                                         'pre_logits': (256,)}),
    ('googlenet', 32, dict(cifar_stem=True, width=0.25),
     {'stem': (32, 32, 48), 'stage1': (16, 16, 120), 'stage3': (8, 8, 256)}),
    ('googlenet', 64, dict(naive=True, width=0.25),  # 16+32+8+48, then 32+48+24+104
     {'stage1': (4, 4, 208)}),
    ('resnet18', 64, dict(width=0.25), {'stem': (16, 16, 16), 'stage1': (16, 16, 16),
                                        'stage4': (2, 2, 128), 'pre_logits': (128,)}),
    ('resnet18', 32, dict(cifar_stem=True, width=0.25),
     {'stem': (32, 32, 16), 'stage2': (16, 16, 32), 'stage4': (4, 4, 128)}),
    ('resnet50', 32, dict(cifar_stem=True, width=0.25),
     {'stage1': (32, 32, 64), 'stage4': (4, 4, 512), 'pre_logits': (512,)}),
]


@pytest.mark.parametrize('name,size,options,expected', SHAPES)
def test_output_and_feature_shapes(name, size, options, expected):
  model = get_model(name, num_classes=7, **options)
  variables = jax.eval_shape(model.init, KEY, jnp.zeros((1, size, size, 3)))
  logits, feats = abstract_features(model, variables, size)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert set(feats) == set(model.stage_names[:-1]) | {'pre_logits'}
  for key, shape in expected.items():
    assert feats[key].shape == (2,) + shape, key


def test_alexnet_lecture_shapes():
  """227 -> conv1 55x55x96 -> pool 27x27x96 -> ... -> 6x6x256 into fc6 (lecture arithmetic)."""
  model, variables = abstract('alexnet')
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=['intermediates']),
      variables, jnp.zeros((1, 227, 227, 3)))
  conv1, = state['intermediates']['stem']['conv1']['__call__']
  assert conv1.shape == (1, 55, 55, 96)
  _, feats = abstract_features(model, variables, 227)
  assert feats['stem'].shape == (2, 27, 27, 96)
  assert feats['stage4'].shape == (2, 6, 6, 256)
  assert variables['params']['stage5']['fc6']['kernel'].shape == (6 * 6 * 256, 4096)


@pytest.mark.parametrize('name,norm,expect_stats', [
    ('resnet18', 'batch', True), ('resnet18', 'group', False), ('resnet18', 'none', False),
    ('vgg11', 'none', False), ('vgg11', 'batch', True), ('vgg11', 'group', False),
    ('googlenet', 'group', False), ('googlenet', 'none', False),
    ('alexnet_tv', 'batch', True), ('alexnet_tv', 'group', False)])
def test_norm_collections(name, norm, expect_stats):
  _, variables = abstract(name, 64, norm=norm, width=0.25)
  assert ('batch_stats' in variables) == expect_stats
  leaves = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
  paths = ['/'.join(str(k.key) for k in path) for path, _ in leaves]
  assert any('/gn/' in p for p in paths) == (norm == 'group')


def test_resnet_convs_get_bias_only_without_norm():
  _, with_bn = abstract('resnet18', 32, width=0.25)
  _, without = abstract('resnet18', 32, width=0.25, norm='none')
  assert 'bias' not in with_bn['params']['stage2']['block0']['downsample_conv']
  assert 'bias' in without['params']['stage2']['block0']['downsample_conv']


def test_conv_general_dilated_reaches_every_convolution():
  calls = []

  def counting_conv(*args, **kwargs):
    calls.append(kwargs.get('feature_group_count', 1))
    return lax.conv_general_dilated(*args, **kwargs)

  model = get_model('resnext50_32x4d', conv_general_dilated=counting_conv, width=0.125)
  jax.eval_shape(model.init, KEY, jnp.zeros((1, 32, 32, 3)))
  assert len(calls) == 1 + 16 * 3 + 4  # stem, three per block, four downsamples
  assert calls.count(32) == 16  # the grouped 3x3 of every block


################################################################ numerics

def fake_variables(model, size):
  """He-scaled random kernels, unit scales and variances, zero biases and means, built in numpy
  from `eval_shape`: a real `init` compiles every initialiser and costs tens of seconds here."""
  shapes = jax.eval_shape(model.init, KEY, jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    if path[-1].key == 'kernel':
      fan_in = np.prod(leaf.shape[:-1])
      return (rng.standard_normal(leaf.shape) * np.sqrt(2 / fan_in)).astype(np.float32)
    return np.full(leaf.shape, path[-1].key in ('scale', 'var'), np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


# Tests check values, not speed: a cheap XLA:CPU compile halves this file's run time.
_QUICK_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def run_quick(fn, *args):
  return jax.jit(fn).lower(*args).compile(_QUICK_COMPILE)(*args)


@functools.cache
def tiny(name, **options):
  """A tiny CIFAR-sized model with 5 classes and its variables, shared across tests."""
  model = get_model(name, num_classes=5, cifar_stem=True, **options)
  return model, fake_variables(model, 32)


def test_bf16_forward_close_to_fp32():
  model, variables = tiny('resnet18', width=0.25)
  half = model.clone(dtype=jnp.bfloat16)
  x = images(32)
  ref = run_quick(model.apply, variables, x)
  out = run_quick(half.apply, variables, x)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()))
  assert not np.allclose(out, ref, rtol=0, atol=1e-6)  # bf16 really was used


@pytest.mark.parametrize('name', ['alexnet_tv', 'vgg11_bn', 'googlenet', 'resnext50_32x4d'])
def test_bf16_keeps_float32_params_and_logits(name):
  model = get_model(name, dtype=jnp.bfloat16, width=0.25, cifar_stem=True)
  variables = jax.eval_shape(model.init, KEY, jnp.zeros((1, 32, 32, 3)))
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  logits, feats = abstract_features(model, variables, 32)
  assert logits.dtype == jnp.float32 and feats['stage1'].dtype == jnp.bfloat16


@pytest.mark.parametrize('block', [resnet.BasicBlock, resnet.Bottleneck])
def test_zero_init_residual(block):
  last = 'bn2' if block is resnet.BasicBlock else 'bn3'
  module = block(features=8, out=8, conv=common.conv, norm=functools.partial(common.norm, 'batch'),
                 zero_init_residual=True)
  params = run_quick(lambda x: module.init(KEY, x, train=False), jnp.ones((1, 4, 4, 8)))['params']
  assert np.all(params[last]['scale'] == 0) and np.all(params['bn1']['scale'] == 1)


class _Captured(Exception):
  pass


def test_googlenet_transform_input():
  """torchvision maps ImageNet-normalised input to (pixel - 0.5) / 0.5 before conv1."""
  def capture(lhs, *args, **kwargs):
    raise _Captured(lhs)

  model, variables = tiny('googlenet', width=0.25, aux_logits=True)
  model = model.clone(transform_input=True, conv_general_dilated=capture)
  pixels = np.random.default_rng(0).uniform(size=(1, 32, 32, 3))
  normalised = (pixels - np.array(inception._MEAN)) / np.array(inception._STD)
  with pytest.raises(_Captured) as seen:  # stops at conv1, so this eager apply is cheap
    model.apply(variables, normalised)
  np.testing.assert_allclose(seen.value.args[0], (pixels - 0.5) / 0.5, atol=1e-5)


def frozen_step(model, variables, frozen):
  """Gradients of a random projection of the train-mode logits (and aux logits), and the new
  batch statistics of that train-mode apply."""
  x, rngs = images(32), {'dropout': jax.random.key(1)}
  weights = jax.random.normal(jax.random.key(2), (2, model.num_classes))

  def loss(params):
    out, state = model.apply({**variables, 'params': params}, x, train=True, frozen=frozen,
                             rngs=rngs, mutable=['batch_stats'])
    logits, aux = out if isinstance(out, tuple) else (out, ())
    return sum(jnp.sum(weights * y) for y in (logits, *aux)), (state['batch_stats'], aux)

  grads, (stats, aux) = run_quick(jax.grad(loss, has_aux=True), variables['params'])
  return grads, stats, aux


def nonzero(tree):
  return any(np.any(leaf != 0) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize('name,frozen,options', [
    ('resnet18', 2, dict(width=0.25)),
    ('vgg11_bn', 5, dict(width=1 / 16)),
    ('googlenet', 3, dict(width=0.25, aux_logits=True)),  # freezes the aux heads' stage2
])
def test_frozen_stages_get_no_gradient_and_keep_statistics(name, frozen, options):
  model, variables = tiny(name, **options)
  grads, stats, aux = frozen_step(model, variables, frozen)
  def moved(key):
    return any(np.any(a != b) for a, b in zip(
        jax.tree.leaves(stats[key]), jax.tree.leaves(variables['batch_stats'][key])))

  for i, stage in enumerate(model.stage_names):
    assert nonzero(grads[stage]) == (i >= frozen), stage
    if stage in stats:
      assert moved(stage) == (i >= frozen), stage
  # GoogLeNet's aux heads are frozen together with stage2, the stage they attach to.
  aux_trainable = frozen <= model.stage_names.index(inception.AUX_STAGE)
  for head in getattr(model, 'attached_heads', {}):
    assert nonzero(grads[head]) == aux_trainable and moved(head) == aux_trainable, head
  if options.get('aux_logits'):
    assert [a.shape for a in aux] == [(2, 5)] * (2 if aux_trainable else 0)


def test_googlenet_aux_logits_follow_stage2():
  model, variables = tiny('googlenet', width=0.25, aux_logits=True)
  x = jnp.zeros((2, 32, 32, 3))
  (logits, aux), _ = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, frozen=2, mutable=['batch_stats'],
                               rngs={'dropout': KEY}), variables, x)
  assert logits.shape == (2, 5) and [a.shape for a in aux] == [(2, 5)] * 2
  assert jax.eval_shape(model.apply, variables, x).shape == (2, 5)  # eval: plain logits


################################################################ errors

def test_unknown_model_name():
  with pytest.raises(ValueError, match=r"Unknown model 'resnet51'.*Did you mean.*resnet50"):
    get_model('resnet51')


def test_unknown_option_lists_valid_options():
  with pytest.raises(ValueError, match=r'Unknown option\(s\) widht.*Valid options:.*width'):
    get_model('resnet18', widht=0.5)
  with pytest.raises(ValueError, match=r"norm fixed by the name 'vgg16_bn'"):
    get_model('vgg16_bn', norm='group')
  assert 'norm' in model_options('vgg16') and 'aux_logits' in model_options('googlenet')


@pytest.mark.parametrize('frozen', [-1, 6])
def test_freeze_depth_out_of_range(frozen):
  model, variables = abstract('resnet18', 32)
  with pytest.raises(ValueError, match=r'freeze depth .* 0 \(train everything\) to 5'):
    jax.eval_shape(lambda v, x: model.apply(v, x, frozen=frozen), variables,
                   jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize('name,options', [
    ('alexnet', {}), ('alexnet', dict(cifar_stem=True)), ('alexnet_tv', {}),
    ('alexnet_tv', dict(cifar_stem=True)), ('vgg11', {}), ('vgg11', dict(cifar_stem=True)),
    ('googlenet', {}), ('googlenet', dict(cifar_stem=True)), ('resnet50', {}),
    ('resnet18', dict(cifar_stem=True))])
def test_min_size_works_and_smaller_fails_clearly(name, options):
  model = get_model(name, width=1 / 16, **options)
  size = model.min_size
  jax.eval_shape(model.init, KEY, jnp.zeros((1, size, size, 3)))
  with pytest.raises(ValueError, match=f'at least {size}x{size}'):
    jax.eval_shape(model.init, KEY, jnp.zeros((1, size - 1, size - 1, 3)))


def test_wrong_channels_and_alexnet_input_size():
  model = get_model('resnet18')
  with pytest.raises(ValueError, match='3 channels'):
    jax.eval_shape(model.init, KEY, jnp.zeros((1, 64, 64, 1)))
  with pytest.raises(ValueError, match='227x227 images, or use alexnet_tv'):
    jax.eval_shape(get_model('alexnet').init, KEY, jnp.zeros((1, 260, 260, 3)))
