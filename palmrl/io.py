"""File helpers every layer may use: JSON-lines reading, content hashes, atomic writes,
umask-readable files, and the lazy import of `transformers` (only `model=hf` needs it).

Atomic writes go to a temporary name beside the target and are renamed over it, so a reader (or a
resumed run after kill -9) sees the old file or the new one, never half of either.

JSON lines have one reader and one torn-tail policy: a last line with no newline that does not
parse is what a crash in the middle of an append leaves, and it is dropped when palmrl wrote the
file itself (`torn_tail="drop"`: metrics, generated records); in a user's input it is an error like
any other bad line. Every error names the file and line: not UTF-8, not JSON, nested too deeply,
not an object.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from palmrl.errors import UserError

MAX_JSON_LINE = 1 << 24  # 16 MiB: a longer line is refused before json sees it


def read_jsonl(path: Path, *, key: str, torn_tail: Literal["drop", "error"] = "error") -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `path`; `key` names the setting that gave it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}: no such file: {path}")
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = bool(data) and not data.endswith(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        number = index + 1
        try:
            if len(raw) > MAX_JSON_LINE:
                raise ValueError(f"line longer than {MAX_JSON_LINE >> 20} MiB")
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            bad = raw[err.start:err.start + 1]
            raise UserError(f"{path}:{number}: not UTF-8 text (byte {err.start}: {bad!r})") from None
        except RecursionError:
            raise UserError(f"{path}:{number}: JSON nested too deeply") from None
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            if torn_tail == "drop" and torn and index == last:
                break  # a write cut short by a crash: the lines before it are whole
            message = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
            raise UserError(f"{path}:{number}: not valid JSON ({message})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        rows.append((number, obj))
    return rows


MAX_JSON_DEPTH = 500  # deeper than any record palmrl reads; far below what crashes a C parser


def check_json_depth(path: Path, *, limit: int = MAX_JSON_DEPTH, chunk: int = 1 << 24) -> None:
    """Refuse a JSON / JSON-lines file nested more than `limit` deep, naming the line, before a C
    parser sees it (pyarrow's JSON reader, behind `datasets`, overflows its stack and kills the
    process at depth ~100,000). The scan counts brackets in blocks with numpy: it ignores strings,
    so it can only overcount; only a file over the limit is then parsed line by line to be sure."""
    import numpy as np

    depth, deepest = 0, 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            codes = np.frombuffer(block, dtype=np.uint8)
            step = (np.isin(codes, (ord("["), ord("{"))).astype(np.int64)
                    - np.isin(codes, (ord("]"), ord("}"))).astype(np.int64))
            running = depth + np.cumsum(step)
            if running.size:
                deepest, depth = max(deepest, int(running.max())), int(running[-1])
            if deepest > limit:
                break
    if deepest <= limit:
        return
    data = Path(path).read_bytes()
    documents = [data] if data.lstrip().startswith(b"[") else data.split(b"\n")
    for number, raw in enumerate(documents, start=1):
        try:
            json.loads(raw)
        except RecursionError:
            where = f"{path}:{number}" if len(documents) > 1 else str(path)
            raise UserError(f"{where}: JSON nested too deeply") from None
        except ValueError:
            continue  # malformed lines are the reader's to report, with their own message


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


class FolderLock:
    """An OS lock (flock) on `<folder>/.palmrl.lock`, held while the process lives or until `release`:
    a second palmrl process on the same folder is refused with the holder's pid. The kernel releases
    it on any exit, kill -9 included, so a stale file never blocks a later run. Within one process
    the folder's lock is shared (runs one after another in a test, a pipeline in-process)."""

    NAME = ".palmrl.lock"
    _held: dict[str, object] = {}  # folder -> open lock file, this process

    def __init__(self, folder: Path, *, what: str):
        import fcntl

        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"out_dir: cannot create {folder}: {err.strerror}") from None
        self.key = str(folder.resolve())
        if self.key in self._held:
            return
        lock_file = open(folder / self.NAME, "a+")  # noqa: SIM115 - held for the run's life
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "another process"
            lock_file.close()
            raise UserError(f"{folder} is in use by {holder}: wait for it to finish, or choose another "
                            f"run_name/out_dir") from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"palmrl {what} (pid {os.getpid()})\n")
        lock_file.flush()
        self._held[self.key] = lock_file

    def release(self) -> None:
        lock_file = self._held.pop(self.key, None)
        if lock_file is not None:
            lock_file.close()  # closing the file drops the flock


def check_output_file(path: str | os.PathLike, *, key: str, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """palmrl's one policy for a file a command writes (sample output=, dedup out=, selfinstruct
    out=, ...): it must not be one of the command's inputs, must not sit inside a checkpoint folder
    or a training run's folder, must not be a folder, and its folder must exist. Returns the path;
    writers then write a temporary file and rename it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{key}: {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"{key}: the folder {path.parent} does not exist")
    for given in inputs:
        given = Path(given)
        if given.exists() and path.exists() and os.path.samefile(given, path):
            raise UserError(f"{key}: {path} is also this command's input; writing it would destroy it")
    here = path.parent.resolve()
    for folder in [here, *here.parents][:3]:  # a checkpoint (final/, step-N/), its run folder, the stage folder
        checkpoint = (folder / "manifest.json").is_file() and (folder / "model.yaml").is_file()
        if checkpoint or (folder / FolderLock.NAME).is_file():
            raise UserError(f"{key}: {path} is inside the palmrl {'checkpoint' if checkpoint else 'run'} folder "
                            f"{folder}; write elsewhere")
    return path


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
