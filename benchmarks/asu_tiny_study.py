"""Study: does attention smoothing (ASU, asu_kl) unlearn facts fluently on the embedded tiny benchmark?

Builds (or reuses, cached) the synthetic benchmark's target and retain models with
``pipeline.data.prepare.prepare_synthetic``, then runs a grid of single-process plain-torch ASU
runs (teacher = frozen target with attention logits / tau in ``layers``; L_F = KL(teacher || student)
on forget answer tokens, L_R = KL(orig || student) on retain answer tokens, masked per-sequence
means; total = gamma * L_F + alpha * L_R; AdamW) and prints, per run: forget / retain / utility fact
recall of greedy answers, bigram repetition and the share of well-formed answers (ends with <eos>,
no token three times in a row). Also reports the tempered *teacher* itself (no training).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/asu_tiny_study.py [--cache DIR] [--taus 2,3,4] [--steps N]

Writes benchmarks/results/asu_tiny_study.json (atomically); every argument other than its default
adds ``_<arg>-<value>`` to the name (``common.out_name``: ``asu_tiny_study_steps-5.json``), and
``--out DIR`` writes into DIR (a path ending in ``.json`` names the file, as before). The arguments
are checked before the benchmark is prepared (minutes on a fresh cache). Runs with one torch thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402  (benchmarks/common.py)
    OneLineParser,
    device_info,
    json_object,
    out_name,
    positive_float,
    positive_int,
    write_json,
)

from pipeline.data.collate import pad_batch  # noqa: E402
from pipeline.data.formatting import encode_qa, prompt_ids  # noqa: E402
from pipeline.eval.metrics import fact_recall, is_well_formed, nanmean, repetition_rate  # noqa: E402
from pipeline.models.tempered_attention import set_temperature, temperature  # noqa: E402

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def greedy_answers(model, tok, rows, max_new_tokens: int = 24, batch_size: int = 64) -> list[dict]:
    """Greedy continuation of each row's prompt (left-padded batches, no KV cache: tiny model)."""
    model.eval()
    out = []
    eos = tok.eos_token_id
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        prompts = [prompt_ids(tok, r["question"]) for r in chunk]
        L = max(map(len, prompts))
        ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
        gen = [[] for _ in chunk]
        done = [False] * len(chunk)
        for _ in range(max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            nxt = logits.argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    gen[i].append(t)
                    done[i] = t == eos
            if all(done):
                break
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones(len(chunk), 1, dtype=mask.dtype)], 1)
        for r, g in zip(chunk, gen):
            ended = bool(g) and g[-1] == eos
            toks = g[:-1] if ended else g
            out.append({"text": tok.decode(toks), "tokens": toks, "ended": ended, "facts": r["facts"]})
    return out


def evaluate(model, tok, rows) -> dict:
    gens = greedy_answers(model, tok, rows)
    return {
        "fact_recall": nanmean([fact_recall(g["text"], g["facts"]) for g in gens]),
        "repetition": nanmean([repetition_rate(g["tokens"], 2) for g in gens]),
        "well_formed": nanmean([float(is_well_formed(g["tokens"], g["ended"])) for g in gens]),
        "examples": [g["text"] for g in gens[:3]],
    }


