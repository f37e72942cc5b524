"""The unlearning job: validate → data → models → DeepSpeed engines → train → export → evaluate.

Launchers call :func:`train_job` with a composed Hydra config; nothing here parses arguments.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.config import ConfigError, validate

log = logging.getLogger("pipeline.run")


@dataclass
class ModelPaths:
    model: str
    tokenizer: str
    data_dir: Optional[str] = None
    retain_model: Optional[str] = None  # gold-standard model for forget quality
    reference_cache: Optional[str] = None  # where the retain model's eval stats are cached


def set_threads(n: int) -> None:
    import torch

    if n and n > 0:
        torch.set_num_threads(n)


def resolve_paths(cfg: DictConfig) -> ModelPaths:
    """Where the model, tokenizer and data live; builds the synthetic benchmark if needed."""
    m = cfg.model
    if m.source == "synthetic":
        from pipeline.data.prepare import prepare_synthetic

        art = prepare_synthetic(cfg.data.synthetic, m.tiny, Path(cfg.cache_dir))
        model = art.target_dir if m.variant == "target" else art.retain_dir
        return ModelPaths(str(model), str(art.tokenizer_dir), str(art.data_dir), str(art.retain_dir), str(art.root))
    if m.source == "gguf_package":
        from pipeline.models.gguf_package import prepare_gguf_model

        model_dir = str(prepare_gguf_model(m.gguf_package, Path(cfg.cache_dir), m.gguf_file))
        return ModelPaths(model_dir, m.tokenizer_path or model_dir, cfg.data.path, cfg.eval.retain_model, None)
    return ModelPaths(m.path, m.tokenizer_path or m.path, cfg.data.path, cfg.eval.retain_model, None)


def effective_max_length(cfg: DictConfig, model_path: str) -> int:
    """``data.max_length`` capped at the model's context window (read from its config.json)."""
    cfg_file = Path(model_path) / "config.json"
    context = None
    if cfg_file.exists():
        context = json.loads(cfg_file.read_text()).get("max_position_embeddings")
    if context and cfg.data.max_length > context:
        log.warning("data.max_length=%d exceeds the model's context (%d tokens): sequences are limited to %d",
                    cfg.data.max_length, context, context)
        return int(context)
    return int(cfg.data.max_length)


def checked_prompt_format(cfg: DictConfig, tokenizer: Any) -> Any:
    """The run's prompt format (model.prompt_format), checked against the tokenizer; logged once."""
    from pipeline.data.prompt_formats import PromptFormatError, prompt_format_from_config

    fmt = prompt_format_from_config(cfg.model)
    try:
        fmt.check(tokenizer)
    except PromptFormatError as e:
        raise ConfigError(f"config error at 'model.prompt_format': {e}") from None
    log.info("prompt format: %s%s (training, evaluation and generation)", fmt.name,
             f", system prompt {fmt.system_prompt!r}" if getattr(fmt, "system_prompt", None) else "")
    return fmt


def checkpoint_meta(cfg: DictConfig, world_size: int) -> dict:
    """Fields a resumed run must share with the checkpoint it resumes from."""
    method = OmegaConf.to_container(cfg.method, resolve=True)
    return {
        "model": f"{cfg.model.source}:{cfg.model.path or cfg.model.name}:{cfg.model.variant}",
        "method": json.dumps(method, sort_keys=True),
        "data": f"{cfg.data.name}:{cfg.data.forget_split}:{cfg.data.retain_split}:{cfg.data.forget_fraction}",
        "world_size": world_size,
        "batch_size": int(cfg.trainer.batch_size),
        "retain_batch_size": int(cfg.trainer.retain_batch_size),
        "seed": int(cfg.seed),
    }


