"""What a job runs on: where its model, tokenizer and data live, its prompt format and sequence limit.

Shared by the training job (``pipeline.run``) and the evaluation job (``pipeline.eval.runner``), so
both resolve a run's inputs the same way and neither imports the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from pipeline.config_base import ConfigError
from pipeline.logging import SAME_ON_EVERY_RANK

log = logging.getLogger("pipeline.run")


@dataclass
class ModelPaths:
    model: str
    tokenizer: str
    data_dir: Optional[str] = None
    retain_model: Optional[str] = None  # gold-standard model for forget quality
    reference_cache: Optional[str] = None  # where the retain model's eval stats are cached
    revision: Optional[str] = None  # model.revision: the snapshot of ``model`` when it is a hub id

    @property
    def tokenizer_revision(self) -> Optional[str]:
        """The revision the tokenizer is read at: the model's when it comes with the model (a
        pinned model's tokenizer and chat template are the pinned snapshot's, not the hub's main)."""
        return self.revision if self.tokenizer == self.model else None


def check_before_loading(cfg: DictConfig) -> None:
    """Everything about a job that can be checked before anything is loaded or written: the config's
    values, the attention backend (e.g. flash-attn is installed) and the model paths. Run by the
    Hydra callback for every job of a sweep, and again by each job (callers without Hydra)."""
    from pipeline.config import validate
    from pipeline.models.attention import check_available

    validate(cfg)
    check_available(str(cfg.get("kernels", {}).get("attention", "auto")))
    # a dry run checks them too (it passed a missing data.path or retain model that the launch refuses),
    # all but a hub id not downloaded yet: it sizes that model from model.arch
    check_model_paths(cfg)
    check_data_path(cfg)


def check_data_path(cfg: DictConfig) -> None:
    """``data.path``, when set, is a directory (a typo was reported, after the run directory was made, as
    ``split 'forget10' not found at <path>/forget10.jsonl; available splits: []``)."""
    from pipeline.data.loaders import DataError, check_split_names, resolve_data_path

    path = cfg.get("data", {}).get("path")
    if cfg.get("data", {}).get("name") == "synthetic":
        return  # the embedded benchmark reads its own directory (a data.path there is a config error)
    # resolved as the loaders resolve it (~, repository-relative package data), so both agree
    if path and not resolve_data_path(path).is_dir():
        what = "is a file, not a directory" if resolve_data_path(path).exists() else "no such directory"
        raise DataError(f"data.path={path}: {what} (data.name={cfg.data.name} reads its splits from a directory)")
    check_split_names(cfg.data)  # an unknown MUSE / WMDP eval split name, before the run directory is made


def check_model_paths(cfg: DictConfig) -> None:
    """The configured model directories or hub ids can load (``model.path``, ``model.tokenizer_path``,
    ``eval.retain_model``): checked before anything is loaded or written. A dry run
    (``trainer.dry_run``) leaves a hub id the hub cache holds nothing of unchecked (the dry run says
    so and sizes it from ``model.arch``)."""
    from pipeline.models.loading import (
        MODEL_FILES,
        TOKENIZER_FILES,
        cached_snapshot,
        check_model_location,
        check_remote_code,
        check_weight_files,
        check_weights_safe,
        expand_user,
        hub_id_not_cached,
    )

    dry_run = bool(cfg.get("trainer", {}).get("dry_run", False))
    m = cfg.model

    def check(path: str, key: str, revision: Optional[str] = None, needs: tuple[str, ...] = MODEL_FILES) -> None:
        if dry_run and hub_id_not_cached(path, revision):
            return
        check_model_location(path, key, revision, needs)
        if needs is MODEL_FILES:
            # what loading it refuses (pickle-only weights, none, custom code), before any training: the
            # retain model loads only for the evaluation, after the whole training and export. A cached
            # hub id's snapshot is checked as a directory is (a dry run passed one without weights)
            snapshot = cached_snapshot(path, revision)
            if snapshot is None:
                target, what = expand_user(path), None
            else:
                target = str(snapshot)
                what = f"{key}={path} (its snapshot in the hub cache{f' at revision {revision}' if revision else ''})"
                check_weight_files(snapshot, f"{key}={path}")
            check_weights_safe(target, bool(m.allow_pickle), what)
            check_remote_code(target, bool(m.trust_remote_code), what)

    if m.source == "pretrained" and m.path:
        check(str(m.path), "model.path", m.revision)
    if m.source != "synthetic" and m.tokenizer_path:
        check(str(m.tokenizer_path), "model.tokenizer_path", needs=TOKENIZER_FILES)
    elif m.source == "pretrained" and m.path:  # the tokenizer is read from model.path
        check(str(m.path), "model.path", m.revision, needs=TOKENIZER_FILES)
    retain = cfg.get("eval", {}).get("retain_model")
    if retain:
        check(str(retain), "eval.retain_model")


