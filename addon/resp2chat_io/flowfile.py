"""Reading recordings (mitmproxy flow files) that may be cut short.

A gateway stopped while it wrote ``-w`` (killed, the disk full, the machine down) leaves a file
whose last flow is cut in the middle. mitmproxy's reader refuses the whole file then ("Invalid
data format."); every flow before the cut is whole, and worth as much as ever. ``read`` keeps
them and says where the file stops being readable (``Cut``): ``resp2chat analyze``,
``--server-replay`` and ``resp2chat_replay_preload`` warn with it and go on. A file of which
not one flow can be read is no recording: that is still refused (``FlowReadException``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mitmproxy import exceptions, io


@dataclass(frozen=True)
class Cut:
    """A flow file read up to ``offset`` (of ``size`` bytes): ``flows`` whole flows before it."""

    path: str
    flows: int
    offset: int
    size: int
    reason: str

    def __str__(self) -> str:
        return (f"{self.path}: cut short or unreadable from byte {self.offset} of {self.size} "
                f"({self.size - self.offset} bytes left unread: {self.reason}); the {self.flows} whole "
                f"flow{'s' if self.flows != 1 else ''} before it were read")


def read(path: str) -> tuple[list, Cut | None]:
    """The flows of the file at ``path``, and where it was cut (None: read to its end).
    ``OSError`` when it cannot be opened; ``FlowReadException`` when not one flow of it reads."""
    flows = []
    with open(os.path.expanduser(path), "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        offset = 0
        try:
            for flow in io.FlowReader(fh).stream():
                flows.append(flow)
                offset = fh.tell()
        except exceptions.FlowReadException as exc:
            if not flows:
                raise exceptions.FlowReadException(f"{path}: no flow in it can be read: {exc}") from None
            return flows, Cut(path, len(flows), offset, size, str(exc))
    return flows, None


def read_all(paths) -> tuple[list, list[Cut]]:
    """``read`` of each path, in order: all their flows, and the cuts found."""
    flows, cuts = [], []
    for path in paths:
        got, cut = read(path)
        flows += got
        if cut is not None:
            cuts.append(cut)
    return flows, cuts
