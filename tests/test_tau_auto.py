"""method.tau=auto (pipeline/engine/tau_auto.py): the teacher-side signal and the selection rule."""

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.engine import tau_auto
from tests.helpers.launch import free_port
from tests.helpers.tiny import build, train_overrides

ROOT = Path(__file__).resolve().parents[1]


def _encode(tok, rows, max_length=64):
    from pipeline.data.formatting import encode_qa

    out = []
    for i, r in enumerate(rows):
        e = encode_qa(tok, r["question"], r["answer"], max_length)
        out.append({"input_ids": e.input_ids, "labels": e.labels, "index": i})
    return out


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """The tiny random Llama trained until it reproduces every answer (the facts are memorised),
    so tempering its attention has facts to remove. ~3 s at one thread."""
    from pipeline.data.collate import pad_batch
    from pipeline.models.loading import load_causal_lm, load_tokenizer

    root = tmp_path_factory.mktemp("tau")
    model_dir, data_dir = build(root)
    tok = load_tokenizer(str(model_dir), False)
    rows = [json.loads(line) for split in ("forget", "retain") for line in open(data_dir / f"{split}.jsonl")]
    enc = _encode(tok, rows)
    torch.manual_seed(0)
    model = load_causal_lm(str(model_dir), "float32", False, False, None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = pad_batch(enc, tok.pad_token_id)
    model.train()
    for _ in range(150):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    assert float(loss.detach()) < 0.05
    return model, tok, rows, enc


def _cfg(layers=None, **knobs):
    return OmegaConf.create({"method": {"name": "asu_kl", "tau": "auto", "teacher_layers": layers, **knobs}})


def test_validation_slice_is_deterministic_and_sized():
    assert tau_auto.validation_indices(2) == [0, 1]
    assert tau_auto.validation_indices(32) == list(range(32))
    s = tau_auto.validation_indices(40)
    assert len(s) == tau_auto.VAL_MIN_ROWS and s[0] == 0 and s[-1] == 39 and s == tau_auto.validation_indices(40)
    assert len(tau_auto.validation_indices(400)) == 100  # a quarter of TOFU's forget10
    assert len(tau_auto.validation_indices(10_000)) == tau_auto.VAL_MAX_ROWS
    assert tau_auto.validation_indices(0) == []


def test_fact_spans_locate_the_fact_tokens(memorised):
    _, tok, rows, enc = memorised
    spans = tau_auto.fact_spans(tok, enc[0], rows[0]["facts"])
    assert len(spans) == 1 and len(spans[0]) == 1
    j = spans[0][0]
    assert tok.decode([enc[0]["input_ids"][j]]).strip() == rows[0]["facts"][0]
    assert enc[0]["labels"][j] != -100  # inside the answer, not the question
    assert tau_auto.fact_spans(tok, enc[0], ["atlantis"]) == []
    # only answer tokens are searched: a word of the question is never matched inside the question
    question_word = rows[0]["question"].split()[0]
    assert all(enc[0]["labels"][k] != -100 for s in tau_auto.fact_spans(tok, enc[0], [question_word]) for k in s)


def _signal(model, tok, rows, enc, taus):
    prober = tau_auto._Prober(model, tau_auto._items(tok, rows, enc), tok.pad_token_id, None)
    return [prober.probe(t) for t in taus]


def test_signal_against_the_untempered_teacher(memorised):
    model, tok, rows, enc = memorised
    probes = _signal(model, tok, rows, enc, (1.0, 2.0, 4.0, 8.0, 16.0))
    assert probes[0]["form_kept"] == 1.0 and probes[0]["facts_forgotten"] == 0.0
    form = [p["form_kept"] for p in probes]
    facts = [p["facts_forgotten"] for p in probes]
    assert all(b <= a + 1e-9 for a, b in zip(form, form[1:])), form  # monotone on this fixture
    assert all(b >= a - 1e-9 for a, b in zip(facts, facts[1:])), facts
    assert facts[-1] > 0.5 and form[-1] < tau_auto.FORM_TARGET, probes  # tempering hard removes both
    lp = [p["fact_logprob"] for p in probes]
    assert lp[-1] < lp[0] - 0.5


def test_skip_first_answer_token_leaves_the_first_answer_token_unscored(memorised):
    """ASU+IDK's KL leaves the first answer token out: the probes do not score it either (a fact
    forgotten only there would be counted for a change the student is never distilled on)."""
    model, tok, rows, enc = memorised
    whole, skipped = tau_auto._items(tok, rows, enc), tau_auto._items(tok, rows, enc, skip_first=True)
    for w, s, e in zip(whole, skipped, enc):
        first = next(j for j, lab in enumerate(e["labels"]) if lab != -100)
        assert w["labels"] == list(e["labels"]) and s["spans"] == w["spans"]  # spans found on the whole answer
        assert s["labels"][first] == -100 and s["labels"][:first] + s["labels"][first + 1:] == \
            w["labels"][:first] + w["labels"][first + 1:]
        assert tau_auto._Prober(model, [s], tok.pad_token_id, None).predictions(1.0)[0].keys() == \
            set(range(first + 1, len(e["labels"]))) - {j for j, lab in enumerate(e["labels"]) if lab == -100}


def test_probe_needs_the_reference_first(memorised):
    model, tok, rows, enc = memorised
    prober = tau_auto._Prober(model, tau_auto._items(tok, rows, enc), tok.pad_token_id, None)
    with pytest.raises(ValueError, match="first"):
        prober.probe(2.0)


def test_signal_counts_by_hand():
    """Two rows, hand-made predictions: the shares are counts over tokens (form) and facts."""
    items = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9], "spans": [[3]]},
             {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "spans": [[2, 3]]}]
    prober = tau_auto._Prober(None, items, 0, None)
    prober.base = [{1: (6, 0.0), 2: (7, 0.0), 3: (8, 0.0), 4: (9, 0.0)},  # row 0: knows its fact (8 at 3)
                   {2: (7, 0.0), 3: (1, 0.0)}]  # row 1: gets the fact's 2nd token wrong: not known
    now = [{1: (6, -1.0), 2: (0, -1.0), 3: (2, -3.0), 4: (9, -1.0)},  # form: 6 kept, 0 != 7, 9 kept
           {2: (0, -2.0), 3: (8, -1.0)}]
    form_kept, forgotten, fact_lp = prober.signal(now)
    assert form_kept == pytest.approx(2 / 3)  # 3 form tokens (row 0); row 1 has only fact tokens
    assert forgotten == 1.0  # 1 known fact (row 0), forgotten; row 1's was never known
    assert fact_lp == pytest.approx((-3.0 - 2.0 - 1.0) / 3)


