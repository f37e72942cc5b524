"""Continual unlearning: a sequence of forget requests, each unlearned from the previous one's model.

Request ``i`` (``continual.requests[i]``, a forget split) runs :func:`pipeline.run.train_job` in
``<run_dir>/r<i+1>_<split>/`` with ``data.forget_split=<split>``; request 1 starts from the configured
model, request ``i > 1`` from request ``i-1``'s exported ``model/`` (``model.source=pretrained``).
After each request the model is evaluated on **every** request's forget split (do earlier requests
stay forgotten? are later ones untouched so far?), the retain split and the utility splits.
``continual.json`` and ``continual.md`` in ``<run_dir>`` hold one row per request; after the last
request a summary of the whole sequence (per step: forget split, run directory, steps trained or
"reused", the headline metrics of :func:`pipeline.eval.report.run_summary`, where its results are)
goes to stdout and to ``continual_summary.json`` (:func:`sequence_summary`).

The synthetic benchmark is resolved once, up front: its data directory is passed as
``data.name=json data.path=<dir>`` and its retain (gold-standard) model as ``eval.retain_model``, so
forget quality is measured against the same retain model on every request (it never saw any
``forget10`` author, hence none of ``forget10_part1`` / ``forget10_part2``). Every rank of a
multi-process launch runs the same sequence (each ``train_job`` is collective); rank 0 writes the files.

A request whose directory already holds this very step, finished (``continual_step.json``: the
request, its starting model and a digest of its settings, of that model's files and of its forget,
retain and evaluation rows, see :func:`step_record`), is not run again, so re-running the same
command resumes the sequence; one whose settings, rows (an edited jsonl), starting model (an earlier
request that ran again) or evaluated splits (a request added) changed runs again, as does every
step with ``trainer.resume=never``. ``trainer.resume`` is ``auto`` or ``never`` here: a checkpoint
path would be resumed by every request. ``trainer.dry_run=true`` prints the plan and request 1's
dry run (:func:`dry_run_sequence`) and writes nothing. A request cut off
mid-training resumes from its own checkpoints when it writes them (``trainer.save_every`` > 0).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.config import ConfigError
from pipeline.engine.distributed import with_default_override

log = logging.getLogger("pipeline.continual")

STEP_FILE = "continual_step.json"
UTILITY_SPLITS = ("real_authors", "world_facts")
# trainer.resume values a continual run accepts (pipeline/config.py: auto | never | <checkpoint path>)
RESUME_MODES = ("auto", "never")


def check_requests(cfg: DictConfig) -> list[str]:
    """The request list, validated (non-empty, no repeats, none equal to the retain split)."""
    reqs = [str(r) for r in (cfg.continual.requests or [])]
    if not reqs:
        raise ConfigError("config error at 'continual.requests': empty; give the forget splits in order, "
                          "e.g. continual.requests=[forget10_part1,forget10_part2]")
    dup = sorted({r for r in reqs if reqs.count(r) > 1})
    if dup:
        raise ConfigError(f"config error at 'continual.requests': repeated request(s) {dup}")
    if cfg.data.retain_split in reqs:
        raise ConfigError(f"config error at 'continual.requests': {cfg.data.retain_split!r} is the retain split "
                          "(data.retain_split); the retain set must not overlap any request")
    if not cfg.trainer.export:
        raise ConfigError("config error at 'trainer.export': continual unlearning needs each request's exported "
                          "model (trainer.export=true)")
    if str(cfg.trainer.resume) not in RESUME_MODES:
        # a checkpoint path would be resumed by every request (each has its own run directory and
        # checkpoints; request 2 would start from request 1's weights and optimizer state again)
        raise ConfigError(f"config error at 'trainer.resume': {cfg.trainer.resume!r} is a checkpoint path; continual "
                          f"unlearning resumes each request from its own checkpoints: use trainer.resume=auto "
                          f"(the default) or trainer.resume=never")
    return reqs


def eval_splits(cfg: DictConfig, requests: list[str]) -> list[str]:
    """Splits evaluated after each request: ``continual.eval_splits`` or every request + the
    configured eval splits except the config's own ``data.forget_split`` (replaced by the requests)."""
    if cfg.continual.eval_splits:
        out = [str(s) for s in cfg.continual.eval_splits]
    else:
        out = list(requests) + [str(s) for s in cfg.data.eval_splits
                                if s != cfg.data.forget_split and s not in requests]
    if cfg.data.retain_split not in out:
        out.append(str(cfg.data.retain_split))
    return list(dict.fromkeys(out))


