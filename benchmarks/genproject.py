"""Deterministic generator of a ComfyUI-like project tree, plus the "import-like change".

The tree mimics what a real ComfyUI install looks like on disk:

* ``custom_nodes/<plugin>/...``: git-checkout-like plugin trees (py, js, json, md, yml, png-ish binaries)
* ``venv/``: a virtualenv with ``bin/`` symlinks/executables and ``lib/python3.11/site-packages/<pkg>/``
* ``models/``: a few huge, incompressible "safetensors" files and some empty model folders
* ``input/``, ``output/``, ``user/``: small user data and empty dirs

Everything (names, sizes, bytes, modes, mtimes) derives from the seed, so two runs with the
same ``--scale``/``--seed`` produce byte-identical trees.  mtimes are pinned to a fixed date in
the past so that later edits always get a different mtime (rsync's quick check and similar
size+mtime heuristics would otherwise be able to miss a same-second, same-size edit).

Usage::

    python -m benchmarks.genproject DIR [--scale 0.05] [--seed 0] [--change]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import stat
from dataclasses import dataclass, field
from pathlib import Path

# Fixed past timestamp (2024-01-01T00:00:00Z) used for every generated file.
BASE_MTIME = 1_704_067_200
MIB = 1 << 20
# Per-file-count/size targets at --scale 1.
SMALL_FILES = 22_000  # comfortably above the 20k required, including venv files
MODEL_SIZES_MIB = {
    "models/checkpoints/sd_xl_base_1.0.safetensors": 400,
    "models/checkpoints/dreamshaper_8.safetensors": 400,
    "models/vae/sdxl_vae.safetensors": 250,
    "models/loras/detail_tweaker.safetensors": 40,
    "models/loras/film_grain.safetensors": 40,
}
CHANGE_MODEL = "models/checkpoints/juggernaut_xl_v9.safetensors"
CHANGE_MODEL_MIB = 500
EMPTY_DIRS = [
    "models/upscale_models",
    "models/embeddings",
    "models/controlnet",
    "models/clip_vision",
    "input/uploads",
    "output",
    "temp",
]
# Top-level dirs owned by the tools under test; never touched by the change.
TOOL_DIRS = frozenset({".snapfs", ".git"})

# fmt: off
WORDS = [
    "import", "def", "class", "return", "self", "node", "input", "output", "tensor", "image",
    "latent", "model", "sampler", "scheduler", "steps", "cfg", "seed", "width", "height",
    "batch", "clip", "vae", "lora", "strength", "denoise", "mask", "prompt", "negative",
    "positive", "conditioning", "upscale", "torch", "numpy", "json", "path", "config", "value",
    "if", "else", "for", "in", "while", "try", "except", "with", "as", "from", "None", "True",
    "False", "lambda", "yield", "async", "await", "widget", "type", "required", "optional",
    "category", "function", "display", "name", "utils",
]
# fmt: on


@dataclass
class ChangeSummary:
    """What apply_change did, as project-relative POSIX paths (files only)."""

    added: list[str] = field(default_factory=list)
    modified_inplace: list[str] = field(default_factory=list)
    modified_replaced: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    @property
    def modified(self) -> list[str]:
        return sorted(self.modified_inplace + self.modified_replaced)

    def counts(self) -> dict[str, int]:
        return {
            "added": len(self.added),
            "modified": len(self.modified),
            "deleted": len(self.deleted),
        }


# ---------------------------------------------------------------------------
# content helpers


def _text_pool(seed: int, size: int = 4 * MIB) -> bytes:
    """A pool of code-like text; small text files are slices of it (fast, compressible like code)."""
    rng = random.Random(seed)
    lines: list[str] = []
    total = 0
    while total < size:
        indent = "    " * rng.randint(0, 3)
        line = indent + " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))
        lines.append(line)
        total += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


def _text_content(rng: random.Random, pool: bytes, rel: str, size: int) -> bytes:
    """Unique text of exactly `size` bytes: a path header (so no two files are identical) + pool slice."""
    if size == 0:
        return b""
    header = f"# {rel}\n".encode()
    body_len = max(0, size - len(header))
    start = rng.randrange(0, len(pool) - body_len) if body_len < len(pool) else 0
    body = pool[start : start + body_len]
    while len(body) < body_len:  # only for the rare file bigger than the pool
        body += pool[: body_len - len(body)]
    return (header + body)[:size]


def _sample_size(rng: random.Random) -> int:
    """Skewed size distribution: mostly 1-30 KB, some 30-150 KB, a few 0.5-2 MB (mean ~12 KB)."""
    r = rng.random()
    if r < 0.96:
        return min(int(rng.lognormvariate(math.log(3600), 0.9)), 60_000)
    if r < 0.998:
        return rng.randint(30_000, 150_000)
    return rng.randint(512 * 1024, 2 * MIB)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    os.utime(path, (BASE_MTIME, BASE_MTIME))


def _write_model(path: Path, size: int, seed: str) -> None:
    """Incompressible, reproducible model bytes: SHAKE-128 in counter mode (~0.5 GB/s).

    Starts with a safetensors-like header so it looks like the real thing to `file`/humans.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    header_json = json.dumps({"__metadata__": {"format": "pt", "bench_seed": seed}}).encode()
    header = len(header_json).to_bytes(8, "little") + header_json
    block = 4 * MIB
    with open(path, "wb") as f:
        f.write(header[:size])
        written = min(len(header), size)
        counter = 0
        while written < size:
            n = min(block, size - written)
            key = f"{seed}:{counter}".encode()
            f.write(hashlib.shake_128(key).digest(n))
            written += n
            counter += 1
    os.utime(path, (BASE_MTIME, BASE_MTIME))


