"""What every dataset module shares: the row/column conventions, :class:`UnlearningData`, the
dataset registry and the loading and checking helpers.

Dataset modules (``tofu``, ``muse``, ``wmdp``) import from here and register themselves in
:data:`DATASETS`; :mod:`pipeline.data.loaders` imports them to fill the registry (from below: no
module imports the one that imports it).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import random
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.registry import Registry

log = logging.getLogger("pipeline.data.loaders")

QA_COLUMNS = ("question", "answer")
EVAL_COLUMNS = ("question", "answer", "paraphrased_answer", "perturbed_answer")
# Columns only some metrics read (truth ratio, normalised probability, paraphrase probability): a
# split may lack them (its metrics are then skipped at evaluation), but not hold them half-filled.
OPTIONAL_EVAL_COLUMNS = ("paraphrased_answer", "perturbed_answer")
TEXT_COLUMNS = ("text",)
LOCAL_FORMATS = (("jsonl", "json"), ("json", "json"), ("parquet", "parquet"))


class DataError(ValueError):
    """Bad or inconsistent data; the message names dataset, split and column."""


@dataclass
class UnlearningData:
    name: str
    forget: list[dict]
    retain: list[dict]
    eval: dict[str, list[dict]] = field(default_factory=dict)
    forget_split: str = "forget"
    retain_split: str = "retain"
    # Columns every forget/retain row must have (QA pairs, or ``("text",)`` for raw corpora) and,
    # per eval split, the columns it must have (splits not listed: ``QA_COLUMNS``; the truth-ratio
    # columns ``OPTIONAL_EVAL_COLUMNS`` are checked where present).
    train_columns: tuple = QA_COLUMNS
    eval_columns: dict[str, tuple] = field(default_factory=dict)


DATASETS: Registry[Callable[..., UnlearningData]] = Registry("dataset")


# The repository root: conf/data/*.yaml name the package's own data relative to it
# (realworld_facts.yaml: pipeline/data/realworld_facts).
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_data_path(path: str | Path) -> Path:
    """``data.path`` as it is read everywhere (the early check and every loader alike): ``~`` expanded;
    a relative path that does not exist from the working directory but does from the repository root
    is taken from there, so the package's own data (``pipeline/data/realworld_facts``) is found from
    any directory. A path that exists from the working directory always wins (what a user means)."""
    p = Path(str(path)).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    return p


def load_json_split(data_dir: str | Path, split: str, dataset: str) -> list[dict]:
    """Rows of ``<data_dir>/<split>.jsonl`` (or ``.json`` / ``.parquet``) with ``datasets`` (the same
    code path as hub datasets). Not found: a :class:`DataError` listing the splits there are, and
    files named like the split in a format that is not read (e.g. ``forget.csv``)."""
    return read_split_file(data_dir, split, dataset)[1]


def read_split_file(data_dir: str | Path, split: str, dataset: str) -> tuple[Path, list[dict]]:
    """:func:`load_json_split` and the file the rows came from (for messages naming it)."""
    f, builder = find_split_file(data_dir, split, dataset)
    return f, _load_local_file(f, builder, dataset, split)


def find_split_file(data_dir: str | Path, split: str, dataset: str) -> tuple[Path, str]:
    """The file of ``split`` in ``data_dir`` and its ``datasets`` builder, without reading it; not
    found: :func:`load_json_split`'s :class:`DataError`."""
    root = resolve_data_path(data_dir)
    found = _local_split_file(root, None, split)
    if found is None:
        exts = [ext for ext, _ in LOCAL_FORMATS]
        available = sorted({f.stem for ext in exts for f in root.glob(f"*.{ext}")})
        # a forget.csv or forget.txt next to the data: say why it was not read
        unread = sorted(f.name for f in root.glob(f"{glob.escape(split)}.*") if f.name.split(".", 1)[1] not in exts)
        hint = f"; {unread} cannot be read (convert to JSON Lines)" if unread else ""
        raise DataError(f"dataset {dataset!r}: split {split!r} not found at {root / split}.jsonl (or .json / "
                        f".parquet); available splits: {available}{hint}")
    return found


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Silence one library logger for a block (its error line would precede ours, less precise)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _content_cache_dir(raw: Optional[bytes], path: Path) -> str:
    """A ``datasets`` cache folder for this file's exact content. datasets keys its cache of a local
    file on the path and mtime only: a file rewritten within the same second (or copied with its mtime
    kept: cp -p, rsync -a, tar) was served from the old rows. Keyed by content, a changed file is
    converted again and an unchanged one (every rank, every re-run) reuses its conversion."""
    import datasets

    digest = hashlib.sha256()
    if raw is not None:
        digest.update(raw)
    else:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "local_files" / digest.hexdigest()[:32])


