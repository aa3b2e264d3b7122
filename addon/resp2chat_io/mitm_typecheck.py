"""A patch of mitmproxy 12's ``typecheck.check_option_type``: a type it refuses leaves no cycle.

Why. Each HTTP message mitmproxy makes checks its fields' types (``http.py`` ``_MessageData.
__post_init__``), and a field of an optional type (``bytes | None`` given ``None``: a new
``Response``'s content and trailers) is first checked against ``bytes``, which fails: the
function makes its ``TypeError`` before knowing, keeps it in a local (``e``) and raises it, so
the exception's traceback holds the frame that holds the exception: a cycle, freed only by
Python's cycle collector. The traceback's frames reach the caller's frames (``f_back``), which
keep their locals once they return: the gateway's ``json_response`` (the answer as text and as
bytes) and the addon that built it (the answer as a dict). Each answer the gateway built (a
15 MiB conversation items page) was so held three times over until a collection ran, which large
bytes never prompt (measured: +45 MiB for each 15 MiB page read).

What. ``install()`` (once; again: nothing) replaces the module's function with one that checks
the same and raises the same ``TypeError``, made only when it is raised and never kept in a
local: the traceback's frames are freed when the caller has caught it (reference counting).
"""

from __future__ import annotations

import typing
from collections import abc

from mitmproxy.utils import typecheck

_original = typecheck.check_option_type


def _refused(name: str, value: typing.Any, typeinfo) -> TypeError:
    return TypeError(f"Expected {typeinfo} for {name}, but got {type(value)}.")


def check_option_type(name: str, value: typing.Any, typeinfo) -> None:
    """mitmproxy's ``check_option_type``, its refusals made as they are raised (see above)."""
    origin = typing.get_origin(typeinfo)
    if origin is typing.Union or origin is typecheck.UnionType:
        for T in typing.get_args(typeinfo):
            if _fits(name, value, T):
                return
        raise _refused(name, value, typeinfo)
    if origin is tuple:
        types = typing.get_args(typeinfo)
        if not isinstance(value, (tuple, list)) or len(types) != len(value):
            raise _refused(name, value, typeinfo)
        for i, (x, T) in enumerate(zip(value, types)):
            check_option_type(f"{name}[{i}]", x, T)
        return
    if origin is abc.Sequence:
        T = typing.get_args(typeinfo)[0]
        if not isinstance(value, (tuple, list)):
            raise _refused(name, value, typeinfo)
        for v in value:
            check_option_type(name, v, T)
        return
    if origin is typing.IO or typeinfo in (typing.TextIO, typing.BinaryIO):
        if not hasattr(value, "read"):
            raise _refused(name, value, typeinfo)
        return
    if typeinfo is typing.Any:
        return
    if not isinstance(value, typeinfo) and not (typeinfo is float and isinstance(value, int)):
        raise _refused(name, value, typeinfo)


def _fits(name: str, value: typing.Any, typeinfo) -> bool:
    try:
        check_option_type(name, value, typeinfo)
    except TypeError:
        return False
    return True


def install() -> None:
    typecheck.check_option_type = check_option_type
