"""The unlearning job as named stages: start → inputs → engines → τ / teacher cache → train → export →
evaluate and report.

Launchers call :func:`train_job` with a composed Hydra config; nothing here parses arguments. Each
stage is a function of what the previous ones produced, so a stage can be read (and tested) alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.config import validate
from pipeline.config_base import require
from pipeline.describe import method_line, param_counts, trainable_set
from pipeline.dry_run import dry_run
from pipeline.engine.checkpoint import (
    check_compatible,
    check_resume,
    checkpoint_name,
    ckpt_info,
    peft_meta,
    read_meta,
)
from pipeline.engine.ds_config import gather_per_layer, reference_config, resolve_precision, student_config
from pipeline.engine.export import EXPORTED_FROM
from pipeline.finished import finished_results, job_key, record_finished
from pipeline.inputs import (
    ModelPaths,
    check_before_loading,
    check_inputs_outside,
    data_record,
    log_first_prompt,
    prompt_format_record,
    resolve_paths,
    set_threads,
)
from pipeline.logging import SAME_ON_EVERY_RANK
from pipeline.progress import library_bars, progress
from pipeline.provenance import command_line_overrides, provenance, provenance_line

log = logging.getLogger("pipeline.run")

__all__ = ["train_job", "checkpoint_meta", "ModelPaths", "resolve_paths"]


def checkpoint_meta(cfg: DictConfig, world_size: int, cuda: bool = False) -> dict:
    """Fields a resumed run must share with the checkpoint it resumes from (``cuda``: the ranks train
    on GPUs, which decides what ``deepspeed.precision=auto`` is)."""
    method = OmegaConf.to_container(cfg.method, resolve=True)
    # refusal settings added later: left out at their defaults, so earlier idk_dpo / asu_idk
    # checkpoints (written without them) still resume
    for key, default in (("idk_answers_file", None), ("idk_draw", "per_question")):
        if key in method and method[key] == default:
            del method[key]
    meta = {
        "model": f"{cfg.model.source}:{cfg.model.path or cfg.model.name}:{cfg.model.variant}",
        "method": json.dumps(method, sort_keys=True),
        "data": f"{cfg.data.name}:{cfg.data.forget_split}:{cfg.data.retain_split}:{cfg.data.forget_fraction}",
        "world_size": world_size,
        "batch_size": int(cfg.trainer.batch_size),
        "retain_batch_size": int(cfg.trainer.retain_batch_size),
        "seed": int(cfg.seed),
    }
    if cfg.model.peft.enabled:  # only then: checkpoints of full-model runs keep their meta unchanged
        meta["peft"] = peft_meta(OmegaConf.to_container(cfg.model.peft, resolve=True))
    from pipeline.engine.zero_stage import resolve_zero_stage

    # The stage decides the checkpoint's layout (ZeRO-3 shards vs one state file): DeepSpeed cannot
    # load one as the other, so a resume with another stage is refused (checkpoint.check_compatible).
    meta["zero_stage"] = resolve_zero_stage(cfg.deepspeed, world_size).stage
    meta.update(training_meta(cfg, cuda))
    # how the steps were computed (the same math, other kernels): recorded, not compared, so that a
    # resume under other kernels says so and results.json tells the attempts apart
    meta[ckpt_info("kernels")] = {"attention": str(cfg.kernels.attention), "kl": str(cfg.kernels.kl),
                                  "passes": str(cfg.trainer.passes)}
    return meta


# What else a step depends on: the optimizer and schedule (DeepSpeed restores the checkpoint's lr and
# schedule whatever the config says now), the step count the schedule and the export aim at, the
# batches' order and contents, the rows' text and the training precision.
TRAINING_META = ("trainer.epochs", "trainer.max_steps", "trainer.grad_accum", "trainer.lr", "trainer.weight_decay",
                 "trainer.warmup_ratio", "trainer.lr_scheduler", "trainer.max_grad_norm",
                 "data.max_length", "data.truncate", "data.pack_text", "data.question_column",
                 "data.answer_column", "data.text_column", "data.columns", "model.prompt_format",
                 "model.system_prompt", "model.chat_template_kwargs")


def training_meta(cfg: DictConfig, cuda: bool) -> dict:
    """The :data:`TRAINING_META` settings as checkpoint meta fields (``training.<key>``), and the
    training precision as resolved (``auto`` is bf16 on GPUs, fp32 on CPU ranks)."""
    out = {}
    for key in TRAINING_META:
        value = OmegaConf.select(cfg, key, default=None)
        out[f"training.{key}"] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    out["training.precision"] = resolve_precision(cfg.deepspeed, cuda)
    if (int(cfg.trainer.grad_accum) > 1 or float(OmegaConf.select(cfg, "method.rna_noise", default=0) or 0) > 0
            or OmegaConf.select(cfg, "method.idk_draw", default=None) == "per_use"):
        # what changed in how these runs draw (2026-12): epochs cut per optimizer step, RNA noise and
        # per-use refusals keyed by stream position. An earlier checkpoint of such a run lacks the field
        # and is refused instead of resumed on other rows; a run without any of them draws as before.
        out["training.draws"] = "rows per optimizer step, keyed by stream position"
    return out


@dataclass
class JobInputs:
    """Stage 2's product: the data, tokenizer and encoded rows the job trains and evaluates on."""

    paths: ModelPaths
    data: Any  # pipeline.data.loaders.UnlearningData
    tokenizer: Any
    prompt_format: Any
    max_len: int
    forget: list
    retain: list
    prompt_format_uses: list  # where the format applies (pipeline.inputs.prompt_format_uses); [] = raw text only