def _load_local_file(path: Path, builder: str, dataset: str, where: str) -> list[dict]:
    """Rows of a local file through ``datasets.load_dataset(builder, data_files=...)``. A JSON file
    that is not UTF-8 or not valid JSON (Lines) is a :class:`DataError` naming the file and the
    byte offset or line, instead of the library's traceback."""
    import datasets

    if builder != "json":
        if path.stat().st_size == 0:
            return []
        try:
            return [dict(r) for r in datasets.load_dataset(builder, data_files=str(path), split="train",
                                                            cache_dir=_content_cache_dir(None, path))]
        except (datasets.exceptions.DatasetGenerationError, ValueError) as e:  # pyarrow's ArrowInvalid is one
            cause = e.__cause__ or e
            raise DataError(f"dataset {dataset!r}, split {where!r}: cannot read {path} "
                            f"({type(cause).__name__}: {str(cause)[:300]}): a download or copy cut short?") from None
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"dataset {dataset!r}, split {where!r}: {path} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset "
            f"{e.start}, line {line}); JSON data must be UTF-8: re-save the file as UTF-8"
        ) from None
    if not text.strip():
        return []  # datasets cannot infer a schema from an empty file
    try:
        with _quiet_logger("datasets.packaged_modules.json.json"):
            ds = datasets.load_dataset("json", data_files=str(path), split="train",
                                       cache_dir=_content_cache_dir(raw, path))
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
        # the library names neither file nor line (its row count skips blank lines): find the line here.
        # ValueError: a line cut short right after a key's colon escapes as ujson's bare "Expected object
        # or value" (pyarrow's ArrowInvalid is one too)
        fault = _jsonl_fault(text) if path.suffix == ".jsonl" else None
        cause = e.__cause__ or e
        raise DataError(
            f"dataset {dataset!r}, split {where!r}: cannot read {path}: "
            f"{fault or f'{type(cause).__name__}: {str(cause)[:300]}'}"
        ) from None
    return [dict(r) for r in ds]


def _jsonl_fault(text: str) -> Optional[str]:
    """The first line of a JSON Lines text that is not one JSON object, described; None if all are."""
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {n} is not valid JSON ({e.msg}, column {e.colno}); each line must be one JSON object"
        if not isinstance(obj, dict):
            return f"line {n} holds a JSON {type(obj).__name__}, not an object; each line must be one JSON object"
    return None


def _local_split_file(root: Path, subset: Optional[str], split: str) -> Optional[tuple[Path, str]]:
    """The one file of ``split`` under ``root`` (``<split>.jsonl``, ``.json`` or ``.parquet``) and its
    ``datasets`` builder; None when there is none."""
    base = root / subset if subset else root
    found = []
    for ext, builder in LOCAL_FORMATS:
        f = base / f"{split}.{ext}"
        if f.is_file():
            found.append((f, builder))
        elif f.is_symlink() or f.exists():  # a directory, or a link to nothing or to itself: not "not found"
            what = "a directory" if f.is_dir() else "a link that leads to no file"
            raise DataError(f"split {split!r}: {f} is {what}, not a data file")
    if len(found) > 1:  # one was read without a word: a stale copy beside a newer one trained on the wrong rows
        raise DataError(f"split {split!r}: {len(found)} files for it in {base} ({', '.join(f.name for f, _ in found)}); "
                        f"keep one")
    return found[0] if found else None


