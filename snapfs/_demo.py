"""The built-in demo: a small ComfyUI-like project is snapshotted, broken, and rolled back."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ._project import init


def _make_project(root: Path) -> None:
    files = {
        "workflows/portrait.json": b'{"nodes": [1, 2, 3], "version": 4}\n',
        "custom_nodes/ComfyUI-Impact/__init__.py": b"NODE_CLASS_MAPPINGS = {}\n",
        "custom_nodes/ComfyUI-Impact/nodes.py": b"def detect(image):\n    return image\n" * 20,
        "custom_nodes/ComfyUI-Impact/requirements.txt": b"numpy>=1.24\nopencv-python\n",
        "venv/lib/python3.11/site-packages/numpy/__init__.py": b"__version__ = '1.26.4'\n",
        "venv/lib/python3.11/site-packages/torch/__init__.py": b"__version__ = '2.3.0'\n",
        "venv/bin/activate": b"# activate\nexport VIRTUAL_ENV=venv\n",
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    os.chmod(root / "venv/bin/activate", 0o755)
    os.symlink("python3.11", root / "venv/bin/python")
    (root / "output").mkdir()
    model = root / "models/checkpoints/sd15-tiny.safetensors"
    model.parent.mkdir(parents=True)
    block = hashlib.sha256(b"snapfs demo").digest() * 2048
    model.write_bytes(block * 64)  # 4 MiB of "weights"


def _fingerprint(root: Path) -> dict[str, tuple[str, int, str]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".snapfs"]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", st.st_mode & 0o7777, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, "")
            else:
                out[rel] = ("file", st.st_mode & 0o7777, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def run_demo(say: Callable[[str], None], keep: bool = False) -> bool:
    """Run the demo, narrating through ``say``. Returns True if the rollback was exact."""
    base = Path(tempfile.mkdtemp(prefix="snapfs-demo-"))
    root = base / "ComfyUI-project"
    root.mkdir()
    try:
        _make_project(root)
        say(f"1. Made a sample project in {root}")
        say("   (a workflow, a plugin checkout, a venv and a 4 MiB model)")
        before = _fingerprint(root)
        with init(root) as project:
            snap = project.snapshot("before importing a workflow", kind="pre-import")
            say(f"2. Took snapshot {snap.id}: {snap.files} files in {snap.seconds:.2f} s")

            say("3. A workflow import goes wrong half-way:")
            plugin = root / "custom_nodes/ComfyUI-Broken"
            plugin.mkdir()
            (plugin / "__init__.py").write_text("raise ImportError('half-installed')\n")
            say("   - a plugin is left half-installed")
            (root / "venv/lib/python3.11/site-packages/torch/__init__.py").write_text(
                "__version__ = '2.5.0+incompatible'\n"
            )
            say("   - pip replaced torch with an incompatible version")
            with open(root / "models/checkpoints/sd15-tiny.safetensors", "r+b") as f:
                f.truncate(1_000_000)
            say("   - the model download died at 24% and left a truncated file")
            os.unlink(root / "workflows/portrait.json")
            say("   - and the user's workflow file was deleted")

            ch = project.status()
            say(
                f"4. snapfs status sees it: {len(ch.added)} added, {len(ch.modified)} modified,"
                f" {len(ch.deleted)} deleted"
            )
            for path in ch.added + ch.modified + ch.deleted:
                say(f"     {path}")

            res = project.rollback()
            say(f"5. Rolled back to snapshot {res.target}: {res.changed} changes undone")
            say(
                f"   (the broken state was kept as snapshot {res.pre_restore}, so even this is undoable)"
            )
            exact = _fingerprint(root) == before
            rep = project.verify()
            say(
                "6. The project is byte-for-byte what it was: "
                + ("yes" if exact else "NO")
                + f"; verify: {'OK' if rep.ok else 'problems found'}"
            )
        if keep:
            say(f"The demo project is kept in {root}")
        return exact and rep.ok
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
