"""Converts torchvision ImageNet weights into a cnn_arch checkpoint directory.

  python -m cnn_arch.convert --arch=resnet50 --src=resnet50-0676ba61.pth --out=pretrained/resnet50

`--src` is a torchvision state dict (.pth, which needs PyTorch; or .safetensors / .npz, which do
not). The directory holds `variables` and `meta` as `checkpoint.save_pretrained` writes them;
fine-tune from it with `--config.finetune.init_from=DIR`.
"""

import argparse
import json
import os
import sys

from cnn_arch import checkpoint, models, weights


def _option(text: str) -> tuple[str, object]:
  try:
    return models.parse_option(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> dict:
  """Runs the conversion; returns the meta it wrote."""
  parser = argparse.ArgumentParser(prog='python -m cnn_arch.convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--arch', required=True, choices=sorted(weights.FAMILIES),
                      metavar='NAME', help="torchvision's model name, e.g. resnet50")
  parser.add_argument('--src', required=True, help='.pth, .safetensors or .npz state dict')
  parser.add_argument('--out', required=True, help='checkpoint directory to write')
  parser.add_argument('--num_classes', type=int, default=None,
                      help="classifier outputs (default: read from the state dict)")
  parser.add_argument('--option', type=_option, action='append', default=[],
                      metavar='KEY=VALUE', help='a further model option, e.g. width=0.5')
  parser.add_argument('--verbose', action='store_true', help='show the traceback of an error')
  args = parser.parse_args(argv)
  try:
    _, variables, meta = weights.convert_torchvision(
        args.arch, args.src, num_classes=args.num_classes, **dict(args.option))
  except Exception as e:  # a truncated file, another architecture's weights: say why, no trace
    if args.verbose:
      raise
    parser.exit(2, f'{parser.prog}: error: {_one_line(e)} (--verbose shows the traceback)\n')
  meta['file'] = os.path.basename(args.src)
  checkpoint.save_pretrained(args.out, variables, meta)
  print(f'Wrote {args.out}: {json.dumps(meta)}')
  return meta


def _one_line(e: Exception) -> str:
  text = ' '.join(str(e).split())
  return text if isinstance(e, (ValueError, OSError)) else f'{type(e).__name__}: {text}'


if __name__ == '__main__':
  main(sys.argv[1:])
