"""A team's clients as configuration (issue 23): the ``clients`` setting (resp2chat_core/clients.py),
``resp2chat keys`` add/list/revoke, ``resp2chat usage`` on access logs, and ``print-config`` with
a client key (and what Codex 0.169 needs to send one). The unit tests drive the sans-I/O core;
the rest drive the real ``resp2chat`` CLI, real mitmdump gateways and the real Codex CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import tomllib
from pathlib import Path

import openai
import pytest
import requests
import yaml

from helpers import (ADDON, MITMDUMP, RESP2CHAT, Codex, cli_env, config_file, free_port, openai_client, run_cli,
                     shown_settings, start_gateway, wait_until)

from resp2chat_core import settings as S
from resp2chat_core.clients import ClientSpec, ClientTable, allows_model, key_sha256, parse_clients
from resp2chat_io.config import FileWatch, write_file

ALICE_KEY = "alice-plain-key-0123456789"
BOB_KEY = "bob-plain-key-9876543210ab"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- parse_clients ---------------------------------------------------------------------------


def test_a_plain_key_is_hashed_at_load_and_never_kept():
    alice, bob = parse_clients([
        {"name": "alice", "key": ALICE_KEY, "models": "qwen3-*", "rpm": 60},
        {"name": "bob", "key_sha256": sha(BOB_KEY).upper(), "tpm": 100_000, "max_streams": 2,
         "max_sockets": 3},
    ])
    assert alice == ClientSpec("alice", sha(ALICE_KEY), ("qwen3-*",), rpm=60)
    assert bob == ClientSpec("bob", sha(BOB_KEY), ("*",), tpm=100_000, max_streams=2, max_sockets=3)  # hex digest lowercased
    assert key_sha256(ALICE_KEY) == key_sha256(ALICE_KEY.encode()) == sha(ALICE_KEY)
    for spec in (alice, bob):
        held = json.dumps([getattr(spec, f) for f in spec.__dataclass_fields__]) + repr(spec)
        assert ALICE_KEY not in held and BOB_KEY not in held
        assert spec.key_sha256 not in repr(spec)  # a log line names the client, not even its key's hash
    assert alice.fingerprint == sha(ALICE_KEY)[:8]


def test_a_clients_id_is_its_identity_and_its_owner():
    """``id`` (``keys add`` writes one) is who holds the name: the owner of what it stores
    (owner.py), which another holder of the name (a new ``id``) does not share; an entry without
    one is owned by its name, as before ids."""
    from resp2chat_core.owner import of_client
    ident = "0123456789abcdef0123456789abcdef"
    (alice,) = parse_clients([{"name": "alice", "id": ident, "key": ALICE_KEY}])
    assert alice.id == ident and of_client(alice.name, alice.id) == "id." + ident
    (legacy,) = parse_clients([{"name": "alice", "key": ALICE_KEY}])
    assert legacy.id is None and of_client(legacy.name, legacy.id) == "client.alice"
    assert of_client("default") == ""  # (gateway_api_key's: the one shared owner, as ever)
    assert of_client("default", ident) == "id." + ident  # (one keys add wrote: an identity as any other)


def test_a_key_stays_accepted_only_as_the_same_name_key_and_id():
    """``clients.accepted``, the rule a reload applies to the turns in flight and an open
    WebSocket's next message: the key a request was let in with (its client then; None: no key)."""
    from resp2chat_core.clients import accepted
    ident = "0123456789abcdef0123456789abcdef"
    (alice,) = parse_clients([{"name": "alice", "id": ident, "key": ALICE_KEY}])
    (legacy,) = parse_clients([{"name": "alice", "key": ALICE_KEY}])
    now = ClientTable([alice])
    assert accepted(now, True, alice)
    assert not accepted(now, True, legacy)  # (the same name and key, another identity)
    assert not accepted(ClientTable(parse_clients([{"name": "alice", "id": ident, "key": BOB_KEY}])), True, alice)
    assert not accepted(ClientTable(), True, alice) and not accepted(ClientTable(), False, alice)
    assert accepted(ClientTable(), False, None) and not accepted(ClientTable(), True, None)
    assert not accepted(now, False, None)  # (no key, once the gateway takes keys)


def test_gateway_api_key_is_one_more_client_named_default():
    specs = parse_clients([{"name": "alice", "key": ALICE_KEY}], gateway_api_key="the-gateway-key")
    assert [s.name for s in specs] == ["alice", "default"]
    assert specs[1] == ClientSpec("default", sha("the-gateway-key"))  # all models, no limits
    assert parse_clients([], "the-gateway-key") == (ClientSpec("default", sha("the-gateway-key")),)
    assert parse_clients([]) == ()
    # without gateway_api_key, "default" is a name like another
    assert parse_clients([{"name": "default", "key": ALICE_KEY}])[0].name == "default"


@pytest.mark.parametrize("entries,gateway_key,field,why", [
    ([{"name": "alice", "key": ALICE_KEY, "rpm": 0}], "", "clients[0] ('alice').rpm", "whole number > 0"),
    ([{"name": "alice", "key": ALICE_KEY, "tpm": "1k"}], "", "clients[0] ('alice').tpm", "whole number > 0"),
    ([{"name": "alice", "key": ALICE_KEY, "tpm": "0x10"}], "", "clients[0] ('alice').tpm", "whole number > 0"),
    ([{"name": "alice", "key": ALICE_KEY, "max_streams": True}], "", "clients[0] ('alice').max_streams", "whole number"),
    ([{"name": "alice", "key": ALICE_KEY, "max_sockets": 0}], "", "clients[0] ('alice').max_sockets", "whole number > 0"),
    ([{"name": "alice", "key": ALICE_KEY, "rpm": 2.5}], "", "clients[0] ('alice').rpm", "whole number"),
    # too large to count (10**400 cannot even become a float: every request was a 500)
    ([{"name": "alice", "key": ALICE_KEY, "tpm": 10**400}], "", "clients[0] ('alice').tpm", "at most 1,000,000,000,000"),
    ([{"name": "alice", "key": ALICE_KEY, "rpm": 10**12 + 1}], "", "clients[0] ('alice').rpm", "at most"),
    ([{"name": "a", "key": ALICE_KEY}, {"name": "bob smith", "key": BOB_KEY}], "", "clients[1] ('bob smith').name", "letters, digits"),
    ([{"name": "al\nice", "key": ALICE_KEY}], "", "clients[0] ('al\\nice').name", "letters, digits"),
    ([{"name": "x" * 65, "key": ALICE_KEY}], "", f"clients[0] ('{'x' * 65}').name", "up to 64"),
    ([{"key": ALICE_KEY}], "", "clients[0].name", "letters, digits"),
    ([{"name": "a", "key": ALICE_KEY}, {"name": "a", "key": BOB_KEY}], "", "clients[1] ('a').name", "clients[0] ('a') has the same name"),
    ([{"name": "default", "key": ALICE_KEY}], "gw-key", "clients[0] ('default').name", "client of gateway_api_key"),
    ([{"name": "a"}], "", "clients[0] ('a').key", "exactly one of key"),
    ([{"name": "a", "key": ALICE_KEY, "key_sha256": sha(ALICE_KEY)}], "", "clients[0] ('a').key", "exactly one of key"),
    ([{"name": "a", "key_sha256": "abc123"}], "", "clients[0] ('a').key_sha256", "64 hex digits"),
    ([{"name": "a", "key": "short-key"}], "", "clients[0] ('a').key", "at least 16"),
    ([{"name": "a", "key": ALICE_KEY + " x"}], "", "clients[0] ('a').key", "printable ASCII"),
    ([{"name": "a", "id": "short", "key": ALICE_KEY}], "", "clients[0] ('a').id", "16 to 48 letters"),
    ([{"name": "a", "id": 12345678901234567890, "key": ALICE_KEY}], "", "clients[0] ('a').id", "16 to 48 letters"),
    ([{"name": "a", "id": "0" * 32, "key": ALICE_KEY}, {"name": "b", "id": "0" * 32, "key": BOB_KEY}], "",
     "clients[1] ('b').id", "clients[0] ('a') has the same id"),
    ([{"name": "a", "key": 1234567890123456789}], "", "clients[0] ('a').key", "printable ASCII"),
    ([{"name": "a", "key": ALICE_KEY}, {"name": "b", "key_sha256": sha(ALICE_KEY)}], "", "clients[1] ('b').key_sha256",
     "clients[0] ('a') has the same key"),
    ([{"name": "a", "key": ALICE_KEY}], ALICE_KEY, "clients[0] ('a').key", "gateway_api_key has the same key"),
    ([{"name": "a", "key": ALICE_KEY, "models": []}], "", "clients[0] ('a').models", "non-empty list"),
    ([{"name": "a", "key": ALICE_KEY, "models": ["qwen3", ""]}], "", "clients[0] ('a').models", "non-empty list"),
    ([{"name": "a", "kee": ALICE_KEY}], "", "clients[0] ('a').kee", "unknown field (known: name, key, key_sha256"),
    (["alice"], "", "clients[0]", "expected a mapping"),
])
def test_invalid_entries_name_the_entry_and_field_and_never_a_key(entries, gateway_key, field, why):
    with pytest.raises(S.SettingsError) as err:
        parse_clients(entries, gateway_key)
    text = str(err.value)
    assert text.startswith(field) and why in text, text
    for secret in (ALICE_KEY, BOB_KEY, sha(ALICE_KEY), sha(BOB_KEY)):
        assert secret not in text


