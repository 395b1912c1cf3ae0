"""The benchmark suites: `python -m benchmarks.SUITE` end to end on tiny networks, the JSON lines
they write, the trainer's step they time, and the profile and layer helpers."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from benchmarks import common, convs, input as bench_input, layers, profile, torch_ref, vs_torch

ROOT = pathlib.Path(__file__).parents[1]
TINY = ['--width=0.125', '--batch=2', '--image_size=8', '--cifar_stem', '--malloc=default']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _suite(module: str, *argv: str) -> subprocess.CompletedProcess:
  """`python -m benchmarks.MODULE ARGV` from the repository root, as a user runs it."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  return subprocess.run([sys.executable, '-m', f'benchmarks.{module}', *argv], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=True)


def _lines(path) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _positive(row: dict, *keys: str):
  for key in keys:
    assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (
        key, row[key])


def test_throughput_cli_writes_the_trainer_step_measurement(tmp_path, data_dir):
  out = tmp_path / 'bench.jsonl'
  out.write_text(json.dumps({'earlier': 1}) + '\n')  # --out appends
  torch_flag = [] if torch_ref.available() else ['--torch']
  run = _suite('throughput', *TINY, '--steps=2', '--freeze_depth=5', '--conv=xla',
               f'--set=data.data_dir={data_dir}', f'--out={out}', *torch_flag)
  earlier, row = _lines(out)
  assert earlier == {'earlier': 1}
  assert 'train_img_s' in run.stdout and common._fmt(row['train_img_s']) in run.stdout
  if torch_flag:
    assert '--torch: skipped' in run.stderr
  assert (row['suite'], row['model'], row['conv'], row['batch'], row['image_size']) == (
      'throughput', 'resnet18', 'xla', 2, 8)
  assert (row['freeze_depth'], row['width'], row['cifar_stem']) == (5, 0.125, True)
  assert row['frozen_stages'] == ['stem', 'stage1', 'stage2', 'stage3', 'stage4']
  _positive(row, 'train_img_s', 'infer_img_s', 'train_gflop_s', 'infer_gflop_s',
            'matmul_gflop_s', 'train_vs_ceiling', 'macs_per_image', 'compile_s', 'peak_rss_mib',
            'trainable_params')
  assert row['train_vs_ceiling'] == pytest.approx(row['train_gflop_s'] / row['matmul_gflop_s'],
                                                  rel=1e-3)
  assert (row['backend'], row['devices'], row['cores']) == ('cpu', 1, os.cpu_count())


def test_finetune_cli_times_each_plan_against_the_first(tmp_path, data_dir):
  out = tmp_path / 'ft.jsonl'
  run = _suite('finetune', '--width=0.125', '--batch=4', '--image_size=8', '--malloc=default',
               '--plans=0,stem,head', '--steps=2', '--warmup=1', '--rounds=2',
               f'--set=data.data_dir={data_dir}', f'--out={out}')
  rows = _lines(out)
  plans = ['freeze_depth=0', "train_stages=('stem',)", 'train_stages=()']
  assert [r['plan'] for r in rows] == plans
  assert all(p in run.stdout for p in plans)
  full, stem, head = rows
  # configs/resnet.py's network, at the flags' width, batch and size
  assert (full['model'], full['cifar_stem'], full['batch']) == ('resnet18', True, 4)
  assert (full['frozen_stages'], stem['train_stages'], head['train_stages']) == ([], ['stem'], [])
  assert stem['frozen_stages'] == ['stage1', 'stage2', 'stage3', 'stage4']
  assert head['trainable_params'] < stem['trainable_params'] < full['trainable_params']
  assert full['time_vs_first'] == 1.0
  for r in rows:
    _positive(r, 'ms_step', 'ms_min', 'ms_max', 'img_s', 'time_vs_first')
    assert len(r['round_ms']) == 2 and r['ms_min'] <= r['ms_step'] <= r['ms_max']
    assert r['img_s'] == pytest.approx(1e3 * 4 / r['ms_step'], rel=1e-3)


def test_trainer_step_with_frozen_body_moves_only_the_head(data_dir):
  args = common.parser('', 'test').parse_args(TINY + [f'--set=data.data_dir={data_dir}'])
  bench = common.TrainerStep(common.trainer_config(args, freeze_depth=5), infer=False)
  before = jax.device_get(bench.state.params)
  bench.train()  # the trainer's warm-up schedule: the first step's learning rate is 0
  bench.train()
  after = jax.device_get(bench.state.params)
  changed = {k for k in before if any(np.any(a != b) for a, b in
                                      zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k])))}
  assert changed == {'head'}
  assert int(jax.device_get(bench.state.step)) == 2


def test_convs_compares_both_paths_in_one_row(tmp_path, data_dir):
  out = tmp_path / 'convs.jsonl'
  convs.main(TINY + ['--steps=2', '--conv=fast', f'--set=data.data_dir={data_dir}',
                     f'--out={out}'])
  (row,) = _lines(out)
  assert (row['suite'], row['compared'], row['rounds']) == ('convs', 'xla vs fast', 2)
  _positive(row, 'xla_train_img_s', 'fast_train_img_s', 'train_speedup', 'xla_infer_img_s',
            'fast_infer_img_s', 'infer_speedup')


