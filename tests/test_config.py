"""Hydra composition with typed schemas: wrong keys/types fail at compose time naming the key."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from pipeline.config import ConfigError, register_configs, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")


def _compose(overrides=()):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_default_composes_and_validates():
    cfg = _compose()
    assert cfg.method.name == "asu_kl"
    assert cfg.exp_name == "default"
    validate(cfg)


@pytest.mark.parametrize("method", ["asu_kl", "asu_gd", "grad_ascent", "grad_diff", "npo", "simnpo", "idk_dpo",
                                    "asu_idk", "rmu_tiny", "asu_kl_tiny", "asu_idk_tiny", "asu_kl_rna_tiny"])
def test_each_method_config_composes(method):
    cfg = _compose([f"method={method}", "+exp=tofu_tiny"])
    # the *_tiny variants (values for the embedded benchmark) keep their method's name
    assert cfg.method.name == method.removesuffix("_tiny").removesuffix("_rna")
    validate(cfg)


EXPS = sorted(f.removesuffix(".yaml") for f in os.listdir(os.path.join(CONF, "exp")))
BASELINES = ["grad_ascent", "grad_diff", "npo", "simnpo", "idk_dpo", "rmu", "asu_gd", "asu_kl"]
# what an experiment leaves to the user (own_qa_7b: the model and the data directory)
USER_GIVES = {"own_qa_7b": ["model.path=/some/model", "data.path=tests/fixtures/own_qa"],
              "realworld_llama3_8b": ["data.path=tests/fixtures/own_qa"]}


@pytest.mark.parametrize("exp", EXPS)
def test_every_experiment_composes_with_every_baseline(exp):
    """An experiment's method-specific values live in its method config, so `+exp=X method=Y` composes
    for any method (a key that method lacks, e.g. method.tau for grad_diff, would fail); the layer
    methods need a model with more than 7 layers (the tiny benchmark has 4: a clear config error)."""
    for method in BASELINES:
        cfg = _compose([f"+exp={exp}", f"method={method}", *USER_GIVES.get(exp, [])])
        assert cfg.method.name == method and cfg.exp_name == exp
        if exp == "tofu_tiny" and method == "rmu":
            with pytest.raises(ConfigError, match="method.layer"):
                validate(cfg)
        else:
            validate(cfg)


def test_rmu_control_vector_follows_the_run_seed_unless_set():
    """A seed sweep of RMU must not reuse one steering direction u for every seed (it did: control_seed
    was a constant 0); an explicit method.control_seed still wins."""
    from pipeline.methods.rmu import control_vector

    seeds = [_compose(["method=rmu_tiny", "+exp=tofu_tiny", f"seed={s}"]).method.control_seed for s in (0, 3)]
    assert seeds == [0, 3]
    assert not control_vector(16, seeds[0]).equal(control_vector(16, seeds[1]))
    assert _compose(["method=rmu_tiny", "seed=3", "method.control_seed=5"]).method.control_seed == 5


def test_unknown_key_fails_at_compose_with_path():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        _compose(["trainer.lrr=0.1"])
    assert "lrr" in str(e.value) and "trainer" in str(e.value)


def test_collective_timeout_must_be_positive_and_defaults_to_an_hour():
    assert _compose().deepspeed.timeout_minutes == 60.0
    with pytest.raises(ConfigError, match="deepspeed.timeout_minutes"):
        validate(_compose(["deepspeed.timeout_minutes=0"]))


def test_rouge_stemming_follows_the_benchmark_and_needs_rouge_score(monkeypatch):
    """TOFU and MUSE score ROUGE as their reference evaluator (stemmed); the embedded benchmark does
    not; asking for stemming without the rouge_score package stops at validation, naming the key."""
    import importlib.util

    assert _compose().data.rouge_stemmer is False
    for exp in ("tofu_7b", "muse_news_7b", "muse_books_7b"):
        assert _compose([f"+exp={exp}"]).data.rouge_stemmer is True
    cfg = _compose(["data.rouge_stemmer=true"])
    validate(cfg)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rouge_score" else real(name, *a))
    with pytest.raises(ConfigError, match=r"data.rouge_stemmer.*rouge_score package"):
        validate(cfg)


def test_unknown_method_key_fails_with_path():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        _compose(["method.taux=2.0"])
    assert "taux" in str(e.value)


@pytest.mark.parametrize("override,key,schema", [
    ("+trainer.lrr=0.1", "trainer.lrr", "TrainerConfig"),  # a misspelt key, added with '+'
    ("+method.gama=0.2", "method.gama", "ASUConfig"),
    ("+foo=1", "foo", "RunConfig"),
    ("+model.tiny.layers=4", "model.tiny.layers", "TinyModelConfig"),  # nested schema
])
def test_a_key_added_with_plus_that_nothing_reads_is_refused(override, key, schema):
    cfg = _compose([override])  # '+' gets it past Hydra's own check
    with pytest.raises(ConfigError, match=rf"config error at '{key}': {schema} has no key"):
        validate(cfg)


def test_a_key_of_another_method_is_refused_naming_the_methods_that_have_it():
    """Both ways in (Hydra's refusal, and the key added with the '+' that refusal suggested) say which
    methods take the key: before, neither said that method.tau (and tau=auto) is the ASU methods'."""
    from pipeline.hydra_errors import compose_error_line

    owners = "method.tau is a setting of method=asu_gd, asu_idk, asu_kl, asu_wmdp"
    cfg = _compose(["method=grad_diff", "+method.tau=2.0"])  # tau is ASU's, not GradDiff's
    with pytest.raises(ConfigError, match="'method.tau': GradDiffConfig has no key 'tau'") as e:
        validate(cfg)
    assert str(e.value).endswith(owners)
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["method=grad_diff", "method.tau=auto"])
    line = compose_error_line(e.value)
    assert line.startswith("Could not override 'method.tau'.") and line.endswith(owners), line
    assert "+method.tau" not in line  # Hydra's advice: a key nothing would read


