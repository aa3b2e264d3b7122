"""What a Codex CLI sends, before the gateway changes it; and what a new Codex sends that an old one did not.

    python tests/codex_wire.py OUT_DIR CODEX_BIN [NEW_CODEX_BIN]

Runs each scenario of tests/recordings.py (a custom provider: a plain answer, a tool-call loop, a
resumed session, an image; Codex's built-in provider: a WebSocket session, remote compaction) with
Codex behind a plain `mitmdump -w OUT_DIR/<version>/<scenario>.mitm` (no addon: it keeps the
requests as Codex sent them) in front of a gateway and the scripted upstream. Then prints the shape
of what Codex sent: every header name, every JSON path of each request body and WebSocket message
with its JSON type (list indexes as ``[]``), and the values that name a kind (item, part, tool and
message types, ``include``, ``reasoning``, ``text.verbosity``, ``accept-encoding``…). Given a
second Codex, it runs the same scenarios with it and prints only what it sends that the first did
not (``NEW``) and what it no longer sends (``GONE``), per scenario and request kind: the list to
check against the gateway's schema (resp2chat_core/schema.py) when a new Codex comes out. Text
(prompts, tool descriptions) and ids are not compared.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from helpers import (MITMDUMP, Codex, free_port, gateway_env, read_flows, start_gateway, stop_process, wait_http,
                     write_png)
from recordings import BUILTIN_PROVIDER, GATEWAY_ARGS, SCENARIOS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addon"))
from resp2chat_io.demo_upstream import serve_in_thread  # noqa: E402

# JSON paths whose values are kinds, not content: compared as values too
KINDS = re.compile(r"(^|\.)(type|role|include\[\]|reasoning\.\w+|text\.verbosity|tool_choice|generate|store|stream"
                   r"|parallel_tool_calls|service_tier|truncation)$")
HEADER_VALUES = {"accept", "accept-encoding", "content-encoding", "openai-beta", "originator", "x-codex-beta-features"}


def record(codex_bin: str, out: Path, upstream_origin: str) -> Path:
    """Every scenario run by ``codex_bin``: its flow files in ``out/<version>/``."""
    version = subprocess.run([codex_bin, "--version"], capture_output=True, text=True).stdout.split()[-1]
    folder = out / version
    folder.mkdir(parents=True, exist_ok=True)
    for name, runs in SCENARIOS.items():
        scratch = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=out))
        gw = start_gateway(upstream_origin, scratch, "--set", "resp2chat_max_replay_entries=0",
                           *GATEWAY_ARGS.get(name, ()))
        port, flows = free_port(), folder / f"{name}.mitm"
        flows.unlink(missing_ok=True)
        tap = subprocess.Popen([str(MITMDUMP), "-q", "--mode", f"reverse:http://127.0.0.1:{gw.port}",
                                "--listen-host", "127.0.0.1", "--listen-port", str(port),
                                "--set", f"confdir={scratch / 'tapconf'}", "-w", str(flows)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=gateway_env())
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", proc=tap)
            codex = Codex.at(codex_bin, scratch)
            write_png(codex.workdir / "red.png")
            base_url = f"http://127.0.0.1:{port}/v1"
            if name in BUILTIN_PROVIDER:
                codex.configure_builtin(base_url, extra=BUILTIN_PROVIDER[name])
            else:
                codex.configure(base_url)
            for args in runs:
                run = codex.exec(*args)
                if run.returncode != 0:
                    raise RuntimeError(f"{version} {name}: codex exec {args} failed:\n{run.output}")
        finally:
            stop_process(tap)
            gw.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _paths(value, path: str = ""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for item in value:
            yield from _paths(item, f"{path}[]")
    else:
        yield path, value


def _shape(value) -> set[str]:
    shape = set()
    for path, leaf in _paths(value):
        shape.add(f"{path}: {type(leaf).__name__}")
        if KINDS.search(path):
            shape.add(f"{path} = {json.dumps(leaf)}")
    return shape


def shapes(folder: Path) -> dict[str, set[str]]:
    """What the flows in ``folder`` hold, per ``scenario request-kind``."""
    out: dict[str, set[str]] = defaultdict(set)
    for flows in sorted(folder.glob("*.mitm")):
        for flow in read_flows(flows):
            req = flow.request
            if req.path == "/healthz":
                continue
            kind = f"{flows.stem} {'WebSocket upgrade' if flow.websocket else req.method} {req.path.split('?')[0]}"
            for name, value in req.headers.items():
                out[kind].add(f"header {name.lower()}")
                if name.lower() in HEADER_VALUES:
                    out[kind].add(f"header {name.lower()} = {value}")
            if req.method == "POST":
                out[kind] |= _shape(json.loads(req.get_content()))
            for message in flow.websocket.messages if flow.websocket else ():
                if message.from_client:
                    body = json.loads(message.content)
                    out[f"{flows.stem} WebSocket {body.get('type')}"] |= _shape(body)
    return out


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()
    server, base_url = serve_in_thread()
    try:
        folders = [record(codex_bin, out, base_url.removesuffix("/v1")) for codex_bin in argv[1:]]
    finally:
        server.shutdown()
    old = shapes(folders[0])
    if len(folders) == 1:
        for kind, shape in sorted(old.items()):
            print(f"{kind}\n" + "".join(f"    {line}\n" for line in sorted(shape)))
        return 0
    new = shapes(folders[1])
    print(f"{folders[1].name} against {folders[0].name}")
    for kind in sorted(old.keys() | new.keys()):
        for line in sorted(new.get(kind, set()) - old.get(kind, set())):
            print(f"NEW   {kind}: {line}")
        for line in sorted(old.get(kind, set()) - new.get(kind, set())):
            print(f"GONE  {kind}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
