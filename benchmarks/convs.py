"""The trainer's step with plain `lax` convolutions against --conv's, interleaved in one process.

    python -m benchmarks.convs --cifar_stem --conv=auto [--steps=5] [model flags] [--out=FILE]

Both variants are the same config, built once with `lax.conv_general_dilated` in every layer
and once with --conv (`auto`: the models' per-backend default; `fast`: the custom-VJP op
everywhere; --conv=xla compares against `fast`). Each of --steps rounds runs one warm and one
timed call of each variant, train step then eval step; the row holds both variants' images/s
(medians) and the median per-round speed-up of --conv over `xla`.
"""

from benchmarks import common


def main(argv=None):
  args = common.parse(common.parser(__doc__, __spec__.name), argv)
  other = 'fast' if args.conv == 'xla' else args.conv
  benches = {conv: common.TrainerStep(common.trainer_config(args, conv=conv), args.xla_options)
             for conv in ('xla', other)}
  common.compare(args, benches, 'convs', compared=f'xla vs {other}')


if __name__ == '__main__':
  main()
