"""The plain helpers every test file shares: the hermetic environment, real gateways and Codex
CLIs, waiting on conditions. Pytest fixtures are in conftest.py; everything else a test needs
from another file is here, once.

Importing this module makes the process hermetic (see ``_hermetic``): every test, and every
script that starts a gateway outside pytest (tests/fuzz.py, soak.py, recordings.py,
llamacpp/kv_figure.py and fleet.py), gets its own HOME and none of the developer's settings.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests


def _hermetic() -> Path:
    """Every test, and every process a test starts, runs with its own HOME and XDG folders and
    without the developer's RESP2CHAT_*/OPENAI_*/BRAVE_* settings: a config file saved by
    `resp2chat configure`, or an exported key, must not reach a test gateway."""
    os.environ.setdefault("RESP2CHAT_LLAMACPP_DIR", str(Path.home() / ".cache" / "resp2chat-llamacpp"))
    keep = {"RESP2CHAT_LLAMACPP_DIR", "RESP2CHAT_REGEN_DIALECTS"}  # the test suite's own knobs
    for name in list(os.environ):
        if name.startswith(("RESP2CHAT_", "OPENAI_", "BRAVE_", "XDG_", "CODEX_HOME")) and name not in keep:
            del os.environ[name]
    home = Path(tempfile.mkdtemp(prefix="resp2chat-test-home-"))
    os.environ.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local/share"))
    return home


TEST_HOME = _hermetic()


def gateway_env() -> dict:
    """The environment a test gateway starts from: the hermetic one, without even the test
    suite's own RESP2CHAT_* knobs (a test adds what it means to set, e.g. test_cli's cli_env)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RESP2CHAT_", "OPENAI_", "BRAVE_"))}


ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addon" / "resp2chat.py"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CODEX_FIXTURES = FIXTURES / "codex-0.169.0"
MITMDUMP = Path(sys.executable).with_name("mitmdump")


def codex_fixture(name: str) -> dict:
    return json.loads((CODEX_FIXTURES / name).read_text())


# --- waiting -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def wait_until(condition, timeout: float = 30.0, what: str = "the condition"):
    """Poll ``condition()`` until it returns something true, and return that: tests wait on the
    condition itself, never for a fixed time (a loaded 2-core CI machine must not flake)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the scripted upstream and real gateways ----------------------------------------------------


@dataclass
class Upstream:
    """The bundled scripted chat backend (resp2chat_io.demo_upstream), as conftest's ``upstream``."""

    base_url: str  # http://127.0.0.1:PORT/v1
    server: object

    @property
    def origin(self) -> str:
        return self.base_url.removesuffix("/v1")

    def requests(self) -> list[dict]:
        return requests.get(self.origin + "/_requests", timeout=5).json()

    def clear(self) -> None:
        requests.delete(self.origin + "/_requests", timeout=5)


@dataclass
class Gateway:
    proc: subprocess.Popen
    port: int
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


def start_gateway(upstream_url: str, tmp: Path, *extra: str, env: dict | None = None,
                  scripts_first: tuple[str, ...] = (), addon: Path = ADDON) -> Gateway:
    """A real `mitmdump -s addon/resp2chat.py --mode reverse:…` on a free loopback port
    (``scripts_first``: mitmproxy scripts loaded before the gateway's, e.g. tests/faults.py;
    ``addon``: another checkout's, e.g. tests/fuzz.py --addon)."""
    port = free_port()
    log_path = tmp / f"mitmdump-{port}.log"
    args = [str(MITMDUMP), *(a for script in scripts_first for a in ("-s", script)),
            "-s", str(addon), "--mode", f"reverse:{upstream_url}",
            "--listen-host", "127.0.0.1", "--listen-port", str(port),
            "--set", f"confdir={tmp / 'mitmconf'}", *extra]
    proc = subprocess.Popen(args, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=tmp,
                            env={**gateway_env(), **(env or {})})
    gw = Gateway(proc, port, log_path, args)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
    except Exception:
        gw.stop()
        raise RuntimeError(f"gateway did not start:\n{gw.log()}")
    return gw


# --- Codex CLI -------------------------------------------------------------------------------


def codex_bin_path() -> str | None:
    """The Codex CLI the tests run: $CODEX_BIN, `make codex`'s, or one on PATH."""
    env = os.environ.get("CODEX_BIN")
    if env:
        return env
    local = ROOT / ".tools" / "codex-0.169.0" / "node_modules" / ".bin" / "codex"
    return str(local) if local.exists() else shutil.which("codex")


@dataclass
class CodexRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclass
class Codex:
    """A Codex CLI with its own CODEX_HOME pointed at a gateway, run headless."""

    bin: str
    home: Path
    workdir: Path
    env: dict = field(default_factory=dict)  # added to the hermetic environment (e.g. OPENAI_API_KEY)

    def configure(self, base_url: str, model: str = "demo-model") -> None:
        (self.home / "config.toml").write_text(
            f'model = "{model}"\nmodel_provider = "gw"\n\n[model_providers.gw]\n'
            f'name = "resp2chat"\nbase_url = "{base_url}"\nwire_api = "responses"\n'
            "requires_openai_auth = false\nrequest_max_retries = 0\nstream_max_retries = 0\n"
        )

    def configure_builtin(self, base_url: str, model: str = "demo-model", extra: str = "") -> None:
        """Codex's built-in OpenAI provider pointed at the gateway (``openai_base_url``), as
        people do who write no provider: WebSocket transport first, remote compaction. (It needs
        no key; a gateway key goes in ``env["CODEX_API_KEY"]``.)"""
        (self.home / "config.toml").write_text(f'model = "{model}"\nopenai_base_url = "{base_url}"\n{extra}')

    def exec(self, *args: str, timeout: float = 120) -> CodexRun:
        cmd = [self.bin, "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox", *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_"))}
        env["CODEX_HOME"] = str(self.home)
        env.update(self.env)
        proc = subprocess.run(cmd, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        return CodexRun(proc.returncode, proc.stdout, proc.stderr)


# --- test upstreams ----------------------------------------------------------------------------


def send_json(handler, status: int, obj) -> None:
    """Answer from a test upstream (BaseHTTPRequestHandler) with a JSON body."""
    body = json.dumps(obj).encode()
    handler.send_response(status)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def send_text_chunk(handler, n: int) -> None:
    """One chat chunk with the content ``t<n> `` as one HTTP chunk, flushed: a test upstream
    (BaseHTTPRequestHandler) streaming a chunked SSE body at its own pace."""
    chunk = {"choices": [{"index": 0, "delta": {"content": f"t{n} "}, "finish_reason": None}]}
    data = f"data: {json.dumps(chunk)}\n\n".encode()
    handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    handler.wfile.flush()


# --- what the gateway answers ------------------------------------------------------------------


def parse_sse(raw: bytes) -> list[dict]:
    """Strict reader for what the gateway emits: `event:` + `data:` + blank line, each event."""
    events = []
    text = raw.decode()
    assert text.endswith("\n\n"), "stream must end with a blank line"
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block[:200]
        event = json.loads(lines[1][6:])
        assert event["type"] == lines[0][7:]
        events.append(event)
    return events