# ``<split>-00000-of-00002.parquet``: how the hub names a split's shards (``push_to_hub``)
_SHARD = re.compile(r"(?P<split>.+)-\d{5}-of-\d{5}")


def _shard_files(base: Path, split: str) -> list[tuple[Path, str]]:
    """``<base>/<split>-NNNNN-of-NNNNN.{jsonl,json,parquet}`` shards in order, each with its builder:
    a snapshot's files when its README.md (which names them) is missing."""
    out = []
    for ext, builder in LOCAL_FORMATS:
        for f in sorted(base.glob(f"{glob.escape(split)}-*.{ext}")):
            m = _SHARD.fullmatch(f.name[: -len(ext) - 1])
            if m and m["split"] == split:
                out.append((f, builder))
    return out


def readme_configs(root: Path) -> dict[str, Any]:
    """``{config_name: data_files}`` of the ``configs:`` list in the YAML front matter of
    ``<root>/README.md`` (a hub snapshot's dataset card; ``data_files`` None where the card gives
    none); ``{}`` without such a card."""
    import yaml

    readme = root / "README.md"
    if not readme.is_file():
        return {}
    m = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", readme.read_text(encoding="utf-8", errors="replace"),
                 re.DOTALL)
    if not m:
        return {}
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as e:
        raise DataError(f"{readme}: the YAML front matter does not parse: {str(e)[:300]}") from None
    configs = (meta.get("configs") or []) if isinstance(meta, dict) else []
    return {str(c["config_name"]): c.get("data_files") for c in configs if isinstance(c, dict) and c.get("config_name")}


def _load_card_config(root: Path, subset: str, data_files: Any, split: str, dataset: str, where: str) -> list[dict]:
    """Rows of one split of a config of a local hub snapshot, from the files its card names.

    The card's ``data_files`` patterns are read with the ``datasets`` library's own rules
    (``sanitize_patterns``: a path or list of paths is split ``train``; ``DataFilesList.from_patterns``:
    the hub's glob semantics, shards in order), for the wanted split only, and each file is loaded
    as a local file (:func:`_load_local_file`). Not ``load_dataset(<dir>, config)``: that resolves the
    files of the card's first config too, so a partial download (``hf download --include ...``, a
    WMDP directory merged from three repos) would fail on files nobody asked for.
    """
    import datasets
    from datasets.data_files import DataFilesList, sanitize_patterns

    card = root / "README.md"
    if data_files is None:  # a config given by data_dir only: the library resolves it
        try:
            ds = datasets.load_dataset(str(root), subset, split=split)  # a local directory: never a hub id
        except (ValueError, KeyError, FileNotFoundError, OSError, datasets.exceptions.DatasetGenerationError) as e:
            raise DataError(f"dataset {dataset!r}: cannot load split {where!r} from {root} (config of {card}): "
                            f"{type(e).__name__}: {str(e)[:300]}") from None
        return [dict(r) for r in ds]
    splits = sanitize_patterns(data_files)
    if split not in splits:
        raise DataError(f"dataset {dataset!r}: split {where!r} not found: config {subset!r} of {card} has splits "
                        f"{sorted(splits)}")
    files = [Path(f) for f in DataFilesList.from_patterns(splits[split], base_path=str(root))]
    if not files:  # e.g. a partial download
        raise DataError(f"dataset {dataset!r}: split {where!r}: no file under {root} matches {splits[split]} "
                        f"(the data files {card} names for it); download them")
    builders = {f".{ext}": builder for ext, builder in LOCAL_FORMATS} | {".ndjson": "json"}
    bad = [f.name for f in files if f.suffix not in builders]
    if bad:
        raise DataError(f"dataset {dataset!r}: split {where!r}: cannot read {bad} (only JSON Lines / JSON / parquet)")
    return [r for f in files for r in _load_local_file(f, builders[f.suffix], dataset, where)]


