"""A ``-m`` sweep whose run directory Hydra could not create (a name over NAME_MAX = 255 bytes, a path
over PATH_MAX) stops before any job runs, with one line naming the name, its length and the fix;
before, Hydra stopped at that job with ``OSError: [Errno 36] File name too long`` and a traceback,
after the jobs before it had run. The names checked are the ones Hydra creates: per path component
(a value with ``/`` nests the directory), in bytes, with Hydra's own rendering of the values
(``1e-3`` is ``0.001`` in the name, ``true`` is ``True``), and a name of exactly 255 bytes runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import launch
from tests.helpers.tiny import build, train_overrides

# the embedded default (no model to build), planned but not run: Hydra still creates each job's directory
DRY = ["trainer.dry_run=true", "logging=none"]
NEST = "a" * 200  # run_name='NEST/<last>': the subdir nests, and is far over 255 bytes as a whole
# quoted (é is not allowed bare), and Hydra keeps the quotes in the name:
# "<last>',trainer.dry_run=True,trainer.lr=0.001": 39 bytes after <last>; é is 2 bytes (names are bytes)
LAST = "é" + "b" * (255 - 39 - 2)
RUN_NAME = f"run_name='{NEST}/{LAST}'"


def _error(out) -> str:
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error (")]
    assert len(errors) == 1 and "Traceback" not in out.stderr and "[Errno 36]" not in out.stderr, out.stderr[-3000:]
    assert "Callback EarlyChecks" not in out.stderr and "Launching" not in out.stderr, out.stderr[-3000:]
    return errors[0]


def test_the_fault_tests_override_set_is_refused_before_any_job(tmp_path):
    """The fault tests' overrides with only valid values make a 307-byte name: Hydra's traceback at
    job 1 before; now one line at once, exit 2, and not even the sweep directory is written."""
    model_dir, data_dir = build(tmp_path)
    out = launch.run(["-m", *train_overrides(model_dir, data_dir, tmp_path / "runs", "sw"), "method.tau=2.0,3.0"])
    error = _error(out)
    assert error.startswith("error (ConfigError, rank 0): sweep job 1 of 2 ("), error
    assert "run directory's name (hydra.sweep.subdir" in error and "is 307 bytes" in error, error
    assert "'data.eval_splits=[eval_retain],data.forget_split=forget," in error  # the name Hydra would use
    assert "limit of 255 bytes for one name (NAME_MAX" in error
    assert "hydra.job.config.override_dirname.exclude_keys" in error
    assert r"hydra.sweep.subdir=tau_\${method.tau}" in error and r"job_\${hydra.job.num}" in error
    assert not (tmp_path / "runs").exists(), sorted((tmp_path / "runs").rglob("*"))


def test_a_name_one_byte_over_is_refused_and_the_suggested_subdir_runs(tmp_path):
    """Job 1's last name is 255 bytes, job 2's 256 (``2.5e-3`` is ``0.0025``): refused at job 2
    before job 1 runs; the suggested ``hydra.sweep.subdir`` then runs both."""
    args = ["-m", *DRY, f"output_dir={tmp_path / 'runs'}", RUN_NAME, "trainer.lr=1e-3,2.5e-3"]
    error = _error(launch.run(args))
    assert error.startswith("error (ConfigError, rank 0): sweep job 2 of 2 ("), error
    assert f"{LAST}',trainer.dry_run=True,trainer.lr=0.0025\" is 256 bytes" in error, error  # repr: it has a '

    assert not (tmp_path / "runs").exists(), sorted((tmp_path / "runs").rglob("*"))
    assert r"hydra.sweep.subdir=lr_\${trainer.lr}" in error
    out = launch.run([*args, "hydra.sweep.subdir=lr_${trainer.lr}"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs" / "sweeps" / "default").glob("lr_*")) == ["lr_0.001", "lr_0.0025"]


def test_names_of_exactly_255_bytes_in_a_nested_subdir_run(tmp_path):
    """The limit is per name and in bytes: a 255-byte name (254 characters) under a subdir that is
    478 bytes in all is created by Hydra, so the sweep is not refused."""
    out = launch.run(["-m", *DRY, f"output_dir={tmp_path / 'runs'}", RUN_NAME, "trainer.lr=1e-3,2e-3"])
    assert out.returncode == 0, out.stderr[-3000:]
    parent = tmp_path / "runs" / "sweeps" / "default" / f"logging=none,run_name='{NEST}"
    names = sorted(p.name for p in parent.iterdir())
    assert names == [f"{LAST}',trainer.dry_run=True,trainer.lr=0.001", f"{LAST}',trainer.dry_run=True,trainer.lr=0.002"]
    assert [len(n.encode()) for n in names] == [255, 255] and len(names[0]) == 254
    assert all((parent / n / ".hydra" / "overrides.yaml").is_file() for n in names)


def _deep_dir(root: Path, size: int) -> str:
    """A directory path of ``size`` bytes under ``root`` made of names of at most 250 bytes."""
    path = str(root)
    while len(path) < size:
        path += "/" + "d" * min(250, size - len(path) - 1)
    return path if len(path) == size else _deep_dir(root, size + 1)


SUBDIR = "logging=none,method.tau=2.0,trainer.dry_run=True"  # job 1's name


@pytest.mark.parametrize("case", ["path_max", "sweep_dir_name"])
def test_a_path_over_path_max_or_a_long_sweep_dir_name_is_refused(tmp_path, case):
    """A sweep directory (every name allowed) under which the job's directory is over PATH_MAX (4096
    bytes with the end NUL: Hydra creates the sweep directory and multirun.yaml, then its job fails);
    and a sweep directory whose own name is over 255 bytes (exp_name)."""
    root = tmp_path / "runs"
    if case == "path_max":
        sweep_dir = _deep_dir(root, 4096 - len(SUBDIR) - 1)  # the job's directory is 4096 bytes
        override = f"hydra.sweep.dir={sweep_dir}"
        expect = [f"its run directory '{sweep_dir}/{SUBDIR}' is 4096 bytes", "PATH_MAX", "a shorter sweep directory"]
    else:
        override = "exp_name=" + "e" * 300
        expect = ["the sweep directory's name '" + "e" * 300 + "' is 300 bytes", "shorten output_dir / exp_name"]
    error = _error(launch.run(["-m", *DRY, f"output_dir={root}", override, "method.tau=2.0,3.0"]))
    assert error.startswith("error (ConfigError, rank 0): sweep job 1 of 2 ("), error
    for word in expect:
        assert word in error, error
    assert not root.exists()


@pytest.mark.parametrize("sweep", [True, False])
def test_a_run_name_too_long_for_the_file_system_is_one_line(tmp_path, sweep):
    """run_name nests 17 names of 240 bytes: output_dir/run_name is over PATH_MAX. The output_dir check
    raised OSError in the callback; Hydra only warned about it and stopped at the job's mkdir with a
    traceback. Now one line, for a sweep (``-m``) and a single run."""
    run_name = "/".join(["c" * 240] * 17)
    args = [*DRY, f"output_dir={tmp_path / 'runs'}", f"run_name={run_name}"]
    error = _error(launch.run(["-m", *args, "method.tau=2.0,3.0"] if sweep else args))
    assert "a configured path is too long for the file system: '" in error and "PATH_MAX" in error, error
    assert ("sweep job 1 of 2 (" in error) == sweep
    assert not (tmp_path / "runs").exists()
