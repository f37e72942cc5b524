"""Evaluation jobs: data-parallel TOFU-style evaluation of a model directory across ranks.

Each rank loads the (exported) model, evaluates every ``world_size``-th row of each split, and the
per-row results are gathered back in order. Forget quality needs the retain (gold-standard)
model's truth ratios on the forget split: they are computed once and cached beside the benchmark.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from pipeline.engine.distributed import barrier, gather_objects, is_main_process

log = logging.getLogger(__name__)


def _settings(cfg: DictConfig):
    from pipeline.data.prompt_formats import prompt_format_from_config
    from pipeline.eval.tofu import EvalSettings

    return EvalSettings(batch_size=int(cfg.eval.batch_size), max_new_tokens=int(cfg.eval.max_new_tokens),
                        max_length=int(cfg.eval.max_length), template=prompt_format_from_config(cfg.model))


def truth_ratio_key(cfg: DictConfig) -> Optional[str]:
    """Which answer the truth ratio treats as correct. TOFU compares perturbed answers with the
    *paraphrased* answer; the embedded benchmark's tiny models never see paraphrases (they have no
    pretraining), so there the trained answer is the reference (``eval.truth_ratio_reference``)."""
    ref = cfg.eval.truth_ratio_reference
    if ref == "auto":
        synthetic = cfg.data.name == "synthetic" or "synthetic-" in str(cfg.data.path or "")
        return "answer" if synthetic else None
    return ref


def evaluate_splits(model: Any, tokenizer: Any, splits: dict[str, list[dict]], settings: Any,
                    tr_key: Optional[str] = None) -> dict[str, Any]:
    """Data-parallel evaluation of each split; every rank returns the merged results."""
    import torch.distributed as dist

    from pipeline.eval.tofu import evaluate_split, gather_split_results

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    out = {}
    for name, rows in splits.items():
        mine = evaluate_split(model, tokenizer, rows, settings, name=name, rank=rank, world_size=world,
                              truth_ratio_key=tr_key)
        out[name] = gather_split_results(gather_objects(mine))
    return out


def _load_eval_model(path: str | Path, cfg: DictConfig) -> Any:
    from pipeline.models.loading import load_causal_lm

    m = load_causal_lm(path, "float32", cfg.model.trust_remote_code, cfg.model.allow_pickle)
    return m.eval()


def retain_reference(cfg: DictConfig, paths: Any, forget_split: str, rows: list[dict], tokenizer: Any) -> Optional[list[float]]:
    """Truth ratios of the retain model on ``forget_split`` (cached), or None when no retain model."""
    if not paths.retain_model:
        return None
    cache = Path(paths.reference_cache or Path(paths.retain_model).parent) / f"retain_reference_{forget_split}{'_' + truth_ratio_key(cfg) if truth_ratio_key(cfg) else ''}.json"
    if cache.exists():
        return json.loads(cache.read_text())["truth_ratio"]
    model = _load_eval_model(paths.retain_model, cfg)
    res = evaluate_splits(model, tokenizer, {forget_split: rows}, _settings(cfg), truth_ratio_key(cfg))[forget_split]
    ratios = [float(x) for x in res.truth_ratio]
    if is_main_process():
        from pipeline.io import atomic_write_json

        atomic_write_json(cache, {"model": str(paths.retain_model), "split": forget_split, "truth_ratio": ratios})
    barrier()
    return ratios


def _gathered(fn, rows: list[dict], **kw) -> Any:
    """Run a per-rank evaluator on ``rows`` data-parallel and merge the ranks' results in order."""
    import torch.distributed as dist

    from pipeline.eval.muse import merge_results

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return merge_results(gather_objects(fn(rows=rows, rank=rank, world_size=world, **kw)))