def _ensure_synthetic_splits(data_dir: Path, synthetic_cfg: Any, needed: list[str], out_dir: Path) -> Path:
    """The synthetic data directory holding every ``needed`` split. A cache built before a split was
    added to the benchmark lacks its file: then the benchmark (deterministic from its config, so the
    same rows the cached models were trained on) is written to ``out_dir`` and used instead."""
    if all((data_dir / f"{s}.jsonl").exists() for s in needed):
        return data_dir
    from pipeline.data.prepare import _as_dataclass
    from pipeline.data.synthetic import SyntheticConfig, write_benchmark

    # unknown split names were refused before (check_request_splits). Every rank may write: each file
    # is written atomically and the content is identical.
    write_benchmark(_as_dataclass(synthetic_cfg, SyntheticConfig), out_dir)
    return out_dir


def check_request_splits(cfg: DictConfig, splits: list[str]) -> None:
    """Every split the sequence reads exists, checked before request 1 trains and by a dry run (a typo in
    request 3 stopped the sequence after two requests had trained; a dry run passed it): the embedded
    benchmark's split names, a ``data.name=json`` directory's files (the loader's one-line DataError).
    Other datasets are found by reading them."""
    needed = list(dict.fromkeys([*splits, str(cfg.data.retain_split)]))
    if cfg.data.name == "synthetic":
        from pipeline.data.synthetic import SPLITS

        unknown = [s for s in needed if s not in SPLITS]
        if unknown:  # a typo, not an out-of-date cache (_ensure_synthetic_splits writes the benchmark anew)
            raise ConfigError(f"config error at 'continual.requests': {unknown} is not a split of the embedded "
                              f"benchmark; its splits: {sorted(SPLITS)}")
    elif cfg.data.name == "json":
        from pipeline.data.common import find_split_file
        from pipeline.data.loaders import json_data_dir

        for split in needed:
            find_split_file(json_data_dir(cfg.data), split, f"json:{cfg.data.path}")


def base_model(cfg: DictConfig, run_dir: Path, splits: list[str]) -> dict:
    """Request 1's starting point as ``pretrained``/``json`` overrides (synthetic and gguf_package
    resolved here, as :func:`pipeline.inputs.resolve_paths` resolves them)."""
    if cfg.model.source == "gguf_package":
        from pipeline.models.gguf_package import prepare_gguf_model

        # every request runs as model.source=pretrained (model.path is what it starts from): request 1
        # starts from the converted directory (converted once, cached; locked against other ranks)
        model_dir = str(prepare_gguf_model(str(cfg.model.gguf_package), Path(cfg.cache_dir), cfg.model.gguf_file,
                                           log=log.info))
        return {"model.path": model_dir, "model.tokenizer_path": cfg.model.tokenizer_path or model_dir,
                "data": {}, "retain_model": cfg.eval.retain_model}
    if cfg.model.source != "synthetic":
        return {"model.path": str(cfg.model.path), "model.tokenizer_path": cfg.model.tokenizer_path,
                "data": {}, "retain_model": cfg.eval.retain_model}
    from pipeline.data.prepare import prepare_synthetic

    art = prepare_synthetic(cfg.data.synthetic, cfg.model.tiny, Path(cfg.cache_dir))
    model = art.target_dir if cfg.model.variant == "target" else art.retain_dir
    data_dir = _ensure_synthetic_splits(Path(art.data_dir), cfg.data.synthetic, splits, run_dir / "data")
    return {"model.path": str(model), "model.tokenizer_path": str(art.tokenizer_dir),
            "data": {"name": "json", "path": str(data_dir)}, "retain_model": cfg.eval.retain_model or str(art.retain_dir)}


