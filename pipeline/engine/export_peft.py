"""Export a LoRA student (``model.peft``): the adapter in peft's layout and a merged full model.

``<run>/adapter``: ``adapter_model.safetensors`` + ``adapter_config.json`` (``PeftModel.save_pretrained``),
reloadable with ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)``.
``<run>/model``: the base with the adapters merged in (``merge_and_unload``), a plain transformers
model directory, which is what evaluation and every later step read. The merge runs, and the merged
model is saved, in float32 whatever the training dtype (``model.peft.merged_dtype=model`` keeps the
training dtype, half the disk, rounded): merging into bf16 weights rounds W + ΔW to
bf16's resolution (~0.4 % of |W|), and unlearning's adapter changes are mostly smaller — at
|ΔW|/|W| ≈ 6e-4, 86 % of the entries came back unchanged, and the logit check (bounded at bf16's
resolution) could not tell.

Under ZeRO-3 only the adapter weights are gathered (``GatheredParameters``; collective, every rank
calls). The merged model is built on rank 0 from the base on disk plus the adapter just written —
the base is frozen, so it equals the weights trained against, and the reload path is exactly the one
users take. Both are checked against the in-engine model's logits on a fixed probe
(``export_check.json``), with the same bound as the full-model export (measured on the merged
reload for a bf16 engine, and applied to both): base + adapter
before merging, the merged directory reloaded from disk; neither directory replaces anything unless
both pass.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from pipeline.engine.distributed import all_true, barrier, is_main_process
from pipeline.engine.export import (
    ExportError,
    _probe_logits,
    agree_on_rank0,
    compute_dtype,
    export_rtol,
    verify_export,
)
from pipeline.io import atomic_dir
from pipeline.models.loading import save_tokenizer

log = logging.getLogger(__name__)

MERGE_DTYPE = "float32"  # the merged model's dtype (module docstring: a bf16 merge loses small adapter changes)


def merge_dtype(model_cfg: Any, dtype: str) -> str:
    """The dtype the adapters are merged and ``model/`` saved in: ``model.peft.merged_dtype`` (float32,
    the default, or ``model``: the training dtype ``dtype``, half the disk of a bf16 model's float32 copy)."""
    from omegaconf import OmegaConf

    return dtype if OmegaConf.select(model_cfg, "peft.merged_dtype", default=MERGE_DTYPE) == "model" else MERGE_DTYPE


def _gathered(params: list) -> Any:
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def load_lora(base_path: str | Path, adapter_dir: str | Path, dtype: str, model_cfg: Any) -> Any:
    """The base model from disk (safe loading rules of ``model``) with the exported adapter on top."""
    from peft import PeftModel

    from pipeline.models.loading import load_causal_lm

    base = load_causal_lm(base_path, dtype, model_cfg.trust_remote_code, model_cfg.allow_pickle, model_cfg.revision)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def export_lora(engine: Any, tokenizer: Any, out_dir: str | Path, adapter_dir: str | Path, base_path: str | Path,
                dtype: str, model_cfg: Any, verify: bool = True) -> Path:
    """Write ``adapter_dir`` (peft layout) and ``out_dir`` (merged model) atomically on rank 0 and
    check both reloads reproduce the trained model's logits."""
    import torch

    from pipeline.engine.health import local_params_finite
    from pipeline.io import atomic_write_json
    from pipeline.models.peft_student import adapter_parameters

    out_dir, adapter_dir = Path(out_dir), Path(adapter_dir)
    merged_dtype = merge_dtype(model_cfg, dtype)
    if not all_true(local_params_finite(engine)):
        raise ExportError(f"the trained weights contain NaN/inf: refusing to export to {out_dir}")
    peft_model = engine.module
    probe = _probe_logits(engine, int(peft_model.config.vocab_size)) if verify else None
    lora = [p for _, p in adapter_parameters(peft_model)]
    if not lora:
        raise ExportError("model.peft is on but the student has no LoRA weights to export")
    check = None
    with agree_on_rank0(f"exporting the LoRA adapter to {adapter_dir} and the merged model to {out_dir}"):
        with contextlib.ExitStack() as commit:
            # Both directories are committed only once both reloads reproduce the trained model: a failed
            # check leaves the previous adapter and merged model in place (ExitStack: adapter last).
            tmp_adapter = commit.enter_context(atomic_dir(adapter_dir)) if is_main_process() else None
            with _gathered(lora):  # every rank enters: the gather is collective
                if tmp_adapter is not None:
                    # the adapter alone: with lm_head adapted, peft would also save the whole base head
                    # (V x H: ~1 GB at a 128k vocabulary) in every adapter; the vocabulary is never resized
                    peft_model.save_pretrained(tmp_adapter, safe_serialization=True, save_embedding_layers=False)
            if tmp_adapter is not None:
                # One load of base + adapter serves both outputs: its logits check the adapter reload, then
                # the same model is merged in place and saved (a 7B load costs minutes on a shared filesystem).
                rtol, engine_dtype = export_rtol(peft_model), compute_dtype(peft_model)
                with torch.no_grad():
                    model = load_lora(base_path, tmp_adapter, merged_dtype, model_cfg)
                    if probe is not None:
                        got = model(input_ids=probe[0], attention_mask=torch.ones_like(probe[0])).logits.float()
                        a_diff = float((got - probe[1]).abs().max())
                    merged = model.merge_and_unload()
                with atomic_dir(out_dir) as tmp:
                    merged.save_pretrained(tmp, safe_serialization=True)
                    save_tokenizer(tokenizer, tmp)
                    del merged, model
                    if probe is not None:
                        check = verify_export(tmp, probe[0], probe[1], rtol, out_dir, model_cfg.trust_remote_code,
                                              engine_dtype)
                        # judged against the merged reload's bound: its round-off is measured on float32
                        # weights, and casting this model to measure it would change what is merged
                        if not a_diff <= check.tolerance:
                            raise ExportError(f"the exported adapter for {adapter_dir} on its base does not reproduce "
                                              f"the trained model (not written; a previous export there is kept): max "
                                              f"|logit diff| {a_diff:.3g} > {check.tolerance:.3g} ({check.bound_text()})")
    if is_main_process():
        log.info("exported LoRA adapter to %s and the merged model to %s (merged and saved in %s%s)", adapter_dir,
                 out_dir, merged_dtype, "" if dtype == merged_dtype else
                 f", not {dtype}: a {dtype} merge rounds away adapter changes below its resolution")
        if check is not None:
            atomic_write_json(out_dir.parent / "export_check.json",
                              {**check.record(), "adapter_max_abs_logit_diff": a_diff, "lora": True})
            log.info("export verified: merged max |logit diff| %.3g, base+adapter %.3g (tolerance %.3g: %s)",
                     check.max_abs_logit_diff, a_diff, check.tolerance, check.bound_text())
    barrier()
    return out_dir
