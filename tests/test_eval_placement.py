"""Where the evaluation model runs and in which dtype (pipeline/eval/runner.eval_placement).

Before: always float32 on the CPU, also on a GPU node (a 7B evaluation on the host). The GPU load
itself (weights straight onto the rank's GPU) is checked by benchmarks/gpu_check.sh where one is
lent; here the choice, the real CPU load in the chosen dtype, the config check and the reference
cache key.
"""

import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.config import ConfigError, register_configs, validate
from pipeline.eval import runner
from tests.helpers.tiny import build

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def _cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_auto_is_float32_on_the_cpu_whatever_the_training_dtype():
    assert runner.eval_placement(_cfg("model.dtype=bfloat16")) == ("cpu", "float32")


def test_auto_on_a_gpu_is_the_models_dtype_on_this_ranks_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert runner.eval_placement(_cfg("model.dtype=bfloat16")) == ("cuda:3", "bfloat16")
    assert runner.eval_placement(_cfg("model.dtype=bfloat16", "eval.dtype=float32")) == ("cuda:3", "float32")


def test_the_chosen_dtype_is_what_loads(tmp_path):
    model_dir, _ = build(tmp_path)
    m = runner._load_eval_model(model_dir, _cfg("eval.dtype=bfloat16"))
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in m.parameters()} == {"cpu"} and not m.training


def test_an_unknown_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="eval.dtype.*'fp8'.*allowed values: auto, float32, bfloat16, float16"):
        validate(_cfg("eval.dtype=fp8"))


def test_the_retain_reference_cache_key_holds_the_dtype():
    """bf16 and fp32 truth ratios differ: a reference cached in one is not read for the other."""
    tok = type("Tok", (), {"name_or_path": "", "__len__": lambda self: 10})()
    f32, _ = runner._reference_settings(_cfg("eval.dtype=float32"), "forget10", tok)
    bf16, _ = runner._reference_settings(_cfg("eval.dtype=bfloat16"), "forget10", tok)
    assert f32["eval.dtype"] == "float32" and bf16["eval.dtype"] == "bfloat16"
