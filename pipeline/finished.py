"""A finished job is not run again: re-running the same command in its run directory loads nothing.

Re-launching a sweep to fill in its failed points, or a requeue that arrives after the job ended,
would otherwise rebuild every finished point's engines (a 7B model, twice), load its last
checkpoint (weights and Adam state) only to find nothing to train, skip the export and reuse every
evaluation part: minutes of GPU time per point for the same ``results.json``.

At its very end a job writes ``<run dir>/finished.json``: what it depended on (the resolved
configuration without the settings that do not change its results, the number of ranks, its data
rows and evaluation rows, the base model's, tokenizer's and retain model's files, the evaluation code) and what it left (the checkpoint
of its last step, ``model/``'s file fingerprints, a SHA-256 of ``results.json``). A re-run whose
inputs are the same and whose outputs are still there returns that ``results.json`` right after
reading its data. Only resumable jobs qualify (``trainer.save_every`` > 0, so a checkpoint of the
last step exists): one without checkpoints trains again, as it always did. ``trainer.resume=never``
or ``eval.resume=false`` run the job again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from pipeline.engine import checkpoint as ckpt
from pipeline.engine.distributed import broadcast_object, is_main_process
from pipeline.eval.report import PREVIOUS_RESULTS_FILE, set_aside_results

log = logging.getLogger(__name__)

FINISHED_FILE = "finished.json"
SCHEMA = 1
# Settings that change neither what is trained nor what is measured (where files go, how much is
# logged, how often a checkpoint is kept, whether a re-run resumes).
NOT_IN_KEY = ("logging", "output_dir", "cache_dir", "trainer.resume", "trainer.num_threads", "trainer.preflight",
              "trainer.dry_run", "trainer.save_every", "trainer.keep_checkpoints", "trainer.log_every", "eval.resume")


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def result_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved configuration as flat ``key: value`` fields, without :data:`NOT_IN_KEY`: the
    settings a job's results depend on (a finished job's key, a continual step's record)."""
    config = _flat(OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in config.items() if not any(k == n or k.startswith(n + ".") for n in NOT_IN_KEY)}


def job_key(cfg: DictConfig, world_size: int, inputs: Any) -> dict:
    """Everything a job's results depend on, as flat JSON-able fields (``config.<key>``, ``world_size``,
    ``rows.*``, ``model``, ``tokenizer``, ``code``); ``inputs`` is run's JobInputs."""
    from pipeline.eval.parts import code_digest, rows_digest
    from pipeline.eval.reference import model_fingerprint, tokenizer_fingerprint

    key = {f"config.{k}": v for k, v in result_config(cfg).items()}
    # the snapshot the model is loaded at (model.revision), not the hub cache's refs/main
    model = model_fingerprint(inputs.paths.model, OmegaConf.select(cfg, "model.revision", default=None))
    key.update({"schema": SCHEMA, "world_size": int(world_size), "rows.forget": rows_digest(inputs.data.forget),
                "rows.retain": rows_digest(inputs.data.retain), "model": model,
                "tokenizer": tokenizer_fingerprint(inputs.tokenizer), "code": code_digest()})
    # what the evaluation reads besides the trained model (when it runs): its splits' rows, and forget
    # quality's reference (the retain model's files, or the reference file's bytes), each replaceable in place
    if OmegaConf.select(cfg, "eval.enabled", default=True):
        key.update({f"rows.eval.{name}": rows_digest(rows) for name, rows in (inputs.data.eval or {}).items()})
        if inputs.paths.retain_model:
            key["eval.retain_model"] = model_fingerprint(inputs.paths.retain_model)
        reference_file = OmegaConf.select(cfg, "eval.retain_reference", default=None)
        if reference_file:
            key["eval.retain_reference"] = _sha256(Path(str(reference_file)).expanduser())
    return json.loads(json.dumps(key, sort_keys=True, default=str))  # as it reads back from the file


def _sha256(path: Path) -> Optional[str]:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _outputs(run_dir: Path) -> dict:
    """What a finished job left that a re-run would return: last checkpoint, model/, results.json."""
    from pipeline.eval.reference import model_fingerprint

    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    model_dir, adapter_dir = run_dir / "model", run_dir / "adapter"
    out = {"checkpoint": ckpt.checkpoint_name(latest) if latest is not None else None,
           "model": model_fingerprint(model_dir)["files"] if model_dir.is_dir() else None,
           "results_sha256": _sha256(run_dir / "results.json")}
    # a LoRA run's adapter/ (results.json points to it): a deleted one is not "unchanged" (None elsewhere,
    # as in records written before it was kept)
    out["adapter"] = model_fingerprint(adapter_dir)["files"] if adapter_dir.is_dir() else None
    return out


