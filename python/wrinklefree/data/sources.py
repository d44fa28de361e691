"""Sources: where documents come from. A source yields documents (non-empty ``str``) in the same order every
time it is iterated; shuffling, holding out eval documents and tokenizing happen downstream (packing.py).

    BuiltinSource(max_chars)                        the built-in corpus (corpus.py)
    LocalFilesSource(paths, text_field)             .txt (a document per file), .jsonl, .parquet
    HFDatasetSource(name, config, split, ...)       a Hugging Face dataset through the `datasets` library
    build_source({"type": "builtin"|"local"|"hf", ...})
"""

from __future__ import annotations

import abc
import glob
import hashlib
import inspect
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from wrinklefree.data.corpus import builtin_corpus, corpus_key

SUFFIXES = (".txt", ".jsonl", ".parquet")


class Source(abc.ABC):
    """Documents in a fixed order. ``cache_key`` is set by sources that are fixed and small enough for their
    token ids to be cached on disk (a string that changes whenever the documents do); None otherwise."""

    cache_key: str | None = None

    @abc.abstractmethod
    def documents(self) -> Iterator[str]:
        """The documents, non-empty strings, in the same order on every call."""

    def __iter__(self) -> Iterator[str]:
        return self.documents()

    def contents(self) -> str | None:
        """What the documents are read from, where the source can tell cheaply (a resumed run compares
        it with the saved one); None where it cannot."""
        return None


class BuiltinSource(Source):
    """:func:`~wrinklefree.data.builtin_corpus` as a source; its token ids are cached on disk."""

    def __init__(self, max_chars: int = 16_000_000) -> None:
        if max_chars < 1:
            raise ValueError(f"BuiltinSource: max_chars must be >= 1, got {max_chars}")
        self.max_chars = int(max_chars)
        self.cache_key = corpus_key(self.max_chars)

    def documents(self) -> Iterator[str]:
        return iter(builtin_corpus(self.max_chars))

    def __repr__(self) -> str:
        return f"BuiltinSource(max_chars={self.max_chars})"


class LocalFilesSource(Source):
    """Documents from local files, in the order of ``paths`` (each glob or folder expanded in sorted order).

    ``paths``: a path, a glob (``**`` allowed) or a folder (its .txt/.jsonl/.parquet files, recursively), or a
    list of them. A ``.txt`` file is one document (the whole file, UTF-8); a ``.jsonl`` line is one document
    (the string field ``text_field``); a ``.parquet`` row is one document (column ``text_field``, needs pyarrow).
    Empty documents are skipped; a file named twice (by two patterns) is read once, where it first appears.
    Raises FileNotFoundError naming a path or glob that matches nothing, ValueError naming a file that is
    not UTF-8 or holds a row that is not text.
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], text_field: str = "text") -> None:
        if isinstance(paths, (str, Path)):
            paths = [paths]
        if not paths:
            raise ValueError("LocalFilesSource: paths is empty (give files, globs or folders)")
        self.paths = [str(p) for p in paths]
        self.text_field = text_field
        self.files = list(dict.fromkeys(f.resolve() for p in self.paths for f in _expand(p)))
        if any(_kind(f) == ".parquet" for f in self.files):
            _import_pyarrow()

    def documents(self) -> Iterator[str]:
        for f in self.files:
            if _kind(f) == ".txt":
                try:
                    text = f.read_text(encoding="utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{f}: not UTF-8 text (byte {e.start}: {e.reason})") from None
                if text:
                    yield text
            elif _kind(f) == ".jsonl":
                yield from _read_jsonl(f, self.text_field)
            else:
                yield from _read_parquet(f, self.text_field)

    def contents(self) -> str:
        """The files' names (without their folders, so that a moved data folder matches) and sizes."""
        sizes = [f.stat().st_size for f in self.files]
        listing = "\n".join(f"{f.name} {size}" for f, size in zip(self.files, sizes, strict=True))
        digest = hashlib.sha256(listing.encode()).hexdigest()[:16]
        return f"{len(self.files)} files, {sum(sizes)} bytes, sha256 {digest}"

    def __repr__(self) -> str:
        return f"LocalFilesSource({self.paths!r}, text_field={self.text_field!r})"


