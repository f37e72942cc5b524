"""Temperature-scaled ("smoothed") attention registered with transformers' attention interface.

ASU's teacher is the frozen model with ``softmax(QK^T / (tau * sqrt(d)) + mask)`` in chosen layers.
We register one attention function, ``"tempered"``, that reads ``tau`` from the attention module
(attribute ``attn_temperature``), so the same model class serves as teacher (tau > 1) or student
(tau = 1) and the temperature can be changed without rebuilding the model.

transformers 5.x needs two registrations: the attention function *and* a mask function; without
the mask registration no causal mask is built for an unknown implementation name. The backends
(``kernels.attention``: sdpa, flash_attn, triton, torch) and their dispatch live in
``pipeline.models.attention``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "tempered"
TEMPERATURE_ATTR = "attn_temperature"


def torch_tempered_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scaling: float,
    tau: float | torch.Tensor = 1.0,
    num_kv_groups: int = 1,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Plain-torch reference: the eager attention computation with logits divided by ``tau``.

    Shapes follow transformers: query (B, H, T, D), key/value (B, H_kv, S, D), additive float mask
    (B, 1, T, S); ``tau`` a float, (H,), (B,), (B, 1) or (B, H). Returns (B, T, H, D). Softmax runs
    in fp32 like transformers' eager path, so at tau = 1 the result equals eager attention. One
    implementation serves both the pipeline and the kernel tests (``kernels.reference``).
    """
    from kernels.reference import additive_mask_attention_ref

    return additive_mask_attention_ref(query, key, value, attn_mask, scaling, tau, num_kv_groups, dropout)


def _model_type(module: nn.Module) -> str:
    cfg = getattr(module, "config", None)
    return getattr(cfg, "model_type", None) or type(module).__name__


# Attention inputs some architectures pass that change the scores (Inkling's relative-position
# logit bias, Inkling2's per-token sinks, MiniMax-M3's sparse key blocks) and that no tempered backend
# applies: refused, not dropped.
UNAPPLIED_INPUTS = ("position_bias", "sinks", "block_indices")
# Class-name endings of self-attention modules (LongcatFlash's is ``LongcatFlashMLA``).
ATTENTION_CLASS_SUFFIXES = ("Attention", "MLA")

# While probe_tempered_attention runs its forward: the modules tempered_attention_forward was called
# with (tau is read from exactly that module); None otherwise.
_probe_calls: Optional[list[nn.Module]] = None
PROBE_TOKENS = 3  # the probe's forward: a few tokens through the decoder, no head, no grad


def tempered_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface entry point (signature of ``sdpa_attention_forward``).

    Reads tau from the module (``attn_temperature``) and honours the architecture kwargs
    transformers passes to attention functions: ``softcap`` (Gemma-2), ``sliding_window``
    (Mistral, Qwen, Gemma-2/3, ...; the window itself is in the mask), ``s_aux`` (GPT-OSS sinks),
    ``is_causal``, ``indices`` (sparse attention's selected keys). The backend is chosen by
    ``pipeline.models.attention.dispatch``.
    """
    from pipeline.models.attention import AttentionBackendError, AttentionCall, dispatch

    if _probe_calls is not None:  # probe_tempered_attention: which modules reach this function
        _probe_calls.append(module)
    unapplied = [k for k in UNAPPLIED_INPUTS if kwargs.get(k) is not None]
    if unapplied:
        # dropping them would run another network even at tau = 1, with no error anywhere
        raise AttentionBackendError(
            f"{type(module).__name__} passes {', '.join(unapplied)} to its attention function, which the tempered "
            f"attention backends do not apply (the model would not be itself, even at tau = 1): this architecture "
            f"is not supported")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    is_causal = kwargs.get("is_causal")
    call = AttentionCall(
        query, key, value, attention_mask, float(scaling), getattr(module, TEMPERATURE_ATTR, 1.0),
        dropout=float(dropout) if module.training else 0.0,
        is_causal=bool(getattr(module, "is_causal", True) if is_causal is None else is_causal),
        softcap=kwargs.get("softcap"), sliding_window=kwargs.get("sliding_window"), s_aux=kwargs.get("s_aux"),
    )
    indices = kwargs.get("indices")
    if indices is not None:
        # DeepSeek-V3.2-style sparse attention (also GLM-MoE-DSA, Mistral-Large-4): transformers applies
        # the indexer's top-k keys (B, T, k) as a mask for "eager"/"sdpa" only and hands any other
        # attention function the indices; dropped, every query would attend to all keys
        selected = torch.zeros(*indices.shape[:2], key.shape[2], dtype=torch.bool, device=key.device)
        call.attention_mask = call.visible() & selected.scatter(-1, indices.long(), True)[:, None]
    return dispatch(call, _model_type(module)), None


def tempered_mask(*args, **kwargs):
    """Mask function for ``"tempered"``: what the active backend's own path expects.

    ``torch`` (the eager reference) gets transformers' eager float mask, so it is eager attention
    operation for operation; every other backend gets transformers' sdpa mask (None for a causal
    batch without padding, else a boolean (B, 1, T, S) mask), so nothing builds a float T×T mask.
    """
    from transformers.masking_utils import eager_mask, sdpa_mask

    from pipeline.models.attention import get_attention_backend

    return (eager_mask if get_attention_backend() == "torch" else sdpa_mask)(*args, **kwargs)


def set_attention_backend(name: str, device: str = "cpu"):
    """Select the implementation used by every model with ``attn_implementation="tempered"``
    (``pipeline.models.attention.set_attention_backend``; returns its resolution)."""
    from pipeline.models.attention import set_attention_backend as _set

    return _set(name, device)


def get_attention_backend() -> str:
    from pipeline.models.attention import get_attention_backend as _get

    return _get()


_registered = False


def register() -> None:
    """Register the ``"tempered"`` attention and mask functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, tempered_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, tempered_mask)
    _registered = True


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a decoder, ordered by ``layer_idx``."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith(ATTENTION_CLASS_SUFFIXES)]
    return sorted(mods, key=lambda m: m.layer_idx)


