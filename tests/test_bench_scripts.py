"""The benchmark scripts' shared plumbing (benchmarks/common.py): a bad argument is one line and exit
code 2 in every script (before anything heavy runs), result names carry every non-default argument
(a smoke run never overwrites a committed result), ``--out`` is a directory (a ``.json`` path still
names the file), implementations are timed side by side in rotated rounds, every result records the
git commit, and bench_step_vs_commit refuses new/old ratios of different timing methods. Fast: no
benchmark runs (< 20 s)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.launch import ROOT, env

sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402  (benchmarks/common.py)

BAD_ARGS = [  # (script, arguments): each must be refused by its parser; one or two per script and kind
    ("bench_kl.py", ["--dtype", "float99"]),
    ("bench_attention.py", ["--heads", "6", "--kv-heads", "4"]),  # checked after parsing
    ("bench_memory.py", ["--ds-extra", "{bad"]),
    ("bench_teacher_cache.py", ["--ks", "-3"]),
    ("bench_step.py", ["--threads", "0"]),
    ("bench_step_vs_commit.py", ["--rounds", "0"]),
    ("tau_auto_study.py", ["--bench", "foo"]),
    ("gpu_check.py", ["kl", "--timeout", "0"]),
    ("asu_tiny_study.py", ["--taus", "x"]),  # parsed before the benchmark is prepared (minutes)
]
if not torch.cuda.is_available():
    BAD_ARGS.append(("bench_kl.py", ["--device", "cuda"]))


@pytest.mark.parametrize(("script", "args"), BAD_ARGS, ids=[f"{s} {' '.join(a)}" for s, a in BAD_ARGS])
def test_bad_argument_is_one_line_and_exit_2(script: str, args: list[str]):
    p = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error (usage, {script})"), p.stderr
    assert not p.stdout.strip()


def test_out_name_carries_every_non_default_argument():
    defaults = {"rows": 1024, "vocab": [32000, 128256], "dtype": "float32", "tau": 2.3, "flag": False, "extra": {}}
    same = dict(defaults, vocab=(32000, 128256))
    assert common.out_name("bench_x", same, defaults) == "bench_x"
    changed = dict(defaults, rows=64, vocab=[1000], tau=2.0, flag=True)
    assert common.out_name("bench_x", changed, defaults, labels={"vocab": "v"}) == "bench_x_rows-64_v1000_tau-2_flag"
    long = common.out_name("b", dict(defaults, extra={"zero_optimization": {"stage3_max_live_parameters": 10**9}}),
                           defaults)
    assert long.startswith("b_extra-") and len(long) == len("b_extra-") + 8  # a long value by its hash


def test_write_json_out_is_a_directory_or_a_json_file(tmp_path: Path):
    payload = {"env": {"device": "cpu"}, "x": 1}
    assert common.write_json("bench_y", payload, tmp_path / "d") == tmp_path / "d" / "bench_y_cpu.json"
    # the earlier meaning (bench_step / bench_memory, tests, bench_step_vs_commit): the file itself
    assert common.write_json("ignored", payload, tmp_path / "run_cpu.json") == tmp_path / "run_cpu.json"
    assert common.write_json("ignored", payload, tmp_path / "new1.json") == tmp_path / "new1_cpu.json"
    path = common.write_json("study", payload, tmp_path, device_suffix=False)
    assert path == tmp_path / "study.json" and json.loads(path.read_text())["x"] == 1
    assert not list(tmp_path.glob(".*.tmp*"))  # written atomically, nothing left behind


def test_time_rounds_rotates_the_order_and_keeps_going_after_an_error():
    calls: list[str] = []

    def fn(name: str):
        return lambda: calls.append(name)

    def broken():
        raise RuntimeError("no kernel")

    out = common.time_rounds({"a": fn("a"), "b": fn("b"), "c": broken}, "cpu", warmup=1, rounds=3)
    assert calls[:2] == ["a", "b"]  # warm-up
    assert calls[2:] == ["a", "b", "b", "a", "a", "b"]  # round r starts with the r-th (c dropped at warm-up)
    assert out["c"] == {"error": "RuntimeError: no kernel"}
    assert out["a"]["iters"] == 3 and len(out["a"]["ms_all"]) == 3
    assert common.paired_ratio({"ms_all": [2.0, 4.0, 9.0]}, {"ms_all": [1.0, 1.0, 3.0]}) == 3.0
    assert common.paired_ratio(out["a"], out["c"]) is None


def test_device_info_records_the_code_as_results_json_does():
    """Every result JSON records the code it measured: the record results.json's provenance holds
    (tests/test_provenance.py tests the record itself)."""
    from pipeline.provenance import code_record

    info = common.device_info("cpu")
    assert {k: info[k] for k in ("git_commit", "git_dirty", "sources_sha256")} == code_record()


def test_bench_step_vs_commit_refuses_different_timing_methods(capsys):
    import bench_step_vs_commit as vs

    engines = {"rank0": [{"zero_stage": 3, "persistence_threshold": 0, "partitioned": 5, "params": 5}]}
    cfg = {k: 1 for k in vs.SAME_CONFIG}
    old = {"config": dict(cfg), "engines": engines}  # 14fb46a's config has no "interleave": blocks
    vs._check_same(old, {"config": dict(cfg, interleave=False), "engines": engines})
    with pytest.raises(SystemExit) as exc:
        vs._check_same(old, {"config": dict(cfg, interleave=True), "engines": engines})
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'timing': ('blocks', 'interleaved')" in err[0]


def test_eval_metrics_import_without_scipy():
    """The GPU check's eval part imports pipeline.eval.metrics (through pipeline.eval.tofu) where the
    carried wheels have no scipy (benchmarks/gpu_wheels.sh): scipy only inside forget_quality_ks."""
    code = ("import sys; sys.modules['scipy'] = None; import pipeline.eval.metrics as m; "
            "assert m.forget_quality_ks([], [1.0]) != m.forget_quality_ks([], [1.0])")  # nan: no scipy needed
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]


def test_bench_memory_prediction_plans_the_method_its_ranks_train(tmp_path: Path):
    """bench_memory prints the preflight's plan beside the measurement; the plan is built from the
    method's own step plan, so the config it hands the preflight must name that method (it once did not:
    `--size 34m` stopped with "Missing key method" before any rank ran)."""
    import bench_memory

    arch = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2)
    model_dir = common.save_random_llama(tmp_path, arch, 32)
    spec = {"persistence": 0, "batch": 1, "passes": "joint", "seq": 16, "kl": "naive"}
    per_gpu, total = bench_memory._predict(model_dir, spec, 2)
    assert total > 0 and per_gpu and all(v >= 0 for v in per_gpu.values())
