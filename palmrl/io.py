"""File helpers every layer may use: content hashes, atomic writes, umask-readable files, and the
lazy import of `transformers` (an optional heavy dependency only `model=hf` needs).

Atomic writes go to a temporary name beside the target and are renamed over it, so a reader (or a
resumed run after kill -9) sees the old file or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterable

from palmrl.errors import UserError


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: Iterable[Path], chunk: int = 1 << 22) -> str:
    """One digest over the bytes of several files, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename (a temporary file beside it first)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def readable_by_umask(folder: Path) -> None:
    """safetensors writes its files 0600; give every file the mode the user's umask asks for, like
    the JSON/YAML files beside it (a shared machine's readers need the weights too)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~mask)


def transformers():
    """The `transformers` module, imported on first use with its logging and progress bars quiet."""
    try:
        import transformers as tf
    except ImportError:  # pragma: no cover - a dependency of palmrl
        raise UserError("model=hf needs the transformers package: pip install transformers") from None
    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    return tf


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' loading warnings inside the block (its logger level is restored)."""
    import logging

    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