def evaluate_muse(cfg: DictConfig, model: Any, tokenizer: Any, data: Any) -> tuple[dict, dict]:
    """MUSE: VerbMem, KnowMem (forget/retain) and PrivLeak (Min-K% AUC, forget vs holdout)."""
    from pipeline.eval.muse import (
        MuseSettings,
        evaluate_knowmem,
        evaluate_mink,
        evaluate_verbmem,
        muse_metrics,
    )

    st = MuseSettings.from_config(cfg.eval)
    ev, res = data.eval, {}
    if "verbmem_forget" in ev:
        res["verbmem"] = _gathered(lambda **k: evaluate_verbmem(model, tokenizer, cfg=st, name="verbmem_forget", **k),
                                   ev["verbmem_forget"])
    for key in ("knowmem_forget", "knowmem_retain"):
        if key in ev:
            icl = ev.get(f"{key}_icl", [])
            res[key] = _gathered(lambda icl=icl, key=key, **k: evaluate_knowmem(model, tokenizer, cfg=st, icl=icl,
                                                                                 name=key, **k), ev[key])
    for key, arg in (("privleak_forget", "mink_forget"), ("privleak_holdout", "mink_holdout")):
        if key in ev:
            res[arg] = _gathered(lambda key=key, **k: evaluate_mink(model, tokenizer, cfg=st, name=key, **k), ev[key])
    metrics = muse_metrics(res.get("verbmem"), res.get("knowmem_forget"), res.get("knowmem_retain"),
                           res.get("mink_forget"), res.get("mink_holdout"), cfg.eval.retrain_auc)
    return metrics, {k: v.to_dict() for k, v in res.items()}


def evaluate_mcq_splits(cfg: DictConfig, model: Any, tokenizer: Any, data: Any) -> tuple[dict, dict]:
    """WMDP / MMLU: 0-shot multiple-choice accuracy per split (our log-likelihood scorer)."""
    from pipeline.eval.mcq import MCQSettings, evaluate_mcq, mcq_accuracy

    st = MCQSettings(batch_size=int(cfg.eval.batch_size), max_length=int(cfg.eval.max_length),
                     add_bos=bool(cfg.eval.mcq_add_bos))
    metrics, details = {}, {}
    for name, rows in data.eval.items():
        r = _gathered(lambda name=name, **k: evaluate_mcq(model, tokenizer, cfg=st, name=name, **k), rows)
        metrics[f"{name}_accuracy"] = mcq_accuracy(r)
        details[name] = r.to_dict()
    return metrics, details


def evenly_spaced(rows: list, n: int) -> list:
    """At most ``n`` rows spread evenly over ``rows`` (deterministic; all of them when ``n >= len``)."""
    from pipeline.eval.metrics import evenly_spaced_indices

    return [rows[i] for i in evenly_spaced_indices(len(rows), n)]


def evaluate_job(cfg: DictConfig, model_dir: str | Path, tokenizer: Any, data: Any, paths: Any) -> tuple[dict, dict]:
    """Metrics of ``model_dir`` for the dataset's family (TOFU-style QA, MUSE, WMDP) and details."""
    from pipeline.eval.tofu import tofu_metrics

    family = data.name.split(":")[0]
    if family in ("muse", "wmdp"):
        model = _load_eval_model(model_dir, cfg)
        metrics, details = (evaluate_muse if family == "muse" else evaluate_mcq_splits)(cfg, model, tokenizer, data)
        # lm-eval (eval.lm_eval) is not run here but by add_lm_eval, after the job's last collective.
        return metrics, details

    splits = {s: data.eval[s] for s in (cfg.eval.splits or list(data.eval))}
    # TOFU metrics need the forget and retain splits; use the training sets when not listed.
    if data.forget_split not in splits:
        splits[data.forget_split] = data.forget
    if data.retain_split not in splits:
        splits[data.retain_split] = data.retain
    from pipeline.data.loaders import EVAL_COLUMNS, check_columns

    for name, rows in splits.items():
        check_columns(rows, EVAL_COLUMNS, data.name, name)
    if cfg.eval.max_rows:
        splits = {name: rows if name == data.forget_split else evenly_spaced(rows, int(cfg.eval.max_rows))
                  for name, rows in splits.items()}
    from pipeline.eval.robustness import PROBE_SPLIT, probe_rows, robustness_metrics

    probe_idx, probe = probe_rows(splits[data.retain_split], splits[data.forget_split], int(cfg.eval.probe_rows))
    if probe:
        splits[PROBE_SPLIT] = probe
    model = _load_eval_model(model_dir, cfg)
    results = evaluate_splits(model, tokenizer, splits, _settings(cfg), truth_ratio_key(cfg))
    ref = retain_reference(cfg, paths, data.forget_split, splits[data.forget_split], tokenizer)
    metrics = tofu_metrics(results, ref, data.forget_split, data.retain_split)
    if probe:
        metrics.update(robustness_metrics(results[data.retain_split], results[PROBE_SPLIT], probe_idx))
    details = {name: r.to_dict() if hasattr(r, "to_dict") else r.__dict__ for name, r in results.items()}
    return metrics, details


