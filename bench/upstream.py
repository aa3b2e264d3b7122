"""The bench's upstream: the bundled demo upstream (resp2chat_io.demo_upstream), unchanged,
with a listen backlog large enough for 100 connections opened at once (socketserver's default
of 5 drops SYNs under a burst, and a dropped SYN costs a 1 s retransmit: noise, not gateway).

    python bench/upstream.py --port N
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addon"))

from resp2chat_io import demo_upstream  # noqa: E402

demo_upstream.DemoServer.request_queue_size = 1024

if __name__ == "__main__":
    sys.exit(demo_upstream.main())
