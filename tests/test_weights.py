"""Tests of cnn_arch.weights and cnn_arch.convert: torchvision weight import.

Without PyTorch (CI): the committed fixtures (tests/fixtures/make_weight_fixture.py rebuilds them)
give torchvision's logits for two reduced-width networks and the key/shape layout of every
importable architecture. With PyTorch and torchvision installed, every listed architecture is
checked against a live torchvision model with random weights and BatchNorm statistics:
  /work/venv-torch/bin/python -m pytest -q tests/test_weights.py
(`-m "not slow"` leaves out vgg19, vgg19_bn, resnet152 and resnext101_32x8d).
"""

import functools
import gzip
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from cnn_arch import checkpoint, convert, models, weights

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
# fixture -> (torchvision name, cnn_arch options of the reduced network)
REDUCED = {'resnet18_w8': ('resnet18', {'width': 0.125}),
           'alexnet_w16': ('alexnet', {'width': 0.0625})}
# max |ours - torchvision| / max |torchvision|. The fixtures' logits are torchvision's in float32:
# our model in float64 is 2-5e-7 from them (their own rounding), in float32 4-9e-7 (AMD EPYC).
TOLERANCE = 1e-5


def rel_err(out, ref) -> float:
  return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


def nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def fixture(name: str):
  """(path of the state dict .npz, NCHW input, torchvision logits)."""
  with np.load(os.path.join(FIXTURES, f'{name}_io.npz')) as io:
    return os.path.join(FIXTURES, f'{name}.npz'), io['input'], io['logits']


@pytest.fixture(scope='module')
def resnet():
  """The reduced ResNet-18 converted from its .npz: (path, input, logits, model, variables)."""
  path, x, logits = fixture('resnet18_w8')
  model, variables = weights.load_torchvision('resnet18', path, width=0.125)
  return path, x, logits, model, variables


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(u, v)


# ---- without PyTorch -----------------------------------------------------------------------


@pytest.mark.parametrize('fixture_name', sorted(REDUCED))
def test_reduced_fixture_matches_torchvision_logits(fixture_name):
  name, options = REDUCED[fixture_name]
  path, x, logits = fixture(fixture_name)
  model, variables = weights.load_torchvision(name, path, **options)
  assert model.num_classes == 10  # read from the state dict's classifier
  assert rel_err(model.apply(variables, nhwc(x), train=False), logits) < TOLERANCE


def test_safetensors_and_mapping_give_the_npz_variables(resnet, tmp_path):
  path, _, _, _, variables = resnet
  with np.load(path) as npz:
    state = {k: npz[k] for k in npz.files}
  save_file(state, str(tmp_path / 'w.safetensors'))
  for source in (str(tmp_path / 'w.safetensors'), state):
    _, other = weights.load_torchvision('resnet18', source, width=0.125)
    assert_trees_equal(other, variables)


