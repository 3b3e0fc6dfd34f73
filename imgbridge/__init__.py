"""imgbridge: inspect and convert disk images and container images, without root.

The public API::

    import imgbridge
    info = imgbridge.inspect("disk.qcow2")            # dict keyed like qemu-img info
    imgbridge.convert("disk.raw", "disk.qcow2", format="raw", progress=print)
    with imgbridge.open("disk.qcow2") as disk:        # a Disk: size, read_at, extents
        first_sector = disk.read_at(0, 512)

Functions are imported on first use, so ``import imgbridge`` (and ``imgbridge --version``)
costs almost nothing.
"""

from __future__ import annotations

import os as _os

from .errors import (
    ImgBridgeError,
    InternalError,
    InvalidImageError,
    InvalidInputError,
    MissingCompanionError,
    UnsupportedFeatureError,
)

__version__ = "0.1.0"

# Not typing.TYPE_CHECKING: importing typing would cost ~10 ms of every start-up; type
# checkers treat any name TYPE_CHECKING this way.
TYPE_CHECKING = False

# Installed, formats/ and converters/ live inside this package (pyproject maps them there). Run
# from a source checkout (``python -m imgbridge`` at the repository's top), they sit beside it
# instead, so look there too; an installed package is left as it is.
if not _os.path.isdir(_os.path.join(__path__[0], "formats")):
    __path__.append(_os.path.dirname(_os.path.abspath(__path__[0])))

__all__ = [
    "ImgBridgeError",
    "InternalError",
    "InvalidImageError",
    "InvalidInputError",
    "MissingCompanionError",
    "UnsupportedFeatureError",
    "allocation_map",
    "check",
    "compare",
    "convert",
    "create",
    "diff",
    "extract",
    "list_files",
    "list_formats",
    "inspect",
    "inspect_chain",
    "open",
    "open_disk",
    "open_filesystem",
    "plan",
    "read_file",
    "__version__",
]

# Not "formats": that name is the imgbridge.formats subpackage.
_API = {"allocation_map", "check", "compare", "convert", "create", "diff", "extract",
        "inspect", "inspect_chain", "list_files", "list_formats", "open", "open_disk",
        "open_filesystem", "plan", "read_file"}

if TYPE_CHECKING:
    from .api import (
        allocation_map,
        check,
        compare,
        convert,
        create,
        diff,
        extract,
        inspect,
        inspect_chain,
        list_files,
        list_formats,
        open,
        open_disk,
        open_filesystem,
        plan,
        read_file,
    )


def __getattr__(name: str) -> object:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'imgbridge' has no attribute {name!r}")