def test_select_tau_in_bounds_deterministic_with_evidence(memorised):
    model, tok, rows, enc = memorised
    data = SimpleNamespace(forget=rows)
    a = tau_auto.select_tau(model, tok, data, enc, _cfg())
    b = tau_auto.select_tau(model, tok, data, enc, _cfg())
    assert tau_auto.TAU_MIN < a["tau"] < tau_auto.TAU_MAX, a
    assert a["tau"] == b["tau"] and a["probes"] == b["probes"]
    assert a["rule"] == "facts" and a["rows_with_facts"] == len(a["validation_rows"]) == len(rows)
    taus = [p["tau"] for p in a["probes"]]
    assert taus == sorted(taus) and taus[0] == tau_auto.TAU_MIN and taus[-1] == tau_auto.TAU_MAX
    assert a["probe_order"][:2] == [tau_auto.TAU_MIN, tau_auto.TAU_MAX]
    assert len(a["probes"]) == 2 + tau_auto.BISECT_STEPS
    # the choice sits on the crossing: the fact target is met at tau and missed one resolution step below
    at = {p["tau"]: p for p in a["probes"]}
    chosen = at[min(at, key=lambda t: abs(t - a["tau"]))]
    assert chosen["facts_ok"] and chosen["facts_forgotten"] >= a["fact_target"] == tau_auto.FACT_TARGET, a
    below = [p for p in a["probes"] if p["tau"] < a["tau"] - 1e-3]
    assert below and not below[-1]["facts_ok"] and below[-1]["facts_known"] == chosen["facts_known"] > 0
    assert a["tau"] - below[-1]["tau"] <= (tau_auto.TAU_MAX - tau_auto.TAU_MIN) / 2 ** tau_auto.BISECT_STEPS + 1e-3
    assert "facts it knows" in a["reason"] and "form kept" in a["reason"]
    json.dumps(a)  # goes into results.json
    # the teacher's temperatures are restored
    from pipeline.models.tempered_attention import get_temperatures

    assert all(float(t) == 1.0 for t in get_temperatures(model))


