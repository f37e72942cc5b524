"""The forget-quality reference (retain model's forget truth ratios): keyed, verified, or read from a file."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config import RunConfig
from pipeline.eval.reference import RetainReferenceError, load_reference_file
from pipeline.eval.runner import _settings, retain_reference, truth_ratio_key
from pipeline.eval.tofu import evaluate_split
from pipeline.inputs import ModelPaths
from pipeline.models.loading import load_causal_lm, load_tokenizer
from tests.helpers.tiny import CITIES, PEOPLE, build, qa_row, unloadable_model

ROOT = Path(__file__).resolve().parents[1]
ROWS = [qa_row(p, c) for p, c in zip(PEOPLE[:3], CITIES[:3])]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two different retain models side by side in one folder (as under a hub organisation)."""
    root = tmp_path_factory.mktemp("ref")
    (root / "models").mkdir()
    for name, seed in (("retain_a", 0), ("retain_b", 1)):
        model_dir, data_dir = build(root / name, seed=seed)
        shutil.move(str(model_dir), root / "models" / name)
    return root


def _cfg(root: Path, **eval_over):
    cfg = OmegaConf.structured(RunConfig)
    cfg.cache_dir = str(root / "cache")
    cfg.eval.batch_size, cfg.eval.max_new_tokens, cfg.eval.max_length = 4, 2, 64
    for k, v in eval_over.items():
        cfg.eval[k] = v
    return cfg


def _paths(root: Path, name: str, shared_cache: bool = True) -> ModelPaths:
    m = str(root / "models" / name)
    return ModelPaths(m, m, None, m, str(root / "models") if shared_cache else None)


def _direct(root: Path, name: str, cfg) -> list[float]:
    model = load_causal_lm(root / "models" / name, "float32", False, False).eval()
    tok = load_tokenizer(root / "models" / name, False)
    return evaluate_split(model, tok, ROWS, _settings(cfg), name="forget", truth_ratio_key=truth_ratio_key(cfg)).truth_ratio


