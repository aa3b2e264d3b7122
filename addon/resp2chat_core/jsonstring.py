"""Stream the value of ``{"input": "…"}`` while its JSON arrives in pieces.

A freeform (custom) tool such as apply_patch reaches a chat backend as a function with one
string parameter, so the model writes ``{"input": "*** Begin Patch\\n…"}`` token by token. The
client wants the raw input as it is written (``custom_tool_call_input.delta``), not one block at
the end. ``InputStream.feed`` returns the decoded text each piece adds. It gives up (and returns
nothing more) on any other shape — another key first, a non-string value — and the translator
then falls back to decoding the whole arguments at the end. Escapes split across pieces,
``\\uXXXX`` and surrogate pairs are handled.
"""

from __future__ import annotations

import json
import re

_OPENING = re.compile(r'\s*\{\s*"input"\s*:\s*"')
_MAYBE_OPENING = re.compile(r'\s*(\{\s*("(i(n(p(u(t("\s*(:\s*)?)?)?)?)?)?)?)?)?')
_ESCAPE_LEN = {"u": 6}  # \uXXXX; every other escape is two characters


class InputStream:
    __slots__ = ("_buf", "_state", "_pending")

    def __init__(self) -> None:
        self._buf = ""  # the undecided opening, or an escape split across pieces
        self._state = "opening"  # opening -> string -> done | failed
        self._pending = ""  # a high surrogate waiting for its pair

    @property
    def failed(self) -> bool:
        return self._state == "failed"

    def feed(self, piece: str) -> str:
        if self._state in ("done", "failed"):
            return ""
        text = self._buf + piece
        self._buf = ""
        if self._state == "opening":
            m = _OPENING.match(text)
            if m is None:
                if _MAYBE_OPENING.fullmatch(text):
                    self._buf = text  # still could become the opening
                else:
                    self._state = "failed"
                return ""
            self._state = "string"
            text = text[m.end():]
        return self._string(text)

    def _string(self, text: str) -> str:
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            j = i
            while j < n and text[j] not in '"\\':
                j += 1
            if j > i:
                out.append(self._flush_surrogate() + text[i:j])
            if j == n:
                break
            if text[j] == '"':
                self._state = "done"
                break
            # a backslash escape: complete it, or keep it for the next piece
            size = _ESCAPE_LEN.get(text[j + 1], 2) if j + 1 < n else 2
            if j + size > n:
                self._buf = text[j:]
                break
            try:
                char = json.loads('"' + text[j:j + size] + '"')
            except ValueError:
                self._state = "failed"
                break
            if "\ud800" <= char <= "\udbff":
                self._pending = char  # first half of a pair: wait for the second
            elif "\udc00" <= char <= "\udfff" and self._pending:
                out.append((self._pending + char).encode("utf-16", "surrogatepass").decode("utf-16"))
                self._pending = ""
            else:
                out.append(self._flush_surrogate() + char)
            i = j + size
            continue
        return "".join(out)

    def _flush_surrogate(self) -> str:
        lone, self._pending = self._pending, ""
        return lone.encode("utf-8", "replace").decode() if lone else ""