def load_local_split(root: Path, dataset: str, subset: Optional[str], split: str) -> list[dict]:
    """Rows of ``split`` of config ``subset`` from the local directory ``root`` (``data.path``).

    Looked up in order: a config listed in ``<root>/README.md``'s ``configs:`` (an ``hf download``
    snapshot: TOFU's root-level ``forget01.json``, MUSE's and WMDP's ``<config>/<split>-NNNNN-of-NNNNN.parquet``
    shards; the card, not stray files such as MUSE's older ``.json`` next to the parquet, says which
    files are the data: :func:`_load_card_config`); else
    ``<root>/<subset>/<split>.{jsonl,json,parquet}``; else hub-named shards
    ``<root>/<subset>/<split>-NNNNN-of-NNNNN.*`` (a snapshot without its README.md, or several
    snapshots merged into one directory, whose cards overwrite each other). Not found: a
    :class:`DataError` listing the configs of the card and the splits there are.
    """
    where = f"{subset}/{split}" if subset else split
    root = resolve_data_path(root)
    if not root.is_dir():
        # never hand a missing path to load_dataset: it would read it as a hub id
        raise DataError(f"dataset {dataset!r}: data.path={str(root)!r} is not a directory (split {where!r})")
    configs = readme_configs(root)
    if subset is not None and subset in configs:
        return _load_card_config(root, subset, configs[subset], split, dataset, where)
    found = _local_split_file(root, subset, split)
    if found is not None:
        f, builder = found
        return _load_local_file(f, builder, dataset, where)
    base = root / subset if subset else root
    shards = _shard_files(base, split)
    if shards:
        return [r for f, builder in shards for r in _load_local_file(f, builder, dataset, where)]
    names = {f.stem for ext, _ in LOCAL_FORMATS for f in base.glob(f"*.{ext}")}
    available = sorted({m["split"] if (m := _SHARD.fullmatch(n)) else n for n in names})
    listed = (f"; configs in {root / 'README.md'}: {sorted(configs)}" if configs else
              f"; no dataset card with configs: at {root / 'README.md'} (an `hf download` snapshot has one)")
    raise DataError(
        f"dataset {dataset!r}: split {where!r} not found under {base} (looked for {split}.jsonl/.json/.parquet and "
        f"{split}-NNNNN-of-NNNNN shards); available splits: {available}{listed}"
    )


def load_hf_split(
    dataset: str,
    hub_id: str,
    subset: Optional[str],
    split: str,
    revision: Optional[str] = None,
    path: Optional[str | Path] = None,
) -> list[dict]:
    """Rows of ``split`` of config ``subset`` of a hub dataset, through ``datasets.load_dataset``.

    With ``path`` the rows come from that local directory (:func:`load_local_split`: an
    ``hf download`` snapshot of the dataset, or ``<path>/<subset>/<split>.{jsonl,json,parquet}``);
    otherwise ``load_dataset(hub_id, subset, split=split, revision=revision)``. A missing split or
    subset is a :class:`DataError` naming the dataset, subset and split.
    """
    import datasets

    where = f"{subset}/{split}" if subset else split
    if path:
        return load_local_split(Path(path), dataset, subset, split)
    try:
        ds = datasets.load_dataset(hub_id, subset, split=split, revision=revision)
    except (ValueError, KeyError, FileNotFoundError, ConnectionError, OSError) as e:
        raise DataError(
            f"dataset {dataset!r}: cannot load split {where!r} of {hub_id!r}"
            f"{f' at revision {revision!r}' if revision else ''}: {type(e).__name__}: {str(e)[:300]} "
            f"(offline? point data.path at a local copy: an `hf download` snapshot or <path>/<subset>/<split>.jsonl)"
        ) from e
    return [dict(r) for r in ds]


