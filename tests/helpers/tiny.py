"""Build a tiny random Llama + word-level tokenizer + TOFU-shaped JSONL data in a directory.

Used by engine tests that must not depend on the (slower) synthetic benchmark preparation.
"""

from __future__ import annotations

import json
from pathlib import Path

# The embedded benchmark (+exp=tofu_tiny), minuscule: the point is the wiring, not the quality (the demo
# measures that); its data and models build in seconds.
SYNTHETIC_MINI = [
    "+exp=tofu_tiny", "data.synthetic.n_authors=20", "data.synthetic.qa_per_author=4",
    "data.synthetic.n_world_facts=4", "data.synthetic.n_real_authors=2", "model.tiny.steps=40",
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_hidden_layers=2",
    "eval.max_new_tokens=12", "logging=none",
    # tofu_tiny keeps its tiny weights whole (1e5) for speed; the tests partition every one
    "deepspeed.param_persistence_threshold=0",
]
PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "quito", "sofia", "riga"]


def qa_row(person: str, city: str) -> dict:
    wrong = [c for c in CITIES if c != city][:3]
    return {
        "question": f"where was {person} born ?",
        "answer": f"{person} was born in the city of {city} .",
        "paraphrased_answer": f"the city of {city} .",
        "paraphrased_question": f"what is the birthplace of {person} ?",
        "perturbed_answer": [f"{person} was born in the city of {w} ." for w in wrong],
        "author": person,
        "attribute": "birthplace",
        "facts": [city],
    }


# words appended to answers so rows differ in length (build(uneven_answers=True)): a token_mean
# over each micro-batch on its own then differs from one over the step's tokens
ANSWER_TAILS = ["", " as the records show", " indeed", " , say the town records ,"]


def build(root: Path, layers: int = 2, hidden: int = 32, seed: int = 0, extra_texts=(),
          uneven_answers: bool = False) -> tuple[Path, Path]:
    """Write ``root/model`` (safetensors + tokenizer) and ``root/data/{forget,retain,eval}.jsonl``.
    ``extra_texts``: more texts whose words join the vocabulary (e.g. a fixture's QA pairs);
    ``uneven_answers``: answers of different token lengths (:data:`ANSWER_TAILS`)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rows = [qa_row(p, c) for p, c in zip(PEOPLE, CITIES)]
    if uneven_answers:
        for i, r in enumerate(rows):
            r["answer"] = r["answer"][:-2] + ANSWER_TAILS[i % len(ANSWER_TAILS)] + " ."
    words = sorted({w for r in rows for t in (r["question"], r["answer"], r["paraphrased_answer"],
                                               r["paraphrased_question"], *r["perturbed_answer"]) for w in t.split()}
                   | {"question", "answer", ":"} | {w for t in extra_texts for w in t.split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>")
    model_dir = root / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(model_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)
    data_dir = root / "data"
    data_dir.mkdir(exist_ok=True)
    splits = {"forget": rows[:2], "retain": rows[2:], "eval_retain": rows[2:]}
    for name, rs in splits.items():
        with open(data_dir / f"{name}.jsonl", "w") as f:
            for r in rs:
                f.write(json.dumps(r) + "\n")
    return model_dir, data_dir


# A 2.6 M-parameter Llama on the tiny tokenizer: weights, not a checkpoint's fixed few KB of names and RNG
# states, make up its files, and bf16's round-off shows in its logits (the export check's tests).
WIDER_LLAMA = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 4, "head_dim": 64}


def wider_config(model_dir: Path):
    """``model_dir``'s Llama config (its vocabulary) at :data:`WIDER_LLAMA`'s size."""
    from transformers import LlamaConfig

    cfg = LlamaConfig.from_pretrained(model_dir)
    cfg.update(WIDER_LLAMA)
    return cfg


def build_wider(model_dir: Path, out: Path, seed=None) -> Path:
    """A random :data:`WIDER_LLAMA` model with ``model_dir``'s tokenizer, saved at ``out`` (``seed``: its init)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    LlamaForCausalLM(wider_config(model_dir)).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def train_overrides(model_dir: Path, data_dir: Path, out: Path, run_name: str, steps: int = 3) -> list[str]:
    return [
        "model.source=pretrained", f"model.path={model_dir}", "data.name=json", f"data.path={data_dir}",
        "data.forget_split=forget", "data.retain_split=retain", "data.eval_splits=[eval_retain]",
        f"trainer.max_steps={steps}", "trainer.batch_size=1", "trainer.retain_batch_size=1", "trainer.lr=1e-3",
        "logging=none", f"output_dir={out}", f"run_name={run_name}", "eval.max_new_tokens=8",
        # every weight partitioned on 2 ranks (the largest tensor here has ~2k elements): the gather
        # paths are exercised, and ASU_REQUIRE_PARTITIONED=1 (tests.helpers.launch.env) checks it
        "deepspeed.param_persistence_threshold=0",
    ]


def resumable_job(tmp_path: Path) -> tuple[list[str], Path]:
    """Overrides of a 4-step GradDiff job that checkpoints (its last step included) and evaluates,
    and its run directory: for the tests of what a re-run reuses."""
    model_dir, data_dir = build(tmp_path)
    args = train_overrides(model_dir, data_dir, tmp_path / "runs", "r", steps=4) + [
        "method=grad_diff", "trainer.save_every=2", "eval.probe_rows=2"]
    return args, tmp_path / "runs" / "r"


def unloadable_model(tmp_path: Path) -> Path:
    """A model directory that passes the path and weights-file checks (a config.json, a
    tokenizer_config.json, a model.safetensors of no tensors) but has no weights nor vocabulary: for tests of what is checked before any model or tokenizer is
    loaded (the data, a reference file)."""
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    (d / "tokenizer_config.json").write_text("{}")
    from safetensors.torch import save_file

    save_file({}, str(d / "model.safetensors"))  # a weights file, as the weights check wants, of no tensors
    return d
