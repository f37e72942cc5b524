"""Teacher cache (method.teacher=cached): exactness of full rows, top-k error, reuse, atomicity, and a
real 1-rank asu_gd run that trains with no reference engine."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from pipeline.data.collate import pad_batch
from pipeline.engine import teacher_cache as tc
from pipeline.methods import losses
from tests.helpers import launch
from tests.helpers.tiny import build, train_overrides

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tc")
    model_dir, data_dir = build(root)
    return root, model_dir, data_dir


@pytest.fixture(scope="module")
def models(tiny):
    from transformers import AutoModelForCausalLM

    _, model_dir, _ = tiny
    teacher = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(1)
    student = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # a student that differs from the teacher
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


@pytest.fixture(scope="module")
def rows(tiny):
    from transformers import AutoTokenizer

    from pipeline.data.loaders import encode_rows

    _, model_dir, data_dir = tiny
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = [json.loads(x) for x in (data_dir / "forget.jsonl").read_text().splitlines()]
    data += [json.loads(x) for x in (data_dir / "retain.jsonl").read_text().splitlines()]
    return encode_rows(tok, data, 64, True, "forget"), tok.pad_token_id


def _cfg(topk=0, tau=2.0):
    return SimpleNamespace(tau=tau, teacher_layers=None, cache_topk=topk)


def _build(teacher, rows, root, topk=0, batch_size=3):
    enc, pad = rows
    return tc.build_teacher_cache(teacher, enc, _cfg(topk), root, batch_size, model_path="tiny", split="forget",
                                  max_length=64, pad_token_id=pad, dtype="float32")


def _batch(rows, idx):
    enc, pad = rows
    return pad_batch([enc[i] for i in idx], pad)


def _live_and_cached(teacher, student, rows, cache, idx, skip_first=False, reduction="sequence_mean"):
    b = _batch(rows, idx)
    student.zero_grad()
    live = losses.distill_kl(student, teacher, b, reduction, tau=2.0, skip_first=skip_first)
    live.backward()
    g_live = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    cached = losses.cached_distill_kl(student, b, cache.batch(idx, b["labels"]), reduction, skip_first=skip_first)
    cached.backward()
    g_cached = [p.grad.clone() for p in student.parameters()]
    return live, cached, g_live, g_cached


@pytest.mark.parametrize("reduction,skip_first", [("sequence_mean", False), ("token_mean", True)])
def test_full_rows_give_the_live_kl_and_gradients(models, rows, tmp_path, reduction, skip_first):
    teacher, student = models
    cache = tc.TeacherCache(_build(teacher, rows, tmp_path, topk=0))
    assert cache.full and len(cache) == len(rows[0])
    idx = [4, 0, 2]  # another batch composition / padding than at build time
    live, cached, g_live, g_cached = _live_and_cached(teacher, student, rows, cache, idx, skip_first, reduction)
    assert float(live.detach()) > 1e-3
    assert abs(float(live.detach()) - float(cached.detach())) <= 1e-6
    for a, b in zip(g_live, g_cached):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_topk_error_decreases_with_k(models, rows, tmp_path):
    teacher, student = models
    idx = list(range(len(rows[0])))
    b = _batch(rows, idx)
    with torch.no_grad():
        live = float(losses.distill_kl(student, teacher, b, tau=2.0))
        errs = []
        V = teacher.config.vocab_size
        for k in (1, 5, 20, V - 1):
            cache = tc.TeacherCache(_build(teacher, rows, tmp_path, topk=k))
            assert not cache.full and cache.topk == k
            approx = float(losses.cached_distill_kl(student, b, cache.batch(idx, b["labels"])))
            assert approx <= live + 1e-6  # coarse-graining: a lower bound
            errs.append(abs(live - approx))
    assert all(e2 <= e1 + 1e-7 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[0] > errs[-1] and errs[-1] < 1e-5, errs


def test_topk_loss_backpropagates_finite_gradients_through_the_model(models, rows, tmp_path):
    """The top-k loss is differentiable and finite (the tail bucket's log-sum-exp path)."""
    teacher, student = models
    cache = tc.TeacherCache(_build(teacher, rows, tmp_path, topk=5))
    b = _batch(rows, [0, 1])
    student.zero_grad()
    loss = losses.cached_distill_kl(student, b, cache.batch([0, 1], b["labels"]))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in student.parameters()])
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0


