"""Data-parallel evaluation: 2 ranks score the same numbers as 1 (pipeline/eval/runner.py splits the
rows across ranks and merges them back in row order). Odd split sizes and a split smaller than the
world make uneven shards and a rank with no rows."""

import json
import math

import pytest

from tests.helpers import launch
from tests.helpers.tiny import CITIES, PEOPLE, build, qa_row


def _close(a, b, path="") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6 * max(1.0, abs(a)), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.distributed
def test_two_ranks_evaluate_like_one(tmp_path):
    model_dir, data_dir = build(tmp_path)
    rows = [qa_row(p, c) for p, c in zip(PEOPLE, CITIES)]
    for name, part in {"forget": rows[:3], "retain": rows[3:], "eval_one": rows[7:]}.items():  # 3, 5 and 1 rows
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    args = ["model.source=pretrained", f"model.path={model_dir}", "data.name=json", f"data.path={data_dir}",
            "data.forget_split=forget", "data.retain_split=retain", "data.eval_splits=[eval_one]", "logging=none",
            f"output_dir={tmp_path / 'runs'}", "eval.max_new_tokens=6", "eval.batch_size=2", "eval.probe_rows=3"]
    runs = {}
    for ranks in (1, 2):
        out = launch.run(args + [f"run_name=r{ranks}"], ranks=ranks, script="launchers/eval.py")
        assert out.returncode == 0, out.stderr[-3000:]
        runs[ranks] = tmp_path / "runs" / f"r{ranks}"
    one, two = (json.loads((runs[r] / "results.json").read_text()) for r in (1, 2))
    assert two["world_size"] == 2 and one["world_size"] == 1
    _close(one["metrics"], two["metrics"], "metrics")
    assert one["evaluation"]["rows"] == two["evaluation"]["rows"] == {
        "forget": 3, "retain": 5, "eval_one": 1, "retain_probe": 3}
    _close(*(json.loads((runs[r] / "eval_details.json").read_text()) for r in (1, 2)))
