"""Content hashes: of files, of settings, and of the code that computes a stage."""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import json
from pathlib import Path
from types import ModuleType


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hash of a file's content (not its name or time)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(*parts: object) -> str:
    """A stable hash of JSON-serialisable parts (settings, upstream fingerprints, digests)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@functools.cache
def code_digest(module: ModuleType) -> str:
    """A hash of the code of ``module`` and of every module of its package that it uses,
    through its top-level imports, transitively: what a stage's fingerprint holds of the code
    that computes the stage, so that a change to that code recomputes it (no version numbers
    to bump by hand). Syntax trees are hashed, so comments and layout do not count."""
    root = module.__name__.split(".")[0]
    seen: dict[str, ModuleType] = {}
    todo = [module.__name__]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen[name] = importlib.import_module(name)
        for value in vars(seen[name]).values():
            used = value.__name__ if isinstance(value, ModuleType) else getattr(
                value, "__module__", None)
            if isinstance(used, str) and used.split(".")[0] == root:
                todo.append(used)
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(seen):
        source = Path(seen[name].__file__).read_text()
        h.update(f"{name}\n{ast.dump(ast.parse(source))}\n".encode())
    return h.hexdigest()
