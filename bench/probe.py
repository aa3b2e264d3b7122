"""Loaded by the bench after the addon in every resp2chat gateway (``-s addon -s bench/probe.py``):
prints which files the addon's packages came from, so that a run proves each gateway of an A/B
(``bench/run.py --ab``) loaded its own tree and not the editable install of this one.

mitmproxy puts a script's directory first on ``sys.path`` while it loads it; the packages the
addon imports then are the ones found there, and they stay in ``sys.modules`` for the life of
the process. No hooks: this addon does nothing after it has printed.
"""

import json
import sys

MARK = "resp2chat-bench-probe "
if __name__.startswith("__mitmproxy_script__"):  # (run.py imports MARK)
    print(MARK + json.dumps({name: getattr(sys.modules.get(name), "__file__", None)
                             for name in ("resp2chat_core", "resp2chat_io")}), file=sys.stderr, flush=True)