@dataclass
class JobEngines:
    """Stage 3's product: the student engine and the frozen model (a second engine, the LoRA
    student's base with its adapters off, or None)."""

    engine: Any
    reference: Any
    lora: bool
    dtype: str
    partition: dict = field(default_factory=dict)
    zero_stage: dict = field(default_factory=dict)  # requested, resolved, reason (results.json)
    checkpointed_layers: int = 0  # student decoder layers recomputed in the backward (results.json)
    precision: dict = field(default_factory=dict)  # training precision, weights' dtype, device (results.json)
    params: tuple[int, int] = (0, 0)  # trainable and total student parameters (a LoRA run's results.json)


def train_job(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run one unlearning job in ``run_dir``; returns the results dict (rank 0) or {}."""
    run_dir = Path(run_dir)
    dist, method = _start(cfg)
    check_inputs_outside(cfg, run_dir)  # its export would overwrite the weights it starts from

    def resume_point() -> Optional[Path]:
        # the checkpoint to resume from: a path (or a typo) refused before anything is loaded, a dry run's too
        return check_resume(str(cfg.trainer.resume), run_dir / "checkpoints", bool(cfg.model.allow_pickle))

    if cfg.trainer.dry_run:  # before the batch is resolved for this launch: its columns check grad_accum as configured
        resume_point()
        return dry_run(cfg, method, dist, run_dir)
    from pipeline.engine.run_lock import run_dir_lock

    # one launch at a time writes here: held before the checkpoints are read (another launch still
    # training prunes them) and before anything in the directory is set aside
    with run_dir_lock(run_dir):
        return _train(cfg, run_dir, dist, method, resume_point())


def _train(cfg: DictConfig, run_dir: Path, dist: Any, method: Any, resume_from: Optional[Path]) -> dict:
    """:func:`train_job` past its checks, holding the run directory: inputs, engines, τ and the teacher
    cache, training, export, evaluation."""
    _resolve_batch(cfg, dist.world_size)
    t_start = time.time()
    inputs = _load_inputs(cfg)
    key = job_key(cfg, dist.world_size, inputs)  # before tau=auto writes its choice into cfg
    # written when training starts (trainer.on_loop_start), as resolved now: tau=auto still reads "auto"
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    # before a known tau=auto choice enters cfg: checkpoints record method.tau=auto, the chosen tau as tau_chosen
    meta = _resume_meta(cfg, dist, key)

    def check_the_resume() -> None:
        # refused before any model is loaded (a requeue on another number of GPUs), and before the
        # directory's earlier results are set aside: a refused launch changes nothing
        if resume_from is not None:
            saved = {k: v for k, v in read_meta(resume_from).items() if k != TAU_CHOSEN}  # known only once tau is
            check_compatible(saved, meta, resume_from)

    done = finished_results(cfg, run_dir, key, before_rerun=check_the_resume)
    if done is not None:  # this very job finished here and its outputs are intact: nothing is loaded
        _announce(dist, done, run_dir, reused=True)
        return done
    tau_selection = _known_tau(cfg, run_dir, key, resume_from)  # no probes, and maybe no frozen model, needed
    need_reference = _needs_reference(cfg, method, inputs, dist.device == "cuda")
    engines, plan, total = _build_engines(cfg, dist, method, inputs, need_reference, run_dir, resume_from)

    from pipeline.engine.trainer import UnlearningTrainer
    from pipeline.logging import RunLogger

    run_logger = RunLogger(cfg.logging, str(run_dir), _wandb_name(cfg, run_dir), OmegaConf.to_container(cfg, resolve=True),
                           enabled=dist.is_main, resume=resume_from is not None,
                           group=OmegaConf.select(cfg, "exp_name", default=None))
    trainer = UnlearningTrainer(cfg, run_dir, engines.engine, engines.reference, method, inputs.forget, inputs.retain,
                                inputs.tokenizer.pad_token_id, plan, total, run_logger, meta)
    trainer.on_loop_start = lambda: _write_config(config_text, dist, run_dir)
    trainer.views = method.forget_views(inputs.tokenizer, inputs.data.forget, inputs.max_len,
                                        inputs.prompt_format, seed=int(cfg.seed))
    if tau_selection is None:
        tau_selection = _choose_tau(cfg, engines, inputs, run_dir, key)
    if tau_selection is not None:  # a resume must train on with the tau its checkpoint was trained with
        meta[TAU_CHOSEN] = float(cfg.method.tau)
        run_logger.update_config({"method": OmegaConf.to_container(cfg.method, resolve=True)})
    _attach_teacher_cache(cfg, method, engines, inputs, trainer, need_reference)
    engines.params = param_counts(engines.engine.module)  # counted before the engines are released
    if dist.is_main:  # one line with what trains: the settings a reader of the log compares runs by
        log.info(method_line(cfg, trainable_set(method, engines.params, engines.lora), total,
                             auto_tau=tau_selection is not None))

    state = trainer.train()
    # train_seconds: the training loop alone, over every attempt (resumes add theirs to the checkpoint's);
    # job_seconds: this attempt from its start, loading and tau=auto included
    job_seconds, train_seconds = time.time() - t_start, state.train_seconds
    if dist.is_main:
        from pipeline.io import atomic_write_json

        atomic_write_json(run_dir / "train_history.json", state.history)
    model_dir = _export(cfg, engines, inputs, run_dir, trainer)
    _release_engines(engines, trainer)  # the evaluation model gets their (GPU) memory
    results = _evaluate_and_report(cfg, dist, run_dir, model_dir, inputs, engines, method, state, total,
                                   (job_seconds, train_seconds), tau_selection, run_logger)
    record_finished(run_dir, key, state.step)  # last: a re-run of this job then returns results.json as is
    if dist.is_main:
        log.info("run %s finished in %.1fs", run_dir, time.time() - t_start)
    _announce(dist, results, run_dir)
    return results


# --------------------------------------------------------------------------------------------------
# Stages


def _wandb_name(cfg: DictConfig, run_dir: Path) -> str:
    """The run's name in wandb: its directory below ``output_dir`` (a sweep's points,
    ``sweeps/<exp>/method.tau=2.0``, are told apart; ``run_name`` is the same for all of them)."""
    try:
        return run_dir.resolve().relative_to(Path(str(cfg.output_dir)).resolve()).as_posix()
    except ValueError:  # a run directory outside output_dir (hydra.run.dir set elsewhere)
        return str(cfg.run_name)


def _resume_meta(cfg: DictConfig, dist: Any, key: dict) -> dict:
    """What a checkpoint records for a resume to compare (:func:`checkpoint_meta`), plus the rows themselves
    (another data.path with the same split names resumed silently) and the starting model's content:
    new weights at the same model.path resumed the old training silently. Content, not paths or mtimes:
    a model re-staged to scratch by a requeued job resumes."""
    from pipeline.models.fingerprint import content_fingerprint, split_code

    # a remote-code model's *.py: a field of its own (compared only where a checkpoint has it)
    weights, code = split_code(content_fingerprint(key["model"]))

    def digest(obj: Any) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]

    return {**checkpoint_meta(cfg, dist.world_size, dist.device == "cuda"),
            "rows.forget": key["rows.forget"], "rows.retain": key["rows.retain"],
            "model.content_sha256": digest(weights), **({"model.code_sha256": digest(code)} if code else {})}


def _start(cfg: DictConfig) -> tuple[Any, Any]:
    """Validate (nothing loaded yet), join the process group, build the method (nothing is written:
    config.yaml waits for the input checks, :func:`_write_config`)."""
    import torch

    from pipeline.engine.distributed import init_distributed
    from pipeline.eval.runner import check_eval_device, check_lm_eval
    from pipeline.methods import build_method

    check_before_loading(cfg)  # values, attention backend, model paths: exit 2, nothing written
    library_bars(bool(cfg.logging.progress_bar))
    dist = init_distributed(cfg.deepspeed.timeout_minutes)
    # here, not in check_before_loading: a sweep's submit host may have no GPU where its jobs do
    require(not (cfg.deepspeed.precision == "fp16" and dist.device != "cuda"), "deepspeed.precision",
            "fp16 needs GPU ranks (DeepSpeed's CPU accelerator has no fp16 training); use auto, fp32 or bf16")
    check_eval_device(cfg)  # eval.device=cuda without a GPU: stop now, not after training
    check_lm_eval(cfg)  # an lm-eval task it does not know: likewise
    set_threads(int(cfg.trainer.num_threads))
    torch.manual_seed(int(cfg.seed))
    if dist.is_main:
        log.info(provenance_line(int(cfg.seed)))  # which code: results.json["provenance"] too
    method = build_method(cfg.method, kl_impl=cfg.kernels.kl, joint_pass=cfg.trainer.passes == "joint")
    for caution in type(method).config_cautions(cfg.method):
        log.warning(caution, extra=SAME_ON_EVERY_RANK)
    reductions = method.reductions() if hasattr(method, "reductions") else {}
    log.info("loss reductions: %s", ", ".join(f"{k} term {v}" for k, v in reductions.items())
             + ("; token_mean: over the optimizer step's tokens (every micro-batch and rank)"
                if "token_mean" in reductions.values() else ""))
    log.info("training step: trainer.passes=%s (%s), %s", cfg.trainer.passes,
             "one forward per model over all rows, head at loss positions only" if cfg.trainer.passes == "joint"
             else "one forward per row group and model",
             f"kernels.kl={cfg.kernels.kl}" if method.uses_kl() else "no KL term (kernels.kl unused)")
    return dist, method


def _write_config(text: str, dist: Any, run_dir: Path) -> None:
    """Rank 0 writes the resolved ``run_dir/config.yaml`` (atomically) when training starts: past the
    input checks, the engines, the teacher cache and the checkpoint's compatibility check. A dry run,
    or a launch refused by any of them, leaves a finished run's config.yaml in the same directory as
    it was (it described the run whose checkpoints and results are there)."""
    if not dist.is_main:
        return
    from pipeline.io import RUN_CONFIG, atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RUN_CONFIG, text)


def _announce(dist: Any, results: dict, run_dir: Path, reused: bool = False) -> None:
    """Rank 0 prints the job's summary on stdout (each job of a sweep its own)."""
    if dist.is_main and results:
        from pipeline.eval.report import print_run_summary

        print_run_summary(results, run_dir, reused)


