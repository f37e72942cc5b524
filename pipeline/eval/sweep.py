"""Sweep reports: gather a Hydra multirun's ``results.json`` files into one table, a
forget-vs-utility Pareto plot, and the best setting under a configurable rule.

Layout read (``conf/config.yaml``): ``runs/sweeps/<exp_name>/<override_dirname>/results.json``
with Hydra's ``.hydra/overrides.yaml`` beside it; a point's settings are those its ``results.json``
records (``provenance.overrides``), else its ``.hydra/``'s. A point whose directory has a Hydra config but
no ``results.json`` is reported as ``missing`` (still running, killed) or ``failed`` (its log
shows an error, or its ``results.json`` is unreadable); neither stops the report. The jobs the
latest sweep launched are read from its ``multirun.yaml`` (Hydra's basic sweeper): one without a
directory is listed as never started. A SLURM job that failed before its Hydra log existed (its
Python environment, the node, the time limit) is found through the submitit folder
(``.submitit/<job id>/``): its error line comes from the job's ``*_log.err``.

Rule syntax (``--rule``): ``[max:|min:|zero:]<objective>[,<constraint metric>>=<factor>]``, e.g.
TOFU's default ``forget_quality,model_utility>=0.95``: among the completed points whose
``model_utility`` is at least 0.95 × the reference utility, take the one with the best
``forget_quality`` (direction from :func:`~pipeline.eval.report.metric_info`: higher is better for
forget quality, lower for fact recall, VerbMem or WMDP accuracy, closest to 0 for PrivLeak;
``max:``/``min:``/``zero:`` override it). The reference utility is the target model's (``--target``
results.json) when given, else the best utility among the sweep's points. Ties go to higher
utility, then to the earlier point (points in the sweep's job order, else by their overrides with numbers
compared as numbers: τ = 2.0 before 10.0). When no point has the objective metric (e.g.
``forget_quality`` is null without a retain model), the plot's forget metric is used instead and
the report says so.

Without ``--rule``/``--x``/``--y`` the defaults follow the metrics the sweep's runs have
(:func:`family_defaults`): TOFU-style QA ``forget_quality,model_utility>=0.95`` on fact recall vs
model utility; MUSE ``verbmem_forget,knowmem_retain>=0.95`` on VerbMem vs KnowMem retain; WMDP
``wmdp-bio_accuracy,mmlu_accuracy>=0.95`` (the first ``wmdp-*`` split present) on that accuracy vs MMLU.
"""

from __future__ import annotations

import io
import json
import math
import pickletools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.eval.report import (
    METRIC_INFO,
    PREVIOUS_RESULTS_FILE,
    RESULTS_FILE,
    comparison_markdown,
    comparison_table,
    direction_score,
    format_value,
    metric_info,
)
from pipeline.io import atomic_write_bytes, atomic_write_json, atomic_write_text

DEFAULT_RULE = "forget_quality,model_utility>=0.95"  # TOFU-style QA runs (family_defaults for the others)
FORGET_AXIS_CANDIDATES = ("forget_fact_recall", "forget_quality", "forget_rouge_l", "forget_prob")
UTILITY_AXIS = "model_utility"
MUSE_RULE, MUSE_X, MUSE_Y = "verbmem_forget,knowmem_retain>=0.95", "verbmem_forget", "knowmem_retain"
MCQ_UTILITY = "mmlu_accuracy"
TABLE_METRICS = ("forget_fact_recall", "retain_fact_recall", "model_utility", "forget_quality", "forget_rouge_l",
                 "forget_well_formed")
_FAIL_PATTERNS = ("Traceback (most recent call last)", "Error executing job", "error (")
# written into a job's log as each attempt starts (launchers/_bootstrap.run_main); Hydra appends one
# attempt's lines to the earlier ones', so only what follows the last of these says how this one went
ATTEMPT_STARTED = "job attempt started"
RUN_DIR_IN_USE = "error (RunDirInUseError"  # pipeline.engine.run_lock's refusal of a second launch

_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# lines of a SLURM job's stderr that say why it ended, most telling first: our error line, Python's
# exception line, SLURM's own (cancelled, time limit, out of memory), srun's exit code
# submitit's log lines: an attempt's start, and its requeue (submitit/core/submission.py, slurm/slurm.py)
_SUBMITIT_START = "Starting with "
_SUBMITIT_REQUEUED = "Requeued job "
_SLURM_ERRORS = tuple(re.compile(p) for p in (
    r"error \(\w+, rank \d+\): .*", r"[\w.]*(Error|Exception|Interrupt|Exit)(: .*)?",
    r".*(CANCELLED|TIME LIMIT|[Oo]ut[ -]of[ -]memory|oom[-_]kill).*", r"(srun|slurmstepd): error.*"))