def test_the_table_finds_a_presented_key_by_its_hash():
    table = ClientTable(parse_clients([{"name": "alice", "key": ALICE_KEY}, {"name": "bob", "key_sha256": sha(BOB_KEY)}],
                                      gateway_api_key="the-gateway-key"))
    assert table.lookup(ALICE_KEY).name == "alice" and table.lookup(BOB_KEY.encode()).name == "bob"
    assert table.lookup("the-gateway-key").name == "default"
    for wrong in ("", b"", ALICE_KEY[:-1], ALICE_KEY + "x", sha(ALICE_KEY), "Bearer " + ALICE_KEY):
        assert table.lookup(wrong) is None
    assert table.names == ("alice", "bob", "default") and len(table) == 3
    assert table.named("bob").key_sha256 == sha(BOB_KEY) and table.named("carol") is None
    assert ALICE_KEY not in repr(table) and sha(ALICE_KEY) not in repr(table)


def test_allows_model_matches_globs_case_sensitively():
    spec = ClientSpec("a", sha(ALICE_KEY), ("qwen3-*", "demo-model"))
    assert allows_model(spec, "qwen3-coder") and allows_model(spec, "demo-model")
    assert not allows_model(spec, "Qwen3-coder") and not allows_model(spec, "gpt-5") and not allows_model(spec, "demo-model-2")
    assert allows_model(ClientSpec("b", sha(BOB_KEY)), "anything/at:all")


# --- the setting -------------------------------------------------------------------------------


def test_clients_setting_from_file_and_environment_held_like_a_secret():
    entries = [{"name": "alice", "key": ALICE_KEY, "models": ["qwen3-*"]}, {"name": "bob", "key_sha256": sha(BOB_KEY)}]
    values, sources = S.resolve({"clients": entries}, {})
    assert values["clients"] == entries and sources["clients"] == "config file"
    values, sources = S.resolve({"clients": entries[:1]}, {"RESP2CHAT_CLIENTS": json.dumps(entries[1:])})
    assert values["clients"] == entries[1:] and sources["clients"] == "RESP2CHAT_CLIENTS"
    assert S.hidden_default("clients") and "clients" in S.HOLDS_SECRETS
    # the plain key is scrubbed like every other secret (a key_sha256 is not a secret)
    assert S.secret_values({"clients": entries, "upstream_api_key": "sk-upstream-1"}) == (b"sk-upstream-1", ALICE_KEY.encode())
    # an invalid entry, or JSON that is none, never shows what it holds
    for env in ('[{"name": "alice", "key": "' + ALICE_KEY + '", "rpm": -1}]', '[{"name": "alice", "key": "' + ALICE_KEY + '"'):
        with pytest.raises(S.SettingsError) as err:
            S.resolve({}, {"RESP2CHAT_CLIENTS": env})
        assert ALICE_KEY not in str(err.value) and "clients" in str(err.value)


def test_file_watch_sees_every_write_and_nothing_else(tmp_path):
    path = tmp_path / "resp2chat" / "config.yaml"
    watch = FileWatch(path)
    assert not watch.changed()  # no file yet: the baseline
    write_file(path, {"clients": [{"name": "a", "key_sha256": sha(ALICE_KEY)}]})
    assert watch.changed() and not watch.changed()
    # the same size, written again at once: a new file (os.replace), so still seen
    write_file(path, {"clients": [{"name": "b", "key_sha256": sha(ALICE_KEY)}]})
    assert watch.changed() and not watch.changed()
    with path.open("a") as fh:  # an edit in place
        fh.write("# edited\n")
    assert watch.changed() and not watch.changed()
    path.unlink()
    assert watch.changed() and watch.stamp is None and not watch.changed()


# --- the gateway with clients configured --------------------------------------------------------


@pytest.mark.parametrize("value,gateway_key,named", [
    ('[{"name": "alice", "key": "%s"}, {"name": "bob", "key": "%s", "rpm": 0}]' % (ALICE_KEY, BOB_KEY), "",
     ("clients[1] ('bob').rpm", ": 0 is invalid")),
    ('[{"name": "alice", "key": "%s", "colour": "%s"}]' % (ALICE_KEY, BOB_KEY), "", ("clients[0] ('alice').colour", "")),
    ('[{"name": "alice", "key": "%s", "tpm": 1%s}]' % (ALICE_KEY, "0" * 400), "",
     ("clients[0] ('alice').tpm", "")),
    ('[{"name": "alice", "key": "%s"}, {"name": "bob", "key": "%s"}]' % (ALICE_KEY, ALICE_KEY), "",
     ("clients[1] ('bob').key", ": '[hidden]' is invalid: clients[0] ('alice') has the same key")),
    ('[{"name": "default", "key": "%s"}]' % ALICE_KEY, BOB_KEY, ("clients[0] ('default').name", "")),
])
def test_invalid_clients_stop_start_up_naming_entry_and_field(tmp_path, value, gateway_key, named):
    for how in ("set", "env"):
        args = [str(MITMDUMP), "-s", str(ADDON), "--mode", f"reverse:http://127.0.0.1:9@127.0.0.1:{free_port()}",
                "--set", f"confdir={tmp_path / 'conf'}"]
        env = cli_env(tmp_path, **({"RESP2CHAT_GATEWAY_API_KEY": gateway_key} if gateway_key else {}))
        if how == "set":
            args += ["--set", f"resp2chat_clients={value}"]
        else:
            env["RESP2CHAT_CLIENTS"] = value
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
        out = proc.stdout + proc.stderr
        # the entry and field named, then where the value came from, then why
        said = re.escape(named[0]) + r"( \(from [^)]+\))?" + re.escape(named[1])
        assert proc.returncode != 0 and re.search(said, out), (how, out[-2000:])
        assert ALICE_KEY not in out and BOB_KEY not in out


