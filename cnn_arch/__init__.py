"""cnn_arch: classic CNN architectures and fine-tuning them, in JAX/Flax."""
