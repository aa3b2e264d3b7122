"""The config file: where it lives, reading it, writing it safely, telling that it changed."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import yaml

from resp2chat_core.clients import FIELDS as CLIENT_FIELDS, LIMITS, whole
from resp2chat_core.settings import ALIASES, BY_NAME, FIELDS, PER_UPSTREAM, SettingsError, coerce_bool, resolve


def config_path(env: Mapping[str, str] = os.environ) -> Path:
    """``$RESP2CHAT_CONFIG``, else ``$XDG_CONFIG_HOME/resp2chat/config.yaml`` (~/.config by default)."""
    if env.get("RESP2CHAT_CONFIG"):
        return Path(env["RESP2CHAT_CONFIG"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", Path.home())) / ".config")
    return Path(base).expanduser() / "resp2chat" / "config.yaml"


def read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:  # a directory, not this user's to read, not UTF-8
        why = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror or type(exc).__name__
        raise SettingsError("config file", str(path), f"cannot be read: {why}") from None
    try:
        data, node = _load(text)
    except yaml.YAMLError as exc:
        raise SettingsError("config file", str(path), f"not valid YAML: {yaml_problem(exc)}") from None
    except Exception as exc:  # noqa: BLE001 — a value its tag does not fit (`!!int abc`, `!!bool x`): PyYAML
        # raises a plain ValueError, KeyError… whose words quote the value, a key maybe; or nested too deep
        raise SettingsError("config file", str(path), f"not valid YAML: a value it cannot read ({type(exc).__name__}: "
                            "a tag its value does not fit, such as !!int abc?)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError("config file", str(path), "expected a mapping of setting: value")
    return _as_written(data, node)


def _load(text: str) -> tuple[Any, yaml.Node | None]:
    """``yaml.safe_load``, with the node tree it was made of (what the text says, as written)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    finally:
        loader.dispose()


_STR, _NULL = "tag:yaml.org,2002:str", "tag:yaml.org,2002:null"
# Settings of one scalar (a string, a whole number, true/false), old names too: read from the text
# as written, as the environment and --set give it. YAML's own reading of an unquoted scalar made
# another setting of some: `upstream_model: 1.10` was "1.1", `seal_key: 01234567` the octal number
# 342391, `max_sessions: 017` 15 (the environment's 017 is 17), `1:30` the number 90.
_SCALARS = frozenset(name for name, f in {**BY_NAME, **ALIASES}.items() if f.kind in ("str", "int", "bool"))
# The same inside an entry of a list of entries, as its environment variable's JSON strings: in
# one of ``upstreams``, the settings of one scalar it may set for itself, and its own name,
# api_key, base_url and models (one pattern); in one of ``clients``, every field (models: one
# pattern), its limits the whole numbers their text says (``rpm: 017`` was the octal 15); an
# upstream's whole-number and true/false settings too (both: ``_typed``): so ``resp2chat keys``,
# rewriting the file, writes them as numbers.
_ENTRY_SCALARS = {
    "upstreams": frozenset(name for name in PER_UPSTREAM if name in _SCALARS) | {"name", "base_url", "api_key", "models"},
    "clients": frozenset(CLIENT_FIELDS),
}


def _as_written(data: dict, node: yaml.Node) -> dict:
    """``data`` with each scalar setting as its text says it (``_SCALARS``; in an entry of
    ``upstreams`` or ``clients``, ``_ENTRY_SCALARS``); a setting given twice is an error (YAML
    keeps the last value without a word)."""
    seen: set[str] = set()
    for key, value in node.value:
        if not (isinstance(key, yaml.ScalarNode) and key.tag == _STR):
            continue
        if key.value in seen:
            raise SettingsError(key.value, "[hidden]", "given twice in the config file (which one was meant?)",
                                "config file")
        seen.add(key.value)
        if key.value in _SCALARS and key.value in data:
            _text(data, key.value, value)
        elif key.value in _ENTRY_SCALARS and isinstance(value, yaml.SequenceNode) \
                and isinstance(data.get(key.value), list) and len(value.value) == len(data[key.value]):
            scalars = _ENTRY_SCALARS[key.value]
            for entry, item in zip(data[key.value], value.value):
                if isinstance(entry, dict) and isinstance(item, yaml.MappingNode):
                    for k, v in item.value:  # (in order: a key given twice is YAML's last, as in `entry`)
                        if isinstance(k, yaml.ScalarNode) and k.tag == _STR and k.value in scalars:
                            _text(entry, k.value, v)
                            if key.value == "clients" and k.value in LIMITS:
                                entry[k.value] = _typed("int", entry[k.value])
                            elif key.value == "upstreams" and k.value in PER_UPSTREAM:
                                entry[k.value] = _typed(BY_NAME[k.value].kind, entry[k.value])
    return data


def _typed(kind: str, value: Any) -> Any:
    """An entry's field of ``kind`` (a client's limits: "int"; an upstream's own settings: theirs)
    read from its text as a setting of that kind reads it: a whole number as ``clients.whole``
    reads it (``017`` is 17, as settings.py ``coerce`` and ``RESP2CHAT_CLIENTS``' strings read
    it), true/false as ``coerce_bool`` reads it for ``coerce`` (``no`` is false). So ``resp2chat
    keys``, rewriting the file, writes the number or the switch, not the quoted text. Text that says none stays as it is: the
    entry's own check refuses it, in its words (``parse_upstreams``: "expected a whole number >= 0";
    ``parse_clients``: "expected a whole number > 0…")."""
    if not isinstance(value, str):
        return value
    if kind == "int":
        return whole(value)
    if kind == "bool" and (switch := coerce_bool(value)) is not None:
        return switch
    return value


