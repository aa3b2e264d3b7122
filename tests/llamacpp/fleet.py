"""Session affinity on a real backend fleet: the KV-cache figure of `make bench`.

    python tests/llamacpp/fleet.py [--sessions 8] [--turns 4] [--policies consistent_hashing round_robin]

Builds, on loopback ports: a real redis-server, two real llama-server replicas (the tiny model of
`make llamacpp`, several slots each, metrics on), a real **smg** router in front of them
(`smg launch --worker-urls … --policy POLICY --routing-key-headers x-smg-routing-key`, PyPI `smg`,
`make smg`), and two real gateway replicas (`mitmdump -s addon/resp2chat.py`) that share Redis
(``state_store_url``) and send each session's key upstream (``routing_key_header``). Then it runs
N concurrent multi-turn Codex-shaped sessions (Codex 0.169's developer prompt and tools, its
``prompt_cache_key`` and ``session-id``) whose turns alternate between the two gateways: odd
sessions resend their whole history as Codex does (``store: false``), even ones continue with
``previous_response_id`` (the other gateway finds the conversation in Redis).

The figure, per session: of each previous prompt (turn n-1's ``prompt_tokens``), the share the
backend served from its KV cache on turn n ≥ 2, by the backend's own ``cached_tokens``
(``min(cached_n, prompt_{n-1}) / prompt_{n-1}``, summed over the session's turns). With affinity
(consistent_hashing on the session key) every turn of a session lands on the replica that holds
its cache; with round_robin it does not. Prints one JSON object:

    {"consistent_hashing": {"min": 0.99…, "mean": …, "sessions": […], "replicas": {…}}, "round_robin": {…}}

Also the library of tests/test_fleet.py (the small version in `make test`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
for p in (str(HERE), str(TESTS), str(ROOT / "addon")):
    if p not in sys.path:
        sys.path.insert(0, p)

from helpers import (CODEX_FIXTURES, Gateway, answers, free_port, parse_sse, start_gateway,  # noqa: E402
                     terminal, wait_until)
from kv_figure import MODEL_ID, STOP_BIAS, LlamaServer, missing_build  # noqa: E402
from redis_server import RedisServer, missing as missing_redis  # noqa: E402

SMG_VERSION = "1.13.0"
ROUTING_HEADER = "x-smg-routing-key"


def smg_binary() -> str | None:
    env = os.environ.get("SMG_BIN")
    if env:
        return env
    local = ROOT / ".tools" / f"smg-{SMG_VERSION}" / "bin" / "smg"
    return str(local) if local.exists() else shutil.which("smg")


def missing() -> str | None:
    """Why the fleet cannot run here, or None."""
    if not smg_binary():
        return "smg not installed: run `make smg` (PyPI smg into .tools/, or set SMG_BIN)"
    return missing_build() or missing_redis()


@dataclass
class Smg:
    """`smg launch` on a free loopback port, its Prometheus endpoint on another loopback port."""

    log_path: Path
    workers: list[str]
    policy: str
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "Smg":
        self.port = free_port()
        cmd = [smg_binary(), "launch", "--host", "127.0.0.1", "--port", str(self.port),
               "--worker-urls", *self.workers, "--policy", self.policy,
               "--routing-key-headers", ROUTING_HEADER,
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
               "--log-level", "warn", "--disable-retries"]
        self.proc = subprocess.Popen(cmd, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"},
                                     cwd=self.log_path.parent)  # (anything it writes stays in the test dir)
        try:  # ready once it routes: the workers' model list comes back through it
            routes = lambda r: r.status_code == 200 and MODEL_ID in r.text  # noqa: E731
            wait_until(lambda: answers(self.origin + "/v1/models", routes, timeout=2), timeout, "smg routing",
                       self.proc)
        except TimeoutError as exc:
            self.stop()
            raise TimeoutError(f"{exc}:\n{self.log()[-3000:]}") from None
        except RuntimeError as exc:
            raise RuntimeError(f"smg: {exc}:\n{self.log()[-3000:]}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: smg waits out a shutdown grace period otherwise."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def codex_shaped(prompt_chars: int = 2400) -> tuple[list[dict], list[dict]]:
    """Codex 0.169's developer prompt (cut to ``prompt_chars``: the tiny model on 2 cores) and
    two of its tools, from the recorded request in tests/fixtures/codex-0.169.0/."""
    body = json.loads((CODEX_FIXTURES / "01-text-only.json").read_text())["body"]
    developer = [dict(m) for m in body["input"] if m.get("role") == "developer"]
    for m in developer:
        text = "\n".join(p.get("text", "") for p in m["content"])
        m["content"] = [{"type": "input_text", "text": text[:prompt_chars]}]
    tools = [t for t in body["tools"] if t.get("name") in ("exec_command", "write_stdin")]
    return developer, tools


TASK = ("You are working in the repository of project {n}. The build of module {n} fails in step {n}; "
        "file src/module_{n}.py has {n} functions. ")
# What a turn adds, like a command's output in a Codex session: sessions grow apart turn by turn.
OUTPUT = "line {i} of the output of command {turn} in session {n}: status {turn}, {i} files checked\n"
OUTPUT_LINES = 12


@dataclass
class SessionRun:
    index: int
    style: str  # "codex" (store: false, the whole history each turn) | "stored" (previous_response_id)
    key: str
    turns: list[dict] = field(default_factory=list)  # per turn: gateway, status, prompt, cached, chained
    error: str = ""

    def share(self) -> float | None:
        """min(cached_n, prompt_{n-1}) / prompt_{n-1}, summed over turns n >= 2."""
        served = whole = 0
        for prev, cur in zip(self.turns, self.turns[1:]):
            served += min(cur["cached"], prev["prompt"])
            whole += prev["prompt"]
        return served / whole if whole else None


def run_session(index: int, gateways: list[Gateway], turns: int, developer: list[dict], tools: list[dict]) -> SessionRun:
    style = "codex" if index % 2 else "stored"
    run = SessionRun(index, style, str(uuid.UUID(int=0xC0DE0000 + index)))
    history: list[dict] = [*developer, {"role": "user", "content": [{"type": "input_text", "text": (
        TASK.format(n=index) * 3).strip()}]}]
    previous = None
    try:
        for turn in range(turns):
            gw = gateways[(index + turn) % len(gateways)]
            if turn:
                history.append({"role": "user", "content": [{"type": "input_text", "text": "".join(
                    OUTPUT.format(i=i, turn=turn, n=index) for i in range(OUTPUT_LINES))}]})
            body = {"model": MODEL_ID, "tools": tools, "tool_choice": "auto", "parallel_tool_calls": False,
                    "stream": True, "prompt_cache_key": run.key}
            chained = style == "stored" and previous is not None and previous["status"] == "completed"
            if chained:
                body.update(store=True, previous_response_id=previous["id"], input=[history[-1]])
            else:
                body.update(store=style == "stored", input=history)
            r = requests.post(gw.base_url + "/responses", json=body, headers={"session-id": run.key}, timeout=600)
            final = terminal(parse_sse(r.content))["response"] if r.status_code == 200 else None
            if final is None or final["status"] == "failed":
                raise RuntimeError(f"turn {turn}: {r.status_code} {final and final.get('error')}")
            usage = final["usage"]
            run.turns.append({"gateway": gw.port, "status": final["status"], "prompt": usage["input_tokens"],
                              "cached": usage["input_tokens_details"]["cached_tokens"], "chained": chained})
            previous = final
            for item in final["output"]:  # what the model said goes back as the client would send it
                if item["type"] == "reasoning":
                    continue
                kept = {k: v for k, v in item.items() if k not in ("id", "status")}
                if item["type"] == "message":
                    kept = {"role": "assistant", "content": [{"type": "output_text", "text": "".join(
                        c.get("text", "") for c in item["content"])}]}
                history.append(kept)
                if item["type"] == "function_call":
                    history.append({"type": "function_call_output", "call_id": item["call_id"], "output": "ok"})
            if previous["status"] == "completed" and style == "stored" and any(
                    i["type"] == "function_call" for i in final["output"]):
                previous = dict(previous, status="needs-output")  # resend whole: the call's output is new
    except Exception as exc:  # noqa: BLE001 - reported with the figure
        run.error = f"{type(exc).__name__}: {exc}"
    return run


def replica_prompt_tokens(llamas: list[LlamaServer]) -> list[int]:
    """Prompt tokens each replica evaluated (llama-server's /metrics): where the work went."""
    out = []
    for server in llamas:
        text = requests.get(server.origin + "/metrics", timeout=10).text
        total = sum(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("llamacpp:prompt_tokens_total"))
        out.append(int(total))
    return out


def _print_failures(tmp: Path) -> None:
    """A failed turn's traces, before the scratch folder goes: the lines of each server's and
    gateway's log that speak of an error (a rare upstream 500 was seen once, its cause lost)."""
    for log in sorted(tmp.rglob("*.log")):
        lines = [line for line in log.read_text(errors="replace").splitlines()
                 if any(word in line.lower() for word in ("error", " 500", "failed", "exception"))]
        if lines:
            print(f"--- {log.relative_to(tmp)} (lines naming an error, the last 20)", file=sys.stderr)
            print("\n".join(lines[-20:]), file=sys.stderr)


def run_fleet(tmp: Path, policy: str, sessions: int = 8, turns: int = 4, replicas: int = 2, slots: int = 8,
              prompt_chars: int = 2400) -> dict:
    """One measurement: fresh servers, ``sessions`` concurrent sessions, the figure for ``policy``."""
    tmp.mkdir(parents=True, exist_ok=True)
    started: list = []
    try:
        redis = RedisServer(tmp / "redis").start()
        started.append(redis)
        llamas = []
        for i in range(replicas):
            llamas.append(LlamaServer(tmp / f"llama-{i}.log", ctx=8192 * slots, slots=slots,
                                      extra=("--metrics",)).start())
            started.append(llamas[-1])
        smg = Smg(tmp / "smg.log", [s.origin for s in llamas], policy).start()
        started.append(smg)
        gateways = [start_gateway(smg.origin, tmp, "--set", f"resp2chat_state_store_url={redis.url}",
                                  "--set", f"resp2chat_routing_key_header={ROUTING_HEADER}",
                                  "--set", "resp2chat_upstream_extra_params=" + json.dumps(STOP_BIAS),
                                  "--set", "resp2chat_max_replay_entries=0") for _ in range(2)]
        started += gateways
        developer, tools = codex_shaped(prompt_chars)
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(sessions) as pool:
            runs = list(pool.map(lambda i: run_session(i, gateways, turns, developer, tools), range(sessions)))
        took = time.monotonic() - t0
        shares = [r.share() for r in runs]
        if any(r.error for r in runs):
            _print_failures(tmp)
        ok = [s for s in shares if s is not None]
        return {
            "policy": policy, "sessions": sessions, "turns": turns, "replicas": replicas, "slots": slots,
            "seconds": round(took, 1),
            "min": round(min(ok), 4) if ok else None, "mean": round(sum(ok) / len(ok), 4) if ok else None,
            "per_session": [{"session": r.index, "style": r.style, "share": None if s is None else round(s, 4),
                             "gateways": sorted({t["gateway"] for t in r.turns}).__len__(),
                             "chained": sum(t["chained"] for t in r.turns),
                             "prompts": [t["prompt"] for t in r.turns], "cached": [t["cached"] for t in r.turns],
                             **({"error": r.error} if r.error else {})} for r, s in zip(runs, shares)],
            "replica_prompt_tokens": replica_prompt_tokens(llamas),
            "errors": [r.error for r in runs if r.error],
        }
    finally:
        for thing in reversed(started):
            thing.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--slots", type=int, default=8, help="per replica: at least the sessions one replica may get")
    ap.add_argument("--policies", nargs="+", default=["consistent_hashing", "round_robin"])
    ap.add_argument("--keep", type=Path, help="keep the logs in this folder")
    args = ap.parse_args(argv)
    why = missing()
    if why:
        print(why, file=sys.stderr)
        return 1
    out = {}
    with tempfile.TemporaryDirectory(prefix="resp2chat-fleet-") as scratch:
        base = args.keep or Path(scratch)
        for policy in args.policies:
            out[policy] = run_fleet(base / policy, policy, args.sessions, args.turns, slots=args.slots)
            print(f"{policy}: min {out[policy]['min']} mean {out[policy]['mean']} ({out[policy]['seconds']} s)",
                  file=sys.stderr)
    print(json.dumps(out))
    return 0 if all(not v["errors"] for v in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