def _check(run_dir: Path, key: dict) -> tuple[Optional[str], dict]:
    """(why ``run_dir`` is not this very job, finished and unchanged — None when it is, "" when it
    never finished there; the finished record)."""
    try:
        rec = json.loads((run_dir / FINISHED_FILE).read_text())
        stored_key, stored_out = rec["key"], rec["outputs"]
    except FileNotFoundError:
        return "", {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{FINISHED_FILE} is unreadable ({type(e).__name__})", {}
    if stored_key != key:
        differ = sorted(k for k in set(stored_key) | set(key) if stored_key.get(k) != key.get(k))
        shown = ", ".join(k.removeprefix("config.") for k in differ[:5]) + (", ..." if len(differ) > 5 else "")
        return f"it finished with other inputs ({shown})", rec
    now = _outputs(run_dir)
    changed = [k for k in now if now[k] != stored_out.get(k)]
    if changed:
        return f"its outputs changed since it finished ({', '.join(changed)})", rec
    return None, rec


def finished_results(cfg: DictConfig, run_dir: Path, key: dict,
                     before_rerun: Optional[Callable[[], None]] = None) -> Optional[dict]:
    """``results.json`` (rank 0; {} elsewhere) when ``run_dir`` holds this job, finished and
    unchanged; None when it must run. Rank 0 decides and every rank follows. A job that must run
    first calls ``before_rerun`` on every rank (the resume's compatibility check: a refused launch
    stops here, changing nothing); then a stale record is removed, so that only a job that ends
    writes one, and an earlier ``results.json`` is set aside as ``results.previous.json``."""
    done, why, rec = None, None, {}
    if is_main_process():
        if str(cfg.trainer.resume) != "auto" or (cfg.eval.enabled and not cfg.eval.resume):
            why = "trainer.resume / eval.resume ask to run it again"
        else:
            why, rec = _check(run_dir, key)
        if why is None:
            done = json.loads((run_dir / "results.json").read_text())
            log.info("run %s finished already (at %s, checkpoint %s; model/ and results.json unchanged; same "
                     "configuration, data, model and evaluation code): nothing to do (trainer.resume=never runs "
                     "it again)", run_dir, rec.get("finished_at", "?"), rec["outputs"]["checkpoint"])
    if broadcast_object(done is not None):
        return done if is_main_process() else {}
    if before_rerun is not None:
        before_rerun()
    if is_main_process():
        if why and (run_dir / FINISHED_FILE).exists():
            log.info("run %s: its earlier results are not reused: %s", run_dir, why)
        elif why == "" and (run_dir / "results.json").exists():  # results without a finished record: say why
            left = ckpt.latest_checkpoint(run_dir / "checkpoints")  # e.g. a preemption's, under save_every=0
            again = f"resumes from {ckpt.checkpoint_name(left)}" if left is not None else "trains again"
            log.info("run %s: its earlier results are not reused: %s", run_dir,
                     f"a run without checkpoints of its last step (trainer.save_every=0) is never recorded as "
                     f"finished, so it {again}" if int(OmegaConf.select(cfg, "trainer.save_every", default=0) or 0) == 0
                     else f"no {FINISHED_FILE}: it did not finish (it resumes from its newest checkpoint)")
        (run_dir / FINISHED_FILE).unlink(missing_ok=True)
        if set_aside_results(run_dir) is not None:  # a failing re-run must not leave them as its own
            log.info("run %s: the earlier results.json is set aside as %s (with its report.md, eval_details.json and "
                     "train_history.json as *.previous.*, kept for comparison): a re-run that fails leaves no "
                     "results.json of another run", run_dir, PREVIOUS_RESULTS_FILE)
    return None


def record_finished(run_dir: Path, key: dict, last_step: int) -> None:
    """Rank 0, after everything the job writes: mark ``run_dir`` finished, when a checkpoint of the
    last step exists (a job without one trains again on a re-run, so nothing is recorded)."""
    if not is_main_process():
        return
    from pipeline.io import atomic_write_json

    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if latest is None or ckpt.read_meta(latest).get("step") != last_step:
        return
    atomic_write_json(run_dir / FINISHED_FILE, {"key": key, "outputs": _outputs(run_dir),
                                                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
