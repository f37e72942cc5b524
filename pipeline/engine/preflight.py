"""Memory preflight: estimate per-GPU and host memory *before* loading anything, print the plan,
and refuse a configuration that cannot fit with a suggestion that would.

The model-state terms follow DeepSpeed's ZeRO-3 accounting (``estimate_zero3_model_states_mem_needs``:
18 bytes/param over the GPUs in mixed precision, plus the largest layer gathered in fp32), and with
offload the buffers DeepSpeed's stage3.py really keeps on the host (18 bytes per trained parameter
per rank, which the estimator puts at 16); gradients and optimizer state cover the weights the method
trains. We add the frozen teacher (sharded like the student, no grads or optimizer), activations
and the distillation logits (for methods that form logits), which is what makes unlearning runs OOM
in practice.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from pipeline.engine.distributed import ranks_per_node
from pipeline.engine.zero_stage import resolve_zero_stage

log = logging.getLogger(__name__)
GiB = 1024**3


class PreflightError(RuntimeError):
    """The configuration will not fit in memory (or on disk); the message names the shortfall and a fix.
    ``every_rank``: every rank decides it alike (:func:`pipeline.errors.on_every_rank`);
    ``every_local_rank``: every rank of a node does (its memory), so one line per node is enough."""

    def __init__(self, message: str = "", *, every_rank: bool = False, every_local_rank: bool = False) -> None:
        super().__init__(message)
        self.every_rank = every_rank
        self.every_local_rank = every_local_rank


@dataclass
class ArchSpec:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False
    head_dim: Optional[int] = None  # a config's own (Gemma: 256 with hidden 3072 / 16 heads); else hidden / heads

    @property
    def head_size(self) -> int:
        return int(self.head_dim or self.hidden_size // self.num_attention_heads)

    @property
    def layer_params(self) -> int:
        h = self.hidden_size
        q, kv = self.num_attention_heads * self.head_size, self.num_key_value_heads * self.head_size
        attn = h * q * 2 + h * kv * 2  # q, o and k, v projections
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        return attn + mlp + 2 * h  # two RMSNorms

    @property
    def n_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        return emb + head + self.num_hidden_layers * self.layer_params + self.hidden_size

    @property
    def largest_module_params(self) -> int:
        """The biggest single tensor-owning module ZeRO-3 gathers at once (embedding or a layer)."""
        return max(self.vocab_size * self.hidden_size, self.layer_params)


ARCH_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
             "num_key_value_heads")


def _standard_names(d: dict) -> dict:
    """``d`` (a config.json) with transformers' standard field names filled in from the model
    type's ``attribute_map`` (GPT-2 / Bloom / MPT: n_embd, n_layer, n_head, d_model, ...), and a
    multimodal model's ``text_config`` (Gemma-3, Llava) read for its language model."""
    if "hidden_size" not in d and isinstance(d.get("text_config"), dict):
        d = {**d["text_config"], **{k: v for k, v in d.items() if k == "tie_word_embeddings"}}
    from transformers import CONFIG_MAPPING

    amap = getattr(CONFIG_MAPPING[d["model_type"]], "attribute_map", {}) if d.get("model_type") in CONFIG_MAPPING else {}
    out = dict(d)
    for std, own in amap.items():
        if std not in out and own in d:
            out[std] = d[own]
    return out


def arch_from_dict(d: dict) -> ArchSpec:
    """The architecture spec of a config.json (or ``model.arch`` hints). Sizes only: architectures
    without an ``intermediate_size`` (Falcon, GPT-2, Bloom) are planned with their MLP width when
    named (``ffn_hidden_size``, ``n_inner``) or the usual 4 x hidden otherwise."""
    d = _standard_names(d)
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if d.get(k) is None]
    if missing:
        raise PreflightError(f"cannot size the model: its config.json has no {missing} (model_type "
                             f"{d.get('model_type')!r}); trainer.preflight=false skips the memory plan", every_rank=True)
    ff = d.get("intermediate_size") or d.get("ffn_hidden_size") or d.get("n_inner") or 4 * int(d["hidden_size"])
    kv = d.get("num_key_value_heads") or d["num_attention_heads"]
    return ArchSpec(int(d["vocab_size"]), int(d["hidden_size"]), int(d["num_hidden_layers"]),
                    int(ff), int(d["num_attention_heads"]), int(kv), bool(d.get("tie_word_embeddings", False)),
                    int(d["head_dim"]) if d.get("head_dim") else None)


def resolve_arch(model_cfg: Any, model_path: Optional[str] = None, vocab_size: Optional[int] = None) -> ArchSpec:
    """Architecture from the model's ``config.json`` (a directory's, or a hub id's cached snapshot at
    ``model.revision``; no weights read), else from ``model.arch`` hints."""
    from pipeline.models.loading import model_config_file, revision_for

    cfg_file = model_config_file(model_path, revision_for(model_cfg, model_path)) if model_path else None
    if cfg_file is not None:
        return arch_from_dict(json.loads(cfg_file.read_text()))
    hints = {k: v for k, v in dict(model_cfg.arch or {}).items() if v is not None}
    if model_cfg.source == "synthetic":
        t = model_cfg.tiny
        hints = {"vocab_size": vocab_size or 1024, "hidden_size": t.hidden_size,
                 "num_hidden_layers": t.num_hidden_layers, "intermediate_size": t.intermediate_size,
                 "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads}
    missing = [k for k in ARCH_KEYS if k not in hints and k != "num_key_value_heads"]
    if missing:
        raise PreflightError(
            f"cannot size model {model_cfg.path!r} offline: no config.json (local or in the hub cache) and model.arch lacks {missing}; "
            f"download the model first or set model.arch.<key>=...", every_rank=True
        )
    return arch_from_dict(hints)


def _linear_shapes(arch: ArchSpec) -> dict[str, tuple[int, int]]:
    """(in, out) features of a decoder layer's linear projections, Llama and Phi-3 names."""
    h, ff = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_attention_heads * arch.head_size, arch.num_key_value_heads * arch.head_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, ff), "up_proj": (h, ff), "down_proj": (ff, h),
            "qkv_proj": (h, q + 2 * kv), "gate_up_proj": (h, 2 * ff)}  # Phi-3's fused projections


def lora_param_count(arch: ArchSpec, model_cfg: Any) -> int:
    """Adapter parameters of ``model.peft`` (0 when off): r·(in + out) per adapted linear layer.

    Llama-family and Phi-3 names (the defaults); an unknown target name is counted as an h×h projection."""
    p = getattr(model_cfg, "peft", None)
    if p is None or not p.enabled:
        return 0
    h = arch.hidden_size
    shapes = _linear_shapes(arch)
    from pipeline.models.peft_student import DEFAULT_TARGETS

    # the arch spec has no model type: default targets count as Llama's (Phi-3's fused ones add up the same)
    names = list(p.target_modules) if p.target_modules is not None else DEFAULT_TARGETS["llama"]
    n_layers = len(p.layers) if p.layers is not None else arch.num_hidden_layers
    per_layer = sum(int(p.r) * sum(shapes.get(str(n).rsplit(".", 1)[-1], (h, h))) for n in names)
    return n_layers * per_layer


