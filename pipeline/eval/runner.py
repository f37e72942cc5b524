"""Evaluation jobs: data-parallel TOFU-style evaluation of a model directory across ranks.

Each rank loads the (exported) model, evaluates every ``world_size``-th row of each split, and the
per-row results are gathered back in order. Forget quality needs the retain (gold-standard)
model's truth ratios on the forget split: computed once and cached under a key that names the
retain model's weights, the rows and the settings (:mod:`pipeline.eval.reference`), or read from
``eval.retain_reference``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from pipeline.config_base import ConfigError
from pipeline.data.loaders import DataError
from pipeline.data.muse import is_icl
from pipeline.engine import faults
from pipeline.engine.distributed import barrier, broadcast_object, cuda_ranks, gather_objects, is_main_process
from pipeline.eval.parts import PARTS_DIR, SplitParts
from pipeline.progress import library_bars, progress

log = logging.getLogger(__name__)


def _settings(cfg: DictConfig):
    from pipeline.data.prompt_formats import prompt_format_from_config
    from pipeline.eval.tofu import EvalSettings

    return EvalSettings(batch_size=int(cfg.eval.batch_size), max_new_tokens=int(cfg.eval.max_new_tokens),
                        max_length=int(cfg.eval.max_length), template=prompt_format_from_config(cfg.model),
                        rouge_stemmer=rouge_stemmer(cfg))


def rouge_stemmer(cfg: DictConfig) -> bool:
    """``data.rouge_stemmer``: ROUGE on Porter-stemmed tokens, as the benchmark's own evaluator."""
    return bool(OmegaConf.select(cfg, "data.rouge_stemmer", default=False))


def _progress_bar(cfg: DictConfig) -> bool:
    """``logging.progress_bar`` (on when the config has no logging group, e.g. a bare eval config)."""
    return bool(OmegaConf.select(cfg, "logging.progress_bar", default=True))


def truth_ratio_reference(cfg: DictConfig) -> str:
    """Which answer the truth ratio treats as correct, as configured: the dataset's
    ``data.truth_ratio_reference`` (``conf/data/*.yaml``), overridden by ``eval.truth_ratio_reference``
    when set. ``paraphrased_answer`` is TOFU's definition (the paraphrase on forget/retain splits,
    the answer on real_authors / world_facts, which have no paraphrase); ``answer`` uses the trained
    answer on every split (the embedded benchmark: its tiny models never saw a paraphrase)."""
    from omegaconf import OmegaConf

    ref = OmegaConf.select(cfg, "eval.truth_ratio_reference") or OmegaConf.select(cfg, "data.truth_ratio_reference")
    return str(ref or "paraphrased_answer")


def truth_ratio_key(cfg: DictConfig) -> Optional[str]:
    """The ``truth_ratio_key`` passed to :func:`pipeline.eval.tofu.evaluate_split`: ``"answer"`` on
    every split, or None for TOFU's per-split definition."""
    return "answer" if truth_ratio_reference(cfg) == "answer" else None