def test_the_probe_bar_shows_its_whole_total_before_the_first_probe_and_ends_full(memorised, monkeypatch):
    """Every probe (the bounds' two and the bisection's) is announced before the first runs, so the
    bar's total, and its first estimate of the time left, holds from the start; it ends exactly full."""
    from pipeline import progress as P

    monkeypatch.setenv("RANK", "0")
    model, tok, rows, enc = memorised
    totals = []
    real = tau_auto._Prober.probe

    def probe(self, tau):  # the bar's total as each probe starts
        totals.append(P.current().total)
        return real(self, tau)

    monkeypatch.setattr(tau_auto._Prober, "probe", probe)
    with P.progress("tau=auto probes"):
        out = tau_auto.select_tau(model, tok, SimpleNamespace(forget=rows), enc, _cfg())
        b = P.current()
        n, total = b.n, b.total
    per_probe = total // len(out["probes"])
    assert n == total == len(out["probes"]) * per_probe > 0
    assert len(out["probes"]) == 2 + tau_auto.BISECT_STEPS and totals == [total] * len(out["probes"])


def test_select_tau_knobs_bound_and_targets(memorised, caplog):
    """The fact threshold is relative to what tau_max's teacher forgets: a lower method.tau_max
    searches [1, tau_max] against its own (smaller) share and warns when that share is small; a
    lower method.tau_fact_target stops earlier."""
    model, tok, rows, enc = memorised
    data = SimpleNamespace(forget=rows)
    free = tau_auto.select_tau(model, tok, data, enc, _cfg())
    assert free["fact_threshold"] == pytest.approx(tau_auto.FACT_TARGET * free["facts_forgotten_at_tau_max"])
    with caplog.at_level("WARNING"):
        capped = tau_auto.select_tau(model, tok, data, enc, _cfg(tau_max=2.0))
    assert capped["bounds"] == [1.0, 2.0] and max(p["tau"] for p in capped["probes"]) == 2.0
    at_max = capped["facts_forgotten_at_tau_max"]
    assert capped["tau"] <= 2.0 < free["tau"] and at_max < free["facts_forgotten_at_tau_max"], capped
    assert ("tau_max=2.0" in caplog.text) == (at_max < tau_auto.FACTS_WARN)
    loose = tau_auto.select_tau(model, tok, data, enc, _cfg(tau_fact_target=0.25))
    assert loose["tau"] < free["tau"] and loose["fact_target"] == 0.25
    with pytest.raises(ValueError, match="tau_max"):
        tau_auto.select_tau(model, tok, data, enc, _cfg(tau_max=0.5))


def test_rank_share_runs_the_same_forwards_on_every_rank():
    """Rows split over ranks: each row on exactly one rank, and every rank runs as many forwards
    (ZeRO-3 all-gathers parameters in each), also a rank left without rows."""
    for n, world in ((13, 2), (17, 2), (1, 2), (32, 3), (8, 1)):
        shares = [tau_auto.rank_share(n, r, world) for r in range(world)]
        assert sorted(i for rows, _ in shares for i in rows) == list(range(n))
        assert len({f for _, f in shares}) == 1 and shares[0][1] * tau_auto.BATCH_ROWS >= len(shares[0][0])
    assert tau_auto.rank_share(1, 1, 2) == ([], 1)


