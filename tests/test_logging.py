"""Multi-rank runs log once: rank 0 logs everything, other ranks only warnings and errors, tagged.

The filter itself on records with ``RANK`` set either way, and the wiring: the launchers' Hydra
``job_logging`` (console and ``train.log``) uses it with :data:`pipeline.logging.LOG_FORMAT`. The
2-rank end-to-end test (tests/test_e2e_synthetic.py) checks the result in a real launch's log.
"""

from __future__ import annotations

import io
import logging
import logging.config

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.config import register_configs
from pipeline.logging import LOG_FORMAT, SAME_ON_EVERY_RANK, RankFilter
from tests.helpers.launch import ROOT


def _emit(rank: str, monkeypatch) -> str:
    """What one INFO and one WARNING record look like through a handler with the filter, on ``rank``."""
    monkeypatch.setenv("RANK", rank)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RankFilter())
    logger = logging.getLogger(f"test_logging.r{rank}")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(handler)
    try:
        logger.info("which backend ran")
        logger.warning("this rank's data was short")
        logger.warning("the config's tau is <= 1", extra=SAME_ON_EVERY_RANK)
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


def test_rank_zero_logs_everything_untagged(monkeypatch):
    text = _emit("0", monkeypatch)
    assert "[INFO] - which backend ran" in text
    assert "[WARNING] - this rank's data was short" in text
    assert "[WARNING] - the config's tau is <= 1" in text
    assert "[rank" not in text


def test_other_ranks_log_only_warnings_tagged_with_their_rank(monkeypatch):
    text = _emit("3", monkeypatch)
    assert "which backend ran" not in text
    assert "[WARNING][rank 3] - this rank's data was short" in text
    # a warning that follows from what all ranks share is written once, by rank 0
    assert "tau is <= 1" not in text


def test_launchers_hydra_logging_uses_the_filter_on_console_and_file(tmp_path, monkeypatch):
    """The composed ``hydra.job_logging`` (what train/eval/prepare configure) builds handlers that
    filter by rank and format with LOG_FORMAT."""
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    jl = OmegaConf.to_container(cfg.hydra.job_logging, resolve=False)
    assert jl["formatters"]["simple"]["format"] == LOG_FORMAT
    # stdout carries results only: Hydra's own lines ("[HYDRA] Launching 2 jobs locally") go to stderr too
    assert jl["handlers"]["console"]["stream"] == "ext://sys.stderr"
    assert cfg.hydra.hydra_logging.handlers.console.stream == "ext://sys.stderr"
    for name in ("console", "file"):
        assert jl["handlers"][name]["filters"] == ["rank"], name
    jl["handlers"]["file"]["filename"] = str(tmp_path / "train.log")
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    monkeypatch.setenv("RANK", "1")
    try:
        logging.config.dictConfig(jl)
        logging.getLogger("pipeline.run").info("info from rank 1")
        logging.getLogger("pipeline.run").warning("warning from rank 1")
        for h in root.handlers:
            h.flush()
        text = (tmp_path / "train.log").read_text()
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], root.level = saved
    assert "info from rank 1" not in text
    assert "[pipeline.run][WARNING][rank 1] - warning from rank 1" in text


@pytest.mark.parametrize("rank", ["", "0"])
def test_an_unset_or_empty_rank_is_rank_zero(rank, monkeypatch):
    if rank:
        monkeypatch.setenv("RANK", rank)
    else:
        monkeypatch.delenv("RANK", raising=False)
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert RankFilter().filter(rec) and rec.rank == ""


def test_a_resumed_run_continues_its_wandb_run_and_a_fresh_one_opens_another(tmp_path, monkeypatch):
    """Real wandb, offline: an attempt resuming from a checkpoint logs into the wandb run of the attempt
    before it (before: one wandb run per preemption, the curve split across them, every sweep point
    named alike); a run starting from step 0 opens its own."""
    from omegaconf import OmegaConf

    from pipeline.logging import WANDB_ID_FILE, RunLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = OmegaConf.create({"wandb": True, "wandb_mode": "offline", "project": "t", "entity": None})

    def attempt(resume: bool, steps: range) -> str:
        logger = RunLogger(cfg, str(tmp_path), "sweeps/exp/method.tau=2.0", {"a": 1}, enabled=True,
                           resume=resume, group="exp")
        assert logger._wandb is not None
        assert logger._wandb.name == "sweeps/exp/method.tau=2.0" and logger._wandb.group == "exp"
        for s in steps:
            logger.log({"loss": float(s)}, step=s)
        run_id = logger._wandb.id
        logger.finish()
        return run_id

    first = attempt(False, range(1, 3))
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == first
    assert attempt(True, range(3, 5)) == first  # the requeued attempt resumes at step 3
    fresh = attempt(False, range(1, 2))  # trainer.resume=never, or no checkpoint: a new run
    assert fresh != first and (tmp_path / WANDB_ID_FILE).read_text().strip() == fresh
    # wandb's offline folders: offline-run-<second>-<id>[-<n> when that second's name is taken]
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert {r.split("-")[3] for r in runs} == {first, fresh}, runs


def test_wandb_auto_mode_follows_an_explicit_wandb_mode_in_the_environment(tmp_path, monkeypatch):
    """``wandb_mode=auto`` went online whenever WANDB_API_KEY was set, over an explicit WANDB_MODE=offline
    (a node without network timed out, or a run meant to stay local was uploaded), and WANDB_MODE=disabled
    still wrote an offline run."""
    from omegaconf import OmegaConf

    from pipeline.logging import WANDB_ID_FILE, RunLogger, wandb_mode

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode("auto") == "online"
    for env, want in (("offline", "offline"), ("disabled", "disabled"), ("dryrun", "offline"), ("ONLINE", "online"),
                      ("bogus", "online")):
        monkeypatch.setenv("WANDB_MODE", env)
        assert wandb_mode("auto") == want, env
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode("auto") == "offline" and wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = OmegaConf.create({"wandb": True, "wandb_mode": "auto", "project": "t", "entity": None})
    logger = RunLogger(cfg, str(tmp_path), "r", {}, enabled=True)
    assert logger._wandb is None
    assert not (tmp_path / "wandb").exists() and not (tmp_path / WANDB_ID_FILE).exists()


def test_a_chosen_tau_replaces_auto_in_the_wandb_config(tmp_path, monkeypatch):
    """tau=auto's choice was never sent to wandb: its run config kept method.tau="auto"."""
    from omegaconf import OmegaConf

    from pipeline.logging import RunLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = OmegaConf.create({"wandb": True, "wandb_mode": "auto", "project": "t", "entity": None})
    logger = RunLogger(cfg, str(tmp_path), "r", {"method": {"name": "asu_kl", "tau": "auto"}}, enabled=True)
    assert logger._wandb is not None and logger._wandb.config["method"]["tau"] == "auto"
    logger.update_config({"method": {"name": "asu_kl", "tau": 2.5}})
    assert logger._wandb.config["method"] == {"name": "asu_kl", "tau": 2.5}
    logger.finish()