@dataclass
class SweepPoint:
    name: str  # the subdirectory (Hydra's override_dirname), relative to the sweep dir
    path: Path
    status: str  # ok | missing | failed
    overrides: dict[str, str] = field(default_factory=dict)
    results: Optional[dict] = None
    note: str = ""
    job: Optional[int] = None  # its job number in the latest sweep (multirun.yaml); None: an earlier sweep's
    _config: Any = field(default=None, repr=False, compare=False)  # its config.yaml, read on first use

    @property
    def metrics(self) -> dict:
        return (self.results or {}).get("metrics", {}) or {}

    def setting(self, key: str) -> str:
        """The value of ``key`` this point ran with: its override, else (a point from a sweep that did
        not sweep ``key``) the value in its resolved ``config.yaml``, marked "(default)" (a config group
        such as ``method`` by its ``name``); "-" when unknown."""
        if key in self.overrides:
            return self.overrides[key]
        from omegaconf import OmegaConf

        if self._config is None:
            try:
                self._config = OmegaConf.load(self.path / "config.yaml")
            except Exception:  # noqa: BLE001  (no config: a missing point; a damaged one: the report goes on)
                self._config = OmegaConf.create({})
        value = OmegaConf.select(self._config, key, default=None)
        if OmegaConf.is_config(value):
            value = value.get("name") if OmegaConf.is_dict(value) else None
        return "-" if value is None else f"{value} (default)"

    def metric(self, key: str) -> Optional[float]:
        v = self.metrics.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        try:
            v = float(v)  # an int past float's range (a damaged file) raises here, not in the report
        except OverflowError:
            return None
        return v if math.isfinite(v) else None


@dataclass
class Rule:
    objective: str
    direction: str  # "up" (max), "down" (min), "0" (closest to 0); "1" (closest to 1) from METRIC_INFO only
    constraint: Optional[str] = None
    factor: float = 0.0

    @property
    def text(self) -> str:
        prefix = _PREFIX.get(self.direction)  # "1": the metric's own direction, no prefix says it
        s = f"{prefix}:{self.objective}" if prefix else self.objective
        return s + (f",{self.constraint}>={self.factor:g}" if self.constraint else "")


_PREFIX = {"up": "max", "down": "min", "0": "zero"}


def objective_direction(metric: str) -> str:
    """The direction a rule without a prefix optimises ``metric`` in (informational metrics: up)."""
    return metric_info(metric)[0] or "up"


def parse_rule(text: str) -> Rule:
    """``[max:|min:|zero:]metric[,metric>=factor]`` (see the module docstring); metric names may hold
    ``-`` (a multiple-choice split's accuracy, ``wmdp-bio_accuracy``)."""
    text = text.strip()
    name = r"[A-Za-z0-9_-]+"
    m = re.fullmatch(rf"(?:(max|min|zero):)?({name})(?:\s*,\s*({name})\s*>=\s*([0-9.eE+-]+))?", text)
    if not m:
        raise ValueError(f"cannot parse rule {text!r}; expected '[max:|min:|zero:]metric[,metric>=factor]', "
                         f"e.g. {DEFAULT_RULE!r}")
    how, obj, cons, factor = m.groups()
    direction = {v: k for k, v in _PREFIX.items()}[how] if how else objective_direction(obj)
    return Rule(obj, direction, cons, float(factor) if factor else 0.0)


# -- gathering ------------------------------------------------------------------------------------

def parse_override_dirname(name: str) -> dict[str, str]:
    """``method.tau=1.5,trainer.max_steps=2`` → {"method.tau": "1.5", "trainer.max_steps": "2"}
    (Hydra's ``override_dirname``: ``key=value`` joined by ``,``; a piece without ``=`` belongs to
    the previous value, e.g. a list ``[a,b]``)."""
    out: dict[str, str] = {}
    last = None
    for piece in name.split(","):
        if "=" in piece and not (last and out[last].count("[") > out[last].count("]")):
            k, v = piece.split("=", 1)
            out[k] = v
            last = k
        elif last is not None:
            out[last] += "," + piece
    return out


def _read_overrides(d: Path) -> Optional[dict[str, str]]:
    p = d / ".hydra" / "overrides.yaml"
    if not p.exists():
        return None
    try:
        import yaml

        return _override_dict(yaml.safe_load(p.read_text()) or [])
    except Exception:  # a half-written file: fall back to the directory name
        return None


def _recorded_overrides(results: Optional[dict]) -> Optional[dict[str, str]]:
    """The command-line overrides a ``results.json`` records (``provenance.overrides``); None when it
    has none (written before they were recorded, or outside a Hydra launch)."""
    recorded = ((results or {}).get("provenance") or {}).get("overrides")
    return _override_dict(recorded) if isinstance(recorded, list) else None


def _failed(d: Path) -> str:
    for log in sorted(d.glob("*.log")):
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        # this attempt's lines. An attempt refused because another launch held the directory is no attempt:
        # its start and refusal lines are dropped, and the lines after them (the running launch goes on
        # writing into the same log) belong to the attempt before it
        attempts = text.split(ATTEMPT_STARTED)
        text = attempts[0]
        for lines in attempts[1:]:
            if RUN_DIR_IN_USE in lines:
                text += "\n".join(ln for ln in lines.splitlines() if RUN_DIR_IN_USE not in ln)
            else:
                text = lines
        i = max(text.rfind(pat) for pat in _FAIL_PATTERNS)  # the latest
        if i >= 0:
            # from the first pattern on that line: an error's own message may hold one ("... error (x)")
            start = text.rfind("\n", 0, i) + 1
            line = text[start:].split("\n", 1)[0]
            first = min(line.find(p) for p in _FAIL_PATTERNS if p in line)  # i - start is one of them
            return f"{log.name}: {line[first:].splitlines()[0][:160]}"
    return ""