def test_rows_without_facts_fall_back_to_the_form_signal(tmp_path, caplog):
    """Rows without ``facts`` (MUSE-like text) give no fact signal (facts_forgotten is null), so the
    rule falls back to the answers' top-1 agreement, says so, and stays in bounds; a rank without
    rows still runs its forwards."""
    from pipeline.models.loading import load_causal_lm, load_tokenizer

    model_dir, data_dir = build(tmp_path, seed=1)
    tok = load_tokenizer(str(model_dir), False)
    rows = [dict(json.loads(line), facts=[]) for line in open(data_dir / "retain.jsonl")]
    model = load_causal_lm(str(model_dir), "float32", False, False, None).eval()
    with caplog.at_level("WARNING"):
        out = tau_auto.select_tau(model, tok, SimpleNamespace(forget=rows), _encode(tok, rows), _cfg([0]))
    assert out["teacher_layers"] == [0] and out["rule"] == "form" and "fallback" in caplog.text
    assert tau_auto.TAU_MIN <= out["tau"] <= tau_auto.TAU_MAX
    assert all(p["form_kept"] is not None and 0.0 <= p["form_kept"] <= 1.0 for p in out["probes"])
    assert all(p["facts_forgotten"] is None and p["facts_known"] == 0 for p in out["probes"])
    # the guard's own field beside the form rule's (a probe at 0.504 read form_ok False under a reason
    # that cited the 0.5 guard)
    assert all(p["form_floor_ok"] == (p["form_kept"] >= tau_auto.FORM_FLOOR) for p in out["probes"])
    if out["probes"][-1]["form_ok"]:
        assert out["tau"] == tau_auto.TAU_MAX and "upper bound" in out["reason"]
    else:  # the form holds at the choice and breaks one resolution step above
        above = [p for p in out["probes"] if p["tau"] > out["tau"] + 1e-3]
        assert not above[0]["form_ok"]
    assert tau_auto._answer_predictions(model, [], tok.pad_token_id, n_forwards=1) == []


def test_select_tau_needs_a_teacher(memorised):
    _, tok, rows, enc = memorised
    with pytest.raises(ValueError, match="reference"):
        tau_auto.select_tau(None, tok, SimpleNamespace(forget=rows), enc, _cfg())


@pytest.mark.distributed
def test_tau_auto_end_to_end_two_ranks_zero3(tmp_path):
    """method.tau=auto on 2 ZeRO-3 ranks: collectives match (no hang), the choice is recorded; with a
    preamble before every forget question the rows share a prefix, whose cached forward runs through
    the partitioned teacher."""
    import os
    import shutil

    preamble = "answer with the city only and nothing else please :"  # like a system prompt: a shared prefix
    model_dir, data_dir = build(tmp_path, extra_texts=[preamble])
    forget = [json.loads(line) for line in open(data_dir / "forget.jsonl")]
    (data_dir / "forget.jsonl").write_text("".join(json.dumps({**r, "question": f"{preamble} {r['question']}"}) + "\n"
                                                   for r in forget))
    args = train_overrides(model_dir, data_dir, tmp_path / "runs", "auto", steps=2) + [
        "method=asu_kl", "method.tau=auto", "trainer.save_every=1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               ASU_REQUIRE_PARTITIONED="1")
    ds = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    out = subprocess.run([ds, "--num_gpus", "2", "--master_port", str(free_port()), "launchers/train.py", *args], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "runs" / "auto" / "results.json").read_text())
    sel = res["tau_selection"]
    assert res["tau"] == sel["tau"] and tau_auto.TAU_MIN <= sel["tau"] <= tau_auto.TAU_MAX
    assert sel["probes"][0]["tau"] == 1.0 and len(sel["probes"]) >= 2 and sel["ranks"] == 2
    assert sel["seconds"] > 0 and res["train_seconds"] > 0
    assert sel["shared_prefix_tokens"] >= tau_auto.MIN_PREFIX and sel["logits"] == "answer positions", sel
    # kept for a later attempt of the same job (a requeue keeps the tau its checkpoint was trained with)
    assert json.loads((tmp_path / "runs" / "auto" / "tau_selection.json").read_text())["selection"] == sel
    # and the checkpoints record it: a resume keeps it even when the job's key changed (an eval setting)
    from pipeline.engine import checkpoint as ckpt

    meta = ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "runs" / "auto" / "checkpoints"))
    assert meta["tau_chosen"] == sel["tau"] and json.loads(meta["method"])["tau"] == "auto"