class HFDatasetSource(Source):
    """A Hugging Face dataset's ``text_field`` column, one document per row, via ``datasets.load_dataset``.

    ``streaming=True`` reads rows as they arrive (nothing is downloaded up front; memory stays bounded).
    ``data_files`` and ``revision`` are passed through, e.g. ``HFDatasetSource("json", data_files="a.jsonl")``
    for local files.
    """

    def __init__(
        self,
        name: str,
        config: str | None = None,
        split: str = "train",
        text_field: str = "text",
        streaming: bool = True,
        data_files: str | list[str] | dict | None = None,
        revision: str | None = None,
    ) -> None:
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise ImportError("HFDatasetSource needs the `datasets` package: pip install datasets") from None
        self.name, self.config, self.split = name, config, split
        self.text_field, self.streaming = text_field, bool(streaming)
        self.data_files, self.revision = data_files, revision
        self._dataset = None

    def documents(self) -> Iterator[str]:
        if self._dataset is None:
            import datasets

            self._dataset = datasets.load_dataset(
                self.name,
                self.config,
                split=self.split,
                streaming=self.streaming,
                data_files=self.data_files,
                revision=self.revision,
            )
        for row in self._dataset:
            text = row.get(self.text_field)
            if not isinstance(text, str):
                raise ValueError(f"{self!r}: rows have no string field {self.text_field!r} (fields: {sorted(row)})")
            if text:
                yield text

    def __repr__(self) -> str:
        fields = f"config={self.config!r}, split={self.split!r}, text_field={self.text_field!r}"
        return f"HFDatasetSource({self.name!r}, {fields})"


SOURCE_TYPES: dict[str, type[Source]] = {"builtin": BuiltinSource, "local": LocalFilesSource, "hf": HFDatasetSource}


def build_source(spec: Mapping) -> Source:
    """A source from a config dict: ``{"type": "builtin"|"local"|"hf", **constructor arguments}``.

    A ``weight`` key is allowed and ignored (it is the mixture weight, which the caller passes to
    :func:`build_loader`). Raises ValueError naming an unknown type, unknown keys or missing keys.
    """
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in SOURCE_TYPES:
        raise ValueError(f"build_source: unknown source type {kind!r} (known: {', '.join(SOURCE_TYPES)})")
    spec.pop("weight", None)
    cls = SOURCE_TYPES[kind]
    params = inspect.signature(cls).parameters
    unknown = sorted(set(spec) - set(params))
    if unknown:
        allowed = ", ".join(["type", "weight", *params])
        raise ValueError(f"build_source: unknown keys {unknown} for source type {kind!r} (allowed: {allowed})")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in spec]
    if missing:
        raise ValueError(f"build_source: source type {kind!r} needs {missing}")
    return cls(**spec)


def sources_from_config(specs: Sequence[Mapping]) -> list[tuple[Source, float]]:
    """``(source, mixture weight)`` pairs of a ``data.sources`` list (each a :func:`build_source` spec with an
    optional ``weight``, default 1)."""
    out = []
    for i, spec in enumerate(specs):
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"data.sources[{i}].weight must be a number, got {weight!r}")
        out.append((build_source(spec), float(weight)))
    return out


def _kind(path: Path) -> str:
    """The file's type: its suffix, in any case (``.TXT`` is ``.txt``)."""
    return path.suffix.lower()


def _expand(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if glob.has_magic(pattern) and not path.exists():  # an existing path is taken as it is, brackets and all
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"LocalFilesSource: no file matches {pattern!r}")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) in SUFFIXES)
        if not files:
            raise FileNotFoundError(f"LocalFilesSource: no {'/'.join(SUFFIXES)} file under {pattern!r}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"LocalFilesSource: {pattern!r} does not exist")
    for f in files:
        if _kind(f) not in SUFFIXES:
            raise ValueError(f"LocalFilesSource: {str(f)!r} is not a {'/'.join(SUFFIXES)} file")
    return files


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}: {e.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
            text = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: no string field {text_field!r}")
            if text:
                yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    pq = _import_pyarrow()
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names})")
    import pyarrow as pa

    column_type = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ValueError(f"{path}: column {text_field!r} holds {column_type}, not strings")
    # Row batches keep memory bounded on large files.
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def _import_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading .parquet files needs pyarrow: pip install pyarrow") from None
    return pq