@pytest.mark.parametrize("k", [1, 5, 11])
def test_topk_kl_and_its_gradient_equal_a_bucket_kl_written_out(k):
    """The top-k + tail KL (pipeline/methods/loss_math.cache_kl_values) and its gradient w.r.t. the
    student logits equal k + 1 buckets written out in float64: the student's tail mass as 1 - the sum of
    its top-k probabilities. A detached or wrong tail term (the log-sum-exp path) changes the gradient,
    which the finiteness check above cannot see."""
    from pipeline.methods.loss_math import cache_kl_values

    g = torch.Generator().manual_seed(k)
    N, V = 6, 12
    teacher = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)
    lt, ids = teacher.topk(k, -1)
    tail = torch.log1p(-lt.exp().sum(-1).clamp(max=1 - 1e-12))
    logits = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    got = cache_kl_values(logits, {"logprobs": lt.float(), "ids": ids, "tail": tail.float()})
    (g_got,) = torch.autograd.grad(got.sum(), logits)

    p_s = torch.softmax(logits, -1)
    top_s = p_s.gather(-1, ids)
    tail_s = 1 - top_s.sum(-1)
    want = (lt.exp() * (lt - top_s.log())).sum(-1) + tail.exp() * (tail - tail_s.log())
    (g_want,) = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_reuse_is_a_noop_and_keys_differ(models, rows, tmp_path, monkeypatch):
    teacher, _ = models
    first = _build(teacher, rows, tmp_path, topk=5)
    mtime = (first / tc.INDEX).stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(tc, "_teacher_rows", lambda *a, **k: calls.append(1) or [])
    again = _build(teacher, rows, tmp_path, topk=5)
    assert again == first and not calls and (first / tc.INDEX).stat().st_mtime_ns == mtime
    # the teacher is not even needed when the cache exists
    assert tc.build_teacher_cache(None, rows[0], _cfg(5), tmp_path, 3, model_path="tiny", split="forget",
                                  max_length=64, pad_token_id=rows[1], dtype="float32") == first
    assert tc.cache_ready(tmp_path, "tiny", _cfg(5), rows[0], "forget", 64, "float32")
    assert not tc.cache_ready(tmp_path, "tiny", _cfg(5, tau=3.0), rows[0], "forget", 64, "float32")
    assert not tc.cache_ready(tmp_path, "tiny", _cfg(6), rows[0], "forget", 64, "float32")
    # a bf16 run's teacher computes other distributions: its cache is another one
    assert not tc.cache_ready(tmp_path, "tiny", _cfg(5), rows[0], "forget", 64, "bfloat16")


def test_a_cache_gone_or_damaged_after_it_was_found_ready_is_one_line(models, rows, tmp_path, umask_022):
    """cache_ready said yes, so the run loaded no frozen model; the cache was then removed (by hand, a scratch
    purge) or damaged before the build step read it: an AttributeError on the missing teacher."""
    import shutil

    from pipeline.engine.preflight import PreflightError

    teacher, _ = models
    first = _build(teacher, rows, tmp_path, topk=5)
    shard = next(first.glob("rows-*.safetensors"))
    assert oct(shard.stat().st_mode & 0o777) == oct(0o644)  # not safetensors' 0600
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(PreflightError, match=r"teacher cache .* was ready when the run started but fails its check "
                                             r"now \(shard .* bytes.*\): launch again to rebuild it"):
        _build(None, rows, tmp_path, topk=5)
    shutil.rmtree(first)
    with pytest.raises(PreflightError, match=r"teacher cache .* was ready when the run started but is gone now"):
        _build(None, rows, tmp_path, topk=5)


def test_build_is_atomic(models, rows, tmp_path, monkeypatch):
    teacher, _ = models
    real = tc._teacher_rows
    n = []

    def flaky(*a, **k):
        n.append(1)
        if len(n) == 2:
            raise RuntimeError("killed mid-build")
        return real(*a, **k)

    monkeypatch.setattr(tc, "_teacher_rows", flaky)
    with pytest.raises(RuntimeError, match="mid-build"):
        _build(teacher, rows, tmp_path, topk=5, batch_size=2)
    assert list(tmp_path.iterdir()) == [], "a failed build must leave nothing behind"
    assert not tc.cache_ready(tmp_path, "tiny", _cfg(5), rows[0], "forget", 64, "float32")
    monkeypatch.setattr(tc, "_teacher_rows", real)
    path = _build(teacher, rows, tmp_path, topk=5, batch_size=2)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert len(list(path.glob("*.safetensors"))) >= 1 and (path / tc.INDEX).exists()


def test_a_model_rewritten_in_place_gets_a_new_cache(tiny, rows, tmp_path, caplog):
    """New weights at the same path are another teacher: its cache is built anew, not reused."""
    from transformers import AutoModelForCausalLM

    _, model_dir, _ = tiny
    model, root = tmp_path / "model", tmp_path / "cache"
    shutil.copytree(model_dir, model)
    teacher = AutoModelForCausalLM.from_pretrained(model).eval()
    enc, pad = rows

    def build():
        return tc.build_teacher_cache(teacher, enc, _cfg(5), root, 3, model_path=str(model), split="forget",
                                      max_length=64, pad_token_id=pad, dtype="float32")

    first = build()
    assert tc.cache_ready(root, str(model), _cfg(5), enc, "forget", 64, "float32")
    with torch.no_grad():  # same architecture, same file size: only the weights (and the mtime) change
        for p in teacher.parameters():
            p.mul_(1.5)
    teacher.save_pretrained(model, safe_serialization=True)
    assert not tc.cache_ready(root, str(model), _cfg(5), enc, "forget", 64, "float32")
    with caplog.at_level(logging.INFO, logger=tc.__name__):
        second = build()
    assert "teacher cache: reusing" not in caplog.text and "teacher cache: built" in caplog.text
    assert second != first and sorted(p.name for p in root.iterdir()) == sorted([first.name, second.name])
    old, new = tc.TeacherCache(first).rows([0])[0][0], tc.TeacherCache(second).rows([0])[0][0]
    assert not torch.equal(old, new)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def _temp_dir(root, key, mib=1, age_s=0.0, **who):
    d = root / tc._temp_name(key, **who)
    d.mkdir(parents=True)
    (d / "rows-r000-00000.safetensors").write_bytes(b"\0" * (mib * 2**20))
    if age_s:
        os.utime(d, (time.time() - age_s,) * 2)
    return d


