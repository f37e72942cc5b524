"""A launch refused by its own input checks, after Hydra wrote its record (``.hydra/``, the job log)
but before its run began, leaves a run directory as it was: a new one is removed, an existing one's
``.hydra/`` is put back (it described the run whose files are there). One that began keeps its record."""

import json
import subprocess
import sys
from pathlib import Path

from pipeline import launch_record
from tests.helpers.launch import ROOT, env

FIX = ROOT / "tests" / "fixtures"


def _bad_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for split in ("forget", "retain"):
        rows = [json.loads(line) for line in (FIX / "own_qa" / f"{split}.jsonl").read_text().splitlines()]
        if split == "forget":
            rows[2]["answer"] = 5
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def _train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launchers/train.py", "data=own_qa", f"data.path={_bad_data(tmp_path)}",
                           *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)


def test_a_refused_launch_into_a_new_directory_leaves_nothing(tmp_path):
    out = _train(tmp_path, f"output_dir={tmp_path / 'runs' / 'nested'}", "run_name=r1")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert lines[-1] == (f"error (DataError, rank 0): dataset 'json:{tmp_path / 'data'}', split 'forget', column "
                         f"'answer': row 3 must hold a string, got int")
    assert not (tmp_path / "runs").exists()  # the run directory and the parents the launch created


def test_a_refused_launch_into_an_existing_run_puts_its_hydra_record_back(tmp_path):
    run = tmp_path / "runs" / "r1"
    (run / ".hydra").mkdir(parents=True)
    before = {n: f"the earlier launch's {n}\n" for n in ("config.yaml", "hydra.yaml", "overrides.yaml")}
    for name, text in before.items():
        (run / ".hydra" / name).write_text(text)
    (run / "results.json").write_text("{}")
    (run / "train.log").write_text("an earlier attempt\n")
    out = _train(tmp_path, f"output_dir={tmp_path / 'runs'}", "run_name=r1")
    assert out.returncode == 2 and "row 3 must hold a string" in out.stderr, out.stderr[-2000:]
    assert {n: (run / ".hydra" / n).read_text() for n in before} == before
    assert (run / "results.json").read_text() == "{}"
    log = (run / "train.log").read_text()  # the attempt is logged, as every attempt is
    assert log.startswith("an earlier attempt\n") and "row 3 must hold a string" in log
    assert "refused before the run began: its run directory's .hydra/ is as it was before this launch" in log


def test_a_launch_that_began_its_run_keeps_its_record(tmp_path):
    run = tmp_path / "r1"
    launch_record.remember(run, ".hydra", str(run / "train.log"))
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("this launch's\n")
    (run / "config.yaml").write_text("this launch's run\n")  # the run began (pipeline.run writes it)
    assert launch_record.undo_if_untouched() is None
    assert (run / ".hydra" / "config.yaml").read_text() == "this launch's\n"
    assert launch_record.undo_if_untouched() is None  # once only


def test_an_existing_directory_without_a_record_gets_none(tmp_path):
    """A launch into an existing directory that held no .hydra/ (e.g. hydra.run.dir=.) leaves none there."""
    run = tmp_path / "r1"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    launch_record.remember(run, ".hydra", str(run / "train.log"))
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("this launch's\n")
    (run / "train.log").write_text("a line\n")
    assert launch_record.undo_if_untouched() == "its run directory's .hydra/ is as it was before this launch"
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt", "train.log"]
