"""deploy/'s units as an admin runs them: their ExecStart command line by hand (systemd does not
run here), the gateway's log read as journald reads it (a pipe, not a terminal), and the TLS and
seal-key set-ups an admin makes on the gateway host."""

from __future__ import annotations

import re
import shlex

from helpers import ROOT, post_turn, start_gateway, wait_until

UNIT = ROOT / "deploy" / "systemd" / "resp2chat@.service"


def unit_flags() -> list[str]:
    """What deploy/'s unit gives mitmdump after ``resp2chat start --``."""
    line = next(line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart="))
    args = shlex.split(line.removeprefix("ExecStart="))
    return args[args.index("--") + 1:]


def test_the_units_log_reaches_the_journal_at_once(tmp_path):
    """With the unit's flags (flow_detail=0: no flow lines) and stdout a file or pipe, as under
    journald, a failed turn's warning is in the log while the gateway runs, not when it stops
    (Python buffers stdout that is no terminal: 8 KiB of warnings before the first showed)."""
    flags = unit_flags()
    assert "flow_detail=0" in flags and "termlog_verbosity=warn" in flags
    # (nothing listens on port 9; beyond loopback without TLS: a warning at start-up)
    gw = start_gateway("http://127.0.0.1:9", tmp_path, *flags, "--listen-host", "0.0.0.0",
                       "--set", "resp2chat_gateway_api_key=team-key-0123456789abcdef",
                       env={"PYTHONUNBUFFERED": ""})  # (as systemd starts it: the tests' environment sets it)
    try:
        wait_until(lambda: "WITHOUT TLS" in gw.log(), 10, "the start-up warning in the log")
        r = post_turn(gw, {"model": "m", "input": "hi"}, {"authorization": "Bearer team-key-0123456789abcdef"})
        assert r.status_code == 502
        rid = r.headers["x-request-id"]
        wait_until(lambda: rid in gw.log(), 10, "the failed turn's warning in the log")
        assert re.search(rf"{rid}.*cannot connect to the upstream", gw.log())
    finally:
        gw.stop()
