"""Build (once) and cache the embedded benchmark: data, tokenizer, target model and retain model.

``prepare_synthetic(data_cfg, model_cfg, cache_root)`` returns the paths of a directory
``cache_root/synthetic-<hash>/`` (hash of both configs, ``num_threads`` excluded) holding::

    data/<split>.jsonl    tokenizer/    target/    retain/    meta.json    COMPLETE

- The **target** model is trained on every fictitious author plus ``real_authors`` and
  ``world_facts``. The **retain** model is trained on the same data without the ``forget10``
  authors; it is the gold standard for ``forget01`` and ``forget05`` too (a simplification: a
  per-split retain model would know slightly more authors; since forget01 subset forget05 subset
  forget10, the retain model has seen none of any forget split's authors).
- Both trainings run in parallel as two subprocesses with one thread each (two CPU cores).
- Each model is saved (safetensors + tokenizer) into a temporary directory, then moved into place
  with ``os.replace``; ``COMPLETE`` is written last. A file lock (``cache_root/.lock``) makes
  concurrent callers (several ranks, several jobs) build it once; later calls return at once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.synthetic import SyntheticConfig, forget_authors, training_rows
from pipeline.messages import note
from pipeline.models.tiny import TinyModelConfig

# Bump when the benchmark generator, tokenizer or training recipe changes.
# 2: the tokenizer also covers the refusal answers of the IDK methods (REFUSALS).
CACHE_VERSION = 2
REPO_ROOT = Path(__file__).resolve().parents[2]
_HASH_EXCLUDE = {"num_threads"}


@dataclass
class SyntheticArtifacts:
    root: Path
    data_dir: Path
    tokenizer_dir: Path
    target_dir: Path
    retain_dir: Path
    forget_split_authors: dict[str, list[str]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def _as_dataclass(obj: Any, cls):
    """Accept the dataclass itself, an OmegaConf node or a plain mapping."""
    if isinstance(obj, cls):
        return obj
    if obj is None:
        return cls()
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(obj, DictConfig):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(obj).items() if k in names})


def config_hash(data_cfg: SyntheticConfig, model_cfg: TinyModelConfig) -> str:
    payload = {"version": CACHE_VERSION, "data": dataclasses.asdict(data_cfg),
               "model": {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in _HASH_EXCLUDE}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _artifacts(root: Path, data_cfg: SyntheticConfig) -> SyntheticArtifacts:
    meta = {}
    if (root / "meta.json").exists():
        meta = json.loads((root / "meta.json").read_text())
    return SyntheticArtifacts(root=root, data_dir=root / "data", tokenizer_dir=root / "tokenizer",
                              target_dir=root / "target", retain_dir=root / "retain",
                              forget_split_authors=forget_authors(data_cfg), meta=meta)


def _train_one(spec_path: str) -> None:
    """Subprocess entry: train one model described by a JSON spec and save it to ``spec['out']``."""
    spec = json.loads(Path(spec_path).read_text())
    model_cfg = TinyModelConfig(**spec["model_cfg"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, model_cfg.num_threads))
    import torch
    from transformers import AutoTokenizer

    from pipeline.models.tiny import build_tiny_llama, train_from_scratch

    torch.set_num_threads(max(1, model_cfg.num_threads))
    tok = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    with open(spec["rows"]) as f:
        rows = [json.loads(line) for line in f]
    model = build_tiny_llama(model_cfg, tok)
    info = train_from_scratch(model, tok, rows, model_cfg, progress=spec.get("progress", False))
    out = Path(spec["out"])
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    info.update(variant=spec["variant"], n_rows=len(rows),
                n_params=sum(p.numel() for p in model.parameters()))
    (tmp / "train_info.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _run_trainings(specs: list[Path], root: Path, parallel: bool, log) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-c", "import sys; from pipeline.data.prepare import _train_one; _train_one(sys.argv[1])"]
    if not parallel:
        for s in specs:
            _train_one(str(s))
        return
    procs = []
    for s in specs:
        logf = open(s.with_suffix(".log"), "w")
        procs.append((s, logf, subprocess.Popen(cmd + [str(s)], env=env, stdout=logf, stderr=subprocess.STDOUT,
                                                cwd=str(REPO_ROOT))))
    failed = []
    for s, logf, p in procs:
        rc = p.wait()
        logf.close()
        if rc != 0:
            failed.append((s, rc))
    if failed:
        msgs = []
        for s, rc in failed:
            tail = s.with_suffix(".log").read_text()[-2000:]
            msgs.append(f"{s.stem}: exit {rc}\n{tail}")
        raise RuntimeError("training the synthetic benchmark's models failed:\n" + "\n".join(msgs))


def prepare_synthetic(data_cfg: SyntheticConfig, model_cfg: TinyModelConfig, cache_root: str | Path,
                      parallel: bool = True, log: Callable[[str], None] = note) -> SyntheticArtifacts:
    """Build or reuse ``cache_root/synthetic-<hash>/``; see the module docstring."""
    from pipeline.data.synthetic import build_benchmark, write_benchmark
    from pipeline.data.tokenizer import build_word_tokenizer

    data_cfg = _as_dataclass(data_cfg, SyntheticConfig)
    model_cfg = _as_dataclass(model_cfg, TinyModelConfig)
    # Absolute: the two training subprocesses run in the repository root, not in the caller's working
    # directory (a launcher started elsewhere, e.g. by SLURM, would hand them a path they cannot find).
    cache_root = Path(cache_root).expanduser().resolve()
    root = cache_root / f"synthetic-{config_hash(data_cfg, model_cfg)}"
    if (root / "COMPLETE").exists():
        return _artifacts(root, data_cfg)
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / ".lock", "a+") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        try:
            if (root / "COMPLETE").exists():  # built by another process while we waited
                return _artifacts(root, data_cfg)
            t0 = time.perf_counter()
            if log:
                log(f"[prepare] building synthetic benchmark in {root} (once; cached afterwards)")
            root.mkdir(parents=True, exist_ok=True)
            work = root / "work"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            write_benchmark(data_cfg, root / "data")
            splits = build_benchmark(data_cfg)
            from pipeline.data.synthetic import all_texts

            tok_tmp = work / "tokenizer"
            from pipeline.data.formatting import REFUSALS

            build_word_tokenizer(all_texts(splits) + list(REFUSALS), tok_tmp)
            shutil.rmtree(root / "tokenizer", ignore_errors=True)
            os.replace(tok_tmp, root / "tokenizer")
            specs = []
            for variant in ("target", "retain"):
                rows_path = work / f"{variant}_rows.jsonl"
                rows_path.write_text("".join(json.dumps(r) + "\n" for r in training_rows(splits, variant)))
                spec = {"variant": variant, "model_cfg": dataclasses.asdict(model_cfg),
                        "tokenizer_dir": str(root / "tokenizer"), "rows": str(rows_path),
                        "out": str(root / variant), "progress": False}
                sp = work / f"{variant}.json"
                sp.write_text(json.dumps(spec))
                specs.append(sp)
            _run_trainings(specs, root, parallel, log)
            infos = {v: json.loads((root / v / "train_info.json").read_text()) for v in ("target", "retain")}
            meta = {"hash": root.name, "data_cfg": dataclasses.asdict(data_cfg),
                    "model_cfg": dataclasses.asdict(model_cfg), "seconds": time.perf_counter() - t0,
                    "train": {v: {k: i[k] for k in ("final_loss", "first_loss", "steps", "seconds", "n_rows",
                                                     "n_params")} for v, i in infos.items()},
                    "retain_model_excludes": "forget10"}
            (root / "meta.json").write_text(json.dumps(meta, indent=1))
            shutil.rmtree(work, ignore_errors=True)
            (root / "COMPLETE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
            if log:
                log(f"[prepare] done in {meta['seconds']:.0f}s (target loss {infos['target']['final_loss']:.4f}, "
                    f"retain loss {infos['retain']['final_loss']:.4f})")
            return _artifacts(root, data_cfg)
        finally:
            fcntl.flock(lockf, fcntl.LOCK_UN)