# Set on each attention module by enable_tempered_attention: whether its model runs transformers'
# pluggable attention (so the "tempered" function, and tau with it, reaches this module); then by
# probe_tempered_attention from what a forward showed (tempered_attention_problem runs it).
PLUGGABLE_ATTR = "_asu_pluggable_attention"


def enable_tempered_attention(model: nn.Module) -> nn.Module:
    """Switch a transformers model to the ``"tempered"`` implementation (tau = 1 everywhere).

    Models with their own built-in attention (Bloom, Falcon, CodeGen, MPT, ...: their code never calls
    transformers' attention interface, so ``set_attn_implementation`` leaves their implementation as it
    was, with only a warning) keep it; they still run correctly at tau = 1, but a tau > 1 would be
    ignored: :func:`set_temperature` refuses it and :func:`tempered_attention_problem` says why (run.py
    checks it before training). Models without ``layer_idx`` attention modules (GPT-Neo, Mamba) load
    too: methods without tau train them; ASU is refused by that same check."""
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    # The implementation that took is the test: transformers switches exactly the models whose code
    # calls its attention interface (``_supports_attention_backend`` is another flag, False on hybrid
    # models such as Jamba or Qwen3-Next and on StableLM or BioGPT, which do run the interface).
    pluggable = impl == ATTN_IMPLEMENTATION
    for m in attention_modules(model):
        setattr(m, PLUGGABLE_ATTR, pluggable)
        setattr(m, TEMPERATURE_ATTR, 1.0)
    return model