def request_config(cfg: DictConfig, base: dict, i: int, request: str, init_model: str, splits: list[str]) -> DictConfig:
    """The train_job config of request ``i`` (0-based), starting from ``init_model``."""
    c = copy.deepcopy(cfg)  # keeps the typed schema
    run_name = str(cfg.run_name)
    with open_dict(c):
        c.model.source = "pretrained"
        c.model.path = init_model
        # The tokenizer travels with each exported model; request 1 may name a separate one.
        c.model.tokenizer_path = base["model.tokenizer_path"] if i == 0 else None
        for k, v in base["data"].items():
            c.data[k] = v
        c.data.forget_split = request
        c.data.eval_splits = list(splits)
        c.eval.splits = None
        c.eval.retain_model = base["retain_model"]
        c.run_name = f"{run_name}/{step_name(i, request)}"
        c.continual.requests = []  # the request's own job is a plain run
    return c


def step_name(i: int, request: str) -> str:
    return f"r{i + 1}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', request)}"


def _split_means(details: dict, split: str) -> Optional[dict]:
    d = details.get(split)
    if not isinstance(d, dict) or "truth_ratio" not in d:
        return None  # not a TOFU-style split (MUSE / WMDP details differ)
    from pipeline.eval.tofu import SplitResult

    return SplitResult(**d).means()


def retain_references(steps: list[tuple[int, str, Path, str]]) -> dict[str, list[float]]:
    """The retain model's truth ratios on each request's forget split, from the file the request's
    evaluation used (``results.json`` → ``evaluation.retain_reference.file``, a cache file keyed by
    the retain model's fingerprint; :mod:`pipeline.eval.reference`). Splits without one are absent."""
    from pipeline.eval.reference import read_truth_ratios

    out: dict[str, list[float]] = {}
    for i, name, run_dir, _ in steps:
        res_file = run_dir / "results.json"
        if i < 0 or not res_file.exists():
            continue
        info = (json.loads(res_file.read_text()).get("evaluation") or {}).get("retain_reference") or {}
        if info.get("file") and Path(info["file"]).exists():
            out[name] = read_truth_ratios(info["file"])
    return out