def _resolve_batch(cfg: DictConfig, world_size: int) -> None:
    """``trainer.grad_accum`` from ``trainer.effective_batch`` and the number of ranks (written into
    ``cfg``, so config.yaml, checkpoints and the finished-job key hold what ran), and the batch logged."""
    from pipeline.engine.batching import resolve_grad_accum

    t = cfg.trainer
    grad_accum, how = resolve_grad_accum(int(t.batch_size), int(t.grad_accum), t.effective_batch, world_size)
    with open_dict(cfg):
        cfg.trainer.grad_accum = grad_accum
    log.info("batch: %s; %d retain rows per rank per micro-batch", how, int(t.retain_batch_size))


def _load_inputs(cfg: DictConfig) -> JobInputs:
    """Data (its errors stop here, before any model), tokenizer, prompt format and encoded rows."""
    from pipeline.data.loaders import encode_rows
    from pipeline.eval.runner import read_inputs
    from pipeline.models.loading import capped_at_context

    paths, data, tokenizer, uses, fmt = read_inputs(cfg, training=True)
    max_len = capped_at_context("data.max_length", int(cfg.data.max_length), paths.model, paths.revision)
    pack = bool(cfg.data.pack_text)
    with progress("tokenizing", cfg.logging.progress_bar):  # a bar for raw-text corpora (batches of texts)
        forget = encode_rows(tokenizer, data.forget, max_len, cfg.data.truncate, data.forget_split, fmt, pack)
        retain = encode_rows(tokenizer, data.retain, max_len, cfg.data.truncate, data.retain_split, fmt, pack)
    if "training" in uses and forget and "question" in data.forget[0]:
        log_first_prompt(tokenizer, forget[0], data.forget_split)
    return JobInputs(paths, data, tokenizer, fmt, max_len, forget, retain, uses)


