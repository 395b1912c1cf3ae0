"""Host-memory allocator setting that stops XLA:CPU from page-faulting on every step.

XLA:CPU allocates each executable's temporary buffer (hundreds of MiB for a CNN training step)
with glibc malloc on every call. Blocks above glibc's mmap threshold (at most 32 MiB by default)
are mmap-ed and unmapped again when freed, so every step touches fresh pages, and on a small VM
the page faults can cost more than the arithmetic on them. Raising the mmap and trim thresholds
(mallopt(3)) makes freed blocks stay in the heap and be reused. The cost: peak host memory is not
returned to the OS. The suites call it unless `--malloc=default`; its effect is measured in
docs/performance.md ("The allocator setting").
"""

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 1 << 30) -> bool:
  """Makes glibc serve blocks below `mmap_threshold` bytes from the heap and never trim it.

  Returns True when applied, False where the C library is not glibc (e.g. macOS), where
  this is a no-op. Affects only allocations made after the call.
  """
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and
              mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