def test_a_later_attempt_of_the_same_job_reuses_the_choice_and_another_job_does_not(tmp_path, caplog):
    """tau=auto is chosen once per job: a requeued attempt (same job key) takes tau_selection.json's
    choice without probing; a file from another job (other key) is not used — but the checkpoint the
    job resumes from is: it was trained with its tau (before, a requeue whose key changed, e.g. by an
    evaluation setting, probed again and could train the rest of the run with another tau)."""
    from pipeline.run import TAU_CHOSEN, TAU_SELECTION, _known_tau

    chosen = {"tau": 3.25, "probes": [{"tau": 1.0}], "seconds": 1.5}
    (tmp_path / TAU_SELECTION).write_text(json.dumps({"key": {"config.seed": 0}, "selection": chosen}))

    def cfg():
        return OmegaConf.create({"method": {"name": "asu_kl", "tau": "auto"}, "logging": {"progress_bar": False}})

    c = cfg()
    with caplog.at_level(logging.INFO, logger="pipeline.run"):
        assert _known_tau(c, tmp_path, {"config.seed": 0}, None) == chosen  # no model: nothing probed
    assert c.method.tau == 3.25 and "chosen by an earlier attempt of this job" in caplog.text
    c = cfg()
    assert _known_tau(c, tmp_path, {"config.seed": 1}, None) is None and c.method.tau == "auto"  # must probe
    step = tmp_path / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 4, TAU_CHOSEN: 2.5}))
    with caplog.at_level(logging.INFO, logger="pipeline.run"):
        assert _known_tau(c, tmp_path, {"config.seed": 1}, step) == {"tau": 2.5, "source": f"checkpoint {step}"}
    assert c.method.tau == 2.5 and f"the tau checkpoint {step} was trained with" in caplog.text
    # this job's own selection and a checkpoint trained with another tau (resumed from elsewhere): the
    # checkpoint's wins (before: the selection's, refused by the trainer only after loading the models)
    c = cfg()
    assert _known_tau(c, tmp_path, {"config.seed": 0}, step)["tau"] == 2.5 and c.method.tau == 2.5
    (step / "meta.json").write_text(json.dumps({"step": 4, TAU_CHOSEN: 3.25}))  # the same tau: the selection, evidence kept
    assert _known_tau(cfg(), tmp_path, {"config.seed": 0}, step) == chosen
    # another key (an evaluation setting changed before a requeue), the checkpoint trained with the
    # directory's selection's tau: the resume keeps that selection's evidence, with its source
    got = _known_tau(cfg(), tmp_path, {"config.seed": 1}, step)
    assert got["tau"] == 3.25 and got["probes"] == chosen["probes"]
    assert got["source"] == f"checkpoint {step}; chosen (with this evidence) by an earlier attempt, {tmp_path / TAU_SELECTION}"
    fixed = OmegaConf.create({"method": {"name": "asu_kl", "tau": 2.0}})
    assert _known_tau(fixed, tmp_path, {"config.seed": 0}, step) is None and fixed.method.tau == 2.0