def sweep_jobs(config: Any) -> list[list[str]]:
    """Each job's overrides, in job-number order, as Hydra's basic sweeper expands them
    (``hydra.sweeper.params`` and the command line's sweeps), or ``[]`` for another sweeper (which
    expands them itself). ``config``: the sweep's config (``multirun.yaml``)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if config.hydra.sweeper.get("_target_") != _BASIC_SWEEPER:
        return []
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def _override_dict(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        k, _, v = str(it).partition("=")
        out[k.lstrip("+~")] = v
    return out


def expected_jobs(root: Path) -> list[list[str]]:
    """The overrides of every job the latest sweep into ``root`` launched (its ``multirun.yaml``),
    by job number; [] when unknown (no multirun.yaml, another sweeper, an unreadable file)."""
    path = root / "multirun.yaml"
    if not path.is_file():
        return []
    try:
        from omegaconf import OmegaConf

        jobs = sweep_jobs(OmegaConf.load(path))
    except Exception:  # a half-written or foreign file: the report still lists what it finds
        return []
    # a dry run of the sweep (`-m ... trainer.dry_run=true`) replaced the real sweep's file: its jobs
    # ran nothing, and the real sweep's job list is unknown now (its directories are still read)
    return [] if any(_is_dry_run(_override_dict(job)) for job in jobs) else jobs


def _is_dry_run(overrides: dict[str, str]) -> bool:
    return str(overrides.get("trainer.dry_run", "")).lower() in ("true", "1", "yes")


@dataclass
class SlurmJob:
    """One submitit submission in ``<sweep>/.submitit/<job id>/``."""

    job_id: str
    job_num: int  # Hydra's job number (hydra.job.num) the submission ran
    strings: frozenset  # the string constants of its pickle (the job's overrides among them)
    mtime: float
    error: str  # why it failed, from its stderr ("" when nothing says so)
    err_file: Optional[Path]


def _pickle_strings(path: Path) -> list[str]:
    """The string constants of a pickle, read without unpickling it (nothing in it runs)."""
    return [arg for op, arg, _ in pickletools.genops(path.read_bytes())
            if isinstance(arg, str) and "UNICODE" in op.name]


def _slurm_attempt(err: Path) -> list[str]:
    """The lines of a job task's stderr from its latest attempt on (after submitit's last ``Starting
    with`` line: a requeued job appends its next attempt to the same file)."""
    try:
        lines = [ln.strip() for ln in err.read_text(errors="replace").splitlines()]
    except OSError:
        return []
    starts = [i for i, ln in enumerate(lines) if _SUBMITIT_START in ln]
    return lines[starts[-1]:] if starts else lines


def _slurm_error(lines: list[str]) -> str:
    """The line of a job attempt's stderr that says why it ended: our own error line, else Python's last
    exception line, else SLURM's (a time limit, an out-of-memory kill, srun's exit code)."""
    for pattern in _SLURM_ERRORS:
        hits = [ln for ln in lines if pattern.fullmatch(ln)]
        if hits:
            return hits[-1][:200]
    return ""


def slurm_jobs(root: Path) -> list[SlurmJob]:
    """The submitit jobs of the sweeps into ``root`` (hydra-submitit-launcher's ``submitit_folder``
    ``<sweep>/.submitit/%j``). A job's number is the ``job_id_for_<num>`` argument the launcher
    pickled with it."""
    jobs = []
    for pkl in sorted((root / ".submitit").glob("*/*_submitted.pkl")):
        try:
            strings = _pickle_strings(pkl)
        except Exception:  # truncated or not a pickle: not a job this report can place
            continue
        nums = [int(m.group(1)) for s in strings if (m := re.fullmatch(r"job_id_for_(\d+)", s))]
        if len(nums) != 1:
            continue
        job_id = pkl.name.removesuffix("_submitted.pkl")
        errs = sorted(pkl.parent.glob(f"{job_id}_*_log.err"))
        attempts = [_slurm_attempt(f) for f in errs]
        # requeued (a preemption, a time limit with timeouts left): waiting for or running its next attempt,
        # not failed, though its last attempt's tasks ended with SLURM's error lines (exit codes 124 / 255)
        requeued = any(_SUBMITIT_REQUEUED in ln for lines in attempts for ln in lines)
        error = "" if requeued else next((e for e in map(_slurm_error, attempts) if e), "")
        jobs.append(SlurmJob(job_id, nums[0], frozenset(strings), pkl.stat().st_mtime, error,
                             errs[0] if errs else None))
    return jobs


def _slurm_job_for(jobs: list[SlurmJob], num: int, overrides: list[str]) -> Optional[SlurmJob]:
    """The newest submission of job ``num`` with these overrides (a re-launched sweep submits it again)."""
    mine = [j for j in jobs if j.job_num == num and all(o in j.strings for o in overrides)]
    return max(mine, key=lambda j: j.mtime, default=None)


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def gather(sweep_dir: str | Path) -> list[SweepPoint]:
    """Every sweep point under ``sweep_dir``: directories with a ``results.json`` or a Hydra
    ``.hydra/`` config (hidden directories such as ``.submitit`` are skipped)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {root} " + ("is not a directory" if root.exists() else "does not exist"))
    dirs: set[Path] = set()
    for p in root.rglob(RESULTS_FILE):
        if not _is_hidden(p.parent.relative_to(root)):
            dirs.add(p.parent)
    for p in root.rglob(".hydra"):
        if p.is_dir() and not _is_hidden(p.parent.relative_to(root)):
            dirs.add(p.parent)
    points = []
    expected = expected_jobs(root)
    slurm = slurm_jobs(root) if expected else []
    placed: set[int] = set()
    for d in sorted(dirs):
        name = d.relative_to(root).as_posix()
        if name == ".":
            name = d.name
        res_path = d / RESULTS_FILE
        res, unreadable = None, ""
        if res_path.exists():
            try:
                res = json.loads(res_path.read_text())
                if not isinstance(res, dict) or not isinstance(res.get("metrics"), dict):
                    raise ValueError("no 'metrics' object")
            except (ValueError, OSError, RecursionError) as exc:  # RecursionError: nested past json's depth
                res, unreadable = None, f"unreadable {RESULTS_FILE}: {exc}"
        # shown: the settings of the run whose results are there (a later launch into the directory, also
        # a refused one, rewrites .hydra/), else of the latest launch, else the directory's name; placed
        # among the latest sweep's jobs by the latest launch's (a re-launch that reuses a finished point's
        # results may add keys the directory name leaves out, e.g. trainer.resume=auto)
        launched = _read_overrides(d)
        recorded = _recorded_overrides(res)
        ov = recorded if recorded is not None else launched if launched is not None else parse_override_dirname(d.name)
        if not res_path.exists() and _is_dry_run(ov):
            continue  # a dry run's directory (its .hydra/ and log): nothing was meant to run there
        match = launched if launched is not None else ov
        num = next((i for i, job in enumerate(expected) if i not in placed and _override_dict(job) == match), None)
        if num is not None:
            placed.add(num)
        if res is not None:
            points.append(SweepPoint(name, d, "ok", ov, res,
                                     "" if res["metrics"] else "not evaluated (eval.enabled=false)", num))
            continue
        if unreadable:
            points.append(SweepPoint(name, d, "failed", ov, None, unreadable, num))
            continue
        why = _failed(d) or _slurm_failure(slurm, num, expected, root)
        note = why or f"no {RESULTS_FILE} (still running, not started, or killed)"
        if (d / PREVIOUS_RESULTS_FILE).exists():
            note += f"; an earlier run's results are kept in {PREVIOUS_RESULTS_FILE}"
        points.append(SweepPoint(name, d, "failed" if why else "missing", ov, None, note, num))
    for num, job in enumerate(expected):  # launched by the latest sweep, but no directory: never started
        if num in placed:
            continue
        why = _slurm_failure(slurm, num, expected, root)
        label = " ".join(o for o in job if _varies(o, expected)) or " ".join(job)
        points.append(SweepPoint(f"job {num} ({label})", root, "failed" if why else "missing", _override_dict(job),
                                 None, why or "not started (listed in multirun.yaml; no run directory yet)", num))
    # the sweep's own order (job number), else numbers as numbers: "method.tau=10.0" after 2.0, not
    # before it (string order), which decided the table's rows and a rule's ties ("the earlier point")
    points.sort(key=lambda p: (p.job is None, p.job or 0, _natural_key(p.name)))
    return points


