"""lm-evaluation-harness for real: its own evaluator (``simple_evaluate`` with a ``TaskManager``
over a local, WMDP-shaped task shipped in ``tests/fixtures/lm_eval_tasks``) runs through our bridge
on a tiny Llama, and its accuracy and per-choice log-likelihoods equal our multiple-choice scorer's
(:mod:`pipeline.eval.mcq`) on the same rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.eval.lm_eval_bridge import run_lm_eval
from pipeline.eval.mcq import MCQSettings, evaluate_mcq, mcq_accuracy

TASK_DIR = Path(__file__).parent / "fixtures" / "lm_eval_tasks"
ROWS_FILE = TASK_DIR / "wmdp_local" / "test.jsonl"


def _tiny_model_dir(root: Path, rows: list[dict], bos_tokenizer: bool = False) -> Path:
    """A random tiny Llama whose word-level vocabulary covers the task's prompts; ``bos_tokenizer``:
    its tokenizer prepends ``<bos>`` to every encoding, as Llama's and Zephyr's do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = " ".join([r["question"] + " " + " ".join(r["choices"]) for r in rows]
                    + ["The following are multiple choice questions (with answers) about biology. A B C D Answer:"])
    pre = pre_tokenizers.Whitespace()
    words = dict.fromkeys(w for w, _ in pre.pre_tokenize_str(text))
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    if bos_tokenizer:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>")
    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.5)
    out = root / ("model_bos" if bos_tokenizer else "model")
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def test_lm_eval_evaluator_equals_our_mcq_scorer(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="the lm-eval extra (requirements/extras.lock) is not installed")
    from pipeline.models.loading import load_causal_lm, load_tokenizer

    rows = [json.loads(line) for line in ROWS_FILE.read_text().splitlines()]
    model_dir = _tiny_model_dir(tmp_path, rows)
    out = run_lm_eval(model_dir, ["wmdp_local"], include_path=TASK_DIR, include_defaults=False,
                      batch_size=4, log_samples=True)
    theirs = out["samples"]["wmdp_local"]
    assert [s["doc_id"] for s in theirs] == list(range(len(rows)))
    assert [int(s["target"]) for s in theirs] == [r["answer"] for r in rows]

    model = load_causal_lm(model_dir).eval()
    ours = evaluate_mcq(model, load_tokenizer(model_dir), rows, MCQSettings(batch_size=4), name="wmdp-bio")
    for s, ll in zip(theirs, ours.values["logliks"]):
        assert s["logliks"] == pytest.approx(ll, abs=1e-4)
    # The random model must not answer everything the same way, or the comparison would be weak.
    assert len(set(ours.values["pred"])) > 1
    assert out["summary"]["wmdp_local"] == pytest.approx(mcq_accuracy(ours), abs=1e-12)
    assert out["summary"]["wmdp_local_stderr"] > 0

    # The runner's hook: on rank 0 it adds lm-eval's summary to an existing results.json; any
    # other rank returns at once (it has no collective to wait on while rank 0 evaluates).
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.config import register_configs
    from pipeline.eval.report import write_results
    from pipeline.eval.runner import add_lm_eval

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(__file__).parents[1] / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "eval.lm_eval=true", "eval.lm_eval_tasks=[wmdp_local]", f"eval.lm_eval_include_path={TASK_DIR}",
            "eval.lm_eval_include_defaults=false", "eval.batch_size=4"])
    run_dir = tmp_path / "run"
    write_results(run_dir, "asu_kl", 2.0, {"forget_fact_recall": 0.5})
    monkeypatch.setenv("RANK", "1")
    assert add_lm_eval(cfg, model_dir, run_dir) is None
    assert "lm_eval" not in json.loads((run_dir / "results.json").read_text())["metrics"]
    monkeypatch.setenv("RANK", "0")
    assert add_lm_eval(cfg, model_dir, run_dir) == {"wmdp_local": out["summary"]["wmdp_local"],
                                                      "wmdp_local_stderr": out["summary"]["wmdp_local_stderr"]}
    results = json.loads((run_dir / "results.json").read_text())
    saved = results["metrics"]
    assert saved["forget_fact_recall"] == 0.5 and saved["lm_eval"]["wmdp_local"] == out["summary"]["wmdp_local"]
    # what ran is recorded (BOS, shots, chat template, dtype, version), and lm-eval's full results kept
    import lm_eval

    ran = results["lm_eval"]
    assert (ran["add_bos"], ran["num_fewshot"], ran["chat_template"], ran["dtype"], ran["tasks"]) == (
        False, 0, False, "float32", ["wmdp_local"])
    assert ran["version"] == lm_eval.__version__ and ran["file"] == "lm_eval.json"
    full = json.loads((run_dir / "lm_eval.json").read_text())
    assert full["results"]["wmdp_local"]["acc,none"] == out["summary"]["wmdp_local"]


