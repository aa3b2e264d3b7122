"""The resp2chat CLI and configuration: real processes, real stdin, real files."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import tomllib

import pytest
import requests
import yaml

from helpers import (
    ADDON, MITMDUMP, RESP2CHAT, ROOT, Codex, LocalServer, QuietHandler, chat_chunk, chat_sse, cli_env, config_file, free_port,
    listening_ports, openai_client, run_cli, send_sse, start_gateway, wait_http,
)

from resp2chat_core.settings import FIELDS


# --- configure -------------------------------------------------------------------------------


def test_configure_interactive_reads_real_stdin(tmp_path, upstream):
    answers = f"{upstream.base_url}\nsk-typed-upstream-key\n1\n127.0.0.1:4555\n"
    out = run_cli(tmp_path, "configure", stdin=answers)
    assert out.returncode == 0, out.stderr
    assert "Chat Completions base URL [http://127.0.0.1:8000/v1]:" in out.stdout
    assert "1. demo-model  (context 131072)" in out.stdout  # probed the upstream's /models
    path = config_file(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    saved = yaml.safe_load(path.read_text())
    assert saved == {"bind_addr": "127.0.0.1:4555", "upstream_base_url": upstream.base_url,
                     "upstream_api_key": "sk-typed-upstream-key", "upstream_model": "demo-model"}
    # run again: current values are the defaults, empty answers keep them
    again = run_cli(tmp_path, "configure", stdin="\n\n\n\n")
    assert f"[{upstream.base_url}]" in again.stdout and "[[keep]]" in again.stdout
    assert yaml.safe_load(path.read_text()) == saved



def test_configure_interactive_keeps_what_the_file_says(tmp_path):
    """Enter at every question keeps the file's upstream: `demo` stays the demo (not the
    default URL, which would stop the demo), and a file with `upstreams` gets no
    `upstream_base_url` beside them (the gateway refuses to start with both)."""
    path = config_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("upstream_base_url: demo\n")
    out = run_cli(tmp_path, "configure", stdin="\n\n\n\n")
    assert out.returncode == 0, out.stderr
    assert "Chat Completions base URL [demo]:" in out.stdout
    assert yaml.safe_load(path.read_text()) == {"upstream_base_url": "demo"}

    upstreams = [{"name": "fleet", "base_url": "http://127.0.0.1:9/v1", "models": ["*"]}]
    path.write_text(yaml.safe_dump({"upstreams": upstreams}))
    out = run_cli(tmp_path, "configure", stdin="\n\n\n\n")
    assert out.returncode == 0, out.stderr
    assert "Chat Completions base URL" not in out.stdout and "upstreams" in out.stdout
    assert "no model list from http://127.0.0.1:9/v1/models: nothing answers there" in out.stdout
    assert yaml.safe_load(path.read_text()) == {"upstreams": upstreams}


def test_a_misspelled_setting_in_the_file_is_named_not_shown(tmp_path, upstream):
    """A setting the file misspells may be a secret (`upstream_api_ky: sk-…`): start-up and the
    CLI name it and the setting meant, never its value (as for a misspelled `--set`)."""
    path = config_file(tmp_path)
    path.parent.mkdir(parents=True)
    secret = "sk-typo-secret-5555"
    path.write_text(f"upstream_api_ky: {secret}\n")
    mitmdump = subprocess.run([str(MITMDUMP), "-s", str(ADDON), "--mode", f"reverse:{upstream.origin}",
                               "--listen-port", str(free_port()), "--set", f"confdir={tmp_path / 'conf'}"],
                              capture_output=True, text=True, timeout=60, env=cli_env(tmp_path), cwd=tmp_path)
    for out in (mitmdump, run_cli(tmp_path, "start"), run_cli(tmp_path, "print-config", "--offline")):
        text = out.stdout + out.stderr
        assert out.returncode != 0 and "upstream_api_ky" in text, text
        assert "did you mean upstream_api_key?" in text and secret not in text, text


def test_a_misspelled_set_is_named_with_the_setting_meant(tmp_path, upstream):
    """``configure --set`` listed every setting's name after a misspelled one (only the config
    file's said which it meant): each entry point says "did you mean", never the value."""
    secret = "sk-typo-secret-6666"
    configure = run_cli(tmp_path, "configure", "-y", "--set", f"upstream_api_ky={secret}")
    assert configure.returncode == 2, configure.stderr
    assert "--set upstream_api_ky: unknown setting (did you mean upstream_api_key?)" in configure.stderr, configure.stderr
    assert secret not in configure.stderr and "max_sessions" not in configure.stderr, configure.stderr
    assert not config_file(tmp_path).exists()
    # `start` hands --set on to mitmdump, whose SetCheck names it as mitmproxy's option
    start = run_cli(tmp_path, "start", "--", "--set", f"resp2chat_upstream_api_ky={secret}",
                    RESP2CHAT_BIND_ADDR=f"127.0.0.1:{free_port()}", RESP2CHAT_UPSTREAM_BASE_URL=upstream.base_url)
    text = start.stdout + start.stderr
    assert start.returncode != 0, text
    assert ("--set resp2chat_upstream_api_ky: unknown setting (did you mean resp2chat_upstream_api_key?)"
            in text and secret not in text), text