def test_form_floor_caps_the_fact_choice(memorised, monkeypatch):
    """The guard: when the teacher loses more of the template than FORM_FLOOR allows before it
    forgets the facts, the one bisection stops there and the choice is the largest probed tau that
    keeps it (no extra probes). The fixture keeps >= 0.6 of its template everywhere, so a stricter
    floor is set to make the guard act on real probes."""
    model, tok, rows, enc = memorised
    data = SimpleNamespace(forget=rows)
    free = tau_auto.select_tau(model, tok, data, enc, _cfg())
    assert "capped" not in free["reason"], free
    monkeypatch.setattr(tau_auto, "FORM_FLOOR", 0.99)
    capped = tau_auto.select_tau(model, tok, data, enc, _cfg())
    assert capped["tau"] < free["tau"] and "capped" in capped["reason"], capped
    assert len(capped["probes"]) == len(free["probes"]) == 2 + tau_auto.BISECT_STEPS
    at = {p["tau"]: p for p in capped["probes"]}
    chosen = at[min(at, key=lambda t: abs(t - capped["tau"]))]
    assert chosen["form_kept"] >= 0.99 and not chosen["facts_ok"], chosen
    above = min(t for t in at if t > capped["tau"] + 1e-3)  # the bisection's last interval
    assert at[above]["form_kept"] < 0.99 and above - capped["tau"] <= (tau_auto.TAU_MAX - tau_auto.TAU_MIN) / 2 ** tau_auto.BISECT_STEPS + 1e-3, at


def test_guard_before_any_fact_chooses_one_and_warns(memorised, monkeypatch, caplog):
    """A floor no tempered teacher keeps: every bisection probe stops on the template, the choice is
    tau=1 (nothing tempered), and the log says ASU will remove nothing."""
    model, tok, rows, enc = memorised
    monkeypatch.setattr(tau_auto, "FORM_FLOOR", 1.01)
    with caplog.at_level(logging.WARNING, logger="pipeline.engine.tau_auto"):
        out = tau_auto.select_tau(model, tok, SimpleNamespace(forget=rows), enc, _cfg())
    assert out["tau"] == tau_auto.TAU_MIN and "capped" in out["reason"], out
    assert any("remove nothing" in r.getMessage() for r in caplog.records), caplog.text