def test_two_retain_models_in_one_folder_get_their_own_reference(models, caplog):
    root, cfg = models, _cfg(models)
    tok = load_tokenizer(root / "models" / "retain_a", False)
    ref_a, info_a = retain_reference(cfg, _paths(root, "retain_a"), "forget", ROWS, tok)
    ref_b, info_b = retain_reference(cfg, _paths(root, "retain_b"), "forget", ROWS, tok)
    assert info_a["source"] == info_b["source"] == "computed" and info_a["file"] != info_b["file"]
    assert ref_a == pytest.approx(_direct(root, "retain_a", cfg), rel=1e-5)
    assert ref_b == pytest.approx(_direct(root, "retain_b", cfg), rel=1e-5)
    assert ref_a != pytest.approx(ref_b, rel=1e-3)  # different models, different references
    stored = json.loads(Path(info_a["file"]).read_text())["key"]
    assert stored["retain_model"]["path"] == str((root / "models" / "retain_a").resolve())
    assert stored["rows"]["n"] == 3 and stored["settings"]["max_length"] == 64
    assert {f["name"] for f in stored["retain_model"]["files"]} >= {"model.safetensors", "config.json"}
    # read back from the cache, unchanged
    again, info = retain_reference(cfg, _paths(root, "retain_a"), "forget", ROWS, tok)
    assert info["source"] == "cache" and again == ref_a
    # other evaluation settings or other rows: another key, another file (not a stale read)
    _, info_len = retain_reference(_cfg(root, max_length=48), _paths(root, "retain_a"), "forget", ROWS, tok)
    _, info_rows = retain_reference(cfg, _paths(root, "retain_a"), "forget", ROWS[:2], tok)
    assert len({info_a["file"], info_len["file"], info_rows["file"]}) == 3
    assert info_len["source"] == info_rows["source"] == "computed"

    # retain_a rewritten in place (retrained): its cache file no longer matches -> one log line, recomputed
    a = root / "models" / "retain_a"
    shutil.copy(root / "models" / "retain_b" / "model.safetensors", a / "model.safetensors")
    st = (a / "model.safetensors").stat()
    os.utime(a / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.eval.reference"):
        fresh, info = retain_reference(cfg, _paths(root, "retain_a"), "forget", ROWS, tok)
    stale = [r.getMessage() for r in caplog.records if "does not match" in r.getMessage()]
    assert len(stale) == 1 and "retain_model.files" in stale[0] and info_a["file"] in stale[0]
    assert info["source"] == "computed" and info["file"] == info_a["file"]
    assert fresh == pytest.approx(ref_b, rel=1e-5)  # now the weights of b
    # without a shared folder (pretrained runs) the cache lives under cache_dir
    _, info = retain_reference(cfg, _paths(root, "retain_b", shared_cache=False), "forget", ROWS, tok)
    assert Path(info["file"]).parent == root / "cache" / "retain_reference"


def test_a_reference_cached_by_other_evaluation_code_is_recomputed(models, tmp_path, monkeypatch, caplog):
    """The key holds the evaluation code's digest, as the evaluation parts' does: truth ratios that other
    code computed (another answer labelling, say) were read back and KS-tested against this code's."""
    cfg = _cfg(models)
    cfg.cache_dir = str(tmp_path)
    tok = load_tokenizer(models / "models" / "retain_a", False)
    paths = _paths(models, "retain_a", shared_cache=False)
    ref, info = retain_reference(cfg, paths, "forget", ROWS, tok)
    assert info["source"] == "computed"
    assert retain_reference(cfg, paths, "forget", ROWS, tok)[1]["source"] == "cache"
    monkeypatch.setattr("pipeline.eval.parts.code_digest", lambda: "other code")
    with caplog.at_level(logging.WARNING, logger="pipeline.eval.reference"):
        again, info2 = retain_reference(cfg, paths, "forget", ROWS, tok)
    stale = [r.getMessage() for r in caplog.records if "does not match" in r.getMessage()]
    assert len(stale) == 1 and "(code differ)" in stale[0], stale
    assert info2["source"] == "computed" and info2["file"] == info["file"]  # replaced, not one file per code
    assert json.loads(Path(info["file"]).read_text())["key"]["code"] == "other code"
    assert again == pytest.approx(ref, rel=1e-6)


def test_our_cache_file_passes_the_check_before_training_at_the_models_context(models, tmp_path):
    """The evaluation scores at eval.max_length capped at the model's context (192 -> 64 here, as the
    embedded benchmark's 192 -> 128), and the cache file records that length: the check before training
    compared it with the uncapped 192 and refused the very file the evaluation would accept."""
    from pipeline.data.common import UnlearningData
    from pipeline.eval.runner import at_model_context, check_eval_inputs

    model_dir = models / "models" / "retain_a"
    tok = load_tokenizer(model_dir, False)
    cfg = _cfg(models, max_length=192)
    cfg.cache_dir = str(tmp_path)
    _, info = retain_reference(at_model_context(cfg, model_dir), _paths(models, "retain_a", shared_cache=False),
                               "forget", ROWS, tok)
    assert json.loads(Path(info["file"]).read_text())["key"]["settings"]["max_length"] == 64
    data = UnlearningData("json", ROWS, ROWS[:1])
    check_eval_inputs(_cfg(models, max_length=192, retain_reference=info["file"]), data, model_dir)
    with pytest.raises(RetainReferenceError, match=r"max_length 64 there, 48 here"):
        check_eval_inputs(_cfg(models, max_length=48, retain_reference=info["file"]), data, model_dir)


def _ou_logs(scores, answers=None):
    """open-unlearning's TOFU_EVAL.json shape (saves/eval/tofu_<model>_retain90/TOFU_EVAL.json)."""
    logs = {"forget_truth_ratio": {"agg_value": 0.6, "value_by_index": {str(i): {"score": s} for i, s in enumerate(scores)}}}
    if answers is not None:
        logs["forget_Q_A_ROUGE"] = {"agg_value": 0.4, "value_by_index": {
            str(i): {"rougeL_recall": 0.4, "input": "q", "ground_truth": a, "generation": "g"} for i, a in enumerate(answers)}}
    return logs


def test_precomputed_reference_file_is_read_and_checked(tmp_path):
    good = tmp_path / "TOFU_EVAL.json"
    good.write_text(json.dumps(_ou_logs([0.5, 0.7, 0.9], [r["answer"] for r in ROWS])))
    ratios, fmt = load_reference_file(good, "forget", ROWS)
    assert ratios == [0.5, 0.7, 0.9] and fmt == "open-unlearning"
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"split": "forget", "truth_ratio": [0.1, 0.2, 0.3]}))
    assert load_reference_file(ours, "forget", ROWS) == ([0.1, 0.2, 0.3], "pipeline")
    # one of our cache files records its settings: other ones than this run's are refused, naming them
    here = {"max_length": 64, "truth_ratio_reference": "paraphrase", "model.prompt_format": "chat"}
    ours.write_text(json.dumps({"split": "forget", "truth_ratio": [0.1, 0.2, 0.3], "key": {"settings": here}}))
    assert load_reference_file(ours, "forget", ROWS, dict(here)) == ([0.1, 0.2, 0.3], "pipeline")
    with pytest.raises(RetainReferenceError, match=r"computed with other evaluation settings \(max_length 64 there, "
                                                   r"48 here; model.prompt_format 'chat' there, 'raw' here\); set"):
        load_reference_file(ours, "forget", ROWS, {**here, "max_length": 48, "model.prompt_format": "raw"})

    bad = tmp_path / "bad.json"
    cases = [
        (_ou_logs([0.5, 0.7]), r"forget_truth_ratio has 2 rows, but split 'forget' has 3 rows: the file is for another"),
        (_ou_logs([0.5, 0.7, 0.9], ["x", "y", "z"]), r"row 1's answer differs from split 'forget'"),
        ({"split": "forget05", "truth_ratio": [0.1, 0.2, 0.3]}, r"the reference is for split 'forget05', this run forgets 'forget'"),
        ({"truth_ratio": [0.1]}, r"1 truth ratios, but split 'forget' has 3 rows"),
        ({"forget_Q_A_Prob": {}}, r"not a retain reference"),
    ]
    for obj, msg in cases:
        bad.write_text(json.dumps(obj))
        with pytest.raises(RetainReferenceError, match=msg):
            load_reference_file(bad, "forget", ROWS)
    with pytest.raises(RetainReferenceError, match=r"eval.retain_reference=.*: a directory, not a file"):
        load_reference_file(tmp_path, "forget", ROWS)
    bad.write_text("{not json")
    with pytest.raises(RetainReferenceError, match=r"not readable JSON"):
        load_reference_file(bad, "forget", ROWS)


