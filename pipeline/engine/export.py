"""Export the trained student as a Hugging Face model directory (safetensors) from ZeRO-3 shards."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.engine.distributed import barrier, is_main_process
from pipeline.io import atomic_dir
from pipeline.models.loading import save_tokenizer

log = logging.getLogger(__name__)

# beside a run's model/: which checkpoint it was exported from (when one was saved at that step)
EXPORTED_FROM = "exported_from.json"


class ExportError(RuntimeError):
    """An export that cannot be written or does not reproduce the trained model. ``every_rank``: the
    ranks that did not write it learned it from rank 0 (:func:`agree_on_rank0`), whose line speaks for all."""

    def __init__(self, message: str = "", *, every_rank: bool = False) -> None:
        super().__init__(message)
        self.every_rank = every_rank


@contextlib.contextmanager
def agree_on_rank0(what: str) -> Iterator[None]:
    """Around work only rank 0 does (writing, reloading and checking an export): every rank leaves the
    block together, and when rank 0's work failed every rank raises the same :class:`ExportError`.
    Before, rank 0 raised while the others waited at the next barrier until the launcher, or the
    collective timeout (an hour), ended them."""
    from pipeline.engine.distributed import broadcast_object

    problem = None
    try:
        yield
    except ExportError as exc:
        problem = str(exc)
    # disk full, quota, permissions, a reload that fails (transformers raises ValueError for a directory
    # it will not load): one line on every rank instead of a traceback while the others wait
    except (OSError, RuntimeError, ValueError) as exc:
        problem = f"{what}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    problem = broadcast_object(problem)
    if problem:
        raise ExportError(problem, every_rank=True)


def consolidated_state_dict(engine: Any) -> dict | None:
    """Full state dict on rank 0 (None elsewhere). Collective under ZeRO-3: every rank must call it."""
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    if stage == 3:
        if not engine.zero_gather_16bit_weights_on_model_save():
            raise ExportError(
                "ZeRO-3 export needs deepspeed.gather_16bit_weights_on_model_save=true "
                "(without it DeepSpeed silently saves nothing)"
            )
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict()
    if not is_main_process():
        return None
    if not sd:
        raise ExportError("DeepSpeed returned an empty state dict; nothing exported")
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def _probe_logits(engine: Any, vocab: int, seq_len: int = 12) -> Any:
    """Logits of the in-engine model on a fixed probe (collective under ZeRO-3: all ranks call)."""
    import torch

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (2, seq_len), generator=g)
    dev = next(engine.module.parameters()).device
    was_training = engine.module.training
    engine.module.eval()
    with torch.no_grad():
        out = engine(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev), use_cache=False).logits
    engine.module.train(was_training)
    return ids, out.float().cpu()


# A bf16 (fp16) engine computes its logits in that precision and the reload in float32: their gap is
# the precision's round-off, which no fixed share of the largest logit bounds. Random 4-12-layer Llamas
# after 3 steps at lr 1e-3 showed 3-14 % (a 2.6 M one failed its export at 5.9 % against a 5 % bound);
# two bf16 forwards of the same weights through different attention paths differed by up to 1.5x in
# that gap. So a low-precision export's bound is also this many times the round-off measured on the
# reloaded weights themselves; a wrong or stale weight moves logits by their own size, far above it.
PRECISION_NOISE_FACTOR = 3.0


def export_rtol(module: Any) -> float:
    """Relative logit bound of the export checks for ``module``'s dtype and depth: fp32 round-off
    between two attention paths grows with depth: 1e-5 up to 4 layers (the tiny models),
    proportionally more beyond (SmolLM2's 30 layers: 7.5e-5; measured 3.9e-5). bf16/fp16: 5e-2, the
    floor below :data:`PRECISION_NOISE_FACTOR` times the round-off measured on the export."""
    import torch

    depth = max(1.0, int(getattr(module.config, "num_hidden_layers", 1)) / 4)
    return 1e-5 * depth if compute_dtype(module) == torch.float32 else 5e-2


def compute_dtype(module: Any) -> Any:
    """The dtype ``module`` computes its logits in (its weights'; a LoRA student's base weights')."""
    return next(module.parameters()).dtype


@dataclass(frozen=True)
class ExportCheck:
    """One export check's numbers, as ``export_check.json`` records them. ``logit_scale``: max(1, max
    |logit|) of the trained model's probe; ``precision_noise``: for an engine that computed in
    bf16/fp16, max |logit change| when the reloaded weights run the probe in that dtype instead of
    float32 (None for a float32 engine)."""

    max_abs_logit_diff: float
    relative_tolerance: float
    logit_scale: float
    precision_noise: Optional[float] = None

    @property
    def tolerance(self) -> float:
        bound = self.relative_tolerance * self.logit_scale
        return bound if self.precision_noise is None else max(bound, PRECISION_NOISE_FACTOR * self.precision_noise)

    @property
    def passed(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance  # False for NaN

    def record(self) -> dict:
        out = {"max_abs_logit_diff": self.max_abs_logit_diff, "tolerance": self.tolerance,
               "relative_tolerance": self.relative_tolerance, "logit_scale": self.logit_scale}
        if self.precision_noise is not None:
            out.update(precision_noise=self.precision_noise, precision_noise_factor=PRECISION_NOISE_FACTOR)
        return out

    def bound_text(self) -> str:
        """How the tolerance was set, for the log and the error."""
        text = f"{self.relative_tolerance:g} x max(1, max |logit| = {self.logit_scale:.3g})"
        if self.precision_noise is not None:
            text += f", or {PRECISION_NOISE_FACTOR:g} x the round-off {self.precision_noise:.3g} of the engine's dtype"
        return text


def check_logits(model: Any, ids: Any, expected: Any, rtol: float, engine_dtype: Any = None) -> ExportCheck:
    """Compare ``model``'s float32 logits on ``ids`` with the trained model's (``expected``, computed in
    ``engine_dtype``). For a bf16/fp16 engine the same weights also run the probe in that dtype (cast in
    place: ``model`` is float32 on entry and left in ``engine_dtype``) to measure its round-off."""
    import torch

    def logits() -> Any:
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()

    with torch.no_grad():
        got = logits()
        noise = None
        if engine_dtype is not None and engine_dtype != torch.float32:
            model.to(engine_dtype)
            noise = float((logits() - got).abs().max())
            if not math.isfinite(noise):  # fp16 overflow: no measure (an inf would pass anything)
                log.warning("export check: the probe overflows in %s; bound by the relative tolerance alone",
                            engine_dtype)
                noise = None
    return ExportCheck(float((got - expected).abs().max()), rtol, max(1.0, float(expected.abs().max())), noise)


def verify_export(out_dir: Path, ids: Any, expected: Any, rtol: float, name: Optional[Path] = None,
                  trust_remote_code: bool = False, engine_dtype: Any = None) -> ExportCheck:
    """Reload the export with plain transformers and compare logits with the in-engine model.

    The bound is relative to the largest logit: the reloaded model runs the same weights through a
    different attention path (summation order), so float32 round-off grows with the logits'
    magnitude (methods such as gradient ascent push them into the hundreds); an engine that computed
    in bf16/fp16 (``engine_dtype``) is also allowed :data:`PRECISION_NOISE_FACTOR` times that dtype's
    round-off measured on the export (:func:`check_logits`). ``name``: the path to report (``out_dir``
    is the temporary directory an export is checked in before it replaces anything).
    ``trust_remote_code``: the run's ``model.trust_remote_code`` (a custom-code model's export carries
    its ``auto_map`` and code, and reloads only with it)."""
    import torch
    from transformers import AutoModelForCausalLM

    # float32 on the host whatever the exported dtype: the reference arithmetic for bf16 weights too,
    # and a forward of two 12-token rows costs little even at 7B
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code).eval()
    check = check_logits(model, ids, expected, rtol, engine_dtype)
    if not check.passed:
        raise ExportError(f"exported model at {name or out_dir} does not reproduce the trained model (not written; "
                          f"a previous export there is kept): max |logit diff| "
                          f"{check.max_abs_logit_diff:.3g} > {check.tolerance:.3g} ({check.bound_text()})")
    return check


def _write_checked(module: Any, sd: dict, tokenizer: Any, out_dir: Path, probe: Any, trust_remote_code: bool) -> None:
    """Rank 0: ``out_dir`` written atomically and, with a ``probe``, checked before it replaces anything."""
    from pipeline.io import atomic_write_json

    rtol, dtype = export_rtol(module), compute_dtype(module)
    with atomic_dir(out_dir) as tmp:
        # Tied weights share storage; safetensors refuses duplicates, so drop the alias.
        if getattr(module.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        module.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        from pipeline.engine import faults

        faults.maybe_fail_write("enospc_in_export", 0)  # fault suite: rank 0's export write fails
        save_tokenizer(tokenizer, tmp)
        # checked before it replaces anything: an export that fails leaves the previous one in place
        check = (verify_export(tmp, probe[0], probe[1], rtol, out_dir, trust_remote_code, dtype) if probe is not None
                 else None)
    log.info("exported HF model to %s", out_dir)
    if check is not None:
        atomic_write_json(out_dir.parent / "export_check.json", check.record())
        log.info("export verified: max |logit diff| %.3g (tolerance %.3g: %s)", check.max_abs_logit_diff,
                 check.tolerance, check.bound_text())


def export_hf(engine: Any, tokenizer: Any, out_dir: str | Path, verify: bool = True,
              trust_remote_code: bool = False) -> Path:
    """Write ``out_dir`` (config, safetensors weights, tokenizer) atomically on rank 0, then reload
    it (``trust_remote_code``: the run's setting) and check its logits against the in-engine model
    (``export_check.json``)."""
    from pipeline.engine.distributed import all_true
    from pipeline.engine.health import local_params_finite

    out_dir = Path(out_dir)
    if not all_true(local_params_finite(engine)):
        raise ExportError(f"the trained weights contain NaN/inf: refusing to export to {out_dir}")
    probe = _probe_logits(engine, int(engine.module.config.vocab_size)) if verify else None
    sd = consolidated_state_dict(engine)
    with agree_on_rank0(f"exporting to {out_dir}"):
        if is_main_process():
            _write_checked(engine.module, sd, tokenizer, out_dir, probe, trust_remote_code)
    barrier()
    return out_dir