def _model_dtype(cfg: DictConfig, cuda: bool) -> str:
    """The dtype both models are loaded and run in. deepspeed.precision=fp32 on a GPU trains in fp32:
    DeepSpeed casts weights only for bf16/fp16, so weights loaded in model.dtype (bf16 for the 7B
    configs) would train in bf16 with no fp32 master."""
    return str(cfg.model.dtype) if cuda and resolve_precision(cfg.deepspeed, cuda) != "fp32" else "float32"


def _compute_dtype(cfg: DictConfig, cuda: bool) -> str:
    """The dtype the models compute in, which keys the teacher cache: DeepSpeed casts them to bf16 /
    fp16 whatever dtype they were loaded in (model.dtype=float32 with bf16 training computes in bf16)."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(resolve_precision(cfg.deepspeed, cuda), _model_dtype(cfg, cuda))


def _needs_reference(cfg: DictConfig, method: Any, inputs: JobInputs, cuda: bool) -> bool:
    """Whether the frozen model must exist. method.teacher=cached: only to build a missing cache (or
    for tau=auto, or for a retain KL); asu_gd with a ready cache trains with no frozen model at all."""
    if method.uses_reference or not getattr(method, "cached_teacher", False):
        return bool(method.uses_reference)
    from pipeline.engine.teacher_cache import cache_ready

    return str(cfg.method.tau) == "auto" or not cache_ready(
        Path(cfg.cache_dir) / "teacher_cache", inputs.paths.model, cfg.method, inputs.forget,
        inputs.data.forget_split, inputs.max_len, _compute_dtype(cfg, cuda), revision=cfg.model.revision,
        attention=str(cfg.kernels.attention), device="cuda" if cuda else "cpu")


def _build_engines(cfg: DictConfig, dist: Any, method: Any, inputs: JobInputs, need_reference: bool,
                   run_dir: Path, resume_from: Optional[Path] = None) -> tuple[JobEngines, Any, int]:
    """Memory and disk preflight (for the steps left after ``resume_from``), attention backend, the
    student (optionally LoRA) and frozen model under ZeRO-3; also the batch plan and the number of
    optimizer steps."""
    from pipeline.engine.batching import BatchPlan
    from pipeline.engine.preflight import largest_batch, run_preflight
    from pipeline.engine.sharding import record_models
    from pipeline.engine.zero_stage import resolve_zero_stage
    from pipeline.models.activation_checkpointing import checkpointed_layers
    from pipeline.models.attention import set_attention_backend

    cuda = dist.device == "cuda"
    zero = resolve_zero_stage(cfg.deepspeed, dist.world_size)
    log.info(zero.describe())  # e.g. deepspeed.zero_stage=auto -> 0 (1 rank, no offload)
    if cfg.trainer.preflight:
        run_preflight(cfg, dist.world_size, cuda, inputs.paths.model, need_reference,
                      batch=largest_batch(inputs.forget, inputs.retain, int(cfg.trainer.batch_size),
                                          int(cfg.trainer.retain_batch_size)))
    set_attention_backend(cfg.kernels.attention, dist.device)  # logs the choice (and any fallback)

    s_cfg = student_config(cfg.deepspeed, cfg.trainer, cuda, world_size=dist.world_size)
    r_cfg = reference_config(cfg.deepspeed, cfg.trainer, cuda, world_size=dist.world_size)
    log.info("DeepSpeed student zero_optimization: %s", s_cfg["zero_optimization"])
    plan = BatchPlan(len(inputs.forget), len(inputs.retain), int(cfg.trainer.batch_size),
                     int(cfg.trainer.retain_batch_size), dist.world_size, dist.rank, int(cfg.seed),
                     int(cfg.trainer.grad_accum))
    total = plan.total_steps(float(cfg.trainer.epochs), int(cfg.trainer.max_steps))
    log.info("steps: %d optimizer step%s (%s; %d forget rows, %d step%s per epoch of %d rows)", total,
             "" if total == 1 else "s",
             f"trainer.max_steps={int(cfg.trainer.max_steps)}" if int(cfg.trainer.max_steps) > 0
             else f"trainer.epochs={float(cfg.trainer.epochs):g}", plan.n_forget, plan.steps_per_epoch,
             "" if plan.steps_per_epoch == 1 else "s", plan.forget_per_step)
    from pipeline.engine.disk_plan import run_disk_preflight

    if cfg.trainer.preflight:  # before any model loads
        start = int(read_meta(resume_from).get("step", 0)) if resume_from is not None else 0
        run_disk_preflight(cfg, dist.world_size, cuda, inputs.paths.model, run_dir, total, start)
    if int(cfg.trainer.max_steps) > 0 and any(o.split("=", 1)[0].lstrip("+~") == "trainer.epochs"
                                              for o in command_line_overrides() or []):
        # trainer=tiny / realworld_smol / wmdp_7b set max_steps: an epochs override alone changed nothing
        log.warning("trainer.epochs=%g is not used: trainer.max_steps=%d sets the step count; add "
                    "trainer.max_steps=-1 to train by epochs", float(cfg.trainer.epochs), int(cfg.trainer.max_steps),
                    extra=SAME_ON_EVERY_RANK)

    dtype = _model_dtype(cfg, cuda)
    precision = {"training": resolve_precision(cfg.deepspeed, cuda), "weights": dtype, "device": dist.device}
    unused = "" if str(cfg.model.dtype) == dtype else \
        f" (model.dtype={cfg.model.dtype} not used: {precision['training']} training keeps float32 weights)"
    log.info("precision: %s training (deepspeed.precision=%s), weights loaded in %s on %s%s",
             precision["training"], cfg.deepspeed.precision, dtype, dist.device, unused)
    student, frozen = _load_models(cfg, inputs, s_cfg, dtype, cuda, need_reference)
    method.select_trainable(student)
    engine, reference = _initialize_engines(cfg, dist, student, frozen, s_cfg, r_cfg, total, need_reference)
    partition = record_models(engine, reference, dist.world_size, zero.stage)
    return JobEngines(engine, reference, bool(cfg.model.peft.enabled), dtype, partition, zero.record(),
                      checkpointed_layers(engine.module), precision), plan, total


def _load_models(cfg: DictConfig, inputs: JobInputs, s_cfg: dict, dtype: str, cuda: bool,
                 need_reference: bool) -> tuple[Any, Any]:
    """The student (LoRA-wrapped with ``model.peft``) and, when the method needs one and it is not the
    LoRA student's own base, the frozen model: loaded sharded under ZeRO-3 and checked."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from pipeline.models.loading import check_same_architecture, check_vocab, load_causal_lm

    paths = inputs.paths

    def load() -> Any:
        return load_causal_lm(paths.model, dtype, cfg.model.trust_remote_code, cfg.model.allow_pickle,
                              paths.revision)

    # Keep the HfDeepSpeedConfig alive while loading: under ZeRO-3 it makes from_pretrained build the
    # model inside deepspeed.zero.Init (sharded from the start). Only model construction should see
    # ZeRO-3 through transformers; the evaluation model loaded later is a plain per-rank copy.
    hf_ds = HfDeepSpeedConfig(s_cfg)
    student = load()
    check_vocab(student, inputs.tokenizer, f"model {paths.model}")
    if not cuda:  # CPU ranks: the allocator's mmap threshold for this model's size (host_memory.py)
        from pipeline.engine.host_memory import mmap_threshold_for, tune_host_allocator

        tune_host_allocator(mmap_threshold_for(sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters())))
    validate(cfg, n_layers=int(student.config.num_hidden_layers))
    if OmegaConf.select(cfg, "method.tau", default=None) is not None:  # a tempered teacher (ASU methods)
        from pipeline.models.tempered_attention import layers_without_attention, tempered_attention_problem

        layers = OmegaConf.select(cfg, "method.teacher_layers", default=None)
        if layers is not None:
            problem = layers_without_attention(student, list(layers))  # a hybrid model's mamba layers, say
            require(problem is None, "method.teacher_layers", problem or "")
        # Bloom, Falcon, MPT, ... (their own attention code), then a probe forward: every attention
        # layer tau applies to must call the tempered function (remote code may bypass it)
        problem = tempered_attention_problem(student, None if layers is None else list(layers))
        require(problem is None, "model.path", problem or "")
    if cfg.model.peft.enabled:
        # model.peft: the student trains LoRA adapters only; θ₀ is its own base with the adapters off
        # (FrozenBaseView, built once the engine exists): no second model is loaded.
        from pipeline.models.peft_student import low_lr_warning, wrap_lora

        student = wrap_lora(student, cfg.model.peft, paths.revision)
        if (note := low_lr_warning(float(cfg.trainer.lr))) is not None:
            log.warning(note, extra=SAME_ON_EVERY_RANK)
    if cfg.kernels.kl == "fused":  # after LoRA wrapping: an adapter on the output head is refused too
        from pipeline.methods.passes import fused_head_problem

        problem = fused_head_problem(student)
        require(problem is None, "kernels.kl", problem or "")
    frozen = None
    if need_reference and not cfg.model.peft.enabled:
        frozen = load()
        frozen.requires_grad_(False)
        check_same_architecture(student, frozen)
    del hf_ds
    unset_hf_deepspeed_config()
    return student, frozen