def _layer_list(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out: list[str] = []
    for i in sorted(layers):
        if out and out[-1].rsplit("-", 1)[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out)


def _not_switched(model: nn.Module, mods: Sequence[nn.Module]) -> bool:
    """The model kept its own attention implementation (Bloom, Falcon, MPT, ...: nothing to probe)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl != ATTN_IMPLEMENTATION and not any(getattr(m, PLUGGABLE_ATTR, True) for m in mods)


def _flag_problem(model: nn.Module, mods: Sequence[nn.Module], layers: Sequence[int] | None = None) -> Optional[str]:
    """What the modules' pluggable flags (``enable_tempered_attention``, then the probe) say about a tau
    in ``layers`` (decoder-layer indices; None: every attention layer); does not run the model."""
    name = type(model).__name__
    if _not_switched(model, mods):
        return (f"{name} runs its own attention code, not transformers' attention interface, so the tempered "
                f"teacher's tau would be ignored (ASU would distil from the unchanged model); use an architecture "
                f"that supports it (Llama, Mistral, Qwen2/3, Gemma, Phi-3, OLMo, GPT-NeoX, ...)")
    chosen = None if layers is None else {int(i) for i in layers}
    bad = [int(m.layer_idx) for m in mods
           if not getattr(m, PLUGGABLE_ATTR, True) and (chosen is None or int(m.layer_idx) in chosen)]
    if not bad:
        return None
    return (f"{name}: attention layer(s) {_layer_list(bad)} of {len(mods)} never called the {ATTN_IMPLEMENTATION!r} "
            f"attention function in a {PROBE_TOKENS}-token probe forward (their code bypasses transformers' attention "
            f"interface although the model reports attn_implementation={ATTN_IMPLEMENTATION!r}), so the tempered "
            f"teacher's tau would be ignored there (ASU would distil from an untempered teacher); use an architecture "
            f"whose every attention layer runs the interface, or method.teacher_layers without these layers")


def tempered_attention_problem(model: nn.Module, layers: Sequence[int] | None = None) -> Optional[str]:
    """Why a tau would not reach ``model``'s attention in ``layers`` (decoder-layer indices, as
    ``method.teacher_layers``; None: every attention layer), or None.

    Two checks: the implementation transformers switched to (Bloom, Falcon, MPT, ... keep their own
    attention code), and then :func:`probe_tempered_attention`, a 3-token forward that proves each
    attention module of ``layers`` calls the ``"tempered"`` function (remote code, or a class that
    hard-codes eager/sdpa attention, passes transformers' source heuristic but would ignore tau).
    Run it before ``deepspeed.initialize`` (ZeRO-3 weights partitioned by ``zero.Init`` are gathered one
    module at a time; every rank must call it: the gathers are collective). Logs one line when it passes."""
    mods = attention_modules(model)
    if not mods:
        return f"{type(model).__name__} has no attention modules with a layer_idx"
    if _not_switched(model, mods):
        return _flag_problem(model, mods)
    try:
        probe_tempered_attention(model)
    except Exception as e:  # noqa: BLE001 - one line: ASU cannot be shown to temper this model
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return (f"{type(model).__name__}: the tempered-attention probe (a {PROBE_TOKENS}-token forward that checks "
                f"tau reaches every attention layer) failed: {type(e).__name__}: {first}")
    if (problem := _flag_problem(model, mods, layers)) is not None:
        return problem
    from pipeline.logging import SAME_ON_EVERY_RANK

    checked = [int(m.layer_idx) for m in mods if layers is None or int(m.layer_idx) in {int(i) for i in layers}]
    log.info("tempered attention probe passed: %s attention layers %s (%d of %d) call the %r function "
             "(%d-token forward)", type(model).__name__, _layer_list(checked), len(checked), len(mods),
             ATTN_IMPLEMENTATION, PROBE_TOKENS, extra=SAME_ON_EVERY_RANK)
    return None


def probe_tempered_attention(model: nn.Module) -> list[int]:
    """Run ``model``'s decoder (no head, no grad) on ``PROBE_TOKENS`` tokens and record which attention
    modules call :func:`tempered_attention_forward` (tau is read from the module it is called with).
    Sets each attention module's pluggable flag from what happened, so :func:`set_temperature` refuses a
    tau on one that did not call it; returns those modules' layer indices (ascending).

    Under ZeRO-3 before ``deepspeed.initialize`` (weights partitioned by ``zero.Init``) each module's own
    weights are gathered for its forward only (collective: every rank runs the same probe)."""
    global _probe_calls
    register()
    mods = attention_modules(model)
    decoder = getattr(model, "base_model", None)
    decoder = model if decoder is None else decoder  # skip the output head: nothing to check there
    cfg = getattr(model, "config", None)
    vocab = int(getattr(cfg, "vocab_size", None) or getattr(model.get_input_embeddings(), "num_embeddings", 1) or 1)
    ids = (torch.arange(PROBE_TOKENS) % vocab).view(1, -1).to(_probe_device(model))
    calls: list[nn.Module] = []
    _probe_calls = calls
    try:
        with torch.no_grad(), _gathered_per_module(decoder):
            decoder(input_ids=ids, use_cache=False)
    finally:
        _probe_calls = None
    seen = {id(m) for m in calls}
    for m in mods:
        setattr(m, PLUGGABLE_ATTR, id(m) in seen)
    return [int(m.layer_idx) for m in mods if id(m) not in seen]


def _probe_device(model: nn.Module) -> torch.device:
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: gathered weights land on the accelerator
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())
    w = getattr(model.get_input_embeddings(), "weight", None) if hasattr(model, "get_input_embeddings") else None
    return w.device if w is not None else (params[0].device if params else torch.device("cpu"))


@contextlib.contextmanager
def _gathered_per_module(model: nn.Module) -> Iterator[None]:
    """ZeRO-3 weights partitioned and no engine yet: gather each module's own weights (and the external
    ones registered on it) around its forward, one module at a time; nothing for whole weights."""
    owned = []
    for m in model.modules():
        ps = [*m.parameters(recurse=False), *getattr(m, "_external_params", {}).values()]
        if any(hasattr(p, "ds_id") for p in ps):
            owned.append((m, ps))
    if not owned:
        yield
        return
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    opened: list = []

    def pre(ps):
        def hook(module, args):
            missing = [p for p in ps if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]
            ctx = deepspeed.zero.GatheredParameters(missing, modifier_rank=None) if missing else None
            if ctx is not None:
                ctx.__enter__()
            opened.append(ctx)
        return hook

    def post(module, args, output):
        if (ctx := opened.pop()) is not None:
            ctx.__exit__(None, None, None)

    handles = []
    for m, ps in owned:
        handles += [m.register_forward_pre_hook(pre(ps)), m.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while opened:  # a forward that raised: re-partition what it left gathered
            if (ctx := opened.pop()) is not None:
                ctx.__exit__(None, None, None)


def layers_without_attention(model: nn.Module, layers: Sequence[int]) -> Optional[str]:
    """Why ``layers`` (decoder-layer indices, as ``method.teacher_layers``) cannot all be tempered, or
    None. Layer indices are the decoder's, not positions among attention modules: a hybrid model
    (Granite-4.0-H: mamba and attention layers) has attention at some indices only, and an index
    without attention would temper nothing."""
    have = {int(m.layer_idx) for m in attention_modules(model)}
    if not have:
        return f"{type(model).__name__} has no attention modules with a layer_idx"
    n = int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or max(have) + 1)
    out = sorted(i for i in {int(i) for i in layers} if not 0 <= i < n)
    if out:
        return f"teacher_layers {out} out of range: the model has {n} layers (0..{n - 1})"
    missing = sorted({int(i) for i in layers} - have)
    if missing:
        return (f"teacher_layers {missing} are not attention layers of this {type(model).__name__} (its attention "
                f"layers: {sorted(have)} of {n}); tempering them would change nothing")
    return None


def set_temperature(model: nn.Module, tau: float | torch.Tensor, layers: Sequence[int] | None = None) -> None:
    """Set ``tau`` on the attention of ``layers`` (decoder-layer indices; all attention layers when
    None) and 1.0 on the others. ``tau`` must be > 0 and finite (a negative one inverts attention)."""
    if isinstance(tau, (int, float)):
        from kernels.reference import scalar_tau

        scalar_tau(tau)  # the kernels' own check: finite and > 0
    elif tau.device.type == "cpu" and not bool(torch.isfinite(tau).all() and (tau > 0).all()):
        # a per-row / per-head tensor: checked where it costs no device sync
        raise ValueError(f"attention temperature must be finite and > 0, got {tau}")
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no attention modules with a layer_idx")
    chosen = {int(m.layer_idx) for m in mods} if layers is None else {int(i) for i in layers}
    if layers is not None and (problem := layers_without_attention(model, layers)) is not None:
        raise ValueError(problem)
    if not (isinstance(tau, (int, float)) and tau == 1.0) and not all(
            getattr(m, PLUGGABLE_ATTR, True) for m in mods if m.layer_idx in chosen):
        # a silently untempered teacher is the one failure nobody would see (the flags of the modules
        # found above: this runs every step, so the model is not walked a second time)
        raise ValueError(_flag_problem(model, mods, sorted(chosen)))
    for m in mods:
        setattr(m, TEMPERATURE_ATTR, tau if m.layer_idx in chosen else 1.0)


def get_temperatures(model: nn.Module) -> list[float | torch.Tensor]:
    return [getattr(m, TEMPERATURE_ATTR, 1.0) for m in attention_modules(model)]


@contextlib.contextmanager
def temperature(model: nn.Module, tau: float | torch.Tensor, layers: Sequence[int] | None = None) -> Iterator[None]:
    """Temporarily run ``model`` with tempered attention, restoring the previous temperatures."""
    mods = attention_modules(model)
    saved = [getattr(m, TEMPERATURE_ATTR, 1.0) for m in mods]
    set_temperature(model, tau, layers)
    try:
        yield
    finally:
        for m, t in zip(mods, saved):
            setattr(m, TEMPERATURE_ATTR, t)
