"""Property tests of the configuration: the YAML file, RESP2CHAT_* variables, ``--set`` options and
``resp2chat_io.start()`` mean the same thing, or are refused with one line naming the setting
(never a traceback, never a secret shown); ``resp2chat keys`` against a model of its clients; and
options changed while a gateway runs. The in-process tests drive the real loader
(resp2chat_io/config.py ``load_settings``); the rest real ``resp2chat`` and mitmdump/mitmweb
processes, each in its own HOME and config folder (helpers.cli_env)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers import (ADDON, MITMDUMP, RESP2CHAT, cli_env, config_file, free_port, post_turn, run_cli, start_mitmweb_gateway,
                     wait_until)
import resp2chat_io
from resp2chat_core import settings as S
from resp2chat_core.clients import LIMITS, parse_clients
from resp2chat_io.config import load_settings

SETTINGS = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
SECRET = "SECRETzq0123456789"  # only where no message, log or listing may show it


# --- the file, in-process: any document loads or is refused in one line --------------------------

UNKNOWN = ["upstream_api_ky", "nonsense", "1", "yes", "~", "3.5", "2024-01-01"]
KEYS = st.sampled_from([f.name for f in S.FIELDS] + list(S.ALIASES) + UNKNOWN)
PLAIN = ["1.10", "0123", "017", "0x1F", "1_000", "1:30", "yes", "off", "~", "2024-01-01", "2024-01-01 10:00:00",
         ".inf", ".nan", "-3", "7", '""', "demo", "http://127.0.0.1:9/v1", "127.0.0.1:4001", "max_tokens",
         "[a, b]", "[1, 2]", "{a: b}", "{1: a, b: c}", "{a: 2024-01-01}", "{a: {1: b, c: d}}", "{a: .nan}", "{a: 5}",
         "{a: !!binary aGVsbG8=}", "!!set {a, b}", "[{name: a, base_url: 'http://127.0.0.1:9/v1'}]",
         "[{name: a, base_url: 'http://127.0.0.1:9/v1', upstream_extra_params: {d: 2024-01-01}}]",
         "[{name: a, base_url: 'http://127.0.0.1:9/v1', 5: x, z: y}]", "&a [*a]", "&a {x: *a}", "{a: &b [1], c: *b}"]
# tagged values their tag cannot take: PyYAML raises plain Python errors for some, quoting them
TAGGED = [f"!!int {SECRET}", f"!!float {SECRET}", f"!!bool {SECRET}", f"!!timestamp {SECRET}", "!!int ''",
          f"!!binary {SECRET}!", f"*{SECRET}", f"!{SECRET} x"]
# where a secret may be: a secret setting, the entries that hold keys, a setting misspelt
SECRET_KEYS = sorted(S.SECRET_FIELDS) + ["clients", "upstreams", "upstream_headers", "mcp_servers"] + UNKNOWN
SECRET_VALUES = [SECRET, f"'{SECRET}'", f"[{SECRET}]", f"{{a: {SECRET}}}", f"[{{name: alice, key: {SECRET}}}]",
                 f"[{{name: a, base_url: 'http://127.0.0.1:9/v1', api_key: {SECRET}, z: 1}}]", f"{{Api-Key: {SECRET}}}"]


def _line(key: str, value: str) -> str:
    return f"{key}: {value}"


ENTRY = st.one_of(st.tuples(KEYS, st.sampled_from(PLAIN + TAGGED)),
                  st.tuples(st.sampled_from(SECRET_KEYS), st.sampled_from(SECRET_VALUES)))


@settings(max_examples=300, **SETTINGS)
@given(st.lists(ENTRY, max_size=5))
def test_any_yaml_document_loads_or_is_refused_in_one_line(tmp_path, entries):
    """Whatever a config file holds, the loader returns settings every consumer can take (JSON
    values: mitmproxy's option values, chat bodies) or refuses it with a SettingsError of one
    line that shows no secret: never another exception (a traceback at start-up, in `resp2chat
    keys`, or in the gateway's log when the file is reloaded, with the value in its words)."""
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(_line(k, v) for k, v in entries) + "\n")
    try:
        values = load_settings({"RESP2CHAT_CONFIG": str(path)}).values
    except S.SettingsError as exc:
        message = str(exc)
        assert "\n" not in message and SECRET.lower() not in message.lower(), message
        return
    json.dumps(values, allow_nan=False)
    for f in S.FIELDS:
        S.to_option(f, values[f.name])


def test_a_key_given_twice_in_the_file_is_refused_naming_it(tmp_path):
    """YAML keeps the last of two equal keys: the first value was dropped without a word."""
    path = tmp_path / "config.yaml"
    path.write_text(f"upstream_api_key: {SECRET}\nmax_sessions: 5\nupstream_api_key: other-{SECRET}\n")
    with pytest.raises(S.SettingsError) as raised:
        load_settings({"RESP2CHAT_CONFIG": str(path)})
    assert "upstream_api_key" in str(raised.value) and "twice" in str(raised.value)
    assert SECRET not in str(raised.value)


# --- the file and the environment mean the same ---------------------------------------------------

SCALAR_FIELDS = [f.name for f in S.FIELDS if f.kind in ("str", "int", "bool")]
TEXT = st.one_of(st.sampled_from(["1.10", "0123", "01234567", "017", "0x1F", "1_000", "1:30", "+5", "2024-01-01",
                                  "on", "Off", "yes", "7", "12.0", "1e3", ".5"]),
                 st.text(alphabet="0123456789._:+-xeoyn", min_size=1, max_size=8))


def _outcome(env: dict, field: str):
    try:
        return "ok", load_settings(env)[0][field]
    except S.SettingsError:
        return "refused", None


@settings(max_examples=300, **SETTINGS)
@given(st.sampled_from(SCALAR_FIELDS), TEXT)
def test_a_value_means_the_same_in_the_file_and_the_environment(tmp_path, field, text):
    """``name: TEXT`` in the file and ``RESP2CHAT_NAME=TEXT`` give the same value, or are both
    refused: a YAML number is not another setting (``upstream_model: 1.10`` was "1.1", ``seal_key:
    01234567`` the octal 342391, ``max_sessions: 017`` 15 where the environment's 017 is 17)."""
    try:
        node = yaml.compose(f"k: {text}\n").value[0][1]
    except yaml.YAMLError:
        node = None  # (no scalar: `1:` is a mapping's key)
    assume(isinstance(node, yaml.ScalarNode) and node.value == text and not node.tag.endswith(":null"))
    path = tmp_path / "config.yaml"
    path.write_text(f"{field}: {text}\n")
    in_file = _outcome({"RESP2CHAT_CONFIG": str(path)}, field)
    in_env = _outcome({"RESP2CHAT_CONFIG": str(tmp_path / "none.yaml"), S.BY_NAME[field].env: text}, field)
    assert in_file == in_env


# --- file, environment and --set in a real gateway -------------------------------------------------

ASK = ("from mitmproxy import ctx\n"
       "class Ask:\n"
       "    def running(self):\n"
       "        open({out!r}, 'w').write(ctx.master.commands.execute('resp2chat.settings'))\n"
       "        ctx.master.shutdown()\n"
       "addons = [Ask()]\n")


def gateway_settings(tmp: Path, env: dict, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    """What a real gateway (mitmdump without a server, ``-n``) with ``env`` and ``args`` shows of its
    settings (the ``resp2chat.settings`` command), or None when it did not start."""
    out = tmp / f"settings-{uuid.uuid4().hex}.json"
    script = tmp / "ask_settings.py"
    script.write_text(ASK.format(out=str(out)))
    run = subprocess.run([str(MITMDUMP), "-n", "-s", str(ADDON), "-s", str(script), "--set", f"confdir={tmp / 'conf'}",
                          *args], capture_output=True, text=True, timeout=120, env=cli_env(tmp, **env), cwd=tmp)
    return run, (json.loads(out.read_text()) if out.exists() else None)


@settings(max_examples=3, **SETTINGS)
@given(st.fixed_dictionaries({"upstream_model": st.sampled_from(["1.10", "1:30", "0123", "qwen3"]),
                              "max_sessions": st.sampled_from(["017", "1_000", "0x1F", "300"]),
                              "upstream_extra_params": st.sampled_from(["", "{\"a\": 1}"])}))
def test_file_environment_and_set_agree_in_a_real_gateway(tmp_path, given_values):
    """The same texts as the file, the environment and ``--set`` give one gateway the same
    settings, or stop it (exit status, the setting named) all three ways."""
    path = config_file(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}: {v}\n" for k, v in given_values.items()))
    ways = {"file": gateway_settings(tmp_path, {})}
    path.unlink()
    ways["env"] = gateway_settings(tmp_path, {S.BY_NAME[k].env: v for k, v in given_values.items()})
    ways["set"] = gateway_settings(tmp_path, {}, *(a for k, v in given_values.items()
                                                   for a in ("--set", f"resp2chat_{k}={v}")))
    shown = {way: result for way, (run, result) in ways.items()}
    if any(v is None for v in shown.values()):
        for way, (run, result) in ways.items():
            text = run.stdout + run.stderr
            assert result is None and run.returncode != 0 and "Traceback" not in text, (way, text)
            assert any(name in text for name in given_values), (way, text)
        return
    assert shown["file"] == shown["env"] == shown["set"]
    assert shown["file"]["upstream_model"] == given_values["upstream_model"]


# --- a file or value that cannot be taken stops everything in one line -----------------------------

BAD_FILES = [
    (f"upstream_api_key: !!int {SECRET}\n", "config file"),
    (f"clients: [{{name: a, key: !!float {SECRET}}}]\n", "config file"),
    (f"1: {SECRET}\nnonsense: 2\n", "unknown setting"),
    ("model_map: {1: a, b: c}\n", "model_map"),
    ("upstream_extra_params: {seed: 2024-01-01}\n", "upstream_extra_params"),
    (f"upstream_api_key: {SECRET}\nupstream_api_key: {SECRET}x\n", "upstream_api_key"),
]


def _one_clear_line(out: subprocess.CompletedProcess, named: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode != 0 and named in text, text
    assert "Traceback" not in text and "Addon error" not in text and SECRET not in text, text


@pytest.mark.parametrize("document,named", BAD_FILES)
def test_a_config_file_that_cannot_be_taken_stops_the_gateway_and_the_cli_in_one_line(tmp_path, document, named):
    path = config_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(document)
    mitmdump = subprocess.run([str(MITMDUMP), "-s", str(ADDON), "--mode", "reverse:http://127.0.0.1:9",
                               "--listen-port", str(free_port()), "--set", f"confdir={tmp_path / 'conf'}"],
                              capture_output=True, text=True, timeout=120, env=cli_env(tmp_path), cwd=tmp_path)
    _one_clear_line(mitmdump, named)
    for args in (("print-config", "--offline"), ("keys", "add", "alice"), ("keys", "list"), ("keys", "revoke", "a"),
                 ("configure", "-y", "--set", "upstream_model=x")):
        out = run_cli(tmp_path, *args)
        assert out.returncode == 2, (args, out.stderr)
        _one_clear_line(out, named)
        assert path.read_text() == document  # nothing written


def test_a_config_file_that_cannot_be_read_is_said_in_one_line(tmp_path):
    """Not UTF-8, or a directory where the file should be: one line, no traceback."""
    path = config_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"upstream_model: caf\xe9\n")
    for args in (("print-config", "--offline"), ("keys", "list")):
        _one_clear_line(run_cli(tmp_path, *args), "config file")
    path.unlink()
    path.mkdir()
    _one_clear_line(run_cli(tmp_path, "keys", "list"), "config file")


def test_a_log_path_the_gateway_cannot_open_stops_it_in_one_line(tmp_path):
    for name in ("access_log_path", "upstream_request_log_path"):
        out = subprocess.run([str(MITMDUMP), "-s", str(ADDON), "--mode", "reverse:http://127.0.0.1:9",
                              "--listen-port", str(free_port()), "--set", f"confdir={tmp_path / 'conf'}"],
                             capture_output=True, text=True, timeout=120,
                             env=cli_env(tmp_path, **{S.BY_NAME[name].env: str(tmp_path / "no-such-dir" / "x.log")}),
                             cwd=tmp_path)
        _one_clear_line(out, name)


# --- names: a trailing newline is no name ------------------------------------------------------------

NAME = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@settings(max_examples=50, **SETTINGS)
@given(NAME)
def test_a_name_or_header_with_a_trailing_newline_is_refused(name):
    """The checks matched with ``$``, which takes a newline before the end: ``alice\\n`` was a
    client name (in logs, metrics, `keys list`), ``x-key\\n`` a header name sent upstream."""
    key = "k" * 20
    digest = hashlib.sha256(key.encode()).hexdigest()
    parse_clients([{"name": name, "key": key}])  # (the name itself is fine)
    bad = [
        lambda: parse_clients([{"name": name + "\n", "key": key}]),
        lambda: parse_clients([{"name": name, "key": key + "\n"}]),
        lambda: parse_clients([{"name": name, "key_sha256": digest + "\n"}]),
        lambda: parse_clients([{"name": name, "key": key, "id": "i" * 16 + "\n"}]),
        lambda: S.parse_upstreams([{"name": name + "\n", "base_url": "http://127.0.0.1:9/v1"}]),
        lambda: S.parse(S.BY_NAME["upstream_headers"], {name + "\n": "v"}),
        lambda: S.parse(S.BY_NAME["routing_key_header"], name + "\n"),
        lambda: S.parse(S.BY_NAME["bind_addr"], "127.0.0.1:4000\n"),
    ]
    for make in bad:
        with pytest.raises(S.SettingsError):
            make()


# --- resp2chat keys against a model --------------------------------------------------------------

NAMES = ["alice", "bob", "c.d-e_1", "x" * 64, "x" * 65, "bob smith", "alice\n", "默认", "default"]
OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.sampled_from(NAMES), st.sampled_from([None, "0", "60", str(10 ** 12 + 1)])),
    st.tuples(st.just("revoke"), st.sampled_from(NAMES), st.none()),
    st.tuples(st.just("rotate"), st.sampled_from(NAMES), st.none())), min_size=1, max_size=5)