def rename_columns(rows: list[dict], mapping: dict) -> list[dict]:
    """Rename dataset columns to canonical names: ``mapping`` is ``{canonical: dataset_column}``."""
    pairs = [(canon, src) for canon, src in (mapping or {}).items() if src and src != canon]
    if not pairs:
        return rows
    out = []
    for r in rows:
        r = dict(r)
        for canon, src in pairs:
            if src in r:
                r[canon] = r.pop(src)
        out.append(r)
    return out


def check_columns(rows: Sequence[dict], required: Sequence[str], dataset: str, split: str) -> None:
    """Every ``required`` column is in the split and holds a value in every row. A JSON row without
    the key reads as null (``datasets`` gives the split one schema), which some metrics only met after
    training, inside a scorer's tokeniser (a MUSE KnowMem answer)."""
    if not rows:
        return
    cols = set(rows[0].keys())
    missing = [c for c in required if c not in cols]
    if missing:
        raise DataError(
            f"dataset {dataset!r}, split {split!r}: missing column(s) {missing}; present columns: {sorted(cols)}"
        )
    for i, r in enumerate(rows):
        empty = [c for c in required if r.get(c) is None]
        if empty:
            raise DataError(f"dataset {dataset!r}, split {split!r}, column {empty[0]!r}: row {i + 1} holds no value "
                            f"(the key is missing or null there)")


def check_optional_columns(rows: Sequence[dict], dataset: str, split: str) -> None:
    """A truth-ratio column is in every row of a split or in none (then its metrics are skipped);
    ``perturbed_answer`` holds a non-empty list of strings, ``paraphrased_answer`` a non-empty string."""
    for col in OPTIONAL_EVAL_COLUMNS:
        missing = [i for i, r in enumerate(rows) if r.get(col) is None]
        if missing and len(missing) < len(rows):
            raise DataError(
                f"dataset {dataset!r}, split {split!r}, column {col!r}: missing in {len(missing)} of {len(rows)} rows "
                f"(first: row {missing[0] + 1}); give it in every row or in none (its metrics are then skipped)"
            )
    for i, r in enumerate(rows):
        v = r.get("perturbed_answer")
        if v is not None and not (isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v)):
            raise DataError(
                f"dataset {dataset!r}, split {split!r}, column 'perturbed_answer': row {i + 1} must hold a non-empty "
                f"list of strings, got {'an empty list' if isinstance(v, (list, tuple)) and not v else type(v).__name__}"
            )
        # scored like the answer (para_prob, the truth ratio): a number failed in evaluation, after
        # the training it came after, with a TypeError traceback
        v = r.get("paraphrased_answer")
        if v is not None and not (isinstance(v, str) and v.strip()):
            raise DataError(
                f"dataset {dataset!r}, split {split!r}, column 'paraphrased_answer': row {i + 1} must hold a non-empty "
                f"string, got {'an empty string' if isinstance(v, str) else type(v).__name__}"
            )


def check_text_values(rows: Sequence[dict], columns: Sequence[str], dataset: str, split: str) -> None:
    """Question / answer cells hold non-empty strings and raw ``text`` cells strings: a null (a key
    left empty in JSON) or a number would fail later inside tokenisation, naming no row."""
    for col in columns:
        if col not in ("question", "answer", "text", "prompt", "gt"):
            continue  # other required columns (MCQ choices, indices) are checked by their loaders
        for i, r in enumerate(rows):
            v = r.get(col)
            if not isinstance(v, str):
                raise DataError(f"dataset {dataset!r}, split {split!r}, column {col!r}: row {i + 1} must hold a "
                                f"string, got {'null (the key is missing or null there)' if v is None else type(v).__name__}")
            # an empty question or answer trains on (or scores) nothing but the prompt template
            if col not in ("text", "prompt") and not v.strip():
                raise DataError(f"dataset {dataset!r}, split {split!r}, column {col!r}: row {i + 1} is empty")


