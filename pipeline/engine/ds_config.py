"""Build DeepSpeed JSON configs for the student (trainable) and the frozen teacher/reference."""

from __future__ import annotations

import copy
from typing import Any, Optional

from omegaconf import OmegaConf

from pipeline.engine.zero_stage import AUTO, resolve_zero_stage


def resolve_precision(ds_cfg: Any, cuda: bool) -> str:
    p = ds_cfg.precision
    if p == "auto":
        return "bf16" if cuda else "fp32"
    return p


# ZeRO-3 buffer limits, in elements. On GPUs DeepSpeed's throughput-minded defaults (prefetch 5e7,
# up to 1e9 gathered parameters kept for reuse, a 5e8-element gradient reduce bucket, one optimizer
# sub-group of 1e9 elements). On CPU ranks host memory is the limit and gloo gains nothing from
# large buckets: with the GPU values a 134M-parameter model stayed fully gathered on every rank
# (student and teacher), the reduce bucket filled with the whole model's gradients and Adam's
# temporaries covered the whole partition (with the other fixes: 37.6 -> 19.1 bytes/parameter/rank
# of peak growth at 33M, benchmarks/bench_memory.py, docs/performance.md). The preflight reads
# these same values (plus deepspeed.extra overrides). No prefetch on CPU ranks: once DeepSpeed has a
# module trace, its prefetch scan marks parameters that are still gathered as "fetched" for their
# next use and then never releases them, so the last layers and the head stayed gathered from the
# end of the forward to their backward (~200 MiB per rank at 134M, at the backward peak);
# gloo overlaps nothing worth it on CPU.
GPU_BUFFERS = {"stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9,
               "stage3_max_reuse_distance": 1e9, "reduce_bucket_size": 5e8, "sub_group_size": 1e9}
CPU_BUFFERS = {"stage3_prefetch_bucket_size": 0, "stage3_max_live_parameters": 5e7,
               "stage3_max_reuse_distance": 0, "reduce_bucket_size": 5e6, "sub_group_size": 1e7}


def _stage(ds_cfg: Any, world_size: Optional[int]) -> int:
    """``deepspeed.zero_stage`` as an int: ``auto`` resolved for ``world_size`` ranks."""
    if str(ds_cfg.zero_stage) == AUTO and world_size is None:
        raise ValueError("deepspeed.zero_stage=auto: the DeepSpeed config needs the world size to resolve it")
    return resolve_zero_stage(ds_cfg, int(world_size or 1)).stage


def _zero_section(ds_cfg: Any, with_optimizer: bool, cuda: bool = True, world_size: Optional[int] = None) -> dict:
    z: dict[str, Any] = {"stage": _stage(ds_cfg, world_size)}
    if z["stage"] == 3:
        buffers = GPU_BUFFERS if cuda else CPU_BUFFERS
        z.update(
            stage3_gather_16bit_weights_on_model_save=bool(ds_cfg.gather_16bit_weights_on_model_save),
            stage3_param_persistence_threshold=int(ds_cfg.param_persistence_threshold),
            **{k: v for k, v in buffers.items() if with_optimizer or k.startswith("stage3_")},
        )
        if ds_cfg.offload_param != "none":
            z["offload_param"] = {"device": ds_cfg.offload_param, "pin_memory": True}
    if with_optimizer and ds_cfg.offload_optimizer != "none":
        z["offload_optimizer"] = {"device": ds_cfg.offload_optimizer, "pin_memory": True}
    return z