def train_job(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run one unlearning job in ``run_dir``; returns the results dict (rank 0) or {}."""
    import torch

    from pipeline.data.loaders import encode_rows, load_unlearning_data
    from pipeline.engine.distributed import barrier, init_distributed
    from pipeline.io import atomic_write_json, atomic_write_text
    from pipeline.logging import RunLogger
    from pipeline.methods import build_method
    from pipeline.models.tempered_attention import set_attention_backend

    run_dir = Path(run_dir)
    validate(cfg)  # before anything is loaded
    dist = init_distributed()
    set_threads(int(cfg.trainer.num_threads))
    torch.manual_seed(int(cfg.seed))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    t_start = time.time()

    from pipeline.engine.preflight import dry_run_plan, run_preflight

    method = build_method(cfg.method, kl_impl=cfg.kernels.kl)
    cuda = dist.device == "cuda"
    if cfg.trainer.dry_run:
        # No downloads and no training: size the model from a local config.json or model.arch.
        local = cfg.model.path if cfg.model.source == "pretrained" else None
        plan = dry_run_plan(cfg, local, method.uses_reference, gpus=(1, 8, 16))
        if dist.is_main:
            print(plan, flush=True)
            print("dry run: config validated and memory plan printed; nothing loaded", flush=True)
        return {}

    paths = resolve_paths(cfg)
    data = load_unlearning_data(cfg.data, int(cfg.seed), data_dir=paths.data_dir)  # data errors stop here
    from pipeline.eval.runner import check_retain_reference

    check_retain_reference(cfg, data)  # a precomputed forget-quality reference that does not fit stops here too
    from pipeline.models.loading import check_same_architecture, check_vocab, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(paths.tokenizer, cfg.model.trust_remote_code)
    prompt_format = checked_prompt_format(cfg, tokenizer)
    max_len = effective_max_length(cfg, paths.model)
    forget = encode_rows(tokenizer, data.forget, max_len, cfg.data.truncate, data.forget_split, prompt_format)
    retain = encode_rows(tokenizer, data.retain, max_len, cfg.data.truncate, data.retain_split, prompt_format)
    # method.teacher=cached: the frozen model is loaded only to build a missing cache (or for tau=auto,
    # or for a retain KL); asu_gd with a ready cache trains with no reference model at all.
    cached = bool(getattr(method, "cached_teacher", False))
    need_reference = method.uses_reference
    if cached and not need_reference:
        from pipeline.engine.teacher_cache import cache_ready

        need_reference = str(cfg.method.tau) == "auto" or not cache_ready(
            Path(cfg.cache_dir) / "teacher_cache", paths.model, cfg.method, forget, data.forget_split, max_len)
    if cfg.trainer.preflight:
        run_preflight(cfg, dist.world_size, cuda, paths.model, need_reference)
    set_attention_backend(_attention_backend(cfg.kernels.attention, dist.device))

    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from pipeline.engine.batching import BatchPlan
    from pipeline.engine.ds_config import reference_config, student_config
    from pipeline.engine.trainer import UnlearningTrainer, lr_lambda

    s_cfg = student_config(cfg.deepspeed, cfg.trainer, cuda)
    r_cfg = reference_config(cfg.deepspeed, cfg.trainer, cuda)
    plan = BatchPlan(len(forget), len(retain), int(cfg.trainer.batch_size), int(cfg.trainer.retain_batch_size),
                     dist.world_size, dist.rank, int(cfg.seed))
    total = plan.total_steps(float(cfg.trainer.epochs), int(cfg.trainer.max_steps))

    # Keep the HfDeepSpeedConfig alive while loading: under ZeRO-3 it makes from_pretrained
    # build the model inside deepspeed.zero.Init (sharded from the start).
    dtype = cfg.model.dtype if cuda else "float32"
    hf_ds = HfDeepSpeedConfig(s_cfg)
    student = load_causal_lm(paths.model, dtype, cfg.model.trust_remote_code, cfg.model.allow_pickle, cfg.model.revision)
    check_vocab(student, tokenizer, f"model {paths.model}")
    validate(cfg, n_layers=int(student.config.num_hidden_layers))
    reference = None
    if need_reference:
        reference = load_causal_lm(paths.model, dtype, cfg.model.trust_remote_code, cfg.model.allow_pickle,
                                   cfg.model.revision)
        reference.requires_grad_(False)
        check_same_architecture(student, reference)
    # Only model construction should see ZeRO-3 through transformers; the evaluation model loaded
    # later is a plain per-rank copy.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    del hf_ds
    unset_hf_deepspeed_config()
    method.select_trainable(student)
    if cfg.deepspeed.activation_checkpointing and hasattr(student, "gradient_checkpointing_enable"):
        student.gradient_checkpointing_enable()

    engine, _, _, _ = deepspeed.initialize(
        model=student,
        model_parameters=[p for p in student.parameters() if p.requires_grad],
        config=s_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(total, float(cfg.trainer.warmup_ratio), cfg.trainer.lr_scheduler)),
    )
    ref_engine = None
    if reference is not None:
        ref_engine = deepspeed.initialize(model=reference, config=r_cfg)[0]
        ref_engine.eval()

    config_dict = OmegaConf.to_container(cfg, resolve=True)
    run_logger = RunLogger(cfg.logging, str(run_dir), str(cfg.run_name), config_dict, enabled=dist.is_main)
    trainer = UnlearningTrainer(
        cfg, run_dir, engine, ref_engine, method, forget, retain, tokenizer.pad_token_id, plan, total,
        run_logger, checkpoint_meta(cfg, dist.world_size),
    )
    trainer.views = method.forget_views(tokenizer, data.forget, int(cfg.data.max_length), prompt_format)
    tau_selection = None
    if "tau" in cfg.method and str(cfg.method.tau) == "auto":
        # Choose tau from a cheap teacher-side signal before training (recorded in results.json).
        from pipeline.engine.tau_auto import select_tau

        tau_selection = select_tau(ref_engine, tokenizer, data, forget, cfg)
        with open_dict(cfg):
            cfg.method.tau = float(tau_selection["tau"])
        log.info("method.tau=auto chose tau=%.3f", cfg.method.tau)
    if cached:
        from pipeline.engine.teacher_cache import TeacherCache, build_teacher_cache

        cache_path = build_teacher_cache(ref_engine, forget, cfg.method, Path(cfg.cache_dir) / "teacher_cache",
                                         int(cfg.trainer.batch_size), model_path=paths.model,
                                         split=data.forget_split, max_length=max_len,
                                         pad_token_id=tokenizer.pad_token_id, device=trainer.device)
        trainer.teacher_cache = TeacherCache(cache_path)
        if not method.uses_reference and ref_engine is not None:
            import gc

            ref_engine = reference = trainer.reference = None  # the cache replaces it from here on
            gc.collect()
        log.info("teacher cache %s; reference model loaded: %s; reference engine during training: %s", cache_path,
                 "yes" if need_reference else "no", "yes (retain KL)" if trainer.reference is not None else "none")
    t_loop = time.time()  # the training loop alone (train_seconds also counts loading and tau=auto)
    state = trainer.train()
    train_seconds = time.time() - t_start
    train_loop_seconds = time.time() - t_loop
    if dist.is_main:
        atomic_write_json(run_dir / "train_history.json", state.history)

    model_dir = run_dir / "model"
    if cfg.trainer.export:
        from pipeline.engine.export import export_hf

        export_hf(engine, tokenizer, model_dir)
    del ref_engine, reference
    results: dict = {}
    # results.json is written either way (tau used, tau=auto's evidence, steps, final losses); with
    # eval.enabled=false its metrics are empty and there is no report.md / eval_details.json.
    metrics, details = {}, None
    if cfg.eval.enabled:
        from pipeline.eval.runner import evaluate_job

        metrics, details = evaluate_job(cfg, model_dir, tokenizer, data, paths)
    if dist.is_main:
        from pipeline.eval.report import render_report_md, write_results

        extra = {
            "exp_name": cfg.exp_name,
            "run_name": cfg.run_name,
            "model": paths.model,
            "forget_split": data.forget_split,
            "retain_split": data.retain_split,
            "steps": total,
            "skipped_steps": state.skipped,
            "world_size": dist.world_size,
            "train_seconds": round(train_seconds, 2),
            "train_loop_seconds": round(train_loop_seconds, 2),
            "final_train": state.history[-1] if state.history else {},
            "prompt_format": prompt_format.describe(),
        }
        if tau_selection is not None:
            extra["tau_selection"] = tau_selection
        if "evaluation" in metrics:  # what the evaluation scored (reference, generation length, rows)
            extra["evaluation"] = metrics.pop("evaluation")
        tau = float(cfg.method.tau) if "tau" in cfg.method else None
        path = write_results(run_dir, cfg.method.name, tau, metrics, extra)
        results = json.loads(Path(path).read_text())
        if cfg.eval.enabled:
            atomic_write_text(run_dir / "report.md", render_report_md(results))
            atomic_write_json(run_dir / "eval_details.json", details)
            run_logger.summary({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    run_logger.finish()
    barrier()
    if cfg.eval.enabled and cfg.trainer.export:
        from pipeline.eval.runner import add_lm_eval

        # rank 0 only, after the barrier above: the other ranks are done and wait for nothing
        if add_lm_eval(cfg, model_dir, run_dir) is not None:
            results = json.loads((Path(run_dir) / "results.json").read_text())
    if dist.is_main:
        log.info("run %s finished in %.1fs", run_dir, time.time() - t_start)
    return results


def _attention_backend(name: str, device: str) -> str:
    if name == "auto":
        return "triton" if device == "cuda" else "torch"
    return name
