"""Two of the lecture's claims on the trainer's step: ResNeXt-50 32x4d against ResNet-50 (near
equal MACs), and GroupNorm against BatchNorm ResNet-50.

    python -m benchmarks.lecture --image_size=64 --batch=8 --steps=3 [--torch]

Each network's train step is built from the config with the model flags (model and norm set by
the suite), timed (median of --steps after a warm-up) and freed before the next. The summary row
holds `resnext_over_resnet_time`, `macs_ratio` (XLA's counts) and `gn_over_bn_time`; --torch
adds the same ratios of torchvision's networks (benchmarks.torch_ref).
"""

from benchmarks import common, torch_ref

RUNS = {'resnet50': ('resnet50', 'batch'), 'resnext50': ('resnext50_32x4d', 'batch'),
        'resnet50_gn': ('resnet50', 'group')}


def measure(args, model: str, norm: str) -> dict:
  bench = common.TrainerStep(common.trainer_config(args, model=model, norm=norm),
                             args.xla_options)
  row = dict(bench.info(), suite='lecture', steps=args.steps)
  row['train_img_s'] = row['batch'] / common.median_s(bench.train, args.steps)
  return row


def ratios(rows: dict) -> dict:
  t = lambda key: 1 / rows[key]['train_img_s']
  return dict(resnext_over_resnet_time=t('resnext50') / t('resnet50'),
              gn_over_bn_time=t('resnet50_gn') / t('resnet50'))


def main(argv=None):
  p = common.parser(__doc__, __spec__.name)
  p.add_argument('--torch', action='store_true', help="also time torchvision's networks")
  args = common.parse(p, argv)
  rows = {key: measure(args, model, norm) for key, (model, norm) in RUNS.items()}
  ref = rows['resnet50']
  summary = dict(suite='lecture', framework='jax', conv=ref['conv'], batch=ref['batch'],
                 image_size=ref['image_size'], **ratios(rows),
                 macs_ratio=rows['resnext50']['macs_per_image'] / ref['macs_per_image'])
  if args.torch and not torch_ref.available():
    torch_ref.skip_note('--torch')
  elif args.torch:
    torch_rows = {}
    for key, row in rows.items():
      t = torch_ref.TorchStep(row)
      torch_rows[key] = dict(t.info, suite='lecture',
                             train_img_s=row['batch'] / common.median_s(t.train, args.steps))
    rows.update({f'torch_{key}': row for key, row in torch_rows.items()})
    summary.update({f'torch_{k}': v for k, v in ratios(torch_rows).items()})
  common.report(list(rows.values()), ['framework', 'model', 'norm', 'batch', 'image_size',
                                      'train_img_s', 'macs_per_image'], args.out)
  common.report([summary], ['framework', 'resnext_over_resnet_time', 'macs_ratio',
                            'gn_over_bn_time', 'torch_resnext_over_resnet_time',
                            'torch_gn_over_bn_time'], args.out)
  return rows, summary


if __name__ == '__main__':
  main()