def test_configure_non_interactive_and_typed_values(tmp_path):
    out = run_cli(tmp_path, "configure", "-y", "--upstream-base-url", "https://llm.example/api/v1",
                  "--set", 'model_map={"gpt-5": "qwen3"}', "--set", "tool_denylist=web_search,view_image",
                  "--set", "request_timeout_secs=90", "--set", "flatten_content=false")
    assert out.returncode == 0, out.stderr
    # request_timeout_secs is the old name of upstream_idle_timeout_secs: still read, saved under the new one
    assert "request_timeout_secs is deprecated" in out.stderr
    saved = yaml.safe_load(config_file(tmp_path).read_text())
    assert saved == {"upstream_base_url": "https://llm.example/api/v1", "model_map": {"gpt-5": "qwen3"},
                     "tool_denylist": ["web_search", "view_image"], "flatten_content": False,
                     "upstream_idle_timeout_secs": 90}


@pytest.mark.parametrize("args,field", [
    (["--bind-addr", "everywhere"], "bind_addr"),
    (["--upstream-base-url", "ftp://x"], "upstream_base_url"),
    (["--set", "max_replay_entries=-3"], "max_replay_entries"),
    (["--set", "nonsense=1"], "nonsense"),
])
def test_configure_rejects_invalid_values(tmp_path, args, field):
    out = run_cli(tmp_path, "configure", "-y", *args)
    assert out.returncode == 2
    assert field in out.stderr and "invalid" in out.stderr or "unknown setting" in out.stderr
    assert not config_file(tmp_path).exists()


# --- precedence and start-up validation ------------------------------------------------------


def test_precedence_set_over_env_over_file(tmp_path, upstream):
    config_file(tmp_path).parent.mkdir(parents=True)
    config_file(tmp_path).write_text("upstream_model: file-model\nmodel_map: {demo: mapped}\n")
    seen = []
    for env, extra, expect in [
        ({}, (), "file-model"),
        ({"RESP2CHAT_UPSTREAM_MODEL": "env-model"}, (), "env-model"),
        ({"RESP2CHAT_UPSTREAM_MODEL": "env-model"}, ("--set", "resp2chat_upstream_model=set-model"), "set-model"),
    ]:
        gw = start_gateway(upstream.origin, tmp_path, *extra, env={**cli_env(tmp_path), **env})
        try:
            requests.post(gw.base_url + "/responses", json={"model": "demo", "input": "which model"}, timeout=30)
        finally:
            gw.stop()
        seen.append((upstream.requests()[-1]["model"], expect))
    assert [s for s, _ in seen] == [e for _, e in seen]


def test_model_map_applies_without_upstream_model(tmp_path, upstream):
    env = cli_env(tmp_path, RESP2CHAT_MODEL_MAP='{"gpt-5-codex": "demo-model"}')
    gw = start_gateway(upstream.origin, tmp_path, env=env)
    try:
        requests.post(gw.base_url + "/responses", json={"model": "gpt-5-codex", "input": "x"}, timeout=30)
    finally:
        gw.stop()
    assert upstream.requests()[-1]["model"] == "demo-model"