def _natural_key(text: str) -> list[tuple]:
    """``text`` split into numbers (compared as numbers) and the rest (as text)."""
    parts = re.split(r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", text)
    return [(0, float(t), "") if i % 2 else (1, 0.0, t) for i, t in enumerate(parts)]


def _varies(override: str, jobs: list[list[str]]) -> bool:
    return not all(override in job for job in jobs)


def _slurm_failure(slurm: list[SlurmJob], num: Optional[int], expected: list[list[str]], root: Path) -> str:
    """Why job ``num`` of the latest sweep failed on SLURM, from its submitit stderr; "" if unknown."""
    job = _slurm_job_for(slurm, num, expected[num]) if num is not None else None
    if job is None or not job.error:
        return ""
    where = job.err_file.relative_to(root).as_posix() if job.err_file else ""
    return f"SLURM job {job.job_id}: {job.error}" + (f" ({where})" if where else "")


def swept_keys(points: list[SweepPoint]) -> tuple[list[str], dict[str, str]]:
    """(keys whose value differs between points, in first-seen order; keys fixed for all)."""
    keys: list[str] = []
    for p in points:
        keys += [k for k in p.overrides if k not in keys]
    swept, fixed = [], {}
    for k in keys:
        if k in WHERE_KEYS:
            continue
        vals = {p.overrides.get(k) for p in points}
        if len(vals) > 1:
            swept.append(k)
        else:
            fixed[k] = next(iter(vals))
    return swept, fixed


WHERE_KEYS = ("output_dir", "cache_dir")  # where the points wrote, not what they ran: not "fixed settings"


# -- Pareto and selection -------------------------------------------------------------------------

def pareto_front(points: list[SweepPoint], x: str, y: str, x_dir: str, y_dir: str = "up") -> list[SweepPoint]:
    """Points not dominated on (x, y), each metric scored in its direction ("up", "down", "0"):
    no other point is at least as good on both and better on one."""
    cand = [p for p in points if p.metric(x) is not None and p.metric(y) is not None]
    score = {id(p): (direction_score(x_dir, p.metric(x)), direction_score(y_dir, p.metric(y))) for p in cand}
    front = []
    for p in cand:
        px, py = score[id(p)]
        dominated = any(qx >= px and qy >= py and (qx > px or qy > py)
                        for q in cand if q is not p for qx, qy in [score[id(q)]])
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p.metric(x))


