"""A finished job is not run again (pipeline/finished.py): the same command in its run directory
returns its results.json without loading a model; other inputs, or outputs changed since, run it
(resuming at its last checkpoint), and the log says why."""

import json
import logging

import pytest
from omegaconf import OmegaConf

from pipeline.finished import FINISHED_FILE, finished_results, record_finished
from tests.helpers import launch
from tests.helpers.tiny import resumable_job


def _cfg(resume: str = "auto", eval_resume: bool = True):
    return OmegaConf.create({"trainer": {"resume": resume}, "eval": {"enabled": True, "resume": eval_resume}})


def test_without_a_checkpoint_of_the_last_step_nothing_is_recorded(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    record_finished(tmp_path, {"k": 1}, last_step=4)  # trainer.save_every=0: no checkpoints at all
    assert not (tmp_path / FINISHED_FILE).exists()


def test_resume_never_a_damaged_record_or_none_runs_the_job_and_drops_the_record(tmp_path, caplog):
    assert finished_results(_cfg(), tmp_path, {"k": 1}) is None  # never finished here
    (tmp_path / FINISHED_FILE).write_text('{"key": ')
    with caplog.at_level(logging.INFO):
        assert finished_results(_cfg(), tmp_path, {"k": 1}) is None
    assert f"its earlier results are not reused: {FINISHED_FILE} is unreadable (JSONDecodeError)" in caplog.text
    assert not (tmp_path / FINISHED_FILE).exists()
    for cfg in (_cfg(resume="never"), _cfg(eval_resume=False)):
        (tmp_path / FINISHED_FILE).write_text("{}")
        (tmp_path / "results.json").write_text('{"run": "earlier"}')
        for name in ("report.md", "train_history.json", "eval_details.json", "exported_from.json"):
            (tmp_path / name).write_text("earlier")
        assert finished_results(cfg, tmp_path, {"k": 1}) is None and not (tmp_path / FINISHED_FILE).exists()
        # set aside: a re-run that fails must not leave the earlier results as its own (sweep reports)
        assert not (tmp_path / "results.json").exists()
        assert (tmp_path / "results.previous.json").read_text() == '{"run": "earlier"}'
        # nor the report, history and details of that earlier run next to its own config.yaml
        for name in ("report", "train_history", "eval_details"):
            assert not list(tmp_path.glob(f"{name}.json")) + list(tmp_path.glob(f"{name}.md"))
            assert [p.name for p in tmp_path.glob(f"{name}.previous.*")], name
        # model/'s record stays with model/: a re-run that trains nothing keeps the export
        assert (tmp_path / "exported_from.json").read_text() == "earlier"


def test_a_refused_rerun_changes_nothing_and_a_finished_job_is_not_checked_again(tmp_path, monkeypatch):
    """The resume check (before_rerun) runs after the finished check and before anything is set
    aside: a refused re-run (another max_steps than the checkpoint's) leaves results.json and
    finished.json as they were; a finished job returns its results without it (a GPU-finished run
    re-run on a CPU host, whose checkpoint meta differs in precision, was refused)."""
    from pipeline import finished

    (tmp_path / "results.json").write_text('{"run": "earlier"}')
    (tmp_path / FINISHED_FILE).write_text("{}")

    def refuse():
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError, match="refused"):
        finished_results(_cfg(resume="never"), tmp_path, {"k": 1}, before_rerun=refuse)
    assert (tmp_path / "results.json").read_text() == '{"run": "earlier"}' and (tmp_path / FINISHED_FILE).exists()
    monkeypatch.setattr(finished, "_check", lambda run_dir, key: (None, {"outputs": {"checkpoint": "step_4"}}))
    assert finished_results(_cfg(), tmp_path, {"k": 1}, before_rerun=refuse) == {"run": "earlier"}


def test_results_without_a_finished_record_say_why_they_are_not_reused(tmp_path, caplog):
    """A run with trainer.save_every=0 (the embedded default's sweeps) is never recorded as finished:
    its re-run trains again, and the log now says why (it said only that results.json was set aside)."""
    plain = "a run without checkpoints of its last step (trainer.save_every=0) is never recorded as finished, so it"
    for save_every, why in ((0, f"{plain} trains again"), (5, f"no {FINISHED_FILE}: it did not finish"),
                            # a preemption's checkpoint left in it: the re-run resumes there (it said "trains again")
                            (0, f"{plain} resumes from step_00000002")):
        if why.endswith("step_00000002"):
            (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)
            (tmp_path / "checkpoints" / "step_00000002" / "meta.json").write_text('{"step": 2}')
        (tmp_path / "results.json").write_text("{}")
        cfg = OmegaConf.merge(_cfg(), {"trainer": {"save_every": save_every}})
        with caplog.at_level(logging.INFO):
            assert finished_results(cfg, tmp_path, {"k": 1}) is None
        assert f"its earlier results are not reused: {why}" in caplog.text
        caplog.clear()


