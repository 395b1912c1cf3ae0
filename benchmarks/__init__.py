"""Benchmark suites of cnn_arch, each run from the repository root as `python -m benchmarks.SUITE`.

  throughput   train and inference images/s of the trainer's step for one config (`--torch`)
  finetune     the trainer's step under fine-tuning plans: freeze depths, `train_stages`
  convs        the step with plain `lax` convolutions against `--conv`, interleaved
  xla_options  the step with default XLA compile options against `--xla_option`, interleaved
  vs_torch     the step against torchvision's, interleaved (needs PyTorch)
  lecture      ResNet-50 vs ResNeXt-50 32x4d, and GroupNorm vs BatchNorm (`--torch`)
  layers       forward and gradients of each convolution of a network, per convolution path
  profile      where XLA:CPU's train step spends its time, per op category
  input        images/s of the input pipeline

`--help` on each lists its flags. Each prints a table and, with `--out=FILE.jsonl`, appends one
JSON line per row. docs/performance.md holds the figures and the command behind each.
"""