def _module_params(arch: ArchSpec, name: str) -> Optional[int]:
    """Parameters of decoder-layer submodule ``name`` (``mlp.down_proj``, ``mlp``, ``self_attn``);
    None when the architecture spec cannot say."""
    shapes, leaf = _linear_shapes(arch), name.rsplit(".", 1)[-1]
    if leaf in shapes:
        return shapes[leaf][0] * shapes[leaf][1]  # Llama's projections have no bias
    h = arch.hidden_size
    whole = {"mlp": 3 * h * arch.intermediate_size, "self_attn": arch.layer_params - 2 * h - 3 * h * arch.intermediate_size}
    return whole.get(leaf)


@dataclass(frozen=True)
class MethodFootprint:
    """What the configured method trains and computes, as far as the memory plan cares."""

    trainable_params: int  # weights with gradients and optimizer state (before any LoRA)
    logits: bool  # the step forms vocabulary-sized logits (False: hidden-state terms only)
    # the step's rows are the batch's forget and retain rows (False: it adds views, e.g. IDK answers,
    # whose lengths the data's rows do not bound; the plan keeps data.max_length for those)
    rows_given: bool = True
    # decoder layers whose activations the student's backward holds (None: every layer). The layer-wise
    # methods' step stops after method.layer and nothing below their first trained layer needs a
    # gradient: layers first..layer (an upper bound: the first keeps only what its trained module needs)
    activation_layers: Optional[int] = None
    # decoder layers the student's forward runs (None: every layer; layer-wise: 0..method.layer). With
    # activation checkpointing each keeps its input: the input embeddings are made to require a gradient
    layers_run: Optional[int] = None


@dataclass(frozen=True)
class BatchBound:
    """The largest micro-batch this run's rows can form (:func:`largest_batch`): what the plan's batch
    terms are sized for, where ``data.max_length`` on every row and every position is only a bound."""

    seq_len: int  # the longest row's tokens: a batch is padded to its own longest row
    loss_positions: int  # of the batch_size forget and retain_batch_size retain rows that have the most

    def describe(self, max_length: int) -> str:
        return (f"batch terms sized for the data's largest micro-batch: rows of up to {self.seq_len} tokens "
                f"(data.max_length={max_length}), logits at {self.loss_positions:,} loss positions")


def largest_batch(forget: Sequence[dict], retain: Sequence[dict], batch_size: int,
                  retain_batch_size: int) -> Optional[BatchBound]:
    """:class:`BatchBound` of encoded rows (``input_ids``, ``labels``); None without rows. Loss
    positions are a row's ``labels[1:] != -100`` (answer tokens + EOS, where the step forms logits at
    the output head; every HF causal LM has one, the Llama-like models the plan sizes included)."""
    from pipeline.data.formatting import IGNORE_INDEX

    if not forget and not retain:
        return None

    def most(rows: Sequence[dict], k: int) -> int:
        # list.count runs in C: a packed corpus has millions of labels
        counts = sorted((len(r["labels"]) - 1 - r["labels"][1:].count(IGNORE_INDEX) for r in rows if r["labels"]),
                        reverse=True)
        return sum(counts[:k])

    return BatchBound(max(len(r["input_ids"]) for r in (*forget, *retain)),
                      most(forget, batch_size) + most(retain, retain_batch_size))


def method_footprint(cfg: Any, arch: ArchSpec) -> MethodFootprint:
    """The method's trainable-parameter count and whether its step forms logits, from the config and
    the architecture alone (no model is built).

    Trainable: the layer-wise methods (RMU, asu_wmdp) train ``update_module`` of ``update_layers``
    only (their ``select_trainable``); every other method trains every weight. Logits: read off the
    method's own :class:`~pipeline.methods.passes.StepPlan` for a forget + retain batch; a plan that
    needs a batch view this empty batch lacks (IDK rows, a cached teacher) keeps the logits (those
    methods score tokens)."""
    from pipeline.methods import build_method
    from pipeline.methods.passes import HIDDEN, LOGITS
    from pipeline.methods.rmu import LayerwiseMethod

    method = build_method(cfg.method, kl_impl=cfg.kernels.kl, joint_pass=getattr(cfg.trainer, "passes", "joint") == "joint")
    trainable = arch.n_params
    if isinstance(method, LayerwiseMethod):
        per_layer = _module_params(arch, str(cfg.method.update_module))
        if per_layer is not None:  # an unknown submodule: planned as if every weight trained
            trainable = len(method.update_layers) * per_layer
    try:
        plan = method.plan({"forget": {}, "retain": {}})
    except (KeyError, ValueError):
        return MethodFootprint(trainable, True, rows_given=False)
    kinds = [*plan.student.values(), *(k for _, k in plan.frozen.values())]
    logits = bool(plan.kl) or any(LOGITS in k for k in kinds)
    if isinstance(method, LayerwiseMethod) and plan.layer is not None and plan.stop_after_layer and \
            all(k <= {HIDDEN} for k in plan.student.values()) and not logits:
        return MethodFootprint(trainable, logits, activation_layers=int(plan.layer) - min(method.update_layers) + 1,
                               layers_run=int(plan.layer) + 1)
    return MethodFootprint(trainable, logits)


# Device terms alive in one phase of a step only. DeepSpeed's ZeRO-3 step() releases every gathered
# parameter before the optimizer runs, and the activations and logits are gone after backward: the
# two phases' transients never coexist. Adding them (as this plan did) over-predicted a 1B ASU step
# on an H200 by 1.5x (benchmarks/results/gpu_nvidia_h200_step.json). Everything else is held throughout.
FORWARD_BACKWARD = "forward/backward"
OPTIMIZER_STEP = "optimizer step"
PHASE_OF = {
    "gathered parameters (ZeRO-3 live set)": FORWARD_BACKWARD,
    "grads held in backward (2 forwards)": FORWARD_BACKWARD,
    "activations (student)": FORWARD_BACKWARD,
    "distillation logits (naive)": FORWARD_BACKWARD,
    "distillation logits (fused, chunked)": FORWARD_BACKWARD,
    "optimizer step temporaries": OPTIMIZER_STEP,
}


# The per-node host term of the ranks' own processes: the per-rank baseline times the ranks of a node
# (labelled "per rank" before, while its column showed the node's total: 16 GiB for 8 GPU ranks).
HOST_BASELINE = "host baseline (node's ranks)"


@dataclass
class MemoryPlan:
    n_gpus: int
    gpus_per_node: int
    per_gpu: dict[str, int] = field(default_factory=dict)  # bytes per component
    host_per_node: dict[str, int] = field(default_factory=dict)

    def phase_totals(self) -> dict[str, int]:
        """Bytes of the device terms alive in each phase only (``PHASE_OF``)."""
        totals = {FORWARD_BACKWARD: 0, OPTIMIZER_STEP: 0}
        for name, size in self.per_gpu.items():
            if name in PHASE_OF:
                totals[PHASE_OF[name]] += size
        return totals

    @property
    def gpu_total(self) -> int:
        """Predicted peak per device: the terms held throughout plus the larger phase's transients."""
        held = sum(v for k, v in self.per_gpu.items() if k not in PHASE_OF)
        return held + max(self.phase_totals().values())

    @property
    def host_total(self) -> int:
        return sum(self.host_per_node.values())

    @property
    def rank_total(self) -> int:
        """Predicted peak of one rank's process when the ranks run on the CPU (model states in host
        memory): its device terms plus its share of the per-node host terms."""
        return self.gpu_total + self.host_total // max(1, self.gpus_per_node)