def test_pth_without_torch_says_how_to_install_or_convert(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError
  (tmp_path / 'w.pth').write_bytes(b'not read')
  with pytest.raises(ImportError, match=r'pip install torch.*\.safetensors'):
    weights.load_torchvision('resnet18', str(tmp_path / 'w.pth'))


def test_unknown_format_and_name():
  with pytest.raises(ValueError, match=r'\.pth, \.safetensors or \.npz'):
    weights.read_state_dict(os.path.join(FIXTURES, 'make_weight_fixture.py'))
  with pytest.raises(ValueError, match=r"No torchvision mapping for 'resnet19'.*resnet18"):
    weights.load_torchvision('resnet19', {})


def _state(fixture_name='resnet18_w8'):
  with np.load(fixture(fixture_name)[0]) as npz:
    return {k: npz[k] for k in npz.files}


def test_wrong_architecture_names_missing_keys():
  # ResNet-34 has 8 more basic blocks: 2 kernels + 2 norms x 4 leaves each.
  with pytest.raises(ValueError, match=r'80 missing: layer1\.2\.bn1\.bias \(8,\);.* '
                                       r'layer1\.2\.conv1\.weight \(8, 8, 3, 3\), \.\.\. '
                                       r'\(75 more\)\.'):
    weights.load_torchvision('resnet34', _state(), width=0.125)
  with pytest.raises(ValueError) as e:
    weights.load_torchvision('resnet18', _state('alexnet_w16'), width=0.125)
  assert '16 unexpected: features.0.weight (4, 3, 11, 11)' in str(e.value)
  assert "torchvision resnet18 (cnn_arch model 'resnet18')" in str(e.value)


def test_missing_and_extra_keys_are_named_with_shapes():
  state = _state()
  del state['fc.bias']
  state['extra.weight'] = np.zeros((3, 2), np.float32)
  with pytest.raises(ValueError) as e:
    weights.load_torchvision('resnet18', state, width=0.125)
  assert '1 missing: fc.bias (10,).' in str(e.value)
  assert '1 unexpected: extra.weight (3, 2).' in str(e.value)


def test_wrong_shapes_are_named_with_both_shapes():
  with pytest.raises(ValueError) as e:
    weights.load_torchvision('resnet18', _state(), num_classes=5, width=0.125)
  assert str(e.value).count('wrong shape') == 1
  assert ('2 wrong shape: fc.weight: source (10, 64), model (5, 64) (for params/head/kernel); '
          'fc.bias: source (10,), model (5,) (for params/head/bias).') in str(e.value)
  with pytest.raises(ValueError, match=r'101 wrong shape: conv1\.weight: source \(8, 3, 7, 7\), '
                                       r'model \(16, 3, 7, 7\) \(for params/stem/conv1/kernel\);'):
    weights.load_torchvision('resnet18', _state(), width=0.25)


def test_convert_cli_round_trip(resnet, tmp_path):
  path, x, logits, _, variables = resnet
  out = str(tmp_path / 'converted')
  convert.main(['--arch=resnet18', f'--src={path}', f'--out={out}', '--option', 'width=0.125'])
  loaded, meta = checkpoint.load_pretrained(out)
  assert meta == {'model': 'resnet18', 'options': {'width': 0.125}, 'num_classes': 10,
                  'source': 'torchvision:resnet18', 'file': 'resnet18_w8.npz'}
  model = models.get_model(meta['model'], meta['num_classes'], **meta['options'])
  assert_trees_equal(loaded, variables)
  assert rel_err(model.apply(loaded, nhwc(x), train=False), logits) < TOLERANCE


def test_convert_cli_reports_bad_input_without_writing(capsys, tmp_path):
  src, out = fixture('resnet18_w8')[0], str(tmp_path / 'converted')
  with pytest.raises(SystemExit) as e:
    convert.main(['--arch=resnet34', f'--src={src}', f'--out={out}', '--option=width=0.125'])
  assert e.value.code == 2
  assert '80 missing: layer1.2.bn1.bias (8,)' in capsys.readouterr().err
  assert not os.path.exists(out)
  with pytest.raises(SystemExit) as e:
    convert.main(['--arch=resnet18', f'--src={src}', f'--out={out}', '--option', 'width'])
  assert e.value.code == 2
  assert '--option takes KEY=VALUE' in capsys.readouterr().err


def test_convert_cli_truncated_file_is_one_line(capsys, tmp_path):
  whole = tmp_path / 'whole.safetensors'
  save_file({k: np.asarray(v) for k, v in _state().items()}, str(whole))
  truncated = tmp_path / 'truncated.safetensors'
  truncated.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
  out = str(tmp_path / 'converted')
  with pytest.raises(SystemExit) as e:
    convert.main(['--arch=resnet18', f'--src={truncated}', f'--out={out}', '--option=width=0.125'])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith('python -m cnn_arch.convert: error: ') and 'Traceback' not in err
  assert len(err.strip().splitlines()) == 1 and '--verbose shows the traceback' in err
  assert not os.path.exists(out)


with gzip.open(os.path.join(FIXTURES, 'torchvision_keys.json.gz'), 'rt') as _f:
  TORCHVISION_KEYS = json.load(_f)


def test_key_table_covers_every_mapping():
  assert sorted(TORCHVISION_KEYS) == sorted(weights.FAMILIES)


@pytest.mark.parametrize('name', sorted(TORCHVISION_KEYS))
def test_mapping_reads_exactly_torchvisions_keys_and_shapes(name):
  options = {'aux_logits': True} if name == 'googlenet' else {}
  expected = {k: tuple(v) for k, v in TORCHVISION_KEYS[name].items()}
  assert weights.expected_keys(name, **options) == expected


# ---- against live torchvision models (skipped without PyTorch) -------------------------------

SLOW = pytest.mark.slow
# (name, input side): small odd sizes keep every model cheap while exercising symmetric padding,
# ceil-mode pools and adaptive pooling of maps smaller than its output (VGG: 2x2 -> 7x7).
PARITY = [('alexnet', 131), ('alexnet', 224), ('vgg11', 65), ('vgg11_bn', 65), ('vgg13', 65),
          ('vgg13_bn', 65), ('vgg16', 65), ('vgg16_bn', 97), pytest.param('vgg19', 65, marks=SLOW),
          pytest.param('vgg19_bn', 65, marks=SLOW), ('googlenet', 97), ('googlenet', 224),
          ('resnet18', 65), ('resnet18', 193), ('resnet34', 65), ('resnet50', 65),
          ('resnet101', 65), pytest.param('resnet152', 65, marks=SLOW),
          ('resnext50_32x4d', 65), pytest.param('resnext101_32x8d', 65, marks=SLOW)]


@pytest.fixture(scope='module')
def torch():
  torch = pytest.importorskip(
      'torch', reason='PyTorch is not installed: `pip install torch torchvision` to check '
      'parity against live torchvision models (the committed fixtures still run).')
  pytest.importorskip('torchvision', reason='torchvision is not installed.')
  torch.set_num_threads(2)
  return torch


def torchvision_model(torch, name: str, seed: int = 0, **kwargs):
  """A random torchvision model in eval mode whose activations neither vanish nor explode.

  Kaiming-initialised weights, random BatchNorm scales, shifts and running statistics, and each
  residual branch's last norm scaled by 0.2. Undamped, a deep random ResNet is ill-conditioned:
  its logits reach 1e12, or, with running statistics calibrated on data, float32 rounding grows
  through the blocks until torchvision's own float32 logits differ from float64 by 3e-4
  (ResNet-152). Damped, they differ by ~3e-7, and a 1e-5 tolerance tests the port, not the
  rounding.
  """
  import torchvision  # pylint: disable=g-import-not-at-top
  from torchvision.models import resnet  # pylint: disable=g-import-not-at-top
  if name == 'googlenet':
    kwargs = {'transform_input': True, 'aux_logits': False, 'init_weights': False, **kwargs}
  torch.manual_seed(seed)
  model = getattr(torchvision.models, name)(weights=None, **kwargs)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
        torch.nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
        if m.bias is not None:
          m.bias.normal_(0, 0.1, generator=g)
      elif isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
        m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        m.weight.copy_(torch.rand(n, generator=g) + 0.5)
        m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    for m in model.modules():
      if isinstance(m, (resnet.BasicBlock, resnet.Bottleneck)):
        (m.bn3 if isinstance(m, resnet.Bottleneck) else m.bn2).weight.mul_(0.2)
  return model.eval()


@pytest.mark.parametrize('name,size', PARITY)
def test_logits_match_torchvision(torch, name, size):
  tv = torchvision_model(torch, name)
  model, variables = weights.load_torchvision(name, tv.state_dict())
  x = np.random.default_rng(size).standard_normal((2, 3, size, size), np.float32)
  with torch.no_grad():
    ref = tv(torch.from_numpy(x)).numpy()
  assert np.abs(ref[0] - ref[1]).max() > 1e-2 * np.abs(ref).max()  # not a constant function
  assert rel_err(model.apply(variables, nhwc(x), train=False), ref) < TOLERANCE


def test_googlenet_auxiliary_heads_match_torchvision(torch):
  from cnn_arch.models import common, inception  # pylint: disable=g-import-not-at-top
  tv = torchvision_model(torch, 'googlenet', aux_logits=True)
  model, variables = weights.load_torchvision('googlenet', tv.state_dict())
  assert model.aux_logits and model.transform_input
  taps = {}
  tv.inception4a.register_forward_hook(lambda m, i, o: taps.update(aux1=o))
  tv.inception4d.register_forward_hook(lambda m, i, o: taps.update(aux2=o))
  with torch.no_grad():
    tv(torch.randn(2, 3, 224, 224))
  conv = functools.partial(inception.BasicConv, conv=common.conv,
                           norm=functools.partial(common.norm, 'batch'))
  head = inception.InceptionAux(1000, conv, width=1.0, dropout=0.7, dense=common.dense)
  for name, feature in taps.items():
    with torch.no_grad():
      ref = getattr(tv, name)(feature).numpy()
    sub = {c: variables[c][name] for c in ('params', 'batch_stats')}
    assert rel_err(head.apply(sub, nhwc(feature.numpy()), False), ref) < TOLERANCE


def test_pth_and_safetensors_from_torch(torch, resnet, tmp_path):
  from safetensors.torch import save_file as save_torch  # pylint: disable=g-import-not-at-top
  path, _, _, _, variables = resnet
  state = {k: torch.from_numpy(v) for k, v in _state().items()}
  torch.save(state, tmp_path / 'w.pth')
  save_torch(state, str(tmp_path / 'w.safetensors'))
  for source in ('w.pth', 'w.safetensors'):
    _, other = weights.load_torchvision('resnet18', str(tmp_path / source), width=0.125)
    assert_trees_equal(other, variables)