def choose(points: list[SweepPoint], rule: Rule, reference: Optional[dict] = None,
           fallback_objective: Optional[str] = None, utility: str = UTILITY_AXIS) -> dict:
    """Apply ``rule``; returns {"name", "objective", "threshold", "reference_utility", "notes", ...}.
    ``utility``: the metric ties are broken by (higher wins)."""
    ok = [p for p in points if p.status == "ok"]
    notes: list[str] = []
    objective, direction = rule.objective, rule.direction
    # without a completed point there is nothing to choose from, and no note on metrics none could have
    if ok and not any(p.metric(objective) is not None for p in ok) and fallback_objective:
        notes.append(f"no point has {objective}; chose by {fallback_objective} instead")
        objective = fallback_objective
        direction = objective_direction(objective)
    threshold = ref_value = None
    ref_source = None
    eligible = [p for p in ok if p.metric(objective) is not None]
    if rule.constraint and ok:
        ref_metrics = (reference or {}).get("metrics", {}) if reference else {}
        rv = ref_metrics.get(rule.constraint)
        if isinstance(rv, (int, float)) and not isinstance(rv, bool) and math.isfinite(rv):
            ref_value, ref_source = float(rv), "target"
        else:
            vals = [p.metric(rule.constraint) for p in ok if p.metric(rule.constraint) is not None]
            if vals:
                ref_value, ref_source = max(vals), "best point of the sweep"
                if reference is not None:
                    notes.append(f"the target has no {rule.constraint}; using the sweep's best")
        if ref_value is not None:
            threshold = rule.factor * ref_value
            eligible = [p for p in eligible
                        if p.metric(rule.constraint) is not None and p.metric(rule.constraint) >= threshold - 1e-12]
        else:
            notes.append(f"no point has {rule.constraint}: constraint ignored")
    chosen = None
    if eligible:
        chosen = max(enumerate(eligible), key=lambda ip: (direction_score(direction, ip[1].metric(objective)),
                                                          _or(ip[1].metric(utility), -math.inf), -ip[0]))[1]
    elif ok:
        notes.append("no completed point satisfies the rule")
    return {
        "name": chosen.name if chosen else None,
        "overrides": chosen.overrides if chosen else None,
        "tau": (chosen.results or {}).get("tau") if chosen else None,
        "objective": objective,
        "direction": direction,
        "maximise": direction == "up",
        "constraint": rule.constraint,
        "threshold": threshold,
        "reference_value": ref_value,
        "reference_source": ref_source,
        "eligible": [p.name for p in eligible],
        "completed": len(ok),
        "notes": notes,
    }


# -- report ---------------------------------------------------------------------------------------

def forget_axis(points: list[SweepPoint], preferred: Optional[str] = None) -> str:
    if preferred:
        return preferred
    for k in FORGET_AXIS_CANDIDATES:
        if any(p.metric(k) is not None for p in points if p.status == "ok"):
            return k
    return FORGET_AXIS_CANDIDATES[0]


def family_defaults(points: list[SweepPoint]) -> tuple[str, str, str]:
    """(rule, x axis, y axis) for the metrics the sweep's completed points have: TOFU-style QA
    (fact recall / forget quality vs model utility), MUSE (VerbMem vs KnowMem retain) or multiple
    choice (the first ``wmdp-*`` accuracy vs MMLU's, as a whole or else its first subject scored). TOFU's
    when nothing tells."""
    have: set[str] = set()
    for p in points:
        if p.status == "ok":
            have |= {k for k in p.metrics if p.metric(k) is not None}
    if UTILITY_AXIS not in have:
        if MUSE_Y in have or MUSE_X in have:
            return MUSE_RULE, MUSE_X, MUSE_Y
        hazard = sorted(k for k in have if k.startswith("wmdp") and k.endswith("_accuracy"))
        if hazard:
            # MMLU as a whole, else the first of its subjects scored (data.eval_splits=[mmlu-<subject>])
            mmlu = sorted(k for k in have if k.startswith("mmlu") and k.endswith("_accuracy"))
            utility = MCQ_UTILITY if MCQ_UTILITY in have or not mmlu else mmlu[0]
            return f"{hazard[0]},{utility}>=0.95", hazard[0], utility
    return DEFAULT_RULE, forget_axis(points), UTILITY_AXIS