def test_layers_cli_times_every_part_of_a_layer(tmp_path):
  out = tmp_path / 'layers.jsonl'
  layers.main(['--layer_set=small_maps', '--layers=4x4', '--batch=1', '--steps=1',
               '--malloc=default', f'--out={out}'])
  (row,) = _lines(out)
  assert (row['layer'], row['shape'], row['batch']) == ('4x4', '4x4x256->256 k3 s1', 1)
  _positive(row, 'gflop', 'xla_dw_kernel_ms',
            *[f'{v}_{p}_ms' for v in ('xla', 'fast', 'auto') for p in ('fwd', 'dx', 'dw')])


def test_layers_weight_gradient_kernel_is_the_weight_gradient_without_transposes():
  """benchmarks.layers times XLA's weight-gradient convolution on pre-transposed operands as
  the kernel's share of `dw`: it must compute the same weight gradient."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 6, 5, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((3, 6, 5, 6)), jnp.float32)
  dw = layers.layer_fns(lax.conv_general_dilated, 3, 1, x, w, g)['dw'](x, w, g)
  kernel = layers.weight_grad_kernel_fn(3, x, g)(x, w, g)  # (C, kh, kw, O)
  np.testing.assert_allclose(jnp.transpose(kernel, (1, 2, 0, 3)), dw, rtol=0,
                             atol=1e-5 * float(jnp.abs(dw).max()))


def test_profile_cli_splits_the_step_into_timed_ops_and_the_rest(tmp_path, data_dir):
  out = tmp_path / 'profile.jsonl'
  profile.main(TINY + ['--steps=2', f'--set=data.data_dir={data_dir}', f'--out={out}'])
  summary = _lines(out)[-1]
  _positive(summary, 'step_ms', 'ops_wall_ms')
  assert summary['untimed_ms'] == pytest.approx(summary['step_ms'] - summary['ops_wall_ms'],
                                                abs=1e-3)


def test_profile_sums_threads_and_unions_wall_time_per_op_category():
  """An op category's thread time adds its events, its wall time counts time covered on any
  thread once, and `.N` suffixes of one category merge; per step."""
  ms = 1e6
  events = [('transpose_copy_fusion.3', 0, 10 * ms), ('transpose_copy_fusion.7', 5 * ms, 10 * ms),
            ('ynn_fusion', 30 * ms, 4 * ms), ('transpose_copy_fusion.3', 100 * ms, 10 * ms)]
  ops, wall = profile.op_times(events, steps=2)
  assert ops == {'transpose_copy_fusion': (15.0, 12.5, 1.5), 'ynn_fusion': (2.0, 2.0, 0.5)}
  assert wall == 14.5


def test_profile_reads_only_xla_op_events():
  """Runtime spans (ThunkExecutor, `end:` markers) and non-XLA threads are not ops."""
  names = {1: 'transpose_copy_fusion.3', 2: 'ThunkExecutor::Execute', 3: 'end: ynn_fusion',
           4: 'convolution-window-dilated'}
  meta = ''.join(f'event_metadata {{ key: {k} value {{ id: {k} name: "{v}" }} }}\n'
                 for k, v in names.items())
  events = ''.join(f'events {{ metadata_id: {k} offset_ps: {k}000000 duration_ps: 2000000 }}\n'
                   for k in names)
  text = (f'planes {{ name: "/host:CPU" lines {{ name: "tf_XLAEigen/1" timestamp_ns: 0\n{events}}}'
          f' lines {{ name: "python" timestamp_ns: 0\n{events}}}\n{meta}}}')
  data = jax.profiler.ProfileData.from_text_proto(text)
  assert profile.xla_cpu_events(data) == [('transpose_copy_fusion.3', 1000.0, 2000.0),
                                          ('convolution-window-dilated', 4000.0, 2000.0)]


def test_input_cli_measures_both_datasets(tmp_path, data_dir):
  out = tmp_path / 'input.jsonl'
  bench_input.main(['--steps=2', '--repeats=1', '--batch_size=64', '--mock_examples=256',
                    f'--data_dir={data_dir}', '--malloc=default', f'--out={out}'])
  rows = _lines(out)
  assert [r['data'] for r in rows] == ['digits', 'cifar10 (mock)']
  for r in rows:
    assert (r['suite'], r['batch']) == ('input', 64)
    _positive(r, 'train_img_s', 'eval_img_s')


def test_vs_torch_skips_cleanly_without_pytorch(tmp_path, capsys):
  if torch_ref.available():
    pytest.skip('PyTorch is installed')
  out = tmp_path / 'vs.jsonl'
  assert vs_torch.main(TINY + [f'--out={out}']) == []
  assert 'skipped' in capsys.readouterr().err and not out.exists()