def _initialize_engines(cfg: DictConfig, dist: Any, student: Any, frozen: Any, s_cfg: dict, r_cfg: dict,
                        total: int, need_reference: bool) -> tuple[Any, Any]:
    """``deepspeed.initialize`` the student (optimizer, LR schedule) and the frozen model; with LoRA the
    frozen model is the student's base with its adapters off."""
    import deepspeed
    import torch

    from pipeline.engine.host_memory import share_fp32_master
    from pipeline.engine.trainer import lr_lambda, warmup_steps
    from pipeline.engine.zero_stage import prepare_stage0_engine

    cuda = dist.device == "cuda"
    lora = bool(cfg.model.peft.enabled)
    if cfg.deepspeed.activation_checkpointing:
        from pipeline.models.activation_checkpointing import enable_activation_checkpointing

        log.info("student: activation checkpointing on %d decoder layers (non-reentrant; activations "
                 "recomputed in the backward)", enable_activation_checkpointing(student))

    if gather_per_layer(student, s_cfg, cuda, bool(cfg.deepspeed.activation_checkpointing),
                        cfg.trainer.passes == "joint"):
        log.info("student engine (ZeRO-3, CPU ranks): each decoder layer's weights gathered in one fetch")
    if frozen is not None and gather_per_layer(frozen, r_cfg, cuda):
        log.info("frozen engine (ZeRO-3, CPU ranks): each decoder layer's weights gathered in one fetch")
    warm = warmup_steps(total, float(cfg.trainer.warmup_ratio))
    log.info("lr schedule: %s, peak lr %g, %d warm-up step%s of %d (trainer.warmup_ratio=%g)%s",
             cfg.trainer.lr_scheduler, float(cfg.trainer.lr), warm, "" if warm == 1 else "s", total,
             float(cfg.trainer.warmup_ratio),
             "; below one step: no warm-up" if float(cfg.trainer.warmup_ratio) > 0 and not warm else "")
    engine, _, _, _ = deepspeed.initialize(
        model=student,
        model_parameters=[p for p in student.parameters() if p.requires_grad],
        config=s_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(total, float(cfg.trainer.warmup_ratio), cfg.trainer.lr_scheduler)),
    )
    share_fp32_master(engine)  # fp32 runs: no second fp32 copy of the partitions (DeepSpeed 0.19 makes one)
    for change in prepare_stage0_engine(engine, dist.world_size):  # stage 0 steps like ZeRO-3, without idle work
        log.info("stage 0 student engine: %s", change)
    reference = None
    if frozen is not None:
        reference = deepspeed.initialize(model=frozen, config=r_cfg)[0]
        reference.eval()
    elif lora:
        from pipeline.models.peft_student import reference_for

        reference = reference_for(engine, need_reference)
        log.info("LoRA student: teacher/reference = %s", "the student's base with the adapters off (no second "
                 "model loaded)" if reference is not None else "none (the method needs no frozen model)")
    return engine, reference


