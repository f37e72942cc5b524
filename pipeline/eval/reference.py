"""The forget-quality reference: the retain model's truth ratios on the forget split.

TOFU's forget quality is a KS test between the unlearned model's forget truth ratios and those of
the retain (never-saw-the-forget-set) model. Computing the latter costs a full evaluation of the
retain model, so it is cached — and a cache is only as good as its key. The key here holds
everything the numbers depend on:

- the retain model's identity: its resolved path and a fingerprint of its weight files (name,
  size, a SHA-256 of each safetensors header / index / config file and of sampled bytes of every
  tensor — cheap, the weights are not read whole), or for a hub id the snapshot commit found in the local HF cache;
- the forget rows (count and a SHA-256 of question, answers and perturbations);
- the evaluation settings the truth ratio depends on (prompt template / format, truth-ratio
  reference, ``max_length``, perturbed-answer mean, the tokenizer's files).

The file name is derived from (path, split, rows, settings), so two retain models under one
folder never share a file; the stored key is compared field by field on read, and a mismatch
(e.g. the retain model was retrained in place) is logged in one line and recomputed.

``eval.retain_reference=<file>`` instead reads a precomputed reference: this module's own cache
files, or open-unlearning's retain logs (``saves/eval/tofu_<model>_retain90/TOFU_EVAL.json``,
``forget_truth_ratio.value_by_index``), checked against the forget split (row count, and the
answers where the file carries them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from pipeline.data.loaders import DataError
from pipeline.data.prompt_formats import chat_template_sha256
from pipeline.eval.summary import diff_paths
from pipeline.models.fingerprint import model_fingerprint  # finished.py and eval/parts.py import it from here

log = logging.getLogger(__name__)

KEY_SCHEMA = 1
# EvalSettings fields that do not change truth ratios (generation and batching only).
NOT_IN_KEY = ("batch_size", "synced_gpus", "max_new_tokens", "max_run", "repetition_n", "rouge_stemmer")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json")


class RetainReferenceError(DataError):
    """A precomputed retain reference (``eval.retain_reference``) that does not fit this run."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict:
    """The tokenizer's files (full SHA-256; they are small) or, without a local folder (a hub id), its
    name, size and chat template."""
    src = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    files = [src / n for n in TOKENIZER_FILES if (src / n).is_file()] if src.is_dir() else []
    if files:
        return {f.name: _sha256(f.read_bytes()) for f in files}
    return {"name": str(src), "vocab": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
            "chat_template": chat_template_sha256(tokenizer)}


def rows_fingerprint(rows: Sequence[dict]) -> dict:
    """Count and SHA-256 of the fields a truth ratio reads, in row order."""
    keep = ("question", "answer", "paraphrased_answer", "perturbed_answer")
    blob = json.dumps([{k: r.get(k) for k in keep} for r in rows], sort_keys=True, ensure_ascii=False)
    return {"n": len(rows), "sha256": _sha256(blob.encode())}


def settings_fingerprint(settings: Any, truth_ratio_key: str, extra: Optional[dict] = None) -> dict:
    """The evaluation settings truth ratios depend on (every EvalSettings field but generation and
    batching ones, so a field added later, e.g. a prompt format, joins the key by itself)."""
    fields = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
    out = {k: v for k, v in fields.items() if k not in NOT_IN_KEY}
    out["truth_ratio_reference"] = truth_ratio_key
    out.update(extra or {})
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def reference_key(retain_model: str, split: str, rows: Sequence[dict], settings: dict, tokenizer: dict,
                  code: str) -> dict:
    """The full cache key (JSON-able). ``code``: the digest of the evaluation code
    (:func:`pipeline.eval.parts.code_digest`), as for the evaluation parts: truth ratios computed by
    other code (another answer labelling, say) are not compared with this code's."""
    return {"schema": KEY_SCHEMA, "split": split, "retain_model": model_fingerprint(retain_model),
            "rows": rows_fingerprint(rows), "settings": settings, "tokenizer": tokenizer, "code": code}


def cache_file(cache_dir: str | Path, key: dict) -> Path:
    """Where the reference of ``key`` lives: named by split and a digest of (model path, rows,
    settings, tokenizer) — not of the weight fingerprint nor the code, so a model rewritten in place
    (or a code change) reads its old file, sees the mismatch and replaces it."""
    addr = {k: v for k, v in key.items() if k not in ("retain_model", "code")}
    addr["model_path"] = key["retain_model"]["path"]
    digest = _sha256(json.dumps(addr, sort_keys=True).encode())[:16]
    return Path(cache_dir) / f"retain_reference_{re.sub(r'[^A-Za-z0-9_.-]+', '_', key['split'])}_{digest}.json"


