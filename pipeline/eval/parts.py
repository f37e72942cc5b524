"""Resumable evaluation: every finished split's merged result is kept in the run directory
(``<run dir>/eval_parts/``), so a re-run of the same job — a requeued SLURM job preempted during
its evaluation, or the same command again — evaluates only the splits still missing, and loads
the model only if one is.

A part is reused only when its key matches exactly: the evaluated model's fingerprint (its weight
files' names, sizes, safetensors headers and sampled tensor bytes: :func:`pipeline.eval.reference.model_fingerprint`),
the split's rows (a SHA-256 of every field), the evaluation settings (``eval.*`` but the switches
that do not change a split's numbers, the prompt format, the truth-ratio reference, the dtype), the
number of ranks (batches differ with it) and the code that computes the numbers (a SHA-256 of
``pipeline/eval/*.py`` and the prompt-formatting modules). Anything else is evaluated again and the
part is replaced. ``eval.resume=false`` ignores the parts (and rewrites them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from pipeline.engine.distributed import broadcast_object, is_main_process

log = logging.getLogger(__name__)

KEY_SCHEMA = 1
PARTS_DIR = "eval_parts"
# eval.* settings that do not change a split's numbers
# eval settings that change no split's numbers: switches, lm-eval (run apart), and PrivLeak's retrain AUC
# (applied to the stored Min-K% scores afterwards: setting it once known re-scored every MUSE split)
NOT_IN_KEY = ("enabled", "resume", "lm_eval", "lm_eval_tasks", "lm_eval_include_path", "lm_eval_include_defaults",
              "lm_eval_num_fewshot", "lm_eval_limit", "retrain_auc")
CODE_FILES = ("formatting.py", "prompt_formats.py", "collate.py")  # pipeline/data/ modules, beside pipeline/eval/*.py


def rows_digest(rows: Sequence[dict]) -> str:
    """SHA-256 of every field of every row, in order."""
    return hashlib.sha256(json.dumps(list(rows), sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def code_digest() -> str:
    """SHA-256 of the code that computes a split's numbers (the evaluators, prompt formatting,
    batching, and the model code the evaluation model runs: loading and its attention backends, which
    reach the kernels): a part computed by other code is not reused."""
    from pipeline.code_digest import code_sha256

    pipeline_dir = Path(__file__).resolve().parents[1]
    models = sorted((pipeline_dir / "models").rglob("*.py"))
    kernels = sorted((pipeline_dir.parent / "kernels").glob("*.py"))
    return code_sha256(sorted((pipeline_dir / "eval").glob("*.py")) + [pipeline_dir / "data" / f for f in CODE_FILES]
                       + models + kernels)



def prompt_settings(cfg: DictConfig) -> dict:
    """The settings that decide how rows become prompt text (keys of cached evaluation numbers)."""
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k in ("prompt_format", "system_prompt", "chat_template_kwargs")
            for v in [OmegaConf.select(cfg, f"model.{k}")]}


def parts_key(cfg: DictConfig, model_dir: str | Path, tokenizer: Any, dtype: str, world_size: int,
              truth_ratio_reference: str, rouge_stemmer: bool) -> dict:
    """What every split's numbers depend on besides its rows (JSON-able): the model at the revision
    it is loaded at, the tokenizer (its files, chat template included), the settings and the code."""
    from pipeline.eval.reference import model_fingerprint, tokenizer_fingerprint
    from pipeline.models.loading import revision_for

    ev = {k: v for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items() if k not in NOT_IN_KEY}
    prompt = prompt_settings(cfg)
    model = model_fingerprint(model_dir, revision_for(cfg.model, model_dir))
    # the backend the evaluation model runs here (kernels.attention=auto is sdpa on one host, another
    # backend on a GPU host where a measurement picked one)
    import torch

    from pipeline.models.attention import resolve_backend

    on_gpu = OmegaConf.select(cfg, "eval.device", default="auto") != "cpu" and torch.cuda.is_available()
    attention = resolve_backend(str(OmegaConf.select(cfg, "kernels.attention")), "cuda" if on_gpu else "cpu").backend
    return json.loads(json.dumps({"schema": KEY_SCHEMA, "model": model, "tokenizer": tokenizer_fingerprint(tokenizer),
                                  "eval": ev, "prompt": prompt, "truth_ratio_reference": truth_ratio_reference,
                                  "dtype": dtype, "attention": attention,
                                  "rouge_stemmer": rouge_stemmer,
                                  "world_size": world_size, "code": code_digest()}, sort_keys=True, default=str))


class SplitParts:
    """The finished splits of one evaluation in ``directory`` (None: nothing kept). Rank 0 reads
    and writes; every rank gets the same answer, so all skip the same splits (their model calls
    are collective under some launchers)."""

    def __init__(self, directory: Optional[str | Path], key: dict, reuse: bool = True) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.key = key
        self.reuse = reuse
        self.reused: list[str] = []  # splits taken from an earlier attempt, in order
        self.ran_on: Optional[dict] = None  # where the first reused part was evaluated

    def _file(self, kind: str, name: str) -> Path:
        return self.directory / f"{kind}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.json"

    def _full_key(self, kind: str, name: str, rows: Sequence[dict]) -> dict:
        return {**self.key, "kind": kind, "split": name, "rows": {"n": len(rows), "sha256": rows_digest(rows)}}

    def _read(self, kind: str, name: str, rows: Sequence[dict]) -> Optional[dict]:
        path = self._file(kind, name)
        if not path.exists():
            return None
        try:
            obj = json.loads(path.read_text())
            stored, result = obj["key"], obj["result"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("evaluation part %s is unreadable (%s): evaluating %r again", path, type(e).__name__, name)
            return None
        full = self._full_key(kind, name, rows)
        if stored != full:
            differ = sorted(k for k in set(stored) | set(full) if stored.get(k) != full.get(k))
            log.info("evaluation part %s differs from this evaluation in %s: evaluating %r again", path,
                     ", ".join(differ), name)
            return None
        return {"result": result, "ran_on": obj.get("ran_on")}

    def cached(self, kind: str, name: str, rows: Sequence[dict], cls: Callable[..., Any]) -> Optional[Any]:
        """The stored result of split ``name`` as ``cls(**fields)`` when it matches, else None."""
        if self.directory is None or not self.reuse:
            return None
        found = broadcast_object(self._read(kind, name, rows) if is_main_process() else None)
        if found is None:
            return None
        self.reused.append(name)
        self.ran_on = self.ran_on or found["ran_on"]
        if is_main_process():
            log.info("eval[%s]: the result of an earlier attempt is reused (%s)", name, self._file(kind, name))
        return cls(**found["result"])

    def store(self, kind: str, name: str, rows: Sequence[dict], result: Any, ran_on: dict) -> None:
        """Keep split ``name``'s merged result (rank 0; written to a temp file, then renamed)."""
        if self.directory is None or not is_main_process():
            return
        from pipeline.io import atomic_write_text

        self.directory.mkdir(parents=True, exist_ok=True)
        # NaN stays NaN (a metric a row cannot have): Python's JSON reads it back; the file is ours
        atomic_write_text(self._file(kind, name), json.dumps({"key": self._full_key(kind, name, rows),
                                                              "result": result.to_dict(), "ran_on": ran_on}) + "\n")