@pytest.mark.distributed
def test_the_same_command_again_loads_nothing_and_other_inputs_or_changed_outputs_run_it(tmp_path):
    args, run = resumable_job(tmp_path)

    def go(*extra):
        out = launch.run(args + list(extra), ranks=2)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stderr

    go()
    rec = json.loads((run / FINISHED_FILE).read_text())
    assert rec["outputs"]["checkpoint"] == "step_00000004" and rec["key"]["world_size"] == 2
    results = (run / "results.json").read_bytes()
    mtime = (run / "results.json").stat().st_mtime_ns

    log = go()  # the same command: no engines, no checkpoint loaded, nothing written
    assert "finished already" in log and "nothing to do" in log
    assert "resumed from" not in log and "DeepSpeed student" not in log and "evaluation model" not in log
    assert (run / "results.json").stat().st_mtime_ns == mtime and (run / "results.json").read_bytes() == results

    log = go("eval.max_new_tokens=6")  # another evaluation setting: resumes at the last step, evaluates again
    assert "its earlier results are not reused: it finished with other inputs (eval.max_new_tokens)" in log
    assert "nothing to train: resumed at the last step (4/4)" in log
    assert json.loads((run / "results.json").read_text())["evaluation"]["max_new_tokens"] == 6
    assert (run / "results.previous.json").read_bytes() == results  # the earlier run's, kept

    weights = run / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())  # rewritten since, in place and at the same size: its last tensor's end
    data[-64:] = bytes(b ^ 0x01 for b in data[-64:])
    weights.write_bytes(bytes(data))
    log = go("eval.max_new_tokens=6")
    assert "its earlier results are not reused: its outputs changed since it finished (model)" in log
    assert (run / FINISHED_FILE).exists()  # recorded again, with the model/ it evaluated


def test_a_lora_runs_deleted_adapter_is_a_changed_output(tmp_path):
    """finished.json fingerprints adapter/ too: a LoRA run whose adapter was deleted is not "finished
    already" (before, it was: results.json kept pointing to the missing adapter)."""
    from pipeline.finished import _outputs

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 16)
    before = _outputs(tmp_path)
    assert before["adapter"] and _outputs(tmp_path) == before
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter").rmdir()
    assert _outputs(tmp_path)["adapter"] is None


def test_a_dry_run_or_a_launch_stopped_by_its_inputs_keeps_the_runs_config_yaml(tmp_path):
    """config.yaml is written once the job has passed its input checks: a dry run, or a launch with a
    prompt format the tokenizer cannot render (exit 2), in a finished run's directory left its
    config.yaml rewritten with their own settings (before: written at the job's start)."""
    args, run = resumable_job(tmp_path)
    (run / ".hydra").mkdir(parents=True)
    (run / "config.yaml").write_text("# the finished run's\n")
    (run / ".hydra" / "config.yaml").write_text("# Hydra's, of the finished run\n")
    dry = launch.run(args + ["trainer.dry_run=true", "trainer.lr=5e-4"])
    assert dry.returncode == 0 and "dry run" in dry.stdout, dry.stderr[-2000:]
    # nor Hydra's record of it (a sweep's report reads .hydra/), and the dry run keeps no job log
    assert (run / ".hydra" / "config.yaml").read_text() == "# Hydra's, of the finished run\n"
    assert not (run / "train.log").exists()
    # a dry run of a new run leaves no directory behind, also when the job refuses it (after Hydra made
    # the directory: a resume path that is no checkpoint)
    fresh = [a for a in args if not a.startswith("run_name=")]
    out = launch.run(fresh + ["run_name=new/x", f"trainer.resume={tmp_path / 'nope'}", "trainer.dry_run=true"])
    assert out.returncode == 2 and "no such checkpoint directory" in out.stderr, out.stderr[-2000:]
    assert not (run.parent / "new").exists()
    bad = launch.run(args + ["model.prompt_format=chat"])  # the tiny tokenizer has no chat template
    assert bad.returncode == 2 and "model.prompt_format" in bad.stderr, bad.stderr[-2000:]
    assert (run / "config.yaml").read_text() == "# the finished run's\n"