@pytest.mark.parametrize("override,meant", [("method.tua=1.5", "method.tau"), ("trainer.lrr=1e-4", "trainer.lr"),
                                            ("model.peft.rr=8", "model.peft.r")])
def test_a_misspelled_key_names_the_key_it_resembles(override, meant):
    """Hydra's advice for a misspelled key was '+key=...', which adds a key nothing reads (refused
    later, with the same advice missing): the line names the declared key instead, both ways in."""
    from pipeline.hydra_errors import compose_error_line

    with pytest.raises(ConfigCompositionException) as e:
        _compose([override])
    line = compose_error_line(e.value)
    assert line.endswith(f"; did you mean {meant}?") and "To append" not in line, line
    cfg = _compose(["+" + override])
    with pytest.raises(ConfigError, match=rf"did you mean {re.escape(meant)}\?$"):
        validate(cfg)
    assert "did you mean" not in compose_error_line(ValueError("Could not override 'trainer.zzzzzz'. To append +"))
    from pipeline.config import unknown_key_hint

    assert unknown_key_hint("method.extra.tua") == ""  # a method's nested keys: no schema here to compare with


@pytest.mark.parametrize("override,key", [("trainer.lr=hot", "lr"), ("method.gamma=big", "gamma"),
                                          ("trainer.batch_size=2.5", "batch_size")])
def test_wrong_type_fails_at_compose(override, key):
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        _compose([override])
    assert key in str(e.value)


def test_tau_accepts_number_or_auto_only():
    validate(_compose(["method.tau=auto"]))
    with pytest.raises(ConfigError, match="method.tau.*'auto'"):
        validate(_compose(["method.tau=hot"]))
    with pytest.raises(ConfigError, match="method.tau.*must be a number > 0 or 'auto', got True"):
        validate(_compose(["method.tau=true"]))  # float(True) == 1.0: an untempered teacher
    validate(_compose(["method.tau=auto", "method.tau_max=4", "method.tau_form_target=0.9", "method.tau_fact_target=0.8"]))
    for bad, key in (("method.tau_max=1.0", "method.tau_max"), ("method.tau_form_target=0", "method.tau_form_target"),
                     ("method.tau_form_target=1.5", "method.tau_form_target"),
                     ("method.tau_fact_target=0", "method.tau_fact_target")):
        with pytest.raises(ConfigError, match=key):
            validate(_compose(["method.tau=auto", bad]))
    # asu_wmdp's tau is a number: auto is refused with the reason, not a type error at composition
    with pytest.raises(ConfigError, match="method.tau.*asu_wmdp takes a number, not 'auto'.*hidden-state"):
        validate(_compose(["method=asu_wmdp", "method.tau=auto"]))
    with pytest.raises(ConfigError, match="method.tau.*must be > 0"):
        validate(_compose(["method=asu_wmdp", "method.tau=0", "method.layer=2"]))
    validate(_compose(["method=asu_wmdp", "method.tau=2.5", "method.layer=2"]))