def test_options_and_the_settings_command_never_show_a_client_key(tmp_path):
    entries = [{"name": "alice", "key": ALICE_KEY, "rpm": 60}, {"name": "bob", "key_sha256": sha(BOB_KEY), "models": ["qwen3-*"]}]
    env = cli_env(tmp_path, RESP2CHAT_CLIENTS=json.dumps(entries))
    # mitmdump --options, and the resp2chat.settings command of a real gateway
    options, shown, log = shown_settings(tmp_path, env)
    assert options.returncode == 0 and "resp2chat_clients: ''" in options.stdout
    assert ALICE_KEY not in options.stdout + options.stderr and sha(BOB_KEY) not in options.stdout
    assert shown["clients"] == [{"name": "alice", "key": "[set]", "rpm": 60},
                                {"name": "bob", "key_sha256": sha(BOB_KEY)[:8] + "…", "models": ["qwen3-*"]}]
    for text in (json.dumps(shown), log):
        assert ALICE_KEY not in text and sha(BOB_KEY) not in text


def test_a_client_key_is_scrubbed_from_what_clients_get(tmp_path, upstream):
    # a backend that repeats a client's key in its error (the scripted upstream echoes the prompt)
    env = cli_env(tmp_path, RESP2CHAT_CLIENTS=json.dumps([{"name": "alice", "key": ALICE_KEY}]))
    gw = start_gateway(upstream.origin, tmp_path, env=env)
    try:
        client = openai_client(gw, api_key=ALICE_KEY)
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="demo-model", input=f"error: 400 your key {ALICE_KEY} is odd")
        events = list(client.responses.create(model="demo-model", input=f"error: 400 again {ALICE_KEY}", stream=True))
    finally:
        gw.stop()
    assert "your key [redacted] is odd" in str(err.value) and ALICE_KEY not in str(err.value)
    assert events[-1].type == "response.failed" and "again [redacted]" in events[-1].response.error.message
    assert ALICE_KEY not in gw.log()



def test_another_clients_key_in_a_url_is_a_credential(tmp_path, upstream):
    # a configured client's plain key is a secret like the others wherever the gateway looks for
    # one: in a URL bob sends it is refused (credential_in_url), never passed on to the backend
    env = cli_env(tmp_path, RESP2CHAT_CLIENTS=json.dumps([{"name": "alice", "key": ALICE_KEY},
                                                          {"name": "bob", "key": BOB_KEY}]))
    gw = start_gateway(upstream.origin, tmp_path, env=env)
    try:
        r = requests.get(f"{gw.base_url}/models/{ALICE_KEY}", headers={"authorization": f"Bearer {BOB_KEY}"}, timeout=20)
    finally:
        gw.stop()
    assert r.status_code == 400 and r.json()["error"]["code"] == "credential_in_url", r.text
    assert ALICE_KEY not in r.text + gw.log()


def test_a_key_keys_add_made_is_found_in_a_url_though_only_its_hash_is_configured(tmp_path, upstream):
    """A key ``resp2chat keys add`` made is in the config only as its hash, so the gateway could not
    know it in a URL unless the request also sent it as its own key: in a path segment or a
    parameter not named like a credential it went on to the backend, into the gateway's log and
    flows. Its shape (``r2c-`` and 43 URL-safe characters) is enough: refused (credential_in_url),
    percent-encoded too, redacted from the flow and the log; nothing reaches the backend."""
    assert run_cli(tmp_path, "keys", "add", "alice").returncode == 0
    added = run_cli(tmp_path, "keys", "add", "bob")
    bob = re.search(r"r2c-[A-Za-z0-9_-]{43}", added.stdout)[0]
    flows = tmp_path / "flows.mitm"
    gw = start_gateway(upstream.origin, tmp_path, "-w", str(flows), env=cli_env(tmp_path))
    try:
        for url in (f"/models/{bob}", f"/models?q={bob}", f"/models?q={bob.replace('-', '%2D')}"):
            r = requests.get(gw.base_url + url, timeout=20)  # (no key of its own: nothing to compare with)
            assert r.status_code == 400 and r.json()["error"]["code"] == "credential_in_url", (url, r.text)
        assert requests.get(gw.base_url + "/models/r2c-not-a-key", timeout=20).status_code != 400
    finally:
        gw.stop()
    assert bob not in gw.log() and bob.encode() not in flows.read_bytes()


def test_a_key_beside_another_credential_in_a_url_is_redacted_too(tmp_path, upstream):
    """bob puts alice's key (made by ``keys add``: only its hash configured, found by its shape)
    in a URL right before his own key (a secret of the request: it presented it). Alone, alice's is
    no key shape (a key character follows it); once bob's is redacted it is. Before, the shape was
    looked for before the secrets were redacted: the flow and the log kept alice's key."""
    alice = re.search(r"r2c-[A-Za-z0-9_-]{43}", run_cli(tmp_path, "keys", "add", "alice").stdout)[0]
    bob = re.search(r"r2c-[A-Za-z0-9_-]{43}", run_cli(tmp_path, "keys", "add", "bob").stdout)[0]
    flows = tmp_path / "flows.mitm"
    gw = start_gateway(upstream.origin, tmp_path, "-w", str(flows), env=cli_env(tmp_path))
    try:
        for url in (f"/models/{alice}{bob}", f"/models?q={alice}{bob}", f"/models/{bob}{alice}"):
            r = requests.get(gw.base_url + url, headers={"authorization": f"Bearer {bob}"}, timeout=20)
            assert r.status_code == 400 and r.json()["error"]["code"] == "credential_in_url", (url, r.text)
    finally:
        gw.stop()
    for key in (alice, bob):
        assert key not in gw.log() and key.encode() not in flows.read_bytes()


# --- resp2chat keys ------------------------------------------------------------------------------


def test_a_plain_key_the_file_reload_brings_is_a_secret_too(tmp_path, upstream):
    """A client with a plain key added to the config file while the gateway runs (the gate reads
    the file's clients again) is a client, and its key a secret as one configured at start:
    refused in a URL another client sends, scrubbed from what another client gets."""
    path = config_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump({"clients": [{"name": "alice", "key": ALICE_KEY}]}))
    gw = start_gateway(upstream.origin, tmp_path, env=cli_env(tmp_path))
    try:
        bob = "bob-plain-key-9876543210ab"
        path.write_text(yaml.safe_dump({"clients": [{"name": "alice", "key": ALICE_KEY},
                                                    {"name": "bob", "key": bob}]}))
        wait_until(lambda: "clients reloaded" in gw.log(), 15, "the reload")
        assert openai_client(gw, api_key=bob).responses.create(model="demo-model", input="hi").output_text
        r = requests.get(f"{gw.base_url}/models/{bob}", headers={"authorization": f"Bearer {ALICE_KEY}"}, timeout=20)
        assert r.status_code == 400 and r.json()["error"]["code"] == "credential_in_url", r.text
        with pytest.raises(openai.BadRequestError) as err:
            openai_client(gw, api_key=ALICE_KEY).responses.create(model="demo-model",
                                                                  input=f"error: 400 your key {bob} is odd")
        assert bob not in str(err.value) and "your key" in str(err.value)
    finally:
        gw.stop()


