"""snapfs: crash-safe, content-addressed snapshots and recovery for project folders.

>>> import snapfs
>>> project = snapfs.init("my-project")          # or snapfs.open() for an existing one
>>> snap = project.snapshot(label="before import")
>>> ...                                          # something breaks the project
>>> project.rollback()                           # the tree is exactly as it was
"""

from typing import TYPE_CHECKING, Any

from . import _faults  # noqa: F401 - first: a testing aid (SNAPFS_FAULT_AT), inert unless set
from ._config import Config
from ._errors import (
    BadContent,
    Category,
    CommandFailed,
    DiskFull,
    DownloadError,
    DownloadFailed,
    ExitCode,
    FilesystemError,
    HashMismatch,
    LockBusy,
    NotAProject,
    ObjectCorrupt,
    ObjectMissing,
    PlanError,
    ProjectPathError,
    SealBroken,
    SnapfsError,
    SnapshotNotFound,
    SourceUnavailable,
    StateCorrupt,
    UnsafePath,
    UsageError,
)
from ._fsops import LinkMode

if TYPE_CHECKING:
    from ._classify import Action, Diagnosis, classify
    from ._diff import Changes, ChangeSet
    from ._doctor import Fix, FixResult, Issue, apply_fix, problems
    from ._download import DownloadProgress, DownloadResult, download
    from ._import import import_workflow
    from ._ops import (
        OperationFailed,
        OperationRecord,
        OpEvent,
        OpResult,
        list_operations,
        resume,
        skip_step,
    )
    from ._project import (
        GcReport,
        Problem,
        Project,
        RestoreResult,
        SnapshotInfo,
        VerifyReport,
        init,
        open,
    )
    from ._scan import Progress
    from ._txn import Transaction, checkpoint, checkpointed, transaction

# Everything but the errors and the config loads on first use: every command pays for what
# `import snapfs` imports, and a download needs no snapshot code, a snapshot no downloader.
_LAZY = {
    "Changes": "_diff",
    "ChangeSet": "_diff",
    "GcReport": "_project",
    "Problem": "_project",
    "Project": "_project",
    "RestoreResult": "_project",
    "SnapshotInfo": "_project",
    "VerifyReport": "_project",
    "init": "_project",
    "open": "_project",
    "Progress": "_scan",
    "Transaction": "_txn",
    "checkpoint": "_txn",
    "checkpointed": "_txn",
    "transaction": "_txn",
    "DownloadProgress": "_download",
    "DownloadResult": "_download",
    "download": "_download",
    "Action": "_classify",
    "Diagnosis": "_classify",
    "classify": "_classify",
    "Fix": "_doctor",
    "FixResult": "_doctor",
    "Issue": "_doctor",
    "apply_fix": "_doctor",
    "problems": "_doctor",
    "import_workflow": "_import",
    "OpEvent": "_ops",
    "OperationFailed": "_ops",
    "OperationRecord": "_ops",
    "OpResult": "_ops",
    "list_operations": "_ops",
    "resume": "_ops",
    "skip_step": "_ops",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'snapfs' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"snapfs.{module}"), name)
    if module in ("_ops", "_doctor"):  # operation kinds register themselves when _import loads
        importlib.import_module("snapfs._import")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "Action",
    "BadContent",
    "Category",
    "CommandFailed",
    "ChangeSet",
    "Changes",
    "Config",
    "Diagnosis",
    "DiskFull",
    "DownloadError",
    "DownloadFailed",
    "DownloadProgress",
    "DownloadResult",
    "ExitCode",
    "FilesystemError",
    "Fix",
    "FixResult",
    "GcReport",
    "HashMismatch",
    "Issue",
    "LinkMode",
    "LockBusy",
    "NotAProject",
    "ObjectCorrupt",
    "ObjectMissing",
    "OpEvent",
    "OpResult",
    "OperationFailed",
    "OperationRecord",
    "PlanError",
    "Problem",
    "Progress",
    "Project",
    "ProjectPathError",
    "RestoreResult",
    "SealBroken",
    "SnapfsError",
    "SnapshotInfo",
    "SnapshotNotFound",
    "SourceUnavailable",
    "Transaction",
    "StateCorrupt",
    "UnsafePath",
    "UsageError",
    "VerifyReport",
    "__version__",
    "apply_fix",
    "checkpoint",
    "checkpointed",
    "classify",
    "download",
    "import_workflow",
    "init",
    "list_operations",
    "open",
    "problems",
    "resume",
    "skip_step",
    "transaction",
]