@pytest.mark.parametrize(
    "override,key",
    [
        ("method.tau=0", "method.tau"),
        ("method.tau=-1.5", "method.tau"),
        ("trainer.lr=0", "trainer.lr"),
        ("trainer.lr=-1e-5", "trainer.lr"),
        ("method.teacher_layers=[0,99]", "method.teacher_layers"),
        ("data.forget_fraction=0", "data.forget_fraction"),
        ("trainer.nan_policy=ignore", "trainer.nan_policy"),
        ("kernels.kl=magic", "kernels.kl"),
        ("eval.probe_rows=-1", "eval.probe_rows"),
        ("eval.max_rows=0", "eval.max_rows"),
        ("deepspeed.param_persistence_threshold=-5", "deepspeed.param_persistence_threshold"),
        # the embedded benchmark and model, the seed, the threads: tracebacks (a segfault) before
        ("data.synthetic.n_authors=-3", "data.synthetic"),
        ("data.synthetic.qa_per_author=0", "data.synthetic"),
        ("model.tiny.num_key_value_heads=3", "model.tiny.num_key_value_heads"),
        ("model.tiny.batch_size=0", "model.tiny.batch_size"),
        ("seed=99999999999999999999", "seed"),
        ("trainer.num_threads=100000", "trainer.num_threads"),
    ],
)
def test_out_of_range_values_name_key_and_range(override, key):
    cfg = _compose([override])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert key in str(e.value)


@pytest.mark.parametrize("overrides", [["method=grad_ascent"], ["method=asu_kl", "method.alpha=0"],
                                       ["method=npo", "method.retain_loss=none"]])
def test_rna_noise_without_a_retain_term_is_refused(overrides):
    """RNA perturbs the retain rows: without a retain term the run trained without noise while its
    results and checkpoints recorded RNA on."""
    with pytest.raises(ConfigError, match=r"method.rna_noise.*adds noise to the retain rows, but this method has "
                                          r"no retain term"):
        validate(_compose([*overrides, "method.rna_noise=0.05"]))
    validate(_compose([*overrides]))
    if len(overrides) > 1:  # the method with its retain term takes it
        validate(_compose([overrides[0], "method.rna_noise=0.05", "method.rna_layer=1"]))


def test_a_cache_dir_that_is_a_file_is_a_config_error(tmp_path):
    """prepare.py (and every run building the benchmark or a cache) stopped with a FileExistsError traceback."""
    (tmp_path / "f").write_text("x")
    for given in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(ConfigError, match=rf"cache_dir': {re.escape(str(given))}: {re.escape(str(tmp_path / 'f'))} is a "
                                              r"file, not a directory"):
            validate(_compose([f"cache_dir={given}"]))
    validate(_compose([f"cache_dir={tmp_path / 'new' / 'cache'}"]))  # made when first written


def test_layer_range_message_names_allowed_range():
    cfg = _compose(["method.teacher_layers=[0,99]"])
    with pytest.raises(ConfigError, match=r"allowed 0\.\.\d+"):
        validate(cfg)


def test_cli_print_config_job():
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "launchers/train.py", "+exp=tofu_tiny", "--cfg", "job"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "method:" in out.stdout and "tau:" in out.stdout and "zero_stage: auto" in out.stdout


def test_cli_hydra_flag_conflict_is_one_line():
    """-m with --cfg: Hydra's ValueError was a traceback, exit 1."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "launchers/train.py", "-m", "+exp=tofu_tiny", "--cfg", "job"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error (ValueError, rank 0): Only one of"), out.stderr


def test_cli_unknown_key_exits_nonzero_with_message():
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "launchers/train.py", "trainer.bogus_key=1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "bogus_key" in out.stderr


def test_cli_an_override_that_does_not_parse_names_itself_and_the_quoting():
    """A path with a space and '=' was "mismatched input '=' expecting <EOF>", naming neither the override
    nor the way out (quoting)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "launchers/train.py", "output_dir=/tmp/my runs=x"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error (OverrideParseException, rank 0): cannot parse the override "
                               "'output_dir=/tmp/my runs=x': mismatched input '='") and "key='...'" in lines[0], lines


