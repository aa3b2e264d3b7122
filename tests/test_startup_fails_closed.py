"""A gateway that cannot start as configured does not start: never a proxy serving without the
addon (no key, Host or path check, everything forwarded to the backend). Real mitmdump processes
and the real `resp2chat start`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest
import requests

from helpers import (ADDON, MITMDUMP, MITMWEB, RESP2CHAT, cli_env, free_port, listening_ports, openai_client,
                     start_gateway, stop_process, wait_until)
from wsclient import WSClient

GATEWAY_KEY = "gwkey-0123456789abcdef"


def backend_answered(port: int) -> requests.Response | None:
    """What a request the gateway must refuse (no key, a foreign Host) got, when the backend (the
    demo upstream, by its Server header) answered it: the proxy forwarded it unchecked."""
    try:
        r = requests.get(f"http://127.0.0.1:{port}/v1/models", headers={"host": "evil.example"}, timeout=2)
    except requests.RequestException:
        return None
    return r if r.headers.get("server", "").startswith("resp2chat-demo") else None


def run_to_exit(args: list[str], env: dict, port: int, cwd) -> tuple[int, str]:
    """Run ARGS (a gateway on ``port``) until it exits: (its exit code, its output). It must exit
    by itself, and no request may reach the backend through it meanwhile."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        open_proxy = wait_until(lambda: proc.poll() is not None or backend_answered(port), 60,
                                "the gateway exiting")
        if isinstance(open_proxy, requests.Response):
            stop_process(proc)
            pytest.fail(f"the gateway served as an open proxy (the backend answered {open_proxy.status_code} "
                        f"to a request without key, Host evil.example): {proc.stdout.read().decode()[-1500:]}")
        return proc.returncode, proc.stdout.read().decode(errors="replace")
    finally:
        stop_process(proc)
        proc.stdout.close()


@pytest.mark.parametrize("setting,needle", [
    ("resp2chat_max_sessions=lots", "resp2chat_max_sessions='lots' is invalid"),
    ("resp2chat_responses_websocket=maybe", "resp2chat_responses_websocket='maybe' is invalid"),
    ("resp2chat_max_sesions=3", "resp2chat_max_sesions: unknown setting (did you mean resp2chat_max_sessions?)"),
])
def test_an_invalid_set_value_stops_mitmdump(tmp_path, upstream, setting, needle):
    port = free_port()
    rc, out = run_to_exit([str(MITMDUMP), "-s", str(ADDON), "--mode", f"reverse:{upstream.origin}",
                           "--listen-host", "127.0.0.1", "--listen-port", str(port), "--set", setting],
                          cli_env(tmp_path), port, tmp_path)
    assert rc != 0, out
    assert needle in out and "Error logged during startup" in out, out


def test_an_invalid_value_in_mitmproxys_config_yaml_stops_mitmdump(tmp_path, upstream):
    # mitmproxy's own config file (in its confdir) holds option values too: typed, from YAML
    (tmp_path / "mitm").mkdir()
    (tmp_path / "mitm" / "config.yaml").write_text("resp2chat_max_sessions: lots\n")
    port = free_port()
    rc, out = run_to_exit([str(MITMDUMP), "-s", str(ADDON), "--mode", f"reverse:{upstream.origin}",
                           "--listen-host", "127.0.0.1", "--listen-port", str(port),
                           "--set", f"confdir={tmp_path / 'mitm'}"], cli_env(tmp_path), port, tmp_path)
    assert rc != 0 and "option resp2chat_max_sessions: 'lots' is invalid" in out, out


def test_a_bad_value_for_a_script_loaded_before_stops_mitmdump(tmp_path, upstream):
    # mitmproxy drops the other script, and its value stays deferred: then applying it failed
    # again as the gateway loaded, and the gateway was dropped too
    other = tmp_path / "other.py"
    other.write_text("class Other:\n    def load(self, loader):\n"
                     "        loader.add_option('other_rounds', int, 1, 'rounds')\n\naddons = [Other()]\n")
    port = free_port()
    rc, out = run_to_exit([str(MITMDUMP), "-s", str(other), "-s", str(ADDON), "--mode", f"reverse:{upstream.origin}",
                           "--listen-host", "127.0.0.1", "--listen-port", str(port), "--set", "other_rounds=lots"],
                          cli_env(tmp_path), port, tmp_path)
    assert rc != 0 and "--set other_rounds='lots' is invalid" in out, out


@pytest.mark.parametrize("setting,needle", [
    # refused by `start` itself (exit 2), as the same value in the environment or config file is
    ("resp2chat_max_sessions=lots", "max_sessions (from --set resp2chat_max_sessions): 'lots' is invalid"),
    # a boolean the settings table reads but mitmproxy's --set does not: refused by the addon (SetCheck)
    ("resp2chat_responses_websocket=yes", "resp2chat_responses_websocket='yes' is invalid"),
])
def test_an_invalid_set_value_stops_resp2chat_start(tmp_path, upstream, setting, needle):
    port = free_port()
    env = cli_env(tmp_path, RESP2CHAT_GATEWAY_API_KEY=GATEWAY_KEY, RESP2CHAT_UPSTREAM_BASE_URL=upstream.base_url,
                  RESP2CHAT_BIND_ADDR=f"127.0.0.1:{port}")
    rc, out = run_to_exit([str(RESP2CHAT), "start", "--", "--set", setting], env, port, tmp_path)
    assert rc != 0, out
    assert needle in out, out


