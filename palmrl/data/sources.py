"""Every data source through one door: the embedded corpus, local files, Hugging Face datasets.

A data config (configs/data/*.yaml, or any Mapping) says where the documents are:

    source: embedded        # embedded | local | hf
    name: chitchat          # embedded corpus name, or the HF dataset name for source=hf
    path: null              # local file, glob, folder, or a list of them: .txt .json .jsonl .parquet
    hf_config: null         # HF dataset configuration name
    split: train            # HF split (local files are one split)
    streaming: false        # read lazily instead of converting to Arrow first (the Pile: true)
    text_field: text        # the record field holding the document
    max_documents: null     # stop after this many records (null: all)
    sample_by: paragraph    # .txt files only: a document per line | paragraph | document (file)

Local files and HF datasets are read by `datasets.load_dataset`, streaming or not, one local file
at a time so that every error names its file. A malformed JSON line is found by re-reading the
file when `datasets` fails (its own error gives neither file nor line), so valid files pay nothing.
No network is touched for local and embedded sources: the json/text/parquet builders are packaged.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from palmrl.data import embedded
from palmrl.errors import UserError
from palmrl.io import check_json_depth

# the json builder logs "Failed to load JSON ..." before raising; we raise a better error instead
logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)


def _datasets():
    """`datasets`, imported when a source first needs it (~1 s): a run whose tokenised data is cached
    never pays for it."""
    import datasets

    return datasets

FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # extension -> builder
DEFAULTS: dict[str, Any] = {
    "source": "embedded",  # works offline out of the box
    "name": None,  # source=embedded reads None as "chitchat", the corpus shipped with the package
    "path": None,
    "hf_config": None,
    "split": "train",
    "streaming": False,  # Arrow conversion is faster to re-read; stream only what can't fit on disk
    "text_field": "text",  # the field name of the Pile, C4, OpenWebText and `datasets` text files
    "max_documents": None,
    "sample_by": "paragraph",  # .txt: blank-line separated paragraphs are documents, as in prose dumps
}


def load_records(data_cfg: Mapping) -> Iterator[dict]:
    """Records of the configured source as plain dicts, in a deterministic order."""
    for _origin, record in _records_with_origin(data_cfg):
        yield record


def load_texts(data_cfg: Mapping) -> Iterator[str]:
    """Documents (the `text_field` of each record), blank ones skipped; UserError if none."""
    field = _get(data_cfg, "text_field")
    count = 0
    for index, (origin, record) in enumerate(_records_with_origin(data_cfg)):
        if field not in record:
            fields = ", ".join(sorted(record)) or "none"
            raise UserError(f"data.text_field={field!r} is not a field of {origin} (its fields: {fields})")
        text = record[field]
        if not isinstance(text, str):
            raise UserError(f"{origin}: record {index} has no text in data.text_field={field!r} "
                            f"(got {type(text).__name__})")
        if text.strip():  # blank documents would only add an eos to the stream
            count += 1
            yield text
    if count == 0:
        raise UserError(f"the corpus {describe(data_cfg)} is empty: no text in data.text_field={field!r}")


def source_fingerprint(data_cfg: Mapping) -> str:
    """A stable id of the documents the config yields, for caching token shards.

    Local files count by path, size and modification time (cheap, and any edit changes it); HF
    datasets by name, config and split; embedded corpora by package and rendering version.
    """
    source = _get(data_cfg, "source")
    identity: dict[str, Any] = {
        "source": source,
        "text_field": _get(data_cfg, "text_field"),
        "max_documents": _get(data_cfg, "max_documents"),
    }
    if source == "embedded":
        identity["corpus"] = embedded.embedded_version(_embedded_name(data_cfg))
    elif source == "local":
        identity["sample_by"] = _get(data_cfg, "sample_by")
        identity["files"] = [
            [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] for path in resolve_paths(data_cfg)
        ]
    elif source == "hf":
        identity.update(name=_get(data_cfg, "name"), hf_config=_get(data_cfg, "hf_config"),
                        split=_get(data_cfg, "split"))
    else:
        _unknown_source(source)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def describe(data_cfg: Mapping) -> str:
    """A short human name of the source, for messages: "local:corpus/*.jsonl"."""
    source = _get(data_cfg, "source")
    detail = {"local": _get(data_cfg, "path"), "embedded": _embedded_name(data_cfg)}.get(source, _get(data_cfg, "name"))
    if isinstance(detail, Sequence) and not isinstance(detail, str):
        detail = ",".join(str(d) for d in detail)
    return f"{source}:{detail}"


def resolve_paths(data_cfg: Mapping) -> list[Path]:
    """The files `data.path` names: files, globs (** allowed) and folders (their .txt .json .jsonl
    .parquet files, recursively), sorted, deduplicated."""
    value = _get(data_cfg, "path")
    if value is None or value == "" or value == []:
        raise UserError("data.path is not set; source=local needs a file, glob or folder")
    entries = [value] if isinstance(value, (str, Path)) else list(value)
    paths: list[Path] = []
    for entry in entries:
        entry = str(Path(str(entry)).expanduser())
        if any(c in entry for c in "*?["):  # a glob pattern
            matches = [Path(m) for m in sorted(glob.glob(entry, recursive=True)) if Path(m).is_file()]
        elif Path(entry).is_dir():
            matches = sorted(
                p for p in Path(entry).rglob("*")
                if p.is_file() and p.suffix in FORMATS
                and not any(part.startswith(".") for part in p.relative_to(entry).parts)
            )  # hidden files and folders (.cache, .git) are not data
        elif Path(entry).is_file():
            matches = [Path(entry)]
        else:
            matches = []
        if not matches:
            raise UserError(f"data.path={entry!r} matches no file")
        for path in matches:
            if path.suffix not in FORMATS:
                raise UserError(f"data.path: {path} has an unsupported extension; use one of {', '.join(FORMATS)}")
        paths.extend(matches)
    return list(dict.fromkeys(paths))  # keep the first occurrence of each file


def _records_with_origin(data_cfg: Mapping) -> Iterator[tuple[str, dict]]:
    """(where it came from, record) pairs: the origin names the file or dataset in errors."""
    source = _get(data_cfg, "source")
    if source == "embedded":
        records = _embedded_records(_embedded_name(data_cfg))
    elif source == "local":
        records = _local_records(resolve_paths(data_cfg), _get(data_cfg, "streaming"), _get(data_cfg, "sample_by"))
    elif source == "hf":
        records = _hf_records(data_cfg)
    else:
        _unknown_source(source)
    limit = _get(data_cfg, "max_documents")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UserError(f"data.max_documents={limit!r} must be a positive integer or null")
    yield from itertools.islice(records, limit)


def _embedded_records(name: str) -> Iterator[tuple[str, dict]]:
    # in-memory Arrow table: the same record types as the other sources, nothing written to disk
    table = _datasets().Dataset.from_list(list(embedded.embedded_records(name)))
    for record in table:
        yield f"embedded corpus {name!r}", record


def _local_records(paths: list[Path], streaming: bool, sample_by: str) -> Iterator[tuple[str, dict]]:
    if sample_by not in ("line", "paragraph", "document"):
        raise UserError(f"data.sample_by={sample_by!r} is unknown; use line, paragraph or document")
    for path in paths:
        if path.stat().st_size == 0:
            continue  # `datasets` fails on an empty file instead of reading no records
        builder = FORMATS[path.suffix]
        if builder == "json":
            check_json_depth(path)
        options = {"sample_by": sample_by} if builder == "text" else {}
        try:
            with _quiet_datasets():
                table = _datasets().load_dataset(
                    builder, data_files=str(path), split="train", streaming=streaming, **options
                )
            for record in table:  # streaming reads (and fails) here, not in load_dataset
                yield str(path), record
        except (_datasets().exceptions.DatasetGenerationError, ValueError, RecursionError) as exc:
            if builder != "parquet":
                check_utf8(path)
            bad_line = find_malformed_json(path) if builder == "json" else None
            if bad_line is not None:
                raise UserError(bad_line) from exc
            if not _holds_no_records(exc):
                raise UserError(f"{path}: could not read its records ({_root_cause(exc)})") from exc


def _hf_records(data_cfg: Mapping) -> Iterator[tuple[str, dict]]:
    name = _get(data_cfg, "name")
    if not name:
        raise UserError("data.name is not set; source=hf needs a Hugging Face dataset name")
    try:
        with _quiet_datasets():
            table = _datasets().load_dataset(
                name, _get(data_cfg, "hf_config"), split=_get(data_cfg, "split"), streaming=_get(data_cfg, "streaming")
            )
    except (ConnectionError, FileNotFoundError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"data.name={name!r}: could not load the Hugging Face dataset ({reason})") from exc
    for record in table:
        yield f"HF dataset {name!r}", record


def check_utf8(path: Path) -> None:
    """Text sources must be UTF-8: name the first line that is not (binary garbage, latin-1...)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path}:{number}: not UTF-8 text (byte 0x{line[err.start]:02x} at column "
                                f"{err.start + 1}); re-encode the file as UTF-8") from None