@pytest.mark.parametrize("override,key,expect", [
    ("eval.batch_size=0", "eval.batch_size", "must be >= 1"),  # was a ZeroDivisionError after training
    ("eval.max_new_tokens=0", "eval.max_new_tokens", "must be >= 1"),
    ("eval.max_length=4", "eval.max_length", "must be >= 8"),
    ("eval.mink_k=1.5", "eval.mink_k", "must be in (0, 1]"),
    ("eval.retrain_auc=2", "eval.retrain_auc", "must be in [0, 1]"),
    ("trainer.num_threads=-1", "trainer.num_threads", "must be in 0..1024"),
    # was taken as 0 (every checkpoint kept) and logged as trainer.keep_checkpoints=0
    ("trainer.keep_checkpoints=-1", "trainer.keep_checkpoints", "must be >= 0"),
    # lm-eval would take 2.5 as a count of 2 rows, and a negative limit as every row
    ("eval.lm_eval_limit=2.5", "eval.lm_eval_limit", "must be a number of rows per task (a whole number"),
    ("eval.lm_eval_limit=-1", "eval.lm_eval_limit", "must be a number of rows per task (a whole number"),
    ("eval.lm_eval_num_fewshot=-1", "eval.lm_eval_num_fewshot", "must be >= 0"),
])
def test_evaluation_and_thread_settings_are_checked_before_training(override, key, expect):
    with pytest.raises(ConfigError, match=rf"config error at '{key}': {re.escape(expect)}"):
        validate(_compose([override]))


@pytest.mark.parametrize("tau,warned", [(1.0, True), (0.5, True), (2.3, False)])
def test_a_fixed_tau_at_or_below_one_is_run_with_a_warning(caplog, tau, warned):
    from pipeline.run import _choose_tau

    cfg = _compose([f"method.tau={tau}"])
    validate(cfg)  # allowed: an ablation or a control
    with caplog.at_level("WARNING", logger="pipeline.run"):
        assert _choose_tau(cfg, None, None, Path("."), {}) is None  # nothing to choose
    assert ("is not smoothed" in caplog.text) is warned


@pytest.mark.parametrize("method", ["grad_diff", "npo", "simnpo", "idk_dpo", "grad_ascent"])
def test_the_open_unlearning_tofu_trainer_composes_with_every_baseline(method):
    """trainer=tofu_7b_open_unlearning: open-unlearning's TOFU schedule (10 epochs, 1 warmup epoch,
    linear decay) on the 7B experiment's batch, lr and checkpointing."""
    cfg = _compose(["+exp=tofu_7b", f"method={method}", "trainer=tofu_7b_open_unlearning"])
    validate(cfg)
    t = cfg.trainer
    assert (t.epochs, t.warmup_ratio, t.lr_scheduler, t.lr, t.weight_decay, t.batch_size, t.keep_checkpoints) == \
        (10, 0.1, "linear", 1e-5, 0.01, 4, 1)


def test_an_output_dir_that_cannot_hold_the_run_is_refused(tmp_path):
    a_file = tmp_path / "runs"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=r"config error at 'output_dir': the run directory .* cannot be made: .*runs is a "
                                          r"file, not a directory"):
        validate(_compose([f"output_dir={a_file}"]))
    # a link to nothing (or a loop) was let through, and mkdir stopped on it with "File exists"
    for name, target in (("dangling", tmp_path / "gone" / "x"), ("loop", tmp_path / "loop")):
        (tmp_path / name).symlink_to(target)
        for out in (tmp_path / name, tmp_path / name / "sub"):
            with pytest.raises(ConfigError, match=rf"cannot be made: {tmp_path / name} is a link to nothing \(or a "
                                                  r"loop of links\)"):
                validate(_compose([f"output_dir={out}"]))
        with pytest.raises(ConfigError, match=rf"config error at 'cache_dir': {tmp_path / name}: {tmp_path / name} is a link to "
                                                  r"nothing"):
            validate(_compose([f"cache_dir={tmp_path / name}"]))
    cfg = _compose([f"output_dir={tmp_path / 'out'}"])
    run_dir = tmp_path / "out" / cfg.run_name
    run_dir.parent.mkdir(parents=True)
    run_dir.write_text("")  # the run directory is a file
    with pytest.raises(ConfigError, match=rf"{run_dir} is a file, not a directory"):
        validate(cfg)
    validate(_compose([f"output_dir={tmp_path / 'new' / 'deeper'}"]))  # created later: fine


def test_eval_retain_model_is_checked_and_used_with_the_embedded_model(tmp_path, monkeypatch):
    """model.source=synthetic ignored eval.retain_model silently (a missing path ran, and forget quality
    came from the embedded retain model); now it is checked before anything loads and is the reference."""
    from types import SimpleNamespace

    from pipeline.data import prepare
    from pipeline.inputs import check_model_paths, resolve_paths
    from pipeline.models.loading import ModelLoadError
    from tests.helpers.tiny import build

    cfg = _compose(["eval.retain_model=/nonexistent/retain"])
    with pytest.raises(ModelLoadError, match="eval.retain_model=/nonexistent/retain: no such directory"):
        check_model_paths(cfg)
    gold = build(tmp_path / "gold")[0]
    cfg = _compose([f"eval.retain_model={gold}"])
    check_model_paths(cfg)
    # the embedded benchmark's directories (building it takes minutes; only the paths matter here)
    art = SimpleNamespace(**{k: tmp_path / k for k in ("target_dir", "retain_dir", "tokenizer_dir", "data_dir", "root")})
    monkeypatch.setattr(prepare, "prepare_synthetic", lambda *a, **k: art)
    assert resolve_paths(cfg).retain_model == str(gold)
    assert resolve_paths(_compose()).retain_model == str(art.retain_dir)


