"""Where the evaluation model runs and in which dtype (pipeline/eval/runner.eval_device / eval_dtype).

Before: always float32 on the CPU, also on a GPU node (a 7B evaluation on the host). The GPU load
itself (weights straight onto the rank's GPU) is checked by benchmarks/gpu_check.sh where one is
lent; here the decisions (with torch.cuda's answers patched where a GPU is pretended), the real CPU
load in the chosen dtype, the weight-size estimate, the config checks and the reference cache key.
"""

import logging
import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.config import ConfigError, register_configs, validate
from pipeline.eval import runner
from pipeline.models.loading import weights_bytes
from tests.helpers.tiny import build

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def _cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture
def gpu(monkeypatch):
    """Pretend rank 3's GPU with ``free`` bytes free (set the returned dict's value)."""
    state = {"free": 80 * 2**30}
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # the tests' conftest pins DeepSpeed to the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (state["free"], 80 * 2**30))
    return state


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build(tmp_path_factory.mktemp("placement"))[0]


def test_on_the_cpu_auto_is_float32_whatever_the_training_dtype(tiny_model):
    cfg = _cfg("model.dtype=bfloat16")
    assert (runner.eval_device(cfg, tiny_model), runner.eval_dtype(cfg)) == ("cpu", "float32")


def test_on_a_gpu_auto_is_the_models_dtype_on_this_ranks_device(gpu, tiny_model):
    cfg = _cfg("model.dtype=bfloat16")
    assert (runner.eval_device(cfg, tiny_model), runner.eval_dtype(cfg)) == ("cuda:3", "bfloat16")
    assert runner.eval_dtype(_cfg("model.dtype=bfloat16", "eval.dtype=float32")) == "float32"
    assert runner.eval_device(_cfg("eval.device=cpu"), tiny_model) == "cpu"
    # eval.device=cpu on a GPU node: every model on the CPU, so auto is float32 there as well
    assert runner.eval_dtype(_cfg("model.dtype=bfloat16", "eval.device=cpu")) == "float32"
    # a LoRA run: the dtype its model/ was merged and saved in (float32 unless model.peft.merged_dtype=model)
    lora = ("model.dtype=bfloat16", "model.peft.enabled=true")
    assert runner.eval_dtype(_cfg(*lora)) == "float32"
    assert runner.eval_dtype(_cfg(*lora, "model.peft.merged_dtype=model")) == "bfloat16"


def test_weights_that_do_not_fit_the_free_gpu_memory_are_evaluated_on_the_cpu(gpu, tiny_model, caplog):
    gpu["free"] = 2**30  # less than the 1 GiB of room kept beside any model
    with caplog.at_level(logging.WARNING):
        assert runner.eval_device(_cfg(), tiny_model) == "cpu"
    assert "do not fit in cuda:3's 1.0 GiB free" in caplog.text
    assert runner.eval_device(_cfg("eval.device=cuda"), tiny_model) == "cuda:3"  # insisted on


def test_a_cpu_job_on_a_gpu_node_evaluates_on_the_cpu(gpu, tiny_model, monkeypatch):
    """DS_ACCELERATOR=cpu (make demo / make test, on any machine): the ranks run on the CPU, so does
    the evaluation, in float32; eval.device=cuda names why it cannot."""
    from pipeline.engine.distributed import cuda_ranks

    assert cuda_ranks()
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert not cuda_ranks()
    cfg = _cfg("model.dtype=bfloat16")
    assert (runner.eval_device(cfg, tiny_model), runner.eval_dtype(cfg)) == ("cpu", "float32")
    with pytest.raises(ConfigError, match=r"no CUDA device to use \(DS_ACCELERATOR=cpu;"):
        runner.check_eval_device(_cfg("eval.device=cuda"))


def test_eval_device_cuda_without_a_gpu_stops_before_training():
    with pytest.raises(ConfigError, match="eval.device=cuda, but this rank has no CUDA device"):
        runner.check_eval_device(_cfg("eval.device=cuda"))
    runner.check_eval_device(_cfg("eval.device=cuda", "eval.enabled=false"))  # nothing to evaluate