def test_summary_keeps_acc_norm_and_names_tasks_without_acc(caplog):
    from pipeline.eval.lm_eval_bridge import summarize

    raw = {"results": {"arc": {"alias": "arc", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6},
                       "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25}}}
    with caplog.at_level("WARNING"):
        assert summarize(raw, ["arc", "gsm8k"]) == {"arc": 0.5, "arc_stderr": 0.1, "arc_acc_norm": 0.6}
    assert "lm-eval task gsm8k reports no acc (its metrics: exact_match)" in caplog.text


def _task_dir_with(tmp_path: Path, task: str, data_line: str) -> Path:
    """A task folder holding a copy of the wmdp_local task named ``task`` whose data comes from
    ``data_line`` instead of its ``custom_dataset`` line."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    local = (TASK_DIR / "wmdp_local" / "wmdp_local.yaml").read_text()
    (tasks / f"{task}.yaml").write_text(local.replace("task: wmdp_local", f"task: {task}").replace(
        "custom_dataset: !function wmdp_local_data.load", data_line))
    return tasks


def _refused_eval(tmp_path: Path, run_name: str, task: str, include_path: Path) -> str:
    """``launchers/eval.py`` with lm-eval on ``task``, expected to stop with exit code 2 and no traceback:
    its last stderr line."""
    import os
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    model_dir = _tiny_model_dir(tmp_path, [json.loads(line) for line in ROWS_FILE.read_text().splitlines()])
    out = subprocess.run(
        [sys.executable, "launchers/eval.py", "data=wmdp_cyber", "data.path=tests/fixtures/wmdp",
         "data.eval_splits=[wmdp-cyber]", "model.source=pretrained", f"model.path={model_dir}",
         f"output_dir={tmp_path}", f"run_name={run_name}", "eval.lm_eval=true", f"eval.lm_eval_tasks=[{task}]",
         "eval.lm_eval_include_defaults=false", f"eval.lm_eval_include_path={include_path}"],
        cwd=root, env=dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(root)),
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return out.stderr.strip().splitlines()[-1]


def test_an_unknown_task_stops_the_job_before_its_model_loads(tmp_path):
    """eval.lm_eval_tasks is checked against lm-eval's task index at the job's start: one line, exit
    code 2. Before, a traceback (KeyError) and exit 1 — after training, in a training job."""
    pytest.importorskip("lm_eval", reason="the lm-eval extra (requirements/extras.lock) is not installed")
    last = _refused_eval(tmp_path, "bad", "wmdp_locl", TASK_DIR)
    assert last == (f"error (LmEvalError, rank 0): eval.lm_eval_tasks: lm-eval knows no task or group ['wmdp_locl'] "
                    f"(searched {TASK_DIR}); wmdp_locl: did you mean wmdp_local?"), last
    assert not (tmp_path / "bad" / "results.json").exists()


def test_a_task_whose_dataset_cannot_be_read_offline_stops_the_job_at_its_start(tmp_path):
    """A task whose dataset is on the hub and not in the cache (runs are offline) stops the job at its
    start, in one line, exit code 2. Before, the task's name passed the start's check and the dataset
    was first read by the evaluation at the end: after a training job's whole training."""
    pytest.importorskip("lm_eval", reason="the lm-eval extra (requirements/extras.lock) is not installed")
    tasks = _task_dir_with(tmp_path, "wmdp_hub", "dataset_path: asu-tests/no-such-dataset")
    last = _refused_eval(tmp_path, "hub", "wmdp_hub", tasks)
    assert last.startswith("error (LmEvalError, rank 0): lm-eval tasks ['wmdp_hub']: a dataset could not be read ("), last
    assert last.endswith("offline runs need the datasets in the HF cache or local task YAMLs "
                         "(eval.lm_eval_include_path)"), last
    # refused before its run began: nothing evaluated, and the directory the launch made is gone again
    assert not (tmp_path / "hub").exists()


@pytest.mark.parametrize("bos_tokenizer", [True, False])
@pytest.mark.parametrize("add_bos", [False, True])
def test_with_a_tokenizer_that_adds_bos_or_not_lm_eval_still_scores_as_our_scorer(tmp_path, add_bos, bos_tokenizer):
    """lm-eval >= 0.4.10 adds the tokenizer's BOS unless told (Zephyr's, Llama's add <s>); the bridge
    tells it eval.mcq_add_bos, so lm-eval and our scorer score the same ids either way. Before, with
    such a tokenizer lm-eval's log-likelihoods differed from ours by up to ~3 nats per choice; and
    with eval.mcq_add_bos=true and a tokenizer that adds no BOS of its own (GPT-2 style: SmolLM2,
    Qwen), lm-eval added none while our scorer did (up to 6.9 nats per choice apart)."""
    pytest.importorskip("lm_eval", reason="the lm-eval extra (requirements/extras.lock) is not installed")
    from pipeline.models.loading import load_causal_lm, load_tokenizer

    rows = [json.loads(line) for line in ROWS_FILE.read_text().splitlines()]
    model_dir = _tiny_model_dir(tmp_path, rows, bos_tokenizer=bos_tokenizer)
    tok = load_tokenizer(model_dir)
    assert (tok("A")["input_ids"][0] == tok.bos_token_id) == bos_tokenizer  # the tokenizer adds it, or not
    out = run_lm_eval(model_dir, ["wmdp_local"], include_path=TASK_DIR, include_defaults=False, batch_size=4,
                      log_samples=True, add_bos=add_bos)
    ours = evaluate_mcq(load_causal_lm(model_dir).eval(), tok, rows, MCQSettings(batch_size=4, add_bos=add_bos),
                        name="wmdp-bio")
    for s, ll in zip(out["samples"]["wmdp_local"], ours.values["logliks"]):
        assert s["logliks"] == pytest.approx(ll, abs=1e-4)


def test_an_evaluation_only_job_of_a_pinned_hub_model_runs_lm_eval_on_it(tmp_path):
    """`launchers/eval.py model.path=<hub id> model.revision=<tag> eval.lm_eval=true` (the base model's
    WMDP/MMLU before unlearning): lm-eval scores the pinned snapshot. Before, after every other metric
    was written, a traceback: `FileNotFoundError: model directory org/m does not exist`."""
    pytest.importorskip("lm_eval", reason="the lm-eval extra (requirements/extras.lock) is not installed")
    import shutil

    from tests.helpers.launch import run

    model_dir = _tiny_model_dir(tmp_path, [json.loads(line) for line in ROWS_FILE.read_text().splitlines()])
    repo = tmp_path / "hub" / "models--org--wmdp-tiny"
    shutil.copytree(model_dir, repo / "snapshots" / ("d" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text("d" * 40)  # only the pinned download: no refs/main
    out = run(["data=wmdp_cyber", "data.path=tests/fixtures/wmdp", "data.eval_splits=[wmdp-cyber]",
               "model.source=pretrained", "model.path=org/wmdp-tiny", "model.revision=v1", f"output_dir={tmp_path}",
               "run_name=base", "eval.lm_eval=true", "eval.lm_eval_tasks=[wmdp_local]", "logging=none",
               "eval.lm_eval_include_defaults=false", f"eval.lm_eval_include_path={TASK_DIR}", "eval.batch_size=4"],
              script="launchers/eval.py", timeout=240, HF_HUB_CACHE=str(tmp_path / "hub"))
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "base" / "results.json").read_text())
    assert 0.0 <= results["metrics"]["lm_eval"]["wmdp_local"] <= 1.0
    # the run's prompt format is not applied to WMDP; results.json names the prompts that were
    assert results["prompt_format"]["applied_to"] == []
    assert results["prompt_format"]["evaluation_prompts"].startswith("lm-eval's multiple-choice template")


def test_an_evaluation_only_job_gives_lm_eval_the_tokenizer_of_model_tokenizer_path(tmp_path):
    """A model directory without a tokenizer (``model.tokenizer_path`` names it, as the MUSE 7B configs
    do): lm-eval scores with that tokenizer, as our own scorers do. Before, lm-eval loaded the
    tokenizer from the model directory: an error after every other metric was written (or, where the
    model ships a tokenizer of its own, lm-eval and our scorer tokenized differently)."""
    pytest.importorskip("lm_eval", reason="the lm-eval extra (requirements/extras.lock) is not installed")
    import shutil

    from tests.helpers.launch import run

    full = _tiny_model_dir(tmp_path, [json.loads(line) for line in ROWS_FILE.read_text().splitlines()])
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    for f in full.iterdir():
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            shutil.copy(f, weights_only / f.name)
    out = run(["data=wmdp_cyber", "data.path=tests/fixtures/wmdp", "data.eval_splits=[wmdp-cyber]",
               "model.source=pretrained", f"model.path={weights_only}", f"model.tokenizer_path={full}",
               f"output_dir={tmp_path}", "run_name=base", "eval.lm_eval=true", "eval.lm_eval_tasks=[wmdp_local]",
               "logging=none", "eval.lm_eval_include_defaults=false", f"eval.lm_eval_include_path={TASK_DIR}",
               "eval.batch_size=4"], script="launchers/eval.py", timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "base" / "results.json").read_text())
    assert results["lm_eval"]["tokenizer"] == str(full)
    # the same numbers as lm-eval on the model directory that holds the tokenizer itself
    direct = run_lm_eval(full, ["wmdp_local"], include_path=TASK_DIR, include_defaults=False, batch_size=4)
    assert results["metrics"]["lm_eval"] == direct["summary"]


def test_eval_lm_eval_limit_scores_part_of_each_task_and_the_report_says_so(tmp_path):
    """``eval.lm_eval_limit`` / ``eval.lm_eval_num_fewshot`` reach lm-eval (before, every run was 0-shot
    over every row, with no setting to change either), and report.md and the stdout summary say which
    rows were scored, so a quick look is not read as a full result."""
    pytest.importorskip("lm_eval", reason="the lm-eval extra (requirements/extras.lock) is not installed")
    from tests.helpers.launch import run

    model_dir = _tiny_model_dir(tmp_path, [json.loads(line) for line in ROWS_FILE.read_text().splitlines()])
    out = run(["data=wmdp_cyber", "data.path=tests/fixtures/wmdp", "data.eval_splits=[wmdp-cyber]",
               "model.source=pretrained", f"model.path={model_dir}", f"output_dir={tmp_path}", "run_name=part",
               "eval.lm_eval=true", "eval.lm_eval_tasks=[wmdp_local]", "logging=none", "eval.lm_eval_limit=3",
               "eval.lm_eval_num_fewshot=1", "eval.lm_eval_include_defaults=false",
               f"eval.lm_eval_include_path={TASK_DIR}", "eval.batch_size=4"], script="launchers/eval.py", timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "part"
    raw = json.loads((run_dir / "lm_eval.json").read_text())
    assert raw["n-samples"]["wmdp_local"] == {"original": 8, "effective": 3}
    settings = json.loads((run_dir / "results.json").read_text())["lm_eval"]
    assert (settings["limit"], settings["num_fewshot"]) == (3, 1)
    line = ("lm-eval 0.4.13: wmdp_local; 1-shot, the first 3 rows of each task only (limit=3: a quick look, not "
            "comparable with full runs), BOS not added, no chat template, float32")
    assert f"| lm_eval | {line} |" in (run_dir / "report.md").read_text()
    score = json.loads((run_dir / "results.json").read_text())["metrics"]["lm_eval"]["wmdp_local"]
    assert out.stdout.strip().splitlines()[-1] == (
        f"lm-eval 0.4.13: wmdp_local {score:.4f} (1-shot, the first 3 rows of each task only (limit=3: a quick look, "
        f"not comparable with full runs), BOS not added, no chat template, float32)"), out.stdout


@pytest.mark.parametrize("raised, line", [
    ("ValueError(\"Couldn't find cache for org/x for config 'other'\")",
     "a dataset could not be read (ValueError: Couldn't find cache for org/x for config 'other'); offline runs need"),
    ("RuntimeError('bad column')", "could not be built (RuntimeError: bad column)"),
])
def test_a_task_that_cannot_be_built_is_one_lm_eval_error(tmp_path, raised, line):
    """datasets' offline miss of a config it cached under another name is a ValueError, and a task's own
    code (custom_dataset, process_docs) may raise anything: each was a traceback on rank 0 at the job's
    start (the other ranks waiting in the check's collective), now one LmEvalError line."""
    pytest.importorskip("lm_eval", reason="the lm-eval extra (requirements/extras.lock) is not installed")
    from pipeline.eval.lm_eval_bridge import LmEvalError, check_task_data

    tasks = _task_dir_with(tmp_path, "broken", "custom_dataset: !function broken_data.load")
    (tasks / "broken_data.py").write_text(f"def load(**kwargs):\n    raise {raised}\n")
    with pytest.raises(LmEvalError) as e:
        check_task_data(["broken"], tasks, include_defaults=False)
    assert str(e.value).startswith("lm-eval tasks ['broken']: ") and line in str(e.value), str(e.value)
