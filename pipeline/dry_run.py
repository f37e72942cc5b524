"""``trainer.dry_run=true``: what a job would run, the checks a launch makes in its first seconds
that need no weights, and the memory plan on 1/8/16 GPUs; nothing is downloaded, trained or written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from pipeline.describe import loss_settings, optimizer_line, teacher_settings
from pipeline.inputs import checked_prompt_format, prompt_format_uses
from pipeline.provenance import command_line_overrides


def dry_run(cfg: DictConfig, method: Any, dist: Any, run_dir: Optional[Path] = None) -> dict:
    """No downloads and no training: what would run (:func:`_dry_run_header`), the checks a launch
    makes before its weights load (the model paths and data.path, checked by
    :func:`pipeline.inputs.check_before_loading` before this; a local model directory's weights files,
    the layer indices against its config.json, a json dataset's split files, the tokenizer and the
    prompt format against it: the same one-line errors), and the memory plan on 1/8/16 GPUs and the
    launched world size (:func:`plan_columns`) with each column's batch and ZeRO stage, sized from a
    local or cached config.json or model.arch."""
    from pipeline.engine.disk_plan import dry_run_disk
    from pipeline.engine.preflight import dry_run_plan

    model_dir, model_note = _dry_run_model(cfg)
    _dry_run_layers(cfg, model_dir)
    _dry_run_data(cfg)
    tokenizer_note = _dry_run_tokenizer(cfg, model_dir)
    # a cached teacher: the run that builds the cache (the first, or any with tau=auto) holds the frozen
    # model as the launch's preflight plans it; with a ready cache and a fixed tau a run needs less
    cached = bool(getattr(method, "cached_teacher", False)) and not method.uses_reference
    gpus = plan_columns()
    plan = dry_run_plan(cfg, model_dir, method.uses_reference or cached, gpus=gpus)
    plan += "\n" + dry_run_disk(cfg, model_dir, gpus=gpus)
    if cached:
        plan += ("\n(method.teacher=cached: planned with the frozen model, which the run building the cache holds; "
                 "a run with a ready cache and a fixed tau needs less)")
    if dist.is_main:
        done = ("config, tokenizer and prompt format checked, memory plan printed; nothing loaded but the tokenizer"
                if tokenizer_note else "config validated, memory plan printed; nothing loaded")
        lines = [*_dry_run_header(cfg, run_dir), model_note, tokenizer_note or "", plan, f"dry run: {done}"]
        print("\n".join(line for line in lines if line), flush=True)
    return {}


PLAN_GPUS = (1, 8, 16)  # the dry run's columns: one GPU, one node, two nodes


def plan_columns() -> tuple[int, ...]:
    """The GPU counts the dry run plans: :data:`PLAN_GPUS`, and the launched world size when the dry run
    runs under a multi-rank launcher (``deepspeed --num_gpus 2``: the 2-GPU column is the one it asks about)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return tuple(sorted({*PLAN_GPUS, world}))


def _dry_run_header(cfg: DictConfig, run_dir: Optional[Path] = None) -> list[str]:
    """What the run would be: method (tau, teacher layers and mode, layer and loss weights where it has
    them), prompt format, precision, attention backend, the optimiser's settings and the run
    directory; a few short lines."""
    from pipeline.engine.ds_config import resolve_precision

    m = cfg.method
    parts = teacher_settings(m) + loss_settings(m)
    method = f"method {m.name}" + (f" ({', '.join(parts)})" if parts else "")
    ds = cfg.deepspeed
    applied = "" if _dry_run_format_uses(cfg) else " (not applied: raw-text data)"
    return [f"dry run of {run_dir or _dry_run_dir(cfg)}",
            f"{method}; prompt format {cfg.model.prompt_format}{applied}",
            f"precision: {resolve_precision(ds, True)} on GPUs, {resolve_precision(ds, False)} on CPU ranks "
            f"(deepspeed.precision={ds.precision}); attention: {_dry_run_attention(str(cfg.kernels.attention))}",
            optimizer_line(cfg.trainer)]