def _valid(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name) is not None


@settings(max_examples=5, **SETTINGS)
@given(OPS)
def test_keys_add_rotate_revoke_and_list_agree_with_a_model(tmp_path, ops):
    """Each command succeeds exactly when the model says (a valid new name and limit; a name
    there), prints a key only on success and only on stdout, and the file always loads with
    the model's clients, each key finding its own; `keys list` shows them in order."""
    home = tmp_path / uuid.uuid4().hex
    home.mkdir()
    model: dict[str, dict] = {}
    for op, name, rpm in ops:
        args = ["keys", op, name] + (["--rpm", rpm] if rpm else [])
        out = run_cli(home, *args)
        if op == "add":
            ok = _valid(name) and name not in model and rpm in (None, "60")
        else:
            ok = name in model
        assert (out.returncode == 0) == ok, (args, out.returncode, out.stderr)
        assert "Traceback" not in out.stderr
        if op == "revoke":
            assert out.stdout.startswith("revoked") == ok
        else:
            assert (out.stdout != "") == ok, (args, out.stdout)
        if not ok:
            continue
        if op == "add":
            model[name] = {"rpm": int(rpm) if rpm else None, "key": out.stdout.strip()}
        elif op == "rotate":
            model[name]["key"] = out.stdout.strip()
        else:
            del model[name]
        for entry in model.values():
            assert entry["key"] not in out.stderr
    path = config_file(home)
    values, _ = S.resolve(yaml.safe_load(path.read_text()) or {} if path.exists() else {}, {})
    specs = parse_clients(values["clients"])
    assert [s.name for s in specs] == list(model)
    for spec, entry in zip(specs, model.values()):
        assert spec.key_sha256 == hashlib.sha256(entry["key"].encode()).hexdigest() and spec.rpm == entry["rpm"]
    listed = run_cli(home, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split()[0] for line in listed.stdout.splitlines()[1:] if line.strip() and not line.startswith("KEY:")]
    assert rows == list(model)