def test_a_config_file_that_is_not_yaml_is_refused_without_showing_its_lines(tmp_path, upstream):
    """PyYAML's error quotes the line it failed on, and a config file's lines hold keys: an edit
    that breaks the file is said (where, what) in the running gateway's log, the clients it had
    are kept, and neither the start-up error nor the CLI show the line; before, the warning quoted
    the client's or the upstream's key (and its words quoted a tag or an alias of the file's)."""
    path = config_file(tmp_path)
    path.parent.mkdir(parents=True)
    up_key = "sk-upstream-4444"
    path.write_text(yaml.safe_dump({"upstream_api_key": up_key, "clients": [{"name": "alice", "key": ALICE_KEY}]}))
    gw = start_gateway(upstream.origin, tmp_path, env=cli_env(tmp_path))
    try:
        for n, broken in enumerate((f"clients:\n  - name: alice\n    key: {ALICE_KEY}: x\n",  # a stray ': '
                                    f"upstream_api_key: {up_key}: x\nclients: [{{name: alice, key: {ALICE_KEY}}}]\n",
                                    # a key written as a YAML tag: PyYAML's words quote the tag
                                    f"upstream_api_key: !{up_key}\nclients: [{{name: alice, key: {ALICE_KEY}}}]\n"),
                                   start=1):
            path.write_text(broken)
            wait_until(lambda: gw.log().count("not reloaded") == n, 15, f"failed reload {n}")
        assert openai_client(gw, api_key=ALICE_KEY).responses.create(model="demo-model", input="hi").output_text
    finally:
        gw.stop()
    warnings = gw.log()[gw.log().index("not reloaded"):]
    assert "not valid YAML" in warnings and "at line 3, column 36" in warnings, warnings
    assert "at line 1, column" in warnings, warnings
    # at start-up, and in the CLI that reads the file
    start = subprocess.run([str(MITMDUMP), "-s", str(ADDON), "--mode", f"reverse:{upstream.origin}",
                            "--listen-port", str(free_port()), "--set", f"confdir={tmp_path / 'conf'}"],
                           capture_output=True, text=True, timeout=60, env=cli_env(tmp_path), cwd=tmp_path)
    listed = run_cli(tmp_path, "keys", "list")
    for out in (start, listed):
        assert out.returncode != 0 and "not valid YAML" in out.stdout + out.stderr, out
    for text in (gw.log(), start.stdout + start.stderr, listed.stdout + listed.stderr):
        assert ALICE_KEY not in text and up_key not in text, text


def test_keys_add_prints_the_key_once_and_stores_only_its_hash(tmp_path):
    path = config_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("upstream_base_url: http://10.0.0.5:8000/v1\n")
    out = run_cli(tmp_path, "keys", "add", "alice", "--rpm", "60", "--tpm", "200000", "--max-streams", "4",
                  "--max-sockets", "3", "--models", "qwen3-*,demo-model")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert out.stdout == key + "\n" and re.fullmatch(r"r2c-[A-Za-z0-9_-]{43}", key)  # stdout: the key alone
    assert "shown only this once" in out.stderr and "RESP2CHAT_API_KEY" in out.stderr
    assert "codex login --with-api-key" in out.stderr and key not in out.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert key not in text
    saved = yaml.safe_load(text)
    ident = saved["clients"][0]["id"]  # (its identity: what it stores is its, owner.py; not a secret)
    assert re.fullmatch(r"[0-9a-f]{32}", ident)
    assert saved == {"upstream_base_url": "http://10.0.0.5:8000/v1",  # the rest of the file kept
                     "clients": [{"name": "alice", "id": ident, "key_sha256": sha(key),
                                  "models": ["qwen3-*", "demo-model"], "rpm": 60, "tpm": 200000, "max_streams": 4,
                                  "max_sockets": 3}]}
    second = run_cli(tmp_path, "keys", "add", "bob")
    assert second.returncode == 0 and second.stdout.strip() != key
    bob = yaml.safe_load(path.read_text())["clients"][1]
    assert bob == {"name": "bob", "id": bob["id"], "key_sha256": sha(second.stdout.strip())} and bob["id"] != ident
    # what the file holds is what a gateway loads: the printed key finds its client
    values, _ = S.resolve(yaml.safe_load(path.read_text()), {})
    table = ClientTable(parse_clients(values["clients"]))
    assert table.lookup(key).name == "alice" and table.lookup(second.stdout.strip()).name == "bob"


def test_keys_add_models_before_the_name(tmp_path):
    """``keys add --models 'qwen3-*' carol``: ``--models`` took every word after it (carol too),
    and argparse refused the command for a missing name. One value, commas between globs, the
    option repeatable; the README's form (the name first) works as before."""
    first = run_cli(tmp_path, "keys", "add", "--models", "qwen3-*", "carol")
    assert first.returncode == 0, first.stderr
    again = run_cli(tmp_path, "keys", "add", "--models", "qwen3-*, llama-*", "--models", "demo-model", "dave")
    assert again.returncode == 0, again.stderr
    readme = run_cli(tmp_path, "keys", "add", "erin", "--rpm", "60", "--max-streams", "4", "--models", "qwen3-*")
    assert readme.returncode == 0, readme.stderr
    clients = {e["name"]: e for e in yaml.safe_load(config_file(tmp_path).read_text())["clients"]}
    assert {name: e["models"] for name, e in clients.items()} == {
        "carol": ["qwen3-*"], "dave": ["qwen3-*", "llama-*", "demo-model"], "erin": ["qwen3-*"]}
    assert clients["erin"]["rpm"] == 60 and clients["erin"]["max_streams"] == 4


def test_keys_add_refuses_a_taken_or_invalid_name_and_bad_limits(tmp_path):
    assert run_cli(tmp_path, "keys", "add", "alice").returncode == 0
    before = config_file(tmp_path).read_text()
    for args, needle in [(("alice",), "a client named 'alice' exists already"),
                         # worded for the command typed, not as the config file's clients[1]
                         (("bob smith",), "invalid client name 'bob smith': expected a name of letters, digits"),
                         (("bob", "--rpm", "0"), "--rpm 0: expected a whole number > 0"),
                         (("bob", "--max-streams", "-2"), "--max-streams -2: expected a whole number > 0"),
                         (("bob", "--models", ""), "--models '': expected a non-empty list")]:
        out = run_cli(tmp_path, "keys", "add", *args)
        assert out.returncode == 2 and needle in out.stderr and out.stdout == "", (args, out.stderr)
        assert "clients[" not in out.stderr, out.stderr
    assert config_file(tmp_path).read_text() == before  # nothing written, no key printed
    # with gateway_api_key set, "default" is its client
    out = run_cli(tmp_path, "keys", "add", "default", RESP2CHAT_GATEWAY_API_KEY="gw-key-123456")
    assert out.returncode == 2 and "client of gateway_api_key" in out.stderr