def add_lm_eval(cfg: DictConfig, model_dir: str | Path, run_dir: str | Path) -> Optional[dict]:
    """With ``eval.lm_eval``: run lm-evaluation-harness on ``model_dir`` on rank 0 and add its
    summary to ``run_dir/results.json`` (``metrics.lm_eval``) and ``report.md``; returns it.

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

    include = cfg.eval.get("lm_eval_include_path")
    summary = run_lm_eval(str(model_dir), tasks=list(cfg.eval.lm_eval_tasks), include_path=include or None,
                          include_defaults=bool(cfg.eval.get("lm_eval_include_defaults", True)),
                          batch_size=int(cfg.eval.batch_size), dtype=str(cfg.model.dtype),
                          trust_remote_code=bool(cfg.model.trust_remote_code),
                          allow_pickle=bool(cfg.model.allow_pickle))["summary"]
    log.info("lm-eval: %s", summary)
    path = Path(run_dir) / RESULTS_FILE
    if path.exists():
        results = json.loads(path.read_text())
        results.setdefault("metrics", {})["lm_eval"] = summary
        atomic_write_json(path, results)
        if (Path(run_dir) / "report.md").exists():
            atomic_write_text(Path(run_dir) / "report.md", render_report_md(results))
    return summary


def eval_job(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Evaluate the configured model without training (e.g. the target or retain model)."""
    from pipeline.config import validate
    from pipeline.data.loaders import load_unlearning_data
    from pipeline.engine.distributed import init_distributed
    from pipeline.eval.report import render_report_md, write_results
    from pipeline.io import atomic_write_json, atomic_write_text
    from pipeline.models.loading import load_tokenizer
    from pipeline.run import resolve_paths, set_threads

    validate(cfg)
    dist = init_distributed()
    set_threads(int(cfg.trainer.num_threads))
    paths = resolve_paths(cfg)
    data = load_unlearning_data(cfg.data, int(cfg.seed), data_dir=paths.data_dir)
    tokenizer = load_tokenizer(paths.tokenizer, cfg.model.trust_remote_code)
    from pipeline.run import checked_prompt_format

    prompt_format = checked_prompt_format(cfg, tokenizer)
    metrics, details = evaluate_job(cfg, paths.model, tokenizer, data, paths)
    results: dict = {}
    if dist.is_main:
        run_dir = Path(run_dir)
        label = (cfg.model.variant if cfg.model.source == "synthetic"
                 else cfg.model.name if cfg.model.source == "gguf_package" else Path(str(cfg.model.path)).name)
        path = write_results(run_dir, label, None, metrics, {"model": paths.model, "forget_split": data.forget_split,
                                                             "retain_split": data.retain_split, "exp_name": cfg.exp_name,
                                                             "world_size": dist.world_size,
                                                             "prompt_format": prompt_format.describe()})
        results = json.loads(Path(path).read_text())
        atomic_write_text(run_dir / "report.md", render_report_md(results))
        atomic_write_json(run_dir / "eval_details.json", details)
        log.info("evaluation written to %s", run_dir)
    if add_lm_eval(cfg, paths.model, run_dir) is not None:  # rank 0, after the last collective
        results = json.loads((Path(run_dir) / "results.json").read_text())
    return results
