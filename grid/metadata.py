"""`grid data fetch`: real item text for the Amazon 2014 datasets from their public metadata.

The Amazon 2014 per-category metadata (McAuley, UCSD; e.g. `meta_Beauty.json.gz`) holds one
Python dict literal per line: `{'asin': ..., 'title': ..., 'brand': ..., 'categories': [[...]],
'price': ..., 'description': ..., ...}`. Lines are read with `ast.literal_eval` (never `eval`),
joined to the bundled catalogue by ASIN, and the bundled items with their text fields filled in
are written to the user's data folder (`grid.data.user_data_dir`), never to the bundled files.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import math
import re
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig
from tqdm.auto import tqdm

from grid.data import fetched_items_file, load_sequences
from grid.errors import GridError

TEXT_FIELDS = ("title", "brand", "categories", "price", "description")
MIN_MATCHED = 0.5  # below this share of the catalogue found, the file is another dataset's
CHUNK = 1 << 20
# A record's ASIN without parsing it: lines of items outside the catalogue are skipped unparsed.
ASIN = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")


def parse_record(line: str) -> dict | None:
    """One metadata line as a dict with a string 'asin', or None when the line is malformed.

    Python literals first (the 2014 files), then JSON (`true`/`null`), both without evaluation.
    """
    try:
        record = ast.literal_eval(line)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return None
    if not isinstance(record, dict) or not isinstance(record.get("asin"), str):
        return None
    return record


def _clean(value) -> str | None:
    """A text value with its whitespace collapsed; None when empty or not text."""
    if isinstance(value, list | tuple):  # later dumps keep descriptions as lists of paragraphs
        value = " ".join(v for v in value if isinstance(v, str))
    if not isinstance(value, str):
        return None
    return " ".join(value.split()) or None


def text_fields(record: dict) -> dict:
    """The item text of a metadata record: categories (a list of category paths) flattened to
    their distinct names in order, the price as a number, missing or empty values as None."""
    categories: list[str] = []
    for path in record.get("categories") or []:
        for name in path if isinstance(path, list | tuple) else [path]:
            name = _clean(name)
            if name and name not in categories:
                categories.append(name)
    price = record.get("price")
    if isinstance(price, bool) or not isinstance(price, int | float) or not math.isfinite(price):
        price = None
    return {
        "title": _clean(record.get("title")),
        "brand": _clean(record.get("brand")),
        "categories": categories or None,
        "price": None if price is None else float(price),
        "description": _clean(record.get("description")),
    }


@dataclass
class MetadataScan:
    """What one pass over a metadata file found for the catalogue's ASINs."""

    records: dict[str, dict] = field(default_factory=dict)  # ASIN -> text_fields
    lines: int = 0  # non-blank
    malformed: int = 0
    first_malformed: int | None = None
    duplicates: int = 0


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def read_metadata(path: Path, asins: set[str]) -> MetadataScan:
    """Stream a metadata file (gzipped or plain): the text fields of the records of `asins`.

    Only lines whose ASIN is in `asins`, or cannot be seen without parsing, are parsed; a
    malformed one is counted and skipped. A repeated ASIN keeps its first record.
    """
    scan = MetadataScan()
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                scan.lines += 1
                seen = ASIN.search(line)
                if seen and seen.group(1) not in asins:
                    continue
                record = parse_record(line)
                if record is None:
                    scan.malformed += 1
                    scan.first_malformed = scan.first_malformed or number
                elif record["asin"] in scan.records:
                    scan.duplicates += 1
                elif record["asin"] in asins:
                    scan.records[record["asin"]] = text_fields(record)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise GridError(
            f"{path} is a truncated or corrupt gzip file ({e}); download it again"
        ) from None
    except OSError as e:
        raise GridError(f"cannot read {path}: {e.strerror or e}; check the file") from None
    return scan


def sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, retry_hint: str) -> Path:
    """Stream `url` to `dest` through `dest.part`, renamed once complete; `retry_hint` ends
    the error message when the download fails."""
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            expected = response.headers.get("Content-Length")
            total = int(expected) if expected and expected.isdigit() else None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=dest.name, leave=False, disable=None
            ) as bar:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            written = f.tell()
        if total is not None and written != total:
            raise GridError(
                f"download of {url} stopped after {written:,} of {total:,} bytes; {retry_hint}"
            )
    except (urllib.error.URLError, ValueError, OSError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise GridError(f"cannot download {url} ({reason}); {retry_hint}") from None
    except GridError:
        part.unlink(missing_ok=True)
        raise
    part.replace(dest)
    return dest


def _write_items(path: Path, items: list[dict]) -> None:
    """Gzipped JSON lines, byte-identical for identical items (no name or time in the header,
    so the dataset fingerprint, and with it the embedding cache, follows the content only)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        for item in items:
            f.write((json.dumps(item, ensure_ascii=False) + "\n").encode())
    tmp.replace(path)


@dataclass
class FetchResult:
    """What `fetch` did: counts for the report line and where it wrote."""

    dataset: str
    source: Path
    sha256: str
    scan: MetadataScan
    items: int
    with_text: int
    field_counts: dict[str, int]
    items_file: Path


def fetch(
    cfg: DictConfig,
    choice: str,
    url: str | None = None,
    source: str | Path | None = None,
    say=print,
) -> FetchResult:
    """Fill the text fields of `cfg`'s catalogue (a composed `data` config, picked as
    `data=choice`) from its metadata: downloaded from `url` (default `data.metadata_url`) or
    read from the `source` file. `say` reports progress."""
    if "metadata_url" not in cfg:
        raise GridError(
            f"data={choice} has no metadata to fetch (no data.metadata_url): its bundled "
            f"items already carry their text; fetch is for the Amazon 2014 datasets"
        )
    dataset = load_sequences(cfg.path, cfg.name)  # the bundled catalogue
    items_file = fetched_items_file(cfg.name)
    try:
        items_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GridError(
            f"cannot create {items_file.parent} ({e.strerror}); set GRID_DATA to a writable folder"
        ) from None
    if source is None:
        url = url or cfg.metadata_url
        dest = items_file.parent / (Path(urlparse(url).path).name or "metadata.json.gz")
        hint = (
            f"without internet, download it by hand and run `grid data fetch {choice} --from FILE`"
        )
        source = download(url, dest, hint)
        say(f"downloaded {url} -> {dest} ({dest.stat().st_size / 2**20:,.1f} MiB)")
    source = Path(source)
    if not source.is_file():
        raise GridError(f"metadata file {source} does not exist; give the downloaded file")
    digest = sha256(source)
    if cfg.get("metadata_sha256") and digest != cfg.metadata_sha256:
        raise GridError(
            f"{source} has sha256 {digest}, but data.metadata_sha256 is {cfg.metadata_sha256}; "
            f"download it again (or set data.metadata_sha256 to the file you trust)"
        )
    scan = read_metadata(source, set(dataset.item_ids))
    n = dataset.num_items
    if scan.lines == 0 or scan.malformed == scan.lines:
        raise GridError(
            f"{source} holds no metadata records; expected one dict per line like "
            f"{{'asin': ..., 'title': ...}} (the Amazon 2014 meta_<Category>.json.gz)"
        )
    if len(scan.records) < MIN_MATCHED * n:
        raise GridError(
            f"only {len(scan.records):,} of the {n:,} {cfg.name} items are in {source}; it is "
            f"not this dataset's metadata (expected {Path(urlparse(cfg.metadata_url).path).name})"
        )
    items = [
        {**item, **scan.records[item_id]} if item_id in scan.records else item
        for item_id, item in zip(dataset.item_ids, dataset.items, strict=True)
    ]
    counts = {k: sum(item.get(k) is not None for item in items) for k in TEXT_FIELDS}
    with_text = sum(any(item.get(k) is not None for k in TEXT_FIELDS) for item in items)
    _write_items(items_file, items)
    provenance = {
        "dataset": cfg.name,
        "source": str(source),
        "url": url,
        "sha256": digest,
        "lines": scan.lines,
        "malformed_lines": scan.malformed,
        "duplicate_asins": scan.duplicates,
        "items": n,
        "items_with_text": with_text,
        "field_counts": counts,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (items_file.parent / "metadata.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return FetchResult(cfg.name, source, digest, scan, n, with_text, counts, items_file)


def describe(result: FetchResult, choice: str) -> str:
    """The lines `grid data fetch` prints about a finished fetch."""
    scan = result.scan
    malformed = f"{scan.malformed:,} malformed"
    if scan.first_malformed:
        malformed += f" (skipped; first: line {scan.first_malformed})"
    fields = ", ".join(f"{k} {v:,}" for k, v in result.field_counts.items())
    missing = result.items - len(scan.records)
    return (
        f"read {result.source}: {scan.lines:,} lines, {malformed}; sha256 {result.sha256}\n"
        f"{result.with_text:,} of {result.items:,} {result.dataset} items got text ({fields}); "
        f"{missing:,} not in the metadata keep their pseudo text\n"
        f"wrote {result.items_file}; use it with data.text=metadata "
        f"(grid run data={choice} data.text=metadata)"
    )
