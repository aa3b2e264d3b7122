"""``<think>…</think>`` in streamed content: split it into reasoning and text, incrementally.

A backend without a reasoning parser (vLLM or sglang started without ``--reasoning-parser``,
llama.cpp with ``--reasoning-format none``, many hosted shims) streams a thinking model's
chain of thought inside ``content``, wrapped in ``<think>…</think>``. Some chat templates
(DeepSeek-R1, QwQ, Qwen3 "-Thinking" models) already write ``<think>`` into the *prompt*, so
the stream starts inside the thinking and only the closing tag ever arrives.

``ThinkSplitter`` turns content deltas into ``(kind, text)`` pieces, kind being ``REASONING``,
``TEXT`` or ``BREAK`` (close the text item that is open: its text was reasoning after all).
Tags may be split across deltas (``"<thi"`` + ``"nk>"``): a suffix that could still become a
tag is held back until the next delta decides, and released by ``flush``. What the pieces
read as (runs of one kind joined) depends only on the content, never on where the deltas cut
it (test_dialects' property test).

States (``mode`` picks the first one)::

    START ──"<think>"──▶ THINK ──"</think>"──▶ AFTER ──first non-space──▶ PASS
      │  (only leading whitespace before it)        (whitespace dropped)
      └──anything else──▶ WATCH ──"</think>" (no opener seen)──▶ BREAK, AFTER
                            │
                            └──another item opens (``settle``)──▶ PASS

- ``auto`` (default) starts in START: an opening tag is recognised only at the very start
  of the content. Text that is not a think block streams live as text (WATCH); if a closing
  tag with no opener then appears in that first text, the text so far cannot be unsent, so
  the splitter asks for a BREAK: the text item closes there and the answer after the tag
  becomes a message of its own. Configure ``open`` for such models to get a reasoning item.
- ``open`` starts in THINK (a redundant leading ``<think>`` is dropped). THINK is entered
  through THINK_LEAD, which drops the whitespace right after the opening tag.
- ``off`` never splits (the translator does not create a splitter at all).

In PASS the translator stops calling the splitter: text after the think block costs nothing.
Whitespace just inside the tags and between ``</think>`` and the answer is dropped, as the
servers' own reasoning parsers do.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
REASONING, TEXT, BREAK = "reasoning", "text", "break"

START, THINK, THINK_LEAD, AFTER, WATCH, PASS = range(6)
MODES = ("auto", "open", "off")


def _partial_tag(buf: str, tag: str) -> int:
    """Where a suffix of ``buf`` that is a proper prefix of ``tag`` starts (else len(buf))."""
    j = buf.rfind("<", max(0, len(buf) - len(tag) + 1))
    if j >= 0 and tag.startswith(buf[j:]):
        return j
    return len(buf)


class ThinkSplitter:
    __slots__ = ("state", "held", "_blanks")

    def __init__(self, mode: str = "auto"):
        self.state = THINK_LEAD if mode == "open" else START
        self.held = ""  # a suffix that may still become a tag (or whitespace before one)
        # whitespace-only deltas after a whitespace-only ``held``, as they came: a long run of
        # them (a model writing blank lines) is joined once, not copied again at each delta
        self._blanks: list[str] = []

    @property
    def passing(self) -> bool:
        return self.state == PASS

    def feed(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if self.state in (START, THINK) and not text.strip() and not self.held.strip():
            self._blanks.append(text)  # (what either state does with it: held, whitespace before a tag)
            return out
        held = self._held()
        buf = held + text if held else text
        self.held = ""
        while buf:
            state = self.state
            if state == START:
                lead = buf.lstrip()
                if lead.startswith(OPEN):
                    self.state, buf = THINK_LEAD, lead[len(OPEN):]
                elif not lead or OPEN.startswith(lead):
                    self.held = buf  # only whitespace, or a possible "<thi…" so far
                    return out
                else:
                    self.state = WATCH
            elif state == THINK_LEAD:
                buf = buf.lstrip()
                if not buf:
                    return out
                if buf.startswith(OPEN):  # configured "open" but the model wrote the tag anyway
                    buf = buf[len(OPEN):]
                    continue
                if OPEN.startswith(buf):  # (a lone "<" too: the next delta says which tag it starts)
                    self.held = buf
                    return out
                self.state = THINK
            elif state == THINK:
                i = buf.find(CLOSE)
                if i >= 0:
                    piece = buf[:i].rstrip()
                    if piece:
                        out.append((REASONING, piece))
                    self.state, buf = AFTER, buf[i + len(CLOSE):]
                    continue
                cut = _partial_tag(buf, CLOSE)
                keep = len(buf[:cut].rstrip())  # trailing whitespace waits: it may precede the tag
                if keep:
                    out.append((REASONING, buf[:keep]))
                self.held = buf[keep:]
                return out
            elif state == AFTER:
                buf = buf.lstrip()
                if buf:
                    self.state = PASS
                    out.append((TEXT, buf))
                return out
            elif state == WATCH:
                i = buf.find(CLOSE)
                if i >= 0:
                    if buf[:i]:
                        out.append((TEXT, buf[:i]))
                    out.append((BREAK, ""))
                    self.state, buf = AFTER, buf[i + len(CLOSE):]
                    continue
                cut = _partial_tag(buf, CLOSE)
                if cut:
                    out.append((TEXT, buf[:cut]))
                self.held = buf[cut:]
                return out
            else:  # PASS
                out.append((TEXT, buf))
                return out
        return out

    def settle(self) -> list[tuple[str, str]]:
        """Another kind of item is opening: release what is held; a watched text is final."""
        out = self.flush()
        if self.state in (START, WATCH):
            self.state = PASS
        return out

    def _held(self) -> str:
        """``held`` and the blank deltas after it, as one string."""
        if self._blanks:
            self.held += "".join(self._blanks)
            self._blanks = []
        return self.held

    def flush(self) -> list[tuple[str, str]]:
        """Release a held suffix (end of stream, or before another item opens)."""
        held, self.held = self._held(), ""
        if not held:
            return []
        if self.state in (THINK, THINK_LEAD):
            held = held.rstrip() if self.state == THINK else held.strip()
            return [(REASONING, held)] if held else []
        if self.state == AFTER:
            return []
        if self.state == START:
            self.state = WATCH
        return [(TEXT, held)]