# --- resp2chat_io.start(): lists as the gateway reads them ------------------------------------------


def test_start_gives_list_settings_as_the_gateway_reads_them(upstream):
    """``start(public_hosts=[…])`` sent one ``--set`` holding the JSON array, which mitmproxy
    keeps as a list of one string: the hosts were not the gateway's names, and
    ``passthrough_paths=[…]`` stopped the start."""
    with resp2chat_io.start(upstream.base_url, public_hosts=["gw.example.test", "*.corp.example"],
                            passthrough_paths=["GET /v1/models"]) as gw:
        for host in ("gw.example.test", "api.corp.example"):
            r = requests.get(gw.url + "/models", headers={"host": host}, timeout=10)
            assert r.status_code == 200, r.text
        assert requests.post(gw.url + "/embeddings", json={"input": "x"}, timeout=10).status_code == 404
    with resp2chat_io.start(upstream.base_url, passthrough_paths=[]) as gw:
        assert requests.get(gw.url + "/models", timeout=10).status_code == 404


# --- options changed while the gateway runs (mitmweb's options editor) -------------------------------


def test_options_changed_while_the_gateway_runs(tmp_path, upstream):
    """A bound of the store changed at run time keeps what is stored (the store was made anew,
    empty); a log path the gateway cannot open is refused, the log it writes kept (the access log
    and the upstream request log alike: addons/base.py ``open_log``)."""
    log, requests_log = tmp_path / "access.log", tmp_path / "upstream.jsonl"
    gw, put = start_mitmweb_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_access_log_path={log}",
                                    "--set", f"resp2chat_upstream_request_log_path={requests_log}",
                                    "--set", "resp2chat_max_replay_entries=0", env=cli_env(tmp_path))
    try:
        first = post_turn(gw, {"model": "demo-model", "input": "keep me"})
        assert first.status_code == 200, first.text
        rid = first.json()["id"]
        assert put(resp2chat_max_sessions=100, resp2chat_session_ttl_hours=2).status_code == 200
        got = requests.get(f"{gw.base_url}/responses/{rid}", timeout=10)
        assert got.status_code == 200, got.text
        lines = wait_until(lambda: log.exists() and log.read_text().count("\n"), what="the access log's line")
        sent = wait_until(lambda: requests_log.exists() and requests_log.read_text().count("\n"),
                          what="the upstream request log's line")
        for name in ("access_log_path", "upstream_request_log_path"):
            refused = put(**{f"resp2chat_{name}": str(tmp_path / "no-such-dir" / "x.log")})
            assert refused.status_code == 400 and name in refused.text and "no-such-dir" in refused.text, refused.text
            assert "\n" not in refused.text.strip(), refused.text
        assert post_turn(gw, {"model": "demo-model", "input": "again"}).status_code == 200
        wait_until(lambda: log.read_text().count("\n") > lines, what="the next line in the same log")
        wait_until(lambda: requests_log.read_text().count("\n") > sent, what="the next line in the same request log")
        assert "Traceback" not in gw.log() and "Addon error" not in gw.log()
    finally:
        gw.stop()