def _choose_tau(cfg: DictConfig, engines: JobEngines, inputs: JobInputs, run_dir: Path,
                key: dict) -> Optional[dict]:
    """method.tau=auto, not known yet (:func:`_known_tau`): choose tau from a cheap teacher-side signal
    before training (its evidence goes to results.json and ``run_dir/tau_selection.json``, reused by a
    later attempt of the job with ``key``); the config then carries the chosen value."""
    if "tau" not in cfg.method:
        return None
    if str(cfg.method.tau) != "auto":
        if float(cfg.method.tau) <= 1.0:  # allowed (an ablation, a control), but it does not smooth
            log.warning("method.tau=%s: a teacher at tau <= 1 is not smoothed (tau = 1 is the frozen model itself, "
                        "tau < 1 sharpens its attention); ASU forgets with tau > 1", cfg.method.tau,
                        extra=SAME_ON_EVERY_RANK)
        return None
    from pipeline.engine.distributed import is_main_process
    from pipeline.engine.tau_auto import select_tau
    from pipeline.io import atomic_write_json

    with progress("tau=auto probes", cfg.logging.progress_bar):
        selection = select_tau(engines.reference, inputs.tokenizer, inputs.data, inputs.forget, cfg)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / TAU_SELECTION, {"key": key, "selection": selection})
    if float(selection["tau"]) <= 1.0:  # the teacher is the frozen model itself: nothing is forgotten
        log.warning("method.tau=auto chose tau=%.3f (%s): a teacher at tau <= 1 is not smoothed, so the ASU forget "
                    "term distils the unchanged model; set method.tau to a value > 1", float(selection["tau"]),
                    selection.get("reason", ""), extra=SAME_ON_EVERY_RANK)
    else:
        log.info("method.tau=auto chose tau=%.3f", float(selection["tau"]))
    with open_dict(cfg):
        cfg.method.tau = float(selection["tau"])
    return selection


def _known_tau(cfg: DictConfig, run_dir: Path, key: dict, resume_from: Optional[Path]) -> Optional[dict]:
    """method.tau=auto already decided for this job, without probes: by an earlier attempt of this very
    job (same key: config, rows, model, code; ``run_dir/tau_selection.json``), or by the checkpoint it
    resumes from, which wins: it was trained with its tau (an earlier attempt's selection no longer
    matches after, e.g., an evaluation setting changed, and probing again could choose another tau for
    the rest of the run; a checkpoint from elsewhere may carry another tau than this directory's
    selection, which the trainer's compatibility check would refuse only after loading the models).
    The config then carries the value; None when it must be chosen."""
    if "tau" not in cfg.method or str(cfg.method.tau) != "auto":
        return None
    from pipeline.engine.distributed import broadcast_object, is_main_process

    found = None
    if is_main_process():
        stored_key, stored = _stored_tau_selection(run_dir / TAU_SELECTION)
        selection = stored if stored_key == key else None
        trained = read_meta(resume_from).get(TAU_CHOSEN) if resume_from is not None else None
        if selection is not None and (trained is None or float(trained) == float(selection["tau"])):
            found = (selection, f"chosen by an earlier attempt of this job ({run_dir / TAU_SELECTION})")
        elif trained is not None:  # a resume trains on with its checkpoint's tau, whatever else was chosen here
            source = f"checkpoint {resume_from}"
            # the directory's selection of that same tau, made before a key change (an evaluation setting,
            # a code update before a requeue): its evidence (reason, probes) still explains the tau
            evidence = stored if stored is not None and float(stored.get("tau", -1)) == float(trained) else {}
            if evidence:
                source += f"; chosen (with this evidence) by an earlier attempt, {run_dir / TAU_SELECTION}"
            found = ({**evidence, "tau": float(trained), "source": source},
                     f"the tau checkpoint {resume_from} was trained with")
    found = broadcast_object(found)
    if found is None:
        return None
    selection, why = found
    log.info("method.tau=auto: tau=%.3f, %s", float(selection["tau"]), why)
    with open_dict(cfg):
        cfg.method.tau = float(selection["tau"])
    return selection


TAU_SELECTION = "tau_selection.json"  # tau=auto's choice and evidence, reused by a later attempt of the same job
TAU_CHOSEN = "tau_chosen"  # checkpoint meta: the tau a tau=auto run trained with (a resume keeps it)


