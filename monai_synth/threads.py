"""Torch's intra-op thread count, switched for one block of work and restored after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["one_torch_thread"]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block on one torch thread, then restore the caller's count.

    Tiny operations (a 128 x 128 eigendecomposition, augmenting a 64 x 64 image) cost less than the hand-offs between
    threads, several times less when the cores are shared with other work.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
