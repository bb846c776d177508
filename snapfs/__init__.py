"""snapfs: crash-safe, content-addressed snapshots and recovery for project folders.

>>> import snapfs
>>> project = snapfs.init("my-project")          # or snapfs.open() for an existing one
>>> snap = project.snapshot(label="before import")
>>> ...                                          # something breaks the project
>>> project.rollback()                           # the tree is exactly as it was
"""

from ._config import Config
from ._diff import Changes, ChangeSet
from ._download import DownloadProgress, DownloadResult, download
from ._errors import (
    BadContent,
    Category,
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

__version__ = "0.1.0"

__all__ = [
    "BadContent",
    "Category",
    "ChangeSet",
    "Changes",
    "Config",
    "DiskFull",
    "DownloadError",
    "DownloadFailed",
    "DownloadProgress",
    "DownloadResult",
    "ExitCode",
    "FilesystemError",
    "GcReport",
    "HashMismatch",
    "LinkMode",
    "LockBusy",
    "NotAProject",
    "ObjectCorrupt",
    "ObjectMissing",
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
    "checkpoint",
    "checkpointed",
    "download",
    "init",
    "open",
    "transaction",
]
