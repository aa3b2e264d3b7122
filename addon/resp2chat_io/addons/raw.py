"""``resp2chat start --raw`` (option ``resp2chat_raw``): the model's deltas on stdout as they
arrive, reasoning dim, tool calls cyan."""

from __future__ import annotations

import sys

from mitmproxy import ctx


class RawPrinter:
    _STYLE = {"reasoning": "\x1b[2;3m", "tool": "\x1b[36m"}  # dim italic thinking, cyan tool calls

    def __init__(self) -> None:
        self.last = "end"

    def __call__(self, kind: str, text: str) -> None:
        if kind != self.last and self.last not in ("end", "tool") and kind != "end":
            sys.stdout.write("\n")
        self.last = kind
        style = self._STYLE.get(kind)
        sys.stdout.write(f"{style}{text}\x1b[0m" if style else text)
        sys.stdout.flush()


class RawOutput:
    name = "resp2chat_raw"

    def load(self, loader) -> None:
        loader.add_option("resp2chat_raw", bool, False,
                          "Print the model's streamed text, reasoning and tool calls to stdout.")

    @staticmethod
    def started(run) -> None:
        """A turns.py ``started`` listener (HTTP and the WebSocket alike)."""
        if ctx.options.resp2chat_raw:
            run.reader.translator.observer = RawPrinter()
