"""Reading raw examples (rows of strings) from the sources users have.

Local files are read with the standard library rather than `datasets`' loaders: every rank
reads them, and this gives exact one-line errors (file, column, encoding) with no cache
directories shared between ranks. Hub dataset names go through `datasets.load_dataset`.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from engine.config import BUILTIN_SAMPLE
from engine.errors import EngineError

BUILTIN_INSTRUCT = "builtin:instruct"  # the project's own generated chat records (engine/sample.py)
TEXT_SUFFIXES = (".txt", ".text", ".md")
# data.format -> reader; "auto" guesses from the extension
SUFFIX_FORMATS = {**{s: "text" for s in TEXT_SUFFIXES}, ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
                  ".json": "json"}


def _read_text(path: Path, field: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise EngineError(f"{field}: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except OSError as e:
        raise EngineError(f"{field}: cannot read {path}: {e.strerror}") from None


def _rows_from_txt(files: list[Path], field: str) -> list[dict]:
    # one row per line with its line break kept, as run_clm's text loader does
    rows = []
    for f in files:
        rows.extend({"text": line} for line in _read_text(f, field).splitlines(keepends=True) if line.strip())
    return rows


def _rows_from_csv(path: Path, field: str, delimiter: str = ",", quoting=csv.QUOTE_MINIMAL,
                   header: tuple[str, ...] | None = None) -> list[dict]:
    text = _read_text(path, field)
    csv.field_size_limit(sys.maxsize)
    # newline="" keeps line breaks inside quoted fields intact
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, fieldnames=header)
    try:
        return [dict(r) for r in reader]
    except csv.Error as e:
        raise EngineError(f"{field}: {path} is not valid CSV: {e}") from None


def _rows_from_jsonl(path: Path, field: str) -> list[dict]:
    text = _read_text(path, field)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise EngineError(f"{field}: {path} is not valid JSON: {e}") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EngineError(f"{field}: {path} line {n} is not valid JSON: {e.msg}") from None
    if not all(isinstance(r, dict) for r in rows):
        raise EngineError(f"{field}: {path} must hold JSON objects, one per example")
    return rows


def resolve_glue_file(source: str, split: str, dev_file: str) -> Path | None:
    """A GLUE task folder stands for its train.tsv / dev file."""
    p = Path(source)
    if p.is_dir() and (p / "train.tsv").exists():
        return p / ("train.tsv" if split == "train" else dev_file)
    return None


def file_format(path: Path, field: str, fmt: str = "auto", glue: bool = False) -> str:
    """How a local file is read: data.format when set, else its extension. With a GLUE task, a file
    that is not .csv/.jsonl/.json is GLUE TSV whatever its extension (GLUE's own distribution ships
    labelled MRPC splits as tab-separated .txt files)."""
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    guessed = SUFFIX_FORMATS.get(suffix)
    if glue and guessed not in ("csv", "jsonl", "json"):
        return "tsv"
    if guessed is None:
        raise EngineError(f"{field}: unsupported file type {suffix!r} ({path}); use .txt, .csv, .tsv, .jsonl or "
                          ".json, or set data.format (text, csv, tsv, jsonl, json)")
    return guessed


def read_rows(source: str, field: str, *, split: str = "train", hub_config: str | None = None,
              tsv_header: tuple[str, ...] | None = None, dev_file: str = "dev.tsv", fmt: str = "auto",
              glue: bool = False) -> list[dict]:
    """Rows (dicts of column -> string) from a file, folder, hub dataset or the built-in sample.
    fmt is data.format (auto = by extension); glue: a GLUE task is set (its files are TSV)."""
    if source == BUILTIN_SAMPLE:
        from engine.sample import sample_corpus
        return [{"text": t} for t in sample_corpus()]
    if source == BUILTIN_INSTRUCT:
        from engine.sample import sample_instructions
        return [dict(r) for r in sample_instructions()]
    path = Path(source).expanduser()
    glue_file = resolve_glue_file(source, split, dev_file)
    if glue_file is not None:
        path = glue_file
    if path.is_dir():
        if fmt not in ("auto", "text"):
            raise EngineError(f"{field}: {path} is a folder (read as .txt files); data.format={fmt} needs a file")
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise EngineError(f"{field}: folder {path} holds no .txt files")
        rows = _rows_from_txt(files, field)
    elif path.is_file():
        kind = file_format(path, field, fmt, glue)
        if kind == "text":
            rows = _rows_from_txt([path], field)
        elif kind == "csv":
            rows = _rows_from_csv(path, field)
        elif kind == "tsv":
            # GLUE TSVs carry unbalanced quotes: a quoting CSV parser merges or breaks rows
            rows = _rows_from_csv(path, field, "\t", csv.QUOTE_NONE, tsv_header)
        else:  # jsonl / json: one reader takes JSON lines and a JSON array
            rows = _rows_from_jsonl(path, field)
    elif looks_local(source):
        raise EngineError(f"{field}: data file not found: {source}")
    else:
        rows = _rows_from_hub(source, field, split, hub_config)
    if not rows:
        raise EngineError(f"{field}: {source} holds no examples")
    return rows


def looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix != "" or source.count("/") > 1


def _rows_from_hub(name: str, field: str, split: str, hub_config: str | None) -> list[dict]:
    import datasets
    try:
        ds = datasets.load_dataset(name, hub_config, split=split)
    except Exception as e:  # offline, unknown name, missing split: all user-facing
        raise EngineError(f"{field}: could not load hub dataset {name!r} split {split!r}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return [dict(r) for r in ds]


def require_column(rows: list[dict], column: str, field: str, source: str) -> None:
    if column not in rows[0]:
        cols = ", ".join(map(str, rows[0].keys()))
        raise EngineError(f"{field}={column!r} not found in {source}; columns are: {cols}")
