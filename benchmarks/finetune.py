"""The trainer's train step under fine-tuning plans, against the first plan (by default full).

    python -m benchmarks.finetune [--config=configs/resnet.py] [--plans=0,4,stage4,stem]
        [--steps=20 --warmup=3 --rounds=5] [model flags: --batch, --width, ...] [--out=FILE.jsonl]

A plan is a freeze depth (`4`: `finetune.freeze_depth=4`), `head` (only the head trains:
`finetune.train_stages=()`), or stage names joined by `+` (`stage4`, `stem`, `stage3+stage4`:
`finetune.train_stages`, the head trains too). The default config is the CIFAR ResNet-18 of
configs/resnet.py (quarter width, CIFAR stem, 32x32, batch 64), with augmentation and feature
caching off so that every step runs the whole network forward. Each plan's step is compiled
once; then, round by round, every plan runs --warmup untimed and --steps timed steps; a plan's
ms/step is the median over rounds of its per-round medians, and `time_vs_first` the median over
rounds of its per-round ratio to the first plan's median.
"""

import numpy as np

from benchmarks import common

COLUMNS = ['plan', 'ms_step', 'ms_min', 'ms_max', 'img_s', 'time_vs_first', 'trainable_params']


def plan_flags(spec: str) -> dict:
  """'4' -> freeze_depth=4; 'head' -> train_stages=(); 'stage3+stage4' -> those stages."""
  if spec.isdigit():
    return dict(freeze_depth=int(spec), train_stages=None)
  stages = () if spec == 'head' else tuple(spec.split('+'))
  return dict(freeze_depth=0, train_stages=stages)


def label(flags: dict) -> str:
  if flags['train_stages'] is None:
    return f'freeze_depth={flags["freeze_depth"]}'
  return f'train_stages={flags["train_stages"]!r}'


def main(argv=None):
  p = common.parser(__doc__, __spec__.name, config='configs/resnet.py', steps=20)
  p.add_argument('--plans', default='0,4,stage4,stem',
                 help='comma-separated plans; the first is the reference')
  p.add_argument('--warmup', type=int, default=3, help='untimed steps before each timed run')
  p.add_argument('--rounds', type=int, default=5, help='interleaved rounds')
  args = common.parse(p, argv)
  plans = {label(f): f for f in map(plan_flags, args.plans.split(','))}
  benches = {name: common.TrainerStep(common.trainer_config(args, **flags), args.xla_options,
                                         infer=False)
             for name, flags in plans.items()}
  t = common.interleaved({name: b.train for name, b in benches.items()}, args.rounds,
                         steps=args.steps, warmup=args.warmup)
  first = np.array(t[next(iter(plans))])
  rows = []
  for name, b in benches.items():
    ms = 1e3 * np.array(t[name])
    rows.append(dict(b.info(), suite='finetune', plan=name, steps=args.steps,
                     warmup=args.warmup, rounds=args.rounds, malloc=args.malloc,
                     ms_step=float(np.median(ms)), ms_min=float(ms.min()), ms_max=float(ms.max()),
                     img_s=1e3 * b.config.train.batch_size / float(np.median(ms)),
                     time_vs_first=float(np.median(np.array(t[name]) / first)),
                     round_ms=[round(float(x), 3) for x in ms]))
  r = rows[0]
  common.report(rows, COLUMNS, args.out,
                title=f'finetune: {r["model"]} width {r["width"]}, batch {r["batch"]}, '
                      f'{r["image_size"]}x{r["image_size"]}, {r["dtype"]}; median of '
                      f'{args.steps} steps after {args.warmup}, {args.rounds} rounds')
  return rows


if __name__ == '__main__':
  main()