def _num(v: Any) -> Optional[float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
        return float(v)
    return None


def summarise_step(i: int, request: str, requests: list[str], init_model: str, run_dir: Path,
                   references: dict[str, list[float]]) -> dict:
    """One row of ``continual.json`` from a finished request's ``results.json`` / ``eval_details.json``."""
    from pipeline.eval.metrics import forget_quality_ks

    res = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else {}
    details = json.loads((run_dir / "eval_details.json").read_text()) if (run_dir / "eval_details.json").exists() else {}
    m = res.get("metrics", {})
    per_request = {}
    for j, split in enumerate(requests):
        means = _split_means(details, split)
        if means is None:
            continue
        entry = {
            "requested": j <= i,  # already unlearned at this point of the sequence
            "fact_recall": _num(means["fact_recall"]),
            "rouge_l": _num(means["rouge_l_recall"]),
            "prob": _num(means["prob"]),
            "truth_ratio": _num(means["truth_ratio_closer_to_1"]),
            "well_formed": _num(means["well_formed"]),
            "forget_quality": None,
        }
        ref = references.get(split)
        if ref is not None:
            entry["forget_quality"] = _num(forget_quality_ks(details[split]["truth_ratio"], ref))
        per_request[split] = entry
    return {
        "request": i + 1,  # 0: the starting model, before any request
        "forget_split": request if i >= 0 else None,  # None on the starting model's row
        "run_dir": str(run_dir),
        "init_model": init_model,
        "model": str(run_dir / "model") if i >= 0 else init_model,
        "method": res.get("method"),
        "tau": res.get("tau"),
        "steps": res.get("steps"),
        "resumed_from": res.get("resumed_from"),  # the checkpoint its last attempt started from (null: the start)
        "train_seconds": res.get("train_seconds"),
        "metrics": m,  # the request's own results.json metrics (forget = this request)
        "forget": per_request,  # every request's forget split, evaluated after this request
        "retain": {k: m.get(k) for k in ("retain_fact_recall", "retain_rouge_l", "retain_prob",
                                         "retain_truth_ratio", "model_utility", "real_authors_fact_recall",
                                         "world_facts_fact_recall") if k in m},
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if v != 0 and abs(v) < 1e-3 else f"{v:.3f}"
    return str(v)


def requests_done(rows: list[dict]) -> int:
    """How many requests ``rows`` (the starting model's row, then one per request trained) cover."""
    return sum(1 for r in rows if r["forget_split"] is not None)


def render_md(rows: list[dict], requests: list[str]) -> str:
    """``continual.md``: the sequence's rows so far, saying when requests are still to come (the table is
    rewritten after every request, so a stopped sequence leaves a partial one)."""
    done = requests_done(rows)
    head = ["#", "request", "forget facts", "forget quality"]
    head += [f"facts {s}" for s in requests] + ["retain facts", "utility", "well-formed"]
    lines = ["## Continual unlearning", "",
             f"Requests in order: {', '.join(requests)}. After each request the model is evaluated on every "
             "request's forget split (`*` = not yet requested) and on the retain / utility sets.", ""]
    if done < len(requests):
        lines += [f"**{done} of {len(requests)} requests done**: the sequence is running or stopped; a re-run of "
                  "the same command continues it.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r["metrics"]
        # the starting model is evaluated with request 1's forget split as its forget set, and labelled so
        # (as in the stdout summary): its forget columns are that split's, before any request
        label = r["forget_split"] or f"{requests[0]} (starting model)"
        cells = [str(r["request"]), label, _fmt(m.get("forget_fact_recall")), _fmt(m.get("forget_quality"))]
        for s in requests:
            e = r["forget"].get(s)
            cells.append("-" if e is None else _fmt(e["fact_recall"]) + ("" if e["requested"] else "*"))
        cells += [_fmt(m.get("retain_fact_recall")), _fmt(m.get("model_utility")), _fmt(m.get("forget_well_formed"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Forget quality per request split and step (KS p-value vs the retain model; `-` = no retain "
              "model or no cached reference):", ""]
    lines += ["| # | " + " | ".join(requests) + " |", "|" + "---|" * (len(requests) + 1)]
    for r in rows:
        cells = [str(r["request"])] + [_fmt((r["forget"].get(s) or {}).get("forget_quality")) for s in requests]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SUMMARY_FILE = "continual_summary.json"


def sequence_summary(rows: list[dict], reused: set[str], run_dir: Path) -> dict:
    """The whole sequence's summary (``continual_summary.json``) from ``continual.json``'s rows: one
    row per step (0: the starting model, evaluated only) with its forget split, run directory, results
    files, the steps it trained, whether it was ``reused`` (found finished, not run again: its
    ``run_dir`` is in ``reused``) and the headline metrics a job's own stdout summary shows
    (:func:`pipeline.eval.report.headline_keys`, then forget quality, on its own line there)."""
    from pipeline.eval.report import RESULTS_FILE, headline_keys

    out = []
    for r in rows:
        d, m = Path(r["run_dir"]), r.get("metrics") or {}
        keys = headline_keys(m) + (["forget_quality"] if "forget_quality" in m else [])
        report = d / "report.md"
        out.append({"step": r["request"], "forget_split": r["forget_split"], "run_dir": str(d),
                    "reused": str(d) in reused, "steps": r.get("steps"), "resumed_from": r.get("resumed_from"),
                    "results": str(d / RESULTS_FILE),
                    "report": str(report) if report.exists() else None, "metrics": {k: m[k] for k in keys}})
    return {"run_dir": str(run_dir), "requests": [r["forget_split"] for r in rows if r["forget_split"] is not None],
            "continual_json": str(run_dir / "continual.json"), "continual_md": str(run_dir / "continual.md"),
            "rows": out}


def render_sequence_summary(summary: dict) -> str:
    """:func:`sequence_summary` as a few lines for stdout: one table row per step."""
    from pipeline.eval.report import comparison_table

    root = Path(summary["run_dir"])
    keys = list(dict.fromkeys(k for s in summary["rows"] for k in s["metrics"]))
    table = []
    for s in summary["rows"]:
        trained = ("reused" if s["reused"] else "evaluated" if s["forget_split"] is None
                   else f"{s['steps']} step{'' if s['steps'] == 1 else 's'}" if s["steps"] is not None else "-")
        resumed = s.get("resumed_from")
        if not s["reused"] and isinstance(resumed, dict):  # a stopped step continued from its checkpoint
            trained += f" (resumed at step {resumed.get('step')})"
        d = Path(s["run_dir"])
        # the starting model is evaluated with request 1's forget split as its forget set: its forget_*
        # columns are that split's, before any request (continual.md gives them in request 1's column)
        forget_set = s["forget_split"] or (f"{summary['requests'][0]} (starting model)" if summary["requests"]
                                           else "(starting model)")
        table.append({"step": s["step"], "forget set": forget_set, "trained": trained,
                      "run dir": str(d.relative_to(root)) if d.is_relative_to(root) else str(d),
                      "metrics": s["metrics"]})
    lines = [f"continual run: {root} ({len(summary['requests'])} request{'' if len(summary['requests']) == 1 else 's'}: "
             f"{', '.join(summary['requests'])})",
             comparison_table(table, ["step", "forget set", "trained", *keys, "run dir"]),
             f"per-step results: <run dir>/results.json (report.md beside it), run dirs under {root}",
             f"all steps: {summary['continual_md']}, {summary['continual_json']}; this summary: {root / SUMMARY_FILE}"]
    return "\n".join(lines)


def step_rows(step_cfg: DictConfig, memo: Optional[dict] = None) -> dict:
    """Digests of the rows a step trains and evaluates on (``forget``, ``retain``, ``eval``: one per
    split), read as its job reads them (:func:`pipeline.finished.job_key` keys a finished job by the
    same digests): its config names only split files, whose rows may be edited between runs. ``memo``:
    digests already read in this invocation, by data settings (the starting model's evaluation and
    request 1 read the same rows)."""
    from pipeline.data.loaders import load_unlearning_data
    from pipeline.eval.parts import rows_digest
    from pipeline.inputs import resolve_paths

    data_dir = resolve_paths(step_cfg).data_dir
    key = json.dumps([OmegaConf.to_container(step_cfg.data, resolve=True), int(step_cfg.seed), str(data_dir)],
                     sort_keys=True, default=str)
    if memo is not None and key in memo:
        return memo[key]
    data = load_unlearning_data(step_cfg.data, int(step_cfg.seed), data_dir=data_dir)
    out = {"forget": rows_digest(data.forget), "retain": rows_digest(data.retain),
           "eval": {split: rows_digest(rows) for split, rows in sorted(data.eval.items())}}
    if memo is not None:
        memo[key] = out
    return out


def step_record(request: str, init_model: str, step_cfg: DictConfig, rows: Optional[dict] = None,
                evaluation_only: bool = False) -> dict:
    """What a finished step's marker holds: the request, the model it started from, a digest of
    its configuration (without the settings that change no result, as a finished job's record) and
    of that model's files, and its rows' digests (:func:`step_rows`). A step reruns when any of them
    changed: its settings, its rows, or the model it starts from (an earlier step that ran again), or
    the evaluated splits (a request added). ``evaluation_only``: the starting model's evaluation,
    which no training setting changes (:data:`TRAINING_ONLY` left out of its digest)."""
    from pipeline.eval.reference import model_fingerprint
    from pipeline.finished import result_config

    # the first step starts from model.path at model.revision (a hub id's snapshot); later ones from a
    # step's exported directory, which has no revisions
    config, init = result_config(step_cfg), model_fingerprint(init_model, OmegaConf.select(step_cfg, "model.revision"))
    if evaluation_only:  # another lr re-evaluated the unchanged starting model
        config = {k: v for k, v in config.items() if not k.startswith(TRAINING_ONLY)}

    def digest(fields: dict) -> str:
        return hashlib.sha256(json.dumps({"config": fields, "init": init}, sort_keys=True, default=str).encode()).hexdigest()

    # train_key: what the trained weights depend on (the evaluated splits and settings do not), so a
    # step whose training inputs changed trains from the start instead of resuming a stale checkpoint
    training = {k: v for k, v in config.items() if not k.startswith(EVAL_ONLY)}
    # rows kept beside the digests (not in them): a record written before rows were kept keeps its
    # train_key, so its checkpoints are not discarded; it is not "finished" (its rows are unknown)
    return {"request": request, "init_model": init_model, "key": digest(config), "train_key": digest(training),
            "rows": rows}


# Settings that change what a step measures, not what it trains (its checkpoints stay valid).
EVAL_ONLY = ("eval.", "data.eval_splits")
# Settings that change what a step trains, not how a model is evaluated (the starting model's row).
TRAINING_ONLY = ("trainer.", "method.")


def _earlier_record(step_dir: Path) -> Optional[dict]:
    """The step record ``step_dir`` holds (:func:`step_record`), or None: none yet, or cut short."""
    try:
        earlier = json.loads((step_dir / STEP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return earlier if isinstance(earlier, dict) else None


def _trained_with_other_inputs(earlier: Optional[dict], record: dict) -> bool:
    """Whether the step that wrote ``earlier`` was trained with other training inputs than
    ``record``'s: settings, starting model, forget / retain rows (its checkpoints must not be
    resumed). A record without ``train_key`` / ``rows`` (written before they were kept) or none at
    all: False on that part (checkpoint_meta still refuses a resume with other training settings or rows)."""
    if earlier is None:
        return False
    if "train_key" in earlier and earlier["train_key"] != record["train_key"]:
        return True
    then, now = earlier.get("rows"), record.get("rows")
    return isinstance(then, dict) and isinstance(now, dict) and any(then.get(k) != now.get(k)
                                                                    for k in ("forget", "retain"))


def discard_checkpoints(step_dir: Path) -> None:
    """Remove a step's checkpoints trained from other inputs before it trains from the start.

    ``trainer.resume=never`` alone is not enough: the step's record is removed when it starts, so an
    attempt stopped before its first new checkpoint (preempted, Ctrl-C) would leave a re-run nothing
    saying "train from the start" and it would resume the stale checkpoint (refused for its other lr,
    or resumed where the change is not in the checkpoint's meta). The directory is renamed first so a
    crash mid-delete never leaves a half-deleted checkpoint where a resume looks."""
    ckpts = step_dir / "checkpoints"
    stale = step_dir / "checkpoints.stale"
    if stale.exists():
        shutil.rmtree(stale)  # an earlier discard that stopped after its rename
    if ckpts.exists():
        ckpts.rename(stale)
        shutil.rmtree(stale)
        log.info("continual: removed %s (trained from other inputs)", ckpts)


def _finished(step_dir: Path, earlier: Optional[dict], record: dict, need_model: bool, resume: str) -> bool:
    """Whether ``step_dir``, whose record is ``earlier``, holds this very step, finished
    (``trainer.resume=never`` runs it again). ``train_key``, added later, is not compared: an earlier
    record without it still matches. ``rows`` is: a record without them says nothing of its rows."""
    if earlier is None or resume == "never" or any(earlier.get(k) != record.get(k)
                                                    for k in ("request", "init_model", "key", "rows")):
        return False
    return (step_dir / "model" / "config.json").exists() if need_model else (step_dir / "results.json").exists()


def continual_job(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run the request sequence in ``run_dir``; returns the ``continual.json`` object (rank 0) or {}."""
    from pipeline.config import validate
    from pipeline.engine.distributed import init_distributed

    run_dir = Path(run_dir)
    requests = check_requests(cfg)
    validate(cfg)
    splits = eval_splits(cfg, requests)
    check_request_splits(cfg, [*requests, *splits])
    if cfg.trainer.dry_run:  # before anything is prepared (synthetic build, GGUF conversion), loaded or written
        return dry_run_sequence(cfg, run_dir, requests, splits)
    init_distributed(cfg.deepspeed.timeout_minutes)
    from pipeline.engine.run_lock import run_dir_lock

    # one launch at a time runs the sequence: a second one re-evaluated the starting model into the
    # same r0_initial/ (each request's train_job also holds its own directory)
    with run_dir_lock(run_dir):
        return _run_sequence(cfg, run_dir, requests, splits)


def _run_sequence(cfg: DictConfig, run_dir: Path, requests: list[str], splits: list[str]) -> dict:
    """:func:`continual_job` past its checks, holding the sequence's directory."""
    from pipeline.engine.checkpoint import CheckpointError
    from pipeline.engine.distributed import broadcast_object, is_main_process
    from pipeline.eval.runner import eval_job
    from pipeline.io import atomic_write_json, atomic_write_text
    from pipeline.run import train_job

    base = base_model(cfg, run_dir, splits)
    init_model = base["model.path"]
    rows_read: dict = {}  # step_rows by data settings: each split set is read once per invocation
    # (index, name, step dir, initial model of the step); index -1 = the starting model, evaluated only
    steps: list[tuple[int, str, Path, str]] = []
    resume = str(cfg.trainer.resume)
    reused: set[str] = set()  # the step directories found finished (not run again)

    def write_summary() -> list[dict]:
        # All rows are rebuilt each time: a retain-model reference cached by a later request fills
        # in the forget quality of that split in earlier rows too.
        refs = retain_references(steps)
        rows = [summarise_step(i, name, requests, init, d, refs) for i, name, d, init in steps]
        out = {"requests": requests, "requests_done": requests_done(rows), "eval_splits": splits,
               "retain_split": str(cfg.data.retain_split),
               "method": OmegaConf.to_container(cfg.method, resolve=True), "rows": rows}
        atomic_write_json(run_dir / "continual.json", out)  # after every request: partial results survive
        atomic_write_text(run_dir / "continual.md", render_md(rows, requests))
        return rows

    if cfg.continual.eval_initial:
        step_dir = run_dir / "r0_initial"
        step_cfg = request_config(cfg, base, 0, requests[0], init_model, splits)
        record = step_record("initial", init_model, step_cfg, step_rows(step_cfg, rows_read), evaluation_only=True)
        if _finished(step_dir, _earlier_record(step_dir), record, need_model=False, resume=resume):
            reused.add(str(step_dir))
        else:
            log.info("continual: evaluating the starting model %s", init_model)
            eval_job(step_cfg, step_dir)
            if is_main_process():
                atomic_write_json(step_dir / STEP_FILE, record)
        steps.append((-1, "initial", step_dir, init_model))
        if is_main_process():  # "0 of N requests done", with the starting model's row, from here on
            write_summary()

    for i, request in enumerate(requests):
        step_dir = run_dir / step_name(i, request)
        step_cfg = request_config(cfg, base, i, request, init_model, splits)
        record = step_record(request, init_model, step_cfg, step_rows(step_cfg, rows_read))
        earlier = _earlier_record(step_dir)
        if _finished(step_dir, earlier, record, need_model=True, resume=resume):
            log.info("continual request %d/%d (%s): already finished in %s", i + 1, len(requests), request, step_dir)
            reused.add(str(step_dir))
        else:
            if _trained_with_other_inputs(earlier, record):
                # another lr, or another starting model (an earlier step that trained again): its
                # checkpoints hold weights trained from other inputs; resuming one would report them
                log.info("continual request %d/%d (%s): its training settings, forget / retain rows or starting model "
                         "changed since it ran: training it from the start (its earlier checkpoints are removed, not resumed)", i + 1,
                         len(requests), request)
                with open_dict(step_cfg):
                    step_cfg.trainer.resume = "never"
                problem = None
                if is_main_process():
                    try:
                        discard_checkpoints(step_dir)
                    except OSError as e:  # said on every rank: the others would wait at a collective
                        problem = f"cannot remove {step_dir / 'checkpoints'} (trained from other inputs): {e}"
                # also the barrier: no rank saves into the directory before the old checkpoints are gone
                if broadcast_object(problem):
                    raise CheckpointError(problem, every_rank=True)
            elif (step_dir / STEP_FILE).exists():
                log.info("continual request %d/%d (%s): its evaluated splits, their rows or evaluation settings changed "
                         "since it ran (or trainer.resume=never): running it again (it resumes at its last step when it kept "
                         "a checkpoint there, trainer.save_every > 0; otherwise it trains again)", i + 1,
                         len(requests), request)
            log.info("continual request %d/%d: forget %s, starting from %s", i + 1, len(requests), request, init_model)
            if is_main_process():  # the step is not finished until it writes its record again
                (step_dir / STEP_FILE).unlink(missing_ok=True)
            train_job(step_cfg, step_dir)
            if is_main_process():
                atomic_write_json(step_dir / STEP_FILE, record)
        steps.append((i, request, step_dir, init_model))
        rows = write_summary() if is_main_process() else []
        init_model = str(step_dir / "model")
    if not is_main_process():
        return {}
    summary = sequence_summary(rows, reused, run_dir)
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
    log.info("continual unlearning finished: %s", run_dir / "continual.md")
    print(render_sequence_summary(summary), flush=True)  # stdout carries results (logs go to stderr)
    return json.loads((run_dir / "continual.json").read_text())


def _starting_model(cfg: DictConfig) -> str:
    """Request 1's starting model as configured (a dry run resolves nothing)."""
    m = cfg.model
    if m.source == "synthetic":
        return f"the embedded benchmark's {m.variant} model"
    if m.source == "gguf_package":
        return f"model.gguf_package={m.gguf_package} ({m.gguf_file or 'its GGUF file'}, converted into cache_dir)"
    return f"model.path={m.path}"


def dry_run_sequence(cfg: DictConfig, run_dir: Path, requests: list[str], splits: list[str]) -> dict:
    """``trainer.dry_run=true``: the requests' plan (rank 0), then request 1's own dry run
    (:func:`pipeline.run.train_job` with ``trainer.dry_run``: its checks and memory plan, sized from
    the configured model; later requests train the same architecture from the previous export).
    Nothing is prepared, loaded, trained or written; returns {}."""
    from pipeline.engine.distributed import is_main_process
    from pipeline.run import train_job

    if is_main_process():
        lines = [f"continual dry run of {run_dir}: {len(requests)} request{'' if len(requests) == 1 else 's'}, "
                 f"each a training job in its own run directory"]
        if cfg.continual.eval_initial:
            lines.append(f"  0: evaluate the starting model -> {run_dir / 'r0_initial'}")
        for i, request in enumerate(requests):
            start = _starting_model(cfg) if i == 0 else f"request {i}'s export {run_dir / step_name(i - 1, requests[i - 1])}/model"
            lines.append(f"  {i + 1}: forget {request} -> {run_dir / step_name(i, request)}, starting from {start}")
        lines += [f"evaluated after each request: {', '.join(splits)} (retain split {cfg.data.retain_split})",
                  f"request 1's dry run ({requests[0]}):"]
        print("\n".join(lines), flush=True)
    # request 1 as train_job would get it, its model left as configured: request_config would resolve
    # it (build the synthetic benchmark, convert a GGUF), which a dry run must not
    c = copy.deepcopy(cfg)
    with open_dict(c):
        c.data.forget_split = requests[0]
        c.data.eval_splits = list(splits)
        c.eval.splits = None
        c.run_name = f"{cfg.run_name}/{step_name(0, requests[0])}"
        c.continual.requests = []
    train_job(c, run_dir / step_name(0, requests[0]))
    return {}


def default_run_name(argv: list[str]) -> list[str]:
    """Launcher helper: without an explicit ``run_name=``, continual runs go to
    ``<output_dir>/<exp_name>/continual_<method>`` (not the plain run's directory)."""
    return with_default_override(argv, "run_name", "${exp_name}/continual_${method.name}")