def _stored_tau_selection(path: Path) -> tuple[Optional[dict], Optional[dict]]:
    """(the job key it was made for, the selection) stored at ``path``; (None, None) when there is none."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(rec, dict) or not isinstance(rec.get("selection"), dict):
        return None, None
    return rec.get("key"), rec["selection"]


def _attach_teacher_cache(cfg: DictConfig, method: Any, engines: JobEngines, inputs: JobInputs, trainer: Any,
                          need_reference: bool) -> None:
    """method.teacher=cached: build (once) and attach the tempered teacher's cached distributions; a
    method that needs the frozen model for nothing else then trains without it."""
    if not getattr(method, "cached_teacher", False):
        return
    from pipeline.engine.teacher_cache import TeacherCache, build_teacher_cache

    with progress("teacher cache", cfg.logging.progress_bar):  # a bar only while it is being built
        cache_path = build_teacher_cache(engines.reference, inputs.forget, cfg.method,
                                         Path(cfg.cache_dir) / "teacher_cache", int(cfg.trainer.batch_size),
                                         model_path=inputs.paths.model, split=inputs.data.forget_split,
                                         max_length=inputs.max_len, pad_token_id=inputs.tokenizer.pad_token_id,
                                         device=trainer.device,
                                         dtype=_compute_dtype(cfg, engines.precision["device"] == "cuda"),
                                         revision=cfg.model.revision)
    trainer.teacher_cache = TeacherCache(cache_path)
    if not method.uses_reference and engines.reference is not None:
        _release_engines(engines, trainer, student=False)  # the cache replaces the frozen model from here on
    log.info("teacher cache %s; %s", cache_path,
             _frozen_model_note(engines.lora, need_reference, trainer.reference is not None))


def _frozen_model_note(lora: bool, need_reference: bool, in_training: bool) -> str:
    """What a method.teacher=cached run's log says about its frozen model: whether a reference model was
    loaded (``need_reference``: to build the cache, probe tau=auto or for a retain KL) and whether it
    stays for training (``in_training``: the retain KL). A LoRA student loads none: its own base with
    the adapters off is the frozen model (before, the log said "reference model loaded: yes" there)."""
    if lora:
        why = ("its own base with the adapters off is the frozen model, no second copy" if need_reference
               else "the cache was ready, so no frozen model was needed")
        return (f"reference model loaded: no (LoRA student: {why}); frozen model during training: "
                + ("the LoRA base (retain KL)" if in_training else "none"))
    return (f"reference model loaded: {'yes' if need_reference else 'no'}; reference engine during training: "
            + ("yes (retain KL)" if in_training else "none"))


def _release_engines(engines: JobEngines, trainer: Any, student: bool = True) -> None:
    """Free the frozen model (and with ``student`` the student engine, once exported): DeepSpeed's
    ``destroy`` removes the ZeRO-3 hooks and optimizer state that would otherwise keep them alive,
    so the evaluation model that is loaded next has the GPU's memory."""
    import gc

    import torch

    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
    for name in ("reference", "engine") if student else ("reference",):
        eng = getattr(engines, name)
        if eng is not None and hasattr(eng, "destroy"):  # a LoRA student's frozen view is not an engine
            eng.destroy()
        setattr(engines, name, None)
        setattr(trainer, name, None)
    gc.collect()
    if before is not None:
        torch.cuda.empty_cache()
        log.info("released the %s: %.1f GiB of GPU memory freed", "training engines" if student else "frozen model",
                 (before - torch.cuda.memory_allocated()) / 2**30)


def _export_record(checkpoint: Optional[Path], step: int, merged_dtype: Optional[str]) -> dict:
    """``exported_from.json``: the checkpoint (name and save id) ``model/`` was exported from, at which
    step, and with LoRA the dtype the adapters were merged into (resumable: it decides no step)."""
    from pipeline.engine.checkpoint import save_id

    rec = {"checkpoint": None if checkpoint is None else checkpoint_name(checkpoint), "step": step,
           "save_id": None if checkpoint is None else save_id(checkpoint)}
    return rec if merged_dtype is None else {**rec, "merged_dtype": merged_dtype}


def _exported_already(run_dir: Path, model_dir: Path, trainer: Any, merged_dtype: Optional[str]) -> bool:
    """This attempt resumed at the last step, trained nothing, and ``model_dir`` (with LoRA also the
    adapter) is the export of that very checkpoint (an attempt stopped during its evaluation): export
    it again for nothing? The checkpoint's save id, not only its step, must match: a run trained again
    in its directory (``trainer.resume=never``, a continual step whose inputs changed) and stopped
    before its export left the earlier training's export beside a new checkpoint of the same step.
    ``merged_dtype``: LoRA's (None: a full model), which must match too. Rank 0 decides, every rank
    follows (the export is collective)."""
    from pipeline.engine.distributed import broadcast_object, is_main_process

    same = False
    if is_main_process() and trainer.resumed_from is not None and trainer.state.step == trainer.start_step:
        try:
            rec = json.loads((run_dir / EXPORTED_FROM).read_text())
        except (OSError, ValueError):
            rec = None
        exported = model_dir.is_dir() and (merged_dtype is None or
                                           (run_dir / "adapter" / "adapter_config.json").is_file())
        same = exported and rec == _export_record(trainer.resumed_from, trainer.state.step, merged_dtype)
    return bool(broadcast_object(same))