# ---------------------------------------------------------------------------
# tree layout


_PLUGIN_DIRS = [
    "",
    "nodes",
    "nodes/utils",
    "js",
    "web/js",
    "web/css",
    "examples",
    "assets",
    "docs",
    "tests",
]
_PKG_DIRS = ["", "core", "utils", "_vendor", "ops", "data", "__pycache__", "core/__pycache__"]


def _plugin_file(rng: random.Random, base: str, i: int) -> tuple[str, bool]:
    """Return (relative path, is_binary) for the i-th file of a plugin."""
    fixed = [
        "README.md",
        "LICENSE",
        "requirements.txt",
        "__init__.py",
        "pyproject.toml",
        ".github/workflows/publish.yml",
    ]
    if i < len(fixed):
        return f"{base}/{fixed[i]}", False
    sub = rng.choice(_PLUGIN_DIRS)
    ext = rng.choices(["py", "js", "json", "md", "png", "css"], weights=[40, 20, 15, 5, 15, 5])[0]
    if sub == "assets":
        ext = "png"
    name = f"{rng.choice(WORDS)}_{rng.choice(WORDS)}_{i}.{ext}"
    return f"{base}/{sub}/{name}".replace("//", "/"), ext == "png"


def _pkg_file(rng: random.Random, base: str, pkg: str, i: int) -> tuple[str, bool, int]:
    """Return (relative path, is_binary, mode) for the i-th file of a site-packages package."""
    if i == 0:
        return f"{base}/{pkg}/__init__.py", False, 0o644
    if i == 1:
        return f"{base}/{pkg}-1.{i}.0.dist-info/METADATA", False, 0o644
    if i == 2:
        return f"{base}/{pkg}-1.2.0.dist-info/RECORD", False, 0o644
    sub = rng.choice(_PKG_DIRS)
    if sub.endswith("__pycache__"):
        return f"{base}/{pkg}/{sub}/{rng.choice(WORDS)}_{i}.cpython-311.pyc", True, 0o644
    if rng.random() < 0.05:  # compiled extension modules are executable
        return (
            f"{base}/{pkg}/{sub}/_{rng.choice(WORDS)}_{i}.cpython-311-x86_64-linux-gnu.so".replace(
                "//", "/"
            ),
            True,
            0o755,
        )
    return f"{base}/{pkg}/{sub}/{rng.choice(WORDS)}_{i}.py".replace("//", "/"), False, 0o644


