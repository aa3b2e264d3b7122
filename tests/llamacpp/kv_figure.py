"""The real KV-cache figure: a Codex CLI session against llama.cpp's server through the gateway.

    python tests/llamacpp/kv_figure.py [--server URL] [--keep DIR]

Starts the tiny llama-server built by `make llamacpp` (or uses ``--server``), puts a real
`mitmdump -s addon/resp2chat.py -w session.mitm` in front of it, runs Codex CLI headless for
one `exec` and two `exec resume --last` turns, then reads the recorded flows with
`resp2chat analyze --json` and prints one JSON line:

    {"turns": 3, "server_cached_ratio_later_turns": 0.99…, "simulated_radix_ratio_later_turns": 0.98…}

``server_cached_ratio_later_turns`` is what llama-server itself reported (usage
``prompt_tokens_details.cached_tokens`` / ``prompt_tokens``, summed over turns ≥ 2): the share of
each follow-up prompt — Codex's whole developer prompt, tools and history included — served from
its KV cache. ``simulated_radix_ratio_later_turns`` is analyze's byte-level simulation of the same.

The tiny random model almost never ends an answer by itself (Codex would stop with "Incomplete
response", exit 1), so the gateway adds ``logit_bias`` on ``<|im_end|>`` to every request
(``upstream_extra_params``): answers become a few gibberish tokens that end with ``stop``.

Also the library of tests/test_llamacpp.py: where the build is, starting llama-server, the session.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
for p in (str(TESTS), str(ROOT / "addon")):
    if p not in sys.path:
        sys.path.insert(0, p)

from helpers import (  # noqa: E402
    Codex, CodexRun, Gateway, answers, codex_bin_path, free_port, start_gateway, stop_process, wait_until,
)

DEFAULT_DIR = Path.home() / ".cache" / "resp2chat-llamacpp"
MODEL_ID = "tiny-qwen3"
IM_END = 151645  # <|im_end|>, the model's end-of-turn token
# +3 on <|im_end|>: with seed 0 the random model stops after about 1–10 tokens (+4 and more:
# at once, an empty answer; +1: ~30 tokens). Keeps answers short, so they end with "stop".
STOP_BIAS = {"logit_bias": {str(IM_END): 3}}
SESSION = [["say hi"], ["resume", "--last", "and now summarize"], ["resume", "--last", "one more question"]]


def llamacpp_dir() -> Path:
    return Path(os.environ.get("RESP2CHAT_LLAMACPP_DIR") or DEFAULT_DIR).expanduser()


def build_paths(root: Path | None = None) -> tuple[Path, Path]:
    root = root or llamacpp_dir()
    return root / "bin" / "llama-server", root / "tiny-qwen3.gguf"


def missing_build() -> str | None:
    """Why the llama.cpp build cannot be used, or None when it is there."""
    binary, model = build_paths()
    missing = [str(p) for p in (binary, model) if not (p.exists() and p.stat().st_size)]
    if not missing:
        return None
    return (f"llama.cpp build missing ({', '.join(missing)}): run `make llamacpp` "
            f"(or `bash tests/llamacpp/build.sh {llamacpp_dir()}`; RESP2CHAT_LLAMACPP_DIR selects the folder)")


@dataclass
class LlamaServer:
    """llama-server with the command line of tests/llamacpp/README.md on a free loopback port."""

    log_path: Path
    ctx: int = 16384
    n_predict: int = 64
    extra: tuple[str, ...] = ()
    port: int = 0
    slots: int = 1  # -np: sequences served at once, each with its own KV cache

    proc: subprocess.Popen | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        binary, model = build_paths()
        return [str(binary), "-m", str(model), "--alias", MODEL_ID,
                "--host", "127.0.0.1", "--port", str(self.port), "--jinja", "--reasoning-format", "deepseek",
                "-np", str(self.slots), "-c", str(self.ctx), "-n", str(self.n_predict), "--cache-reuse", "64", "--seed", "0",
                *self.extra]

    def start(self, timeout: float = 60.0) -> "LlamaServer":
        why = missing_build()
        if why:
            raise RuntimeError(why)
        self.port = self.port or free_port()
        self.proc = subprocess.Popen(self.command(), stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        try:  # /health: 503 while the model loads, 200 when ready
            wait_until(lambda: answers(self.origin + "/health", lambda r: r.status_code == 200), timeout,
                       "llama-server healthy", self.proc)
        except TimeoutError as exc:
            self.stop()
            raise TimeoutError(f"{exc}:\n{self.log()[-3000:]}") from None
        except RuntimeError as exc:
            raise RuntimeError(f"llama-server: {exc}:\n{self.log()[-3000:]}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Session:
    flow_path: Path
    runs: list[tuple[list[str], CodexRun, float]] = field(default_factory=list)  # args, result, seconds
    gateway_log: str = ""

    @property
    def ok(self) -> bool:
        return len(self.runs) == len(SESSION) and all(r.returncode == 0 for _, r, _ in self.runs)

    def describe(self) -> str:
        out = []
        for args, run, secs in self.runs:
            out.append(f"--- codex exec {' '.join(args)!r}: exit {run.returncode} in {secs:.1f}s\n"
                       f"stdout:\n{run.stdout[-1500:]}\nstderr:\n{run.stderr[-1500:]}")
        out.append(f"--- mitmdump log (tail):\n{self.gateway_log[-3000:]}")
        return "\n".join(out)


def run_session(codex_bin: str, llama_origin: str, tmp: Path, turns: list[list[str]] = SESSION,
                timeout: float = 180) -> Session:
    """Codex CLI turns against llama-server through a recording gateway (flows in tmp/session.mitm)."""
    tmp.mkdir(parents=True, exist_ok=True)
    session = Session(tmp / "session.mitm")
    home, work = tmp / "codex-home", tmp / "work"
    home.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    gw: Gateway = start_gateway(llama_origin, tmp, "-w", str(session.flow_path),
                                "--set", "resp2chat_max_replay_entries=0",
                                "--set", "resp2chat_upstream_extra_params=" + json.dumps(STOP_BIAS))
    try:
        codex = Codex(codex_bin, home, work)
        codex.configure(gw.base_url, model=MODEL_ID)
        for args in turns:
            t0 = time.monotonic()
            run = codex.exec(*args, timeout=timeout)
            session.runs.append((args, run, time.monotonic() - t0))
            if run.returncode != 0:
                break
    finally:
        gw.stop()  # also flushes the flow file
        session.gateway_log = gw.log()
    return session


def read_turns(flow_path: Path) -> list[dict]:
    """The resp2chat metadata (status, usage…) of each recorded chat request, in order."""
    from mitmproxy import http, io

    out = []
    with flow_path.open("rb") as fh:
        for f in io.FlowReader(fh).stream():
            if isinstance(f, http.HTTPFlow) and f.request.path.split("?")[0].endswith("/chat/completions"):
                out.append(f.metadata.get("resp2chat") or {})
    return out


def analyze_json(flow_path: Path) -> dict:
    """`resp2chat analyze --json FILE`, run as the command a user would run."""
    cli = Path(sys.executable).with_name("resp2chat")
    cmd = [str(cli)] if cli.exists() else [sys.executable, "-c", "import sys; from resp2chat_io.main import main; sys.exit(main())"]
    proc = subprocess.run([*cmd, "analyze", "--json", str(flow_path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "addon")})
    if proc.returncode != 0:
        raise RuntimeError(f"resp2chat analyze failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def kv_figure(flow_path: Path) -> dict:
    summary = analyze_json(flow_path)["summary"]
    return {"turns": summary["requests"],
            "server_cached_ratio_later_turns": summary["server_cached_ratio_later_turns"],
            "simulated_radix_ratio_later_turns": summary["radix_hit_ratio_later_turns"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", help="use this running llama-server (origin, e.g. http://127.0.0.1:8080) "
                                     "instead of starting the tiny one")
    ap.add_argument("--keep", type=Path, help="keep the flow file and logs in this folder")
    args = ap.parse_args(argv)
    codex_bin = codex_bin_path()
    if not codex_bin or not Path(codex_bin).exists():
        print("Codex CLI not found: run `make codex` (or set CODEX_BIN)", file=sys.stderr)
        return 1
    if not args.server and (why := missing_build()):
        print(why, file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="resp2chat-kv-") as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        server = None if args.server else LlamaServer(tmp / "llama-server.log").start()
        try:
            session = run_session(codex_bin, args.server or server.origin, tmp)
        finally:
            if server:
                server.stop()
        if not session.ok:
            print(session.describe(), file=sys.stderr)
            return 1
        print(json.dumps(kv_figure(session.flow_path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