def _export(cfg: DictConfig, engines: JobEngines, inputs: JobInputs, run_dir: Path, trainer: Any) -> Path:
    """The HF model directory (safetensors; with LoRA also the adapter) the evaluation reads; the one
    an earlier attempt exported from the same final checkpoint is kept (its files, and so the
    evaluation parts keyed on them, stay valid)."""
    from pipeline.engine import checkpoint as ckpt
    from pipeline.engine.distributed import is_main_process
    from pipeline.io import atomic_write_json

    model_dir = run_dir / "model"
    if not cfg.trainer.export:
        return model_dir
    merged_dtype = None
    if engines.lora:
        from pipeline.engine.export_peft import merge_dtype

        merged_dtype = merge_dtype(cfg.model, engines.dtype)
    if _exported_already(run_dir, model_dir, trainer, merged_dtype):
        if is_main_process():
            log.info("%s is the export of checkpoint %s, written by an earlier attempt, and nothing was trained "
                     "since: not exported again", model_dir, checkpoint_name(trainer.resumed_from))
        return model_dir
    if engines.lora:
        from pipeline.engine.export_peft import export_lora

        export_lora(engines.engine, inputs.tokenizer, model_dir, run_dir / "adapter", inputs.paths.model,
                    engines.dtype, cfg.model)
    else:
        from pipeline.engine.export import export_hf

        export_hf(engines.engine, inputs.tokenizer, model_dir, trust_remote_code=bool(cfg.model.trust_remote_code))
    if is_main_process():
        latest = ckpt.latest_checkpoint(trainer.ckpt_root)
        at_this_step = latest is not None and ckpt.read_meta(latest).get("step") == trainer.state.step
        atomic_write_json(run_dir / EXPORTED_FROM,
                          _export_record(latest if at_this_step else None, trainer.state.step, merged_dtype))
    return model_dir


def _evaluate_and_report(cfg: DictConfig, dist: Any, run_dir: Path, model_dir: Path, inputs: JobInputs,
                         engines: JobEngines, method: Any, state: Any, total: int, seconds: tuple[float, float],
                         tau_selection: Optional[dict], run_logger: Any) -> dict:
    """Evaluate the exported model and write results.json (always: τ used, τ=auto's evidence, steps,
    final losses, what ran; ``seconds`` = (job so far, training loop alone)), report.md and
    eval_details.json (with eval.enabled)."""
    from pipeline.engine.distributed import barrier
    from pipeline.io import atomic_write_json, atomic_write_text
    from pipeline.models.attention import attention_backend_report

    metrics, details = {}, None
    if cfg.eval.enabled:
        from pipeline.eval.parts import PARTS_DIR
        from pipeline.eval.runner import evaluate_job

        metrics, details = evaluate_job(cfg, model_dir, inputs.tokenizer, inputs.data, inputs.paths,
                                        run_dir / PARTS_DIR)
    results: dict = {}
    if dist.is_main:
        from pipeline.eval.report import render_report_md, write_results

        extra = {
            "exp_name": cfg.exp_name,
            "run_name": cfg.run_name,
            "model": inputs.paths.model,
            "data": data_record(cfg, inputs.paths, inputs.data),  # which dataset, read from where, its rows
            "forget_split": inputs.data.forget_split,
            "retain_split": inputs.data.retain_split,
            "steps": total,
            "skipped_steps": state.skipped,
            "loss_scale_skipped_steps": state.overflow_skipped,  # fp16 only: DeepSpeed's overflow skips
            "world_size": dist.world_size,
            "train_rows": {"forget": len(inputs.forget), "retain": len(inputs.retain)},
            "batch": {"forget_per_rank": int(cfg.trainer.batch_size), "retain_per_rank": int(cfg.trainer.retain_batch_size),
                      "grad_accum": int(cfg.trainer.grad_accum),
                      "forget_per_step": int(cfg.trainer.batch_size) * int(cfg.trainer.grad_accum) * dist.world_size},
            "zero_stage": engines.zero_stage,  # requested (auto or 0..3), resolved, why
            "precision": engines.precision,
            "zero3_partition": engines.partition,
            "train_seconds": round(seconds[1], 2),  # the training loop alone, every attempt (per step: train_history.json)
            "job_seconds": round(seconds[0], 2),  # this attempt from its start: loading, engines, tau=auto, the loop
            "final_train": state.history[-1] if state.history else {},
            "prompt_format": prompt_format_record(inputs.prompt_format, inputs.tokenizer, inputs.prompt_format_uses,
                                                  inputs.data),
            "reductions": method.reductions() if hasattr(method, "reductions") else {},
            "step_passes": cfg.trainer.passes,
            "kernels": {"attention": str(cfg.kernels.attention), "kl": str(cfg.kernels.kl)},
            "method_config": OmegaConf.to_container(cfg.method, resolve=True),  # every weight and setting it ran
            "resumed_from": state.resumed,  # null: trained from the start in this attempt
            "activation_checkpointing": {"layers": engines.checkpointed_layers},  # 0: off
            "attention_backend": attention_backend_report(),  # requested, resolved, what each model ran
            "provenance": provenance(int(cfg.seed), command_line_overrides()),  # code, libraries, seed, overrides
        }
        if tau_selection is not None:
            extra["tau_selection"] = tau_selection
        if "evaluation" in metrics:  # what the evaluation scored (reference, generation length, rows)
            extra["evaluation"] = metrics.pop("evaluation")
        if engines.lora:
            # the modules adapted, as peft resolved them (target_modules: null means the architecture's
            # defaults), from the exported adapter's own config (the engines are released by now)
            adapter_cfg = run_dir / "adapter" / "adapter_config.json"
            adapted = json.loads(adapter_cfg.read_text()).get("target_modules") if adapter_cfg.exists() else None
            extra["peft"] = {**OmegaConf.to_container(cfg.model.peft, resolve=True), "adapter": str(run_dir / "adapter"),
                             "adapted_modules": sorted(adapted) if isinstance(adapted, list) else adapted,  # or a regex
                             "trainable_params": engines.params[0], "total_params": engines.params[1]}
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
    return results
