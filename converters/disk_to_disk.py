"""disk -> disk: one function over ``Disk.extents()`` for every pair of disk formats.

The source is read through its allocation map, so zero extents and holes are never read; the
target's writer receives the source as a ``Disk`` and stores only what is not zero (writers
call ``iter_nonzero``). No format-pair code exists anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

from imgbridge.model.disk import Disk
from imgbridge.output import AtomicOutput
from imgbridge.progress import ProgressFn
from imgbridge.registry import FormatSpec


def convert_disk(
    source: Disk,
    target_format: FormatSpec,
    out: AtomicOutput,
    options: Mapping[str, str],
    progress: ProgressFn,
) -> None:
    """Write the guest-visible content of ``source`` as ``target_format`` into ``out``."""
    target_format.create(out, source, options, progress)
