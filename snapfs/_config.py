"""Configuration, resolved once: defaults < .snapfs/config (TOML) < SNAPFS_* environment < flags."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ._errors import UsageError
from ._fsops import LinkMode

_SIZE = r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$"  # compiled (and cached) by re on first use
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: str | int) -> int:
    """Parse ``64MiB``, ``512k``, ``1G`` or a plain byte count."""
    if isinstance(value, bool) or (isinstance(value, int) and value < 0):
        raise UsageError(f"Not a size: {value!r} (use bytes or a suffix like 64MiB).")
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise UsageError(f"Not a size: {value!r} (use bytes or a suffix like 64MiB).")
    m = re.match(_SIZE, value, re.IGNORECASE)
    if not m:
        raise UsageError(f"Not a size: {value!r} (use bytes or a suffix like 64MiB).")
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) * _UNITS[unit]


def human_bytes(n: int | float | None) -> str:
    """A byte count as people read it: ``1.5 GiB``. The inverse of :func:`parse_size`."""
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):  # TOML 0/1 is an integer: ask for true/false
        raise UsageError(f"Not a yes/no value: {value!r} (use true or false).")
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"Not a yes/no value: {value!r}.")


# A NamedTuple, not a frozen dataclass, like every type on the command path: `import
# dataclasses` costs ~12 ms (it imports inspect), and each class defined ~1 ms more.
# Change one with ``config._replace(...)``.
class Config(NamedTuple):
    """Every tunable in one frozen object. Library code takes this; it never reads the environment."""

    store: Path | None = None
    link_mode: LinkMode = LinkMode.AUTO
    hardlink_threshold: int = 64 << 20
    pack_threshold: int = 1 << 20  # smaller files go into pack files
    seal_readonly: bool = True  # hardlinked objects lose their write bits (exact modes: false)
    compress: bool = True
    compress_level: int = 3
    workers: int = 4
    scan_helpers: int = 3  # processes that check unchanged subtrees during a full walk; 0: none
    verify_restore: bool = True
    lock_wait: bool = True
    preserve: tuple[str, ...] = ()  # gitignore-style patterns a rollback never touches
    auto_keep: int = 20  # automatic checkpoints kept by the retention policy
    crash_policy: str = "rollback"  # for a transaction whose owner died: rollback or keep
    journal: bool = True  # watch transactions with inotify, so their work is O(changes)
    # A transaction's own journal watches from a helper process, not this one's threads: the
    # operation in this process then doesn't wait for the journal's threads to let go of the GIL.
    journal_process: bool = True
    # downloads
    download_chunk: int = 8 << 20  # bytes per ranged request
    download_connections: int = 4  # requests in flight at once, over all sources
    retry_attempts: int = 10  # failures in a row without progress before a download gives up
    retry_base: float = 0.5  # seconds; backoff is uniform in [0, base * 2**n], capped
    retry_cap: float = 30.0
    retry_after_max: float = 120.0  # a server's Retry-After is honoured up to this
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # no byte for this long: the connection has stalled
    min_speed: int = 1024  # bytes/s; slower than this for a whole window counts as a stall
    min_speed_window: float = 30.0
    breaker_threshold: int = 5  # failures in a row that open a host's circuit breaker
    breaker_cooldown: float = 60.0  # seconds before an open breaker lets one probe through
    # operations (snapfs import / resume)
    step_retries: int = 3  # automatic retries of a step that failed in a retryable way
    on_failure: str = "rollback"  # a step that can't be completed: roll it back, or keep its work
    state_dir: Path | None = None  # per-user state (host health); default ~/.local/state/snapfs


_ENV = {
    "SNAPFS_STORE": "store",
    "SNAPFS_LINK_MODE": "link_mode",
    "SNAPFS_HARDLINK_THRESHOLD": "hardlink_threshold",
    "SNAPFS_PACK_THRESHOLD": "pack_threshold",
    "SNAPFS_SEAL_READONLY": "seal_readonly",
    "SNAPFS_COMPRESS": "compress",
    "SNAPFS_COMPRESS_LEVEL": "compress_level",
    "SNAPFS_WORKERS": "workers",
    "SNAPFS_SCAN_HELPERS": "scan_helpers",
    "SNAPFS_VERIFY_RESTORE": "verify_restore",
    "SNAPFS_PRESERVE": "preserve",
    "SNAPFS_AUTO_KEEP": "auto_keep",
    "SNAPFS_CRASH_POLICY": "crash_policy",
    "SNAPFS_JOURNAL": "journal",
    "SNAPFS_JOURNAL_PROCESS": "journal_process",
    "SNAPFS_DOWNLOAD_CHUNK": "download_chunk",
    "SNAPFS_DOWNLOAD_CONNECTIONS": "download_connections",
    "SNAPFS_RETRY_ATTEMPTS": "retry_attempts",
    "SNAPFS_RETRY_BASE": "retry_base",
    "SNAPFS_RETRY_CAP": "retry_cap",
    "SNAPFS_RETRY_AFTER_MAX": "retry_after_max",
    "SNAPFS_CONNECT_TIMEOUT": "connect_timeout",
    "SNAPFS_READ_TIMEOUT": "read_timeout",
    "SNAPFS_MIN_SPEED": "min_speed",
    "SNAPFS_MIN_SPEED_WINDOW": "min_speed_window",
    "SNAPFS_BREAKER_THRESHOLD": "breaker_threshold",
    "SNAPFS_BREAKER_COOLDOWN": "breaker_cooldown",
    "SNAPFS_STATE_DIR": "state_dir",
    "SNAPFS_STEP_RETRIES": "step_retries",
    "SNAPFS_ON_FAILURE": "on_failure",
}

_SECONDS = (
    "retry_base",
    "retry_cap",
    "retry_after_max",
    "connect_timeout",
    "read_timeout",
    "min_speed_window",
    "breaker_cooldown",
)
_COUNTS = {  # name -> (lowest, highest)
    "compress_level": (1, 22),
    "workers": (1, 64),
    "scan_helpers": (0, 64),
    "download_connections": (1, 64),
    "retry_attempts": (1, 1000),
    "breaker_threshold": (1, 1000),
    "step_retries": (0, 100),
}


def _coerce(name: str, value: Any, base: Path | None) -> Any:
    try:
        if name in ("store", "state_dir"):
            p = Path(os.path.expanduser(os.fsdecode(value)))
            return ((base / p) if base is not None and not p.is_absolute() else p).resolve()
        if name == "link_mode":
            return LinkMode(str(value).lower())
        if name in ("hardlink_threshold", "pack_threshold", "min_speed"):
            return parse_size(value)
        if name == "download_chunk":
            n = parse_size(value)
            if not 64 << 10 <= n <= 1 << 30:
                raise ValueError(n)
            return n
        if name in _SECONDS:
            if isinstance(value, bool):
                raise ValueError(value)
            x = float(value)
            if not 0 <= x <= 86400:
                raise ValueError(x)
            return x
        if name in (
            "compress",
            "verify_restore",
            "lock_wait",
            "journal",
            "journal_process",
            "seal_readonly",
        ):
            return _parse_bool(value)
        if name == "preserve":
            items = value.split(os.pathsep) if isinstance(value, str) else value
            if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
                raise ValueError(value)
            return tuple(i for i in items if i)
        if name in ("crash_policy", "on_failure"):
            if value not in ("rollback", "keep"):
                raise ValueError(value)
            return value
        if name == "auto_keep":
            n = int(value)
            if isinstance(value, bool) or n < 1:
                raise ValueError(value)
            return n
        if name in _COUNTS:
            if isinstance(value, bool):
                raise ValueError(value)
            n = int(value)
            lo, hi = _COUNTS[name]
            if not lo <= n <= hi:
                raise ValueError(n)
            return n
    except (ValueError, TypeError) as exc:
        if name in _COUNTS:
            lo, hi = _COUNTS[name]
            raise UsageError(
                f"Bad value for {name}: {value!r} (a whole number from {lo} to {hi})."
            ) from exc
        raise UsageError(f"Bad value for {name}: {value!r}.") from exc
    raise UsageError(f"Unknown setting {name!r}.")


def load_config(
    project_root: Path | None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve the configuration for a project (``project_root`` may be None before init)."""
    values: dict[str, Any] = {}
    if project_root is not None:
        cfg_file = project_root / ".snapfs" / "config"
        if cfg_file.exists():
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            try:
                data = tomllib.loads(cfg_file.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise UsageError(f"{cfg_file} is not valid TOML: {exc}.") from exc
            known = set(Config._fields)
            for key, value in data.items():
                key = key.replace("-", "_")
                if key not in known:
                    raise UsageError(f"{cfg_file}: unknown setting {key!r}.")
                values[key] = _coerce(key, value, project_root)
    for var, name in _ENV.items():
        if env and env.get(var):
            values[name] = _coerce(name, env[var], None)
    if "state_dir" not in values and env and env.get("XDG_STATE_HOME"):
        values["state_dir"] = _coerce(
            "state_dir", os.path.join(env["XDG_STATE_HOME"], "snapfs"), None
        )
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, None)
    return Config()._replace(**values)


def with_overrides(config: Config, overrides: Mapping[str, Any]) -> Config:
    """``config`` with some settings replaced (checked and converted like flags)."""
    values = {k: _coerce(k, v, None) for k, v in overrides.items() if v is not None}
    return config._replace(**values)