def _json_kind(value: Any) -> str | None:
    if value is None:
        return None  # null fits any column
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}[type(value)]


def find_malformed_json(path: Path) -> str | None:
    """"file:line: message" for the first line of a JSON or JSON-lines file that cannot become a
    table row: not valid JSON, not an object, or a field whose type differs from earlier lines."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):  # one JSON document (an array of records)
        try:
            rows = [(None, row) for row in json.loads(text)]
        except json.JSONDecodeError as exc:
            return f"{path}:{exc.lineno}: malformed JSON ({exc.msg})"
        except RecursionError:
            return f"{path}: JSON nested too deeply"
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    return f"{path}:{number}: malformed JSON line ({exc.msg})"
                except RecursionError:
                    return f"{path}:{number}: JSON nested too deeply"
    first_seen: dict[str, tuple[str, Any]] = {}
    for index, (number, row) in enumerate(rows):
        where = f"{path}:{number}" if number is not None else f"{path}: record #{index}"
        if not isinstance(row, dict):
            return f"{where}: expected a JSON object with named fields, got {_json_kind(row) or 'null'}"
        for key, value in row.items():
            kind = _json_kind(value)
            if kind is None:
                continue
            if key not in first_seen:
                first_seen[key] = (kind, number if number is not None else f"record #{index}")
            elif first_seen[key][0] != kind:
                earlier_kind, earlier = first_seen[key]
                return f"{where}: field '{key}' is {kind} here but {earlier_kind} at line {earlier}"
    return None


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def _holds_no_records(exc: Exception) -> bool:
    """`datasets`' ways of failing on a file without records (blank lines only)."""
    no_schema = isinstance(exc.__cause__, _datasets().arrow_writer.SchemaInferenceError)  # text builder
    return no_schema or "corresponds to no data" in str(exc)  # json builder


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide `datasets`' "Generating train split" bars while it reads; restore them after."""
    was_disabled = _datasets().utils.are_progress_bars_disabled()
    _datasets().disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            _datasets().enable_progress_bars()


def _get(data_cfg: Mapping, key: str) -> Any:
    value = data_cfg.get(key, DEFAULTS[key])
    return DEFAULTS[key] if value is None and key in ("source", "split", "text_field", "sample_by") else value


def _embedded_name(data_cfg: Mapping) -> str:
    return _get(data_cfg, "name") or embedded.EMBEDDED_CORPORA[0]


def _unknown_source(source: Any) -> None:
    raise UserError(f"data.source={source!r} is unknown; use embedded, local or hf")
