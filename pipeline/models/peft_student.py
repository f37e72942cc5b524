"""LoRA students (``model.peft``) whose frozen base is their own teacher and reference.

With ``model.peft.enabled=true`` the student is a ``peft`` LoRA model: only the adapter weights
train. The frozen original θ₀ is then the same network with the adapters switched off, so every
method that needs it (ASU's tempered teacher and retain KL, the NPO / IdkDPO references, the RMU /
asu_wmdp hidden-state targets) runs the student's own weights through :class:`FrozenBaseView`
instead of a second model: no teacher copy in memory, no second ZeRO-3 engine.

:class:`FrozenBaseView` has the call interface the methods already use for a reference engine
(``view(**inputs)``, ``.module``, ``.modules()``, ``.eval()``, ``.training``), so methods need not
know which kind of reference they were given. Its forward runs under ``torch.no_grad()``, in eval
mode (no dropout, no activation checkpointing) and inside ``PeftModel.disable_adapter()``;
:func:`adapters_off` opens the same state for code that calls the base model's submodules
directly (the fused KL reads the decoder's last hidden state).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import nn

from pipeline.config_base import ConfigError

log = logging.getLogger(__name__)

# Linear layers LoRA adapts by default, per ``config.model_type``. Llama-family decoders share the
# names; other architectures need model.peft.target_modules. Phi-3 fuses q/k/v and gate/up into one
# linear each; Mixtral's experts are 3-D parameters in transformers 5 (no nn.Linear for LoRA), so
# its default adapts attention only.
_LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{name: _LLAMA_TARGETS for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                         "olmo", "olmo2", "granite", "smollm3")},
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


class PeftSetupError(ConfigError):
    """``model.peft`` cannot be applied to this model (unknown architecture, no matching module):
    a user error, printed as one line with exit code 2."""


def is_peft_model(model: Any) -> bool:
    """True for a ``peft.PeftModel`` (possibly inside a DeepSpeed engine)."""
    inner = getattr(model, "module", model) if not isinstance(model, FrozenBaseView) else model.peft_model
    return hasattr(inner, "disable_adapter") and hasattr(inner, "get_base_model")


def target_modules(model: nn.Module, pcfg: Any) -> list[str]:
    """``model.peft.target_modules`` or the architecture's defaults (a clear error if it has none)."""
    if pcfg.target_modules is not None:
        return [str(m) for m in pcfg.target_modules]
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in DEFAULT_TARGETS:
        raise PeftSetupError(f"config error at 'model.peft.target_modules': no default LoRA targets for model_type={kind!r}; "
                             f"set model.peft.target_modules=[...] (names of its linear layers)")
    return list(DEFAULT_TARGETS[kind])


def _tied_embedding_names(model: nn.Module) -> set[str]:
    """The module names (last part) of the input embeddings and the output head when they share one
    weight (``tie_word_embeddings``), else an empty set."""
    try:
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return set()
    if inp is None or out is None or getattr(inp, "weight", None) is not getattr(out, "weight", None):
        return set()
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is inp or m is out}


def wrap_lora(model: nn.Module, pcfg: Any, revision: Optional[str] = None) -> nn.Module:
    """Return ``model`` as a ``peft`` LoRA model built from ``model.peft`` settings. ``revision``: the
    hub revision the base was loaded at, recorded in the exported ``adapter_config.json`` (without it
    a reload takes the hub's ``main``, which may have moved).

    Only the adapters are trainable afterwards (peft freezes the base). Works on a ZeRO-3
    partitioned model: peft reads ``in_features``/``out_features``, not the (empty) weight shapes,
    and the new adapter weights are partitioned by ``deepspeed.initialize``.
    """
    from peft import LoraConfig, get_peft_model

    targets = target_modules(model, pcfg)
    tied = _tied_embedding_names(model) & {t.rsplit(".", 1)[-1] for t in targets}
    if tied:  # refused before training: the merged export of such an adapter is another network
        raise PeftSetupError(
            f"config error at 'model.peft.target_modules': {sorted(tied)} share one weight matrix (this "
            f"{getattr(getattr(model, 'config', None), 'model_type', '?')} model ties its input embeddings to its "
            f"output head), so merging the adapter into one changes the other too and the exported model/ would "
            f"not be the trained model; leave them out of model.peft.target_modules")
    lcfg = LoraConfig(
        r=int(pcfg.r), lora_alpha=float(pcfg.alpha), lora_dropout=float(pcfg.dropout), target_modules=targets,
        layers_to_transform=[int(i) for i in pcfg.layers] if pcfg.layers is not None else None,
        bias="none", task_type="CAUSAL_LM",
    )
    try:
        # autocast_adapter_dtype=False: adapters in the base's dtype. peft's default makes them fp32,
        # which DeepSpeed casts to bf16 at stage 0 but not for a model built under ZeRO-3: one GPU and
        # eight would train adapters of different precision (each keeps an fp32 master either way).
        peft_model = get_peft_model(model, lcfg, autocast_adapter_dtype=False, revision=revision)
    except ValueError as exc:  # e.g. "Target modules {...} not found in the base model"
        raise PeftSetupError(f"config error at 'model.peft.target_modules': {exc}") from exc
    adapted = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    missing = [t for t in targets if t.rsplit(".", 1)[-1] not in adapted]
    if missing:  # peft refuses only when no name matches; a typo among them would train less than asked
        raise PeftSetupError(
            f"config error at 'model.peft.target_modules': {missing} match no linear layer of this "
            f"{getattr(getattr(model, 'config', None), 'model_type', '?')} model (the others match: {sorted(adapted)}); "
            f"set model.peft.target_modules to its layer names")
    n_train = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_all = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in peft_model.parameters())
    log.info("LoRA student: r=%d alpha=%g dropout=%g targets=%s layers=%s; trainable %d of %d parameters (%.3f%%)",
             int(pcfg.r), float(pcfg.alpha), float(pcfg.dropout), targets,
             "all" if pcfg.layers is None else list(pcfg.layers), n_train, n_all, 100.0 * n_train / max(1, n_all))
    return peft_model


