"""Configuration resolution: defaults < .snapfs/config (TOML) < SNAPFS_* environment < overrides.

The config file is read through pyfakefs: this is pure "logic meets the filesystem" code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

from snapfs import Config, LinkMode, UsageError
from snapfs._config import load_config, parse_size

ROOT = Path("/work/proj")


def _config_file(fs: FakeFilesystem, text: str) -> None:
    fs.create_file(ROOT / ".snapfs" / "config", contents=text)


@pytest.fixture
def root(fs: FakeFilesystem) -> Path:
    fs.create_dir(ROOT / ".snapfs")
    return ROOT


# ---- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64MiB", 64 << 20),
        ("64MB", 64 << 20),
        ("64M", 64 << 20),
        ("64m", 64 << 20),
        ("512k", 512 << 10),
        ("512KiB", 512 << 10),
        ("1G", 1 << 30),
        ("2TiB", 2 << 40),
        ("100", 100),
        ("100B", 100),
        (" 7 KiB ", 7 << 10),
        ("0", 0),
        (123, 123),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "1.5G", "-1", "12 parsecs", "1 PiB", "0x10", "1e6"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


# ---- resolution order ------------------------------------------------------------------------


def test_defaults_without_any_source(root: Path) -> None:
    cfg = load_config(root)
    assert cfg == Config()
    assert cfg.link_mode is LinkMode.AUTO
    assert cfg.hardlink_threshold == 64 << 20
    assert cfg.store is None
    assert load_config(None) == Config()


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.workers = 9  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.unknown = 1  # type: ignore[attr-defined]
    assert cfg._replace(workers=9).workers == 9 and cfg.workers == 4


def test_file_then_env_then_overrides(fs: FakeFilesystem, root: Path) -> None:
    _config_file(
        fs,
        'link-mode = "copy"\n'
        "workers = 2\n"
        'hardlink_threshold = "1MiB"\n'
        "compress = false\n"
        "compress_level = 5\n",
    )
    from_file = load_config(root)
    assert from_file.link_mode is LinkMode.COPY  # "link-mode" and "link_mode" are the same key
    assert from_file.workers == 2
    assert from_file.hardlink_threshold == 1 << 20
    assert from_file.compress is False
    assert from_file.compress_level == 5

    env = {"SNAPFS_WORKERS": "3", "SNAPFS_LINK_MODE": "HARDLINK", "SNAPFS_COMPRESS": "yes"}
    from_env = load_config(root, env)
    assert from_env.workers == 3
    assert from_env.link_mode is LinkMode.HARDLINK
    assert from_env.compress is True
    assert from_env.hardlink_threshold == 1 << 20  # untouched by the env: still the file's value
    assert from_env.compress_level == 5

    over = load_config(root, env, {"workers": 5, "hardlink_threshold": "2MiB", "store": None})
    assert over.workers == 5
    assert over.hardlink_threshold == 2 << 20
    assert over.link_mode is LinkMode.HARDLINK  # env still wins over the file
    assert over.store is None  # a None override means "not given"


def test_empty_env_value_means_unset(fs: FakeFilesystem, root: Path) -> None:
    _config_file(fs, "workers = 2\n")
    assert load_config(root, {"SNAPFS_WORKERS": ""}).workers == 2


def test_library_never_reads_the_process_environment(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SNAPFS_WORKERS", "7")
    monkeypatch.setenv("SNAPFS_LINK_MODE", "copy")
    assert load_config(root) == Config()
    assert load_config(root, {}) == Config()


def test_store_paths(fs: FakeFilesystem, root: Path) -> None:
    _config_file(fs, 'store = "../shared-store"\n')
    # Relative to the project in the config file, so it means the same from any cwd; resolved,
    # so one store spelled two ways is recognised as the same store.
    assert load_config(root).store == ROOT.parent / "shared-store"
    assert load_config(root, {"SNAPFS_STORE": "/srv/store"}).store == Path("/srv/store")
    assert load_config(root, None, {"store": "/elsewhere"}).store == Path("/elsewhere")
    assert load_config(root, None, {"store": Path("/p")}).store == Path("/p")


# ---- bad values --------------------------------------------------------------------------------

BAD_VALUES: list[tuple[str, str, Any]] = [
    ("link_mode", "SNAPFS_LINK_MODE", "sideways"),
    ("workers", "SNAPFS_WORKERS", "0"),
    ("workers", "SNAPFS_WORKERS", "65"),
    ("workers", "SNAPFS_WORKERS", "many"),
    ("compress_level", "SNAPFS_COMPRESS_LEVEL", "0"),
    ("compress_level", "SNAPFS_COMPRESS_LEVEL", "23"),
    ("compress", "SNAPFS_COMPRESS", "maybe"),
    ("verify_restore", "SNAPFS_VERIFY_RESTORE", "sometimes"),
    ("hardlink_threshold", "SNAPFS_HARDLINK_THRESHOLD", "12 parsecs"),
    ("hardlink_threshold", "SNAPFS_HARDLINK_THRESHOLD", "-1"),
    ("scan_helpers", "SNAPFS_SCAN_HELPERS", "-1"),
    ("scan_helpers", "SNAPFS_SCAN_HELPERS", "some"),
]


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        (
            "SNAPFS_SCAN_HELPERS",
            "65",
            "Bad value for scan_helpers: '65' (a whole number from 0 to 64).",
        ),
        ("SNAPFS_WORKERS", "many", "Bad value for workers: 'many' (a whole number from 1 to 64)."),
    ],
)
def test_a_bad_count_names_its_range(root: Path, var: str, value: str, message: str) -> None:
    with pytest.raises(UsageError) as err:
        load_config(root, {var: value})
    assert str(err.value) == message


@pytest.mark.parametrize(("name", "var", "value"), BAD_VALUES)
def test_bad_env_value_is_a_usage_error(root: Path, name: str, var: str, value: str) -> None:
    with pytest.raises(UsageError, match=name):
        load_config(root, {var: value})


@pytest.mark.parametrize(("name", "var", "value"), BAD_VALUES)
def test_bad_override_is_a_usage_error(root: Path, name: str, var: str, value: str) -> None:
    with pytest.raises(UsageError):
        load_config(root, None, {name: value})


@pytest.mark.parametrize(
    "toml",
    [
        'link_mode = "sideways"\n',
        "workers = 0\n",
        'workers = "lots"\n',
        "compress_level = 99\n",
        'compress = "maybe"\n',
        "compress = 1\n",  # a TOML integer where a boolean belongs
        "verify_restore = 0\n",
        "hardlink_threshold = -5\n",  # a negative size
        "hardlink_threshold = 1.5\n",
        "hardlink_threshold = true\n",
        'hardlink_threshold = "huge"\n',
        "link_mode = 3\n",
    ],
)
def test_bad_value_in_the_config_file_is_a_usage_error(
    fs: FakeFilesystem, root: Path, toml: str
) -> None:
    _config_file(fs, toml)
    with pytest.raises(UsageError):
        load_config(root)


def test_unknown_setting_in_the_file_is_a_usage_error(fs: FakeFilesystem, root: Path) -> None:
    _config_file(fs, "wrokers = 3\n")
    with pytest.raises(UsageError, match="wrokers"):
        load_config(root)


def test_invalid_toml_is_a_usage_error(fs: FakeFilesystem, root: Path) -> None:
    _config_file(fs, "workers = = 3\n")
    with pytest.raises(UsageError, match="TOML"):
        load_config(root)


def test_unknown_override_is_a_usage_error(root: Path) -> None:
    with pytest.raises(UsageError, match="colour"):
        load_config(root, None, {"colour": "blue"})


def test_env_variables_outside_snapfs_are_not_settings(root: Path) -> None:
    assert load_config(root, {"WORKERS": "9", "SNAPFS_UNKNOWN": "x"}) == Config()