def activation_bytes(arch: ArchSpec, tokens: int, seq_len: int, b: int, activation_checkpointing: bool,
                     flash_attention: bool = True, layers: Optional[int] = None,
                     layers_run: Optional[int] = None) -> int:
    """Peak bytes of the student's activations in one forward + backward over ``tokens`` tokens
    (rows × ``seq_len``) of a Llama-style decoder (RMSNorm, SwiGLU MLP, RoPE) with ``b``-byte weights.

    Counted tensor by tensor from what autograd saves (measured on CPU with the allocator's own
    events, fp32 and bf16, SDPA and eager; tests/test_preflight.py compares the two). Per token per layer:

    * each of the two RMSNorms: its input in fp32 (transformers upcasts; in fp32 the input itself,
      i.e. the layer input and the post-attention residual) and the normalised input in the weight
      dtype (saved for the weight multiply): ``2·(4 + b)·H``;
    * in the weight dtype: the attention's input (the first norm's output, saved by q/k/v_proj),
      q, k and v after RoPE as the attention kernel saves them (k and v repeated to every head:
      transformers' SDPA path repeats them whenever the batch has a padding mask), the attention
      output (o_proj's input), the MLP's input (the second norm's output) and its four intermediate
      tensors gate, SiLU(gate), up and SiLU(gate)·up: ``b·(6·H + 4·I)``;
    * SDPA / flash: the fp32 log-sum-exp per head, and SDPA's padding mask turned into an additive
      bias in the weight dtype, one (rows, 1, T, T) tensor per layer (none without padding or with
      flash-attn's own kernel; counted as an upper bound): ``4·heads + b·T``. Eager attention instead
      keeps the fp32 T×T probabilities per head (+ their copy in the weight dtype when that is 16-bit).

    Korthikanti et al.'s 34·H bytes (16-bit, this plan's formula before) count a GeLU MLP of width
    4·H, 16-bit norms and one saved 16-bit copy per tensor: for Llama's SwiGLU (I ≈ 2.7-3.5·H) and
    fp32 norms that is 20-35% below what the step holds.

    Once per step: the final norm's input and normalised input plus its output (what the head or the
    fused KL reads): ``(4 + 2·b)·H``; and the backward's transient within a layer, formed while that
    layer's activations are still held: the gradients of the MLP's gate and up outputs (``2·b·I``)
    and two fp32 gradients of a norm's upcast input (``8·H``).
    With activation checkpointing each layer keeps only its input (``b·H``) and the backward
    recomputes one layer at a time: L·b·H + one layer's activations + the once-per-step terms.
    ``layers``: the decoder layers whose activations backward holds, ``layers_run``: those the forward
    runs, each keeping its input under checkpointing (:class:`MethodFootprint`; None: all
    ``num_hidden_layers``)."""
    H, ff, heads = arch.hidden_size, arch.intermediate_size, arch.num_attention_heads
    per_token = 2 * (4 + b) * H + b * (6 * H + 4 * ff)
    if flash_attention:
        per_token += 4 * heads + b * seq_len
    else:  # eager / SDPA-math attention: the fp32 softmax output (+ its 16-bit copy) per head
        per_token += heads * seq_len * (4 + (b if b < 4 else 0))
    per_layer = tokens * per_token
    once = tokens * ((4 + 2 * b) * H + 2 * b * ff + 8 * H)

    def count(n: Optional[int]) -> int:
        return arch.num_hidden_layers if n is None else min(int(n), arch.num_hidden_layers)

    if activation_checkpointing:
        return count(layers_run) * tokens * b * H + per_layer + once
    return count(layers) * per_layer + once