@pytest.mark.parametrize("extra,error,expect", [
    (["eval.retain_reference={ref}"], "RetainReferenceError", ["has 3 rows", "split 'forget' has 2 rows"]),
    # a typo in eval.splits trained and exported the model, then stopped at the evaluation
    (["eval.splits=[forget,retian]"], "DataError", ["eval.splits ['retian'] not loaded"]),
])
def test_cli_bad_reference_file_or_eval_split_one_line_exit_2(tmp_path, extra, error, expect):
    """Checked right after the data is loaded, before any model: one line, exit 2, nothing written."""
    data = tmp_path / "data"
    data.mkdir()
    for split, rows in (("forget", ROWS[:2]), ("retain", ROWS[2:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ref.json").write_text(json.dumps(_ou_logs([0.5, 0.7, 0.9])))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "launchers/train.py", "model.source=pretrained", f"model.path={unloadable_model(tmp_path)}", "data.name=json",
         f"data.path={data}", "data.forget_split=forget", "data.retain_split=retain", "data.eval_splits=[]",
         *(e.format(ref=tmp_path / "ref.json") for e in extra), f"output_dir={tmp_path / 'runs'}", "run_name=r",
         "logging=none"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    err = [ln for ln in out.stderr.splitlines() if ln.startswith("error (")]
    assert len(err) == 1 and error in err[0] and all(x in err[0] for x in expect), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "runs" / "r" / "model").exists()