# --- concurrent edits of the config file --------------------------------------------------------------


def test_configure_keeps_a_client_keys_add_made_while_it_asked(tmp_path):
    """``resp2chat configure`` read the file, asked its questions, and wrote what it had read:
    a ``keys add`` meanwhile (a script, a colleague) was lost, its key printed and never taken.
    It now writes under the lock ``keys`` holds, over the file as it is then."""

    env = cli_env(tmp_path)
    proc = subprocess.Popen([str(RESP2CHAT), "configure"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while b"Chat Completions base URL" not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, seen
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                seen += os.read(proc.stdout.fileno(), 4096)
        added = run_cli(tmp_path, "keys", "add", "alice")
        assert added.returncode == 0, added.stderr
        out, err = proc.communicate("http://127.0.0.1:9/v1\n\nmy-model\n127.0.0.1:4555\n".encode(), timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = yaml.safe_load(config_file(tmp_path).read_text())
    assert [c["name"] for c in saved.get("clients", [])] == ["alice"], saved
    assert saved["upstream_model"] == "my-model" and saved["bind_addr"] == "127.0.0.1:4555"


@pytest.mark.parametrize("name", ["session_ttl_hours", "connect_timeout_secs", "max_request_body_mb"])
def test_a_whole_number_past_any_use_is_refused_at_start(tmp_path, name):
    """A whole number is taken up to 10**12 (what clients' limits take too): past that, hours or
    seconds no longer fit a float's or a C timeout's range, and the store's expiry of every turn
    failed (``int too large to convert to float``) on a gateway that had started."""
    huge = "1" + "0" * 400
    run, shown = gateway_settings(tmp_path, {S.BY_NAME[name].env: huge})
    assert shown is None and run.returncode != 0, run.stdout[-2000:]
    _one_clear_line(run, name)
    assert gateway_settings(tmp_path, {S.BY_NAME[name].env: str(10 ** 12)})[1][name] == 10 ** 12


@pytest.mark.parametrize("text", ["30.5", "ten", "1e3"])
def test_a_whole_number_setting_that_is_none_says_so_not_pythons_words(text):
    """``connect_timeout_secs: 30.5`` (in the file, the environment, an upstream's entry) was
    refused as "invalid literal for int() with base 10: '30.5'": Python's words, not the rule."""
    with pytest.raises(S.SettingsError) as err:
        S.parse(S.BY_NAME["connect_timeout_secs"], text, "environment")
    assert "expected a whole number >= 0" in str(err.value) and "int()" not in str(err.value), str(err.value)
    with pytest.raises(S.SettingsError) as err:
        S.parse_upstreams([{"name": "a", "base_url": "http://127.0.0.1:9/v1", "connect_timeout_secs": text}])
    assert "expected a whole number >= 0" in str(err.value) and "int()" not in str(err.value), str(err.value)


def test_the_settings_command_hides_credential_headers(tmp_path):
    """``resp2chat.settings`` (README: "the effective settings with secrets hidden") showed the
    values of credential-like ``upstream_headers`` as they are, at the top and in each upstream:
    the gateway scrubs them from everything else as secrets."""
    headers = {"api-key": SECRET, "HTTP-Referer": "https://app.example"}
    run, shown = gateway_settings(tmp_path, {"RESP2CHAT_UPSTREAM_HEADERS": json.dumps(headers)})
    assert shown is not None, run.stdout[-2000:]
    assert shown["upstream_headers"] == {"api-key": "[set]", "HTTP-Referer": "https://app.example"}
    entry = {"name": "a", "base_url": "http://127.0.0.1:9/v1", "upstream_headers": headers}
    run, shown = gateway_settings(tmp_path, {"RESP2CHAT_UPSTREAMS": json.dumps([entry])})
    assert shown is not None, run.stdout[-2000:]
    assert shown["upstreams"][0]["upstream_headers"] == {"api-key": "[set]", "HTTP-Referer": "https://app.example"}
    assert SECRET not in json.dumps(shown) and SECRET not in run.stdout + run.stderr


# --- an old name beside its new one: the new one wins, in every layer ----------------------------------

OLD, NEW = "request_timeout_secs", "upstream_idle_timeout_secs"  # (settings.py: the one renamed field)


def test_the_new_name_wins_over_the_old_one_given_beside_it(tmp_path):
    """A setting given under its old name and its new one in the same place: the new one is used
    wherever each stands, and a warning names the old one as ignored (never a value). The
    ``--set`` pair gave the old name's value (the addon read the aliases last), ``configure
    --set`` the last one typed."""
    assert S.ALIASES[OLD].name == NEW
    ways = {"--set, new first": ({}, ("--set", f"resp2chat_{NEW}=30", "--set", f"resp2chat_{OLD}=90")),
            "--set, old first": ({}, ("--set", f"resp2chat_{OLD}=90", "--set", f"resp2chat_{NEW}=30")),
            "environment": ({S.BY_NAME[NEW].env: "30", "RESP2CHAT_" + OLD.upper(): "90"}, ())}
    for way, (env, args) in ways.items():
        run, shown = gateway_settings(tmp_path, env, *args)
        assert shown is not None, (way, run.stdout[-2000:])
        assert shown[NEW] == 30, (way, shown[NEW])
        text = run.stdout + run.stderr
        assert re.search(rf"{OLD}\b.*ignored.*{NEW}", text, re.I), (way, text[-3000:])
        assert "90" not in "".join(line for line in text.splitlines() if "ignored" in line), (way, text[-3000:])
    path = config_file(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for document in (f"{NEW}: 30\n{OLD}: 90\n", f"{OLD}: 90\n{NEW}: 30\n"):
        path.write_text(document)
        run, shown = gateway_settings(tmp_path, {})
        assert shown is not None and shown[NEW] == 30, (document, run.stdout[-2000:])
        assert re.search(rf"{OLD}\b.*ignored.*{NEW}", run.stdout + run.stderr, re.I), run.stdout[-3000:]
    path.unlink()
    for args in ((f"{NEW}=30", f"{OLD}=90"), (f"{OLD}=90", f"{NEW}=30")):
        out = run_cli(tmp_path, "configure", "-y", *(a for arg in args for a in ("--set", arg)))
        assert out.returncode == 0, out.stderr
        saved = yaml.safe_load(path.read_text())
        assert saved[NEW] == 30 and OLD not in saved, (args, saved)
        assert re.search(rf"{OLD}\b.*ignored.*{NEW}", out.stderr, re.I), out.stderr
        path.unlink()


def test_start_takes_the_new_name_over_the_old_one(upstream):
    """``start(request_timeout_secs=…, upstream_idle_timeout_secs=…)``: both became ``--set`` of
    the new name, the later one winning in mitmproxy: the old name's when it came last."""
    with resp2chat_io.start(upstream.base_url, **{NEW: 30, OLD: 90}) as gw:
        given = [a for a in gw.proc.args if a.startswith(f"resp2chat_{NEW}=")]
        assert given == [f"resp2chat_{NEW}=30"], gw.proc.args
        assert requests.get(gw.url + "/models", timeout=10).status_code == 200


# --- an empty --set of a list is an empty list -----------------------------------------------------------

LIST_FIELDS = [f.name for f in S.FIELDS if f.kind == "list"]


def test_an_empty_set_of_a_list_is_an_empty_list(tmp_path):
    """``--set resp2chat_<list>=`` (what a script writes for "none": ``--set resp2chat_x=$HOSTS``)
    was the list of one empty string, where the environment's ``RESP2CHAT_X=`` and the bare
    ``--set resp2chat_x`` are the empty list: ``passthrough_paths=`` stopped the gateway (no
    path ''), ``tool_denylist=`` denied a tool named '' (test_cli: ``resp2chat start`` too)."""
    run, shown = gateway_settings(tmp_path, {}, *(a for name in LIST_FIELDS for a in ("--set", f"resp2chat_{name}=")))
    assert shown is not None, (run.stdout + run.stderr)[-3000:]
    assert {name: shown[name] for name in LIST_FIELDS} == {name: [] for name in LIST_FIELDS}


# --- a RESP2CHAT_* variable that is no setting: one warning, never its value ---------------------------------


# no settings, yet read: the client key print-config names, the test suite's, make's and deploy/run-here.sh's
OWN_VARIABLES = ["RESP2CHAT_API_KEY", "RESP2CHAT_LLAMACPP_DIR", "RESP2CHAT_REGEN_DIALECTS", "RESP2CHAT_RUN_DIR"]


def test_a_misspelt_variable_is_warned_of_once_by_name_never_its_value(tmp_path):
    """``RESP2CHAT_UPSTREAM_MODLE=qwen3`` was ignored without a word: the gateway went on with
    another model. It starts as before, with one line naming the variable and the setting it may
    have meant, never the value (a misspelt ``…_API_KY`` holds a key). The variables of resp2chat
    itself and of its tests, bench and deploy/ that are no settings are not warned of."""
    env = {"RESP2CHAT_UPSTREAM_MODLE": SECRET, "RESP2CHAT_UPSTREAM_API_KY": SECRET,
           "resp2chat_max_sessions": SECRET,  # (lowercase: no variable the gateway reads either)
           **{name: "x" for name in OWN_VARIABLES}, "RESP2CHAT_CONFIG": str(tmp_path / "none.yaml")}
    run, shown = gateway_settings(tmp_path, env)
    assert shown is not None and run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    text = run.stdout + run.stderr
    assert SECRET not in text, text[-3000:]
    warned = [line for line in text.splitlines() if "RESP2CHAT_" in line.upper() and "ignored" in line]
    assert len(warned) == 3, warned
    for typed, meant in (("RESP2CHAT_UPSTREAM_MODLE", "RESP2CHAT_UPSTREAM_MODEL"),
                         ("RESP2CHAT_UPSTREAM_API_KY", "RESP2CHAT_UPSTREAM_API_KEY"),
                         ("resp2chat_max_sessions", "RESP2CHAT_MAX_SESSIONS")):
        assert sum(typed in line and meant in line for line in warned) == 1, (typed, warned)
    for name in [*OWN_VARIABLES, "RESP2CHAT_CONFIG"]:
        assert not any(name in line for line in warned), (name, warned)


def test_an_old_name_beside_its_new_one_in_the_file_is_warned_of_by_a_real_gateway(tmp_path):
    """The file's old name given beside its new one is ignored, with a warning naming both (the
    gateway compares what the file itself says: ``load_settings``' ``file_values``); an old name
    alone is read, and warned of as deprecated."""
    path = config_file(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("request_timeout_secs: 5\nupstream_idle_timeout_secs: 7\n")
    run, shown = gateway_settings(tmp_path, {})
    assert shown is not None and shown["upstream_idle_timeout_secs"] == 7, (run.stdout + run.stderr)[-3000:]
    text = run.stdout + run.stderr
    assert "request_timeout_secs in the config file is ignored: upstream_idle_timeout_secs is there too" in text, text[-3000:]
    path.write_text("request_timeout_secs: 5\n")
    run, shown = gateway_settings(tmp_path, {})
    assert shown is not None and shown["upstream_idle_timeout_secs"] == 5, (run.stdout + run.stderr)[-3000:]
    assert "request_timeout_secs is deprecated" in run.stdout + run.stderr


# --- an upstreams or clients entry's one-value fields mean what their text says, as at the top ----------------

ENTRY_SCALARS = [name for name in S.PER_UPSTREAM if S.BY_NAME[name].kind in ("str", "int", "bool")]
BASE = "http://127.0.0.1:9/v1"
CLIENT_KEY = "client-key-0123456789abcdef"


def _upstream(entries: list):
    spec = S.parse_upstreams(entries)[0]
    return spec.name, spec.api_key, spec.models, spec.overrides


# a list of entries: an entry every field is added to, the fields of one value, what it is validated as
LISTS = {
    "upstreams": ({"name": "a", "base_url": BASE}, ENTRY_SCALARS + ["name", "api_key", "models"], _upstream),
    "clients": ({"name": "a", "key": CLIENT_KEY}, ["name", "id", "models", *LIMITS], lambda e: parse_clients(e)[0]),
}


def _entry_outcome(env: dict, setting: str):
    try:
        return "ok", LISTS[setting][2](load_settings(env).values[setting])
    except S.SettingsError:
        return "refused", None


@pytest.mark.parametrize("setting", list(LISTS))
@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_an_entry_value_means_the_same_in_the_file_and_the_environment(tmp_path, setting, data):
    """An ``upstreams`` entry's ``upstream_model: 1.10`` was YAML's number 1.1 (another model),
    ``connect_timeout_secs: 017`` the octal 15, ``name: 1.10`` or ``api_key: 0123`` refused as no
    string, where the top level and ``RESP2CHAT_UPSTREAMS``' ``"1.10"`` mean the text; a
    ``clients`` entry's ``rpm: 017`` was 15 where ``RESP2CHAT_CLIENTS``' ``"017"`` was refused,
    ``name: 1.10`` refused: the file's text and the variable's JSON string mean the same."""
    base, fields, _ = LISTS[setting]
    field, text = data.draw(st.sampled_from(fields)), data.draw(TEXT)
    try:
        node = yaml.compose(f"k: {text}\n").value[0][1]
    except yaml.YAMLError:
        node = None
    assume(isinstance(node, yaml.ScalarNode) and node.value == text and not node.tag.endswith(":null"))
    entry = {**base, field: text}
    path = tmp_path / "config.yaml"
    path.write_text(f"{setting}:\n" + "".join(f"  {'-' if i == 0 else ' '} {k}: {v}\n"
                                               for i, (k, v) in enumerate(entry.items())))
    in_file = _entry_outcome({"RESP2CHAT_CONFIG": str(path)}, setting)
    in_env = _entry_outcome({"RESP2CHAT_CONFIG": str(tmp_path / "none.yaml"), S.BY_NAME[setting].env: json.dumps([entry])},
                            setting)
    assert in_file == in_env, (path.read_text(), in_file, in_env)


def test_an_upstream_entry_value_as_written_in_a_real_gateway(tmp_path):
    path = config_file(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"upstreams:\n  - name: a\n    base_url: {BASE}\n    upstream_model: 1.10\n"
                    "    connect_timeout_secs: 017\n    models: [gpt-5]\n")
    run, shown = gateway_settings(tmp_path, {})
    assert shown is not None, (run.stdout + run.stderr)[-3000:]
    entry = shown["upstreams"][0]
    assert entry["upstream_model"] == "1.10" and int(entry["connect_timeout_secs"]) == 17, entry


def test_an_entry_number_the_file_gives_out_of_range_is_refused_in_the_entry_s_words(tmp_path):
    """A whole number in an entry of the file, an upstream's setting or a client's limit, is read
    as its text says (config.py ``_typed``); one out of range is refused by the entry's own check,
    showing it as the operator wrote it (a number), as the variable's JSON number is."""
    path = tmp_path / "config.yaml"
    for text, why in ((f"upstreams:\n  - name: a\n    base_url: {BASE}\n    connect_timeout_secs: -5\n",
                       "connect_timeout_secs (from config file): -5 is invalid: expected a whole number >= 0"),
                      (f"clients:\n  - name: a\n    key: {CLIENT_KEY}\n    rpm: -5\n",
                       "clients[0] ('a').rpm (from config file): -5 is invalid: expected a whole number > 0")):
        path.write_text(text)
        with pytest.raises(S.SettingsError) as err:
            load_settings({"RESP2CHAT_CONFIG": str(path)})
        assert why in str(err.value), str(err.value)


# --- a clients entry's limits are the numbers their text says ------------------------------------------------


def test_a_client_limit_is_its_text_in_the_file():
    """The examples: a limit with a leading 0 or an underscore is the number its text says."""
    for text, meant in (("017", 17), ("1_000", 1000), ("60", 60)):
        (spec,) = parse_clients([{"name": "a", "key": CLIENT_KEY, "rpm": text}])
        assert spec.rpm == meant
    for text in ("0x1F", "1:30", "1.5", "0", "yes"):
        with pytest.raises(S.SettingsError, match=r"clients\[0\] \('a'\)\.rpm"):
            parse_clients([{"name": "a", "key": CLIENT_KEY, "rpm": text}])
