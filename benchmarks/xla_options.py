"""The trainer's step under XLA's default compile options against --xla_option's, interleaved.

    python -m benchmarks.xla_options --cifar_stem \
        --xla_option=xla_cpu_experimental_ynn_fusion_type= [--steps=5] [model flags]

The same config compiled twice, once with no compile options and once with every
--xla_option=NAME=VALUE (DebugOptions fields; an empty VALUE clears a repeated field). Each of
--steps rounds runs one warm and one timed call of each, train step then eval step; the row
holds both images/s (medians) and the median per-round speed-up of the options.
"""

from benchmarks import common


def main(argv=None):
  args = common.parse(common.parser(__doc__, __spec__.name), argv)
  if not args.xla_options:
    raise SystemExit('benchmarks.xla_options needs at least one --xla_option=NAME=VALUE.')
  config = common.trainer_config(args)
  benches = {'default': common.TrainerStep(config, {}),
             'options': common.TrainerStep(config, args.xla_options)}
  common.compare(args, benches, 'xla_options', options=args.xla_options)


if __name__ == '__main__':
  main()
