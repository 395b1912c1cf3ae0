"""Entry point: `python -m cnn_arch.main --config=configs/resnet.py [--workdir=DIR]`.

Config values are overridden on the command line, e.g. `--config.finetune.freeze_depth=2`.
Running the same command again resumes from the latest checkpoint in the workdir.
"""

import time

_T0 = time.perf_counter()  # before the imports and the config file: the start-up the user waits

import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Where checkpoints and results go (default: runs/<config name>).')
_ON_CHANGE = flags.DEFINE_enum(
    'on_config_change', 'refuse', ['refuse', 'resume', 'restart'],
    'When WORKDIR holds a run of another config: refuse, resume its checkpoints under the new '
    'config, or restart (the old run is moved to WORKDIR/previous-*).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for a multi-host run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index.')
_CACHE_DIR = flags.DEFINE_string(
    'compilation_cache', os.path.expanduser('~/.cache/cnn_arch/xla'),
    'JAX\'s persistent compilation cache: a rerun or a sweep compiles each program once. '
    '"" turns it off.')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show the traceback of an error, not one line.')
flags.mark_flags_as_required(['config'])
# What a bad config, dataset, workdir or checkpoint raises: one line with the fix is enough.
_USER_ERRORS = (ValueError, RuntimeError, OSError, FloatingPointError)


def _hide_accelerators_from_tensorflow():
  # tf.data only needs the CPU; without this TensorFlow grabs GPU memory that JAX needs.
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')


def _maybe_distributed():
  """Joins a multi-host run when flags or the cluster's environment (Slurm, Cloud TPU) say so."""
  import jax
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif 'SLURM_NTASKS' in os.environ and int(os.environ['SLURM_NTASKS']) > 1:
    jax.distributed.initialize()  # reads the Slurm environment
  elif os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0:
    jax.distributed.initialize()  # Cloud TPU pod slice


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  _hide_accelerators_from_tensorflow()
  _maybe_distributed()
  if _CACHE_DIR.value:
    import jax
    jax.config.update('jax_compilation_cache_dir', _CACHE_DIR.value)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  from cnn_arch import train  # after distributed init: importing may touch the backend
  startup = time.perf_counter() - _T0  # imports (TensorFlow for tfds: most of it), the config
  config_file = config_flags.get_config_filename(flags.FLAGS['config'])
  config_name = os.path.splitext(os.path.basename(config_file))[0]
  workdir = _WORKDIR.value or os.path.join('runs', config_name)
  try:
    results = train.train_and_evaluate(_CONFIG.value, workdir, _ON_CHANGE.value)
  except _USER_ERRORS as e:
    if _VERBOSE.value:
      raise
    sys.exit(f'cnn_arch.main: error: {" ".join(str(e).split())} (--verbose shows the traceback)')
  print(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                 for k, v in results.items()))
  seconds = results['seconds']
  print(f'Time: start-up {startup:.1f} s, setup {seconds["setup"]:.1f} s, first step (compile) '
        f'{seconds["first_step"]:.1f} s, evaluation {seconds["eval"]:.1f} s, other steps '
        f'{seconds["other_steps"]:.1f} s.')
  print(f'Results, metrics and checkpoints are in {workdir}/')
  if results['preempted']:
    print(f'Stopped early by {results["stopped_by"]} after saving a checkpoint; run the same '
          'command to resume.')


if __name__ == '__main__':
  app.run(main)
