"""The test suite is hermetic: a developer's saved configuration and exported keys never reach a
test gateway (they would send its traffic, with the saved key, to the configured backend)."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import ROOT, LocalServer, QuietHandler


class _Trap(QuietHandler):
    """The developer's configured backend: nothing from the test suite may arrive here."""

    seen: list[str] = []

    def do_POST(self):
        type(self).seen.append(f"{self.path} {self.headers.get('authorization')}")
        self.send_response(500)
        self.send_header("content-length", "0")
        self.end_headers()

    do_GET = do_POST


def test_a_saved_config_and_exported_keys_do_not_reach_test_gateways(tmp_path):
    _Trap.seen = []
    trap = LocalServer(_Trap)
    home = tmp_path / "developer"
    config = home / ".config" / "resp2chat" / "config.yaml"
    config.parent.mkdir(parents=True)
    trap_url = f"{trap.url}/v1"
    config.write_text(f"upstream_base_url: {trap_url}\nupstream_api_key: sk-saved-by-configure\n"
                      "upstream_model: saved-model\nmax_replay_entries: 5\n")
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "RESP2CHAT_UPSTREAM_BASE_URL": trap_url, "OPENAI_API_KEY": "sk-exported-by-the-developer",
           "RESP2CHAT_GATEWAY_API_KEY": "gw-exported"}
    try:
        # tests that start real gateways (a session one, a CLI one) and one that runs the addons in process
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "tests/test_e2e_sdk.py::test_sdk_incomplete_on_length",
                              "tests/test_cli.py::test_model_map_applies_without_upstream_model",
                              "tests/test_addon.py::test_a_turn_goes_through_the_relay_and_the_flow_shows_the_backend"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        trap.close()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "3 passed" in run.stdout
    assert _Trap.seen == []