def test_keys_list_shows_names_limits_and_fingerprints_never_keys(tmp_path):
    alice = run_cli(tmp_path, "keys", "add", "alice", "--rpm", "60", "--models", "qwen3-*").stdout.strip()
    bob = run_cli(tmp_path, "keys", "add", "bob", "--tpm", "1500000", "--max-streams", "2",
                  "--max-sockets", "4").stdout.strip()
    ids = {e["name"]: e["id"] for e in yaml.safe_load(config_file(tmp_path).read_text())["clients"]}
    out = run_cli(tmp_path, "keys", "list", RESP2CHAT_GATEWAY_API_KEY="gw-key-123456")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[:4]]
    assert rows == [["NAME", "KEY", "ID", "MODELS", "RPM", "TPM", "MAX", "STREAMS", "MAX", "SOCKETS"],
                    ["alice", sha(alice)[:8], ids["alice"][:8], "qwen3-*", "60", "-", "-", "-"],
                    ["bob", sha(bob)[:8], ids["bob"][:8], "*", "-", "1,500,000", "2", "4"],
                    ["default", sha("gw-key-123456")[:8], "-", "*", "-", "-", "-", "-"]]
    assert "default: the client of gateway_api_key" in out.stdout
    # a rotated key keeps its identity, a name revoked and added again has a new one
    rotated = run_cli(tmp_path, "keys", "rotate", "alice").stdout.strip()
    assert run_cli(tmp_path, "keys", "revoke", "bob").returncode == 0
    run_cli(tmp_path, "keys", "add", "bob")
    rows = {line.split()[0]: line.split() for line in run_cli(tmp_path, "keys", "list").stdout.splitlines()[1:3]}
    assert rows["alice"][1:3] == [sha(rotated)[:8], ids["alice"][:8]]
    assert rows["bob"][2] not in (ids["bob"][:8], "-")
    for secret in (alice, bob, sha(alice), sha(bob), "gw-key-123456"):
        assert secret not in out.stdout + out.stderr
    (tmp_path / "other").mkdir()
    empty = run_cli(tmp_path / "other", "keys", "list")
    assert empty.returncode == 0 and empty.stdout == "" and "no clients" in empty.stderr


def test_keys_revoke_removes_the_client(tmp_path):
    keys = {name: run_cli(tmp_path, "keys", "add", name).stdout.strip() for name in ("alice", "bob", "carol")}
    out = run_cli(tmp_path, "keys", "revoke", "bob")
    assert out.returncode == 0 and f"revoked client 'bob' (key fingerprint {sha(keys['bob'])[:8]})" in out.stdout
    saved = yaml.safe_load(config_file(tmp_path).read_text())["clients"]
    assert [c["name"] for c in saved] == ["alice", "carol"] and sha(keys["bob"]) not in config_file(tmp_path).read_text()
    assert stat.S_IMODE(config_file(tmp_path).stat().st_mode) == 0o600
    again = run_cli(tmp_path, "keys", "revoke", "bob")
    assert again.returncode == 2 and "no client named 'bob'" in again.stderr
    assert run_cli(tmp_path, "keys", "add", "bob").returncode == 0  # the name is free again
    for name in ("alice", "carol", "bob"):
        assert run_cli(tmp_path, "keys", "revoke", name).returncode == 0
    assert "clients" not in (yaml.safe_load(config_file(tmp_path).read_text()) or {})


def test_keys_rotate_gives_a_client_a_new_key_and_keeps_the_rest(tmp_path):
    """``keys rotate``: a new key, printed once (stdout: the key alone); the entry keeps its id
    (what it stored stays its own), models and limits; a plain ``key`` written by hand becomes
    ``key_sha256``; an unknown name is refused."""
    old = run_cli(tmp_path, "keys", "add", "alice", "--rpm", "60", "--models", "qwen3-*").stdout.strip()
    run_cli(tmp_path, "keys", "add", "bob")
    before = yaml.safe_load(config_file(tmp_path).read_text())["clients"]
    out = run_cli(tmp_path, "keys", "rotate", "alice")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert out.stdout == key + "\n" and re.fullmatch(r"r2c-[A-Za-z0-9_-]{43}", key) and key != old
    assert "shown only this once" in out.stderr and key not in out.stderr
    after = yaml.safe_load(config_file(tmp_path).read_text())["clients"]
    assert after[0] == {**before[0], "key_sha256": sha(key)} and after[1] == before[1]
    assert old not in config_file(tmp_path).read_text() and sha(old) not in config_file(tmp_path).read_text()
    assert stat.S_IMODE(config_file(tmp_path).stat().st_mode) == 0o600
    missing = run_cli(tmp_path, "keys", "rotate", "carol")
    assert missing.returncode == 2 and "no client named 'carol'" in missing.stderr
    # an entry written by hand, with its plain key and no id: it gets a digest, and still no id
    write_file(config_file(tmp_path), {"clients": [{"name": "dave", "key": ALICE_KEY}]})
    out = run_cli(tmp_path, "keys", "rotate", "dave")
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(config_file(tmp_path).read_text())["clients"] == [
        {"name": "dave", "key_sha256": sha(out.stdout.strip())}]
    assert ALICE_KEY not in config_file(tmp_path).read_text()