def test_a_run_whose_model_lies_in_its_own_directory_is_refused(tmp_path):
    """model.path=runs/x/model trained again with run_name x exported over the weights it started from
    (the README's eval example names such a path): one line, exit 2, the weights untouched."""
    import shutil

    args, run = resumable_job(tmp_path)
    src = next(a.split("=", 1)[1] for a in args if a.startswith("model.path="))
    shutil.copytree(src, run / "model")
    before = {f.name: f.read_bytes() for f in (run / "model").iterdir() if f.is_file()}
    p = launch.run([a if not a.startswith(("model.path=", "model.tokenizer_path=")) else a.split("=")[0] + "="
                    + str(run / "model") for a in args])
    assert p.returncode == 2, p.stderr[-2000:]
    assert "config error at 'model.path'" in p.stderr and f"lies in {run / 'model'}" in p.stderr
    assert "Traceback" not in p.stderr
    assert {f.name: f.read_bytes() for f in (run / "model").iterdir() if f.is_file()} == before


def test_a_model_elsewhere_under_the_run_directory_is_accepted(tmp_path):
    """Only what the run writes weights into (model/, adapter/, checkpoints/) is refused: another run's
    export nested under this run's directory (hydra.run.dir=. over a tree of runs) is an input like any."""
    import shutil

    args, run = resumable_job(tmp_path)
    src = next(a.split("=", 1)[1] for a in args if a.startswith("model.path="))
    nested = run / "x" / "asu_kl" / "model"
    shutil.copytree(src, nested)
    p = launch.run([a if not a.startswith(("model.path=", "model.tokenizer_path=")) else a.split("=")[0] + "="
                    + str(nested) for a in args] + ["trainer.dry_run=true"])
    assert p.returncode == 0, p.stderr[-2000:]


def test_the_key_covers_the_evaluation_rows_and_forget_qualitys_reference(tmp_path):
    """A finished run's results are not returned after an evaluation split's rows, the retain model's
    files or the reference file changed in place: before, only the forget/retain rows and the config
    (paths) were in the key, and the re-run reported the earlier numbers as current."""
    from types import SimpleNamespace

    from pipeline.finished import job_key
    from pipeline.models.loading import load_tokenizer
    from tests.helpers.tiny import build

    model_dir = build(tmp_path / "a")[0]
    retain_dir = build(tmp_path / "b", seed=1)[0]
    reference = tmp_path / "reference.json"
    reference.write_text('{"forget_truth_ratio": [0.5]}')
    rows = [{"question": "q", "answer": "a"}]

    def key(eval_rows, with_reference=True):
        cfg = OmegaConf.create({"eval": {"enabled": True, "retain_reference": str(reference) if with_reference else None}})
        inputs = SimpleNamespace(paths=SimpleNamespace(model=str(model_dir), retain_model=str(retain_dir)),
                                 data=SimpleNamespace(forget=rows, retain=rows, eval={"world_facts": eval_rows}),
                                 tokenizer=load_tokenizer(model_dir))
        return job_key(cfg, 1, inputs)

    first = key(rows)
    assert key(rows) == first
    assert key([{"question": "q", "answer": "b"}]) != first  # an evaluation split rewritten
    reference.write_text('{"forget_truth_ratio": [0.6]}')
    assert key(rows) != first  # the reference file rewritten
    second = key(rows)
    (retain_dir / "config.json").write_text((retain_dir / "config.json").read_text().replace("}", ', "x": 1}', 1))
    assert key(rows) != second  # the retain model's files changed


@pytest.mark.distributed
def test_a_resume_under_other_kernels_says_so_and_results_record_both(tmp_path):
    """A run resumed with another kernels.attention / kernels.kl (the same math, other kernels) was
    recorded as if every step had run with the new ones; the checkpoint now records its steps'
    kernels (not compared), the resume warns, and results.json names the checkpoint and its kernels."""
    args, run = resumable_job(tmp_path)
    assert launch.run(args).returncode == 0
    out = launch.run(args + ["kernels.attention=torch", "eval.max_new_tokens=6"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "its 4 steps ran with kernels {'attention': 'auto', 'kl': 'naive', 'passes': 'joint'}" in out.stderr
    res = json.loads((run / "results.json").read_text())
    assert res["resumed_from"] == {"checkpoint": "step_00000004", "step": 4,
                                   "kernels": {"attention": "auto", "kl": "naive", "passes": "joint"}}
    assert res["kernels"] == {"attention": "torch", "kl": "naive"} and res["method_config"]["name"] == "grad_diff"


def test_fp16_on_cpu_ranks_is_one_line_before_any_model_loads(tmp_path):
    args, run = resumable_job(tmp_path)
    out = launch.run(args + ["deepspeed.precision=fp16"])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "config error at 'deepspeed.precision': fp16 needs GPU ranks" in out.stderr
    assert not (run / "model").exists()
