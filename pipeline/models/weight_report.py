"""What a model load actually loaded: weights its files lack, name otherwise or shape otherwise.

transformers fills a weight its files lack (or name differently: a PEFT-wrapped save's
``base_model.model.`` prefix) with a fresh random one, says so in a load report table that scrolls
past, and the run goes on: unlearning a random model, with numbers as if nothing were wrong. A
config.json whose shapes differ from the files' (``vocab_size`` after the embeddings were resized)
stopped with a RuntimeError traceback. Both are refused here in one line, naming the first weights;
tensors in the files that the architecture does not use are only a warning (older Llama checkpoints
carry ``rotary_emb.inv_freq`` buffers).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
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
    for u in unexpected:
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
        return (f"model {path}: {len(mismatched)} weight(s) in its files have other shapes than its config.json gives "
                f"{arch} ({name}: {tuple(in_files)} in the files, {tuple(in_config)} from config.json"
                f"{'; also ' + _names([m[0] for m in mismatched[1:]]) if len(mismatched) > 1 else ''}): a config.json "
                f"from another model, or edited (vocab_size after the embeddings were resized)?")
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    if missing:
        return (f"model {path}: {len(missing)} weight(s) of {arch} are not in its files and would start random "
                f"({_names(missing)}){_renamed(missing, unexpected)}")
    if unexpected:
        log.warning("model %s: %d tensor(s) in its files are not used by %s and were left out (%s)", path,
                    len(unexpected), arch, _names(unexpected), extra=SAME_ON_EVERY_RANK)
    return None