# Below this a LoRA run is almost certainly on a full fine-tune's preset (tofu_7b / muse_7b: 1e-5).
LORA_LOW_LR = 1e-4


def low_lr_warning(lr: float) -> Optional[str]:
    """A warning when ``trainer.lr`` is a full-model learning rate for a LoRA student, else None.

    Adapters start at zero (B = 0) and take rank-r updates, so at a full fine-tune's rate they
    barely move: the run finishes, exports and reports a model that forgot little.
    """
    if lr >= LORA_LOW_LR:
        return None
    return (f"LoRA student with trainer.lr={lr:g}, a full-model learning rate: adapters start at zero and barely move at "
            f"it (docs/methods.md, embedded model: 15% of the forget gap closed at 3e-4, 74% at 3e-3); LoRA usually "
            f"needs ~10x or more (set trainer.lr)")


def adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every LoRA weight of ``model`` (engine, peft model or base)."""
    inner = getattr(model, "module", model)
    return [(n, p) for n, p in inner.named_parameters() if "lora_" in n]


class FrozenBaseView:
    """The student's own base weights with adapters disabled: θ₀ as teacher and reference.

    Pass it wherever a reference engine went. ``student`` is what the trainer calls (the DeepSpeed
    engine or the bare ``PeftModel``). ``eval()``/``train()`` are no-ops: the view never changes
    the student's mode outside its own forwards.
    """

    training = False

    def __init__(self, student: Any) -> None:
        self.student = student
        self._depth = 0  # active() nests (a view call inside adapters_off): only the outermost switches
        self.peft_model = getattr(student, "module", student)
        if not is_peft_model(self.peft_model):
            raise TypeError(f"FrozenBaseView needs a peft model, got {type(self.peft_model).__name__}")

    @property
    def module(self) -> nn.Module:
        """The transformers model under the adapters (``losses.unwrap`` lands here)."""
        return self.peft_model.get_base_model()

    @property
    def config(self) -> Any:
        return self.module.config

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """No grad, eval mode, adapters off; the student's mode and adapters are restored after."""
        if self._depth:
            with torch.no_grad():
                yield
            return
        self._depth += 1
        was_training = self.peft_model.training
        # peft's enable_adapter_layers() (on leaving disable_adapter) marks every active adapter
        # trainable again, which would undo a method's selection (RMU: down_proj adapters only).
        flags = [(p, p.requires_grad) for _, p in adapter_parameters(self.peft_model)]
        self.peft_model.eval()
        try:
            with torch.no_grad(), self.peft_model.disable_adapter():
                yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            self.peft_model.train(was_training)
            self._depth -= 1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.active():
            return self.student(*args, **kwargs)

    def modules(self) -> Iterator[nn.Module]:
        return self.module.modules()

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()

    def eval(self) -> FrozenBaseView:
        return self

    def train(self, mode: bool = True) -> FrozenBaseView:  # noqa: ARG002 - the student's mode is the trainer's
        return self


def adapters_off(model: Any) -> contextlib.AbstractContextManager:
    """:meth:`FrozenBaseView.active` for a view, a no-op for anything else (a separate reference)."""
    return model.active() if isinstance(model, FrozenBaseView) else contextlib.nullcontext()


def reference_for(student_engine: Any, need_reference: bool) -> Optional[FrozenBaseView]:
    """The frozen view for a LoRA student when the method needs θ₀, else None."""
    return FrozenBaseView(student_engine) if need_reference else None
