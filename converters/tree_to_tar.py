"""Write a file tree (a flattened image, or one layer) as a tar stream instead of a directory.

Nothing touches the host's filesystem but the output stream, so everything the tree holds is
carried whoever runs us: owners, device nodes (a non-root user cannot create one, but can
record it), set-id bits, xattrs of any namespace, hardlinks as links. The tar is written by
the layer tar writer of ``formats/image/_write.py`` (PAX headers for xattrs and sub-second or
pre-1970 mtimes, entries in the order given: ``flatten`` sorts them, a layer keeps its own
order and its whiteouts as ``.wh.`` files), so the same tree gives byte-identical output.

Left out, as in a layer tar: the root entry (runtimes own the root's metadata) and sockets
(a tar cannot hold one, as GNU tar says); sockets are reported in ``ExtractReport.devices``.

The stream is written sequentially and never seeked, so it can go to a pipe.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from imgbridge.converters.tree_to_dir import ExtractReport
from imgbridge.formats.image._write import write_layer_tar

from imgbridge.model.tree import Entry, EntryType

__all__ = ["write_tree_tar"]


class _Position:
    """Counts what passes through to ``sink``: tarfile asks for ``tell()``, which a pipe (or
    ``StreamOutput``'s wrapper) cannot answer."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.count = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sink.write(view)
        self.count += len(view)
        return len(view)

    def tell(self) -> int:
        return self.count

    def flush(self) -> None:
        self.sink.flush()


def write_tree_tar(entries: Iterable[Entry], out: Any) -> ExtractReport:
    """Write ``entries``, in the order given, as a PAX tar to ``out`` (a binary writable
    object, written sequentially). ``report.written`` counts the members written;
    ``report.devices`` lists the sockets left out."""
    report = ExtractReport()

    def kept() -> Iterator[Entry]:
        for entry in entries:
            if entry.path == "":
                continue
            if entry.type is EntryType.SOCKET:
                report.devices.append(entry.path)
                continue
            report.written += 1
            yield entry

    write_layer_tar(kept(), _Position(out))
    return report