class ModelOnDemand:
    """The evaluation model, loaded on first use: an evaluation whose splits all come from an
    earlier attempt (:mod:`pipeline.eval.parts`) loads nothing."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load, self._model = load, None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self) -> Any:
        if self._model is None:
            self._model = self._load()
        return self._model

    def release(self) -> None:
        """Drop this holder's reference, so that the next model loaded (the retain model) can have the
        memory once nothing else holds the model."""
        self._model = None


def _model(model: Any) -> Any:
    return model.get() if isinstance(model, ModelOnDemand) else model


def _ran_on(cfg: DictConfig, model: Any) -> dict:
    """Where the evaluation ran: rank 0's device, and each rank's where they differ in kind (a rank
    short of GPU memory evaluates its share on the CPU, :func:`eval_device`). Collective: every rank
    calls it."""
    from pipeline.models.runtime import model_device

    devices = [str(d) for d in gather_objects(str(model_device(_model(model))))]
    out = {"device": devices[0], "dtype": eval_dtype(cfg)}
    if len({d.split(":")[0] for d in devices}) > 1:
        out["device_by_rank"] = devices
    return out


def evaluate_splits(model: Any, tokenizer: Any, splits: dict[str, list[dict]], settings: Any,
                    tr_key: Optional[str] = None, progress_bar: bool = True,
                    parts: Optional[SplitParts] = None, cfg: Optional[DictConfig] = None,
                    generate: bool = True) -> dict[str, Any]:
    """Data-parallel evaluation of each split; every rank returns the merged results. With
    ``progress_bar`` rank 0 shows a bar per split (``eval[<split>]``, in batches). ``model``: a
    model or a :class:`ModelOnDemand`; with ``parts`` (and the run's ``cfg``) a split finished by an
    earlier attempt is taken from there and each newly finished one is kept. ``generate=False``:
    no greedy generation, so no generation-based metrics (:func:`pipeline.eval.tofu.evaluate_split`)."""
    import torch.distributed as dist

    from pipeline.eval.tofu import SplitResult, evaluate_split, gather_split_results

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    out = {}
    for index, (name, rows) in enumerate(splits.items(), 1):
        done = parts.cached("tofu", name, rows, SplitResult) if parts is not None else None
        if done is not None:
            out[name] = done
            continue
        with progress(f"eval[{name}]", progress_bar):
            mine = evaluate_split(_model(model), tokenizer, rows, settings, name=name, rank=rank, world_size=world,
                                  truth_ratio_key=tr_key, generate=generate)
        out[name] = gather_split_results(gather_objects(mine))
        if parts is not None:
            parts.store("tofu", name, rows, out[name], _ran_on(cfg, model))
        faults.maybe_signal("sigterm_in_eval", index)  # fault suite: a preemption notice between splits
    return out


def eval_dtype(cfg: DictConfig) -> str:
    """The evaluation model's dtype: ``eval.dtype``, where ``auto`` is ``model.dtype`` when this
    machine has a GPU that the evaluation may use (bf16 for the 7B configs, as open-unlearning's model
    configs load them; for a LoRA run the dtype its model/ was merged in, float32 by default) and float32 without one
    or with ``eval.device=cpu``. The same for every model of a run (target, retain reference, lm-eval;
    also one that falls back to the CPU for lack of GPU memory), so their numbers compare."""
    from pipeline.engine.export_peft import merge_dtype

    dtype = str(OmegaConf.select(cfg, "eval.dtype", default="auto"))
    if dtype == "auto":
        on_gpu = cuda_ranks() and str(OmegaConf.select(cfg, "eval.device", default="auto")) != "cpu"
        if not on_gpu:
            return "float32"
        model_dtype = str(OmegaConf.select(cfg, "model.dtype", default="float32"))
        if OmegaConf.select(cfg, "model.peft.enabled", default=False):
            # the dtype a LoRA run's model/ was merged and saved in (float32 by default): cast to bf16
            # it would lose the adapter changes below bf16's resolution that the merge kept
            return merge_dtype(cfg.model, model_dtype)
        return model_dtype
    return dtype


def eval_device(cfg: DictConfig, model_path: str | Path | None = None) -> str:
    """Where an evaluation model is loaded: this rank's GPU (``eval.device=auto|cuda``) or the CPU.
    With ``auto``, a model whose weights (in :func:`eval_dtype`) would not fit in the GPU's free
    memory with room for activations is evaluated on the CPU instead, with a warning."""
    import torch

    want = str(OmegaConf.select(cfg, "eval.device", default="auto"))
    if want == "cpu" or not cuda_ranks():
        if want == "cuda":
            why = "DS_ACCELERATOR=cpu" if os.environ.get("DS_ACCELERATOR") == "cpu" and torch.cuda.is_available() else \
                "no CUDA device"
            raise ConfigError(f"config error at 'eval.device': eval.device=cuda, but this rank has no CUDA device "
                              f"to use ({why}; eval.device=auto uses one when there is one)")
        return "cpu"
    device = f"cuda:{torch.cuda.current_device()}"
    if want == "auto" and model_path is not None:
        from pipeline.models.loading import weights_bytes

        need = weights_bytes(model_path, eval_dtype(cfg))
        # blocks the caching allocator holds but no tensor uses (the trained engines', a previous
        # evaluation model's) are free for this one
        gc.collect()
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
        if need is not None and need * 1.2 + 2**30 > free:  # activations, KV cache of generation
            log.warning("evaluation model %s: %.1f GiB of weights in %s do not fit in %s's %.1f GiB free (with room "
                        "for activations): evaluating on the CPU (slow; eval.device=cuda insists)", model_path,
                        need / 2**30, eval_dtype(cfg), device, free / 2**30)
            return "cpu"
    return device


def check_eval_device(cfg: DictConfig) -> None:
    """``eval.device=cuda`` on a rank without a GPU stops at the job's start, not after training."""
    if OmegaConf.select(cfg, "eval.enabled", default=False):
        eval_device(cfg)


def _load_eval_model(path: str | Path, cfg: DictConfig, tokenizer: Any) -> Any:
    """The model to evaluate, a plain copy per rank (data-parallel evaluation), on
    :func:`eval_device` in :func:`eval_dtype`; refused when ``tokenizer``'s ids can pass its embedding."""
    from pipeline.models.loading import check_vocab, load_causal_lm, revision_for

    device, dtype = eval_device(cfg, path), eval_dtype(cfg)
    m = load_causal_lm(path, dtype, cfg.model.trust_remote_code, cfg.model.allow_pickle, revision_for(cfg.model, path),
                       device=device)
    check_vocab(m, tokenizer, f"model {path}")  # else an IndexError traceback in the first scored batch
    if is_main_process():
        log.info("evaluation model %s: %s on %s (eval.dtype=%s, eval.device=%s)", path, dtype, device,
                 OmegaConf.select(cfg, "eval.dtype", default="auto"), OmegaConf.select(cfg, "eval.device", default="auto"))
    return m.eval()


def _placement(cfg: DictConfig, model: Any, parts: Optional[SplitParts] = None) -> dict:
    """Where the model ran and in which dtype, and the splits taken from an earlier attempt, for
    results.json's evaluation record."""
    if isinstance(model, ModelOnDemand) and not model.loaded:  # every split came from an earlier attempt
        ran_on = (parts.ran_on if parts is not None else None) or {"device": None, "dtype": eval_dtype(cfg)}
    else:
        ran_on = _ran_on(cfg, model)
        if "device_by_rank" in ran_on and is_main_process():
            log.warning("evaluation: rank(s) %s evaluated their rows on the CPU (too little free GPU memory), the "
                        "others on their GPU; results merged as usual, the CPU ranks set the pace",
                        [r for r, d in enumerate(ran_on["device_by_rank"]) if d == "cpu"])
    return {**ran_on, "reused_splits": list(parts.reused) if parts is not None else []}


def _reference_settings(cfg: DictConfig, forget_split: str) -> dict:
    """The settings the retain model's truth ratios on ``forget_split`` depend on (part of their key)."""
    from pipeline.eval.parts import prompt_settings
    from pipeline.eval.reference import settings_fingerprint
    from pipeline.eval.tofu import resolve_truth_ratio_key

    prompt = prompt_settings(cfg)
    return settings_fingerprint(_settings(cfg), resolve_truth_ratio_key(forget_split, truth_ratio_key(cfg)),
                                {**{f"model.{k}": v for k, v in prompt.items()},
                                 "eval.dtype": eval_dtype(cfg)})  # bf16 and fp32 ratios differ


def reference_cache_dir(cfg: DictConfig, paths: Any) -> Path:
    """Where computed references are cached: beside the embedded benchmark, else under ``cache_dir``
    (never the retain model's parent folder, which a hub organisation or a shared models folder
    would make common to unrelated models)."""
    return Path(paths.reference_cache) if paths.reference_cache else Path(cfg.cache_dir) / "retain_reference"


def retain_reference(cfg: DictConfig, paths: Any, forget_split: str, rows: list[dict],
                     tokenizer: Any) -> tuple[Optional[list[float]], dict]:
    """Truth ratios of the retain model on ``forget_split`` and where they came from.

    ``eval.retain_reference=<file>``: read and checked (:func:`pipeline.eval.reference.load_reference_file`).
    Otherwise, with a retain model: the cache file of this exact key (model fingerprint, rows,
    settings; :mod:`pipeline.eval.reference`) when it matches, else computed and cached. Rank 0
    decides and broadcasts, so every rank takes part in the same (collective) evaluation.
    Returns ``(None, {...})`` without a retain model.
    """
    from pipeline.eval.parts import code_digest
    from pipeline.eval.reference import (
        cache_file,
        cache_record,
        load_reference_file,
        read_cached,
        reference_key,
        tokenizer_fingerprint,
    )

    settings = _reference_settings(cfg, forget_split)
    if cfg.eval.get("retain_reference"):
        ratios, fmt = load_reference_file(cfg.eval.retain_reference, forget_split, rows, settings)
        log.info("forget-quality reference: %d truth ratios from %s (%s format)", len(ratios),
                 cfg.eval.retain_reference, fmt)
        return ratios, {"source": "file", "file": str(cfg.eval.retain_reference), "format": fmt}
    if not paths.retain_model:
        return None, {"source": None}
    key = reference_key(paths.retain_model, forget_split, rows, settings, tokenizer_fingerprint(tokenizer),
                        code_digest())
    cache = cache_file(reference_cache_dir(cfg, paths), key)
    info = {"source": "cache", "file": str(cache), "model": key["retain_model"]["path"]}
    ratios = broadcast_object(read_cached(cache, key) if is_main_process() else None)
    if ratios is not None:
        return ratios, info
    model = _load_eval_model(paths.retain_model, cfg, tokenizer)
    with progress(f"eval[retain model on {forget_split}]", _progress_bar(cfg)):
        # only the truth ratios are used: greedy generation of every forget row (minutes at 7B) is skipped
        res = evaluate_splits(model, tokenizer, {forget_split: rows}, _settings(cfg), truth_ratio_key(cfg),
                              _progress_bar(cfg), generate=False)[forget_split]
    ratios = [float(x) for x in res.truth_ratio]
    if is_main_process():
        from pipeline.io import atomic_write_json

        atomic_write_json(cache, cache_record(key, ratios, paths.retain_model))
        log.info("forget-quality reference: retain model %s evaluated on %s, cached in %s", paths.retain_model,
                 forget_split, cache)
    barrier()
    return ratios, {**info, "source": "computed"}


def _gathered(fn, rows: list[dict], name: str, cfg: DictConfig, model: Any, parts: Optional[SplitParts],
              kind: str, key_rows: Optional[list[dict]] = None) -> Any:
    """Run a per-rank evaluator ``fn(model, rows=, rank=, world_size=)`` on ``rows`` data-parallel and
    merge the ranks' results in order (rank 0 shows a bar ``eval[<name>]``); with ``parts``, a split
    finished by an earlier attempt is reused and a new one kept (``key_rows``: all the rows its
    numbers depend on, e.g. with the in-context examples; default ``rows``)."""
    import torch.distributed as dist

    from pipeline.eval.muse import ExampleResults, merge_results

    key_rows = rows if key_rows is None else key_rows
    done = parts.cached(kind, name, key_rows, ExampleResults) if parts is not None else None
    if done is not None:
        return done
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    with progress(f"eval[{name}]", _progress_bar(cfg)):
        mine = fn(_model(model), rows=rows, rank=rank, world_size=world)
    out = merge_results(gather_objects(mine))
    if parts is not None:
        parts.store(kind, name, key_rows, out, _ran_on(cfg, model))
    return out


MUSE_MIA_MAX_LENGTH = 2048  # open-unlearning's MUSE_MIA max_length; MUSE's privleak scores whole texts


def evaluate_muse(cfg: DictConfig, model: Any, tokenizer: Any, data: Any,
                  parts: Optional[SplitParts] = None) -> tuple[dict, dict]:
    """MUSE: VerbMem, KnowMem (forget/retain) and PrivLeak (Min-K% AUC, forget vs holdout)."""
    from pipeline.eval.muse import (
        MuseSettings,
        evaluate_knowmem,
        evaluate_mink,
        evaluate_verbmem,
        muse_metrics,
    )

    st = MuseSettings.from_config(cfg.eval, rouge_stemmer=rouge_stemmer(cfg))
    ev, res = data.eval, {}
    if st.max_length < MUSE_MIA_MAX_LENGTH and any(k.startswith("privleak") for k in ev) and is_main_process():
        log.warning("eval.max_length=%d: Min-K%% (PrivLeak) scores the first %d tokens of each text; MUSE and "
                    "open-unlearning score %d (the +exp=muse_*_7b configs set eval.max_length=%d), so PrivLeak will "
                    "not compare with published numbers", st.max_length, st.max_length, MUSE_MIA_MAX_LENGTH,
                    MUSE_MIA_MAX_LENGTH)
    # keyed by split name, as results.json's evaluation.rows and every other benchmark's eval_details.json
    if "verbmem_forget" in ev:
        res["verbmem_forget"] = _gathered(lambda m, **k: evaluate_verbmem(m, tokenizer, cfg=st, name="verbmem_forget",
                                                                          **k),
                                          ev["verbmem_forget"], "verbmem_forget", cfg, model, parts, "muse")
    for key in ("knowmem_forget", "knowmem_retain"):
        if key in ev:
            icl = ev.get(f"{key}_icl", [])
            res[key] = _gathered(lambda m, icl=icl, key=key, **k: evaluate_knowmem(m, tokenizer, cfg=st, icl=icl,
                                                                                    name=key, **k),
                                 ev[key], key, cfg, model, parts, "muse", key_rows=[*ev[key], *icl])
    for key in ("privleak_forget", "privleak_holdout"):
        if key in ev:
            res[key] = _gathered(lambda m, key=key, **k: evaluate_mink(m, tokenizer, cfg=st, name=key, **k), ev[key],
                                 key, cfg, model, parts, "muse")
    metrics = muse_metrics(res.get("verbmem_forget"), res.get("knowmem_forget"), res.get("knowmem_retain"),
                           res.get("privleak_forget"), res.get("privleak_holdout"), cfg.eval.retrain_auc)
    return metrics, {k: v.to_dict() for k, v in res.items()}


def evaluate_mcq_splits(cfg: DictConfig, model: Any, tokenizer: Any, data: Any,
                        parts: Optional[SplitParts] = None) -> tuple[dict, dict]:
    """WMDP / MMLU: 0-shot multiple-choice accuracy per split (our log-likelihood scorer)."""
    from pipeline.eval.mcq import MCQSettings, evaluate_mcq, mcq_accuracy

    st = MCQSettings(batch_size=int(cfg.eval.batch_size), max_length=int(cfg.eval.max_length),
                     add_bos=bool(cfg.eval.mcq_add_bos))
    metrics, details = {}, {}
    for name, rows in data.eval.items():
        r = _gathered(lambda m, name=name, **k: evaluate_mcq(m, tokenizer, cfg=st, name=name, **k), rows,
                      name, cfg, model, parts, "mcq")
        metrics[f"{name}_accuracy"] = mcq_accuracy(r)
        details[name] = r.to_dict()
    return metrics, details


def evenly_spaced(rows: list, n: int) -> list:
    """At most ``n`` rows spread evenly over ``rows`` (deterministic; all of them when ``n >= len``)."""
    from pipeline.eval.metrics import evenly_spaced_indices

    return [rows[i] for i in evenly_spaced_indices(len(rows), n)]


def limit_rows(splits: dict[str, list[dict]], max_rows: int, forget_split: str) -> dict[str, list[dict]]:
    """``eval.max_rows``: at most ``max_rows`` evenly spaced rows of every split but ``forget_split``
    (forget quality compares its whole truth-ratio distribution) and the in-context example splits
    (the few-shot prompt stays whole)."""
    return {name: rows if name == forget_split or is_icl(name) else evenly_spaced(rows, max_rows)
            for name, rows in splits.items()}


def evaluate_job(cfg: DictConfig, model_dir: str | Path, tokenizer: Any, data: Any, paths: Any,
                 parts_dir: Optional[str | Path] = None) -> tuple[dict, dict]:
    """Metrics of ``model_dir`` for the dataset's family (TOFU-style QA, MUSE, WMDP) and details.
    ``parts_dir``: where finished splits are kept, so that a re-run evaluates only what is missing
    (:mod:`pipeline.eval.parts`; ``eval.resume``)."""
    import torch.distributed as dist

    from pipeline.eval.parts import parts_key
    from pipeline.eval.tofu import GENERATION, tofu_metrics

    # info, not a warning: the model cannot read more, and eval.max_length's default (192) exceeds the
    # embedded benchmark's context (128) in every default run; the length scored is in results.json
    cfg = at_model_context(cfg, model_dir, level=logging.INFO)
    model = ModelOnDemand(lambda: _load_eval_model(model_dir, cfg, tokenizer))
    world = dist.get_world_size() if dist.is_initialized() else 1
    stem = rouge_stemmer(cfg)
    parts = SplitParts(parts_dir, broadcast_object(parts_key(cfg, model_dir, tokenizer, eval_dtype(cfg), world,
                                                             truth_ratio_reference(cfg), stem)
                                                   if is_main_process() else None),
                       reuse=bool(OmegaConf.select(cfg, "eval.resume", default=True))) if parts_dir else None
    family = data.name.split(":")[0]
    if family in ("muse", "wmdp") and cfg.eval.max_rows:
        data = dataclasses.replace(data, eval=limit_rows(data.eval, int(cfg.eval.max_rows), data.forget_split))
    if family != "wmdp":
        log.info("ROUGE-L on %s tokens (data.rouge_stemmer=%s)",
                 "Porter-stemmed (rouge_score, as open-unlearning)" if stem else "unstemmed", str(stem).lower())
    if family in ("muse", "wmdp"):
        metrics, details = (evaluate_muse if family == "muse" else evaluate_mcq_splits)(cfg, model, tokenizer, data,
                                                                                        parts)
        metrics[EVALUATION_KEY] = _placement(cfg, model, parts)
        # what was scored; the few-shot examples are prompt text, not scored rows
        metrics[EVALUATION_KEY]["rows"] = {name: len(rows) for name, rows in data.eval.items() if not is_icl(name)}
        metrics[EVALUATION_KEY]["max_rows"] = cfg.eval.max_rows
        if family == "muse":
            e = cfg.eval  # and what else changes MUSE's numbers: lengths, Min-K%'s k, PrivLeak's reference AUC
            metrics[EVALUATION_KEY].update(rouge_stemmer=stem, max_length=int(e.max_length),
                                           icl_rows={n: len(r) for n, r in data.eval.items() if is_icl(n)},
                                           generation=GENERATION, verbmem_max_new_tokens=int(e.verbmem_max_new_tokens),
                                           knowmem_max_new_tokens=int(e.knowmem_max_new_tokens),
                                           mink_k=float(e.mink_k), retrain_auc=e.retrain_auc)
        else:  # what changes multiple-choice numbers: truncation length and BOS (lm-eval's 0-shot prompt)
            metrics[EVALUATION_KEY].update(max_length=int(cfg.eval.max_length), mcq_add_bos=bool(cfg.eval.mcq_add_bos))
        # lm-eval (eval.lm_eval) is not run here but by add_lm_eval, after the job's last collective.
        return metrics, details

    splits = tofu_eval_splits(cfg, data)
    if cfg.eval.max_rows:
        splits = limit_rows(splits, int(cfg.eval.max_rows), data.forget_split)
    from pipeline.eval.robustness import PROBE_SPLIT, probe_rows, robustness_metrics

    probe_idx, probe = probe_rows(splits[data.retain_split], splits[data.forget_split], int(cfg.eval.probe_rows))
    if probe:
        splits[PROBE_SPLIT] = probe
    results = evaluate_splits(model, tokenizer, splits, _settings(cfg), truth_ratio_key(cfg), _progress_bar(cfg),
                              parts, cfg)
    placement = _placement(cfg, model, parts)
    model.release()  # evaluated: the retain model below (eval_device measures free GPU memory) gets its memory
    ref, ref_info = None, {"source": None}
    if results[data.forget_split].has_truth_ratio:
        ref, ref_info = retain_reference(cfg, paths, data.forget_split, splits[data.forget_split], tokenizer)
        if ref is None and is_main_process():  # else results.json's forget_quality: null says nothing why
            log.info("metric forget_quality skipped: no retain-model reference for split %r (set eval.retain_model "
                     "or eval.retain_reference)", data.forget_split)
    elif is_main_process():
        log.info("metric forget_quality skipped: split %r has no truth ratios (%s)", data.forget_split,
                 "; ".join(results[data.forget_split].skipped))
    metrics = tofu_metrics(results, ref, data.forget_split, data.retain_split)
    if probe:
        metrics.update(robustness_metrics(results[data.retain_split], results[PROBE_SPLIT], probe_idx))
    metrics[EVALUATION_KEY] = {**evaluation_record(cfg, splits, results, ref_info), **placement}
    details = {name: r.to_dict() if hasattr(r, "to_dict") else r.__dict__ for name, r in results.items()}
    return metrics, details


EVALUATION_KEY = "evaluation"  # moved from the metrics to results.json's top level by the callers


def tofu_eval_splits(cfg: DictConfig, data: Any) -> dict[str, list[dict]]:
    """The splits a TOFU-style evaluation scores: ``eval.splits`` (or ``data.eval_splits``) plus the
    forget and retain training sets when not listed. Only question + answer are required; the
    columns of truth-ratio metrics are optional per split (:func:`pipeline.eval.tofu.evaluate_split`)."""
    from pipeline.data.loaders import QA_COLUMNS, check_columns

    names = list(cfg.eval.splits or list(data.eval))
    unknown = [s for s in names if s not in data.eval and s not in (data.forget_split, data.retain_split)]
    if unknown:
        raise DataError(f"dataset {data.name!r}: eval.splits {unknown} not loaded; loaded: {sorted(data.eval)} "
                        f"(add them to data.eval_splits)")
    splits = {s: data.eval[s] if s in data.eval else data.forget if s == data.forget_split else data.retain
              for s in names}
    # TOFU metrics need the forget and retain splits; use the training sets when not listed.
    splits.setdefault(data.forget_split, data.forget)
    splits.setdefault(data.retain_split, data.retain)
    for name, rows in splits.items():
        check_columns(rows, QA_COLUMNS, data.name, name)
    return splits


def evaluation_record(cfg: DictConfig, splits: dict, results: dict, ref_info: dict) -> dict:
    """What an evaluation actually scored, for results.json: the truth-ratio reference per split,
    generation length, rows scored (of rows available) and the metrics skipped for want of columns."""
    from pipeline.eval.tofu import GENERATION

    return {
        "truth_ratio_reference": truth_ratio_reference(cfg),
        "truth_ratio_key": {n: (r.truth_ratio_key if r.has_truth_ratio else None) for n, r in results.items()},
        "rouge_stemmer": rouge_stemmer(cfg),
        "max_new_tokens": int(cfg.eval.max_new_tokens),
        "generation": GENERATION,
        "max_length": int(cfg.eval.max_length),
        "rows": {n: len(r) for n, r in results.items()},
        "max_rows": cfg.eval.max_rows,
        "skipped": {n: list(r.skipped) for n, r in results.items() if r.skipped},
        "retain_reference": ref_info,
    }


def at_model_context(cfg: DictConfig, model_dir: str | Path, level: int = logging.DEBUG) -> DictConfig:
    """``cfg`` with ``eval.max_length`` capped at the context of the model in ``model_dir``: scored,
    generated and recorded (the retain reference's key too) at that length."""
    from pipeline.models.loading import capped_at_context, revision_for

    max_len = capped_at_context("eval.max_length", int(cfg.eval.max_length), str(model_dir),
                                revision_for(cfg.model, model_dir), level=level)
    return cfg if max_len == int(cfg.eval.max_length) else OmegaConf.merge(cfg, {"eval": {"max_length": max_len}})


def check_eval_inputs(cfg: DictConfig, data: Any, model_dir: str | Path) -> None:
    """Fail fast (before training) on what a TOFU-style evaluation would refuse at the end: an
    ``eval.splits`` name the data did not load (a typo trained and exported the model first), a split
    without question / answer columns, an ``eval.retain_reference`` file that does not fit the forget split
    (its settings compared as the evaluation will: at ``model_dir``'s context, which the export keeps)."""
    if not cfg.eval.enabled or data.name.split(":")[0] in ("muse", "wmdp"):
        return
    cfg = at_model_context(cfg, model_dir)
    splits = tofu_eval_splits(cfg, data)
    if cfg.eval.get("retain_reference"):
        from pipeline.eval.reference import load_reference_file

        load_reference_file(cfg.eval.retain_reference, data.forget_split, splits[data.forget_split],
                            _reference_settings(cfg, data.forget_split))


def check_eval_tokenizer(cfg: DictConfig, data: Any, tokenizer: Any) -> None:
    """Fail fast on a tokenizer that a multiple-choice evaluation (WMDP, MMLU) cannot score with: its
    answer letters must encode to distinct tokens (a toy vocabulary without them scored every choice
    alike, and the accuracy came out silently, after training)."""
    if not cfg.eval.enabled or data.name.split(":")[0] != "wmdp":
        return
    from pipeline.data.prompt_formats import PromptFormatError
    from pipeline.eval.mcq import letter_collision

    for split, rows in data.eval.items():
        n = max(len(r["choices"]) for r in rows)
        problem = letter_collision(tokenizer, n, bool(cfg.eval.mcq_add_bos))
        if problem:
            raise PromptFormatError(f"multiple-choice evaluation of {split!r} ({n} choices): {problem}, so its choices "
                                    f"would score alike and its accuracy would measure the tokenizer; use the model's "
                                    f"own tokenizer or leave {split!r} out of data.eval_splits",
                                    key="model.tokenizer_path")


LM_EVAL_FILE = "lm_eval.json"  # lm-eval's results, groups and versions, beside results.json


def check_lm_eval(cfg: DictConfig) -> None:
    """With ``eval.lm_eval``: lm-eval knows every task of ``eval.lm_eval_tasks`` and can read each
    task's dataset here (rank 0 checks, every rank stops alike), at the job's start rather than after
    its training. Its task index is kept for the evaluation at the end."""
    if not (cfg.eval.enabled and cfg.eval.get("lm_eval")):
        return
    from pipeline.eval.lm_eval_bridge import LmEvalError, check_task_data, check_tasks

    problem = None
    if is_main_process():
        tasks = list(cfg.eval.lm_eval_tasks)
        where = (cfg.eval.get("lm_eval_include_path") or None, bool(cfg.eval.get("lm_eval_include_defaults", True)))
        try:
            check_tasks(tasks, *where)
            started = time.perf_counter()
            check_task_data(tasks, *where)
            log.info("lm-eval: the data of tasks %s can be read here (%.0f s; the evaluation at the end reads it "
                     "again)", tasks, time.perf_counter() - started)
        except LmEvalError as e:
            problem = str(e)
    problem = broadcast_object(problem)
    if problem:
        raise LmEvalError(problem)


def lm_eval_limit(value: Any) -> Optional[float | int]:
    """``eval.lm_eval_limit`` as lm-eval reads its ``limit``: a whole number of rows as an int (a float
    >= 1 would be taken as a count anyway, but recorded as 20.0), a fraction as a float, None: all."""
    if value is None:
        return None
    return int(value) if float(value) >= 1 else float(value)


def add_lm_eval(cfg: DictConfig, model_dir: str | Path, run_dir: str | Path, tokenizer_path: Optional[str] = None,
                tokenizer_revision: Optional[str] = None) -> Optional[dict]:
    """With ``eval.lm_eval``: run lm-evaluation-harness on ``model_dir`` on rank 0 and add its
    summary to ``run_dir/results.json`` (``metrics.lm_eval``; what ran under ``lm_eval``) and
    ``report.md``, and lm-eval's full results to ``run_dir/lm_eval.json``; returns the summary.

    Called *after* the job's last collective: the other ranks have returned by then, so no rank
    waits at a barrier (with its process-group timeout) for however long lm-eval takes. lm-eval gets
    the model as an in-process instance (see :mod:`pipeline.eval.lm_eval_bridge`), so it never
    joins the job's process group either. Other ranks return None at once.
    """
    if not cfg.eval.get("lm_eval") or not is_main_process():
        return None
    from pipeline.eval.lm_eval_bridge import run_lm_eval
    from pipeline.eval.report import RESULTS_FILE, render_report_md
    from pipeline.io import atomic_write_json, atomic_write_text
    from pipeline.models.loading import revision_for

    include = cfg.eval.get("lm_eval_include_path")
    out = run_lm_eval(str(model_dir), tasks=list(cfg.eval.lm_eval_tasks), include_path=include or None,
                      include_defaults=bool(cfg.eval.get("lm_eval_include_defaults", True)),
                      batch_size=int(cfg.eval.batch_size), dtype=eval_dtype(cfg), device=eval_device(cfg, model_dir),
                      trust_remote_code=bool(cfg.model.trust_remote_code), allow_pickle=bool(cfg.model.allow_pickle),
                      add_bos=bool(OmegaConf.select(cfg, "eval.mcq_add_bos", default=False)),
                      revision=revision_for(cfg.model, model_dir), tokenizer_path=tokenizer_path,
                      tokenizer_revision=tokenizer_revision, num_fewshot=int(cfg.eval.get("lm_eval_num_fewshot", 0)),
                      limit=lm_eval_limit(cfg.eval.get("lm_eval_limit")))
    summary = out["summary"]
    log.info("lm-eval: %s", summary)
    atomic_write_json(Path(run_dir) / LM_EVAL_FILE, out["raw"])  # every metric of every task, as lm-eval gave it
    path = Path(run_dir) / RESULTS_FILE
    if path.exists():
        results = json.loads(path.read_text())
        results.setdefault("metrics", {})["lm_eval"] = summary
        results["lm_eval"] = {**out["settings"], "file": LM_EVAL_FILE}  # what ran: version, BOS, shots, dtype
        atomic_write_json(path, results)
        if (Path(run_dir) / "report.md").exists():
            atomic_write_text(Path(run_dir) / "report.md", render_report_md(results))
    return summary


def _dry_run_eval(cfg: DictConfig) -> dict:
    """``trainer.dry_run=true`` on an evaluation-only job: what a launch checks before loading the
    model (paths, data and its splits, the retain-model reference, tokenizer and prompt format),
    then the plan; nothing is evaluated or written (it ran a full evaluation before)."""
    # resolving these paths builds them (the embedded benchmark trains its tiny models; a GGUF package
    # is converted): a dry run writes nothing, so it checks no further than the config
    not_built = None
    if cfg.model.source == "synthetic" or cfg.data.name == "synthetic":
        not_built = "the embedded benchmark (its data and models are built or reused in cache_dir by the launch)"
    elif cfg.model.source == "gguf_package":
        from pipeline.models.gguf_package import converted_dir, is_converted

        _, root, _ = converted_dir(str(cfg.model.gguf_package), str(cfg.cache_dir), cfg.model.gguf_file)
        if not is_converted(root):
            not_built = f"{cfg.model.gguf_package} (not converted yet: the launch converts it into {root})"
    if not_built:
        log.info("dry run: evaluation of %s: config checked; nothing built, evaluated or written", not_built)
        return {}
    paths, data, _, _, _ = read_inputs(cfg, training=False)
    rows = {name: len(r) for name, r in data.eval.items()}
    log.info("dry run: evaluation of %s on %s checked (data, tokenizer and prompt format); nothing evaluated or "
             "written", paths.model, rows)
    return {}


def read_inputs(cfg: DictConfig, training: bool) -> tuple[Any, Any, Any, list[str], Any]:
    """(paths, data, tokenizer, where the prompt format applies, the checked prompt format): what a
    training job (``training``) or an evaluation-only one reads before loading a model; their one-line
    errors (data, an eval.splits typo or a reference file that does not fit, a tokenizer the evaluation
    cannot score with, a prompt format it cannot express) stop the job here."""
    from pipeline.data.loaders import load_unlearning_data
    from pipeline.eval.report import data_setting
    from pipeline.inputs import checked_prompt_format, data_record, prompt_format_uses, resolve_paths
    from pipeline.models.loading import load_tokenizer

    paths = resolve_paths(cfg)
    data = load_unlearning_data(cfg.data, int(cfg.seed), data_dir=paths.data_dir)
    log.info("data: %s", data_setting(data_record(cfg, paths, data)))
    check_eval_inputs(cfg, data, paths.model)
    tokenizer = load_tokenizer(paths.tokenizer, cfg.model.trust_remote_code, revision=paths.tokenizer_revision)
    check_eval_tokenizer(cfg, data, tokenizer)  # a multiple-choice evaluation it cannot score: before training
    uses = prompt_format_uses(data, training=training, evaluating=bool(cfg.eval.enabled) if training else True)
    return paths, data, tokenizer, uses, checked_prompt_format(cfg, tokenizer, uses)


def eval_job(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Evaluate the configured model without training (e.g. the target or retain model)."""
    from pipeline.engine.distributed import init_distributed
    from pipeline.eval.report import print_run_summary, render_report_md, set_aside_results, write_results
    from pipeline.inputs import check_before_loading, data_record, prompt_format_record, set_threads
    from pipeline.io import atomic_write_json, atomic_write_text
    from pipeline.models.attention import attention_backend_report, set_attention_backend
    from pipeline.provenance import command_line_overrides, provenance, provenance_line

    check_before_loading(cfg)
    if bool(OmegaConf.select(cfg, "trainer.dry_run", default=False)):
        return _dry_run_eval(cfg)
    library_bars(_progress_bar(cfg))
    dist = init_distributed(cfg.deepspeed.timeout_minutes)
    check_eval_device(cfg)
    check_lm_eval(cfg)
    if dist.is_main:  # a failing re-run must not leave an earlier run's results.json as its own
        log.info(provenance_line(int(cfg.seed)))
        set_aside_results(run_dir)
    set_threads(int(cfg.trainer.num_threads))
    set_attention_backend(cfg.kernels.attention, dist.device)  # logs the choice (and any fallback)
    paths, data, tokenizer, uses, prompt_format = read_inputs(cfg, training=False)
    metrics, details = evaluate_job(cfg, paths.model, tokenizer, data, paths, Path(run_dir) / PARTS_DIR)
    evaluation = metrics.pop(EVALUATION_KEY, None)
    results: dict = {}
    if dist.is_main:
        run_dir = Path(run_dir)
        label = (cfg.model.variant if cfg.model.source == "synthetic"
                 else cfg.model.name if cfg.model.source == "gguf_package" else Path(str(cfg.model.path)).name)
        path = write_results(run_dir, label, None, metrics, {"model": paths.model,
                                                             "data": data_record(cfg, paths, data),
                                                             "forget_split": data.forget_split,
                                                             "retain_split": data.retain_split, "exp_name": cfg.exp_name,
                                                             "world_size": dist.world_size,
                                                             **({EVALUATION_KEY: evaluation} if evaluation else {}),
                                                             "prompt_format": prompt_format_record(prompt_format,
                                                                                                   tokenizer, uses, data),
                                                             "attention_backend": attention_backend_report(),
                                                             "provenance": provenance(int(cfg.seed),
                                                                                      command_line_overrides())})
        results = json.loads(Path(path).read_text())
        atomic_write_text(run_dir / "report.md", render_report_md(results))
        atomic_write_json(run_dir / "eval_details.json", details)
        log.info("evaluation written to %s", run_dir)
    # rank 0, after the last collective; the tokenizer our own scorers used (model.tokenizer_path)
    if add_lm_eval(cfg, paths.model, run_dir, paths.tokenizer, paths.tokenizer_revision) is not None:
        results = json.loads((Path(run_dir) / "results.json").read_text())
    if dist.is_main:  # stdout carries results (logs go to stderr)
        print_run_summary(results, run_dir)
    return results