def read_cached(path: Path, key: dict) -> Optional[list[float]]:
    """The cached truth ratios when ``path`` holds exactly ``key``; else None (a stale or
    unreadable file is named in one log line)."""
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text())
        stored, ratios = obj["key"], obj["truth_ratio"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("retain reference cache %s is unreadable (%s): recomputing", path, type(e).__name__)
        return None
    diff = diff_paths(stored, key)
    if diff or len(ratios) != key["rows"]["n"]:
        log.warning("retain reference cache %s does not match this run (%s differ): recomputing", path,
                    ", ".join(diff[:6]) or "row count")
        return None
    return [_float(x) for x in ratios]


def _at(d: Any, dotted: str) -> Any:
    """The value at a :func:`diff_paths` path (None where it is missing); keys may hold dots themselves
    (``model.prompt_format``)."""
    if not isinstance(d, dict):
        return None
    if dotted in d:
        return d[dotted]
    for i, ch in enumerate(dotted):
        if ch == "." and dotted[:i] in d:
            return _at(d[dotted[:i]], dotted[i + 1:])
    return None


def cache_record(key: dict, ratios: Sequence[float], retain_model: str) -> dict:
    return {"key": key, "split": key["split"], "model": str(retain_model), "truth_ratio": [float(x) for x in ratios]}


def _float(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _norm(s: Any) -> str:
    return " ".join(str(s).split())


def load_reference_file(path: str | Path, split: str, rows: Sequence[dict],
                        settings: Optional[dict] = None) -> tuple[list[float], str]:
    """Truth ratios from a precomputed reference file, checked against the forget ``split`` rows.

    Accepted: this pipeline's cache files (``truth_ratio`` + ``split``; the rows' hash is compared
    too, and the truth-ratio settings it records with this run's ``settings`` when given: a reference
    computed with another truth-ratio reference, prompt format or dtype is not comparable) and open-unlearning's evaluation logs (``TOFU_EVAL.json``: ``forget_truth_ratio`` →
    ``value_by_index`` → ``{"<i>": {"score": tr}}``; where the file also holds
    ``forget_Q_A_ROUGE`` its ``ground_truth`` answers are compared with the split's answers).
    Returns ``(ratios, format)``; anything that does not fit raises :class:`RetainReferenceError`.
    """
    where = f"eval.retain_reference={path}"
    p = Path(path)
    if not p.is_file():
        raise RetainReferenceError(f"{where}: {'a directory, not a file' if p.is_dir() else 'no such file'}")
    try:
        obj = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise RetainReferenceError(f"{where}: not readable JSON ({type(e).__name__}: {str(e)[:120]})") from None
    n = len(rows)
    if isinstance(obj, dict) and isinstance(obj.get("truth_ratio"), list):
        fsplit = obj.get("split") or (obj.get("key") or {}).get("split")
        if fsplit is not None and fsplit != split:
            raise RetainReferenceError(f"{where}: the reference is for split {fsplit!r}, this run forgets {split!r}")
        ratios = obj["truth_ratio"]
        if len(ratios) != n:
            raise RetainReferenceError(f"{where}: {len(ratios)} truth ratios, but split {split!r} has {n} rows")
        want = rows_fingerprint(rows)["sha256"]
        got = ((obj.get("key") or {}).get("rows") or {}).get("sha256")
        if got is not None and got != want:
            raise RetainReferenceError(f"{where}: computed on different rows of split {split!r} (rows hash differs)")
        stored = (obj.get("key") or {}).get("settings")
        differ = diff_paths(stored, settings) if isinstance(stored, dict) and settings is not None else []
        if differ:
            shown = "; ".join(f"{k} {_at(stored, k)!r} there, {_at(settings, k)!r} here" for k in differ[:3])
            raise RetainReferenceError(f"{where}: computed with other evaluation settings ({shown}"
                                       f"{'; ...' if len(differ) > 3 else ''}); set them alike, or leave "
                                       f"eval.retain_reference unset to compute the reference")
        return [_float(x) for x in ratios], "pipeline"
    tr = obj.get("forget_truth_ratio") if isinstance(obj, dict) else None
    by_index = tr.get("value_by_index") if isinstance(tr, dict) else None
    if not isinstance(by_index, dict):
        raise RetainReferenceError(
            f"{where}: not a retain reference (expected open-unlearning's TOFU_EVAL.json with "
            f"forget_truth_ratio.value_by_index, or a retain_reference_*.json written by this pipeline)")
    try:
        idx = sorted(int(k) for k in by_index)
    except ValueError:
        raise RetainReferenceError(f"{where}: forget_truth_ratio.value_by_index has non-integer keys") from None
    if len(idx) != n:
        raise RetainReferenceError(
            f"{where}: forget_truth_ratio has {len(idx)} rows, but split {split!r} has {n} rows: the file is for "
            f"another forget split")
    if idx != list(range(n)):
        raise RetainReferenceError(f"{where}: forget_truth_ratio.value_by_index keys are not 0..{n - 1}")
    ratios = []
    for i in range(n):
        v = by_index[str(i)] if str(i) in by_index else by_index[i]
        score = v.get("score") if isinstance(v, dict) else v
        if score is not None and not isinstance(score, (int, float)):
            raise RetainReferenceError(f"{where}: forget_truth_ratio row {i + 1} has no numeric 'score'")
        ratios.append(_float(score))
    rouge = ((obj.get("forget_Q_A_ROUGE") or {}).get("value_by_index")) if isinstance(obj, dict) else None
    if isinstance(rouge, dict):
        for i, r in enumerate(rows):
            gt = (rouge.get(str(i)) or {}).get("ground_truth")
            if gt is not None and _norm(gt) != _norm(r.get("answer", "")):
                raise RetainReferenceError(
                    f"{where}: row {i + 1}'s answer differs from split {split!r} ({_norm(gt)[:60]!r} vs "
                    f"{_norm(r.get('answer', ''))[:60]!r}): the file is for another forget split")
    if not any(math.isfinite(x) for x in ratios):
        raise RetainReferenceError(f"{where}: no finite truth ratio in forget_truth_ratio")
    return ratios, "open-unlearning"


def read_truth_ratios(path: str | Path) -> list[float]:
    """The truth ratios of a reference file already checked by the run that used it (either format)."""
    obj = json.loads(Path(path).read_text())
    if isinstance(obj.get("truth_ratio"), list):
        return [_float(x) for x in obj["truth_ratio"]]
    by_index = obj["forget_truth_ratio"]["value_by_index"]
    return [_float(v.get("score") if isinstance(v, dict) else v) for _, v in sorted(by_index.items(), key=lambda kv: int(kv[0]))]
