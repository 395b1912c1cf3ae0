"""Train and inference images/s of the trainer's step for one config, and its achieved FLOP/s.

    python -m benchmarks.throughput [--config=base] [--model=resnet18 --image_size=32
        --batch=128 --cifar_stem --width=1.0 --norm=batch --dtype=float32 --freeze_depth=0
        --conv=auto --steps=5] [--torch] [--out=FILE.jsonl]

Images/s are the median of --steps timed calls after a warm-up of the train step of
`cnn_arch.train.parallel_steps` (the config's optimizer and fine-tuning plan, donated state)
and of its eval step. Also reported: the train step's compile time, peak RSS, MACs per image
(XLA's cost analysis of the compiled eval step / 2), GFLOP/s, and `train_vs_ceiling`, the train
step's GFLOP/s per device over a 4096x4096 matmul's in the same dtype (the chip's practical
matrix rate). --torch adds the torchvision model (benchmarks.torch_ref).
"""

from benchmarks import common, torch_ref

COLUMNS = ['framework', 'model', 'batch', 'image_size', 'dtype', 'freeze_depth', 'conv',
           'train_img_s', 'infer_img_s', 'train_gflop_s', 'train_vs_ceiling', 'compile_s']


def main(argv=None):
  p = common.parser(__doc__, __spec__.name)
  p.add_argument('--no_infer', action='store_true', help='skip the inference timing')
  p.add_argument('--torch', action='store_true', help='also time the torchvision model')
  args = common.parse(p, argv)
  config = common.trainer_config(args)
  ceiling = common.matmul_ceiling(config.model.dtype)
  bench = common.TrainerStep(config, args.xla_options)
  row = dict(bench.info(), suite='throughput', malloc=args.malloc, steps=args.steps)
  for kind in ('train',) if args.no_infer else ('train', 'infer'):
    seconds = common.median_s(getattr(bench, kind), args.steps)
    row.update({f'{kind}_img_s': row['batch'] / seconds,
                f'{kind}_gflop_s': bench.flops[kind] / seconds / 1e9})
  row.update(matmul_gflop_s=ceiling,
             train_vs_ceiling=row['train_gflop_s'] / row['devices'] / ceiling,
             peak_rss_mib=common.peak_rss_mib())
  rows = [row]
  if args.torch and not torch_ref.available():
    torch_ref.skip_note('--torch')
  elif args.torch:
    t = torch_ref.TorchStep(row)
    rows.append(dict(t.info, suite='throughput', steps=args.steps,
                     train_img_s=row['batch'] / common.median_s(t.train, args.steps),
                     infer_img_s=row['batch'] / common.median_s(t.infer, args.steps)))
  common.report(rows, COLUMNS, args.out)
  return rows


if __name__ == '__main__':
  main()
