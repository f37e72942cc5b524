"""What a model load actually loaded: weights its files lack, name otherwise or shape otherwise.

transformers fills a weight its files lack (or name differently: a PEFT-wrapped save's
``base_model.model.`` prefix) with a fresh random one, says so in a load report table that scrolls
past, and the run goes on: unlearning a random model, with numbers as if nothing were wrong. A
config.json whose shapes differ from the files' (``vocab_size`` after the embeddings were resized)
stopped with a RuntimeError traceback. Both are refused here in one line, naming the first weights;
tensors in the files that the architecture does not use are only a warning (transformers itself
drops the ones it knows to be harmless, such as older Llama checkpoints' ``rotary_emb.inv_freq``).
Under ZeRO-3 transformers loads on rank 0 alone and reports neither shapes nor unused tensors: a
shape mismatch is its ``RuntimeError`` on rank 0 (:func:`size_mismatch_problem`), and the tensors the
files hold are read from their headers for the hint.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from pipeline.logging import SAME_ON_EVERY_RANK

log = logging.getLogger(__name__)

_REPORT_LOGGER = "transformers.modeling_utils"  # where transformers logs its load report
_SHOWN = 3  # weights named in a message


class _NoLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def load_report_muted() -> Iterator[None]:
    """transformers' load report table left out of the log: :func:`check_loaded` says what it found."""
    logger, muted = logging.getLogger(_REPORT_LOGGER), _NoLoadReport()
    logger.addFilter(muted)
    try:
        yield
    finally:
        logger.removeFilter(muted)


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (", ..." if len(keys) > _SHOWN else "")


def _renamed(missing: list[str], unexpected: list[str]) -> str:
    """Why the files' tensors did not match the missing weights, as far as their names tell."""
    for u in unexpected[:64]:  # a prefix shows in any of them; not every pair of a large model's thousands
        for m in missing:
            if u != m and u.endswith(m):
                return (f"; its files name them with the prefix {u[:-len(m)]!r} (a wrapped model's state dict, e.g. "
                        f"PEFT's: save the unwrapped or merged model with save_pretrained)")
    if unexpected:
        return (f"; its files hold {len(unexpected)} tensor(s) the architecture does not use ({_names(unexpected)}): "
                f"another architecture's weights, or saved under other names?")
    return "; a download or copy cut short, or a shard left out of the index?"


def loaded_weights_problem(path: Any, model: Any, info: dict) -> Optional[str]:
    """Why ``model`` (loaded from ``path`` with ``output_loading_info=True, ignore_mismatched_sizes=True``:
    ``info``) cannot be used: weights that did not come from its files; None when all did. Tensors in
    the files that it does not use are logged as a warning."""
    arch = type(model).__name__
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
    if mismatched:
        name, in_files, in_config = mismatched[0]
        also = f"; also {_names([m[0] for m in mismatched[1:]])}" if len(mismatched) > 1 else ""
        return _shapes_problem(path, len(mismatched), f"{arch} ({name}: {tuple(in_files)} in the files, "
                                                      f"{tuple(in_config)} from config.json{also})")
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    if missing:
        if not unexpected:  # ZeRO-3's loading reports none: the files' own names tell
            unexpected = sorted(set(file_tensor_names(path)) - set(model.state_dict(keep_vars=True)))
        return (f"model {path}: {len(missing)} weight(s) of {arch} are not in its files and would start random "
                f"({_names(missing)}){_renamed(missing, unexpected)}")
    if unexpected:
        log.warning("model %s: %d tensor(s) in its files are not used by %s and were left out (%s)", path,
                    len(unexpected), arch, _names(unexpected), extra=SAME_ON_EVERY_RANK)
    return None


def size_mismatch_problem(path: Any, error: RuntimeError) -> Optional[str]:
    """The one line for transformers' "Error(s) in loading state_dict ... size mismatch for <name>"
    (ZeRO-3's loading, which ignores ``ignore_mismatched_sizes``), else None."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip().startswith("size mismatch for ")]
    return _shapes_problem(path, len(lines), f"them ({lines[0].removesuffix('.')})") if lines else None


def _shapes_problem(path: Any, n: int, which: str) -> str:
    return (f"model {path}: {n} weight(s) in its files have other shapes than its config.json gives {which}: a "
            f"config.json from another model, or edited (vocab_size after the embeddings were resized)?")


def file_tensor_names(path: Any) -> list[str]:
    """The tensor names in a local model directory's safetensors headers (none for a hub id)."""
    from safetensors import safe_open

    names: list[str] = []
    p = Path(str(path))
    if p.is_dir():
        for f in weight_files(p):
            with safe_open(str(f), framework="pt") as st:
                names.extend(st.keys())
    return names


def weight_files(p: Path) -> list[Path]:
    """The safetensors files transformers loads from ``p``: the shards ``model.safetensors.index.json``
    names, else ``model.safetensors``, else every ``*.safetensors`` (hub Mistral repos ship a
    ``consolidated.safetensors`` beside the shards, which would count the weights twice)."""
    import json

    index = p / "model.safetensors.index.json"
    try:
        shards = sorted({str(s) for s in json.loads(index.read_text())["weight_map"].values()})
        return [p / s for s in shards if (p / s).is_file()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return [p / "model.safetensors"] if (p / "model.safetensors").is_file() else sorted(p.glob("*.safetensors"))