def test_keys_added_at_once_are_all_kept(tmp_path):
    procs = [subprocess.Popen([str(RESP2CHAT), "keys", "add", f"dev{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=cli_env(tmp_path), cwd=tmp_path) for i in range(6)]
    keys = {f"dev{i}": p.communicate(timeout=60)[0].strip() for i, p in enumerate(procs)}
    assert all(p.returncode == 0 for p in procs)
    saved = yaml.safe_load(config_file(tmp_path).read_text())["clients"]
    assert {c["name"]: c["key_sha256"] for c in saved} == {name: sha(key) for name, key in keys.items()}


def test_a_gateway_starts_with_clients_from_keys_add(tmp_path, upstream):
    key = run_cli(tmp_path, "keys", "add", "alice", "--rpm", "10").stdout.strip()
    gw = start_gateway(upstream.origin, tmp_path, env=cli_env(tmp_path))
    try:
        client = openai_client(gw, api_key=key)
        assert client.responses.create(model="demo-model", input="hello").output_text == "You said: hello"
    finally:
        gw.stop()
    assert key not in gw.log()



def test_a_clients_limit_in_the_file_is_what_its_text_says(tmp_path, upstream):
    """``rpm: 017`` in a ``clients`` entry of the config file was YAML's octal 15: the client got
    15 requests a minute, ``max_streams: 010`` 8 (and ``name: 1.10`` stopped the gateway, a number). They mean their
    text, as at the file's top level and in ``RESP2CHAT_CLIENTS``: 17 requests, the name "1.10"."""
    path = config_file(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"clients:\n  - name: 1.10\n    key: {ALICE_KEY}\n    rpm: 017\n    max_streams: 010\n")
    gw = start_gateway(upstream.origin, tmp_path, env=cli_env(tmp_path))
    try:
        answer = openai_client(gw, api_key=ALICE_KEY).responses.with_raw_response.create(model="demo-model", input="hi")
        assert answer.headers["x-ratelimit-limit-requests"] == "17", dict(answer.headers)
        assert answer.parse().output_text == "You said: hi"
    finally:
        gw.stop()
    listed = run_cli(tmp_path, "keys", "list")
    rows = [line.split() for line in listed.stdout.splitlines() if line.startswith("1.10 ")]
    assert listed.returncode == 0 and len(rows) == 1, listed.stdout + listed.stderr
    assert rows[0][4:] == ["17", "-", "10", "-"], rows  # RPM, TPM, MAX STREAMS, MAX SOCKETS
    # `keys add`, rewriting the file, keeps what it meant: the name a string, the limits numbers
    assert run_cli(tmp_path, "keys", "add", "bob").returncode == 0
    first = yaml.safe_load(path.read_text())["clients"][0]
    assert (first["name"], first["rpm"], first["max_streams"]) == ("1.10", 17, 10), path.read_text()


def test_keys_add_keeps_an_upstreams_numbers_and_switches_as_written(tmp_path):
    """``keys add`` rewrites the whole file: an ``upstreams`` entry's whole-number and true/false
    settings came back as quoted text (``connect_timeout_secs: '5'``: still read right, but no
    longer what the operator wrote). They stay numbers and switches, as the text says (017 is 17),
    and a string setting that looks like a number stays the string its text is."""
    path = config_file(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("upstreams:\n  - name: a\n    base_url: http://127.0.0.1:9/v1\n    models: ['*']\n"
                    "    connect_timeout_secs: 017\n    keepalive_secs: 0\n    flatten_content: no\n"
                    "    upstream_model: 1.10\n")
    added = run_cli(tmp_path, "keys", "add", "bob")
    assert added.returncode == 0, added.stderr
    entry = yaml.safe_load(path.read_text())["upstreams"][0]
    assert {k: entry[k] for k in ("connect_timeout_secs", "keepalive_secs", "flatten_content", "upstream_model")} == {
        "connect_timeout_secs": 17, "keepalive_secs": 0, "flatten_content": False, "upstream_model": "1.10"}, path.read_text()
    assert run_cli(tmp_path, "keys", "list").returncode == 0  # (the rewritten file still reads)


def test_a_client_with_the_longest_name_and_no_id_is_served(tmp_path, upstream):
    """An entry written by hand (no id: its name owns its state) may have a 64-character name:
    its owner, ``client.`` + the name, was too long, and every request of it failed (a 500)."""
    name = "n" * 64
    clients = json.dumps([{"name": name, "key": ALICE_KEY, "rpm": 5}])
    gw = start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_clients={clients}", env=cli_env(tmp_path))
    try:
        client = openai_client(gw, api_key=ALICE_KEY)
        answer = client.responses.create(model="demo-model", input="hello")
        assert answer.output_text == "You said: hello"
        assert client.responses.retrieve(answer.id).id == answer.id  # (stored under its owner, and found)
    finally:
        gw.stop()

# --- resp2chat usage -------------------------------------------------------------------------------


def test_usage_reads_a_real_access_log(tmp_path, upstream):
    log = tmp_path / "access.jsonl"
    gw = start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_access_log_path={log}",
                       "--set", "resp2chat_max_replay_entries=0")
    try:
        client = openai_client(gw, api_key="unused")
        usages = [client.responses.create(model="demo-model", input=f"words: {n}").usage for n in (3, 30)]
        with client.responses.stream(model="other-model", input="hello") as stream:
            for _ in stream:
                pass
            usages.append(stream.get_final_response().usage)
        with pytest.raises(openai.BadRequestError):
            client.responses.create(model="demo-model", input="error: 400 nope")
        refused = requests.post(gw.base_url + "/embeddings", data=b"{}", timeout=10,  # (a refused passthrough:
                                headers={"content-type": "application/json", "content-encoding": "lzw"})  # no turn)
        assert refused.status_code == 415
        wait_until(lambda: log.exists() and len(log.read_text().splitlines()) == 5, what="five access-log lines")
        assert json.loads(log.read_text().splitlines()[-1])["path"] == "/v1/embeddings"
    finally:
        gw.stop()
    with log.open("a") as fh:  # what a crash mid-write leaves, and something else's output
        fh.write('[12:00:01] mitmdump says hello\n{"time": "2026-01-01T00:00:00.000Z", "request_id": "req_x", "mo')
    out = run_cli(tmp_path, "usage", str(log), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    day = json.loads(log.read_text().splitlines()[0])["time"][:10]
    demo = [u for u in usages[:2]]
    assert report["skipped_lines"] == 2
    assert report["rows"] == [
        {"client": "-", "day": day, "model": "demo-model", "turns": 3,  # the refused turn counts, without tokens
         "prompt_tokens": sum(u.input_tokens for u in demo),
         "cached_tokens": sum(u.input_tokens_details.cached_tokens for u in demo),
         "output_tokens": sum(u.output_tokens for u in demo)},
        {"client": "-", "day": day, "model": "other-model", "turns": 1, "prompt_tokens": usages[2].input_tokens,
         "cached_tokens": usages[2].input_tokens_details.cached_tokens, "output_tokens": usages[2].output_tokens}]
    assert report["total"]["turns"] == 4 and report["total"]["output_tokens"] == sum(u.output_tokens for u in usages)
    table = run_cli(tmp_path, "usage", str(log))
    assert table.returncode == 0 and "skipped 2 lines that are not access-log records" in table.stderr
    assert [line.split()[:4] for line in table.stdout.splitlines()] == [
        ["CLIENT", "DAY", "MODEL", "TURNS"], ["-", day, "demo-model", "3"], ["-", day, "other-model", "1"],
        ["-", "total", "4", f"{report['total']['prompt_tokens']:,}"]]


def _line(client: str | None, day: str, model: str, prompt: int | None, cached: int | None, output: int | None) -> str:
    line = {"time": f"{day}T10:00:00.000Z", "request_id": "req_0", "session": None, "model": model, "upstream": "default",
            "status": "completed", "code": None, "http_status": 200, "input_tokens": prompt, "cached_tokens": cached,
            "output_tokens": output, "ttft_ms": 5.0, "total_ms": 9.0}
    if client is not None:
        line["client"] = client
    return json.dumps(line)


def test_usage_per_client_day_and_model_with_totals(tmp_path):
    logs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    logs[0].write_text("\n".join([
        _line("alice", "2026-03-01", "qwen3-coder", 120_000, 100_000, 2_000),
        _line("alice", "2026-03-01", "qwen3-coder", 130_000, 120_000, 3_000),
        _line("bob", "2026-03-01", "qwen3-coder", 5_000, 0, 700),
        _line("alice", "2026-03-02", "qwen3-coder", 1_000_000, 900_000, 10_000),
        "not json at all",
    ]) + "\n")
    logs[1].write_text("\n".join([
        _line("alice", "2026-03-02", "llama-70b", 40, None, 1),
        _line("bob", "2026-03-03", "qwen3-coder", None, None, None),  # refused: a turn, no tokens
        _line(None, "2026-03-03", "qwen3-coder", 10, 0, 2),  # before clients existed
        '{"time": "2026-03-03T00:00:00Z", "request_id": "r", "input_tokens": "many"}',  # not ours
        '["a", "list"]',
    ]) + "\n")
    out = run_cli(tmp_path, "usage", *map(str, logs))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "CLIENT       DAY         MODEL        TURNS  PROMPT TOKENS     CACHED  OUTPUT TOKENS",
        "-            2026-03-03  qwen3-coder      1             10          0              2",
        "-            total                        1             10          0              2",
        "",
        "alice        2026-03-01  qwen3-coder      2        250,000    220,000          5,000",
        "alice        2026-03-02  llama-70b        1             40          0              1",
        "alice        2026-03-02  qwen3-coder      1      1,000,000    900,000         10,000",
        "alice        total                        4      1,250,040  1,120,000         15,001",
        "",
        "bob          2026-03-01  qwen3-coder      1          5,000          0            700",
        "bob          2026-03-03  qwen3-coder      1              0          0              0",
        "bob          total                        2          5,000          0            700",
        "",
        "all clients  total                        7      1,255,050  1,120,000         15,703",
    ]
    assert "skipped 3 lines" in out.stderr
    since = json.loads(run_cli(tmp_path, "usage", *map(str, logs), "--since", "2026-03-02", "--json").stdout)
    assert [(r["client"], r["day"], r["model"], r["turns"]) for r in since["rows"]] == [
        ("-", "2026-03-03", "qwen3-coder", 1), ("alice", "2026-03-02", "llama-70b", 1),
        ("alice", "2026-03-02", "qwen3-coder", 1), ("bob", "2026-03-03", "qwen3-coder", 1)]
    assert since["clients"]["alice"] == {"turns": 2, "prompt_tokens": 1_000_040, "cached_tokens": 900_000,
                                         "output_tokens": 10_001}
    assert since["total"]["turns"] == 4 and since["skipped_lines"] == 3
    bad = run_cli(tmp_path, "usage", str(logs[0]), "--since", "2026-3-2")
    assert bad.returncode == 2 and "expected a day as YYYY-MM-DD" in bad.stderr


def test_usage_table_columns_line_up(tmp_path):
    log = tmp_path / "a.jsonl"
    log.write_text("\n".join([_line("alice", "2026-03-01", "qwen3-coder", 1_234_567, 1_000_000, 89_012),
                              _line("bob-the-builder", "2026-03-01", "m", 5, 0, 1)]) + "\n")
    lines = run_cli(tmp_path, "usage", str(log)).stdout.splitlines()
    header = lines[0]
    for line in filter(None, lines[1:]):
        # numbers end where their column's header ends; names start where theirs starts
        for title in ("TURNS", "PROMPT TOKENS", "CACHED", "OUTPUT TOKENS"):
            end = header.index(title) + len(title)
            assert line[end - 1].isdigit() and (end == len(line) or line[end] == " "), (title, line)
        day = header.index("DAY")
        assert line[day - 2:day] == "  " and line[day] != " "
    assert "alice            2026-03-01  qwen3-coder      1      1,234,567  1,000,000         89,012" in lines


def test_usage_reads_the_configured_access_log_and_refuses_none_or_stderr(tmp_path):
    log = tmp_path / "configured.jsonl"
    log.write_text(_line("alice", "2026-03-01", "m", 1, 0, 1) + "\n")
    out = run_cli(tmp_path, "usage", "--json", RESP2CHAT_ACCESS_LOG_PATH=str(log))
    assert out.returncode == 0 and json.loads(out.stdout)["files"] == [str(log)]
    unset = run_cli(tmp_path, "usage")
    assert unset.returncode == 2 and "no access log: name the files, or set access_log_path" in unset.stderr
    stderr = run_cli(tmp_path, "usage", RESP2CHAT_ACCESS_LOG_PATH="-")
    assert stderr.returncode == 2 and "access_log_path is '-'" in stderr.stderr
    # the journal's commands that read it: deploy/'s units (resp2chat@PORT), README's user unit
    assert "journalctl -u 'resp2chat@*' -o cat | resp2chat usage -" in stderr.stderr
    assert "journalctl --user -u resp2chat -o cat | resp2chat usage -" in stderr.stderr
    missing = run_cli(tmp_path, "usage", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    piped = subprocess.run([str(RESP2CHAT), "usage", "-", "--json"], input=log.read_text(), capture_output=True,
                           text=True, env=cli_env(tmp_path), timeout=60)
    assert json.loads(piped.stdout)["clients"]["alice"]["turns"] == 1


# --- print-config with a client key ------------------------------------------------------------


def test_print_config_names_the_variable_holding_the_key(tmp_path):
    def config(*args, **env):
        out = run_cli(tmp_path, "print-config", "--offline", *args, **env)
        assert out.returncode == 0, out.stderr
        return tomllib.loads(out.stdout), out
    cfg, _ = config()
    assert "env_key" not in cfg["model_providers"]["resp2chat"]  # a gateway without keys
    cfg, _ = config(RESP2CHAT_GATEWAY_API_KEY="gw-key-123456")  # one person: the variable the gateway reads too
    assert cfg["model_providers"]["resp2chat"]["env_key"] == "RESP2CHAT_GATEWAY_API_KEY"
    clients = json.dumps([{"name": "alice", "key_sha256": sha(ALICE_KEY)}])
    cfg, _ = config(RESP2CHAT_CLIENTS=clients)  # a team: each developer's own key
    assert cfg["model_providers"]["resp2chat"]["env_key"] == "RESP2CHAT_API_KEY"
    cfg, _ = config("--key-env", "TEAM_LLM_KEY", "--base-url", "https://llm.example.com/v1/")
    provider = cfg["model_providers"]["resp2chat"]
    assert provider["env_key"] == "TEAM_LLM_KEY" and provider["base_url"] == "https://llm.example.com/v1"
    cfg, out = config("--builtin", "--key-env", "TEAM_LLM_KEY", "--base-url", "https://llm.example.com/v1")
    assert cfg["openai_base_url"] == "https://llm.example.com/v1"
    assert "#   printenv TEAM_LLM_KEY | codex login --with-api-key" in out.stdout
    assert "printenv TEAM_LLM_KEY | codex login --with-api-key" in out.stderr
    _, out = config("--builtin")  # no key needed, but interactive codex wants one stored
    assert "#   echo unused | codex login --with-api-key" in out.stdout
    for bad, needle in ((("--key-env", "MY-KEY"), "not an environment variable name"),
                        (("--base-url", "llm.example.com"), "expected an http:// or https:// URL")):
        out = run_cli(tmp_path, "print-config", "--offline", *bad)
        assert out.returncode == 2 and needle in out.stderr


@pytest.mark.codex
def test_codex_custom_provider_reads_the_key_from_the_named_variable(tmp_path, upstream, codex_bin):
    key = "r2c-the-developers-key-0123456789"
    gw = start_gateway(upstream.origin, tmp_path, env=cli_env(tmp_path, RESP2CHAT_GATEWAY_API_KEY=key))
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    try:
        (home / "config.toml").write_text(run_cli(tmp_path, "print-config", "--offline", "--key-env", "TEAM_LLM_KEY",
                                                  "--base-url", gw.base_url).stdout)
        cx = Codex(codex_bin, home, work)
        refused = cx.exec("without the key")
        cx.env["TEAM_LLM_KEY"] = key
        run = cx.exec("with the key")
    finally:
        gw.stop()
    assert refused.returncode != 0 and "TEAM_LLM_KEY" in refused.output  # Codex names the missing variable
    assert run.returncode == 0 and "You said: with the key" in run.stdout, run.output


@pytest.mark.codex
def test_codex_builtin_provider_with_the_printed_login_line(tmp_path, upstream, codex_bin):
    """What print-config --builtin prints is what Codex 0.169 needs: `codex exec` sends the key
    stored by the printed `codex login` line, and takes CODEX_API_KEY, but never OPENAI_API_KEY."""
    key = "r2c-the-developers-key-0123456789"
    gw = start_gateway(upstream.origin, tmp_path, env=cli_env(tmp_path, RESP2CHAT_GATEWAY_API_KEY=key))
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    try:
        out = run_cli(tmp_path, "print-config", "--offline", "--builtin", "--key-env", "TEAM_LLM_KEY",
                      "--base-url", gw.base_url)
        (home / "config.toml").write_text(out.stdout)
        cx = Codex(codex_bin, home, work)
        cx.env["OPENAI_API_KEY"] = key
        assert "401" in cx.exec("openai key in the environment").output
        del cx.env["OPENAI_API_KEY"]
        cx.env["CODEX_API_KEY"] = key
        assert "You said: codex key" in cx.exec("codex key").stdout
        del cx.env["CODEX_API_KEY"]
        login = re.search(r"^#   (printenv .*)$", out.stdout, re.M).group(1)
        env = {k: v for k, v in cli_env(tmp_path).items() if not k.startswith(("CODEX_", "OPENAI_"))}
        stored = subprocess.run(["bash", "-c", login.replace("codex login", f"{codex_bin} login")], text=True,
                                capture_output=True, timeout=60, env={**env, "CODEX_HOME": str(home), "TEAM_LLM_KEY": key})
        assert stored.returncode == 0, stored.stderr
        assert stat.S_IMODE((home / "auth.json").stat().st_mode) == 0o600
        run = cx.exec("stored login")
    finally:
        gw.stop()
    assert run.returncode == 0 and "You said: stored login" in run.stdout, run.output


class Tmux:
    """The interactive Codex TUI in a real terminal (tmux, a server of its own), read off the
    screen. Codex's app-server daemon outlives the TUI: ``close`` ends every process whose
    command line names this test's CODEX_HOME."""

    def __init__(self, tmp_path: Path, codex_home: Path) -> None:
        self.socket = f"resp2chat-test-{os.getpid()}-{tmp_path.name}"
        self.home = codex_home

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=30).stdout

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path) -> None:
        line = shlex.join(["env", "-i", *(f"{k}={v}" for k, v in env.items()), *cmd])
        self.tmux("new-session", "-d", "-s", name, "-x", "160", "-y", "50", "-c", str(cwd), line)
        self.tmux("set-option", "-t", name, "remain-on-exit", "on")

    def screen(self, name: str) -> str:
        return self.tmux("capture-pane", "-p", "-t", name)

    def wait_for(self, name: str, *texts: str, timeout: float = 90) -> str:
        """The screen once it shows one of ``texts``."""
        try:
            return wait_until(lambda: (s := self.screen(name)) and any(t in s for t in texts) and s, timeout,
                              f"one of {texts} on the screen")
        except TimeoutError:
            raise AssertionError(f"none of {texts} on the screen:\n{self.screen(name)}") from None

    def started(self) -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if str(self.home).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
        return found

    def close(self) -> None:
        self.tmux("kill-server")
        for sig in (15, 9):
            for pid in self.started():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            try:
                wait_until(lambda: not self.started(), 10, "Codex's processes to end")
                return
            except TimeoutError:
                continue


@pytest.mark.codex
def test_interactive_codex_on_the_builtin_provider_needs_the_stored_key(tmp_path, upstream, codex_bin):
    """Interactive `codex` (0.169) on the built-in provider opens OpenAI's sign-in screen unless
    a key is stored, CODEX_API_KEY or not. After the printed `codex login` line it talks to the
    gateway with the stored key, once no app-server daemon of that CODEX_HOME started before the
    login is left (it keeps the sign-in state it started with)."""
    if not shutil.which("tmux"):
        pytest.fail("this test drives the Codex TUI in tmux: install tmux")
    key = "r2c-the-developers-key-0123456789"
    gw = start_gateway(upstream.origin, tmp_path, env=cli_env(tmp_path, RESP2CHAT_GATEWAY_API_KEY=key))
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    term = Tmux(tmp_path, home)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TERM": "xterm-256color", "CODEX_HOME": str(home),
           "TEAM_LLM_KEY": key}
    signin = "Sign in with ChatGPT"
    try:
        out = run_cli(tmp_path, "print-config", "--offline", "--builtin", "--key-env", "TEAM_LLM_KEY", "--base-url", gw.base_url)
        (home / "config.toml").write_text(out.stdout)
        term.start("env-key-only", [codex_bin, "hello from the environment"], {**env, "CODEX_API_KEY": key}, work)
        assert signin in term.wait_for("env-key-only", signin, "You said:")
        term.tmux("kill-session", "-t", "env-key-only")  # the user quits that screen and logs in
        login = re.search(r"^#   (printenv .*)$", out.stdout, re.M).group(1).replace("codex login", f"{codex_bin} login")
        assert subprocess.run(["bash", "-c", login], env=env, capture_output=True, timeout=60).returncode == 0
        term.start("stale", [codex_bin, "hello again"], env, work)  # the daemon of the first run still answers
        assert signin in term.wait_for("stale", signin, "You said:")
        term.tmux("kill-session", "-t", "stale")
        stop = subprocess.run([codex_bin, "app-server", "daemon", "stop"], env=env, capture_output=True, text=True,
                              timeout=60)
        assert stop.returncode == 0, stop.stderr
        term.start("stored", [codex_bin, "hello interactive"], env, work)
        screen = term.wait_for("stored", "You said: hello interactive", signin)
    finally:
        term.close()
        gw.stop()
    assert "You said: hello interactive" in screen, screen


@pytest.mark.skipif(os.geteuid() != 0, reason="gives the file another owner and group: needs root")
def test_keys_keep_a_service_config_files_owner_group_and_group_read(tmp_path):
    """deploy/: /etc/resp2chat/config.yaml is ``root:resp2chat`` 0640, read by the gateway's
    user. ``keys add`` run by root wrote it again 0600 ``root:root`` in a 0700 directory: the
    gateway's user could no longer read it (its reload warned, its restart failed). Now a file
    that exists keeps its owner, its group and its group's read (never others'), its directory
    the group's ``r-x``; a user who could not keep them is refused and the file is left as it was."""
    etc = Path(tempfile.mkdtemp(dir="/tmp"))  # (a real path "nobody" can walk: pytest's tmp is 0700)
    try:
        os.chmod(etc, 0o755)
        conf = etc / "resp2chat" / "config.yaml"
        env = {"RESP2CHAT_CONFIG": str(conf)}
        assert run_cli(tmp_path, "keys", "add", "alice", **env).returncode == 0
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600 and stat.S_IMODE(conf.parent.stat().st_mode) == 0o700
        os.chown(conf.parent, 0, 65534)  # as an operator sets it up for the service's group (nogroup here)
        os.chown(conf, 65534, 65534)
        os.chmod(conf, 0o644)  # (too open: others' read goes)
        os.chmod(conf.parent, 0o755)
        out = run_cli(tmp_path, "keys", "add", "bob", **env)
        assert out.returncode == 0, out.stderr
        st = conf.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o640)
        assert stat.S_IMODE(conf.parent.stat().st_mode) == 0o750
        read = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(conf)],
                              capture_output=True, text=True, timeout=10)
        assert read.returncode == 0 and "name: bob" in read.stdout, read.stderr  # the service's user reads it

        os.chown(conf, 0, 65534)  # root's file, in a directory another user may write to
        os.chmod(conf.parent, 0o770)
        before = conf.read_bytes()
        child = os.fork()
        if child == 0:  # (a user who is neither its owner nor root)
            code = 1
            try:
                os.setegid(65534)
                os.seteuid(65534)
                write_file(conf, {"bind_addr": "127.0.0.1:1"})
            except PermissionError as exc:
                code = 0 if "run this as its owner or as root" in str(exc) else 2
            finally:
                os._exit(code)
        assert os.waitpid(child, 0)[1] == 0
        assert conf.read_bytes() == before and conf.stat().st_uid == 0
        assert [p.name for p in conf.parent.iterdir()] == ["config.yaml"]  # (no temporary file left)
    finally:
        shutil.rmtree(etc)