# ----------------------------------------------------------------------------- ASU (asu_kl)
def _masked_kl(p_logits, q_logits, labels) -> torch.Tensor:
    """KL(p || q) per position over next-token distributions at answer tokens; mean over a
    sequence's answer tokens, then over sequences."""
    lp = F.log_softmax(p_logits[:, :-1].float(), -1)
    lq = F.log_softmax(q_logits[:, :-1].float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    m = (labels[:, 1:] != -100).float()
    return ((kl * m).sum(1) / m.sum(1).clamp(min=1)).mean()


def encode(tok, rows, max_length=128):
    return [{"input_ids": e.input_ids, "labels": e.labels}
            for e in (encode_qa(tok, r["question"], r["answer"], max_length) for r in rows)]


def asu_kl(target, tok, forget_rows, retain_rows, tau: float, layers, gamma=1.0, alpha=1.0, lr=1e-3,
           steps=60, batch_size=16, retain_batch_size=16, seed=0, weight_decay=0.0) -> tuple[object, dict]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    teacher = copy.deepcopy(target).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(target)
    for p in student.parameters():
        p.requires_grad_(True)
    set_temperature(student, 1.0)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    fdata, rdata = encode(tok, forget_rows), encode(tok, retain_rows)
    t0 = time.perf_counter()
    lf_v = lr_v = float("nan")
    for _step in range(steps):
        fi = torch.randint(len(fdata), (min(batch_size, len(fdata)),), generator=g).tolist()
        ri = torch.randint(len(rdata), (retain_batch_size,), generator=g).tolist()
        fb = pad_batch([fdata[i] for i in fi], tok.pad_token_id)
        rb = pad_batch([rdata[i] for i in ri], tok.pad_token_id)
        with torch.no_grad():
            with temperature(teacher, tau, layers):
                t_logits = teacher(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"]).logits
            o_logits = teacher(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits
        s_f = student(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"]).logits
        s_r = student(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits
        lf = _masked_kl(t_logits, s_f, fb["labels"])
        lr_ = _masked_kl(o_logits, s_r, rb["labels"])
        loss = gamma * lf + alpha * lr_
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        lf_v, lr_v = float(lf.detach()), float(lr_.detach())
    student.eval()
    return student, {"seconds": time.perf_counter() - t0, "final_forget_kl": lf_v, "final_retain_kl": lr_v}


# ----------------------------------------------------------------------------- main
def load(art, variant):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from pipeline.models.tempered_attention import enable_tempered_attention

    d = art.target_dir if variant == "target" else art.retain_dir
    m = LlamaForCausalLM.from_pretrained(str(d))
    enable_tempered_attention(m)
    return m.eval(), AutoTokenizer.from_pretrained(str(art.tokenizer_dir))


def read_split(art, split):
    with open(Path(art.data_dir) / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


def row_line(name, r):
    return (f"{name:<34} {r['forget']['fact_recall']:>7.3f} {r['retain']['fact_recall']:>7.3f} "
            f"{r['utility']['fact_recall']:>7.3f} {r['forget']['repetition']:>6.3f} {r['forget']['well_formed']:>6.2f} "
            f"{r.get('gap_closed', float('nan')):>6.2f} {r.get('seconds', 0):>6.1f}")


def tau_list(text: str) -> list[float]:
    """argparse type: comma-separated temperatures, each a number > 0 (``2,3,4``)."""
    return [positive_float(t) for t in text.split(",")]


def layer_sets(text: str) -> list:
    """argparse type: ';'-separated layer sets, each ``all`` or comma-separated layer indices >= 0
    (``all;0;0,1``): None for all layers, else the list of indices."""
    out = []
    for part in text.split(";"):
        if part == "all":
            out.append(None)
            continue
        try:
            layers = [int(x) for x in part.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"a layer set is 'all' or indices like 0,1; got {part!r}") from None
        if min(layers) < 0:
            raise argparse.ArgumentTypeError(f"layer indices must be >= 0, got {part!r}")
        out.append(layers)
    return out


def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
    """The command line, checked before anything is built: (arguments, their defaults)."""
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "asu"), help="the pipeline's cache_dir: reuses the demo's models")
    ap.add_argument("--taus", type=tau_list, default="2,3,4")
    ap.add_argument("--layer-sets", type=layer_sets, default="all;0;0,1;1,2,3")
    ap.add_argument("--steps", type=positive_int, default=None)
    ap.add_argument("--lr", type=positive_float, default=None)
    ap.add_argument("--gamma", type=float, default=None)
    ap.add_argument("--alpha", type=float, default=None)
    ap.add_argument("--teacher-only", action="store_true")
    ap.add_argument("--data", type=json_object, default={}, help="JSON overrides of SyntheticConfig")
    ap.add_argument("--model", type=json_object, default={}, help="JSON overrides of TinyModelConfig")
    ap.add_argument("--retain-eval", type=positive_int, default=120, help="retain rows evaluated (speed)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default benchmarks/results); a path ending in .json names the file")
    args = ap.parse_args(argv)
    from pipeline.data.synthetic import SyntheticConfig
    from pipeline.models.tiny import TinyModelConfig

    for flag, cls, value in (("--data", SyntheticConfig, args.data), ("--model", TinyModelConfig, args.model)):
        try:
            cls(**value)
        except (TypeError, ValueError) as exc:  # an unknown or bad field: now, not after minutes of preparing
            ap.error(f"argument {flag}: {exc}")
    return args, vars(ap.parse_args([]))


def main(argv=None):
    args, defaults = parse_args(argv)
    from pipeline.data.prepare import prepare_synthetic
    from pipeline.data.synthetic import SyntheticConfig
    from pipeline.models.tiny import TinyModelConfig

    dcfg, mcfg = SyntheticConfig(**args.data), TinyModelConfig(**args.model)
    hp = dict(RECOMMENDED)
    for k in ("steps", "lr", "gamma", "alpha"):
        if getattr(args, k) is not None:
            hp[k] = getattr(args, k)
    t0 = time.perf_counter()
    art = prepare_synthetic(dcfg, mcfg, args.cache)
    prep_s = time.perf_counter() - t0
    target, tok = load(art, "target")
    retain_model, _ = load(art, "retain")
    forget = read_split(art, "forget10")
    retain_all = read_split(art, "retain90")
    retain_eval = retain_all[:: max(1, len(retain_all) // args.retain_eval)][: args.retain_eval]
    util = read_split(art, "real_authors") + read_split(art, "world_facts")

    def ev(m):
        return {"forget": evaluate(m, tok, forget), "retain": evaluate(m, tok, retain_eval),
                "utility": evaluate(m, tok, util)}

    results = {"benchmark": dcfg.__dict__, "model": mcfg.__dict__, "asu": hp, "prepare_seconds": prep_s,
               "env": device_info("cpu"), "runs": []}
    base_t, base_r = ev(target), ev(retain_model)
    results["target"], results["retain"] = base_t, base_r
    gap = base_t["forget"]["fact_recall"] - base_r["forget"]["fact_recall"]

    def closed(r):
        return (base_t["forget"]["fact_recall"] - r["forget"]["fact_recall"]) / gap if gap > 0 else float("nan")

    hdr = f"{'run':<34} {'forget':>7} {'retain':>7} {'util':>7} {'rep2':>6} {'wf':>6} {'closed':>6} {'sec':>6}"
    print(hdr)
    print(row_line("target", base_t))
    print(row_line("retain (gold)", base_r))
    n_layers = target.config.num_hidden_layers
    for layers in args.layer_sets:
        lname = "all" if layers is None else ",".join(map(str, layers))
        if layers is not None and max(layers) >= n_layers:
            continue
        for tau in args.taus:
            with temperature(target, tau, layers):
                r = ev(target)
            r.update(kind="teacher", tau=tau, layers=lname)
            r["gap_closed"] = closed(r)
            results["runs"].append(r)
            print(row_line(f"teacher tau={tau:g} L={lname}", r))
            if args.teacher_only:
                continue
            student, info = asu_kl(target, tok, forget, retain_all, tau, layers, gamma=hp["gamma"],
                                   alpha=hp["alpha"], lr=hp["lr"], steps=hp["steps"],
                                   batch_size=hp["batch_size"], retain_batch_size=hp["retain_batch_size"])
            r = ev(student)
            r.update(kind="asu_kl", tau=tau, layers=lname, **info)
            r["gap_closed"] = closed(r)
            results["runs"].append(r)
            print(row_line(f"asu_kl tau={tau:g} L={lname}", r), flush=True)
            print("      e.g.", r["forget"]["examples"][0], "| truth:", forget[0]["answer"])
    named = [k for k in defaults if k not in ("cache", "out")]  # what changes the measurement
    name = out_name("asu_tiny_study", {k: getattr(args, k) for k in named}, {k: defaults[k] for k in named})
    write_json(name, results, args.out, device_suffix=False)  # atomic; the committed file has no device suffix


# lr 3e-4 x 50 steps: at 1e-3 x 100 the model utility fell to 0.9x the target's (docs/synthetic_benchmark.md).
RECOMMENDED = {"tau": 4.0, "teacher_layers": None, "gamma": 1.0, "alpha": 4.0, "lr": 3e-4, "steps": 50, "batch_size": 16,
               "retain_batch_size": 16}

if __name__ == "__main__":
    main()
