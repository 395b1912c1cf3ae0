"""The trainer's step against the same network's PyTorch step, interleaved in one process.

    $TORCH_PY -m benchmarks.vs_torch --cifar_stem --conv=auto [--steps=7] [--malloc=default]

The JAX step is `cnn_arch.train.parallel_steps`' for the config; the PyTorch one is
torchvision's model (benchmarks.torch_ref: 2 threads, channels-last, SGD with momentum, same
batch, image size and freeze depth). After one warm call each, every one of --steps rounds times
one JAX step and one PyTorch step, so both see the same load; the row holds both images/s
(medians) and `jax_over_torch_speed`, the median per-round ratio (> 1: JAX faster). Without
torch and torchvision the suite prints a note and exits cleanly.
"""

import numpy as np

from benchmarks import common, torch_ref


def main(argv=None):
  args = common.parse(common.parser(__doc__, __spec__.name), argv)
  if not torch_ref.available():
    torch_ref.skip_note('benchmarks.vs_torch')
    return []
  bench = common.TrainerStep(common.trainer_config(args), args.xla_options, infer=False)
  info = bench.info()
  other = torch_ref.TorchStep(info)
  bench.train()
  other.train()
  t = common.interleaved({'jax': bench.train, 'torch': other.train}, args.steps, warmup=0)
  row = dict(info, suite='vs_torch', rounds=args.steps, malloc=args.malloc,
             torch_version=other.info['torch_version'],
             jax_train_img_s=info['batch'] / float(np.median(t['jax'])),
             torch_train_img_s=info['batch'] / float(np.median(t['torch'])),
             jax_over_torch_speed=float(np.median(np.array(t['torch']) / np.array(t['jax']))))
  common.report([row], ['model', 'batch', 'image_size', 'malloc', 'jax_train_img_s',
                        'torch_train_img_s', 'jax_over_torch_speed'], args.out)
  return [row]


if __name__ == '__main__':
  main()