# What a training job writes its weights into, under its run directory (export, LoRA adapter,
# checkpoints); anything else there (results, logs, config.yaml) is not model weights.
RUN_WEIGHT_DIRS = ("model", "adapter", "checkpoints")


def check_inputs_outside(cfg: DictConfig, run_dir: Path) -> None:
    """A training job's model and tokenizer must not live where the job writes weights: it exports
    into ``<run_dir>/model`` (and ``adapter/``, ``checkpoints/``), so it would overwrite the weights
    it starts from (``model.path=runs/x/model`` trained again with the same run_name). A model
    elsewhere under the run directory (another run's export nested below it) is left alone."""
    m = cfg.model
    if m.source == "synthetic":
        return
    run_dir = run_dir.expanduser().resolve()
    for key, value in (("model.path", m.path), ("model.tokenizer_path", m.tokenizer_path)):
        p = Path(str(value)).expanduser() if value else None
        if p is None or not p.exists():
            continue
        p = p.resolve()
        for name in RUN_WEIGHT_DIRS:
            if p.is_relative_to(run_dir / name):
                raise ConfigError(f"config error at '{key}': {value} lies in {run_dir / name}, which this run "
                                  f"overwrites with its own output: pass another run_name (or hydra.run.dir) so "
                                  f"the run writes elsewhere")


def log_first_prompt(tokenizer: Any, encoded: dict, split: str, limit: int = 400) -> None:
    """Log one encoded QA row as the model reads it: its prompt (special tokens and a chat template's
    injected system prompt included) and its answer (the loss tokens). The format's name alone does not
    say what a template adds (SmolLM2's, for one, inserts its own system prompt)."""
    from pipeline.data.formatting import IGNORE_INDEX

    ids, labels = list(encoded["input_ids"]), list(encoded["labels"])
    prompt = tokenizer.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    answer = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])

    def cut(text: str) -> str:
        return repr(text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2:])

    log.info("first %s row as the model reads it: prompt %s, answer (loss tokens) %s", split, cut(prompt), cut(answer))


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
        # eval.retain_model, when set, is the forget-quality reference here too (it was ignored silently)
        return ModelPaths(str(model), str(art.tokenizer_dir), str(art.data_dir),
                          cfg.eval.retain_model or str(art.retain_dir), str(art.root))
    if m.source == "gguf_package":
        from pipeline.models.gguf_package import prepare_gguf_model

        model_dir = str(prepare_gguf_model(m.gguf_package, Path(cfg.cache_dir), m.gguf_file))
        return ModelPaths(model_dir, m.tokenizer_path or model_dir, cfg.data.path, cfg.eval.retain_model, None)
    if cfg.data.name == "synthetic":
        # a pretrained model (e.g. an exported run) on the embedded benchmark: its data, and its retain
        # model as the forget-quality reference unless eval.retain_model names another
        from pipeline.data.prepare import prepare_synthetic

        art = prepare_synthetic(cfg.data.synthetic, m.tiny, Path(cfg.cache_dir))
        return ModelPaths(m.path, m.tokenizer_path or m.path, str(art.data_dir),
                          cfg.eval.retain_model or str(art.retain_dir), str(art.root), m.revision)
    return ModelPaths(m.path, m.tokenizer_path or m.path, cfg.data.path, cfg.eval.retain_model, None, m.revision)


def prompt_format_uses(data: Any, training: bool, evaluating: bool) -> list[str]:
    """Where the run's prompt format is applied: question/answer training rows, and a QA
    evaluation's scoring and generation (MUSE builds its own prompts, WMDP's multiple choice none,
    and raw-text rows are text as they are)."""
    uses = []
    if training and any("question" in r for r in (*data.forget, *data.retain)):
        uses.append("training")
    if evaluating and own_evaluation_prompts(data) is None:
        uses += ["evaluation", "generation"]
    return uses


def data_record(cfg: DictConfig, paths: ModelPaths, data: Any) -> dict:
    """results.json's ``data``: which dataset ran and where it was read from (``path``: a local
    directory, the embedded benchmark's in the cache included; else the hub id at ``revision``), and
    the rows of each split (the forget split's after ``data.forget_fraction``; evaluation splits before
    ``eval.max_rows``, whose rows scored are in ``evaluation.rows``)."""
    hub_id = None if paths.data_dir else OmegaConf.select(cfg, "data.hub_id", default=None)
    revisions = {} if paths.data_dir else {
        k: v for k, v in {hub_id or "default": OmegaConf.select(cfg, "data.revision", default=None),
                          **dict(OmegaConf.select(cfg, "data.hub_revisions", default=None) or {})}.items() if v}
    return {"name": str(cfg.data.name), "dataset": data.name, "path": paths.data_dir, "hub_id": hub_id,
            # per hub id ("default": the loader's default id, which data.revision pins): WMDP and MUSE read several
            "revisions": revisions or None,
            "rows": {data.forget_split: len(data.forget), data.retain_split: len(data.retain),
                     **{k: len(v) for k, v in data.eval.items() if k not in (data.forget_split, data.retain_split)}}}


