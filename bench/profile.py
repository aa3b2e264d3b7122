#!/usr/bin/env python3
"""Profile the resp2chat gateway under one bench phase with py-spy, and summarise the stacks.

    .venv/bin/python bench/profile.py --phase c64 --out prof-c64.txt      # 64 unpaced streams
    .venv/bin/python bench/profile.py --phase c1                          # sequential answers
    .venv/bin/python bench/profile.py --phase replay                      # replay-cache hits
    .venv/bin/python bench/profile.py --phase long --long-kb 2500         # later turns of a 2.5 MB session
    .venv/bin/python bench/profile.py --phase websocket                   # bench's Codex conversation over the socket
    .venv/bin/python bench/profile.py --phase http-conversation           # the same conversation over HTTP
    .venv/bin/python bench/profile.py --summarize prof-c64.txt            # summary of a saved profile

py-spy (PyPI `py-spy`, a static binary) is looked for beside this Python, on PATH, or given with
--py-spy. It samples the mitmdump process from outside (no code change; it pauses the process for each
sample, a few % of overhead at 500 Hz);
the raw collapsed stacks are written to --out and summarised: self time per file and function,
and inclusive time of the functions in the addon's own files.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402
from client import Conn, WSConn  # noqa: E402
from workload import conversation, long_pairs_for, long_session, make_variant  # noqa: E402

CONVERSATIONS = ("websocket", "http-conversation")  # run.measure_websocket's conversation, one transport

OURS = ("resp2chat.py", "resp2chat_core/", "resp2chat_io/")


def _frame(frame: str) -> tuple[str, str]:
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame, frame
    fn, path = m.groups()
    path = re.sub(r".*site-packages/", "", path)
    path = re.sub(r".*/addon/", "", path)
    path = re.sub(r".*/lib/python3\.\d+/", "", path)
    return f"{fn} ({path})", path


def summarize(path: Path, top: int = 30) -> str:
    stacks = []
    for line in path.read_text().splitlines():
        if line.strip():
            frames, n = line.rsplit(" ", 1)
            stacks.append((frames.split(";"), int(n)))
    total = sum(n for _, n in stacks) or 1
    self_fn, self_file, incl = collections.Counter(), collections.Counter(), collections.Counter()
    for frames, n in stacks:
        name, file = _frame(frames[-1])
        self_fn[name] += n
        self_file[file] += n
        for key in {_frame(f)[0] for f in frames}:
            incl[key] += n
    out = [f"{total} samples", "", "self time by file:"]
    out += [f"  {100 * n / total:5.1f}%  {k}" for k, n in self_file.most_common(top)]
    out += ["", "self time by function:"]
    out += [f"  {100 * n / total:5.1f}%  {k}" for k, n in self_fn.most_common(top)]
    out += ["", "inclusive time, the addon's own functions:"]
    out += [f"  {100 * n / total:5.1f}%  {k}" for k, n in incl.most_common()
            if any(s in k for s in OURS)][:top]
    return "\n".join(out)


def find_py_spy(given: str | None) -> str:
    for cand in (given, run.BIN / "py-spy", shutil.which("py-spy")):
        if cand and Path(cand).exists():
            return str(cand)
    sys.exit("py-spy not found: `pip install py-spy` (into .venv or any venv) or pass --py-spy PATH")


async def drive(target, upstream, phase: str, cfg: dict, w: dict, spy_cmd: list[str]) -> str:
    await run.run_load(target, [[w["text"], w["reasoning"], w["tool"]] * 2])  # warm-up, not profiled
    if phase == "replay":
        await Conn("127.0.0.1", target.port).request(target.path, w["text"].responses_body, "responses")
    if phase == "long":  # a session's first turn (cold) is not profiled, its later turns are
        session = list(long_session(long_pairs_for(cfg["long_kb"], cfg["long_deltas"]), cfg["long_turns"] + 1,
                                    cfg["long_deltas"], f"profile-{os.getpid()}"))
        conn = Conn("127.0.0.1", target.port)
        await conn.request(target.path, target.body(session[0]), target.mode)
    spy = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    await asyncio.sleep(0.5)
    try:
        if phase == "replay":
            conn = Conn("127.0.0.1", target.port)
            pairs = [(w["text"], await conn.request(target.path, w["text"].responses_body, "responses"))
                     for _ in range(cfg["replay"] * 10)]
            conn.close()
            res = {}
        elif phase in CONVERSATIONS:
            turns = conversation(cfg["ws_turns"], cfg["deltas"])
            cpu, pairs = run.proc_cpu_ns(target.proc.pid), []
            for _ in range(cfg["conversations"]):
                pairs += [(run.SimpleVariant(t.expect), a) for t, a in zip(turns, await _conversation(target, turns, phase))]
            res = {"cpu_ms_per_turn": round((run.proc_cpu_ns(target.proc.pid) - cpu) / 1e6 / len(pairs), 2)}
        elif phase == "long":
            cpu = run.proc_cpu_ns(target.proc.pid)
            pairs = [(turn, await conn.request(target.path, target.body(turn), target.mode)) for turn in session[1:]]
            conn.close()
            res = {"cpu_ms_per_turn": round((run.proc_cpu_ns(target.proc.pid) - cpu) / 1e6 / (len(session) - 1), 2)}
        else:
            res, pairs = await run.PHASE_FUNCS[phase](target, upstream, cfg, w)
    finally:
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=30)
    res = {k: v for k, v in res.items() if "cpu" in k or "wall" in k}
    return f"{run.check(pairs)} {res}\n{err.decode(errors='replace').strip()[-500:]}"


async def _conversation(target, turns, phase: str) -> list:
    """One conversation as bench/run.py's websocket phase runs it: over the socket (a warm-up,
    then ``previous_response_id`` and only the new input), or over HTTP (everything each turn)."""
    if phase == "http-conversation":
        conn = Conn("127.0.0.1", target.port)
        try:
            return [await conn.request(target.path, json.dumps(t.body).encode(), target.mode) for t in turns]
        finally:
            conn.close()
    conn = WSConn("127.0.0.1", target.port)
    await conn.open()
    try:
        warm = await conn.turn({"type": "response.create", **turns[0].body, "generate": False})
        previous, answers = warm.response_id, []
        for k, t in enumerate(turns):
            rest = {key: v for key, v in t.body.items() if key != "input"}
            answers.append(await conn.turn({"type": "response.create", **rest, "previous_response_id": previous,
                                            "input": [] if k == 0 else t.new}))
            previous = answers[-1].response_id
        return answers
    finally:
        conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", choices=[*run.PHASES, "replay", "long", *CONVERSATIONS], default="c64")
    ap.add_argument("--conversations", type=int, default=10, help="--phase websocket/http-conversation: how many")
    ap.add_argument("--long-kb", type=float, default=2500, help="--phase long: the session's input, KB")
    ap.add_argument("--long-turns", type=int, default=40, help="--phase long: the turns profiled")
    ap.add_argument("--out", default="prof.txt", help="raw collapsed stacks (py-spy -f raw)")
    ap.add_argument("--py-spy")
    ap.add_argument("--path", choices=("resp2chat", "passthrough"), default="resp2chat",
                    help="profile the addon, or plain mitmproxy passthrough for comparison")
    ap.add_argument("--addon", type=Path, default=run.ADDON, help="the addon script to load (A/B a change)")
    ap.add_argument("--rate", type=int, default=500, help="samples per second")
    ap.add_argument("--nonblocking", action="store_true",
                    help="sample without pausing the process (less overhead, some stacks torn)")
    ap.add_argument("--gil", action="store_true",
                    help="sample only the thread holding the GIL (no idle worker threads in the figures)")
    ap.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                    help="a mitmproxy option for the gateway (e.g. resp2chat_coalesce_ms=0); repeatable")
    ap.add_argument("--paced-streams", type=int, default=None, help="--phase paced: how many streams")
    ap.add_argument("--deltas", type=int, default=None,
                    help="content chunks per answer (2 with --phase c1: what a turn costs besides its stream)")
    ap.add_argument("--summarize", metavar="FILE", help="only summarise an existing profile")
    args = ap.parse_args()
    if args.summarize:
        print(summarize(Path(args.summarize)))
        return 0
    spy_bin = find_py_spy(args.py_spy)
    cfg = dict(run.FULL, long_kb=args.long_kb, long_turns=args.long_turns, conversations=args.conversations)
    if args.paced_streams:
        cfg["paced_streams"] = args.paced_streams
    if args.deltas is not None:
        cfg["deltas"], cfg["reasoning_words"] = args.deltas, 0
    size = {"deltas": cfg["deltas"], "reasoning_words": cfg["reasoning_words"]}
    w = {k: make_variant(k, **size) for k in ("text", "reasoning", "tool")}
    w["paced"] = make_variant("reasoning", **size, slow_ms=cfg["paced_ms"])
    cpus = sorted(os.sched_getaffinity(0))
    gw_cpus, rest = ({cpus[-1]}, set(cpus[:-1])) if len(cpus) >= 2 else (None, None)
    if rest:
        os.sched_setaffinity(0, rest)
    workdir = Path(tempfile.mkdtemp(prefix="resp2chat-prof-"))
    port = run.free_port()
    upstream = run.Proc("upstream", [sys.executable, str(HERE / "upstream.py"), "--port", str(port), *run.UPSTREAM_ARGS],
                        workdir, rest, run.clean_env(workdir))
    target = None
    try:
        run.wait_ready(upstream, port, "/healthz")
        extra = () if args.phase == "replay" else ("--set", "resp2chat_max_replay_entries=0")
        extra += tuple(a for option in args.set for a in ("--set", option))
        if args.path == "passthrough" and args.phase == "replay":
            sys.exit("replay is the addon's")
        target = run.start_target(args.path, port, workdir, gw_cpus, None, extra, args.addon)
        spy_cmd = [spy_bin, "record", "-p", str(target.proc.pid), "-f", "raw", "-o", args.out,
                   "-r", str(args.rate), *(["--nonblocking"] if args.nonblocking else []), *(["--gil"] if args.gil else [])]
        print(asyncio.run(drive(target, upstream, args.phase, cfg, w, spy_cmd)))
    finally:
        if target:
            target.proc.stop()
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(summarize(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
