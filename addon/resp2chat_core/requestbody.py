"""A request body as the gateway accepts it: strict UTF-8 JSON, refused with the offset.

Rules of this file:
- Sans-I/O, and the first thing that decodes a ``/v1/responses`` body (turn.py ``decode_body``):
  nothing the gateway could not encode again may get past it, because what is lowered from it
  goes to a backend byte for byte.
- Every refusal is a ``GatewayError`` 400 ``invalid_json`` whose message says where (a byte
  offset into the body as received).

Theory of operation
-------------------
``json.loads`` is lenient where a gateway must not be. Given bytes it guesses an encoding
(UTF-16 and UTF-32 too) and decodes with ``surrogatepass``, so ``ED A0 80`` inside a string
becomes a lone surrogate that no encoder will write again (the lowering then raised
``UnicodeEncodeError``). It turns ``\\ud800`` escapes into the same lone surrogates. And it
accepts ``NaN``, ``Infinity`` and numbers too large for a float (``1e400`` -> ``inf``), which
Python would send upstream as the non-JSON tokens ``NaN``/``Infinity``.

So: decode the bytes as UTF-8 strictly (the error gives the offset); parse the text with
``parse_constant`` and ``parse_float`` that refuse non-finite numbers (the C scanner stays in
use, so the common path costs nothing extra); then, only if the text holds an escape in the
surrogate range at all (one C-speed search), walk its escapes in order — ``\\\\`` is consumed as a
pair, so an escaped backslash before ``ud800`` is never mistaken for an escape — and refuse the
first surrogate escape that is not a high one followed at once by a low one.
"""

from __future__ import annotations

import json
import math
import re

from .errors import GatewayError

_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # any escape in U+D800..U+DFFF
# An escape: a valid surrogate pair, a lone surrogate, or anything else (one char after "\").
_ESCAPE = re.compile(r"\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
                     r"|(u[dD][89a-fA-F][0-9a-fA-F]{2})|.)", re.S)


def _invalid(message: str) -> GatewayError:
    return GatewayError(message, code="invalid_json")


def _constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _byte_offset(text: str, pos: int) -> int:
    return len(text[:pos].encode())


def _same(value: dict) -> dict:
    return value


def _int(text: str) -> int:
    return int(text)


def loads(body: bytes, yielding: bool = False):
    """The body's JSON value; ``GatewayError`` (400 ``invalid_json``) if it is not strict UTF-8
    JSON with finite numbers and valid Unicode strings.

    ``yielding``: for a decode in a worker thread (resp2chat_io/offload.py). The C decoder holds
    the GIL from start to end, so a thread decoding 30 MB would stall the event loop as much as
    decoding on it; with a Python-level hook at every object and number (the same values), the
    interpreter hands the GIL over between them, as it does every few milliseconds."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(f"request body is not valid UTF-8: {exc.reason} at byte offset {exc.start}") from None
    hooks = {"object_hook": _same, "parse_int": _int} if yielding else {}
    try:
        data = json.loads(text, parse_constant=_constant, parse_float=_float, **hooks)
    except json.JSONDecodeError as exc:
        raise _invalid(f"request body is not valid JSON: {exc.msg} at byte offset "
                       f"{_byte_offset(text, exc.pos)}") from None
    except ValueError as exc:  # a number we refuse, or an integer of more than 4300 digits
        why = "an integer has too many digits" if "digits" in str(exc) else str(exc)
        raise _invalid(f"request body is not valid JSON: {why}") from None
    except RecursionError:
        raise _invalid("request body is nested too deeply") from None
    found = _SURROGATE.search(text)
    if found is not None:
        for m in _ESCAPE.finditer(text):
            if m.group(1):
                raise _invalid(f"request body has a lone surrogate escape (\\{m.group(1)}) at byte offset "
                               f"{_byte_offset(text, m.start())}: JSON strings must be valid Unicode")
    return data
