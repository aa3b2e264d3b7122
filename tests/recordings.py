"""Record real Codex CLI sessions through the gateway into flow files (`make recordings`).

    python tests/recordings.py recordings/

Each scenario runs the pinned Codex CLI (the Makefile's CODEX_VER; recordings/ holds 0.169.0's)
headless against a fresh `mitmdump -s addon/resp2chat.py -w FILE` in front of the scripted
upstream: on a custom provider, or on Codex's built-in provider (`openai_base_url`: the WebSocket
transport, remote compaction). Codex runs in a fixed working directory (`WORKDIR`), because its
requests carry the cwd: replaying a recording with real Codex needs the same path (and date) to
produce byte-identical requests.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addon"))

from helpers import Codex, codex_bin_path, start_gateway, write_png  # noqa: E402
from resp2chat_io.demo_upstream import serve_in_thread  # noqa: E402

WORKDIR = Path(tempfile.gettempdir()) / "resp2chat-recording-workdir"  # and CODEX_HOME inside it


# name -> list of codex exec argument lists, run in order (later ones usually `resume --last`)
SCENARIOS: dict[str, list[list[str]]] = {
    "plain-answer": [["say hi"]],
    "tool-call-loop": [["run: echo hello-from-tool"]],
    "resumed-session": [["run: echo first-turn"], ["resume", "--last", "and now summarize"],
                        ["resume", "--last", "one more question"]],
    "image-input": [["--image", "red.png", "--", "what color is this"]],
    # Codex's built-in provider (openai_base_url): the Responses WebSocket, with warm-ups and
    # previous_response_id, a tool call and a resume
    "websocket-session": [["run: echo hello-over-the-socket"], ["resume", "--last", "and once more"]],
    # the built-in provider's remote compaction (a tiny auto-compact limit: every run compacts),
    # over HTTP here (the socket carries the same turns)
    "remote-compaction": [["run: echo before-compaction"], ["resume", "--last", "after compaction"]],
}
BUILTIN_PROVIDER = {  # scenario -> the extra config.toml lines of Codex's built-in provider
    "websocket-session": "",
    "remote-compaction": "model_auto_compact_token_limit = 50\n",
}
GATEWAY_ARGS = {"remote-compaction": ["--set", "resp2chat_responses_websocket=false"]}
# Compaction summaries are sealed (resp2chat_core/seal.py): recordings use this known key, so
# `resp2chat retranslate --seal-key resp2chat-recordings` can open them. Test data, not a secret.
SEAL_KEY = "resp2chat-recordings"


def record(name: str, out_dir: Path, codex_bin: str, upstream_origin: str, scratch: Path) -> Path:
    target = (out_dir / f"{name}.mitm").resolve()
    target.unlink(missing_ok=True)
    WORKDIR.mkdir(exist_ok=True)
    write_png(WORKDIR / "red.png")
    home = WORKDIR / ".codex-home"  # named in Codex's prompt (skill paths): keep it fixed too
    if home.exists():
        shutil.rmtree(home)
    home.mkdir()
    gw = start_gateway(upstream_origin, scratch, "-w", str(target), "--set", "resp2chat_max_replay_entries=0",
                       "--set", f"resp2chat_seal_key={SEAL_KEY}", *GATEWAY_ARGS.get(name, ()))
    try:
        codex = Codex(codex_bin, home, WORKDIR)
        if name in BUILTIN_PROVIDER:
            codex.configure_builtin(gw.base_url, extra=BUILTIN_PROVIDER[name])
        else:
            codex.configure(gw.base_url)
        for args in SCENARIOS[name]:
            run = codex.exec(*args)
            if run.returncode != 0:
                raise RuntimeError(f"{name}: codex exec {args} failed:\n{run.output}")
    finally:
        gw.stop()
    return target


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0] if argv else "recordings")
    out_dir.mkdir(exist_ok=True)
    codex_bin = codex_bin_path()
    if not codex_bin:
        print("Codex CLI not found: run `make codex`", file=sys.stderr)
        return 1
    server, base_url = serve_in_thread()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for name in SCENARIOS:
                print(f"recorded {record(name, out_dir, codex_bin, base_url.removesuffix('/v1'), Path(scratch))}")
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