# what a benchmark's own evaluation prompts are, where the run's prompt format is not applied to them
OWN_EVALUATION_PROMPTS = {
    "muse": "MUSE's own (VerbMem: the text prompt continued; KnowMem: 'Question: ...\\nAnswer: ' after the "
            "few-shot *_icl pairs)",
    "wmdp": "lm-eval's multiple-choice template ('...\\nA. ...\\nAnswer:', each choice scored as ' A', ' B', ...)",
}


def own_evaluation_prompts(data: Any) -> Optional[str]:
    """The prompts a benchmark's evaluation builds itself (MUSE, WMDP), or None where the evaluation
    uses the run's prompt format (question/answer rows)."""
    return OWN_EVALUATION_PROMPTS.get(data.name.split(":")[0])


def prompt_format_record(fmt: Any, tokenizer: Any, uses: list[str], data: Any) -> dict:
    """results.json's ``prompt_format``: the format, where it was applied, and the prompts a benchmark's
    evaluation builds itself instead (``evaluation_prompts``; MUSE, WMDP)."""
    own = own_evaluation_prompts(data)
    return {**fmt.describe(tokenizer), "applied_to": uses, **({"evaluation_prompts": own} if own else {})}


def checked_prompt_format(cfg: DictConfig, tokenizer: Any, uses: list[str]) -> Any:
    """The run's prompt format (model.prompt_format), checked against the tokenizer; logged once
    with where it applies (``uses``: :func:`prompt_format_uses`)."""
    from pipeline.data.prompt_formats import PromptFormatError, prompt_format_from_config

    try:
        fmt = prompt_format_from_config(cfg.model)
        if uses:  # a format the run never applies (WMDP, MUSE) need not suit the tokenizer
            fmt.check(tokenizer)
    except PromptFormatError as e:
        raise ConfigError(f"config error at '{e.key}': {e}") from None
    system = f", system prompt {fmt.system_prompt!r}" if getattr(fmt, "system_prompt", None) else ""
    if not uses:
        from pipeline.data.formatting import raw_text_bos

        log.info("prompt format: %s%s not applied (%s: raw-text rows; its evaluation builds its own prompts); %s",
                 fmt.name, system, cfg.data.name, raw_text_bos(tokenizer))
        return fmt
    stops = ", ".join(tokenizer.convert_ids_to_tokens(fmt.stop_token_ids(tokenizer)))
    log.info("prompt format: %s%s (%s); generation stops at %s", fmt.name, system, ", ".join(uses),
             stops or "max_new_tokens")
    _warn_if_trained_in_another_format(cfg)
    return fmt


_FORMAT_KEYS = ("prompt_format", "system_prompt", "chat_template_kwargs")


def _warn_if_trained_in_another_format(cfg: DictConfig) -> None:
    """A run's export (``<run>/model``, beside the run's config.yaml) used with other prompt-format
    settings than it was trained with, e.g. ``eval.py model.path=runs/x/model`` with the default
    ``plain`` for a model unlearned in ``chat``: every score then reads another prompt."""
    from omegaconf import OmegaConf

    from pipeline.engine.export import EXPORTED_FROM
    from pipeline.io import RUN_CONFIG, run_config_section

    model_dir = Path(str(cfg.model.path or "")).expanduser()
    if model_dir.name != "model" or not (model_dir.parent / EXPORTED_FROM).is_file():
        return
    run_config = model_dir.parent / RUN_CONFIG
    try:
        trained = run_config_section(model_dir.parent, "model")
    except Exception:  # not a config.yaml of ours: nothing to compare
        return
    if trained is None:
        return
    now = OmegaConf.to_container(cfg.model, resolve=True)
    differ = [k for k in _FORMAT_KEYS if k in trained and (trained.get(k) or None) != (now.get(k) or None)]
    if differ:
        log.warning("model.path=%s was unlearned with %s (%s); this job uses %s: its prompts differ from those it "
                    "was trained on (set the same to score it in its own format)", model_dir,
                    ", ".join(f"model.{k}={trained.get(k)!r}" for k in differ), run_config,
                    ", ".join(f"model.{k}={now.get(k)!r}" for k in differ), extra=SAME_ON_EVERY_RANK)
