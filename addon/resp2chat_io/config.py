"""The config file: where it lives, reading it, writing it safely."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import yaml

from resp2chat_core.settings import FIELDS, SettingsError, resolve


def config_path(env: Mapping[str, str] = os.environ) -> Path:
    """``$RESP2CHAT_CONFIG``, else ``$XDG_CONFIG_HOME/resp2chat/config.yaml`` (~/.config by default)."""
    if env.get("RESP2CHAT_CONFIG"):
        return Path(env["RESP2CHAT_CONFIG"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", Path.home())) / ".config")
    return Path(base).expanduser() / "resp2chat" / "config.yaml"


def read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError("config file", str(path), f"not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError("config file", str(path), "expected a mapping of setting: value")
    return data


def load_settings(env: Mapping[str, str] = os.environ) -> tuple[dict, dict, Path]:
    """Resolved settings (defaults < file < env), where each came from, and the file's path."""
    path = config_path(env)
    values, sources = resolve(read_file(path), env)
    return values, sources, path


def write_file(path: Path, values: Mapping[str, Any]) -> None:
    """Atomic write, mode 0600 in a 0700 directory: the file may hold API keys."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    ordered = {f.name: values[f.name] for f in FIELDS if f.name in values}
    text = "# resp2chat configuration (see README: Configuration)\n" + yaml.safe_dump(
        ordered, sort_keys=False, allow_unicode=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".yaml", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
