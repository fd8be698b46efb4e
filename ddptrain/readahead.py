"""Read-ahead for a memory-mapped training table under `--shuffle block`.

A table larger than memory is read through page faults: one 4 KB page at a time, at random-read speed. The block
order makes each window of the epoch touch a few whole blocks of contiguous rows, so before a window's rows are used
the kernel is asked (madvise MADV_WILLNEED) to read the next window's blocks in large sequential pieces, while this
window trains. On memory that is not file-backed the advice is a no-op; where madvise is missing, nothing is done.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

from ddptrain.data import SHUFFLE_WINDOW_BLOCKS, shuffle_block_rows

MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", None)


def _madvise():
    if MADV_WILLNEED is None or not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise


class ReadAhead:
    def __init__(self, x: torch.Tensor, order: torch.Tensor, n_rows: int, world_size: int) -> None:
        self.advise = _madvise()
        self.order = order  # this rank's rows for the epoch
        self.block = shuffle_block_rows(n_rows)
        self.span = max(1, self.block * SHUFFLE_WINDOW_BLOCKS // world_size)  # this rank's rows in one window
        self.base, self.row_bytes = x.data_ptr(), x.stride(0) * x.element_size()
        self.next: int | None = None  # the first position not yet advised

    def before(self, position: int) -> None:
        """Called with the position (in this rank's order) about to be used; advises up to a window ahead."""
        if self.advise is None:
            return
        if self.next is None:
            self.next = position
        while self.next <= position + self.span and self.next < len(self.order):
            rows = self.order[self.next:self.next + self.span]
            for block in torch.unique(rows // self.block).tolist():
                start = self.base + block * self.block * self.row_bytes
                aligned = start - start % mmap.PAGESIZE
                self.advise(aligned, start - aligned + self.block * self.row_bytes, MADV_WILLNEED)
            self.next += self.span