def test_lora_merged_dtype_is_float32_or_the_models():
    assert _compose(["model.peft.enabled=true"]).model.peft.merged_dtype == "float32"
    validate(_compose(["model.peft.enabled=true", "model.peft.merged_dtype=model"]))
    with pytest.raises(ConfigError, match="model.peft.merged_dtype"):
        validate(_compose(["model.peft.enabled=true", "model.peft.merged_dtype=bf16"]))


def test_method_group_options_are_the_method_configs_only():
    """The typed schemas are stored outside the method group: ``--help`` and the "available:" list of
    a mistyped ``method=`` show only configs a user can pick, each one composing."""
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        options = GlobalHydra.instance().config_loader().get_group_options("method")
    yamls = sorted(p.stem for p in Path(CONF, "method").glob("*.yaml"))
    assert options == yamls


@pytest.mark.parametrize("override,key", [
    ("+deepspeed.extra={zero_optimization:{stage:3}}", "deepspeed.extra.zero_optimization.stage"),
    ("+deepspeed.extra={gradient_accumulation_steps:4}", "deepspeed.extra.gradient_accumulation_steps"),
    ("+deepspeed.extra={train_micro_batch_size_per_gpu:2}", "deepspeed.extra.train_micro_batch_size_per_gpu"),
    ("+deepspeed.extra={bf16:{enabled:true}}", "deepspeed.extra.bf16.enabled"),
    ("+deepspeed.extra={zero_optimization:{offload_optimizer:{device:cpu}}}",
     "deepspeed.extra.zero_optimization.offload_optimizer"),
])
def test_deepspeed_extra_may_not_set_what_the_pipeline_derives(override, key):
    """A stage or batch merged in from deepspeed.extra ran while the log, results.json and checkpoint
    meta said another (a stage 3 on a run planned as stage 0 trained, then failed at its export)."""
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(_compose([override]))
    validate(_compose(["+deepspeed.extra={zero_optimization:{stage3_max_live_parameters:100000000}}"]))


@pytest.mark.parametrize("stage", [1, 2])
def test_nan_skip_is_refused_where_the_gradient_check_cannot_see_the_gradients(stage):
    with pytest.raises(ConfigError, match="trainer.nan_policy"):
        validate(_compose(["trainer.nan_policy=skip", f"deepspeed.zero_stage={stage}"]))
    validate(_compose(["trainer.nan_policy=skip", "deepspeed.zero_stage=3"]))


@pytest.mark.parametrize("override, key, why", [
    ("deepspeed.zero_stage=true", "deepspeed.zero_stage", "must be auto or 0..3, got True"),  # True == 1: stage 1
    ("deepspeed.offload_optimizer=cpu", "deepspeed.offload_optimizer", "needs deepspeed.zero_stage 1, 2, 3"),
    ("run_name=''", "run_name", "name a directory under output_dir"),
    ("run_name=../../elsewhere", "run_name", "no '..' parts"),
    ("run_name=.", "run_name", "name a directory under output_dir"),
    ("run_name=/elsewhere", "run_name", "(relative,"),
    ("kernels=fused", "kernels.kl", "does not support deepspeed.precision=fp16"),  # its gradients underflowed
    ("model.peft.enabled=true", "model.peft.target_modules", "is the output head"),  # the fused KL ignored it
])
def test_values_that_ran_as_something_else_are_refused(override, key, why):
    extra = (["deepspeed.zero_stage=0"] if "offload" in override else
             ["deepspeed.precision=fp16"] if "kernels" in override else
             ["kernels=fused", "model.peft.target_modules=[q_proj,lm_head]"] if "peft" in override else [])
    with pytest.raises(ConfigError, match=re.escape(key) + ".*" + re.escape(why)):
        validate(_compose([override, *extra]))
    validate(_compose(["deepspeed.offload_optimizer=cpu", "deepspeed.zero_stage=2", "run_name=a/b"]))
    validate(_compose(["kernels=fused", "model.peft.enabled=true", "model.peft.target_modules=[q_proj,v_proj]"]))