def student_config(ds_cfg: Any, trainer_cfg: Any, cuda: bool, world_size: Optional[int] = None) -> dict:
    """DeepSpeed config of the trainable student (optimizer built by DeepSpeed). ``world_size``
    resolves ``deepspeed.zero_stage=auto`` (pipeline/engine/zero_stage.py); an explicit stage needs none."""
    prec = resolve_precision(ds_cfg, cuda)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(trainer_cfg.batch_size),
        "gradient_accumulation_steps": int(trainer_cfg.grad_accum),
        "gradient_clipping": float(trainer_cfg.max_grad_norm),
        "zero_optimization": _zero_section(ds_cfg, with_optimizer=True, cuda=cuda, world_size=world_size),
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": float(trainer_cfg.lr), "weight_decay": float(trainer_cfg.weight_decay),
                       "betas": [0.9, 0.999], "eps": 1e-8},
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds_cfg.torch_adam and ds_cfg.offload_optimizer == "none":
        cfg["optimizer"]["params"]["torch_adam"] = True
    # No "activation_checkpointing" section: it configures deepspeed.checkpointing.checkpoint, which
    # nothing here calls. deepspeed.activation_checkpointing is applied through transformers'
    # non-reentrant checkpointing (pipeline/models/activation_checkpointing.py: torch.utils.checkpoint),
    # which never reads that section; partition_activations there would promise a saving that never happens.
    extra = ds_cfg.extra
    if extra:
        extra = OmegaConf.to_container(extra, resolve=True) if not isinstance(extra, dict) else extra
        cfg = _deep_merge(cfg, extra)
    return cfg


def reference_config(ds_cfg: Any, trainer_cfg: Any, cuda: bool, world_size: Optional[int] = None) -> dict:
    """Config of the frozen teacher/reference: same sharding as the student (the same resolved
    stage), no optimizer, no gradients."""
    prec = resolve_precision(ds_cfg, cuda)
    z = _zero_section(ds_cfg, with_optimizer=False, cuda=cuda, world_size=world_size)
    if z["stage"] != 3:
        z = {"stage": 0}  # stages 1-2 shard optimizer state only; a frozen model has none
    return {
        "train_micro_batch_size_per_gpu": int(trainer_cfg.batch_size),
        "zero_optimization": z,
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16"},
        "steps_per_print": 10**9,
    }


def gather_per_layer(model: Any, config: dict, cuda: bool, checkpointing: bool = False,
                     joint_pass: bool = True) -> int:
    """CPU ranks, ZeRO-3: make each decoder layer of ``model`` (the student or the frozen model) one
    DeepSpeed leaf module, before ``deepspeed.initialize``; returns how many layers were marked (0:
    unchanged).

    Without it ZeRO-3 gathers a Llama layer's nine weights (q, k, v, o, gate, up, down, two norms) with
    one fetch (one all-gather, one hook round) each, in the forward and again in the backward; as a
    leaf the layer's weights come in one fetch, the same bytes, and DeepSpeed reduces the layer's
    gradients together once its backward is done. On 2 gloo ranks sharing 2 cores every collective is
    a rendezvous: at 7 M the frozen pass went from 39 all-gathers to 7 and from 176 to 111 ms, and a
    GradDiff step from 78 all-gathers to 14 (docs/performance.md). A whole layer is live at once
    (~28 MB fp32 at 134 M). GPUs keep DeepSpeed's per-module fetches and prefetching, which overlap
    the gathers with compute there (not measured: no device).

    A model with trainable weights is marked only when *every* weight trains, activation
    ``checkpointing`` is off and the step runs it once before each backward (``joint_pass``,
    trainer.passes=joint). DeepSpeed reduces a leaf's gradients and releases its weights from a full
    backward hook, once per traversal: that hook fires before the layer's own backward when the
    layer's input needs no gradient (a partly frozen student: LoRA, RMU's one layer), so the backward
    would find its weights gone; and a layer run twice before one backward (one forward per row group)
    would have its gradients reduced twice (DeepSpeed asserts)."""
    if cuda or config.get("zero_optimization", {}).get("stage") != 3:
        return 0
    grads = [p.requires_grad for p in model.parameters()]
    if any(grads) and (not all(grads) or checkpointing or not joint_pass):
        return 0
    from deepspeed.utils import set_z3_leaf_modules

    from pipeline.methods.model_io import decoder_layers

    try:
        layers = decoder_layers(model)
    except ValueError:  # not a Llama-like decoder: DeepSpeed's per-module fetches
        return 0
    return len(set_z3_leaf_modules(model, [type(layers[0])], raise_if_not_found=False))


def _deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
