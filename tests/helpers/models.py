"""Counting the transformers models alive in a process (the LoRA tests' "no second model" probe)."""

import gc


def model_roots() -> int:
    """Transformers models alive in this process, not counting those inside another (a
    ``LlamaForCausalLM`` holds a ``LlamaModel``, itself a ``PreTrainedModel``)."""
    from transformers import PreTrainedModel

    gc.collect()
    models = [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
    inner = {id(c) for m in models for c in m.modules() if c is not m}
    return sum(1 for m in models if id(m) not in inner)