def _text(data: dict, key: str, node: yaml.Node) -> None:
    """``data[key]`` as its text says, when ``node`` is a plain scalar YAML read as no string (a
    number, a date, true/false): not quoted, not null."""
    if isinstance(node, yaml.ScalarNode) and node.style is None and node.tag not in (_STR, _NULL):
        data[key] = node.value


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What PyYAML found wrong and where (line, column), without the line itself, which its own
    message quotes: a config file's lines hold keys (upstream_api_key, a client's key…)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return type(exc).__name__
    mark = exc.problem_mark or exc.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return _QUOTED.sub(_unquoted, "; ".join(p for p in (exc.context, exc.problem) if p)) + where


# What PyYAML's words quote of the file (a tag: ``key: !sk-…``, an alias: ``*sk-…``, a character)
# is shown only when it cannot be part of a key: one of its token names (``'<block end>'``) or a
# character or two (``'\t'``); anything longer is '…'.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _unquoted(found: re.Match) -> str:
    inner = found[0][1:-1]
    return found[0] if len(inner) <= 2 or re.fullmatch(r"<[a-z ]+>", inner) else "'…'"


class Loaded(NamedTuple):
    """``load_settings``: the resolved settings (defaults < file < env), where each came from, the
    file's path, and what the file itself says (``read_file``: ``settings.shadowed`` compares it
    with the environment)."""

    values: dict
    sources: dict
    path: Path
    file_values: dict


def load_settings(env: Mapping[str, str] = os.environ) -> Loaded:
    """Resolved settings (defaults < file < env), where each came from, the file's path and its values."""
    path = config_path(env)
    file_values = read_file(path)
    values, sources = resolve(file_values, env)
    return Loaded(values, sources, path, file_values)


def write_file(path: Path, values: Mapping[str, Any]) -> None:
    """Atomic write of a file that may hold API keys. A new one is 0600 in a 0700 directory. One
    that exists keeps its owner and group and, of its mode, at most the read of a group other
    than the writer's own (a service's file: deploy/'s ``root:resp2chat`` 0640, read by the
    gateway's user): ``keys add`` run by root does not lock the gateway out of its own file; its
    directory keeps at most that group's ``r-x`` then, else it is 0700. Nothing is ever left open to others. A group or owner the
    writer cannot keep (not root, not its owner) is an error, not a file the gateway cannot read."""
    try:
        old = path.stat()
    except FileNotFoundError:
        old = None
    me = os.geteuid()
    if old is not None and me != 0 and old.st_uid != me:
        raise PermissionError(f"{path} belongs to uid {old.st_uid}: run this as its owner or as root, so that it "
                              "keeps its owner (the gateway may read it as them)")
    # the group's read is kept where a group was given on purpose (not the writer's own: a file
    # made with the usual umask, 0644 in the writer's group, becomes 0600 as a new one is)
    mode = 0o600 | (stat.S_IMODE(old.st_mode) & 0o040 if old is not None and old.st_gid != os.getegid() else 0)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = stat.S_IMODE(path.parent.stat().st_mode)
    if now != (want := 0o700 | (now & 0o050 if mode & 0o040 else 0)):
        os.chmod(path.parent, want)
    ordered = {f.name: values[f.name] for f in FIELDS if f.name in values}
    text = "# resp2chat configuration (see README: Configuration)\n" + yaml.safe_dump(
        ordered, sort_keys=False, allow_unicode=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".yaml", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if old is not None and (old.st_uid, old.st_gid) != (me, os.getegid()):
            try:
                os.chown(tmp, old.st_uid if me == 0 else -1, old.st_gid)
            except PermissionError:
                raise PermissionError(f"{path} has group {old.st_gid}, which this user cannot give a file: "
                                      "run this as root, or as a member of that group") from None
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def editing(path: Path) -> Iterator[None]:
    """Hold the config file's directory locked (``flock``) while reading, changing and writing the
    file, so two commands editing it at once (``resp2chat keys add`` in a loop of a script, run
    twice) do not lose each other's change. Readers need no lock: ``write_file`` replaces the file
    atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (releases the lock)


Stamp = tuple[int, int, int, int, int]


def file_stamp(path: Path) -> Stamp | None:
    """What ``FileWatch`` compares: the file's device, inode, size, mtime and ctime (ns); ``None``
    when there is no file. One ``stat``, nothing read."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class FileWatch:
    """Tells cheaply whether the config file changed since it was last looked at, so a running
    gateway can pick up a changed ``clients`` list (``resp2chat keys add/revoke``) without a
    restart.

    Contract:

    - ``changed()`` costs one ``stat`` (a few µs): no read, no parse. Call it from a timer (once
      a second keeps a revoked key working for at most about a second), not per request.
    - It returns True once after every write by ``write_file`` (every ``resp2chat`` command
      writes through it): the file is replaced by a new one, a new inode, so even a rewrite of
      the same size within the filesystem's timestamp tick is seen. Also after an edit in place
      (size, mtime or ctime differ), the file's creation, its removal (the stamp becomes
      ``None``: the caller decides what no file means), and a symlinked config whose target was
      swapped (``stat`` follows links: a Kubernetes ConfigMap update is seen).
    - It may return True with the settings unchanged (``touch``, ``chmod``, the same bytes written
      again): the caller re-reads, re-validates and compares, and acts only on a real change. A
      false alarm costs one read.
    - It can miss only an edit in place that keeps the size and lands within the same mtime and
      ctime tick as the previous look (a coarse-timestamp filesystem and two saves in one tick);
      the next change is seen. The first look (construction) sees nothing: it is the baseline.
    - It watches one file on this machine. Replicas on other machines watch their own copy;
      getting the same file to each is the deployment's job.
    """

    __slots__ = ("path", "stamp")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stamp = file_stamp(path)

    def changed(self) -> bool:
        stamp = file_stamp(self.path)
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        return True
