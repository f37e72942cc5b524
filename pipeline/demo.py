"""The embedded demo's runs, all inside one distributed launch.

``demo_job`` evaluates the target and the retain model, then unlearns with each method in turn,
every job on the same process group (``deepspeed --num_gpus 2 launchers/demo_runs.py ...``). One
launch instead of one per job saves each job's interpreter start, imports and process-group set-up,
which on a 2-core CPU cost about as much as the job itself. Each job is composed with Hydra's
compose API from the same config tree (and validated like any other run), writes its own run
directory, and is collective: every rank runs the same sequence; rank 0 writes the files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

REFERENCE_MODELS = ("target", "retain")


@dataclass(frozen=True)
class DemoJob:
    name: str  # run directory under the demo root, and the row's name in the table
    kind: str  # "eval" (a reference model) | "train" (a method)
    overrides: tuple[str, ...]


# Demo training starts afresh every time (trainer.tiny saves no checkpoints, save_every=0): a Ctrl-C's
# stop checkpoint would otherwise be resumed by every later demo, mixing old and new code's steps or
# refusing changed settings. Goes before the user's overrides, so ``-- trainer.resume=auto`` still resumes.
TRAIN_DEFAULTS = ("trainer.resume=never",)


# Rows that are a method plus model/trainer settings rather than a method config of their own:
# name -> (method, extra overrides). asu_kl_lora: ASU with a LoRA student (model.peft defaults, r=8 on
# every projection) whose frozen base is its own teacher; LoRA moves less per step than full
# fine-tuning, so it gets a higher learning rate (docs/methods.md, "ASU with a LoRA student").
ROW_VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "asu_kl_lora": ("asu_kl", ("model.peft.enabled=true", "trainer.lr=3e-3")),
}


def method_choice(name: str, conf_dir: Path) -> str:
    """The method config for ``name``: ``<name>_tiny`` when the embedded benchmark has tuned values."""
    return f"{name}_tiny" if (conf_dir / "method" / f"{name}_tiny.yaml").exists() else name


def row_names(conf_dir: Path) -> list[str]:
    """Every name ``--methods`` accepts: the method configs (``<name>_tiny`` as itself and as ``<name>``)
    and :data:`ROW_VARIANTS`."""
    stems = {p.stem for p in (conf_dir / "method").glob("*.yaml")}
    return sorted(stems | {s.removesuffix("_tiny") for s in stems} | set(ROW_VARIANTS))


def check_rows(names: list[str], conf_dir: Path) -> None:
    """Refuse unknown row names before anything runs (Hydra would only fail inside the launch)."""
    bad = [n for n in names if n not in row_names(conf_dir)]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(row_names(conf_dir))} "
                         f"(conf/method/<name>.yaml)")


def plan_jobs(methods: list[str], demo_name: str, conf_dir: Path,
              references: tuple[str, ...] = REFERENCE_MODELS) -> list[DemoJob]:
    """Evaluations of the ``references`` (``target`` / ``retain``), then one training job per method."""
    bad = [v for v in references if v not in REFERENCE_MODELS]
    if bad:
        raise ValueError(f"unknown reference model(s) {bad}; choose from {list(REFERENCE_MODELS)}")
    jobs = [DemoJob(v, "eval", (f"model.variant={v}", f"run_name={demo_name}/{v}")) for v in references]
    for m in methods:
        method, extra = ROW_VARIANTS.get(m, (m, ()))
        jobs.append(DemoJob(m, "train", (f"method={method_choice(method, conf_dir)}", *extra,
                                         f"run_name={demo_name}/{m}")))
    return jobs


def without_method_keys(overrides: list[str]) -> list[str]:
    """``overrides`` less the method's own keys (``method.beta=0.5``): the steps that train no method
    (preparing the benchmark, the target / retain evaluations) are composed with the default method,
    which may not have them (an NPO-only key stopped the demo at its first step, naming no row)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("method.", "method="))]


def compose_job(conf_dir: Path, common: list[str], job: DemoJob) -> DictConfig:
    """Compose ``config`` with a train job's :data:`TRAIN_DEFAULTS`, the common overrides, then the
    job's own (later ones win). An override the job's config cannot take (``method.tau`` for a method
    without a tau, an unknown method) is a :class:`ConfigError` naming the row, i.e. one line, exit 2."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.config import ConfigError, register_configs
    from pipeline.hydra_errors import COMPOSE_ERRORS, compose_error_line

    register_configs()
    if not GlobalHydra.instance().is_initialized():
        initialize_config_dir(config_dir=str(conf_dir), version_base="1.3")
    first = TRAIN_DEFAULTS if job.kind == "train" else ()
    if job.kind != "train":
        common = without_method_keys(common)
    try:
        return compose(config_name="config", overrides=[*first, *common, *job.overrides])
    except COMPOSE_ERRORS as exc:
        raise ConfigError(f"demo row {job.name}: {compose_error_line(exc)} (overrides after -- reach every row; "
                          f"run that one alone with --methods)") from None


def check_jobs(conf_dir: Path, common: list[str], jobs: list[DemoJob]) -> None:
    """Compose and validate every job's config as :func:`demo_job` will (``launchers/demo.py`` calls it
    for every row of every launch before anything runs). Raises :class:`ConfigError` naming the row."""
    from pipeline.config import ConfigError, validate

    for job in jobs:
        cfg = compose_job(conf_dir, common, job)
        try:
            validate(cfg)
        except ConfigError as exc:
            raise ConfigError(f"demo row {job.name}: {exc}") from None


def demo_job(conf_dir: Path, common: list[str], jobs: list[DemoJob], batch_scale: int = 1) -> list[dict]:
    """Run ``jobs`` in order in this process group; returns one timing record per job.

    All configs are composed (and so checked for unknown keys) before the first job starts, so a
    typo in an override fails at once rather than after several minutes of training.
    ``batch_scale`` multiplies the per-rank batch sizes (a single rank standing in for N ranks).
    """
    from omegaconf import open_dict

    from pipeline.engine.distributed import init_distributed, is_main_process
    from pipeline.eval.runner import eval_job
    from pipeline.run import train_job

    cfgs = [compose_job(conf_dir, common, j) for j in jobs]
    for cfg in cfgs:
        with open_dict(cfg):
            cfg.trainer.batch_size = int(cfg.trainer.batch_size) * batch_scale
            cfg.trainer.retain_batch_size = int(cfg.trainer.retain_batch_size) * batch_scale
    init_distributed(cfgs[0].deepspeed.timeout_minutes) if cfgs else init_distributed()
    timings = []
    for i, (job, cfg) in enumerate(zip(jobs, cfgs), 1):
        run_dir = Path(cfg.output_dir) / str(cfg.run_name)
        t0 = time.time()
        if is_main_process():
            # says whether training starts afresh (TRAIN_DEFAULTS) or resumes an earlier checkpoint
            how = f" (trainer.resume={cfg.trainer.resume})" if job.kind == "train" else ""
            print(f"[demo] {i}/{len(jobs)} {job.kind} {job.name} -> {run_dir}{how}", flush=True)
        (eval_job if job.kind == "eval" else train_job)(cfg, run_dir)
        dt = time.time() - t0
        timings.append({"name": job.name, "kind": job.kind, "seconds": round(dt, 1)})
        if is_main_process():
            print(f"[demo] {i}/{len(jobs)} {job.name} done in {dt:.0f}s", flush=True)
    return timings
