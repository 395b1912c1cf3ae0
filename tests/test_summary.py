"""Tests of cnn_arch.summary against hand-computed figures from the architecture specs."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax import lax

from cnn_arch import models, summary
from cnn_arch.ops import conv as ops_conv

# AlexNet as in the lecture (Krizhevsky et al. 2012, one tower): convs as (out channels, kernel,
# stride, padding), 'pool' = 3x3 stride-2 max pool; then fc6-fc8 on the flattened 6x6x256 map.
ALEXNET_SPEC = [(96, 11, 4, 0), 'pool', (256, 5, 1, 2), 'pool', (384, 3, 1, 1), (384, 3, 1, 1),
                (256, 3, 1, 1), 'pool']
ALEXNET_FCS = [(6 * 6 * 256, 4096), (4096, 4096), (4096, 1000)]


def alexnet_by_hand(size=227):
  """[(output size, channels, MACs, receptive field, jump)] per spatial layer, and fc MACs."""
  channels, rf, jump, layers = 3, 1, 1, []
  for layer in ALEXNET_SPEC:
    out, k, s, p = (channels, 3, 2, 0) if layer == 'pool' else layer
    size = (size + 2 * p - k) // s + 1
    macs = 0 if layer == 'pool' else size * size * k * k * channels * out
    rf, jump, channels = rf + (k - 1) * jump, jump * s, out
    layers.append((size, channels, macs, rf, jump))
  return layers, sum(i * o for i, o in ALEXNET_FCS)


@pytest.fixture(scope='module')
def alexnet():
  return summary.analyze(models.get_model('alexnet'), (1, 227, 227, 3), name='alexnet')


@pytest.fixture(scope='module')
def resnet18():
  return summary.analyze(models.get_model('resnet18'), (1, 224, 224, 3))


def by_name(report):
  return {layer['name']: layer for layer in report['layers']}


def test_alexnet_lecture_shapes_and_fc6(alexnet):
  layers = by_name(alexnet)
  assert layers['stem/conv1']['output_shape'] == [55, 55, 96]
  assert layers['stem/max_pool']['output_shape'] == [27, 27, 96]
  assert layers['stage4/max_pool']['output_shape'] == [6, 6, 256]
  assert layers['stage5/fc6']['params'] == 6 * 6 * 256 * 4096 + 4096 == 37_752_832
  assert [l['name'] for l in alexnet['layers']] == [
      'stem/conv1', 'stem/max_pool', 'stage1/conv2', 'stage1/max_pool', 'stage2/conv3',
      'stage3/conv4', 'stage4/conv5', 'stage4/max_pool', 'stage5/fc6', 'stage6/fc7', 'head']


def test_alexnet_totals_match_model_and_hand_formula(alexnet):
  variables = jax.eval_shape(models.get_model('alexnet').init, jax.random.key(0),
                             jnp.zeros((1, 227, 227, 3)))
  n_params = sum(math.prod(v.shape) for v in jax.tree.leaves(variables['params']))
  assert alexnet['total_params'] == n_params == 62_378_344
  assert sum(l['params'] for l in alexnet['layers']) == n_params
  spatial, fc_macs = alexnet_by_hand()
  assert alexnet['total_macs'] == sum(m for _, _, m, _, _ in spatial) + fc_macs


def test_alexnet_receptive_fields_and_strides(alexnet):
  spatial, _ = alexnet_by_hand()
  rows = [l for l in alexnet['layers'] if l['op'] in ('conv', 'max_pool')]
  assert [(r['receptive_field'], r['stride']) for r in rows] == [(rf, j) for *_, rf, j in spatial]
  assert (rows[0]['receptive_field'], rows[0]['stride']) == (11, 4)
  assert (rows[1]['receptive_field'], rows[1]['stride']) == (19, 8)
  # fc6 sees the whole 6x6 pool5 grid (and its padding): 195 + 5 * 32; no grid left.
  fc6 = by_name(alexnet)['stage5/fc6']
  assert (fc6['receptive_field'], fc6['stride']) == (195 + 5 * 32, None)


def test_stacked_3x3_matches_7x7_field_with_fewer_weights():
  c = 8
  result = summary.compare_stacked_3x3(channels=c, image_size=16)
  stacked, single = result['stacked'], result['single']
  assert [l['receptive_field'] for l in stacked['layers']] == [3, 5, 7]
  assert single['layers'][0]['receptive_field'] == 7
  assert stacked['total_params'] == 27 * c * c and single['total_params'] == 49 * c * c
  assert stacked['total_macs'] == 16 * 16 * 27 * c * c


@pytest.fixture(scope='module')
def inception():
  return summary.compare_inception()


def test_inception_reduction_lecture_numbers(inception):
  assert inception['naive']['total_macs'] == 28 * 28 * 3 * 3 * 192 * 256
  assert [l['macs'] for l in inception['reduced']['layers']] == [
      28 * 28 * 3 * 3 * 192 * 64, 28 * 28 * 1 * 1 * 64 * 256]
  text = summary.inception_text(inception)
  assert '346,816,512' in text and '99,549,184' in text and '3.48x' in text


def test_googlenet_naive_modules_cost_more(inception):
  # torchvision lists GoogLeNet at 1.50 GFLOPS (MACs) and 6,624,904 parameters.
  assert inception['googlenet']['total_params'] == 6_624_904
  assert round(inception['googlenet']['total_macs'] / 1e9, 2) == 1.50
  assert inception['googlenet_naive']['total_macs'] > 3 * inception['googlenet']['total_macs']


def test_resnet18_macs_match_torchvision(resnet18):
  # torchvision's ResNet-18 entry: 1.814 GFLOPS (multiply-accumulates of convs and fc).
  assert round(resnet18['total_macs'] / 1e9, 3) == 1.814
  assert resnet18['total_params'] == 11_689_512
  assert all(l['name'] != '(unattributed)' for l in resnet18['layers'])



# torchvision's published GFLOPS (multiply-accumulates) at 224x224, to the two decimals it lists.
TORCHVISION_GMACS = {'alexnet_tv': 0.71, 'vgg16': 15.47, 'resnet50': 4.09, 'resnext50_32x4d': 4.23}


@pytest.mark.parametrize('name', sorted(TORCHVISION_GMACS))
def test_macs_match_torchvision_table(name):
  report = summary.analyze(models.get_model(name), (1, 224, 224, 3))
  assert round(report['total_macs'] / 1e9, 2) == TORCHVISION_GMACS[name]


def test_resnet18_shortcuts_do_not_widen_the_field(resnet18):
  layers = by_name(resnet18)
  # stem: 7x7/2 (rf 7) and 3x3/2 pool (11, jump 4); each 3x3 conv adds 2 * jump.
  assert layers['stage1/block0/conv2']['receptive_field'] == 11 + 2 * 2 * 4
  assert layers['stage1/block1/conv1']['receptive_field'] == 11 + 3 * 2 * 4
  shortcut = layers['stage2/block0/downsample_conv']
  assert (shortcut['receptive_field'], shortcut['stride']) == (43, 8)
  assert layers['stage2/block1/conv1']['receptive_field'] == (
      layers['stage2/block0/conv2']['receptive_field'] + 2 * 8)



def test_adaptive_pool_feeds_fc6_the_whole_grid():
  # alexnet_tv at 128: pool5 is 3x3 (rf 195, jump 32); the adaptive pool repeats it to 6x6,
  # each bin one pixel, and fc6 sees the whole 3x3 grid: 195 + 2 * 32.
  layers = by_name(summary.analyze(models.get_model('alexnet_tv'), (1, 128, 128, 3)))
  assert layers['stage4/max_pool']['output_shape'] == [3, 3, 256]
  pool = layers['adaptive_avg_pool']
  assert (pool['output_shape'], pool['receptive_field'], pool['stride']) == ([6, 6, 256], 195, None)
  assert layers['stage5/fc6']['receptive_field'] == 195 + 2 * 32


class _Residual(nn.Module):
  """A stride-2 3x3 stem, then a basic block with an identity shortcut, then global pooling."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), strides=2, padding=1, name='stem')(x)
    y = nn.Conv(4, (3, 3), padding=1, name='conv1')(nn.relu(x))
    y = nn.Conv(4, (3, 3), padding=1, name='conv2')(nn.relu(y))
    return jnp.mean(nn.relu(x + y), axis=(1, 2))


