"""Safe model and tokenizer loading: safetensors only, no remote code, unless explicitly asked."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.logging import SAME_ON_EVERY_RANK
from pipeline.messages import first_line
from pipeline.models.tempered_attention import enable_tempered_attention
from pipeline.models.weight_report import (
    load_report_muted,
    loaded_weights_problem,
    size_mismatch_problem,
    weight_files,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    pass


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "namespace/name"


MODEL_FILES = ("config.json",)
# a tokenizer directory has at least one of these (config.json alone is none: AutoTokenizer needs
# the vocabulary, and a model directory saved without its tokenizer has a config.json)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "tekken.json", "spiece.model", "sentencepiece.bpe.model", "merges.txt")



def _read_json(file: Path, where: str) -> dict:
    """The JSON object in ``file``; a ModelLoadError naming ``where`` and the file when it is not one
    (transformers would stop with an OSError traceback, mid-load)."""
    try:
        obj = json.loads(file.read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ModelLoadError(f"{where}: {file.name} is not readable JSON ({first_line(e)}): "
                             f"a download or copy cut short, or a hand edit gone wrong?") from None
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{where}: {file.name} holds a JSON {type(obj).__name__}, not an object")
    return obj


def check_weight_files(p: Path, where: str) -> None:
    """Every safetensors file of the local model directory ``p`` has a readable header, and a sharded
    model's ``*.safetensors.index.json`` names only shards that are there, each holding the tensors the
    index places in it: a download or copy cut short, or an index from another revision, stops here in
    one line instead of mid-load (or, for a weight the index misplaces, after the data and the memory
    plan). Only the headers are read (``safe_open``)."""
    from safetensors import SafetensorError, safe_open

    indexes = {}
    for index in sorted(p.glob("*.safetensors.index.json")):
        weight_map = _read_json(index, where).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{where}: {index.name} has no weight_map: not a safetensors shard index")
        missing = sorted({str(s) for s in weight_map.values() if not (p / str(s)).is_file()})
        if missing:
            raise ModelLoadError(f"{where}: {index.name} names {len(missing)} shard(s) that are not there "
                                 f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): "
                                 f"a download or copy cut short?")
        indexes[index.name] = weight_map
    keys: dict[str, set[str]] = {}
    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                keys[f.name] = set(st.keys())
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{where}: {f.name} is not a readable safetensors file ({first_line(e)}): "
                                 f"a download or copy cut short?") from None
    for name, weight_map in indexes.items():
        absent = sorted((str(t), str(s)) for t, s in weight_map.items() if str(t) not in keys.get(str(s), set()))
        if absent:
            tensor, shard = absent[0]
            raise ModelLoadError(f"{where}: {name} places {len(absent)} tensor(s) in shards that do not hold them "
                                 f"(first: {tensor} in {shard}): shards and index from different downloads or "
                                 f"revisions, or a shard cut short?")


def expand_user(path: str | Path) -> str:
    """``path`` with a leading ``~`` expanded (a quoted ``model.path='~/models/x'`` reaches us as is; the
    location checks expand it, so loading must too); a hub id is returned unchanged."""
    return os.path.expanduser(str(path))


# files only a training run's directory holds (pipeline.run): named when it is given as a model
_RUN_MARKERS = ("train_history.json", "checkpoints", "results.json")


def _run_directory_hint(p: Path, key: str) -> str:
    if (p / "model" / "config.json").is_file():
        return f"; a run directory: its exported model is {p / 'model'} ({key}={p / 'model'})"
    if any((p / m).exists() for m in _RUN_MARKERS):
        return "; a run directory without its exported model/ (stopped before the export? run it again to export)"
    return ""


def _check_model_type(config: dict, where: str) -> None:
    """config.json's ``model_type`` is one this transformers knows (or the model brings its own code,
    ``auto_map``, which the load decides on): else transformers stops only once the data, tokenizer and
    memory plan are done, after a stray warning."""
    if "auto_map" in config:
        return
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    # none: transformers guesses from the path's name (a "llama" in it), as older configs need
    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING:
        import transformers

        raise ModelLoadError(f"{where}: config.json's model_type {model_type!r} is not an architecture transformers "
                             f"{transformers.__version__} knows: a newer transformers, or a typo in config.json?")


def check_model_location(path: str, key: str = "model.path", revision: Optional[str] = None,
                         needs: tuple[str, ...] = MODEL_FILES) -> None:
    """Stop, in one line, on a model path that cannot load, before anything is loaded or written: a
    local path that does not exist or is not a Hugging Face model directory, or a hub id that the
    offline run (``HF_HUB_OFFLINE=1``, the default) cannot find in the hub cache. ``needs``: the
    files of which the directory must have one (:data:`MODEL_FILES`, :data:`TOKENIZER_FILES`). A local
    directory's config.json / tokenizer_config.json must parse, and a model directory's safetensors
    headers and shard index must be whole (cheap: no weights are read)."""
    p = Path(expand_user(path))
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{key}={path} is a file, not a model directory"
                                 + (" (a GGUF file: use model.source=gguf_package)" if p.suffix == ".gguf" else ""))
        if needs == MODEL_FILES and not (p / "config.json").is_file() and (p / "adapter_config.json").is_file():
            raise ModelLoadError(f"{key}={path} is a LoRA adapter (adapter_config.json), not a model: evaluate or "
                                 f"train from the run's merged export beside it ({p.parent / 'model'})")
        if not any((p / f).is_file() for f in needs):
            raise ModelLoadError(f"{key}={path} has no {' or '.join(needs)}: not a Hugging Face "
                                 f"{'model' if needs == MODEL_FILES else 'tokenizer'} directory"
                                 + ("" if needs == MODEL_FILES or key == "model.tokenizer_path" else
                                    f" (the tokenizer is read from {key} while model.tokenizer_path is not set)")
                                 + _run_directory_hint(p, key))
        for name in ("config.json", "tokenizer_config.json"):
            if name in needs and (p / name).is_file():
                obj = _read_json(p / name, f"{key}={path}")
                if name == "config.json":
                    _check_model_type(obj, f"{key}={path}")
        if needs == MODEL_FILES:
            check_weight_files(p, f"{key}={path}")
        return
    if not _is_hub_id(path):
        raise ModelLoadError(f"{key}={path}: no such directory")
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return  # the hub answers for itself
    if not any(isinstance(try_to_load_from_cache(path, f, revision=revision), str) for f in needs):
        other = _cached_in_other_case(path, constants.HF_HUB_CACHE)
        if other and other != path:  # the hub resolves ids in any case, its cache folders do not
            raise ModelLoadError(f"{key}={path}: not in the hub cache under this spelling, but {other} is "
                                 f"({constants.HF_HUB_CACHE}); the offline cache is case-sensitive: set {key}={other}")
        raise ModelLoadError(
            f"{key}={path}: no such directory, and as a hub id it is not in the hub cache "
            f"({constants.HF_HUB_CACHE}{f', revision {revision}' if revision else ''}) while the run is offline "
            f"(HF_HUB_OFFLINE=1); download it first (`hf download {path}`) or set ASU_ALLOW_NETWORK=1")


def _is_hub_id(path: str) -> bool:
    """Whether ``path``, not a directory here, reads as a hub id (``org/name``, not ``./x`` or ``~/x``)."""
    return bool(_HUB_ID.match(path)) and not path.startswith((".", "~"))


def hub_id_not_cached(path: str, revision: Optional[str] = None) -> bool:
    """Whether ``path`` is a hub id (no local path: not here, not ``/``, ``.`` or ``~``) that the hub cache
    holds nothing of: no config.json at ``revision`` and no folder of it in any spelling. What a dry run
    cannot check offline (it sizes such a model from ``model.arch``); anything else it checks as the
    launch does (a repository cached at another revision or spelling is refused with the launch's line)."""
    if Path(expand_user(path)).exists() or not _is_hub_id(path):
        return False
    from huggingface_hub import constants

    return model_config_file(path, revision) is None and _cached_in_other_case(path, constants.HF_HUB_CACHE) is None


def revision_for(model_cfg: Any, path: Any) -> Optional[str]:
    """The hub revision ``path`` is loaded at: ``model.revision`` for ``model.path`` itself; other paths
    (an exported run, eval.retain_model, the embedded benchmark's models) have none."""
    if path is None or str(path) != str(getattr(model_cfg, "path", None)):
        return None
    return getattr(model_cfg, "revision", None)


def model_config_file(model_path: str, revision: Optional[str] = None) -> Optional[Path]:
    """The model's config.json: in its directory, or a hub id's cached snapshot at ``revision``
    (None when neither has it; nothing is downloaded)."""
    model_path = expand_user(model_path)
    local = Path(model_path) / "config.json"
    if local.is_file():
        return local
    if not _HUB_ID.match(str(model_path)):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(str(model_path), "config.json", revision=revision)
    except ValueError:  # not a valid hub id after all (e.g. "a..b"): no config to read
        return None
    return Path(cached) if isinstance(cached, str) else None


def model_context(config: Any) -> Optional[int]:
    """The context window (positions) of a model's config: a config.json's fields or a loaded model's
    ``config`` (``max_position_embeddings``, GPT-2's ``n_positions``); None when it says none."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    context = get("max_position_embeddings") or get("n_positions")
    return context if isinstance(context, int) and context > 0 else None


def capped_at_context(key: str, value: int, model_path: str, revision: Optional[str] = None,
                      level: int = logging.WARNING) -> int:
    """``value`` (the config's ``key``, a token length) capped at the model's context window, read from
    its config.json (a hub id's at ``revision``); past it positions are out of the model's range:
    an index error for learned positions, silent extrapolation for rotary ones. Logged at ``level``."""
    cfg_file = model_config_file(model_path, revision)
    context = model_context(_read_json(cfg_file, str(model_path)) if cfg_file is not None else {})
    if context is not None and context < value:
        log.log(level, "%s=%d exceeds the model's context (%d tokens): sequences are limited to %d", key, value,
                context, context, extra=SAME_ON_EVERY_RANK)
        return context
    return int(value)


def _cached_in_other_case(repo_id: str, cache_dir: str | Path) -> Optional[str]:
    """The spelling under which hub id ``repo_id`` is in the cache, compared case-insensitively (e.g.
    ``muse-bench/MUSE-news_target`` downloaded as ``MUSE-News_target``); None when it is not there."""
    want = "models--" + repo_id.replace("/", "--").lower()
    try:
        names = [d.name for d in Path(cache_dir).iterdir() if d.is_dir()]
    except OSError:
        return None
    hit = next((n for n in sorted(names) if n.lower() == want), None)
    return hit[len("models--"):].replace("--", "/", 1) if hit else None


def safetensors_header(path: str | Path) -> bytes:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets), without the
    weights: 8 + n bytes read."""
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return head
        (n,) = struct.unpack("<Q", head)
        return f.read(min(n, 100_000_000))


def weights_bytes(path: str | Path, dtype: str) -> Optional[int]:
    """The size of a model's weights once loaded in ``dtype``, from its safetensors headers (no
    weights read); a hub id is looked up in the local hub cache. None when unknown (no safetensors)."""
    p = Path(expand_user(path))
    if not p.is_dir():
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(str(path), local_files_only=True))
        except Exception:  # not a cached hub id: unknown
            return None
    files = weight_files(p)
    if not files:
        return None
    elements = 0
    for f in files:
        header = json.loads(safetensors_header(f) or b"{}")
        for name, t in header.items():
            if name != "__metadata__":
                n = 1
                for d in t["shape"]:
                    n *= int(d)
                elements += n
    return elements * DTYPES[dtype].itemsize


def has_pickle_weights(directory: Path) -> bool:
    """Whether ``directory`` holds pickled weight files (.bin / .pt / .pth)."""
    return any(f.suffix in (".bin", ".pt", ".pth") for f in directory.iterdir())


def check_weights_safe(path: str | Path, allow_pickle: bool, what: Optional[str] = None) -> None:
    """Refuse a local model directory (or a hub id's cached snapshot, :func:`cached_snapshot`) that only
    has pickle (.bin/.pt) weights unless allowed, or none. ``what`` names it in the message (default:
    ``model directory <path>``)."""
    p = Path(path)
    if not p.is_dir():
        return  # a hub id not cached: from_pretrained(use_safetensors=True) enforces it
    what = what or f"model directory {p}"
    has_st = any(p.glob("*.safetensors"))
    has_pickle = has_pickle_weights(p)
    if not has_st and has_pickle and not allow_pickle:
        raise ModelLoadError(
            f"{what} has only pickle weights (.bin/.pt), which can run arbitrary code when loaded; "
            f"convert it to safetensors or set model.allow_pickle=true if you trust it"
        )
    if not has_st and not has_pickle:
        raise ModelLoadError(f"{what} has no weights (*.safetensors)")


def check_remote_code(path: str | Path, trust_remote_code: bool, what: Optional[str] = None) -> None:
    """Refuse a local model (or a cached snapshot) whose config.json asks for custom code (``auto_map``)
    unless trusted."""
    p = Path(path)
    cfg_file = p / "config.json"
    if not (p.is_dir() and cfg_file.exists()):
        return
    auto_map = _read_json(cfg_file, f"model {p}").get("auto_map")
    if auto_map and not trust_remote_code:
        raise _remote_code_error(what or f"model {p}", auto_map)
    if auto_map and isinstance(auto_map, dict):
        # trusted: the code of the classes a run loads must be here (transformers would look for it on the
        # hub, offline, and name a URL made of the local path). A tokenizer entry or another head may ship
        # elsewhere; "other/repo--module.Class" is another repository's: neither is looked for
        loaded = [v for k, v in auto_map.items() if k in ("AutoConfig", "AutoModel", "AutoModelForCausalLM")]
        refs = [v for vs in loaded for v in (vs if isinstance(vs, list) else [vs]) if isinstance(v, str)]
        missing = sorted({f"{r.split('.')[0]}.py" for r in refs if "--" not in r} - {f.name for f in p.glob("*.py")})
        if missing:
            raise ModelLoadError(f"{what or f'model {p}'} asks for custom code its directory lacks: {missing} "
                                 f"(config.json auto_map); copy them from the model's repository beside config.json")


def cached_snapshot(path: str, revision: Optional[str] = None) -> Optional[Path]:
    """An offline run's hub id: its cached snapshot directory at ``revision`` (the one holding its
    config.json), so its files are checked as a local directory's are. None for a local path, a hub id
    not cached, and an online run (``ASU_ALLOW_NETWORK=1``: the hub supplies what the cache lacks)."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE or Path(expand_user(path)).exists() or not _is_hub_id(path):
        return None
    config = model_config_file(path, revision)
    return config.parent if config is not None else None


def _remote_code_error(what: str, auto_map: Any) -> ModelLoadError:
    names = f" ({sorted(auto_map)})" if isinstance(auto_map, dict) else ""
    return ModelLoadError(f"{what} requires custom code{names}; refusing to run it. "
                          f"Set model.trust_remote_code=true only if you trust its author")


# set on a tokenizer whose pad token load_tokenizer borrowed from EOS (Llama-2/3 have none)
_PAD_FROM_EOS = "_asu_pad_from_eos"


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, **kwargs: Any):
    """The tokenizer at ``path``; one without a pad token pads with EOS (batching needs one; padded
    positions are masked out of every loss and score). ``kwargs`` go to ``from_pretrained`` (e.g.
    ``add_bos_token=True``). A directory that cannot give a tokenizer is a ModelLoadError naming it."""
    from transformers import AutoTokenizer

    path = expand_user(path)
    p = Path(path)
    if p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"tokenizer {p} has no {' or '.join(TOKENIZER_FILES)}: a model directory saved "
                             f"without its tokenizer? Set model.tokenizer_path to the tokenizer's directory")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:  # what transformers raises for a broken or foreign directory
        if not trust_remote_code and "trust_remote_code" in str(e):
            # a tokenizer_config.json auto_map with no built-in class to fall back on
            tc = p / "tokenizer_config.json"
            auto_map = _read_json(tc, f"tokenizer {p}").get("auto_map") if tc.is_file() else None
            raise _remote_code_error(f"tokenizer {path}", auto_map) from e
        raise ModelLoadError(f"tokenizer {path} cannot be loaded: {first_line(e)}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
        setattr(tok, _PAD_FROM_EOS, True)
    return tok


def save_tokenizer(tok: Any, out_dir: str | Path) -> None:
    """Save ``tok`` as it was loaded: a pad token :func:`load_tokenizer` borrowed from EOS is not
    written (a later fine-tune's collator would mask the EOS labels out as padding)."""
    if getattr(tok, _PAD_FROM_EOS, False):
        import copy

        tok = copy.deepcopy(tok)
        tok.pad_token = None
    tok.save_pretrained(str(out_dir))


def load_causal_lm(
    path: str | Path,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    revision: Optional[str] = None,
    device: Optional[str] = None,
) -> Any:
    """Load a causal LM with the ``tempered`` attention implementation (tau = 1).

    Under an active ``HfDeepSpeedConfig`` with ZeRO-3, transformers builds the model inside
    ``deepspeed.zero.Init`` so that no rank ever holds the full weights. ``device`` (e.g.
    ``"cuda:0"``; not with ZeRO-3): the weights are loaded straight onto it, never whole in host
    memory (eight ranks of a node would otherwise each hold a full copy there first).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = expand_user(path)
    check_weights_safe(path, allow_pickle)
    check_remote_code(path, trust_remote_code)
    try:
        with load_report_muted():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path),
                dtype=DTYPES[dtype],
                trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True,
                revision=revision,
                # what was loaded is checked below: a shape mismatch refused in one line, not a traceback
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                **({"device_map": {"": device}} if device not in (None, "cpu") else {}),
            )
    except RuntimeError as e:
        # ZeRO-3 loads on rank 0 alone: its shape mismatch is rank 0's; every rank learns it below
        problem = size_mismatch_problem(path, e)
        if problem is None:
            raise
        model = info = None
    except (OSError, ValueError, SafetensorError) as e:  # a broken directory; not Exception: bugs stay tracebacks
        msg = first_line(e)
        if not allow_pickle and "use_safetensors" in msg:
            # transformers names its own argument, not ours; it says so for a snapshot with pickled weights
            # only and for one with no weights at all (a download cut short): the hint only for the first
            cfg_file = model_config_file(str(path), revision)
            pickled = cfg_file is not None and has_pickle_weights(cfg_file.parent)
            msg = (f"no safetensors weights ({msg.split(' Please', 1)[0].strip()}); " +
                   ("pickled weights (.bin) load only with model.allow_pickle=true (they can run code when loaded)"
                    if pickled else "and no other weight files in the hub cache either: a download cut short?"))
        raise ModelLoadError(f"model {path} cannot be loaded: {msg}") from e
    else:
        problem = loaded_weights_problem(path, model, info)
    problem = _rank0_under_zero3(problem)
    if problem:
        raise ModelLoadError(problem)
    enable_tempered_attention(model)
    return model


def _rank0_under_zero3(problem: Optional[str]) -> Optional[str]:
    """Under ZeRO-3 (a collective load, every rank here) rank 0's verdict for every rank: transformers
    loads the weights on rank 0 alone, and only there reports a shape mismatch; otherwise ``problem``."""
    import torch.distributed as dist
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not (is_deepspeed_zero3_enabled() and dist.is_available() and dist.is_initialized()):
        return problem
    verdict = [problem]
    dist.broadcast_object_list(verdict, src=0)
    return verdict[0]


def check_vocab(model: Any, tokenizer: Any, where: str) -> None:
    """Stop when token ids can exceed the embedding table (a silent index error otherwise)."""
    n_emb = model.get_input_embeddings().num_embeddings if hasattr(model.get_input_embeddings(), "num_embeddings") else None
    n_emb = n_emb or getattr(model.config, "vocab_size", None)
    if n_emb is not None and len(tokenizer) > n_emb:
        raise ModelLoadError(
            f"{where}: tokenizer has {len(tokenizer)} tokens but the model's embedding has {n_emb} rows"
        )


def check_same_architecture(a: Any, b: Any) -> None:
    """Teacher and student must be the same network for distillation."""
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    diffs = [(k, getattr(a.config, k, None), getattr(b.config, k, None)) for k in keys
             if getattr(a.config, k, None) != getattr(b.config, k, None)]
    if diffs:
        raise ModelLoadError("teacher and student architectures differ: " +
                             ", ".join(f"{k} student={x} teacher={y}" for k, x, y in diffs))
