"""Progress reporting: the library calls ``progress(done, total)``; only the CLI draws bars."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ProgressFn", "no_progress", "tqdm_progress"]

#: ``progress(done, total)``: units are guest bytes for disks, bytes of blobs for images.
ProgressFn = Callable[[int, int], None]


def no_progress(done: int, total: int) -> None:
    """The default callback: report nothing."""


class tqdm_progress:
    """A tqdm bar fed by the library's callback; close it when the work is done."""

    def __init__(self, description: str) -> None:
        self._description = description
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm  # imported only when a bar is drawn

            self._bar = tqdm(
                total=total, desc=self._description, unit="B", unit_scale=True,
                unit_divisor=1024, leave=False, dynamic_ncols=True,
            )
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