@pytest.mark.parametrize("env,needle", [
    ({"RESP2CHAT_MAX_REPLAY_ENTRIES": "lots"}, "max_replay_entries (from RESP2CHAT_MAX_REPLAY_ENTRIES): 'lots' is invalid"),
    ({"RESP2CHAT_BIND_ADDR": "0.0.0.0:4000"}, "needs gateway_api_key"),
    ({"RESP2CHAT_UPSTREAM_BASE_URL": "localhost:8000"}, "upstream_base_url"),
])
def test_invalid_settings_stop_start_up(tmp_path, env, needle):
    proc = subprocess.run([str(MITMDUMP), "-s", str(ADDON), "--set", f"confdir={tmp_path}"],
                          capture_output=True, text=True, timeout=30, env=cli_env(tmp_path, **env), cwd=tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr
    # one line says why, nothing says it listens (mitmproxy exits right after binding)
    assert "Traceback" not in proc.stdout + proc.stderr and "listening at" not in proc.stdout + proc.stderr


def test_invalid_config_file_stops_start_up(tmp_path):
    config_file(tmp_path).parent.mkdir(parents=True)
    config_file(tmp_path).write_text("brave_max_results: many\n")
    out = run_cli(tmp_path, "start")
    assert out.returncode != 0 and "brave_max_results (from config file): 'many' is invalid" in out.stderr


# --- request shaping settings, end to end ------------------------------------------------------


class _Capture(QuietHandler):
    """An upstream that records headers and answers one fixed chat stream."""

    seen: list[dict] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        headers = {k.lower(): v for k, v in self.headers.items()}
        type(self).seen.append({"headers": headers, "body": json.loads(body), "path": self.path})
        data = chat_sse(chat_chunk({"content": "ok"}, "stop"))
        send_sse(self, data)

    do_GET = do_POST


@pytest.fixture
def capture():
    _Capture.seen = []
    with LocalServer(_Capture) as server:
        yield server, _Capture.seen


def test_shaping_settings_and_credentials(tmp_path, capture):
    server, seen = capture
    port = server.server_address[1]
    env = cli_env(tmp_path,
                  RESP2CHAT_UPSTREAM_BASE_URL=f"http://127.0.0.1:{port}/api/v1",
                  OPENAI_API_KEY="sk-upstream-from-openai-env",
                  RESP2CHAT_TOOL_DENYLIST="view_image,multi_agent_v1__wait_agent",
                  RESP2CHAT_UPSTREAM_EXTRA_PARAMS='{"chat_template_kwargs": {"enable_thinking": false}}',
                  RESP2CHAT_DROP_UPSTREAM_PARAMS="parallel_tool_calls,stream_options")
    gw = start_gateway("http://127.0.0.1:9", tmp_path, env=env)
    try:
        body = json.loads((ROOT / "tests/fixtures/codex-0.169.0/01-text-only.json").read_text())["body"]
        r = requests.post(gw.base_url + "/responses", json=body, timeout=30,
                          headers={"authorization": "Bearer sk-client-never-forwarded"})
        assert r.status_code == 200 and b"response.completed" in r.content
    finally:
        gw.stop()
    got = seen[-1]
    assert got["path"] == "/api/v1/chat/completions"  # path prefix kept
    assert got["headers"]["authorization"] == "Bearer sk-upstream-from-openai-env"
    names = [t["function"]["name"] for t in got["body"]["tools"]]
    assert "view_image" not in names and "multi_agent_v1__wait_agent" not in names and "exec_command" in names
    assert got["body"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert "parallel_tool_calls" not in got["body"] and "stream_options" not in got["body"]
    assert "sk-client-never-forwarded" not in json.dumps(got) and "sk-upstream-from-openai-env" not in gw.log()


# --- start -----------------------------------------------------------------------------------


def _start(tmp_path, *args, bind: str = "127.0.0.1:{port}", port: int | None = None, host: str = "127.0.0.1",
           **env) -> tuple[subprocess.Popen, int]:
    """``resp2chat start *args`` with ``RESP2CHAT_BIND_ADDR`` ``bind`` (``{port}``: a free port,
    or ``port``), once ``http://HOST:PORT/healthz`` answers: the process and the port."""
    port = port or free_port()
    proc = subprocess.Popen([str(RESP2CHAT), "start", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=cli_env(tmp_path, RESP2CHAT_BIND_ADDR=bind.format(port=port), **env), cwd=tmp_path)
    try:
        wait_http(f"http://{host}:{port}/healthz", proc=proc)
    except BaseException:
        _stop(proc)
        raise
    return proc, port


def _read_until(proc: subprocess.Popen, needle: str, timeout: float = 30) -> str:
    """What the process printed, read as it comes, up to and including ``needle``."""
    import select

    out, deadline = b"", time.monotonic() + timeout
    while needle.encode() not in out:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise TimeoutError(f"{needle!r} not printed within {timeout} s: {out[-2000:]!r}")
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=15)
    return out.decode(errors="replace")


def test_start_uses_configured_upstream(tmp_path, upstream):
    proc, port = _start(tmp_path, RESP2CHAT_UPSTREAM_BASE_URL=upstream.base_url)
    try:
        client = openai_client(f"http://127.0.0.1:{port}/v1")
        assert client.responses.create(model="demo-model", input="via start").output_text == "You said: via start"
    finally:
        out = _stop(proc)
    assert f"gateway on http://127.0.0.1:{port}/v1 -> {upstream.base_url}" in out
    assert f"listening at 127.0.0.1:{port}" in out and "*:8080" not in out
    assert "warning" not in out, out  # the backend answers: nothing to warn about


def _start_configured(tmp_path, config: dict) -> tuple[subprocess.Popen, int]:
    config_file(tmp_path).parent.mkdir(parents=True)
    config_file(tmp_path).write_text(yaml.safe_dump(config))
    return _start(tmp_path)


def _warnings(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("resp2chat: warning:")]


def _nothing_at(url: str) -> str:
    return (f"resp2chat: warning: nothing answers at {url} (connection refused): is the backend running? "
            "The gateway starts anyway.")


def test_start_warns_when_nothing_answers_at_the_upstream(tmp_path):
    """The backend not running (or a wrong port in upstream_base_url): ``start`` said nothing, and
    the first turn failed. It says so at once, one line naming the URL (never the key), and the
    gateway starts all the same (the backend may come up later)."""
    closed = f"http://127.0.0.1:{free_port()}/v1"  # (a port just freed: nothing listens there)
    proc, port = _start_configured(tmp_path, {"upstream_base_url": closed, "upstream_api_key": "sk-never-shown-4242"})
    try:
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        out = _stop(proc)
    assert _warnings(out) == [_nothing_at(closed)], out
    assert "sk-never-shown-4242" not in out


def test_start_warns_of_each_upstream_entry_that_does_not_answer(tmp_path, upstream):
    """With ``upstreams``: every entry is checked (at once), only the silent ones are named, in
    one line; a ``demo`` entry is the gateway's own (not checked)."""
    closed = f"http://127.0.0.1:{free_port()}/v1"
    proc, port = _start_configured(tmp_path, {"upstreams": [
        {"name": "gone", "base_url": closed, "api_key": "sk-entry-never-shown", "models": ["gone-*"]},
        {"name": "here", "base_url": upstream.base_url, "models": ["demo-*"]},
        {"name": "toy", "base_url": "demo", "models": ["*"]},
    ]})
    try:
        client = openai_client(f"http://127.0.0.1:{port}/v1")
        assert client.responses.create(model="demo-model", input="still here").output_text == "You said: still here"
    finally:
        out = _stop(proc)
    assert _warnings(out) == [_nothing_at(closed)], out
    assert "sk-entry-never-shown" not in out


def test_start_set_bind_addr_wins_over_environment(tmp_path, upstream):
    # --set wins over the environment and the file, also for the address `start` names in --mode
    env_port, wanted = free_port(), free_port()
    proc, _ = _start(tmp_path, "--", "--set", f"resp2chat_bind_addr=127.0.0.1:{wanted}", bind=f"127.0.0.1:{env_port}",
                     port=wanted, RESP2CHAT_UPSTREAM_BASE_URL=upstream.base_url)
    try:
        client = openai_client(f"http://127.0.0.1:{wanted}/v1")
        assert client.responses.create(model="demo-model", input="set wins").output_text == "You said: set wins"
    finally:
        out = _stop(proc)
    assert f"gateway on http://127.0.0.1:{wanted}/v1" in out and f"listening at 127.0.0.1:{wanted}" in out, out
    assert str(env_port) not in out


def test_start_says_it_listens_on_every_interface(tmp_path, upstream):
    """``bind_addr: 0.0.0.0:PORT``: ``start`` said "gateway on http://127.0.0.1:PORT/v1", as if it
    listened on loopback alone. It says it starts on every interface, and the URL to use here."""
    proc, port = _start(tmp_path, bind="0.0.0.0:{port}", RESP2CHAT_GATEWAY_API_KEY="gwkey-0123456789abcdef",
                        RESP2CHAT_UPSTREAM_BASE_URL=upstream.base_url)
    out = _stop(proc)
    assert (f"starting the gateway on every IPv4 interface (0.0.0.0:{port}; from this machine: "
            f"http://127.0.0.1:{port}/v1) -> {upstream.base_url}") in out, out
    assert "gateway on http://127.0.0.1" not in out and f"listening at *:{port}" in out, out


def test_start_on_ipv6_loopback_listens_and_names_a_url_clients_can_use(tmp_path, upstream):
    """``bind_addr: [::1]:PORT``: ``start`` handed mitmproxy ``@[::1]:PORT`` (it failed to listen:
    "Name or service not known") and said ``http://::1:PORT/v1``, a URL no client parses. It
    listens on ::1 and says ``http://[::1]:PORT/v1``, which the openai SDK and print-config use."""
    proc, port = _start(tmp_path, bind="[::1]:{port}", host="[::1]", RESP2CHAT_UPSTREAM_BASE_URL=upstream.base_url)
    try:
        client = openai_client(f"http://[::1]:{port}/v1")
        assert client.responses.create(model="demo-model", input="over v6").output_text == "You said: over v6"
    finally:
        out = _stop(proc)
    assert f"starting the gateway on http://[::1]:{port}/v1 -> {upstream.base_url}" in out, out
    printed = run_cli(tmp_path, "print-config", "--offline", RESP2CHAT_BIND_ADDR=f"[::1]:{port}")
    provider = tomllib.loads(printed.stdout)["model_providers"]["resp2chat"]
    assert provider["base_url"] == f"http://[::1]:{port}/v1", printed.stderr


@pytest.mark.parametrize("how", ["--listen-port", "-p", "--set", "-p after --set"])
def test_start_listen_port_wins_over_bind_addr(tmp_path, upstream, how):
    """``resp2chat start -- --listen-port N``: ``start`` names bind_addr in ``--mode`` (its
    ``@host:port``), which beats mitmproxy's own ``--listen-port``, so the user's explicit port
    was silently ignored and the gateway listened on bind_addr's. Now it wins, as ``--set
    resp2chat_bind_addr`` does (bind_addr's host stays), and the URL start prints says so."""
    env_port, wanted = free_port(), free_port()
    given = {"--listen-port": ["--listen-port", str(wanted)], "-p": [f"-p{wanted}"],
             "--set": ["--set", f"listen_port={wanted}"],
             # mitmproxy applies its --set values first, its flags after: the flag wins
             "-p after --set": ["--set", f"listen_port={free_port()}", "-p", str(wanted)]}[how]
    proc, _ = _start(tmp_path, "--", *given, bind=f"127.0.0.1:{env_port}", port=wanted,
                     RESP2CHAT_UPSTREAM_BASE_URL=upstream.base_url)
    try:
        client = openai_client(f"http://127.0.0.1:{wanted}/v1")
        assert client.responses.create(model="demo-model", input="port wins").output_text == "You said: port wins"
        assert env_port not in listening_ports(proc.pid)
    finally:
        out = _stop(proc)
    assert f"gateway on http://127.0.0.1:{wanted}/v1" in out and f"listening at 127.0.0.1:{wanted}" in out, out
    assert str(env_port) not in out


def test_start_refuses_a_listen_port_that_contradicts_set_bind_addr(tmp_path):
    a, b = free_port(), free_port()
    out = run_cli(tmp_path, "start", "--", "--set", f"resp2chat_bind_addr=127.0.0.1:{a}", "--listen-port", str(b))
    assert out.returncode == 2, out.stderr
    assert f"--listen-port {b} and --set resp2chat_bind_addr=127.0.0.1:{a} name different ports" in out.stderr
    out = run_cli(tmp_path, "start", "--", "--listen-port", "eighty")
    assert out.returncode == 2 and "'eighty' is no port number" in out.stderr, out.stderr


def test_start_refuses_an_invalid_set_value(tmp_path):
    out = run_cli(tmp_path, "start", "--", "--set", "resp2chat_bind_addr=nonsense")
    assert out.returncode == 2
    assert "bind_addr (from --set resp2chat_bind_addr): 'nonsense' is invalid" in out.stderr


def test_start_falls_back_to_demo_and_raw_prints_the_stream(tmp_path):
    # nothing configured (and nothing at :8000 here): the bundled demo upstream answers
    proc, port = _start(tmp_path, "--raw")
    try:
        client = openai_client(f"http://127.0.0.1:{port}/v1")
        list(client.responses.create(model="demo-model", input="raw mode", stream=True))
        printed = _read_until(proc, "You said: raw mode")  # the gateway prints as the stream goes
    finally:
        out = _stop(proc)
    out = printed + out
    assert "serving the bundled demo upstream" in out
    assert "\x1b[2;3mThinking " in out and "You said: raw mode" in out


def test_start_names_the_demo_upstream_configured_in_the_file(tmp_path):
    """``upstream_base_url: demo`` in the config file: ``start`` said the gateway went to
    http://127.0.0.1:8000/v1 (where nothing answers), though the demo upstream answered."""
    config_file(tmp_path).parent.mkdir(parents=True)
    config_file(tmp_path).write_text("upstream_base_url: demo\n")
    proc, port = _start(tmp_path)
    try:
        client = openai_client(f"http://127.0.0.1:{port}/v1")
        assert client.responses.create(model="demo-model", input="demo file").output_text == "You said: demo file"
    finally:
        out = _stop(proc)
    assert f"gateway on http://127.0.0.1:{port}/v1 -> demo upstream" in out, out


def test_start_demo_serves_the_demo_even_with_upstreams_configured(tmp_path):
    config_file(tmp_path).parent.mkdir(parents=True)
    config_file(tmp_path).write_text(
        "upstreams:\n- {name: fleet, base_url: 'http://127.0.0.1:9/v1', models: ['*']}\n")
    proc, port = _start(tmp_path, "--demo")
    try:
        client = openai_client(f"http://127.0.0.1:{port}/v1")
        assert client.responses.create(model="demo-model", input="demo wins").output_text == "You said: demo wins"
    finally:
        _stop(proc)


@pytest.mark.parametrize("args", [("keys", "list"), ("print-config", "--offline"), ("usage", "-")])
def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path, args):
    """`resp2chat keys list | head -1`: the reader closes the pipe before the command wrote its
    lines; the command ends quietly (Python's BrokenPipeError traceback was printed before)."""
    run_cli(tmp_path, "keys", "add", "alice")
    log = "".join(json.dumps({"time": "2026-03-01T00:00:00Z", "request_id": f"req_{i}", "model": "m", "client": "alice",
                              "status": "completed", "input_tokens": 1, "output_tokens": 1}) + "\n" for i in range(50))
    proc = subprocess.Popen([str(RESP2CHAT), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env(tmp_path), cwd=tmp_path)
    proc.stdout.close()  # the reader is gone before the first line
    _, err = proc.communicate(log.encode(), timeout=60)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


def test_a_key_written_to_a_closed_output_is_said_lost(tmp_path):
    """`resp2chat keys add bob | true`: the client was written, its key went nowhere (the file
    keeps only its SHA-256), and the command ended quietly. It says so, and fails."""
    def behind_a_closed_pipe(*args):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the key
        try:
            return subprocess.run([str(RESP2CHAT), *args], stdout=write, stderr=subprocess.PIPE, text=True,
                                  env=cli_env(tmp_path), cwd=tmp_path, timeout=60)
        finally:
            os.close(write)

    added = behind_a_closed_pipe("keys", "add", "bob")
    assert added.returncode != 0, added.stderr
    assert "added client 'bob'" in added.stderr and "the key was not shown: the output was closed" in added.stderr
    assert "run `resp2chat keys rotate bob`" in added.stderr and "Traceback" not in added.stderr, added.stderr
    first = yaml.safe_load(config_file(tmp_path).read_text())["clients"][0]["key_sha256"]

    rotated = behind_a_closed_pipe("keys", "rotate", "bob")
    assert rotated.returncode != 0, rotated.stderr
    assert "the key was not shown" in rotated.stderr and "keys rotate bob" in rotated.stderr, rotated.stderr
    assert yaml.safe_load(config_file(tmp_path).read_text())["clients"][0]["key_sha256"] != first

    shown = run_cli(tmp_path, "keys", "rotate", "bob")  # the way out it names: a key, shown
    assert shown.returncode == 0 and shown.stdout.startswith("r2c-") and "not shown" not in shown.stderr, shown.stderr


# --- print-config ------------------------------------------------------------------------------


def test_print_config_is_valid_codex_toml_with_context_window(tmp_path, upstream):
    out = run_cli(tmp_path, "print-config", RESP2CHAT_UPSTREAM_BASE_URL=upstream.base_url,
                  RESP2CHAT_BIND_ADDR="127.0.0.1:4777")
    assert out.returncode == 0, out.stderr
    cfg = tomllib.loads(out.stdout)
    assert cfg["model"] == "demo-model" and cfg["model_context_window"] == 131072
    provider = cfg["model_providers"][cfg["model_provider"]]
    assert provider["base_url"] == "http://127.0.0.1:4777/v1" and provider["wire_api"] == "responses"
    assert "env_key" not in provider
    keyed = tomllib.loads(run_cli(tmp_path, "print-config", "--offline", RESP2CHAT_GATEWAY_API_KEY="gw").stdout)
    assert keyed["model_providers"]["resp2chat"]["env_key"] == "RESP2CHAT_GATEWAY_API_KEY"



def test_print_config_on_a_gateway_of_every_interface_says_to_give_the_teams_url(tmp_path):
    """On a team's gateway host (bind_addr 0.0.0.0), the URL print-config makes is this
    machine's loopback, no URL for a teammate's Codex: it says so and how to give theirs."""
    env = {"RESP2CHAT_BIND_ADDR": "0.0.0.0:4777", "RESP2CHAT_GATEWAY_API_KEY": "team-key-0123456789abcdef"}
    out = run_cli(tmp_path, "print-config", "--offline", **env)
    assert out.returncode == 0, out.stderr
    assert tomllib.loads(out.stdout)["model_providers"]["resp2chat"]["base_url"] == "http://127.0.0.1:4777/v1"
    assert "--base-url" in out.stderr and "0.0.0.0:4777" in out.stderr, out.stderr
    given = run_cli(tmp_path, "print-config", "--offline", "--base-url", "https://llm.example.com/v1", **env)
    assert tomllib.loads(given.stdout)["model_providers"]["resp2chat"]["base_url"] == "https://llm.example.com/v1"
    assert "--base-url" not in given.stderr
    assert "--base-url" not in run_cli(tmp_path, "print-config", "--offline", RESP2CHAT_BIND_ADDR="127.0.0.1:4777").stderr


def test_print_config_says_when_it_does_not_know_the_model(tmp_path, upstream):
    """A backend that is down (or lists no models) leaves print-config only a placeholder model
    name: it says so, naming where it asked, instead of handing Codex `demo-model` in silence."""
    run_cli(tmp_path, "configure", "-y", "--upstream-base-url", "http://127.0.0.1:9/v1")
    out = run_cli(tmp_path, "print-config")
    assert out.returncode == 0, out.stderr
    assert tomllib.loads(out.stdout)["model"] == "demo-model"
    assert "no model list from http://127.0.0.1:9/v1/models" in out.stderr and "upstream_model" in out.stderr
    assert "--offline" in run_cli(tmp_path, "print-config", "--offline").stderr
    # a model it knows, from the upstream or upstream_model, and the demo's own: nothing to say
    for env in ({"RESP2CHAT_UPSTREAM_BASE_URL": upstream.base_url}, {"RESP2CHAT_UPSTREAM_MODEL": "qwen3-coder"},
                {"RESP2CHAT_UPSTREAM_BASE_URL": "demo"}):
        quiet = run_cli(tmp_path, "print-config", **env)
        assert quiet.returncode == 0 and "model" not in quiet.stderr, (env, quiet.stderr)


class _KeyedModels(QuietHandler):
    """A backend whose /models answers only its own key."""

    KEY = "sk-fleet-own-key-0123"

    def do_GET(self):
        ok = self.headers.get("authorization") == f"Bearer {self.KEY}"
        body = json.dumps({"data": [{"id": "fleet-model", "max_model_len": 32768}]} if ok else
                          {"error": {"message": "bad key"}}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_print_config_asks_the_first_upstream_with_its_own_key(tmp_path):
    """With ``upstreams``, print-config asked the first one for its models with the top-level
    upstream_api_key (not that entry's, the one the gateway sends): refused, a placeholder model."""
    with LocalServer(_KeyedModels) as server:
        config_file(tmp_path).parent.mkdir(parents=True)
        config_file(tmp_path).write_text(yaml.safe_dump({
            "upstream_api_key": "sk-top-level-not-the-fleets",
            "upstreams": [{"name": "fleet", "base_url": server.url + "/v1", "api_key": _KeyedModels.KEY,
                           "models": ["*"]}]}))
        out = run_cli(tmp_path, "print-config")
    assert out.returncode == 0, out.stderr
    config = tomllib.loads(out.stdout)
    assert config["model"] == "fleet-model" and config["model_context_window"] == 32768, out.stdout
    assert "placeholder" not in out.stderr, out.stderr


class _TwoModels(QuietHandler):
    """A backend whose /models lists an entry whose id is no name, an embedding model, then the chat model."""

    def do_GET(self):
        body = json.dumps({"data": [{"id": 7}, {"id": "embed-small", "max_model_len": 8192},  # (an id no name)
                                    {"id": "qwen3-coder", "max_model_len": 65536}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_print_config_picks_a_model_the_first_upstream_serves(tmp_path):
    """With ``upstreams``, print-config took the first model the first entry's backend lists,
    though that entry's ``models`` globs do not match it: the gateway sends that name elsewhere
    (or nowhere). It takes the first the entry serves; none served: the placeholder, and why."""
    with LocalServer(_TwoModels) as server:
        config_file(tmp_path).parent.mkdir(parents=True)
        config_file(tmp_path).write_text(yaml.safe_dump({"upstreams": [
            {"name": "coder", "base_url": server.url + "/v1", "models": ["qwen3-*"]},
            {"name": "rest", "base_url": "http://127.0.0.1:9/v1"}]}))
        out = run_cli(tmp_path, "print-config")
        assert out.returncode == 0, out.stderr
        config = tomllib.loads(out.stdout)
        assert config["model"] == "qwen3-coder" and config["model_context_window"] == 65536, out.stdout
        assert "placeholder" not in out.stderr, out.stderr

        config_file(tmp_path).write_text(yaml.safe_dump({"upstreams": [
            {"name": "coder", "base_url": server.url + "/v1", "models": ["llama-*", "gpt-*"]}]}))
        out = run_cli(tmp_path, "print-config")
    assert out.returncode == 0, out.stderr
    config = tomllib.loads(out.stdout)
    assert config["model"] == "demo-model" and "model_context_window" not in config, out.stdout
    assert (f"none of the models {server.url}/v1/models lists matches the first of upstreams' models "
            "(llama-*, gpt-*)") in out.stderr and "placeholder" in out.stderr, out.stderr


@pytest.mark.codex
def test_print_config_drives_real_codex(tmp_path, upstream, codex_bin):
    gw = start_gateway(upstream.origin, tmp_path, env=cli_env(tmp_path))
    env = cli_env(tmp_path, RESP2CHAT_UPSTREAM_BASE_URL=upstream.base_url, RESP2CHAT_BIND_ADDR=f"127.0.0.1:{gw.port}")
    try:
        cx = Codex.at(codex_bin, tmp_path)
        (cx.home / "config.toml").write_text(subprocess.run(
            [str(RESP2CHAT), "print-config"], capture_output=True, text=True, env=env, check=True).stdout)
        run = cx.exec("configured by print-config")
    finally:
        gw.stop()
    assert run.returncode == 0, run.output
    assert "You said: configured by print-config" in run.stdout


@pytest.mark.codex
def test_print_config_builtin_drives_real_codex_over_the_websocket(tmp_path, upstream, codex_bin):
    flows = tmp_path / "flows.mitm"
    gw = start_gateway(upstream.origin, tmp_path, "-w", str(flows), env=cli_env(tmp_path))
    env = cli_env(tmp_path, RESP2CHAT_UPSTREAM_BASE_URL=upstream.base_url, RESP2CHAT_BIND_ADDR=f"127.0.0.1:{gw.port}")
    try:
        cx = Codex.at(codex_bin, tmp_path)
        text = subprocess.run([str(RESP2CHAT), "print-config", "--builtin"], capture_output=True, text=True, env=env,
                              check=True).stdout
        cfg = tomllib.loads(text)
        assert cfg["openai_base_url"] == f"http://127.0.0.1:{gw.port}/v1" and "model_provider" not in cfg
        assert cfg["model_context_window"] == 131072 and cfg["model_auto_compact_token_limit"] == 117964
        (cx.home / "config.toml").write_text(text)
        run = cx.exec("configured by print-config --builtin")
    finally:
        gw.stop()
    assert run.returncode == 0, run.output
    assert "You said: configured by print-config --builtin" in run.stdout and "Falling back" not in run.output
    assert b"response.create" in flows.read_bytes()  # the turn went over the Responses WebSocket


@pytest.mark.codex
def test_print_config_catalog_gives_codex_real_metadata_and_apply_patch(tmp_path, upstream, codex_bin):
    gw = start_gateway(upstream.origin, tmp_path, env=cli_env(tmp_path))
    env = cli_env(tmp_path, RESP2CHAT_UPSTREAM_BASE_URL=upstream.base_url, RESP2CHAT_BIND_ADDR=f"127.0.0.1:{gw.port}")
    cx = Codex.at(codex_bin, tmp_path)
    try:
        out = subprocess.run([str(RESP2CHAT), "print-config", "--catalog", str(cx.home / "models.json"), "--codex",
                              codex_bin], capture_output=True, text=True, env=env, check=True)
        (cx.home / "config.toml").write_text(out.stdout)
        catalog = json.loads((cx.home / "models.json").read_text())["models"][0]
        assert catalog["slug"] == "demo-model" and catalog["context_window"] == 131072
        patch = "*** Begin Patch\n*** Add File: patched.txt\n+made by apply_patch\n*** End Patch\n"
        upstream.clear()
        run = cx.exec(f"call: apply_patch {json.dumps({'input': patch})}")
    finally:
        gw.stop()
    assert run.returncode == 0, run.output
    assert "Model metadata for" not in run.output  # no fallback metadata
    first = upstream.requests()[0]
    apply_patch = next(t["function"] for t in first["tools"] if t["function"]["name"] == "apply_patch")
    assert list(apply_patch["parameters"]["properties"]) == ["input"] and "grammar" in apply_patch["description"]
    # Codex applied the freeform patch our custom_tool_call carried, and sent back its output
    assert (cx.workdir / "patched.txt").read_text() == "made by apply_patch\n"
    assert upstream.requests()[-1]["messages"][-1]["role"] == "tool"


# --- README stays true -------------------------------------------------------------------------


def test_readme_documents_every_setting_and_command():
    readme = (ROOT / "README.md").read_text()
    for f in FIELDS:
        assert f"| `{f.name}` | `{f.env}`" in readme, f.name
    for cmd in ("resp2chat configure", "resp2chat start", "resp2chat print-config", "resp2chat analyze",
                "resp2chat retranslate", "resp2chat keys add", "resp2chat keys list", "resp2chat keys revoke",
                "resp2chat keys rotate",
                "resp2chat usage", "make test"):
        assert cmd in readme, cmd


def test_start_takes_an_empty_set_of_a_list_as_an_empty_list(tmp_path, upstream):
    """``resp2chat start -- --set resp2chat_passthrough_paths=`` (none): ``start`` and the gateway
    read the list of one empty string, and both refused it (exit 2: "'' is invalid"). It is the
    empty list, as ``RESP2CHAT_PASSTHROUGH_PATHS=`` is: nothing passes through."""
    proc, port = _start(tmp_path, "--", "--set", "resp2chat_passthrough_paths=",
                        RESP2CHAT_UPSTREAM_BASE_URL=upstream.base_url)
    try:
        assert requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 404
        client = openai_client(f"http://127.0.0.1:{port}/v1")
        assert client.responses.create(model="demo-model", input="still here").output_text == "You said: still here"
    finally:
        out = _stop(proc)
    assert "invalid" not in out and "Traceback" not in out, out