def _small_tree(root: Path, rng: random.Random, pool: bytes, n_files: int, tag: str) -> list[str]:
    """Write ~n_files small files split between custom_nodes plugins and site-packages packages."""
    written: list[str] = []
    n_plugin_files = n_files * 55 // 100
    files_per_plugin = 150
    n_plugins = max(1, n_plugin_files // files_per_plugin)
    for p in range(n_plugins):
        base = f"custom_nodes/ComfyUI-{tag}{rng.choice(WORDS).capitalize()}-{p}"
        for i in range(n_plugin_files // n_plugins):
            rel, binary = _plugin_file(rng, base, i)
            size = _sample_size(rng)
            data = rng.randbytes(size) if binary else _text_content(rng, pool, rel, size)
            _write(root / rel, data, 0o755 if rel.endswith(".sh") else 0o644)
            written.append(rel)
    n_pkg_files = n_files - len(written)
    files_per_pkg = 200
    n_pkgs = max(1, n_pkg_files // files_per_pkg)
    for k in range(n_pkgs):
        pkg = f"{tag.lower()}{rng.choice(WORDS)}{k}"
        base = "venv/lib/python3.11/site-packages"
        for i in range(n_pkg_files // n_pkgs):
            rel, binary, mode = _pkg_file(rng, base, pkg, i)
            if (root / rel).exists():  # random names can collide; skip rather than overwrite
                continue
            size = 0 if rel.endswith("__init__.py") and rng.random() < 0.5 else _sample_size(rng)
            data = rng.randbytes(size) if binary else _text_content(rng, pool, rel, size)
            _write(root / rel, data, mode)
            written.append(rel)
    return written


def _venv_bin(root: Path) -> None:
    """venv/bin with the usual symlink chain and executable scripts."""
    bin_dir = root / "venv/bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    os.symlink("/usr/bin/python3.11", bin_dir / "python3.11")
    os.symlink("python3.11", bin_dir / "python3")
    os.symlink("python3", bin_dir / "python")
    os.symlink("lib", root / "venv/lib64")  # directory symlink, must not be followed
    for script in ["pip", "pip3", "comfy", "accelerate", "huggingface-cli", "torchrun"]:
        _write(bin_dir / script, b"#!/work/venv/bin/python\nimport sys\nsys.exit(0)\n", 0o755)
    _write(bin_dir / "activate", b"# source me\nexport VIRTUAL_ENV=venv\n", 0o644)
    _write(root / "venv/pyvenv.cfg", b"home = /usr/bin\nversion = 3.11.7\n", 0o644)


def _user_files(root: Path) -> None:
    _write(root / "main.py", b"import comfy\nprint('ComfyUI')\n", 0o755)
    _write(
        root / "user/default/comfy.settings.json", json.dumps({"Comfy.UseNewMenu": "Top"}).encode()
    )
    _write(root / "extra_model_paths.yaml", b"comfyui:\n  base_path: ./\n")
    os.symlink("../models/checkpoints", root / "user/checkpoints_link")
    os.symlink("does/not/exist", root / "user/dangling_link")


def _pin_dir_mtimes(root: Path) -> None:
    """Give directories the fixed mtime too (done last: creating entries bumps dir mtimes)."""
    for dirpath, _dirs, _files in os.walk(root):
        os.utime(dirpath, (BASE_MTIME, BASE_MTIME))


def generate(root: Path, scale: float = 1.0, seed: int = 0) -> None:
    """Create the project at `root` (must not exist or be empty)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pool = _text_pool(seed)
    _venv_bin(root)
    _user_files(root)
    _small_tree(root, rng, pool, max(50, round(SMALL_FILES * scale)), tag="")
    for rel, mib in MODEL_SIZES_MIB.items():
        _write_model(root / rel, max(1, round(mib * MIB * scale)), f"{seed}:{rel}")
    for rel in EMPTY_DIRS:
        (root / rel).mkdir(parents=True, exist_ok=True)
    _pin_dir_mtimes(root)


# ---------------------------------------------------------------------------
# the import-like change


def list_files(root: Path) -> list[str]:
    """Sorted regular files (relative POSIX paths), skipping the tools' own metadata dirs."""
    out: list[str] = []
    for dirpath, dirs, files in os.walk(root):
        if Path(dirpath) == root:
            dirs[:] = [d for d in dirs if d not in TOOL_DIRS]
        dirs.sort()
        for name in files:
            p = Path(dirpath, name)
            if stat.S_ISREG(p.lstat().st_mode):
                out.append(p.relative_to(root).as_posix())
    return sorted(out)


def _modify_inplace(path: Path) -> None:
    """Flip a run of bytes in the middle, keeping size and inode: only mtime/ctime betray it."""
    size = path.stat().st_size
    n = min(64, size)
    with open(path, "r+b") as f:
        f.seek((size - n) // 2)
        old = f.read(n)
        f.seek((size - n) // 2)
        f.write(bytes(b ^ 0xFF for b in old))


def _modify_replace(path: Path, rng: random.Random) -> None:
    """Editor/pip-style save: write a temp file, then rename over the original (new inode)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    tmp = path.with_name(path.name + ".tmp~")
    tmp.write_bytes(path.read_bytes() + f"\n# patched {rng.random()}\n".encode())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def apply_change(root: Path, scale: float = 1.0, seed: int = 1) -> ChangeSummary:
    """Simulate installing a plugin + package and a model: add, modify, delete. Deterministic."""
    rng = random.Random(seed)
    # Only small files are edited/deleted: the big models are "installed", never patched.
    candidates = [
        f for f in list_files(root) if not f.startswith("models/") and (root / f).stat().st_size > 0
    ]
    n_changed = max(10, round(50 * scale))
    n_deleted = max(10, round(100 * scale))
    picked = rng.sample(candidates, n_changed + n_deleted)
    summary = ChangeSummary()
    for i, rel in enumerate(picked[:n_changed]):
        if i % 2 == 0:
            _modify_inplace(root / rel)
            summary.modified_inplace.append(rel)
        else:
            _modify_replace(root / rel, rng)
            summary.modified_replaced.append(rel)
    for rel in picked[n_changed:]:
        (root / rel).unlink()
        summary.deleted.append(rel)
    pool = _text_pool(seed)
    summary.added = _small_tree(root, rng, pool, max(20, round(2000 * scale)), tag="New")
    _write_model(
        root / CHANGE_MODEL, max(1, round(CHANGE_MODEL_MIB * MIB * scale)), f"{seed}:change-model"
    )
    summary.added.append(CHANGE_MODEL)
    summary.added.sort()
    summary.deleted.sort()
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("dir", type=Path)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--change", action="store_true", help="apply the import-like change to an existing DIR"
    )
    args = ap.parse_args()
    if args.change:
        print(json.dumps(apply_change(args.dir, args.scale).counts()))
    else:
        generate(args.dir, args.scale, args.seed)


if __name__ == "__main__":
    main()