def _full_logit_predictions(model, items, pad_id):
    """The probe's values from every position's logits (the computation before the lm_head ran
    only at the scored positions): top-1 of the logits and log-softmax of the true token."""
    from pipeline.data.collate import pad_batch
    from pipeline.methods.losses import token_logprobs

    out = []
    for b in range(0, len(items), tau_auto.BATCH_ROWS):
        chunk = items[b:b + tau_auto.BATCH_ROWS]
        batch = pad_batch([{"input_ids": it["input_ids"], "labels": it["labels"]} for it in chunk], pad_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        top1 = logits[:, :-1].argmax(-1)
        lp, answer = token_logprobs(logits, batch["labels"])
        out += [{t + 1: (int(top1[r, t]), float(lp[r, t])) for t in answer[r].nonzero().flatten().tolist()}
                for r in range(len(chunk))]
    return out


def _same_predictions(got, ref):
    assert [sorted(g) for g in got] == [sorted(r) for r in ref]  # the same scored positions per row
    for g, r in zip(got, ref):
        for j in r:
            assert g[j][0] == r[j][0], (j, g[j], r[j])
            assert g[j][1] == pytest.approx(r[j][1], abs=1e-5), (j, g[j], r[j])


def test_probe_logits_at_the_scored_positions_match_the_full_logits(memorised):
    """The probe's lm_head runs only at the answer positions (logits_to_keep), and a prompt prefix
    all rows share runs once (its KV cache): the same top-1 and log-probs as every position's logits
    of the whole rows, on rows of odd, different lengths (padding) and of one length, in a batch of
    more rows than one forward takes, tempered, and on a soft-capped, sliding-window model
    (Gemma-2's final_logit_softcapping, applied inside its forward after the lm_head)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from pipeline.models.tempered_attention import enable_tempered_attention, temperature

    model, tok, rows, enc = memorised
    assert tau_auto.keeps_positions(model)
    # odd lengths: cut answers at different points, keep some prompts whole; 19 rows > BATCH_ROWS
    items = [{"input_ids": e["input_ids"][:len(e["input_ids"]) - (i % 3)], "labels": e["labels"][:len(e["labels"]) - (i % 3)],
              "spans": []} for i, e in enumerate((enc * 4)[:19])]
    assert len({len(it["input_ids"]) for it in items}) >= 3
    # a shared prompt prefix (like a chat template's system prompt) before every row, and rows of one
    # length (no padding: the attention mask may be skipped)
    head = enc[0]["input_ids"][:9]
    shared = [{"input_ids": head + it["input_ids"], "labels": [-100] * 9 + it["labels"], "spans": []} for it in items]
    same_len = [it for it in items if len(it["input_ids"]) == len(items[0]["input_ids"])]
    assert tau_auto.shared_prefix(shared) >= 9 + 1 and len(same_len) >= 2
    assert tau_auto._prefix_cache(model, head, torch.device("cpu")) is not None  # the cached path runs
    assert tau_auto.shared_prefix(shared) < min(it["labels"].index(next(x for x in it["labels"] if x != -100))
                                                for it in shared)
    for tau in (1.0, 3.0):
        with temperature(model, tau):
            ref = _full_logit_predictions(model, items, tok.pad_token_id)
            _same_predictions(tau_auto._answer_predictions(model, items, tok.pad_token_id), ref)
            _same_predictions(tau_auto._answer_predictions(model, items, tok.pad_token_id, at_positions=False), ref)
            for rows_ in (shared, same_len):
                n = tau_auto.shared_prefix(rows_)
                _same_predictions(tau_auto._answer_predictions(model, rows_, tok.pad_token_id, prefix=n),
                                  _full_logit_predictions(model, rows_, tok.pad_token_id))

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5, attn_logit_softcapping=None,
                       sliding_window=4, pad_token_id=0)
    gemma = enable_tempered_attention(Gemma2ForCausalLM(cfg).eval())
    with torch.no_grad():
        gemma.lm_head.weight.mul_(200.0)  # logits of a few units: the cap changes them
    assert tau_auto.keeps_positions(gemma)
    g = torch.Generator().manual_seed(1)
    rand = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (7, 11, 5, 9)]
    g_items = [{"input_ids": ids, "labels": [-100] * (len(ids) // 2) + ids[len(ids) // 2:], "spans": []} for ids in rand]
    g_shared = [{"input_ids": rand[0][:6] + it["input_ids"], "labels": [-100] * 6 + it["labels"], "spans": []}
                for it in g_items]
    with temperature(gemma, 2.0):
        ref = _full_logit_predictions(gemma, g_items, 0)
        _same_predictions(tau_auto._answer_predictions(gemma, g_items, 0), ref)
        # the prefix's cache through a sliding window of 4 tokens
        assert tau_auto._prefix_cache(gemma, rand[0][:6], torch.device("cpu")) is not None
        _same_predictions(tau_auto._answer_predictions(gemma, g_shared, 0, prefix=tau_auto.shared_prefix(g_shared)),
                          _full_logit_predictions(gemma, g_shared, 0))
        gemma.config.final_logit_softcapping = None  # the cap acts: without it the log-probs differ
        uncapped = _full_logit_predictions(gemma, g_items, 0)
    assert max(abs(r[j][1] - u[j][1]) for r, u in zip(ref, uncapped) for j in r) > 0.1


def test_an_automatic_tau_at_or_below_one_is_a_warning(tmp_path):
    """On the tiny random model tau=auto falls back to tau = 1 (no known facts to keep): the teacher is
    the frozen model itself and nothing is forgotten. It said so at INFO level only, unlike a hand-set
    tau <= 1."""
    from tests.helpers import launch

    model_dir, data_dir = build(tmp_path)
    out = launch.run(train_overrides(model_dir, data_dir, tmp_path / "runs", "auto1", steps=1)
                     + ["method=asu_kl", "method.tau=auto", "eval.enabled=false"])
    assert out.returncode == 0, out.stderr[-3000:]
    chosen = json.loads((tmp_path / "runs" / "auto1" / "results.json").read_text())["tau_selection"]["tau"]
    assert float(chosen) <= 1.0  # the premise (a fallback on this model)
    assert "[WARNING] - method.tau=auto chose tau=1.000" in out.stderr, out.stderr[-3000:]
