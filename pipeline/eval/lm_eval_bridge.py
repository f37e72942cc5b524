"""lm-evaluation-harness on an exported model directory, in this process (optional extra
``lm-eval``, pinned in ``requirements/extras.lock``).

``lm_eval`` is imported lazily, only when :func:`run_lm_eval` is called; without it the call raises
:class:`LmEvalNotInstalled` (an ``ImportError``) saying how to install it. Our own scorer
(:mod:`pipeline.eval.mcq`) uses the same prompt format and needs no extra dependency; the test
``tests/test_lm_eval_real.py`` checks that both give the same per-choice log-likelihoods.

The model is loaded by our safe loader (safetensors, no remote code) and handed to lm-eval's
``HFLM`` as an instance: lm-eval then runs as a single process (rank 0 of 1) and never builds an
``accelerate.Accelerator`` or touches the training job's process group. Task configs outside
lm-eval's own (e.g. an offline copy of WMDP) come from ``include_path`` through a ``TaskManager``.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from pipeline.messages import first_line

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("wmdp_bio", "wmdp_cyber", "mmlu")


class LmEvalError(Exception):
    """lm-eval cannot run as configured: a task it does not know, a task's dataset that cannot be
    read (offline), lm-eval not installed. A user error: one line, exit code 2."""


class LmEvalNotInstalled(LmEvalError, ImportError):
    """lm-evaluation-harness is an optional extra and is not installed."""


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _import_lm_eval():
    try:
        import lm_eval  # noqa: PLC0415
        from lm_eval.models.huggingface import HFLM  # noqa: PLC0415
        from lm_eval.tasks import TaskManager  # noqa: PLC0415
    except ImportError as e:
        raise LmEvalNotInstalled(
            "lm-evaluation-harness is not installed; install the optional extra with "
            "`pip install --no-deps -r requirements/extras.lock` (`make install` does) "
            "(or use pipeline.eval.mcq, the built-in scorer with the same prompt format)"
        ) from e
    return lm_eval, HFLM, TaskManager


_MANAGERS: dict[tuple, Any] = {}


def _paths(include_path: Optional[str | Path | Sequence[str | Path]]) -> tuple[str, ...]:
    if not include_path:
        return ()
    return (str(include_path),) if isinstance(include_path, (str, Path)) else tuple(str(p) for p in include_path)


def task_manager(include_path: Optional[str | Path | Sequence[str | Path]] = None, include_defaults: bool = True):
    """lm-eval's ``TaskManager`` over its own tasks (``include_defaults``) and ``include_path``'s;
    built once per process (indexing lm-eval's tasks takes ~30 s), shared by the check at the
    job's start and the evaluation at its end."""
    key = (_paths(include_path), bool(include_defaults))
    if key not in _MANAGERS:
        _, _, TaskManager = _import_lm_eval()
        _MANAGERS[key] = TaskManager(include_path=list(key[0]) or None, include_defaults=key[1])
    return _MANAGERS[key]


def check_tasks(tasks: Sequence[str], include_path: Optional[str | Path | Sequence[str | Path]] = None,
                include_defaults: bool = True) -> None:
    """Every task or group in ``tasks`` is one lm-eval knows; raises :class:`LmEvalError` naming the
    unknown ones (with close matches). Run at a job's start, not after its training."""
    for p in _paths(include_path):
        if not Path(p).is_dir():
            raise LmEvalError(f"eval.lm_eval_include_path={p}: no such directory")
    known = set(task_manager(include_path, include_defaults).all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        close = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        hints = "; ".join(f"{t}: did you mean {', '.join(c)}?" for t, c in close.items() if c)
        where = (["lm-eval's own tasks"] if include_defaults else []) + list(_paths(include_path))
        raise LmEvalError(f"eval.lm_eval_tasks: lm-eval knows no task or group {unknown} (searched "
                          f"{' and '.join(where) or 'nothing'})" + (f"; {hints}" if hints else ""))


def limit_words(limit: Optional[float]) -> str:
    """lm-eval's ``limit`` in words: all rows, or the part of each task scored (not comparable with full runs)."""
    if limit is None:
        return "every row of each task"
    part = (f"the first {int(limit)} row{'' if int(limit) == 1 else 's'}" if limit >= 1
            else f"the first {limit * 100:.3g}%")
    return f"{part} of each task only (limit={limit}: a quick look, not comparable with full runs)"


def _unreadable_data(tasks: Sequence[str], e: Exception) -> LmEvalError:
    """The one line for a task's dataset that cannot be read (not on disk, or on the hub while offline)."""
    return LmEvalError(f"lm-eval tasks {list(tasks)}: a dataset could not be read ({type(e).__name__}: "
                       f"{first_line(e, 240)}); offline runs need the datasets in the HF cache or local task "
                       f"YAMLs (eval.lm_eval_include_path)")


def check_task_data(tasks: Sequence[str], include_path: Optional[str | Path | Sequence[str | Path]] = None,
                    include_defaults: bool = True) -> None:
    """Every task's dataset can be read here (from the HF cache or local files; runs are offline): lm-eval
    builds the tasks as its evaluation will, which reads their data. Raises :class:`LmEvalError` in one
    line. At a job's start, so a dataset missing from a cluster's cache stops the job before its
    training, not after it (the evaluation reads the data again, from the same cache)."""
    try:
        task_manager(include_path, include_defaults).load_task_or_group(list(tasks))
    # datasets' DatasetNotFoundError, OfflineModeIsEnabled's ConnectionError: OSErrors; a dataset cached
    # under another config while offline: ValueError ("Couldn't find cache for ... for config ...")
    except (OSError, ValueError) as e:
        raise _unreadable_data(tasks, e) from e
    except LmEvalError:
        raise
    except Exception as e:  # noqa: BLE001  (a task's own code: !function, process_docs) one line, every rank stops
        raise LmEvalError(f"lm-eval tasks {list(tasks)}: could not be built ({type(e).__name__}: "
                          f"{first_line(e, 240)})") from e


def summarize(results: dict, tasks: Sequence[str]) -> dict[str, float]:
    """``{task: acc}`` from ``simple_evaluate``'s output (groups such as ``mmlu`` read from
    ``groups`` when present, else ``results``); also ``{task}_acc_norm`` and ``{task}_stderr`` when
    reported. A task without ``acc`` (generation tasks: exact match, perplexity) is logged, not
    summarised: its numbers are in the run's ``lm_eval.json``."""
    out: dict[str, float] = {}
    for t in tasks:
        block = (results.get("groups") or {}).get(t) or (results.get("results") or {}).get(t) or {}
        for key, value in block.items():
            base = key.split(",", 1)[0]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if base == "acc":
                out[t] = float(value)
            elif base == "acc_norm":
                out[f"{t}_acc_norm"] = float(value)
            elif base == "acc_stderr":
                out[f"{t}_stderr"] = float(value)
        if t not in out:
            metrics = sorted({k.split(",", 1)[0] for k in block} - {"alias", "name", "sample_len"})
            log.warning("lm-eval task %s reports no acc (its metrics: %s): not in metrics.lm_eval; its numbers are "
                        "in lm_eval.json", t, ", ".join(metrics) or "none")
    return out


def per_choice_logliks(samples: dict) -> dict[str, list[dict]]:
    """``{task: [{"doc_id", "target", "logliks": [per choice]}]}`` from lm-eval's logged samples
    (multiple-choice tasks: each response is ``(loglikelihood, is_greedy)``), in doc order."""
    out: dict[str, list[dict]] = {}
    for task, rows in (samples or {}).items():
        out[task] = sorted(({"doc_id": int(s["doc_id"]), "target": s.get("target"),
                             "logliks": [float(r[0]) for r in s["filtered_resps"]]} for s in rows),
                           key=lambda r: r["doc_id"])
    return out


def run_lm_eval(
    model_dir: str | Path,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    include_path: Optional[str | Path | Sequence[str | Path]] = None,
    include_defaults: bool = True,
    batch_size: int = 8,
    num_fewshot: Optional[int] = 0,
    limit: Optional[float] = None,
    dtype: str = "float32",
    device: Optional[str] = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    log_samples: bool = False,
    add_bos: bool = False,
    revision: Optional[str] = None,
    tokenizer_path: Optional[str | Path] = None,
    tokenizer_revision: Optional[str] = None,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on the model in ``model_dir`` (safetensors + tokenizer), or on a hub
    id's cached snapshot at ``revision`` (an evaluation-only job of a hub model). ``tokenizer_path``
    (at ``tokenizer_revision``): a tokenizer kept apart from the model (``model.tokenizer_path``);
    default the model's own, at ``revision``.

    ``include_path``: folder(s) of extra task YAMLs; ``include_defaults=False`` skips indexing
    lm-eval's built-in tasks (faster when only local tasks are run). Returns ``{"summary": {task:
    acc}, "raw": <results, groups, versions>, "settings": <what ran>}`` plus ``"samples"`` (per-choice log-likelihoods,
    see :func:`per_choice_logliks`) when ``log_samples``. ``add_bos``: contexts start with the
    tokenizer's BOS (``eval.mcq_add_bos``; off, as our MCQ scorer, whatever the tokenizer adds).
    """
    lm_eval, HFLM, _ = _import_lm_eval()
    check_tasks(tasks, include_path, include_defaults)
    from pipeline.models.loading import load_causal_lm, load_tokenizer

    # lm-eval's HFLM keeps an instance where it is: place it here (``device``, e.g. "cuda:0"; None = CPU)
    model = load_causal_lm(model_dir, dtype, trust_remote_code, allow_pickle, revision, device=device).eval()
    # add_bos_token explicitly: lm-eval >= 0.4.10 follows the tokenizer (Zephyr's and Llama's add <s>),
    # where earlier versions, the WMDP paper's numbers, open-unlearning and our own MCQ scorer add none.
    # With an instance, HFLM's add_bos_token only asks the tokenizer for its special tokens: one that
    # adds no BOS of its own (GPT-2 style: SmolLM2, Qwen) must be loaded to add it
    if tokenizer_path is None:
        tokenizer_path, tokenizer_revision = model_dir, revision
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code, revision=tokenizer_revision,
                               **({"add_bos_token": True} if add_bos else {}))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=bool(add_bos))
    log.info("lm-eval %s: tasks %s on %s (batch %d, %s on %s, %d-shot, BOS %s, no chat template, %s)",
             getattr(lm_eval, "__version__", "?"), list(tasks), model_dir, batch_size, dtype, device or "cpu",
             num_fewshot or 0, "added" if add_bos else "not added", limit_words(limit))
    try:
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager(include_path, include_defaults),
            log_samples=log_samples,
            **simple_evaluate_kwargs,
        )
    except OSError as e:  # a task's dataset that cannot be read (checked at the job's start: removed since?)
        raise _unreadable_data(tasks, e) from e
    res = dict(res or {})
    out = {"summary": summarize(res, tasks), "raw": {k: res.get(k) for k in ("results", "groups", "versions", "n-samples")},
           "settings": {"version": getattr(lm_eval, "__version__", None), "tasks": list(tasks),
                        "num_fewshot": num_fewshot, "add_bos": bool(add_bos), "chat_template": False,
                        "dtype": dtype, "batch_size": batch_size, "limit": limit, "tokenizer": str(tokenizer_path),
                        "include_path": list(_paths(include_path)), "include_defaults": bool(include_defaults)}}
    if log_samples:
        out["samples"] = per_choice_logliks(res.get("samples") or {})
    return out