def test_the_weight_size_comes_from_the_safetensors_headers(tiny_model):
    from pipeline.models.loading import load_tokenizer

    m = runner._load_eval_model(tiny_model, _cfg("eval.dtype=bfloat16"), load_tokenizer(str(tiny_model), False))
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in m.parameters()} == {"cpu"} and not m.training
    n = sum(t.numel() for t in m.state_dict().values())  # tied weights counted as stored
    assert weights_bytes(tiny_model, "bfloat16") == 2 * n and weights_bytes(tiny_model, "float32") == 4 * n
    assert weights_bytes(tiny_model.parent / "no-such-model", "float32") is None


@pytest.mark.parametrize("key", ["eval.dtype=fp8", "eval.device=tpu"])
def test_an_unknown_dtype_or_device_is_a_config_error(key):
    with pytest.raises(ConfigError, match=f"{key.split('=')[0]}.*'{key.split('=')[1]}'.*allowed values: auto"):
        validate(_cfg(key))


def test_the_retain_reference_cache_key_holds_the_dtype():
    """bf16 and fp32 truth ratios differ: a reference cached in one is not read for the other."""
    f32 = runner._reference_settings(_cfg("eval.dtype=float32"), "forget10")
    bf16 = runner._reference_settings(_cfg("eval.dtype=bfloat16"), "forget10")
    assert f32["eval.dtype"] == "float32" and bf16["eval.dtype"] == "bfloat16"


def test_the_target_model_is_released_before_the_retain_model_loads(tmp_path, monkeypatch):
    """The retain model's placement (eval_device) reads the GPU's free memory: the evaluated target
    must be gone by then, not held by the evaluation until the end."""
    import gc
    import weakref

    from pipeline.data.loaders import load_unlearning_data
    from pipeline.inputs import resolve_paths
    from pipeline.models.loading import load_tokenizer
    from tests.helpers.tiny import train_overrides

    target, data_dir = build(tmp_path / "target")
    retain, _ = build(tmp_path / "retain", seed=1)
    cfg = _cfg(*train_overrides(target, data_dir, tmp_path / "runs", "r"), f"eval.retain_model={retain}",
               f"cache_dir={tmp_path / 'cache'}", "eval.probe_rows=0")
    paths = resolve_paths(cfg)
    data = load_unlearning_data(cfg.data, int(cfg.seed), data_dir=paths.data_dir)
    loaded, real = [], runner._load_eval_model

    def spy_record(path, c, tokenizer):
        gc.collect()
        alive_before = [ref() is not None for _, ref, *_ in loaded]
        m = real(path, c, tokenizer)
        loaded.append((str(path), weakref.ref(m), alive_before))
        return m

    monkeypatch.setattr(runner, "_load_eval_model", spy_record)
    metrics, _ = runner.evaluate_job(cfg, paths.model, load_tokenizer(paths.tokenizer, False), data, paths)
    assert [p for p, *_ in loaded] == [str(target), str(retain)]
    assert loaded[1][2] == [False], "the target model was still alive when the retain model was loaded"
    assert metrics["forget_quality"] is not None and metrics[runner.EVALUATION_KEY]["device"] == "cpu"


def _record_ranks_devices(rank: int, port: int, out: str) -> None:
    import json

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # rank 1 stands for a rank whose evaluation fell back to another device (meta: no GPU here)
        model = torch.nn.Linear(2, 2, device="cpu" if rank == 0 else "meta")
        held = runner.ModelOnDemand(lambda: model)
        held.get()  # evaluated (a split ran)
        record = runner._placement(_cfg(), held)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(record, f)
    finally:
        dist.destroy_process_group()


def test_ranks_that_evaluated_on_different_devices_are_named_in_the_record(tmp_path):
    """Each rank places its evaluation model alone (one short of GPU memory evaluates on the CPU):
    the record names every rank's device then, instead of rank 0's only (gathered over 2 gloo ranks)."""
    import json

    import torch.multiprocessing as mp

    from tests.helpers.launch import free_port

    out = tmp_path / "placement.json"
    mp.spawn(_record_ranks_devices, args=(free_port(), str(out)), nprocs=2, join=True)
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["device_by_rank"] == ["cpu", "meta"]


def test_one_device_kind_over_all_ranks_is_recorded_once():
    held = runner.ModelOnDemand(lambda: torch.nn.Linear(2, 2))
    held.get()
    record = runner._placement(_cfg(), held)
    assert record["device"] == "cpu" and "device_by_rank" not in record