def check_facts(rows: Sequence[dict], dataset: str, split: str) -> None:
    """The optional ``facts`` column holds a list of strings (fact recall iterates it: a plain
    string would be scored character by character)."""
    for i, r in enumerate(rows):
        v = r.get("facts")
        if v is None:
            continue  # optional: a row without facts (JSON Lines rows lacking the key read as null)
        bad = [x for x in v if not isinstance(x, str)] if isinstance(v, (list, tuple)) else None
        if bad is None or bad:
            got = type(v).__name__ if bad is None else f"a list holding {'null' if bad[0] is None else type(bad[0]).__name__}"
            raise DataError(f"dataset {dataset!r}, split {split!r}, column 'facts': row {i + 1} must hold a list of "
                            f"strings (e.g. [\"Melville\"]), got {got}")


def map_columns(rows: list[dict], question_column: str, answer_column: str, where: str = "") -> list[dict]:
    """Rename user-configured question/answer columns to the canonical names. A configured column
    the rows lack is a :class:`DataError` (a typo would otherwise fall back to a canonical column of
    the same file, silently); ``where`` names the file in that message."""
    if (question_column, answer_column) == ("question", "answer"):
        return rows
    check_configured_columns(rows, {"data.question_column": question_column, "data.answer_column": answer_column},
                             where)
    out = []
    for r in rows:
        r = dict(r)
        if question_column in r:
            r["question"] = r.pop(question_column)
        if answer_column in r:
            r["answer"] = r.pop(answer_column)
        out.append(r)
    return out


def check_configured_columns(rows: Sequence[dict], settings: dict[str, Optional[str]], where: str) -> None:
    """Every configured column (``{config key: column}``) is a column of ``rows`` (read from ``where``)."""
    if not rows:
        return
    present = set(rows[0])
    for key, col in settings.items():
        if col and col not in present:
            raise DataError(f"{key}={col!r}: no such column in {where or 'the data'}; present columns: {sorted(present)}")


def check_overlap(forget: Sequence[dict], retain: Sequence[dict], dataset: str, fsplit: str, rsplit: str) -> None:
    """Refuse training when an example's text is in both sets: it would be forgotten and retained."""
    def key(r: dict) -> tuple[str, str]:
        if "question" not in r and "text" in r:  # raw-text corpora (MUSE, WMDP)
            return ("", str(r["text"]).strip())
        return (str(r["question"]).strip(), str(r["answer"]).strip())

    fkeys = {key(r): i for i, r in enumerate(forget)}
    both = [(fkeys[key(r)], j, _shown(r)) for j, r in enumerate(retain) if key(r) in fkeys]
    if both:
        # rows counted from 1, as every other data error names them (a jsonl file's line numbers)
        shown = "; ".join(f"forget row {i + 1} == retain row {j + 1}: {q[:80]!r}" for i, j, q in both[:5])
        raise DataError(
            f"dataset {dataset!r}: {len(both)} example(s) appear in both forget split {fsplit!r} and retain split "
            f"{rsplit!r} (exact question+answer text): {shown}"
        )


def _shown(r: dict) -> str:
    return str(r["question"] if "question" in r else r.get("text", ""))


def subsample(rows: list[dict], fraction: float, seed: int) -> list[dict]:
    """Deterministic subsample (coreset option); keeps at least one row."""
    if fraction >= 1.0:
        return rows
    k = max(1, round(len(rows) * fraction))
    idx = sorted(random.Random(seed).sample(range(len(rows)), k))
    return [rows[i] for i in idx]


def hub_revision(data_cfg: Any, hub_id: str, main_hub_id: str) -> Any:
    revs = dict(getattr(data_cfg, "hub_revisions", None) or {})
    if hub_id in revs:
        return revs[hub_id]
    return data_cfg.revision if hub_id == main_hub_id else None