def plan_memory(arch: ArchSpec, n_gpus: int, gpus_per_node: int, *, precision: str, zero_stage: int,
                offload_optimizer: str, offload_param: str, uses_reference: bool, batch_size: int,
                retain_batch_size: int, seq_len: int, kl_impl: str, activation_checkpointing: bool,
                flash_attention: bool = True, lora_params: int = 0, buffers: Optional[dict] = None,
                cpu_ranks: bool = False, joint_pass: bool = True, trainable_params: int = 0,
                logits: bool = True, torch_adam: bool = True, loss_positions: Optional[int] = None,
                activation_layers: Optional[int] = None, layers_run: Optional[int] = None) -> MemoryPlan:
    """Bytes per GPU and per node for one configuration (ZeRO-3 sharding over ``n_gpus``).

    ``lora_params > 0`` (``model.peft``): gradients and optimizer state cover the adapters only, and
    the teacher/reference is the student's own base with the adapters off (no frozen copy).
    ``buffers``: the ZeRO-3 buffer limits in effect (``pipeline.engine.ds_config.GPU_BUFFERS`` /
    ``CPU_BUFFERS`` merged with ``deepspeed.extra``); ``cpu_ranks``: the ranks themselves run on the
    CPU, so the per-rank process footprint is the measured CPU start-up, not a GPU host's.
    ``joint_pass``: ``trainer.passes=joint`` (one student forward over forget and retain rows);
    False for ``per_group``, whose two student forwards hold a full-size gradient in backward.
    ``trainable_params``: the weights the method trains (0: all of them; :func:`method_footprint`);
    gradients and optimizer state cover these only. ``logits``: the step forms vocabulary-sized
    logits (False for the hidden-state methods: no distillation-logits term). ``torch_adam``:
    ``deepspeed.torch_adam`` (torch's AdamW, else DeepSpeed's FusedAdam), which decides the optimizer
    step's temporaries at ZeRO stages 0-2. ``loss_positions``: the positions a micro-batch forms logits at
    (:class:`BatchBound`); None: every position of every row, a bound. ``activation_layers``: the
    decoder layers whose activations the backward holds, ``layers_run``: those the forward runs (None:
    all; :class:`MethodFootprint`).
    """
    from kernels.fused_kl import CUDA_MIN_CHUNK_ROWS, default_chunk_size
    from pipeline.engine.ds_config import CPU_BUFFERS, GPU_BUFFERS

    buf = dict(CPU_BUFFERS if cpu_ranks else GPU_BUFFERS, **(buffers or {}))
    P, N = arch.n_params, max(1, n_gpus)
    T = lora_params if lora_params > 0 else min(P, trainable_params or P)  # trainable parameters
    every_weight = T == P  # the head and the largest module have gradients too
    shard = N if zero_stage == 3 else 1
    b = 4 if precision == "fp32" else 2
    gpn = gpus_per_node
    # On the GPU without offload: Adam's fp32 m+v, + in mixed precision the fp32 master (in fp32 the
    # master is the weight itself) and 2 more, so that with the 16-bit weights and gradients the total
    # is DeepSpeed's estimate of 18 B/param; stage3.py holds 12 throughout and forms the fp32 gradient
    # per sub-group at the step only.
    opt_bytes = 8 if precision == "fp32" else 14
    opt_shard = N if zero_stage >= 1 else 1
    # parameter offload is ZeRO-3 only (config validation refuses it for stages 0-2)
    offloaded = offload_param != "none" and zero_stage == 3
    plan = MemoryPlan(N, gpn)
    g, h = plan.per_gpu, plan.host_per_node
    g["student params"] = 0 if offloaded else b * P // shard
    if lora_params > 0:
        g["LoRA adapter params"] = b * T // shard
    if offload_optimizer == "none":
        g["student grads"] = b * T // (N if zero_stage >= 2 else 1)
        g["optimizer states"] = opt_bytes * T // opt_shard
    else:
        # DeepSpeed's optimizer offload (runtime/zero/stage3.py, 0.19.8), held on the host for the
        # whole run: the fp32 master partition (:1157-1160, a copy even in fp32), Adam's fp32 m and v
        # (DeepSpeedCPUAdam) and one fp32 gradient buffer per sub-group (:1337-1342, pinned; dropped
        # only without offload, :1366). Stage 3 also puts the 16-bit gradient partitions there
        # (grad_partitions_flat_buffer on self.device = cpu, :333, :790-795): nothing of them stays
        # on the GPU. DeepSpeed's own estimator leaves that last buffer out (16 B/param on the host).
        # Not modelled: torch's CUDA host allocator may round each pinned buffer up to a power of two.
        h["optimizer states (offloaded)"] = (4 + 8 + 4) * T // opt_shard * gpn
        if zero_stage == 3:
            h["student grads (offloaded)"] = b * T // N * gpn
        else:
            g["student grads"] = b * T // (N if zero_stage >= 2 else 1)
    if offloaded:
        h["student params (offloaded)"] = b * P // N * gpn
    shared_base = uses_reference and lora_params > 0  # θ₀ = the student's base, adapters off
    if uses_reference and not shared_base:
        g["teacher params (frozen)"] = 0 if offloaded else b * P // shard
        if offloaded:  # reference_config copies offload_param: its 16-bit partitions live on the host
            h["teacher params (offloaded)"] = b * P // N * gpn
    # ZeRO-3 keeps up to stage3_max_live_parameters gathered for reuse (whole model when that exceeds
    # it) on top of the module being run and the prefetched bucket; per engine (student, teacher).
    # (Stages 0-2 keep every parameter whole on every rank: nothing is gathered.)
    live = int(buf["stage3_max_live_parameters"]) if int(buf["stage3_max_reuse_distance"]) > 0 else 0
    gathered = min(P, max(live, arch.largest_module_params) + int(buf["stage3_prefetch_bucket_size"]))
    if zero_stage == 3:
        g["gathered parameters (ZeRO-3 live set)"] = b * gathered * (2 if uses_reference and not shared_base else 1)
        # backward: the full gradient of the module being reduced + the reduce bucket it is copied into
        # (LoRA: the adapters' gradients only; a few trained modules: at most one module's, bounded
        # by the largest module)
        g["gradient reduce buffers"] = b * (min(T, int(buf["reduce_bucket_size"])) +
                                            (min(T, arch.largest_module_params) if lora_params == 0 else 0))
        if retain_batch_size > 0 and not joint_pass:
            # trainer.passes=per_group runs the student twice (forget rows, retain rows), one backward on the sum:
            # autograd holds each parameter's first-branch gradient, full size, until the second
            # branch's reaches it, so ZeRO-3 can reduce nothing before then: the whole unsharded model.
            # (LoRA: only the adapters have gradients.)
            g["grads held in backward (2 forwards)"] = b * T
        if offload_optimizer == "none":
            # AdamW's sqrt/div temporaries over one optimizer sub-group (fp32)
            g["optimizer step temporaries"] = 2 * 4 * min(int(buf["sub_group_size"]), -(-T // N))
    elif offload_optimizer == "none":
        g["optimizer step temporaries"] = _stage012_step_temporaries(arch, T, b, zero_stage, opt_shard, torch_adam,
                                                                     cpu_ranks)
    rows = batch_size + retain_batch_size
    tokens = rows * seq_len
    H = arch.hidden_size
    g["activations (student)"] = activation_bytes(arch, tokens, seq_len, b, activation_checkpointing, flash_attention,
                                                  activation_layers, layers_run)
    positions = tokens if loss_positions is None else min(tokens, loss_positions)
    # (no logits term when the method's terms are hidden states only: RMU, asu_wmdp never run the head)
    if logits and kl_impl == "fused":
        # three fp32 chunk × V blocks at the kernel's own chunk size, and its fp32 V × H accumulator of
        # the head's weight gradient (none when the head is frozen: LoRA, a few trained modules)
        chunk = default_chunk_size(positions, arch.vocab_size, min_rows=1 if cpu_ranks else CUDA_MIN_CHUNK_ROWS)
        g["distillation logits (fused, chunked)"] = (3 * chunk * arch.vocab_size * 4 +
                                                     (arch.vocab_size * H * 4 if every_weight else 0))
    elif logits:
        # the forward's peak, in the KL's p_t·(log p_t − log p_s): the teacher's and the student's logits
        # (the weights' dtype) and five fp32 tensors (both log-softmaxes, p_t, the difference and the
        # product): 2·b + 20 bytes per position and vocabulary entry, 28 in fp32, 24 in bf16 — measured
        # on CPU ranks (fp32 27.5-28.0, bf16 23.6-23.9); it was planned at 16. At the loss positions
        # only (where the step forms logits), every position where the data is not known.
        g["distillation logits (naive)"] = (2 * b + 5 * 4) * positions * arch.vocab_size
    g["framework/buffers"] = int(1.0 * GiB) if precision != "fp32" else int(0.05 * GiB)
    # A CPU rank's process before any model: python + torch + deepspeed + transformers, gloo group
    # (measured 0.33 GiB, benchmarks/bench_memory.py) + model code and tokenizer; a GPU host rank also
    # holds the CUDA context, pinned buffers and the data pipeline.
    h[HOST_BASELINE] = int((0.5 if cpu_ranks else 2) * GiB) * gpn
    return plan


def _stage012_step_temporaries(arch: ArchSpec, trained: int, b: int, zero_stage: int, opt_shard: int,
                               torch_adam: bool, cpu_ranks: bool) -> int:
    """Bytes per device the optimizer step allocates on top of the held model states at ZeRO stages
    0-2 without offload (DeepSpeed 0.19.8, torch 2.13), for ``trained`` parameters whose optimizer
    state is split ``opt_shard`` ways (1 at stage 0, the ranks at stages 1-2):

    * in 16-bit precision an fp32 copy of every gradient the rank updates: stage 0 wraps the optimizer
      in ``FP16_UnfusedOptimizer`` (torch's AdamW) or ``FP16_Optimizer`` (FusedAdam), whose ``step()``
      sets ``fp32_param.grad = fp16_param.grad.to(fp32)`` (runtime/fp16/unfused_optimizer.py) or
      flattens those copies (fused_optimizer.py); stages 1-2 form the fp32 gradient partition
      (``flat_grad_partition.to(fp32)``, runtime/zero/stage_1_and_2.py ``step()``). 4 B/param;
    * torch's AdamW on a GPU takes the foreach path, whose ``_foreach_sqrt(exp_avg_sqs)`` is one fp32
      temporary the size of everything it updates (torch/optim/adam.py ``_multi_tensor_adam``): 4 B/param.
      On CPU ranks it loops per tensor, where ``sqrt(v)`` and its division are alive together: 8 B per
      element of one tensor (the largest module bounds it; at stages 1-2 the tensor is the whole flat
      fp32 partition). FusedAdam computes in its kernel; at stage 0 in 16-bit
      ``FP16_Optimizer`` instead holds the per-tensor fp32 copies while it flattens them: 4 B/param.

    In bf16 with torch's AdamW on a GPU the step's real peak is ~24 B/trained param (16 held + these 8);
    the plan's held terms count 18 (DeepSpeed's estimate), so it plans 26 there."""
    fp32_grads = 4 * trained if b < 4 else 0
    if torch_adam:
        if not cpu_ranks:
            second = 4 * trained  # foreach: one fp32 sqrt(v) over everything it updates
        elif zero_stage == 0:  # per tensor: sqrt(v) and its division alive together, 8 B per element
            second = 8 * min(trained, arch.largest_module_params)
        else:  # the same over the one tensor there is, the rank's flat partition (divided below)
            second = 8 * trained
    else:
        second = 4 * trained if zero_stage == 0 and b < 4 else 0
    return (fp32_grads + second) // opt_shard


def plan_bench_step(model: dict, batch: int, seq: int, kl_impl: str) -> MemoryPlan:
    """The plan of ``benchmarks/bench_step.py``'s GPU setting: one ASU step (live teacher) of the
    untied model ``model`` (an :func:`arch_from_dict` dict) on one GPU, ZeRO-3 without offload, bf16,
    ``batch`` forget + ``batch`` retain rows of ``seq`` tokens, flash attention, the default activation
    checkpointing — what ``gpu_check`` measures and tests/test_preflight.py compares with the plan."""
    from pipeline.config import DeepSpeedConfig

    return plan_memory(arch_from_dict(dict(model, tie_word_embeddings=False)), 1, 1, precision="bf16", zero_stage=3,
                       offload_optimizer="none", offload_param="none", uses_reference=True, batch_size=batch,
                       retain_batch_size=batch, seq_len=seq, kl_impl=kl_impl,
                       activation_checkpointing=bool(DeepSpeedConfig().activation_checkpointing), flash_attention=True)


def format_plans(arch: ArchSpec, plans: list[MemoryPlan], available_gpu: Optional[int] = None,
                 available_host: Optional[int] = None, device_name: str = "GPU") -> str:
    comps = list(dict.fromkeys(k for p in plans for k in p.per_gpu))
    hcomps = list(dict.fromkeys(k for p in plans for k in p.host_per_node))
    head = f"{'per ' + device_name + ' (GiB)':<40}" + "".join(f"{str(p.n_gpus) + ' ' + device_name + 's':>12}" for p in plans)
    lines = [f"memory plan: {arch.n_params / 1e9:.3f}B params ({arch.n_params:,}), largest module "
             f"{arch.largest_module_params:,} params", head, "-" * len(head)]
    for c in comps:
        label = c + (" *" if PHASE_OF.get(c) == FORWARD_BACKWARD else " **" if c in PHASE_OF else "")
        lines.append(f"{label:<40}" + "".join(f"{p.per_gpu.get(c, 0) / GiB:>12.2f}" for p in plans))
    lines.append(f"{'TOTAL per ' + device_name:<40}" + "".join(f"{p.gpu_total / GiB:>12.2f}" for p in plans))
    lines.append(f"  (TOTAL = the other terms + the larger of the {FORWARD_BACKWARD} transients * and the "
                 f"{OPTIMIZER_STEP} transients **: never alive together)")
    for c in hcomps:
        lines.append(f"{'host/node: ' + c:<40}" + "".join(f"{p.host_per_node.get(c, 0) / GiB:>12.2f}" for p in plans))
    lines.append(f"{'TOTAL host per node':<40}" + "".join(f"{p.host_total / GiB:>12.2f}" for p in plans))
    if available_gpu:
        lines.append(f"available per {device_name}: {available_gpu / GiB:.1f} GiB")
    if available_host:
        lines.append(f"available host memory: {available_host / GiB:.1f} GiB")
    return "\n".join(lines)


def available_memory(cuda: bool, gpu_memory_gb: Optional[float], host_memory_gb: Optional[float]) -> tuple[int, int]:
    """(per-GPU bytes, host bytes): configured overrides, else measured."""
    if gpu_memory_gb:
        gpu = int(gpu_memory_gb * GiB)
    elif cuda:
        import torch

        gpu = torch.cuda.get_device_properties(0).total_memory
    else:
        gpu = 0
    host = int(host_memory_gb * GiB) if host_memory_gb else host_memory_limit()[0]
    return gpu, host


def _cgroup_limits() -> list[int]:
    """The memory limits of this process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``),
    where set: how a SLURM job's allocation (``--mem``) is enforced."""
    files = [Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":  # v2: one hierarchy
                base, name = Path("/sys/fs/cgroup"), "memory.max"
            elif "memory" in controllers.split(","):
                base, name = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
            else:
                continue
            parts = [p for p in path.split("/") if p]
            # every level: SLURM sets the limit on job_*/step_* while the leaf reads "max"
            files += [base.joinpath(*parts[:i], name) for i in range(1, len(parts) + 1)]
    except (OSError, ValueError):
        pass
    out = []
    for f in files:
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" / ~2**63: no limit
            out.append(int(text))
    return out


def host_memory_limit() -> tuple[int, str]:
    """(bytes this node's ranks may use, what sets it): the physical memory, or less where this job's
    cgroup or SLURM allocation (``SLURM_MEM_PER_NODE``, ``SLURM_MEM_PER_CPU`` x ``SLURM_CPUS_ON_NODE``,
    in MiB) says so. Compared with the physical memory alone, a job given a part of a node by SLURM was
    planned as fitting and killed by the cgroup's OOM while loading."""
    limits = [(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory")]
    limits += [(b, "this job's cgroup memory limit") for b in _cgroup_limits()]
    def mib(name: str) -> int:  # a SLURM memory variable (MiB); 0 or unset: no limit from it
        value = os.environ.get(name, "")
        return int(value) if value.isdigit() else 0

    if mib("SLURM_MEM_PER_NODE"):
        limits.append((mib("SLURM_MEM_PER_NODE") << 20, "this job's SLURM allocation (--mem)"))
    for per, count, flag in (("SLURM_MEM_PER_CPU", "SLURM_CPUS_ON_NODE", "--mem-per-cpu x CPUs"),
                             ("SLURM_MEM_PER_GPU", "SLURM_GPUS_ON_NODE", "--mem-per-gpu x GPUs")):
        if mib(per) and mib(count):
            limits.append((mib(per) * mib(count) << 20, f"this job's SLURM allocation ({flag} on the node)"))
    return min(limits, key=lambda limit: limit[0])


def plan_fits(plan: MemoryPlan, gpu_avail: int, host_avail: int) -> bool:
    """Whether ``plan`` is within the per-device budget (0: not checked, as on CPU ranks) and the
    host's per node (0: not checked)."""
    return (not gpu_avail or plan.gpu_total <= gpu_avail) and (not host_avail or plan.host_total <= host_avail)


def check_fits(plan: MemoryPlan, gpu_avail: int, host_avail: int, suggestions: list[str],
               device_name: str = "GPU", no_fit: str = "") -> None:
    """Raise :class:`PreflightError` naming the shortfall (and what would fit, or ``no_fit`` where
    nothing tried does) when over budget. ``device_name``: "GPU", or "rank" for a run on CPU ranks."""
    problems = []
    if gpu_avail and plan.gpu_total > gpu_avail:
        problems.append(f"needs {plan.gpu_total / GiB:.1f} GiB per GPU but {gpu_avail / GiB:.1f} GiB are available "
                        f"(short by {(plan.gpu_total - gpu_avail) / GiB:.1f} GiB)")
    if host_avail and plan.host_total > host_avail:
        problems.append(f"needs {plan.host_total / GiB:.1f} GiB of host memory per node but "
                        f"{host_avail / GiB:.1f} GiB are available (short by {(plan.host_total - host_avail) / GiB:.1f} GiB; "
                        f"the budget is deepspeed.host_memory_gb, else the node's memory or this job's SLURM "
                        f"allocation / cgroup limit where smaller)")
    if problems:
        msg = f"memory preflight on {plan.n_gpus} {device_name}(s): " + "; ".join(problems)
        if suggestions:
            msg += ". Would fit: " + "; ".join(suggestions)
        elif no_fit:
            msg += ". " + no_fit
        if gpu_avail and plan.gpu_total > gpu_avail:
            # one measurement, not a proof: the plan is built to err high, checked in one setting only
            msg += (". The GPU estimate is meant to err high but was checked in one setting only (a 1B ASU "
                    "step, ZeRO-3 on one H200, peaked at 0.74-0.81x of it; stage 0 and several GPUs unmeasured); "
                    "trainer.preflight=false skips this check")
        # not every_rank: the host budget is each node's own (its memory, cgroup, SLURM allocation, ranks),
        # so on uneven nodes one may refuse while another passes (a SLURM job then ends at this rank); the
        # ranks of one node decide alike: one line per node, not one per GPU
        raise PreflightError(msg, every_local_rank=True)


@dataclass(frozen=True)
class FixSetting:
    """A deepspeed setting a refusal may suggest; None fields keep the run's own value."""

    override: str  # what to add to the command line ("": the current deepspeed config)
    offload_optimizer: Optional[str] = None
    offload_param: Optional[str] = None
    zero_stage: Optional[int] = None  # None: what deepspeed.zero_stage gives that many ranks
    checkpointing: Optional[bool] = None
    kl: Optional[str] = None  # kernels.kl


# Least offload first: recomputing activations in backward costs compute, not memory traffic; then
# the offload configs with what their YAML sets (zero3_offload_all checkpoints too), optimizer offload
# also with checkpointing. Each is searched over SEARCH_COUNTS ranks (before, only the current config
# was, and no two remedies were combined: a 70B on 8 x 80 GB was told nothing fits).
_BASE_FIXES = (
    FixSetting(""),
    FixSetting("deepspeed.activation_checkpointing=true", checkpointing=True),
    FixSetting("deepspeed=zero3_offload_optimizer", "cpu", "none", 3),
    FixSetting("deepspeed=zero3_offload_optimizer deepspeed.activation_checkpointing=true", "cpu", "none", 3, True),
    FixSetting("deepspeed=zero3_offload_all", "cpu", "cpu", 3, True),
)


def _with_fused_kl(s: FixSetting) -> FixSetting:
    return replace(s, override=f"{s.override} kernels.kl=fused".strip(), kl="fused")


# The naive KL's B x T x V logits shrink neither with more ranks nor with offload; the fused KL streams
# them (and is faster: docs/performance.md): each setting is tried as it is, then with the fused KL too
# (before, never with another remedy: a run short of both was sent to offload or more GPUs).
FIX_SETTINGS = tuple(v for s in _BASE_FIXES for v in (s, _with_fused_kl(s)))
SEARCH_COUNTS = (2, 4, 8, 16, 32, 64)
BATCH_TERMS = ("activations (student)", "distillation logits (naive)", "distillation logits (fused, chunked)")
CPU_RANK_STATES = "model states on CPU ranks"


def states_on_host(plan: MemoryPlan) -> MemoryPlan:
    """``plan`` for ranks that run on the CPU: each rank's device terms live in the node's memory,
    so they join its host terms (``CPU_RANK_STATES``, replacing any earlier count)."""
    plan.host_per_node[CPU_RANK_STATES] = plan.gpu_total * plan.gpus_per_node
    return plan


def _without_batch_terms(plan: MemoryPlan, cpu_ranks: bool) -> MemoryPlan:
    """``plan`` with no activations or logits: the least any batch size or sequence length needs."""
    lean = MemoryPlan(plan.n_gpus, plan.gpus_per_node, {k: v for k, v in plan.per_gpu.items() if k not in BATCH_TERMS},
                      dict(plan.host_per_node))
    return states_on_host(lean) if cpu_ranks else lean


def _fused_kl_allowed(cfg: Any) -> bool:
    """Whether this run's config takes ``kernels.kl=fused`` (:func:`pipeline.config.check_fused_kl`)."""
    from omegaconf import OmegaConf

    from pipeline.config import check_fused_kl
    from pipeline.config_base import ConfigError

    try:
        check_fused_kl(OmegaConf.merge(cfg, {"kernels": {"kl": "fused"}}))
    except ConfigError:
        return False
    return True


def suggest_fixes(cfg: Any, world_size: int, plan_of: Any, gpu_avail: int, host_avail: int,
                  cpu_ranks: bool) -> tuple[list[str], str]:
    """(what would fit, what to say when nothing does) for a run of ``cfg`` on ``world_size`` ranks
    that does not fit. ``plan_of(n, offload_optimizer, offload_param, zero_stage, checkpointing, kl_impl)`` plans
    ``n`` ranks. Every :data:`FIX_SETTINGS` entry is tried on this rank count and each of
    :data:`SEARCH_COUNTS` above it; the first suggestion is the cheapest (fewest ranks, then least
    offload), each later one needs more ranks but less offload. When nothing fits, smaller batches or
    sequences are suggested only where a plan's activations and logits exceed its shortfall."""
    ds, tr = cfg.deepspeed, cfg.trainer
    device = "rank" if cpu_ranks else "GPU"

    def resolved(s: FixSetting, n: int) -> tuple[str, str, int, bool, str]:
        stage = resolve_zero_stage(ds, n).stage if s.zero_stage is None else s.zero_stage
        return (s.offload_optimizer or str(ds.offload_optimizer), s.offload_param or str(ds.offload_param), stage,
                bool(ds.activation_checkpointing) if s.checkpointing is None else s.checkpointing,
                s.kl or str(cfg.kernels.kl))

    # not a fix where the config refuses the fused KL (fp16, a LoRA head, a top-k cache)
    fused_ok = _fused_kl_allowed(cfg)
    settings = [s for s in FIX_SETTINGS if fused_ok or s.kl != "fused"]

    suggestions: list[str] = []
    tried: list[tuple[FixSetting, MemoryPlan]] = []
    best = len(settings)  # only settings with less offload than the last suggestion's are worth more ranks
    # CPU ranks share one host: more of them hold the same states in the same memory (more per-rank
    # baselines), so only the settings are searched there
    counts = (world_size,) if cpu_ranks else (world_size, *(c for c in SEARCH_COUNTS if c > world_size))
    for n in counts:
        seen = {resolved(settings[0], world_size)} if n == world_size else set()  # the run itself
        for rank, s in enumerate(settings[:best]):
            key = resolved(s, n)
            if key in seen:
                continue
            seen.add(key)
            p = plan_of(n, *key)
            if cpu_ranks:
                states_on_host(p)
            tried.append((s, p))
            if plan_fits(p, gpu_avail, host_avail):
                suggestions.append(_describe_fix(s, p, n, world_size, device, tr))
                best = rank
                break
        if best == 0:
            break
    if suggestions or not tried:
        return suggestions, ""

    def over(p: MemoryPlan) -> int:
        return (max(0, p.gpu_total - gpu_avail) if gpu_avail else 0) + (max(0, p.host_total - host_avail)
                                                                          if host_avail else 0)

    scope = f"on {world_size} {device}(s)" if cpu_ranks else f"or {device} count up to {SEARCH_COUNTS[-1]}"
    lean = [(s, p, _without_batch_terms(p, cpu_ranks)) for s, p in tried]
    helped = [(s, p) for s, p, q in lean if plan_fits(q, gpu_avail, host_avail)]
    if helped:  # fewer rows or tokens would do: the activations and logits are more than the shortfall
        s, p = min(helped, key=lambda sp: over(sp[1]))
        batch = sum(v for k, v in p.per_gpu.items() if k in BATCH_TERMS)
        # on CPU ranks the shortfall is the node's: so are its ranks' activations
        batch_of = f"{batch * p.gpus_per_node / GiB:.1f} GiB per node" if cpu_ranks else f"{batch / GiB:.1f} GiB/GPU"
        return [], (f"No offload setting {scope} fits at this batch: "
                    f"{s.override or 'the current deepspeed config'} on {p.n_gpus} {device}(s) is short by "
                    f"{over(p) / GiB:.1f} GiB with {batch_of} of activations and logits: reduce "
                    f"trainer.batch_size / trainer.retain_batch_size / data.max_length"
                    + (", or set kernels.kl=fused" if "distillation logits (naive)" in p.per_gpu and fused_ok
                       else ""))
    s, _, q = min(lean, key=lambda spq: over(spq[2]))
    return [], (f"No offload setting {scope} fits, not even without activations: "
                f"{s.override or 'the current deepspeed config'} on {q.n_gpus} {device}(s) needs "
                f"~{q.gpu_total / GiB:.1f} GiB/{device} and {q.host_total / GiB:.1f} GiB host per node before "
                f"any batch: " + ("more memory on the host (more CPU ranks on one host share it)" if cpu_ranks
                                  else f"more {device}s or more memory per {device} / node"))


def _describe_fix(s: FixSetting, p: MemoryPlan, n: int, world_size: int, device: str, trainer: Any) -> str:
    """One suggestion: the setting, the rank count and what it needs, and (on another rank count)
    the batch rule's fix where that launch would be refused."""
    need = (f"~{p.host_total / GiB:.1f} GiB host per node" if device == "rank" else
            f"~{p.gpu_total / GiB:.1f} GiB/GPU, {p.host_total / GiB:.1f} GiB host per node")
    text = f"{s.override or 'the current deepspeed config'} on {n} {device}(s) ({need})"
    if n != world_size:
        _, why = batch_column(trainer, n)
        if why:  # planned at the configured batch: the smaller one the fix asks for needs less
            text += f", and as the batch rule asks: {why}"
    return text


# the dry run's budget when no GPU is present and none is configured: an "80 GB" H100 / A100 as torch
# reports it (total_memory 85.0e9 bytes = 79.2 GiB); 80 GiB planned 0.8 GiB a rank does not have
DEFAULT_GPU_GB = 79.2


def batch_column(trainer: Any, n_gpus: int) -> tuple[str, Optional[str]]:
    """A dry-run column's optimizer step as ``rows x accumulation x ranks = forget rows``, or
    ``("refused", why and the fix)`` where a launch on ``n_gpus`` ranks would stop at the batch rule
    (:func:`pipeline.engine.batching.resolve_grad_accum`, the check the real run makes)."""
    from pipeline.config_base import ConfigError
    from pipeline.engine.batching import resolve_grad_accum

    bs, eb = int(trainer.batch_size), trainer.effective_batch
    # trainer.grad_accum as configured (the dry run passes the value from before the job resolved it
    # for its own ranks): with effective_batch it must be 1 or this column's derived accumulation
    accum = int(trainer.grad_accum)
    try:
        accum, _ = resolve_grad_accum(bs, accum, eb, n_gpus)
    except ConfigError:
        if int(eb) % (bs * n_gpus) == 0:  # a multiple: the configured grad_accum contradicts it
            derived = int(eb) // (bs * n_gpus)
            return "refused", (f"trainer.grad_accum={accum} contradicts trainer.effective_batch={eb} ({derived} "
                               f"micro-batch{'es' * (derived != 1)} of {bs} rows on {n_gpus} GPUs); set one of them")
        return "refused", _batch_fix(bs, int(eb), n_gpus)
    return f"{bs}x{accum}x{n_gpus}={bs * accum * n_gpus}", None


def _batch_fix(batch_size: int, effective_batch: int, n_gpus: int) -> str:
    """Why ``effective_batch`` cannot split into ``batch_size`` rows on ``n_gpus`` ranks, and the
    nearest setting that would: a smaller batch_size dividing effective_batch / n_gpus, or another
    effective_batch."""
    what = f"trainer.effective_batch={effective_batch} is not a multiple of {batch_size} rows × {n_gpus} GPUs"
    if effective_batch % n_gpus == 0:
        per_rank = effective_batch // n_gpus
        fit = max(d for d in range(1, batch_size + 1) if per_rank % d == 0)
        return f"{what}; set trainer.batch_size={fit}"
    return f"{what}; set trainer.effective_batch to a multiple of {batch_size * n_gpus}"


def dry_run_plan(cfg: Any, model_path: Optional[str], uses_reference: bool, gpus: tuple[int, ...] = (1, 8, 16)) -> str:
    """The GPU memory plan for ``gpus`` GPUs (8 per node), as the job would run on CUDA: per column the
    forget rows per optimizer step (rows x accumulation x ranks), the ZeRO stage that run would use
    and whether it fits the GPU budget and the host memory per node (``deepspeed.host_memory_gb``, else
    this machine's), or that the batch rule refuses that launch, with the fix. Nothing is loaded
    and nothing is refused here."""

    arch = resolve_arch(cfg.model, model_path)
    ds, tr = cfg.deepspeed, cfg.trainer
    measured = ds.gpu_memory_gb or _cuda_total_gb()
    budget = int((measured or DEFAULT_GPU_GB) * GiB)
    choices = [resolve_zero_stage(ds, n) for n in gpus]
    stages = [c.stage for c in choices]
    # the very plan a launch's preflight makes (its ZeRO-3 buffer limits included), 8 GPUs per node
    plans = [_plan(cfg, arch, n, min(n, 8), True, uses_reference, ds.offload_optimizer, ds.offload_param)
             for n in gpus]
    batches = [batch_column(tr, n) for n in gpus]
    # host memory per node decides the offload configs (a 70B with zero3_offload_all fitted its GPUs
    # and needed > 1 TB per node): its own row, against deepspeed.host_memory_gb or this machine's
    host, host_source = (int(ds.host_memory_gb * GiB), "") if ds.host_memory_gb else host_memory_limit()
    fits = ["refused" if why else "yes" if p.gpu_total <= budget else "NO" for p, (_, why) in zip(plans, batches)]
    host_fits = ["refused" if why else "yes" if p.host_total <= host else "NO" for p, (_, why) in zip(plans, batches)]
    lines = [format_plans(arch, plans, budget, None, "GPU"),
             plan_row("forget rows/step (rows x accum x GPUs)", [cell for cell, _ in batches]),
             plan_row("ZeRO stage", [str(s) for s in stages]),
             plan_row(f"fits in {round(budget / GiB, 1):g} GiB/GPU", fits),
             plan_row(f"fits in {host / GiB:.0f} GiB host/node", host_fits)]
    lines += [f"{n} GPUs refused: {why}" for n, (_, why) in zip(gpus, batches) if why]
    # why each stage (an 'auto' that differs between columns would otherwise read as a mistake)
    lines.append("ZeRO stage: " + "; ".join(f"{n} GPU{'s' if n > 1 else ''}: {c.describe()}"
                                            for n, c in zip(gpus, choices)))
    if not measured:  # no GPU here and none configured: say the budget is an assumption
        lines.append(f"(GPU memory assumed {DEFAULT_GPU_GB:g} GiB, an 80 GB GPU's: no GPU here; "
                     f"deepspeed.gpu_memory_gb=<GiB> plans for yours)")
    if not ds.host_memory_gb:  # the node that will run it may have more or less
        lines.append(f"(host memory per node: {host_source}, {host / GiB:.0f} GiB; deepspeed.host_memory_gb=<GiB> "
                     f"plans for your nodes)")
    return "\n".join(lines)


def plan_row(label: str, cells: list[str]) -> str:
    """One line of the plan's table: a 40-wide label, then 12-wide right-aligned cells."""
    return f"{label:<40}" + "".join(f"{c:>12}" for c in cells)


def _cuda_total_gb() -> Optional[float]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    return None


def _local_world_size(world_size: int) -> int:
    """Ranks per node (all ranks on this node when the launcher does not say)."""
    return 1 if world_size <= 1 else ranks_per_node(world_size)


def _plan(cfg: Any, arch: ArchSpec, n: int, gpn: int, cuda: bool, uses_reference: bool, offload_opt: str,
          offload_par: str, zero_stage: Optional[int] = None,
          activation_checkpointing: Optional[bool] = None, kl_impl: Optional[str] = None,
          batch: Optional[BatchBound] = None) -> MemoryPlan:
    """The plan of ``cfg`` on ``n`` ranks, ``gpn`` of them per node, with these offload settings, in
    ``zero_stage`` (None: the stage the configured ``deepspeed.zero_stage`` gives ``n`` ranks) and with
    activation checkpointing and the KL (``kernels.kl``) as given (None: as configured). ``batch``:
    the data's largest micro-batch (None: every row ``data.max_length`` tokens, logits at every
    position)."""
    from pipeline.engine.ds_config import resolve_precision, student_config

    ds, tr = cfg.deepspeed, cfg.trainer
    fp = method_footprint(cfg, arch)
    # the buffer limits DeepSpeed will get (ZeRO-3's; read only where the plan's stage is 3)
    zero = student_config(ds, tr, cuda, world_size=max(2, n))["zero_optimization"]
    return plan_memory(arch, n, min(n, gpn), precision=resolve_precision(ds, cuda),
                       zero_stage=resolve_zero_stage(ds, n).stage if zero_stage is None else zero_stage, offload_optimizer=offload_opt,
                       offload_param=offload_par,
                       uses_reference=uses_reference, batch_size=int(tr.batch_size),
                       retain_batch_size=int(tr.retain_batch_size),
                       seq_len=min(int(cfg.data.max_length), batch.seq_len) if batch else int(cfg.data.max_length),
                       loss_positions=batch.loss_positions if batch else None, kl_impl=kl_impl or cfg.kernels.kl,
                       activation_checkpointing=bool(ds.activation_checkpointing if activation_checkpointing is None
                                                     else activation_checkpointing),
                       flash_attention=cuda and cfg.kernels.attention != "torch", buffers=zero,
                       cpu_ranks=not cuda and not ds.gpu_memory_gb, lora_params=lora_param_count(arch, cfg.model),
                       joint_pass=getattr(tr, "passes", "joint") == "joint", trainable_params=fp.trainable_params,
                       logits=fp.logits, torch_adam=bool(ds.torch_adam), activation_layers=fp.activation_layers,
                       layers_run=fp.layers_run)


def plan_for_run(cfg: Any, world_size: int, cuda: bool, model_path: Optional[str], uses_reference: bool,
                 vocab_size: Optional[int] = None, local_world_size: Optional[int] = None) -> MemoryPlan:
    """The plan :func:`run_preflight` checks for this run (configured world size and offload)."""
    arch = resolve_arch(cfg.model, model_path, vocab_size)
    gpn = local_world_size or _local_world_size(world_size)
    return _plan(cfg, arch, world_size, gpn, cuda, uses_reference, cfg.deepspeed.offload_optimizer,
                 cfg.deepspeed.offload_param)


def run_preflight(cfg: Any, world_size: int, cuda: bool, model_path: Optional[str], uses_reference: bool,
                  vocab_size: Optional[int] = None, show_gpus: tuple[int, ...] = (),
                  batch: Optional[BatchBound] = None) -> str:
    """Plan for the configured world size (and ``show_gpus``), print it, and refuse when it cannot fit.
    ``batch``: the data's largest micro-batch (:func:`largest_batch`; None: bounded by the config)."""

    arch = resolve_arch(cfg.model, model_path, vocab_size)
    ds = cfg.deepspeed
    gpn = _local_world_size(world_size)
    if batch is not None and not method_footprint(cfg, arch).rows_given:
        batch = None  # the method adds rows of its own (IDK views), which the data's rows do not bound

    def mk(n: int, offload_opt: str, offload_par: str, zero_stage: Optional[int] = None,
           checkpointing: Optional[bool] = None, kl_impl: Optional[str] = None) -> MemoryPlan:
        # this run's own ranks per node; another GPU count (a column, a suggestion) on nodes of 8, or
        # of this node's size when larger (before, this run too: 4-GPU nodes' host memory was doubled)
        per_node = gpn if n == world_size else max(gpn, 8 if n >= 8 else n)
        return _plan(cfg, arch, n, per_node, cuda, uses_reference, offload_opt, offload_par, zero_stage, checkpointing,
                     kl_impl, batch)

    cpu_ranks = not (cuda or ds.gpu_memory_gb)
    current = mk(world_size, ds.offload_optimizer, ds.offload_param)
    gpu_avail, host_avail = available_memory(cuda, ds.gpu_memory_gb, ds.host_memory_gb)
    shown = [mk(n, ds.offload_optimizer, ds.offload_param) for n in show_gpus if n != world_size]
    text = format_plans(arch, sorted([current, *shown], key=lambda p: p.n_gpus), gpu_avail or None, host_avail,
                        "rank" if cpu_ranks else "GPU")
    if batch is not None:
        text = f"{text}\n{batch.describe(int(cfg.data.max_length))}"
    log.info("\n%s", text)
    if cpu_ranks:
        gpu_avail = 0  # CPU run: model states live in host memory, checked below via the host total
        states_on_host(current)
    if not plan_fits(current, gpu_avail, host_avail):
        # (the search plans up to ~35 settings: only for a run that is refused)
        suggestions, no_fit = suggest_fixes(cfg, world_size, mk, gpu_avail, host_avail, cpu_ranks)
        check_fits(current, gpu_avail, host_avail, suggestions, "rank" if cpu_ranks else "GPU", no_fit)
    return text
