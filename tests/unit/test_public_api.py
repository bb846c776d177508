"""The public surface is declared once, in snapfs.__all__, and nothing else leaks out."""

import snapfs


def test_all_is_exactly_the_public_names() -> None:
    # dir(), not vars(): the recovery manager's names load lazily, on first access.
    import types

    public = {
        n
        for n in dir(snapfs)
        if not n.startswith("_")
        # subpackages (snapfs.cli, snapfs.web) appear here once something imports them
        and not isinstance(getattr(snapfs, n), types.ModuleType)
    } - {"TYPE_CHECKING", "Any"}
    assert set(snapfs.__all__) == public | {"__version__"}
    for name in snapfs.__all__:
        assert getattr(snapfs, name) is not None


def test_errors_subclass_the_matching_builtins() -> None:
    assert issubclass(snapfs.SnapshotNotFound, LookupError)
    assert issubclass(snapfs.NotAProject, FileNotFoundError)
    assert issubclass(snapfs.LockBusy, BlockingIOError)
    assert issubclass(snapfs.DiskFull, OSError)
    assert issubclass(snapfs.UsageError, ValueError)
    for name in snapfs.__all__:
        obj = getattr(snapfs, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, snapfs.SnapfsError)
            assert obj.exit_code in (1, 2, 3)