REFUSED = {
    "no key beyond loopback": ({}, ["--listen-host", "0.0.0.0"],
                               "resp2chat: listening on 0.0.0.0 needs gateway_api_key or clients"),
    "upstream_base_url beside upstreams": (
        {"RESP2CHAT_UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1",
         "RESP2CHAT_UPSTREAMS": '[{"name": "fleet", "base_url": "http://127.0.0.1:9/v1"}]'},
        ["--listen-host", "127.0.0.1"], "resp2chat: upstream_base_url and upstreams are both set"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_setting_is_one_line_and_no_listening(tmp_path, upstream, case):
    """A setting the gateway refuses as it loads (an OptionsError from its configure) was shown
    as mitmproxy's "error in script" with a Python traceback, and mitmproxy then said it was
    "listening at *:PORT" before it exited. Now: the message alone, exit 1, never a listener."""
    env, listen, needle = REFUSED[case]
    port = free_port()
    rc, out = run_to_exit([str(MITMDUMP), "-s", str(ADDON), "--mode", f"reverse:{upstream.origin}", *listen,
                           "--listen-port", str(port), "--set", f"confdir={tmp_path / 'mitm'}"],
                          cli_env(tmp_path, **env), port, tmp_path)
    assert rc == 1 and needle in out, out
    assert "Traceback" not in out and "error in script" not in out and "listening at" not in out, out
    assert [line for line in out.splitlines() if "resp2chat:" in line] == \
        [line for line in out.splitlines() if needle in line], out  # (one line says it)


def test_resp2chat_start_with_a_refused_setting_says_it_in_one_line(tmp_path):
    port = free_port()
    rc, out = run_to_exit([str(RESP2CHAT), "start", "--demo"], cli_env(tmp_path, RESP2CHAT_BIND_ADDR=f"0.0.0.0:{port}"),
                          port, tmp_path)
    refusal = "resp2chat: listening on 0.0.0.0 needs gateway_api_key or clients"
    assert rc == 1 and refusal in out, out
    assert "Traceback" not in out and "listening at" not in out, out
    # `start` spoke before mitmproxy ran: it said "gateway listening on every IPv4 interface"
    # above the refusal, as if it listened; the refusal's own line is the only one that says it
    assert [line for line in out.splitlines() if "listening" in line] == \
        [line for line in out.splitlines() if refusal in line], out


# --- the script changes on disk, or in mitmproxy's options, while the gateway runs ----------------


def started_from_a_copy(tmp_path, upstream, *extra: str, program=MITMDUMP):
    """A gateway (keyed, no replay cache, a 2 s header deadline) run from a copy of its script in
    ``tmp_path``: (the gateway, its script, its openai client, a first turn stored, the ports it
    listens on)."""
    script = tmp_path / "resp2chat.py"
    shutil.copy(ADDON, script)
    gw = start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_gateway_api_key={GATEWAY_KEY}",
                       "--set", "resp2chat_max_replay_entries=0", "--set", "resp2chat_header_timeout_secs=2",
                       *extra, addon=script, program=program)
    try:
        client = openai_client(gw, api_key=GATEWAY_KEY)
        first = client.responses.create(model="demo-model", input="remember me")
        return gw, script, client, first, listening_ports(gw.proc.pid)
    except Exception:
        gw.stop()
        raise


def goes_on_whole(gw, upstream, client, first, ports) -> None:
    """The one gateway started goes on whole: the key and the header deadline (a connection that
    sends no request head is closed) hold, the stored first turn is continued over HTTP and the
    WebSocket, both reach the backend, and it listens on the ports it listened on (one relay)."""
    refused = requests.get(gw.base_url + "/models", timeout=10)
    assert refused.status_code == 401, (refused.status_code, refused.text[:300])
    silent = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    assert silent.recv(1) == b""  # (closed: no request head within header_timeout_secs)
    silent.close()
    upstream.clear()
    on = client.responses.create(model="demo-model", input="and now?", previous_response_id=first.id)
    assert on.status == "completed" and on.output_text == "You said: and now?"
    assert [m["content"] for m in upstream.requests()[-1]["messages"]][:1] == ["remember me"]
    ws = WSClient(gw.base_url, headers={"authorization": f"Bearer {GATEWAY_KEY}"})
    try:
        events = ws.turn({"type": "response.create", "model": "demo-model", "input": "by socket",
                          "previous_response_id": on.id})
    finally:
        ws.close()
    assert events[-1]["type"] == "response.completed", events[-1]
    assert len(upstream.requests()) == 2  # (both turns went to the backend as chat requests)
    assert listening_ports(gw.proc.pid) == ports  # (one relay, as before)
    assert "cannot be called from sync context" not in gw.log()


def test_a_reloaded_script_leaves_the_gateway_as_it_was(tmp_path, upstream):
    """mitmproxy reloads a ``-s`` script whenever its file changes (a ``git pull``, an editor, a
    deploy touching addon/resp2chat.py): it takes the script's addons out of its lookup and calls
    their ``done`` hooks synchronously, which refuses the gateway's first asynchronous one. So the
    reload stopped half-way, in mitmproxy's watcher task (no later change was ever looked at): the
    ``done`` hooks before that one had run (``HeadDeadline``'s: a client connection that sends no
    request head was no longer closed), the old addons went on unseen by name, and ``BodyAside``
    and ``KeepUpgrades`` (added to mitmproxy outside the script) held them. Now a change of the
    gateway's script is not reloaded (its code under resp2chat_io would not be either): a warning
    says to restart it, and the one set of addons goes on whole, its state too (a stored
    response, the relay: no second one listening), over HTTP and the WebSocket."""
    gw, script, client, first, ports = started_from_a_copy(tmp_path, upstream)
    try:
        def change(n: int) -> None:
            loaded = gw.log().count("Loading script")
            later = time.time() + 10 * n
            script.write_text(script.read_text() + f"\n# changed {n}\n")
            os.utime(script, (later, later))  # (mitmproxy's watcher looks at the mtime once a second)
            wait_until(lambda: gw.log().count("changed on disk") == n or gw.log().count("Loading script") > loaded,
                       30, f"change {n} noticed", gw.proc)

        change(1)
        goes_on_whole(gw, upstream, client, first, ports)
        change(2)  # (the first did not stop mitmproxy's watcher)
        assert gw.log().count("Loading script") == 1 and "Traceback" not in gw.log()
    finally:
        gw.stop()


def test_the_scripts_option_does_not_unload_the_gateway(tmp_path, upstream):
    """mitmproxy's ``scripts`` option changed while it runs, here in mitmweb's options (its REST
    API, as its editor sends them): a value without the gateway's script would unload it
    (``ScriptLoader.configure``: its ``done`` hooks called synchronously, refused half-way: the
    header deadline gone, the half-removed gateway still serving unseen by name, every later value
    without it failing in mitmproxy, "No such addon", and one naming it and another path to it
    building a second gateway beside it, with a second relay port). Such a value is refused, a
    400 saying why, the option as it was; a second copy of the gateway loaded beside it is refused
    by mitmproxy (its addons' names are taken: no second relay) and can be unloaded again; the one
    gateway goes on whole."""
    web_port, password = free_port(), "web-" + "p" * 24
    gw, script, client, first, ports = started_from_a_copy(
        tmp_path, upstream, "--set", f"web_port={web_port}", "--set", "web_host=127.0.0.1",
        "--set", "web_open_browser=false", "--set", f"web_password={password}", program=MITMWEB)
    try:
        xsrf = "x" * 32  # (mitmweb's double-submit check: the same value as cookie and header)
        web = dict(headers={"authorization": f"Bearer {password}", "X-XSRFToken": xsrf},
                   cookies={"_mitmproxy_xsrf": xsrf}, timeout=10)
        again = tmp_path / "again.py"  # (another path to the same gateway)
        again.symlink_to(script)

        def scripts(value: list) -> requests.Response:
            return requests.put(f"http://127.0.0.1:{web_port}/options", json={"scripts": value}, **web)

        for value in ([], [str(again)]):
            r = scripts(value)
            assert r.status_code == 400, (value, r.status_code, r.text)
            assert f"the gateway's script {script} is not unloaded" in r.text, r.text
        assert scripts([str(script), str(again)]).status_code == 200
        wait_until(lambda: "An addon called 'resp2chat_listen' already exists" in gw.log(), 30,
                   "the second copy refused", gw.proc)
        assert client.responses.create(model="demo-model", input="both?").output_text == "You said: both?"
        assert listening_ports(gw.proc.pid) == ports  # (no second relay, no second demo upstream)
        assert scripts([str(script)]).status_code == 200
        wait_until(lambda: f"Un-loading script: {again}" in gw.log(), 30, "the second copy unloaded", gw.proc)
        options = requests.get(f"http://127.0.0.1:{web_port}/options", **web).json()
        assert options["scripts"]["value"] == [str(script)]
        goes_on_whole(gw, upstream, client, first, ports)
    finally:
        gw.stop()


def test_the_gateways_script_gone_from_disk_leaves_it_as_it_was(tmp_path, upstream):
    """A deploy that deletes the gateway's script and writes it again: mitmproxy's watcher, finding
    the file gone, drops it from ``scripts``, which would unload the gateway (as above). The
    gateway is kept, with a warning saying so, and goes on whole once the file is back."""
    gw, script, client, first, ports = started_from_a_copy(tmp_path, upstream)
    try:
        aside = script.rename(tmp_path / "resp2chat.py.deploying")
        wait_until(lambda: f"Removing script {script}" in gw.log(), 30, "the file's absence noticed", gw.proc)
        aside.rename(script)
        goes_on_whole(gw, upstream, client, first, ports)
        assert f"the gateway's script {script} is not unloaded (its file was gone" in gw.log()
    finally:
        gw.stop()