def _setting_md(p: SweepPoint, key: str) -> str:
    """``key=value`` as a code span that can be copied as an override ("(default)" outside it)."""
    value = p.setting(key)
    default = value.endswith(" (default)")
    return f"`{key}={value.removesuffix(' (default)')}`" + (" (default)" if default else "")


def _short(p: SweepPoint, swept: list[str]) -> str:
    if swept:
        return ",".join(f"{k.split('.')[-1]}={p.setting(k)}" for k in swept)
    return p.name


def plot_pareto(points: list[SweepPoint], x: str, y: str, x_dir: str, front: list[SweepPoint],
                chosen: Optional[str], swept: list[str], threshold: Optional[float] = None,
                reference: Optional[dict] = None, title: str = "") -> bytes:
    """The forget-vs-utility scatter as PNG bytes (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    pts = [p for p in points if p.metric(x) is not None and p.metric(y) is not None]
    on_front = {p.name for p in front}
    labels: dict[tuple[float, float], list[str]] = {}
    for p in pts:
        ax.scatter(p.metric(x), p.metric(y), s=36, zorder=3,
                   color="tab:blue" if p.name in on_front else "tab:gray", edgecolors="none")
        labels.setdefault((p.metric(x), p.metric(y)), []).append(_short(p, swept))
    for xy, names in labels.items():  # points at the same place share one label
        ax.annotate("; ".join(names), xy, fontsize=7, xytext=(4, 4), textcoords="offset points")
    if len(front) > 1:
        ax.plot([p.metric(x) for p in front], [p.metric(y) for p in front], "-", color="tab:blue", lw=1.2,
                zorder=2, label="Pareto front")
    elif front:
        ax.scatter([], [], color="tab:blue", label="Pareto front")
    for p in pts:
        if p.name == chosen:
            ax.scatter(p.metric(x), p.metric(y), marker="*", s=260, color="tab:red", zorder=4, label="chosen")
    ref_m = (reference or {}).get("metrics", {}) if reference else {}
    rx, ry = ref_m.get(x), ref_m.get(y)
    if isinstance(rx, (int, float)) and isinstance(ry, (int, float)):
        ax.scatter(rx, ry, marker="X", s=80, color="black", zorder=4, label="target (original)")
    if threshold is not None:
        ax.axhline(threshold, ls="--", lw=0.8, color="tab:red", label="utility constraint")
    ax.set_xlabel(f"{x} ({_better_text(x_dir)})")
    ax.set_ylabel(f"{y} ({_better_text(objective_direction(y))})")
    if title:
        ax.set_title(title, fontsize=10)
    if x in ("forget_quality",):
        vals = [p.metric(x) for p in pts if (p.metric(x) or 0) > 0]
        if vals and max(vals) / max(min(vals), 1e-300) > 100:
            ax.set_xscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def build_report(sweep_dir: str | Path, rule: Optional[str] = None, target: Optional[str | Path] = None,
                 x: Optional[str] = None, y: Optional[str] = None, out: Optional[str | Path] = None) -> dict:
    """Gather ``sweep_dir``, write ``report.md``, ``report.json`` and ``pareto.png`` into ``out``
    (default: the sweep dir) atomically; returns the report dict (with ``console``: the table as
    fixed-width text, and ``markdown``). ``rule``/``x``/``y`` left out: :func:`family_defaults`."""
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out else sweep_dir
    if out.resolve() == sweep_dir.resolve() and (sweep_dir / RESULTS_FILE).is_file():
        # one run's directory: its report.md is the run's own report, which a sweep report would replace (a
        # continual sequence's directory, whose steps are the points, has no results.json of its own)
        raise ValueError(f"{sweep_dir} is a run directory (it has its own {RESULTS_FILE}), not a sweep: pass the "
                         f"sweep directory above it, or --out elsewhere")
    points = gather(sweep_dir)
    if not points:  # nothing to report: no report.md / pareto.png written into the directory
        raise ValueError(f"no sweep points under {sweep_dir} (no run directories with .hydra/ or {RESULTS_FILE}; "
                         f"a dry run's directories are none)")
    reference = _read_target(target) if target else None
    default_rule, default_x, default_y = family_defaults(points)
    r = parse_rule(rule or default_rule)
    y = y or default_y
    swept, fixed = swept_keys(points)
    xk = x or default_x
    _check_metric_names(points, [("--rule", r.objective), ("--rule", r.constraint), ("--x", x), ("--y", y)])
    x_dir = metric_info(xk)[0] or "down"  # an unknown forget metric: lower is better
    ok = [p for p in points if p.status == "ok"]
    front = pareto_front(ok, xk, y, x_dir, objective_direction(y))
    choice = choose(points, r, reference, fallback_objective=xk, utility=y)
    choice["notes"] += settings_notes(ok, reference, swept)
    metric_cols = _metric_columns(ok, xk, y, r.objective)
    on_front = {p.name for p in front}

    rows = _table_rows(points, swept, metric_cols, on_front, choice["name"])
    columns = list(rows[0].keys()) if rows else ["run", "status"]
    md_table = comparison_markdown(rows, columns) if rows else "(no sweep points found)"
    console = comparison_table(rows, columns) if rows else "(no sweep points found)"
    md = _markdown(sweep_dir.name, points, swept, fixed, md_table, r, choice, front, xk, x_dir, y)

    png = plot_pareto(ok, xk, y, x_dir, front, choice["name"], swept, choice["threshold"]
                      if choice["constraint"] == y else None, reference, title=f"sweep {sweep_dir.name}")
    report = {
        "sweep_dir": str(sweep_dir),
        "rule": r.text,
        "x": xk,
        "y": y,
        "swept": swept,
        "fixed": fixed,
        "chosen": choice,
        "pareto_front": [p.name for p in front],
        "target": str(target) if target else None,
        "points": [{"name": p.name, "status": p.status, "overrides": p.overrides, "note": p.note,
                    "tau": (p.results or {}).get("tau"), "metrics": {c: p.metric(c) for c in metric_cols},
                    "pareto": p.name in on_front} for p in points],
        "counts": {"total": len(points), "ok": len(ok), "missing": sum(p.status == "missing" for p in points),
                   "failed": sum(p.status == "failed" for p in points)},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "pareto.png", png)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", md)
    return {**report, "console": console, "markdown": md}


def _check_metric_names(points: list[SweepPoint], names: list[tuple[str, Optional[str]]]) -> None:
    """A metric named on the command line that no completed point has and that is no known metric
    is a typo (``model_utlity``): refused, naming the flag, instead of a constraint silently ignored
    or an empty plot. A known metric no point has (``forget_quality`` on MUSE) falls back as documented."""
    import difflib

    have = {k for p in points if p.status == "ok" for k in p.metrics}
    if not have:  # nothing evaluated yet: nothing to compare with
        return
    for flag, name in names:
        # only a metric of the table may be missing (a pattern such as *_accuracy names no metric: a
        # misspelled split, mlu_accuracy, must be found in the sweep)
        if name is None or name in have or name in METRIC_INFO:
            continue
        close = difflib.get_close_matches(name, sorted(have), n=1)
        raise ValueError(f"{flag}: no point of this sweep has a metric named {name!r}"
                         + (f"; did you mean {close[0]!r}?" if close else "")
                         + f" (its metrics: {', '.join(sorted(have))})")


def _read_target(target: str | Path) -> dict:
    """The reference run's results (``--target``: a run directory or its results.json)."""
    tp = Path(target)
    tp = tp / RESULTS_FILE if tp.is_dir() else tp
    try:
        results = json.loads(tp.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--target {target}: no such results.json or run directory") from None
    except ValueError as e:
        raise ValueError(f"--target {tp}: not a readable results.json ({e})") from None
    if not isinstance(results, dict) or not isinstance(results.get("metrics"), dict):
        raise ValueError(f"--target {tp}: not a run's results.json (no 'metrics' object)")
    return results


def settings_notes(ok: list[SweepPoint], reference: Optional[dict], swept: list[str]) -> list[str]:
    """Notes naming the completed points (and the target) evaluated with other settings than the rest
    (:func:`pipeline.eval.summary.evaluation_record`: generation length, rows scored, truth-ratio
    reference, dtype, ...), e.g. points of an earlier launch kept after the config's ``eval.*`` changed:
    their numbers may not compare. The settings of the target, else of most points, are the yardstick;
    fields the swept keys change on purpose (``data.*``: the rows; ``eval.<field>``) are not compared."""
    from pipeline.eval.summary import diff_paths, evaluation_record

    # fields a swept key changes on purpose: a sweep over data.* scores other rows (and another forget
    # split's reference), one over eval.<field> that field
    explained = {"rows", "retain_reference"} if any(k.startswith("data.") for k in swept) else set()
    explained |= {k.split(".", 1)[1] for k in swept if k.startswith("eval.")}
    explained |= {"rows"} if "eval.max_rows" in swept else set()

    def key(results: dict) -> str:
        record = {k: v for k, v in evaluation_record(results).items() if k not in explained}
        return json.dumps(record, sort_keys=True, default=str)

    groups: dict[str, list[str]] = {}
    for p in ok:
        groups.setdefault(key(p.results or {}), []).append(_short(p, swept))
    target = key(reference) if reference is not None and reference.get("evaluation") else None
    if not groups:
        return []
    main = target if target in groups else max(groups, key=lambda k: len(groups[k]))
    against = "the target" if main == target else "most points"
    notes = []
    for k, names in groups.items():
        if k != main:
            fields = diff_paths(json.loads(main), json.loads(k))
            notes.append(f"{', '.join(names)}: evaluated with other settings than {against} "
                         f"({', '.join(fields[:4])}{', ...' if len(fields) > 4 else ''}): the numbers may not compare")
    if target is not None and target != main:
        fields = diff_paths(json.loads(main), json.loads(target))
        notes.append(f"the target was evaluated with other settings than the points "
                     f"({', '.join(fields[:4])}{', ...' if len(fields) > 4 else ''}): its values may not compare")
    return notes


def _metric_columns(ok: list[SweepPoint], xk: str, y: str, objective: str) -> list[str]:
    """The metric columns of the table: the two axes and the usual metrics that some completed
    point has, plus the rule's objective when it is none of those."""
    cols = [c for c in dict.fromkeys((xk, y, *TABLE_METRICS)) if any(p.metric(c) is not None for p in ok)]
    if objective not in cols and any(p.metric(objective) is not None for p in ok):
        cols.append(objective)
    return cols


def _table_rows(points: list[SweepPoint], swept: list[str], metric_cols: list[str],
                on_front: set[str], chosen: Optional[str]) -> list[dict[str, Any]]:
    """One row per point: its swept values (its name when nothing was swept), the tau it used
    (only when that says more than the swept method.tau), its metrics, Pareto and status."""
    ok = [p for p in points if p.status == "ok"]
    show_tau = any(p.results and p.results.get("tau") is not None for p in ok) and (
        "method.tau" not in swept or any(_tau_differs(p) for p in ok))
    rows = []
    for p in points:
        row: dict[str, Any] = {k: p.setting(k) for k in swept}
        if not swept:
            row["run"] = p.name
        if show_tau:
            row["tau used"] = (p.results or {}).get("tau")
        for c in metric_cols:
            row[c] = p.metric(c)
        row["pareto"] = "yes" if p.name in on_front else ("" if p.status == "ok" else "-")
        row["status"] = (p.status + (" (chosen)" if p.name == chosen else "")
                         + (" (not evaluated)" if p.status == "ok" and not p.metrics else ""))
        rows.append(row)
    return rows


def _markdown(name: str, points: list[SweepPoint], swept: list[str], fixed: dict[str, str], md_table: str,
              r: Rule, choice: dict, front: list[SweepPoint], xk: str, x_dir: str, y: str) -> str:
    """report.md: counts, fixed settings, the table, the chosen setting and why, the Pareto front
    and the points that are missing or failed."""
    ok = [p for p in points if p.status == "ok"]
    incomplete = [p for p in points if p.status != "ok"]
    chosen_pt = next((p for p in points if p.name == choice["name"]), None)
    lines = [f"# Sweep report: {name}", "",
             f"{len(ok)} of {len(points)} points completed"
             + (f"; {len(incomplete)} missing/failed" if incomplete else "") + ".", ""]
    if fixed:
        lines += ["Fixed for every point: " + ", ".join(f"`{k}={v}`" for k, v in fixed.items()), ""]
    lines += [md_table, ""]
    lines += ["## Best setting", "", f"Rule: `{r.text}`"
              + (f" (reference {r.constraint} = {format_value(choice['reference_value'])} from the "
                 f"{choice['reference_source']}; threshold {format_value(choice['threshold'])})"
                 if choice["threshold"] is not None else ""), ""]
    if chosen_pt is not None:
        desc = ", ".join(_setting_md(chosen_pt, k) for k in swept) or f"`{chosen_pt.name}`"
        lines.append(f"**Chosen: {desc}**" + (f" (tau used {format_value(choice['tau'], 3)})"
                                              if choice["tau"] is not None else "")
                     + f": {choice['objective']} = {format_value(chosen_pt.metric(choice['objective']))}, "
                     f"{y} = {format_value(chosen_pt.metric(y))}.")
    else:
        lines.append("**No setting chosen**: " + ("no completed point satisfies the rule." if choice["completed"]
                                                  else "no point has completed."))
    lines += [f"- {n}" for n in choice["notes"]]
    lines += ["", "## Pareto front", "",
              f"![pareto](pareto.png) — x: `{xk}` ({_better_text(x_dir)}), y: `{y}` "
              f"({_better_text(objective_direction(y))}).", ""]
    lines += [f"- {_short(p, swept)}: {xk} = {format_value(p.metric(xk))}, "
              f"{y} = {format_value(p.metric(y))}" for p in front] or ["- (no completed point has both metrics)"]
    if incomplete:
        lines += ["", "## Missing / failed", ""]
        lines += [f"- `{p.name}`: **{p.status}** — {p.note}" for p in incomplete]
    lines.append("")
    return "\n".join(lines)


def _better_text(direction: str) -> str:
    return {"up": "higher is better", "down": "lower is better", "0": "closer to 0 is better",
            "1": "closer to 1 is better"}.get(direction, "higher is better")


def _or(v: Optional[float], default: float) -> float:
    return default if v is None else v


def _tau_differs(p: SweepPoint) -> bool:
    try:
        return abs(float(p.overrides.get("method.tau", "nan")) - float(p.results.get("tau"))) > 1e-9
    except (TypeError, ValueError):
        return True
