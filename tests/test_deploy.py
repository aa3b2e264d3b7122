"""deploy/'s units as an admin runs them: their ExecStart command line by hand (systemd does not
run here), the gateway's log read as journald reads it (a pipe, not a terminal), and the TLS and
seal-key set-ups an admin makes on the gateway host."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from helpers import ADDON, MITMDUMP, ROOT, Codex, free_port, gateway_env, post_turn, start_gateway, stop_process, wait_until

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


def openssl_cert(tmp_path, name: str, *extra: str) -> tuple[str, str]:
    """A self-signed certificate for localhost, made as an admin makes one (``extra``: -addext …)."""
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", key,
                    "-out", cert, "-subj", "/CN=localhost", *extra], check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def test_a_certificate_codex_refuses_is_said_at_start_up(tmp_path):
    """`openssl req -x509 -subj /CN=host`, the usual one-liner, makes a CA certificate without a
    subjectAltName: curl and the openai SDK take it, Codex CLI (rustls) refuses it and only says
    'Reconnecting...' (checked by hand with Codex 0.169.0). The gateway says so, and how to make
    one every client takes; that one it takes quietly."""
    plain = openssl_cert(tmp_path, "plain")
    leaf = openssl_cert(tmp_path, "leaf", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                        "-addext", "basicConstraints=critical,CA:FALSE")
    for (cert, key), warned in ((plain, True), (leaf, False)):
        gw = start_gateway("http://127.0.0.1:9", tmp_path, "--set", f"resp2chat_tls_cert_file={cert}",
                           "--set", f"resp2chat_tls_key_file={key}")
        try:
            out = subprocess.run(["curl", "-sS", "--cacert", cert, f"https://localhost:{gw.port}/healthz"],
                                 capture_output=True, text=True, timeout=30)
            assert out.stdout == '{"status":"ok"}', out.stderr  # (curl takes either)
            if warned:
                line = wait_until(lambda: next((ln for ln in gw.log().splitlines() if "Codex CLI refuses" in ln), None),
                                  10, "the warning")
                assert cert in line and "is a CA certificate" in line and "names no subjectAltName" in line
                assert "basicConstraints=critical,CA:FALSE" in line and "subjectAltName=DNS:" in line
            else:
                assert "Codex CLI refuses" not in gw.log()
        finally:
            gw.stop()


def gateway_exit(tmp_path, config: Path, *prefix: str, timeout: float = 30) -> tuple[int | None, str]:
    """A gateway started (``prefix``: a command it runs under) with ``config`` as its config
    file: its exit code once it stopped, else None once it answered ``/healthz``; its log."""
    port = free_port()
    log = tmp_path / f"gateway-{port}.log"
    proc = subprocess.Popen([*prefix, str(MITMDUMP), "-s", str(ADDON), "--mode", "reverse:http://127.0.0.1:9",
                             "--listen-host", "127.0.0.1", "--listen-port", str(port),
                             "--set", f"confdir={tmp_path / 'mitmconf'}"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=tmp_path,
                            env={**gateway_env(), "HOME": str(tmp_path), "RESP2CHAT_CONFIG": str(config)})
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                    return None, log.read_text()
            except requests.RequestException:
                time.sleep(0.2)
        return proc.poll(), log.read_text()
    finally:
        stop_process(proc)


def test_a_seal_key_the_gateway_cannot_make_or_read_stops_it_at_start_up(tmp_path):
    """Without seal_key the gateway seals with a per-install key in seal.key beside the config
    file. deploy/'s layout (/etc/resp2chat root-owned, the replicas' user reads it) leaves it
    nowhere to make one: before, it started and then answered every turn with a 500
    (server_error; the PermissionError in its log only). Now it stops at start-up saying why
    and what to do; so does a seal.key that is not one (empty: a crash mid-write elsewhere)."""
    etc = tmp_path / "etc"
    etc.mkdir()
    config = etc / "config.yaml"
    config.write_text("upstream_base_url: demo\n")
    (etc / "seal.key").write_bytes(b"")
    code, log = gateway_exit(tmp_path, config)
    assert code not in (None, 0), log[-3000:]
    assert f"{etc / 'seal.key'} is not a seal key" in log and "set seal_key" in log, log[-3000:]
    # a reader of recorded flows serving none (`mitmdump -n -r`) needs no key: it loads and reads
    flows = tmp_path / "none.mitm"
    flows.write_bytes(b"")
    read = subprocess.run([str(MITMDUMP), "-n", "-r", str(flows), "-s", str(ADDON)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60, env={**gateway_env(), "HOME": str(tmp_path),
                                                         "RESP2CHAT_CONFIG": str(config)})
    assert read.returncode == 0 and "seal" not in read.stdout + read.stderr, read.stdout + read.stderr
    assert (etc / "seal.key").read_bytes() == b""
    (etc / "seal.key").unlink()
    if os.geteuid() == 0 and shutil.which("setpriv"):
        # the replicas' user may read the directory, not write it: root without the capabilities
        # that pass over file modes, in a directory of another user's
        os.chown(etc, 65534, 65534)
        code, log = gateway_exit(tmp_path, config, "setpriv", "--inh-caps=-all",
                                 "--bounding-set=-dac_override,-dac_read_search,-fowner")
        assert code not in (None, 0), log[-3000:]
        assert "Permission denied" in log and str(etc) in log and "Set seal_key" in log, log[-3000:]
        assert not (etc / "seal.key").exists()
    # given a seal_key, it starts and needs no file
    config.write_text("upstream_base_url: demo\nseal_key: one-long-random-secret-0123456789\n")
    code, log = gateway_exit(tmp_path, config, *(("setpriv", "--inh-caps=-all",
                                                 "--bounding-set=-dac_override,-dac_read_search,-fowner")
                                                if os.geteuid() == 0 and shutil.which("setpriv") else ()))
    assert code is None, log[-3000:]


@pytest.mark.codex
def test_codex_refuses_what_the_warning_says_and_takes_the_leaf_it_suggests(tmp_path, codex_bin):
    """What the start-up warning above claims of Codex CLI, checked: trusting the certificate
    itself (CODEX_CA_CERTIFICATE), it cannot connect to a gateway serving `openssl req -x509`'s
    default; the leaf the warning's openssl line makes, it takes."""
    plain = openssl_cert(tmp_path, "plain", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    leaf = openssl_cert(tmp_path, "leaf", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                        "-addext", "basicConstraints=critical,CA:FALSE")
    for name, (cert, key), works in (("plain", plain, False), ("leaf", leaf, True)):
        gw = start_gateway("http://127.0.0.1:9", tmp_path, "--set", "resp2chat_upstream_base_url=demo",
                           "--set", f"resp2chat_tls_cert_file={cert}", "--set", f"resp2chat_tls_key_file={key}")
        try:
            assert ("Codex CLI refuses" in gw.log()) != works
            cx = Codex.at(codex_bin, tmp_path / name, env={"CODEX_CA_CERTIFICATE": cert})
            cx.configure(f"https://localhost:{gw.port}/v1")
            try:  # (refused, it retries the handshake for minutes: what matters is it never got through)
                run = cx.exec(f"hello over {name}", timeout=60 if works else 15)
                assert (run.returncode == 0 and f"You said: hello over {name}" in run.output) == works, run.output[-2000:]
            except subprocess.TimeoutExpired:
                assert not works
        finally:
            gw.stop()