def _dry_run_dir(cfg: DictConfig) -> str:
    """The run directory the job would write (Hydra's, else config.yaml's ``output_dir/run_name``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.output_dir)
    except ValueError:  # no Hydra app around (a caller composing the config itself)
        return f"{cfg.output_dir}/{cfg.run_name}"


def _dry_run_attention(requested: str) -> str:
    """``kernels.attention=<x> -> <backend> on GPU, <backend> on CPU``, as the run would resolve it
    (from the installed packages and rules alone: no GPU needed)."""
    from pipeline.models.attention import AttentionBackendError
    from pipeline.models.attention.dispatch import resolve_backend

    out = []
    for device, label in (("cuda", "GPU"), ("cpu", "CPU")):
        try:
            out.append(f"{resolve_backend(requested, device).backend} on {label}")
        except AttentionBackendError:
            out.append(f"none on {label}")
    return f"kernels.attention={requested} -> {', '.join(out)}"


def _dry_run_model(cfg: DictConfig) -> tuple[Optional[str], str]:
    """(a local model directory to size from and check, or None; the plan's line saying which).

    model.source=pretrained: model.path when it is a local directory (checked as a launch checks it,
    its weights files as loading them checks them), or a hub id with a config.json in the hub cache;
    else model.arch sizes it. gguf_package: the converted cache directory when present; otherwise
    model.arch, or a one-line error telling how to convert it (launchers/prepare.py)."""
    from pipeline.models.loading import model_config_file

    m = cfg.model
    if m.source == "synthetic":
        return None, "model: the embedded tiny model (model.tiny), built by the run"
    if m.source == "gguf_package":
        return _dry_run_gguf(cfg)
    path = str(m.path) if m.path else None
    if path and Path(path).expanduser().is_dir():
        # its weights files (pickle only, none, custom code) were checked before this, as a launch checks
        # them (pipeline.inputs.check_model_paths, from check_before_loading)
        return path, f"model.path {path}: checked, sized from its config.json"
    if path and model_config_file(path, m.revision) is not None:  # its snapshot checked by check_model_paths
        at = f" at revision {m.revision}" if m.revision else ""
        return path, f"model.path {path}: in the hub cache{at}, sized from its cached config.json"
    return None, f"model.path not checked (dry run): sized from model.arch ({path} is a hub id not in the hub cache)"


def _dry_run_layers(cfg: DictConfig, model_dir: Optional[str]) -> None:
    """Layer indices (``method.teacher_layers``, RMU's ``method.layer``, ``model.peft.layers``) within the
    model's ``num_hidden_layers``, read from ``model_dir``'s config.json (a hub id's cached one at
    model.revision): the launch makes this check, ``validate(cfg, n_layers=...)``, only once the weights
    are loaded. Without a config.json (sized from model.arch) the launch alone checks them."""
    from pipeline.config import validate
    from pipeline.engine.preflight import resolve_arch

    if model_dir is None:  # synthetic: validate bounded them by model.tiny; an uncached hub id: no config.json
        return
    # the plan's own reading of the config.json (GPT-2's n_layer, a multimodal model's text_config)
    validate(cfg, n_layers=resolve_arch(cfg.model, model_dir).num_hidden_layers)


def _dry_run_data(cfg: DictConfig) -> None:
    """A ``data.name=json`` directory has a file for each split the launch reads (forget, retain, every
    eval split): the loader's own one-line DataError otherwise, which the launch gives once it reads its
    data (``data.forget_split=forgett``). data.path itself was checked before (check_data_path); hub
    datasets and local mirrors (tofu, muse, wmdp) are found by the launch's reading alone."""
    from pipeline.data.common import find_split_file
    from pipeline.data.loaders import json_data_dir

    d = cfg.data
    if str(d.name) != "json":
        return
    root = json_data_dir(d)
    for split in dict.fromkeys(str(s) for s in (d.forget_split, d.retain_split, *(d.eval_splits or []))):
        find_split_file(root, split, f"json:{d.path}")  # the loader's "split ... not found" line


def _dry_run_gguf(cfg: DictConfig) -> tuple[Optional[str], str]:
    """The converted directory of ``model.gguf_package`` in cache_dir (the name
    :func:`pipeline.models.gguf_package.prepare_gguf_model` gives it), without converting anything."""
    from pipeline.engine.preflight import ARCH_KEYS, PreflightError
    from pipeline.models.gguf_package import converted_dir, is_converted

    m = cfg.model
    # not installed: its own one-line error
    gguf, root, _ = converted_dir(str(m.gguf_package), str(cfg.cache_dir), m.gguf_file)
    if is_converted(root):
        return str(root), f"model: {root} (converted from {m.gguf_package}), sized from its config.json"
    prepare = f"python launchers/prepare.py {_dry_run_overrides()}".rstrip()
    if all(OmegaConf.select(m, f"arch.{k}", default=None) is not None for k in ARCH_KEYS[:-1]):
        return None, f"model not converted yet (dry run): sized from model.arch; `{prepare}` converts it"
    raise PreflightError(f"cannot size model {m.gguf_package}/{gguf.name} offline: it is not converted yet (no {root}); "
                         f"convert it once (about 30 s) with `{prepare}`, then dry-run again")


def _dry_run_overrides() -> str:
    """This job's command-line overrides without trainer.dry_run (for a command to suggest)."""
    task = command_line_overrides()
    if task is None:
        return "<the same overrides>"
    return " ".join(o for o in task if not o.startswith("trainer.dry_run"))


def _dry_run_format_uses(cfg: DictConfig) -> list[str]:
    """Where the prompt format would apply (:func:`pipeline.inputs.prompt_format_uses`), told from the
    dataset's kind without reading its rows: QA rows train in it, raw-text corpora (MUSE, WMDP) do not."""
    from types import SimpleNamespace

    rows = [{"text": ""}] if str(cfg.data.name) in ("muse", "wmdp") else [{"question": ""}]
    data = SimpleNamespace(forget=rows, retain=[], name=str(cfg.data.name))
    return prompt_format_uses(data, training=True, evaluating=bool(cfg.eval.enabled))


def _dry_run_tokenizer(cfg: DictConfig, model_dir: Optional[str]) -> Optional[str]:
    """Load the tokenizer (a local directory, or a hub id's cached files at its revision) and check the
    prompt format against it as the real run does (:func:`pipeline.inputs.checked_prompt_format`: the
    same one-line ConfigError); the line saying so. A hub id the cache holds nothing of: a line saying
    it was not checked and how to get it (a MUSE config's gated Llama-2 tokenizer, say, which the launch
    refuses). None for the synthetic benchmark's (not built yet) and a model sized from model.arch."""
    from pipeline.models.loading import (
        TOKENIZER_FILES,
        check_model_location,
        hub_id_not_cached,
        load_tokenizer,
    )

    m = cfg.model
    if m.source == "synthetic":
        return None
    if m.tokenizer_path:
        key, path, revision = "model.tokenizer_path", str(m.tokenizer_path), None
    else:
        key, path, revision = "model.path", model_dir, (m.revision if model_dir == str(m.path) else None)
    if not path:
        return None
    if not Path(path).expanduser().is_dir() and hub_id_not_cached(path, revision):
        return (f"{key} {path}: not checked (dry run): not in the hub cache, which the launch reads it from; "
                f"get it first: hf download {path} --include 'tokenizer*' 'special_tokens_map.json' (a gated "
                f"repository: accept its licence on the hub and `hf auth login` before)")
    check_model_location(path, key, revision, needs=TOKENIZER_FILES)
    tokenizer = load_tokenizer(path, m.trust_remote_code, revision=revision)
    uses = _dry_run_format_uses(cfg)
    fmt = checked_prompt_format(cfg, tokenizer, uses)
    return f"tokenizer {path}: prompt format {fmt.name} " + ("checked" if uses else "not applied (raw-text data)")