def test_residual_block_field_is_the_main_path():
  layers = summary.analyze(_Residual(), (1, 16, 16, 3))['layers']
  assert [(l['name'], l['receptive_field'], l['stride']) for l in layers] == [
      ('stem', 3, 2), ('conv1', 7, 2), ('conv2', 11, 2),
      ('global_avg_pool', 11 + (8 - 1) * 2, None)]


def _vjp_conv(lhs, rhs, *args, **kwargs):
  """A convolution behind custom_vjp, as a memory-saving backward pass would plug in."""
  conv = jax.custom_vjp(lambda l, r: lax.conv_general_dilated(l, r, *args, **kwargs))
  conv.defvjp(lambda l, r: (conv(l, r), (l, r)), lambda res, g: res)
  return conv(lhs, rhs)


class _Flat(nn.Module):
  """Grouped VALID conv, flatten, dense; no bias or activation, so XLA counts only MACs."""
  conv_general_dilated: object = None

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), strides=2, padding='VALID', feature_group_count=2, use_bias=False,
                conv_general_dilated=self.conv_general_dilated, name='conv')(x)
    return nn.Dense(10, use_bias=False, name='fc')(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize('conv', [None, _vjp_conv], ids=['lax', 'custom_vjp'])
def test_macs_of_grouped_conv_and_dense_equal_half_of_xla_flops(conv):
  report = summary.analyze(_Flat(conv), (2, 9, 9, 4), xla=True)
  conv_row, fc_row = report['layers']
  assert conv_row['macs'] == 4 * 4 * 8 * 3 * 3 * (4 // 2)  # per image, C_in / groups
  assert fc_row['macs'] == 4 * 4 * 8 * 10
  assert (conv_row['receptive_field'], conv_row['stride']) == (3, 2)
  assert report['xla_flops'] == 2 * report['total_macs']


class _Pool(nn.Module):
  """2x2 max pool, then torchvision-style adaptive average pooling to 1x1 (H, then W)."""

  @nn.compact
  def __call__(self, x, train=False):
    return models.common.adaptive_avg_pool(nn.max_pool(x, (2, 2), (2, 2)), 1)


def test_project_custom_vjp_conv_changes_nothing(alexnet):
  plugged = summary.analyze(
      models.get_model('alexnet', conv_general_dilated=ops_conv.conv_general_dilated),
      (1, 227, 227, 3), name='alexnet')
  assert plugged == alexnet


def test_adaptive_pool_is_one_global_layer():
  layers = summary.analyze(_Pool(), (1, 8, 8, 3))['layers']
  assert [(l['op'], l['receptive_field'], l['output_shape']) for l in layers] == [
      ('max_pool', 2, [4, 4, 3]), ('global_avg_pool', 2 + 3 * 2, [1, 1, 3])]


def test_cli_json_has_documented_keys(capsys):
  summary.main(['--model=alexnet', '--json'])
  report = json.loads(capsys.readouterr().out)
  assert {'model', 'image_size', 'total_params', 'total_macs', 'xla_flops', 'layers'} <= set(report)
  assert report['image_size'] == 227 and report['model'] == 'alexnet'
  for layer in report['layers']:
    assert set(layer) == {'name', 'op', 'output_shape', 'params', 'macs', 'receptive_field',
                          'stride'}
  # XLA skips the taps on padding and adds bias/ReLU/pooling work: same order as 2 x MACs.
  assert 0.8 < report['xla_flops'] / (2 * report['total_macs']) < 1.2


def test_text_table_has_separators_and_totals(alexnet):
  text = summary.format_table(alexnet)
  conv1 = next(line for line in text.splitlines() if line.startswith('stem/conv1'))
  assert conv1.split() == ['stem/conv1', 'conv', '55x55x96', '34,944', '105,415,200', '11', '4']
  assert text.splitlines()[-1].split() == ['total', '62,378,344', f"{alexnet['total_macs']:,}"]


def test_cli_unknown_model_names_the_valid_ones(capsys):
  with pytest.raises(SystemExit):
    summary.main(['--model=resnet19'])
  err = capsys.readouterr().err
  assert "Unknown model 'resnet19'" in err and 'resnet18' in err


def test_cli_bad_option_says_the_format(capsys):
  with pytest.raises(SystemExit):
    summary.main(['--model=alexnet', '--option', 'width'])
  assert '--option takes KEY=VALUE' in capsys.readouterr().err


@pytest.mark.parametrize('args, message', [
    (['--model=resnet18', '--image_size=0'], '--image_size=0 is out of range: use 1 to 4096.'),
    (['--model=resnet18', '--image_size=1000000'],
     '--image_size=1000000 is out of range: use 1 to 4096.'),
    (['--model=alexnet', '--image_size=16'],
     'needs images of at least'),
])
def test_cli_bad_image_size_is_one_line_with_the_fix(args, message, capsys):
  with pytest.raises(SystemExit) as e:
    summary.main(args + ['--no-xla'])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  assert err.strip().splitlines()[-1].startswith('python -m cnn_arch.summary: error: ')
  assert message in err.strip().splitlines()[-1]