def test_interrupted_builds_temp_dirs_are_removed_and_live_ones_kept(models, rows, tmp_path, caplog):
    """A build killed outright leaves its temp dir: the next build removes it (and any other stale
    one under the cache root) with one log line, and leaves the temp dirs of live builds alone."""
    teacher, _ = models
    key = tc.cache_key(tc.cache_fields("tiny", 2.0, None, "forget", 64, 5, rows[0], "float32"))
    other_key, old_hours = "0123456789abcdef0123", 2 * 3600
    stale = [
        _temp_dir(tmp_path, key, mib=3, pid=_dead_pid()),  # killed on this host (a requeue on the same node)
        _temp_dir(tmp_path, key, owner="othernode-1", pid=1, age_s=old_hours),  # killed on another node
        _temp_dir(tmp_path, other_key, pid=_dead_pid()),  # another cache's interrupted build
    ]
    old_format = tmp_path / f".{key}.tmp-0badcafe"  # written before temp names said who writes them
    old_format.mkdir()
    os.utime(old_format, (time.time() - old_hours,) * 2)
    stale.append(old_format)
    live = [
        _temp_dir(tmp_path, key),  # this process: alive
        _temp_dir(tmp_path, key, owner="othernode-1", pid=1),  # another node's build, touched just now
        _temp_dir(tmp_path, other_key, owner="othernode-1", pid=1),
    ]
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    with caplog.at_level(logging.INFO, logger=tc.__name__):
        path = _build(teacher, rows, tmp_path, topk=5)
    assert path.name == key and (path / tc.INDEX).exists()
    assert not any(d.exists() for d in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([key, "notes", *(d.name for d in live)])
    removed = [r.getMessage() for r in caplog.records if "interrupted build's temp dir" in r.getMessage()]
    assert len(removed) == len(stale), removed
    first = next(m for m in removed if stale[0].name in m)
    assert "is gone" in first and "3.0 MiB freed" in first
    assert any("untouched for 2.0 h" in m for m in removed)


def test_a_live_build_keeps_its_temp_dir_fresh_and_a_concurrent_build_leaves_it(models, rows, tmp_path,
                                                                                   monkeypatch):
    """A build refreshes its temp dir between batches, so a concurrent job of the same cache (another
    node, where its PID means nothing) keeps it; both jobs end with the one published cache."""
    teacher, _ = models
    real, calls, inner = tc._teacher_rows, [], []
    monkeypatch.setattr(tc, "HEARTBEAT_S", 0.0)
    monkeypatch.setattr(tc, "_owner", lambda: "othernode-1")  # the other job's PID check cannot see us

    def rows_of_a_slow_build(*a, **k):
        calls.append(1)
        if len(calls) <= 2:
            (tmp,) = tmp_path.glob(".*.tmp-*")
            if len(calls) == 1:  # look long idle...
                os.utime(tmp, (time.time() - 2 * 3600,) * 2)
            else:  # ...until the next batch's heartbeat; meanwhile another job builds the same cache
                assert time.time() - tmp.stat().st_mtime < 60
                monkeypatch.setattr(tc, "_owner", lambda: "thisnode-1")
                inner.append(_build(teacher, rows, tmp_path, topk=5, batch_size=2))
                assert tmp.exists()
        return real(*a, **k)

    monkeypatch.setattr(tc, "_teacher_rows", rows_of_a_slow_build)
    outer = _build(teacher, rows, tmp_path, topk=5, batch_size=2)
    assert inner == [outer] and [p.name for p in tmp_path.iterdir()] == [outer.name]
    assert len(tc.TeacherCache(outer)) == len(rows[0])


def test_a_build_whose_temp_dir_was_taken_stops_in_one_line(models, rows, tmp_path, monkeypatch):
    teacher, _ = models
    real = tc._teacher_rows
    monkeypatch.setattr(tc, "HEARTBEAT_S", 0.0)

    def removed_meanwhile(*a, **k):  # as another job does to a build stopped for over STALE_AFTER_S
        for d in tmp_path.glob(".*.tmp-*"):
            shutil.rmtree(d)
        return real(*a, **k)

    monkeypatch.setattr(tc, "_teacher_rows", removed_meanwhile)
    with pytest.raises(tc.TeacherCacheError, match=r"cannot touch its temp dir .* untouched for 30 min"):
        _build(teacher, rows, tmp_path, topk=5, batch_size=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("topk", [0, 5])
def test_a_teacher_producing_nan_stops_the_build_in_one_line_and_leaves_no_cache(tiny, rows, tmp_path, topk):
    """A teacher whose forward gives NaN (NaN weights here; an fp16 overflow in the tempered forward
    alike) was cached as is, and the read then called the cache damaged and said to delete it to
    rebuild — which gives the same NaN. The build refuses instead (a user error: one line, exit 2),
    naming the row, tau and dtype and what to change, and leaves nothing a later run would reuse."""
    from transformers import AutoModelForCausalLM

    from pipeline.errors import USER_ERRORS

    _, model_dir, _ = tiny
    teacher = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        teacher.model.layers[0].self_attn.q_proj.weight.fill_(float("nan"))
    with pytest.raises(tc.TeacherCacheError) as e:
        _build(teacher, rows, tmp_path, topk=topk)
    assert isinstance(e.value, USER_ERRORS)
    msg = str(e.value)
    assert "\n" not in msg and "delete" not in msg, msg
    assert re.search(r"teacher's forward at tau=2 \(float32\) produced non-finite log-probs on forget row 0: log-probs hold nan", msg), msg
    assert "nothing was cached" in msg and "check the model's weights" in msg, msg
    assert list(tmp_path.iterdir()) == [], "a refused build must leave nothing behind"
    assert not tc.cache_ready(tmp_path, "tiny", _cfg(topk), rows[0], "forget", 64, "float32")


def test_an_fp16_overflow_on_one_row_stops_the_build_and_suggests_another_precision(models, rows, tmp_path,
                                                                                    monkeypatch):
    """Only row 3 (the second batch, after the first was handed to the shard writer) overflows, as an fp16
    tempered forward may: the build stops there, says to use bf16 or fp32, and leaves no cache."""
    teacher, _ = models
    real = tc._teacher_rows

    def overflow_on_row_3(teacher, batch_rows, *a, **k):
        out = real(teacher, batch_rows, *a, **k)
        for r, t in zip(batch_rows, out):
            if r is rows[0][3]:
                t["logprobs"][1, 0] = float("inf")
        return out

    monkeypatch.setattr(tc, "_teacher_rows", overflow_on_row_3)
    enc, pad = rows
    with pytest.raises(tc.TeacherCacheError) as e:
        tc.build_teacher_cache(teacher, enc, _cfg(0, tau=0.5), tmp_path, 2, model_path="tiny", split="forget",
                               max_length=64, pad_token_id=pad, dtype="float16")
    msg = str(e.value)
    assert "\n" not in msg and "tau=0.5 (float16) produced non-finite log-probs on forget row 3: log-probs hold inf" in msg, msg
    assert "deepspeed.precision=bf16 or fp32" in msg, msg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("topk", [0, 5])
def test_size_estimate_is_the_cache_on_disk_and_a_full_disk_refuses_before_building(models, rows, tmp_path,
                                                                                     monkeypatch, topk):
    from safetensors import safe_open

    from pipeline.engine.preflight import PreflightError

    teacher, _ = models
    path = _build(teacher, rows, tmp_path / "ok", topk=topk)
    stored = 0
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            stored += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert tc.cache_bytes(rows[0], teacher.config.vocab_size, topk) == stored
    # too little free space: every rank stops with one error, before any teacher pass, nothing left
    real = tc.shutil.disk_usage
    monkeypatch.setattr(tc.shutil, "disk_usage", lambda p: real(p)._replace(free=stored // 2))
    monkeypatch.setattr(tc, "_teacher_rows", lambda *a, **k: pytest.fail("built despite the refusal"))
    with pytest.raises(PreflightError, match=r"teacher cache needs ~.* GiB but .* GiB free"):
        _build(teacher, rows, tmp_path / "full", topk=topk)
    assert list((tmp_path / "full").iterdir()) == []


def test_stale_cache_is_refused(models, rows, tmp_path):
    teacher, _ = models
    cache = tc.TeacherCache(_build(teacher, rows, tmp_path, topk=5))
    b = _batch(rows, [0, 1])
    labels = b["labels"].clone()
    last = int(labels[0].ne(-100).nonzero().max())
    labels[0, last] = -100  # one loss token fewer than the cached row
    with pytest.raises(tc.TeacherCacheError, match="stale"):
        cache.batch([0, 1], labels)


def test_config_validation():
    from omegaconf import OmegaConf

    from pipeline.config import ConfigError
    from pipeline.methods.asu import ASU, ASUGD, ASUGDConfig
    from pipeline.methods.asu_repr import ASUWMDP

    ok = OmegaConf.structured(ASUGDConfig(teacher="cached", cache_topk=20))
    ASUGD.validate_config(ok, 2)
    assert not ASUGD(ok).uses_reference
    assert ASU(OmegaConf.structured(ASUGDConfig(teacher="cached", retain_loss="kl"))).uses_reference
    assert ASUGD(OmegaConf.structured(ASUGDConfig())).uses_reference
    for bad in (dict(teacher="frozen"), dict(cache_topk=-1)):
        with pytest.raises(ConfigError):
            ASUGD.validate_config(OmegaConf.structured(ASUGDConfig(**bad)), 2)
    with pytest.raises(ConfigError, match="teacher"):
        from pipeline.methods.asu_repr import ASUWMDPConfig

        ASUWMDP.validate_config(OmegaConf.structured(ASUWMDPConfig(teacher="cached")), 8)


@pytest.mark.distributed
def test_one_rank_asu_gd_with_cached_teacher_builds_no_reference(tiny):
    root, model_dir, data_dir = tiny
    cache_dir = root / "cache"
    common = train_overrides(model_dir, data_dir, root / "runs", "x", steps=3) + [
        "eval.enabled=false", "method=asu_gd", "method.tau=2.0", "method.teacher=cached", "method.cache_topk=5",
        "method.retain_loss=nll", f"cache_dir={cache_dir}", "trainer.export=false"]
    first = launch.run([*common, "run_name=c1"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "teacher cache: built" in first.stderr and "reference model loaded: yes" in first.stderr and "reference engine during training: none" in first.stderr
    caches = [p for p in (cache_dir / "teacher_cache").iterdir()]
    assert len(caches) == 1 and (caches[0] / tc.INDEX).exists()
    # second run: the cache exists, so the reference model is never loaded
    second = launch.run([*common, "run_name=c2"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "teacher cache: reusing" in second.stderr and "reference engine during training: none" in second.stderr
    assert "reference model loaded: no" in second.stderr
    h = json.loads((root / "runs" / "c2" / "train_history.json").read_text())
    assert [x["step"] for x in h] == [1, 2, 3] and all(x["forget_loss"] >= 0 for x in h)
    h1 = json.loads((root / "runs" / "c1" / "train_history.json").read_text())
    for a, b in zip(h1, h):  # same cache, same trajectory
        assert abs(a["loss"] - b["loss"]) <= 1e-6


@pytest.mark.parametrize("overrides,cuda,expect", [
    ([], False, "float32"),                                   # CPU: fp32 training
    (["deepspeed.precision=bf16"], False, "bfloat16"),        # bf16 ranks on CPU: DeepSpeed casts
    (["model.dtype=float32"], True, "bfloat16"),              # loaded fp32, trained (and run) in bf16
    (["model.dtype=bfloat16", "deepspeed.precision=fp32"], True, "float32"),
])
def test_the_cache_is_keyed_by_the_dtype_the_teacher_computes_in(overrides, cuda, expect):
    """Keyed by the loaded dtype, a bf16-computed cache (model.dtype=float32, bf16 training on a GPU)
    was reused by an fp32 run of the same model and the other way round."""
    import os

    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs
    from pipeline.run import _compute_dtype

    register_configs()
    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        assert _compute_dtype(compose("config", overrides=overrides), cuda) == expect


def test_a_second_publisher_keeps_the_first_copy_and_a_leftover_without_index_is_replaced(tmp_path):
    """Two jobs of a sweep finish the same cache: the rename decides who publishes; the loser drops
    its temp copy and never deletes the published one (before: check, then rmtree + rename, so a
    job that checked just before the other's rename deleted the complete cache under it)."""
    from pipeline.engine.teacher_cache import INDEX, _rename_unless_published

    def built(name):
        d = tmp_path / name
        d.mkdir()
        (d / INDEX).write_text(name)
        return d

    final = tmp_path / "key"
    _rename_unless_published(built(".a.tmp"), final)
    inode = final.stat().st_ino
    _rename_unless_published(built(".b.tmp"), final)
    assert final.stat().st_ino == inode and (final / INDEX).read_text() == ".a.tmp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]
    leftover = tmp_path / "other"
    leftover.mkdir()
    (leftover / "shard.safetensors").write_text("half")  # no index: an interrupted older layout
    _rename_unless_published(built(".c.tmp"), leftover)
    assert (leftover / INDEX).read_text() == ".c.tmp" and not (leftover / "shard.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", "other"]


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs

    register_configs()
    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return compose("config", overrides=overrides)


def test_a_topk_cache_with_the_fused_kl_is_a_config_error(tmp_path):
    """kernels.kl=fused streams full cached rows only: a top-k cache with it was refused at the first
    training step, after both models loaded and the whole cache was built; now by the config check
    the run makes before it loads anything, in one line naming both keys."""
    from pipeline.config import ConfigError, validate

    common = ["method=asu_gd", "method.tau=2.0", "method.teacher=cached", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"^config error at 'method.cache_topk': .*kernels.kl=naive.*"
                                          r"kernels.kl=fused") as e:
        validate(_compose([*common, "method.cache_topk=5", "kernels=fused"]))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="method.cache_topk"):
        validate(_compose([*common, "method.cache_topk=5", "kernels.kl=fused"]))
    validate(_compose([*common, "method.cache_topk=0", "kernels=fused"]))  # full rows stream fine
    validate(_compose([*common, "method.cache_topk=5", "kernels.kl=naive"]))
    validate(_compose(["method=asu_gd", "method.tau=2.0", "method.cache_topk=5", "kernels=fused",
                       f"output_dir={tmp_path}"]))  # a live teacher reads no cache


def _corrupt(path, how):
    """Damage the published cache ``path`` as a bad copy, a full disk or bit rot would."""
    shard = sorted(path.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    if how == "truncated":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "bytes_changed":  # inside the data region, the header intact: read back silently before
        data[-200:-100] = b"\x7f" * 100
        shard.write_bytes(bytes(data))
    elif how == "header_changed":
        data[9:13] = b"XXXX"
        shard.write_bytes(bytes(data))
    elif how == "missing":
        shard.unlink()
    else:  # "old_index": written before the index recorded shard sizes
        index = json.loads((path / tc.INDEX).read_text())
        del index["files"]
        (path / tc.INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("how,full_check,reason", [
    ("truncated", True, "bytes, .* when published"),
    ("bytes_changed", True, "sha256 differs"),
    ("missing", True, "is missing"),
    ("old_index", True, "written before index.json recorded shard sizes"),
    ("truncated", False, "bytes, .* when published"),
    ("header_changed", False, "sampled digest differs"),
    ("bytes_changed", False, "sampled digest differs"),  # the last block is always sampled
])
def test_a_damaged_cache_is_rebuilt_not_reused(models, rows, tmp_path, monkeypatch, caplog, how, full_check,
                                               reason):
    """A cache damaged after publishing was reused on the strength of its index.json alone: a truncated
    shard failed at the first step (SafetensorError), changed bytes were read back silently (values up
    to 3.4e38). Now cache_ready says no (so the teacher gets loaded) and the build rebuilds it, with
    one log line saying why."""
    teacher, _ = models
    if not full_check:  # a cache too large to re-hash on every run: size and sampled digest only
        monkeypatch.setattr(tc, "FULL_CHECK_BYTES", 0)
    first = _build(teacher, rows, tmp_path, topk=0)
    good = tc.TeacherCache(first).rows([0, 1, 2])
    index = json.loads((first / tc.INDEX).read_text())
    assert index["files"] and sum(f["bytes"] for f in index["files"].values()) == index["bytes"]
    assert tc.cache_ready(tmp_path, "tiny", _cfg(0), rows[0], "forget", 64, "float32")
    _corrupt(first, how)
    assert not tc.cache_ready(tmp_path, "tiny", _cfg(0), rows[0], "forget", 64, "float32")
    with caplog.at_level(logging.INFO, logger=tc.__name__):
        again = _build(teacher, rows, tmp_path, topk=0)
    lines = [r.getMessage() for r in caplog.records if "fails its check" in r.getMessage()]
    assert len(lines) == 1 and "rebuilding it" in lines[0], lines
    assert re.search(reason, lines[0]), lines[0]
    assert "teacher cache: built" in caplog.text and "teacher cache: reusing" not in caplog.text
    assert again == first and [p.name for p in tmp_path.iterdir()] == [first.name]
    for a, b in zip(good, tc.TeacherCache(again).rows([0, 1, 2])):
        assert torch.equal(a, b)
    assert tc.cache_ready(tmp_path, "tiny", _cfg(0), rows[0], "forget", 64, "float32")


def test_an_intact_cache_is_hashed_once_per_process(models, rows, tmp_path, monkeypatch):
    """cache_ready and the build's reuse make the same check: the second one is not a second hash."""
    teacher, _ = models
    _build(teacher, rows, tmp_path, topk=5)
    calls = []
    real = tc._sha256
    monkeypatch.setattr(tc, "_sha256", lambda p: calls.append(p) or real(p))
    assert tc.cache_ready(tmp_path, "tiny", _cfg(5), rows[0], "forget", 64, "float32")
    n = len(calls)
    assert n >= 1
    _build(None, rows, tmp_path, topk=5)  # reused: no teacher needed
    assert len(calls) == n


def test_the_key_holds_the_code_that_computes_the_cache(rows, tmp_path, monkeypatch):
    """A fix to tempered attention or the frozen pass kept serving caches the old code built (unless
    FORMAT_VERSION was bumped by hand): the key now hashes that code."""
    files = tc.code_files()
    names = {(f.parent.name, f.name) for f in files}
    for needed in [("models", "tempered_attention.py"), ("methods", "passes.py"), ("methods", "model_io.py"),
                   ("attention", "sdpa.py"), ("kernels", "tempered_attention.py"), ("kernels", "reference.py"),
                   ("data", "collate.py")]:
        assert needed in names, needed
    copies = []
    for i, f in enumerate(files):
        copies.append(tmp_path / f"{i}-{f.name}")
        shutil.copyfile(f, copies[-1])
    monkeypatch.setattr(tc, "code_files", lambda: list(copies))

    def key():
        return tc.cache_key(tc.cache_fields("tiny", 2.0, None, "forget", 64, 5, rows[0], "float32"))

    before = key()
    assert before == key()
    tempered = next(c for c in copies if c.name.endswith("-tempered_attention.py"))
    tempered.write_text(tempered.read_text() + "\n# a fix\n")
    assert key() != before


def test_split_name_and_max_length_are_covered_by_the_rows(tiny, rows):
    """The key hashes the ids the teacher is fed: another split name or max_length with the same rows
    is the same cache; a max_length that truncates a row is another one."""
    from transformers import AutoTokenizer

    from pipeline.data.loaders import encode_rows

    enc, _ = rows

    def key(encoded, split="forget", max_length=64):
        return tc.cache_key(tc.cache_fields("tiny", 2.0, None, split, max_length, 5, encoded, "float32"))

    fields = tc.cache_fields("tiny", 2.0, None, "forget01", 128, 5, enc, "float32")
    assert fields["split"] == "forget01" and fields["max_length"] == 128  # recorded in the index all the same
    assert key(enc) == key(enc, "forget01", 128)
    _, model_dir, data_dir = tiny
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = [json.loads(x) for x in (data_dir / "forget.jsonl").read_text().splitlines()]
    data += [json.loads(x) for x in (data_dir / "retain.jsonl").read_text().splitlines()]
    longest = max(len(r["input_ids"]) for r in enc)
    short = encode_rows(tok, data, longest - 2, True, "forget")
    assert [r["input_ids"] for r in short] != [r["input_ids"] for r in enc]
    assert key(short, max_length=longest - 2) != key(enc)
    # labels are hashed too: the same ids with another loss mask are another cache
    relabeled = [dict(r, labels=list(r["input_ids"])) for r in enc]
    assert key(relabeled) != key(enc)

    # teacher_layers is a set of layers: listed in another order (or twice) it is the same cache
    def layers_key(layers):
        return tc.cache_key(tc.cache_fields("tiny", 2.0, layers, "forget", 64, 5, enc, "float32"))

    assert layers_key([8, 7, 6]) == layers_key([6, 7, 8]) == layers_key([6, 7, 7, 8]) != layers_key([6, 7])

    # the model by its files, not its path: a byte-identical copy elsewhere (a job's scratch staging, a
    # moved cache_dir) is the same cache; rewritten weights, or another uncached hub id, are not
    import shutil

    def model_key(path):
        return tc.cache_key(tc.cache_fields(str(path), 2.0, None, "forget", 64, 5, enc, "float32"))

    copy = shutil.copytree(model_dir, tiny[0] / "staged" / "copy")
    assert model_key(copy) == model_key(model_dir)
    assert tc.cache_fields(str(copy), 2.0, None, "forget", 64, 5, enc, "float32")["model_path"] == str(copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(b ^ 0x01 for b in data[-64:])
    weights.write_bytes(bytes(data))
    assert model_key(copy) != model_key(model_dir)
    assert model_key("someone/model-a") != model_key("someone/model-b")


def test_a_discarded_caches_interrupted_deletion_is_cleaned(models, rows, tmp_path, caplog):
    """A final directory moved aside to be deleted (.<key>.stale-*) whose deletion was interrupted was
    never removed: the cleanup only matched .tmp- names."""
    teacher, _ = models
    key = tc.cache_key(tc.cache_fields("tiny", 2.0, None, "forget", 64, 5, rows[0], "float32"))
    stale = tmp_path / f".{key}.stale-{_dead_pid()}-0badcafe"
    other = tmp_path / ".0123456789abcdef0123.stale-1-deadbeef"  # another cache's, whoever's: nothing reads it
    for d in (stale, other):
        d.mkdir()
        (d / "rows-r000-00000.safetensors").write_bytes(b"\0" * 2**20)
    with caplog.at_level(logging.INFO, logger=tc.__name__):
        path = _build(teacher, rows, tmp_path, topk=5)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    removed = [r.getMessage() for r in caplog.records if "deletion was interrupted" in r.getMessage()]
    assert len(removed) == 2 and all("1.0 MiB freed" in m for m in removed), removed


@pytest.fixture
def backend(monkeypatch):
    """Set the process's attention backend for one test (restored afterwards)."""
    import importlib

    dispatch = importlib.import_module("pipeline.models.attention.dispatch")  # the package re-exports a function
    monkeypatch.setattr(dispatch, "_state", dispatch._state)
    return dispatch.set_attention_backend


def test_the_key_holds_the_resolved_attention_backend_device_and_versions(models, rows, tmp_path, backend,
                                                                          monkeypatch):
    """A cache built on one attention backend was reused by a run on another (auto resolves per node;
    bf16 log-probs differ by ~0.06 between torch and sdpa): the resolved backend, the device type and
    the torch / transformers versions are in the key."""
    import transformers

    teacher, _ = models
    backend("torch")
    on_torch = _build(teacher, rows, tmp_path, topk=5)
    backend("sdpa")
    on_sdpa = _build(teacher, rows, tmp_path, topk=5)
    assert on_torch != on_sdpa and sorted(p.name for p in tmp_path.iterdir()) == sorted([on_torch.name, on_sdpa.name])
    fields = tc.TeacherCache(on_torch).fields
    assert fields["attention"] == "torch" and fields["device"] == "cpu"
    assert fields["torch"] == torch.__version__ and fields["transformers"] == transformers.__version__
    # cache_ready runs before the run activates its backend: it resolves kernels.attention itself
    assert tc.cache_ready(tmp_path, "tiny", _cfg(5), rows[0], "forget", 64, "float32", attention="torch", device="cpu")
    assert tc.cache_ready(tmp_path, "tiny", _cfg(5), rows[0], "forget", 64, "float32", attention="auto", device="cpu")
    assert not tc.cache_ready(tmp_path, "tiny", _cfg(5), rows[0], "forget", 64, "float32", attention="sdpa",
                              device="cuda")

    def key(**runtime):
        return tc.cache_key(tc.cache_fields("tiny", 2.0, None, "forget", 64, 5, rows[0], "float32",
                                            runtime=tc.runtime_fields(**runtime)))

    assert key(attention="sdpa", device="cpu") == on_sdpa.name  # the build's key, from explicit fields
    assert key(attention="sdpa", device="cuda") != on_sdpa.name
    monkeypatch.setattr(transformers, "__version__", "0.0.0")
    assert key(attention="sdpa", device="cpu") != on_sdpa.name
    # the Triton kernel's own library is in the key too (sdpa's and torch's are torch's version)
    from importlib.metadata import version

    assert tc.runtime_fields(attention="triton", device="cuda")["triton"] == version("triton")
    assert "triton" not in tc.runtime_fields(attention="sdpa", device="cpu")


def _shard_bytes_of(path, row, name="logprobs"):
    """(shard file, byte offset, byte length) of row ``row``'s tensor ``name`` in the published cache."""
    shard = path / tc.TeacherCache(path).index["shards"][str(row)]
    with open(shard, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))[f"{row}.{name}"]
    start, end = meta["data_offsets"]
    return shard, 8 + n + start, end - start


@pytest.mark.parametrize("topk,name,value", [
    (0, "logprobs", b"\xff\xff\xff\xff"),          # NaN (a torn write of 0xff bytes)
    (0, "logprobs", b"\x00\x00\x80\x3f"),          # +1.0: a log-prob above 0
    (0, "logprobs", b"\x00\x00\x80\xff"),          # -inf: the loss would be NaN (0 * -inf)
    (5, "tail", b"\x00\x00\x80\x7f"),              # +inf tail log-mass
    (5, "ids", b"\xff\xff\xff\xff"),               # token id -1
], ids=["nan", "positive", "minus-inf", "inf-tail", "negative-id"])
def test_damaged_values_a_sampled_check_misses_stop_the_read_in_one_line(models, rows, tmp_path, monkeypatch,
                                                                        topk, name, value):
    """Above FULL_CHECK_BYTES reuse samples 16 blocks of each shard: damage between them was served and
    reached the loss as NaN. The rows read are now checked: TeacherCacheError names the cache, shard
    and row and says to delete the cache (a user error: one line, exit 2)."""
    from pipeline.errors import USER_ERRORS

    assert issubclass(tc.TeacherCacheError, USER_ERRORS)
    teacher, _ = models
    monkeypatch.setattr(tc, "FULL_CHECK_BYTES", 0)
    path = _build(teacher, rows, tmp_path, topk=topk)
    row = 3
    shard, offset, _ = _shard_bytes_of(path, row, name)
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(value)
    # as when the damage lies between the sampled blocks: the reuse check passes
    monkeypatch.setattr(tc, "_sample_sha256", lambda p, size: json.loads((path / tc.INDEX).read_text())[
        "files"][p.name]["sample_sha256"])
    tc._CHECKED.clear()
    assert tc.cache_ready(tmp_path, "tiny", _cfg(topk), rows[0], "forget", 64, "float32")
    cache = tc.TeacherCache(_build(teacher, rows, tmp_path, topk=topk))
    b = _batch(rows, [0, row])
    cache.batch([0, 1], _batch(rows, [0, 1])["labels"])  # undamaged rows still read
    for read in (cache.batch, cache.selected):
        with pytest.raises(tc.TeacherCacheError) as e:
            read([0, row], b["labels"])
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and shard.name in msg and f"row {row}" in msg
        assert re.search(r"delete .* to rebuild it$", msg), msg


def test_a_legitimate_zero_tail_mass_is_read(models, rows, tmp_path):
    """-inf is the log of no mass outside the top k, which the loss handles: not damage."""
    teacher, _ = models
    path = _build(teacher, rows, tmp_path, topk=5)
    shard, offset, _ = _shard_bytes_of(path, 0, "tail")
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00\x00\x80\xff")
    b = _batch(rows, [0])
    assert float(tc.TeacherCache(path).batch([0], b["labels"])["tail"].min()) == float("-inf")


def test_a_concurrent_builds_discarded_copy_says_so(models, rows, tmp_path, monkeypatch, caplog):
    """Two jobs of a sweep (another gamma, alpha or seed at one tau) build the same cache at once: both
    logged "built". The one whose rename lost says its copy was discarded."""
    teacher, _ = models
    real, other = tc._rename_unless_published, []

    def the_other_job_publishes_first(tmp, final):
        if not other:  # the other job's build runs (and publishes) just before this one's rename
            other.append(None)
            other[0] = tc.TeacherCache(_build(teacher, rows, tmp_path, topk=5))
        return real(tmp, final)

    monkeypatch.setattr(tc, "_rename_unless_published", the_other_job_publishes_first)
    with caplog.at_level(logging.INFO, logger=tc.__name__):
        path = _build(teacher, rows, tmp_path, topk=5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher cache: built")]
    assert len(lines) == 2, lines
    assert "another job published this cache first; this copy was discarded" not in lines[0]
    assert "another job published this cache first; this copy was discarded" in lines[1]
    assert [p.name for p in tmp_path.iterdir()] == [path.name] and other[0].path == path


def test_rename_unless_published_says_whether_it_published(tmp_path):
    from pipeline.engine.teacher_cache import INDEX, _rename_unless_published

    for name in (".a.tmp", ".b.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / INDEX).write_text(name)
    assert _rename_unless_published(tmp_path / ".a.tmp", tmp_path / "key") is True
    assert _rename_unless_published(tmp_path / ".b.tmp", tmp_path / "key") is False


def test_reuse_records_the_last_use_and_the_root_totals_are_logged(models, rows, tmp_path, caplog):
    """A tau sweep leaves one cache per value and nothing reported them. Every build and reuse now
    touches the cache's directory (its last use, without re-running its integrity check) and logs the
    root's totals, naming those unused for over 30 days; nothing is deleted."""
    teacher, _ = models
    with caplog.at_level(logging.INFO, logger=tc.__name__):
        first = _build(teacher, rows, tmp_path, topk=5)
    totals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher caches under")]
    assert totals == [f"teacher caches under {tmp_path}: 1 caches, {tc.size_text(tc.tree_bytes(first))} "
                      "(none unused for > 30 days)"], totals
    old = time.time() - 40 * 86400
    os.utime(first, (old, old))
    tc._CHECKED.clear()
    assert tc._reuse_refusal(first) is None
    memo = tc._CHECKED[first][0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=tc.__name__):
        second = tc.build_teacher_cache(teacher, rows[0], _cfg(5, tau=3.0), tmp_path, 3, model_path="tiny",
                                        max_length=64, pad_token_id=rows[1], dtype="float32")
    size = tc.size_text(tc.tree_bytes(first))
    total = tc.size_text(tc.tree_bytes(first) + tc.tree_bytes(second))
    totals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher caches under")]
    assert totals == [f"teacher caches under {tmp_path}: 2 caches, {total} (1 unused for > 30 days: {size}; "
                      "remove them by hand)"], totals
    assert first.exists() and abs(first.stat().st_mtime - old) < 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=tc.__name__):
        assert _build(teacher, rows, tmp_path, topk=5) == first  # reused: its last use is now
    assert time.time() - first.stat().st_mtime < 60
    assert tc._signature(first) == memo  # touching the directory does not invalidate its check
    totals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher caches under")]
    assert len(totals) == 1 and "none unused" in totals[0], totals


def test_the_size_line_shows_small_caches_in_mib(models, rows, tmp_path, caplog):
    teacher, _ = models
    with caplog.at_level(logging.INFO, logger=tc.__name__):
        _build(teacher, rows, tmp_path, topk=5)
    line = next(r.getMessage() for r in caplog.records if "on disk" in r.getMessage())
    need = tc.cache_bytes(rows[0], teacher.config.vocab_size, 5)
    assert "~0.00 GiB" not in line and f"~{tc.size_text(need)} on disk" in line, line
