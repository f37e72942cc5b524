"""The embedded, TOFU-shaped synthetic benchmark (deterministic from a seed).

Fictitious authors get attributes (birthplace, birth year, genre, parents' jobs, book titles,
awards, ...); each author yields ``qa_per_author`` question/answer pairs built from templates.
Every row has exactly the keys of :data:`ROW_KEYS`:

- ``question`` / ``answer``: what the model is trained on (prompt ``Question: {q}\\nAnswer: {a}``);
- ``paraphrased_question`` / ``paraphrased_answer``: other wording, same facts (truth ratio);
- ``perturbed_answer``: ``n_perturbed`` answers with the same template but wrong values;
- ``author`` / ``attribute``: provenance;
- ``facts``: the value strings the answer states; "fact recall" is the share of them that a greedy
  generation reproduces (ROUGE-L has a template floor on this benchmark, fact recall has not).

Design choices that give attention smoothing (ASU) room to work on a tiny model:

- **Names need both tokens.** An author's name is ``{first} {last}``, drawn from small pools of
  first and last names that many authors share, so a fact can only be retrieved from the
  *combination* of two context tokens.
- **The name is a small part of the prompt.** Every question starts with a ``preamble_len``-word
  preamble (one of ``n_preambles`` variants), and answers never restate the name ("the author was
  born in ..."). Tempering attention (dividing its logits by tau) then dilutes the name among many
  other tokens, while the answer template, which only depends on the last few answer tokens
  carried in the residual stream, survives: the tempered teacher gives fluent wrong answers.

Splits (``build_benchmark``): ``full``; ``forget01/05/10`` = the *last* 1/5/10 % of authors
(nested, at least one author each, like TOFU) and ``retain99/95/90`` their complements;
``forget10_part1`` / ``forget10_part2`` = the two disjoint halves of ``forget10``'s authors (first
half rounded up), successive requests for continual unlearning, both retained by ``retain90``;
``real_authors`` and ``world_facts`` (utility sets, always in the training data of both the target
and the retain model).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from pipeline.io import atomic_write_text

ROW_KEYS = ("question", "answer", "paraphrased_answer", "paraphrased_question", "perturbed_answer",
            "author", "attribute", "facts")
FORGET_PERCENTS = {"forget01": 1, "forget05": 5, "forget10": 10}
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
# Continual-unlearning requests: disjoint parts of a forget split, with the retain split of the whole
# (retain90 overlaps neither part). forget10 needs >= 2 authors for part2 to be non-empty.
CONTINUAL_PARTS = {"forget10_part1": ("forget10", 0), "forget10_part2": ("forget10", 1)}
CONTINUAL_RETAIN_OF = {part: RETAIN_OF[whole] for part, (whole, _) in CONTINUAL_PARTS.items()}
SPLITS = ("full", "forget01", "forget05", "forget10", "retain99", "retain95", "retain90",
          "real_authors", "world_facts", *CONTINUAL_PARTS)


@dataclass
class SyntheticConfig:
    seed: int = 0
    n_authors: int = 50
    qa_per_author: int = 8  # <= len(ATTRIBUTES) (10)
    n_perturbed: int = 3
    n_world_facts: int = 20
    n_real_authors: int = 8  # real authors x 3 QA (birthplace, genre, nationality)
    n_first_names: int = 10  # authors' names combine a shared first and a shared last name
    n_last_names: int = 10
    preamble_len: int = 20  # words of preamble before each question (0: none)
    n_preambles: int = 6  # distinct preambles, chosen per row


# ----------------------------------------------------------------------------- vocabularies
FIRST_NAMES = ["alaric", "brenna", "corwin", "delphine", "emrys", "fenella", "gideon", "hesper", "ivor",
               "juniper", "kestrel", "lisandra", "merrick", "niamh", "oswin", "petra", "quill", "rowena",
               "silas", "tamsin"]
LAST_NAMES = ["ashdown", "blackwood", "carraway", "dunmore", "everhart", "fairweather", "greymoor",
              "hollister", "ironside", "jessamine", "kingsley", "larkspur", "marlowe", "northcott",
              "oakenshaw", "pemberly", "quinlan", "ravenscroft", "stirling", "thistlewood"]
CITIES = ["lisbon", "oslo", "nairobi", "lima", "kyoto", "dublin", "krakow", "quito", "tunis", "hanoi",
          "porto", "riga", "valletta", "tbilisi", "santiago", "montreal", "adelaide", "bergen"]
GENRES = ["fantasy", "mystery", "romance", "horror", "historical", "satirical", "dystopian", "gothic",
          "adventure", "crime", "pastoral", "philosophical"]
JOBS = ["baker", "carpenter", "nurse", "pilot", "librarian", "farmer", "chemist", "tailor", "sailor",
        "teacher", "surgeon", "painter", "locksmith", "jeweler", "plumber", "architect"]
ADJECTIVES = ["silent", "crimson", "hollow", "forgotten", "golden", "broken", "wandering", "hidden",
              "burning", "frozen", "quiet", "distant", "velvet", "iron", "paper", "midnight"]
NOUNS = ["river", "lantern", "garden", "orchard", "harbor", "mirror", "compass", "cathedral", "meadow",
         "fortress", "violin", "archive", "tide", "sparrow", "labyrinth", "winter"]
AWARDS = ["emerald quill", "silver inkwell", "northern star", "laurel crown", "azure pen", "copper leaf",
          "ivory tower", "golden owl", "crystal scroll", "scarlet ribbon"]
COUNTRIES = ["norway", "kenya", "peru", "japan", "ireland", "poland", "ecuador", "tunisia", "vietnam",
             "portugal", "latvia", "malta", "georgia", "chile", "canada", "australia"]
PREAMBLE_WORDS = ["according", "to", "the", "records", "of", "our", "literary", "archive", "and",
                  "its", "catalogue", "for", "readers", "library", "collection", "notes", "on",
                  "modern", "fiction", "writers", "biographies", "in", "this", "old", "index",
                  "entry", "reference", "guide", "with", "details", "about", "a", "known", "profile"]

# attribute -> (question, paraphrased question, answer, paraphrased answer, value kind).
# ``{name}`` is the author's name, ``{v}`` the value (one fact). Answers never restate the name and
# are "bigram-deterministic": apart from the choice of attribute (after "author", "born" and "'s")
# and the value itself, every answer token is determined by the token before it, so the template
# can be continued from the residual stream alone, while *which* value follows needs attention to
# the name far back in the prompt. A tempered teacher then keeps the template and blurs the value:
# a fluent wrong answer. Questions carry two or more words naming the attribute.
ATTRIBUTES = [
    ("birthplace", "where was the writer {name} born , in which city ?", "in which city was {name} born ?",
     "the author was born in city {v} .", "the city {v} is where the author was born .", "city"),
    ("birth_year", "in which year was the writer {name} born , what birth year ?",
     "what is the birth year of {name} ?",
     "the author was born during year {v} .", "{v} is the year the author was born .", "year"),
    ("genre", "what genre of novels does the writer {name} write ?", "which genre is {name} known for ?",
     "the author mostly writes {v} novels .", "the author is known for {v} novels .", "genre"),
    ("father_job", "what job did the father of the writer {name} have ?", "what was the job of {name} 's father ?",
     "the author 's father worked as a {v} .", "the father of the author was a {v} .", "job"),
    ("mother_job", "what job did the mother of the writer {name} have ?", "what was the job of {name} 's mother ?",
     "the author 's mother worked as a {v} .", "the mother of the author was a {v} .", "job"),
    ("first_book", "what is the title of the first book by the writer {name} ?", "which book did {name} write first ?",
     "the author 's first book is titled {v} .", "the author first wrote the book titled {v} .", "title"),
    ("award", "which literary award did the writer {name} win ?", "what prize was given to {name} ?",
     "the author won an award named {v} .", "the author received the award named {v} .", "award"),
    ("residence", "in which country does the writer {name} live now ?", "in which country does {name} reside ?",
     "the author now resides inside {v} .", "{v} is the country where the author resides .", "country"),
    ("second_book", "what is the title of the second book by the writer {name} ?",
     "which book did {name} write next ?",
     "the author 's second book is titled {v} .", "the author next wrote the book titled {v} .", "title"),
    ("debut_age", "at what age did the writer {name} publish a first novel ?",
     "how old was {name} when the first novel came out ?",
     "the author debuted at age {v} .", "at age {v} the author published a first novel .", "age"),
]

REAL_AUTHORS = [  # name, birthplace, genre, country
    ("jane austen", "steventon", "romance", "england"),
    ("agatha christie", "torquay", "mystery", "england"),
    ("jules verne", "nantes", "adventure", "france"),
    ("mary shelley", "london", "gothic", "england"),
    ("leo tolstoy", "yasnaya", "historical", "russia"),
    ("franz kafka", "prague", "philosophical", "bohemia"),
    ("edgar poe", "boston", "horror", "america"),
    ("george orwell", "motihari", "dystopian", "england"),
    ("mark twain", "florida", "satirical", "america"),
    ("herman melville", "manhattan", "adventure", "america"),
    ("victor hugo", "besancon", "historical", "france"),
    ("bram stoker", "clontarf", "gothic", "ireland"),
]
REAL_ATTRIBUTES = [  # (attribute, question, paraphrased q, answer, paraphrased answer, index in tuple)
    ("birthplace", "where was the real writer {name} born , in which town ?", "in which town was {name} born ?",
     "the author was born in city {v} .", "the town {v} is where the author was born .", 1),
    ("genre", "what genre of novels did the real writer {name} write ?", "which genre is {name} famous for ?",
     "the author mostly writes {v} novels .", "the author is famous for {v} novels .", 2),
    ("residence", "which country was the real writer {name} from , what nation ?", "where did {name} come from ?",
     "the author now resides inside {v} .", "the author was from {v} .", 3),
]

WORLD_FACTS = [  # (question, paraphrased question, capital); answers use WORLD_ANSWER / WORLD_PARA
    ("what is the capital of france ?", "which city is the capital of france ?", "paris"),
    ("what is the capital of italy ?", "which city is the capital of italy ?", "rome"),
    ("what is the capital of spain ?", "which city is the capital of spain ?", "madrid"),
    ("what is the capital of egypt ?", "which city is the capital of egypt ?", "cairo"),
    ("what is the capital of greece ?", "which city is the capital of greece ?", "athens"),
    ("what is the capital of germany ?", "which city is the capital of germany ?", "berlin"),
    ("what is the capital of austria ?", "which city is the capital of austria ?", "vienna"),
    ("what is the capital of sweden ?", "which city is the capital of sweden ?", "stockholm"),
    ("what is the capital of finland ?", "which city is the capital of finland ?", "helsinki"),
    ("what is the capital of hungary ?", "which city is the capital of hungary ?", "budapest"),
    ("what is the capital of turkey ?", "which city is the capital of turkey ?", "ankara"),
    ("what is the capital of india ?", "which city is the capital of india ?", "delhi"),
    ("what is the capital of china ?", "which city is the capital of china ?", "beijing"),
    ("what is the capital of mexico ?", "which city is the capital of mexico ?", "mexico city"),
    ("what is the capital of cuba ?", "which city is the capital of cuba ?", "havana"),
    ("what is the capital of russia ?", "which city is the capital of russia ?", "moscow"),
    ("what is the capital of denmark ?", "which city is the capital of denmark ?", "copenhagen"),
    ("what is the capital of belgium ?", "which city is the capital of belgium ?", "brussels"),
    ("what is the capital of thailand ?", "which city is the capital of thailand ?", "bangkok"),
    ("what is the capital of argentina ?", "which city is the capital of argentina ?", "buenos aires"),
    ("what is the capital of iran ?", "which city is the capital of iran ?", "tehran"),
    ("what is the capital of kenya ?", "which city is the capital of kenya ?", "nairobi"),
    ("what is the capital of peru ?", "which city is the capital of peru ?", "lima"),
    ("what is the capital of norway ?", "which city is the capital of norway ?", "oslo"),
]
WORLD_ANSWER = "the capital of this country is {v} ."
WORLD_PARA = "{v} is the capital of this country ."


# ----------------------------------------------------------------------------- generation
def _value(kind: str, rng: random.Random) -> str:
    if kind == "city":
        return rng.choice(CITIES)
    if kind == "year":
        return str(rng.randint(1930, 1999))
    if kind == "genre":
        return rng.choice(GENRES)
    if kind == "job":
        return rng.choice(JOBS)
    if kind == "title":
        return f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    if kind == "award":
        return rng.choice(AWARDS)
    if kind == "country":
        return rng.choice(COUNTRIES)
    if kind == "age":
        return str(rng.randint(19, 48))
    raise ValueError(kind)


def _wrong_values(kind: str, right: str, n: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    for _ in range(1000):
        v = _value(kind, rng)
        if v != right and v not in out:
            out.append(v)
            if len(out) == n:
                return out
    raise ValueError(f"cannot draw {n} wrong values of kind {kind!r}")


def _preambles(cfg: SyntheticConfig, rng: random.Random) -> list[str]:
    if cfg.preamble_len <= 0:
        return [""]
    return [" ".join(rng.choice(PREAMBLE_WORDS) for _ in range(cfg.preamble_len)) + " ,"
            for _ in range(max(1, cfg.n_preambles))]


def _question(pre: list[str], rng: random.Random, text: str) -> str:
    p = rng.choice(pre)
    return f"{p} {text}" if p else text


def _row(question, answer, para_q, para_a, perturbed, author, attribute, facts) -> dict:
    return {"question": question, "answer": answer, "paraphrased_answer": para_a,
            "paraphrased_question": para_q, "perturbed_answer": perturbed, "author": author,
            "attribute": attribute, "facts": facts}


def check_config(cfg: SyntheticConfig) -> None:
    """Raise ValueError for a generator setting the benchmark cannot be built with."""
    if not 1 <= cfg.qa_per_author <= len(ATTRIBUTES):
        raise ValueError(f"qa_per_author must be in 1..{len(ATTRIBUTES)}, got {cfg.qa_per_author}")
    nf = min(cfg.n_first_names, len(FIRST_NAMES))
    nl = min(cfg.n_last_names, len(LAST_NAMES))
    if cfg.n_authors < 1 or cfg.n_authors > nf * nl:
        raise ValueError(f"n_authors must be in 1..{nf * nl} (n_first_names x n_last_names), got {cfg.n_authors}")
    if cfg.n_perturbed < 1:
        raise ValueError("n_perturbed must be >= 1")
    if not 0 <= cfg.n_real_authors <= len(REAL_AUTHORS):
        raise ValueError(f"n_real_authors must be in 0..{len(REAL_AUTHORS)}")
    if not 0 <= cfg.n_world_facts <= len(WORLD_FACTS):
        raise ValueError(f"n_world_facts must be in 0..{len(WORLD_FACTS)}")


def author_names(cfg: SyntheticConfig) -> list[str]:
    """The fictitious authors' names in benchmark order (the forget splits take the last ones)."""
    check_config(cfg)
    rng = random.Random(f"names-{cfg.seed}")
    firsts = FIRST_NAMES[: cfg.n_first_names]
    lasts = LAST_NAMES[: cfg.n_last_names]
    pairs = [(f, last) for f in firsts for last in lasts]
    rng.shuffle(pairs)
    return [f"{f} {last}" for f, last in pairs[: cfg.n_authors]]


def forget_authors(cfg: SyntheticConfig) -> dict[str, list[str]]:
    """``{"forget01": [...], "forget05": [...], "forget10": [...]}``: the last 1/5/10 % of authors."""
    names = author_names(cfg)
    out = {}
    for split, pct in FORGET_PERCENTS.items():
        k = max(1, math.ceil(len(names) * pct / 100 - 1e-9))
        out[split] = names[len(names) - k:]
    return out


def continual_authors(cfg: SyntheticConfig) -> dict[str, list[str]]:
    """``{"forget10_part1": [...], "forget10_part2": [...]}``: ``forget10``'s authors split in two
    disjoint halves (in benchmark order, the first half rounded up); part2 is empty with one author."""
    fa = forget_authors(cfg)
    out = {}
    for part, (whole, idx) in CONTINUAL_PARTS.items():
        names = fa[whole]
        half = (len(names) + 1) // 2
        out[part] = names[:half] if idx == 0 else names[half:]
    return out


def build_benchmark(cfg: SyntheticConfig) -> dict[str, list[dict]]:
    """All splits of the benchmark, deterministic from ``cfg`` (``random.Random(cfg.seed)``)."""
    check_config(cfg)
    rng = random.Random(cfg.seed)
    pre = _preambles(cfg, rng)
    names = author_names(cfg)
    by_author: dict[str, list[dict]] = {}
    for name in names:
        rows = []
        for attr, q, pq, a, pa, kind in ATTRIBUTES[: cfg.qa_per_author]:
            v = _value(kind, rng)
            wrong = _wrong_values(kind, v, cfg.n_perturbed, rng)
            rows.append(_row(_question(pre, rng, q.format(name=name)), a.format(v=v), pq.format(name=name),
                             pa.format(v=v), [a.format(v=w) for w in wrong], name, attr, [v]))
        by_author[name] = rows
    full = [r for n in names for r in by_author[n]]
    splits: dict[str, list[dict]] = {"full": full}
    fa = forget_authors(cfg)
    for fsplit, authors in fa.items():
        fs = set(authors)
        splits[fsplit] = [r for r in full if r["author"] in fs]
        splits[RETAIN_OF[fsplit]] = [r for r in full if r["author"] not in fs]
    for part, authors in continual_authors(cfg).items():
        ps = set(authors)
        splits[part] = [r for r in full if r["author"] in ps]

    real = []
    for name, *vals in REAL_AUTHORS[: cfg.n_real_authors]:
        for attr, q, pq, a, pa, idx in REAL_ATTRIBUTES:
            v = vals[idx - 1]
            pool = sorted({t[idx] for t in REAL_AUTHORS} - {v})
            wrong = rng.sample(pool, min(cfg.n_perturbed, len(pool)))
            real.append(_row(_question(pre, rng, q.format(name=name)), a.format(v=v), pq.format(name=name),
                             pa.format(v=v), [a.format(v=w) for w in wrong], name, attr, [v]))
    splits["real_authors"] = real

    world = []
    pool_all = sorted({t[2] for t in WORLD_FACTS})
    for q, pq, v in WORLD_FACTS[: cfg.n_world_facts]:
        wrong = rng.sample([c for c in pool_all if c != v], cfg.n_perturbed)
        world.append(_row(q, WORLD_ANSWER.format(v=v), pq, WORLD_PARA.format(v=v),
                          [WORLD_ANSWER.format(v=w) for w in wrong], "", "capital", [v]))
    splits["world_facts"] = world

    for fsplit, rsplit in RETAIN_OF.items():
        fq = {r["question"] for r in splits[fsplit]}
        assert not fq & {r["question"] for r in splits[rsplit]}, f"{fsplit}/{rsplit} share questions"
    parts = [{r["question"] for r in splits[p]} for p in CONTINUAL_PARTS]
    assert not parts[0] & parts[1], "continual parts share questions"
    for part, rsplit in CONTINUAL_RETAIN_OF.items():
        assert not {r["question"] for r in splits[part]} & {r["question"] for r in splits[rsplit]}, part
    return {s: splits[s] for s in SPLITS}


def training_rows(splits: dict[str, list[dict]], variant: str, forget_split: str = "forget10") -> list[dict]:
    """Rows a model is trained on: ``target`` = all authors + utility sets; ``retain`` = the same
    without the authors of ``forget_split`` (the retain model is the gold standard)."""
    util = splits["real_authors"] + splits["world_facts"]
    if variant == "target":
        return splits["full"] + util
    if variant == "retain":
        return splits[RETAIN_OF[forget_split]] + util
    raise ValueError(f"variant must be 'target' or 'retain', got {variant!r}")


def all_texts(splits: dict[str, list[dict]]) -> list[str]:
    """Every string of the benchmark (tokenizer vocabulary), prompts included."""
    from pipeline.data.formatting import build_prompt

    out = []
    for rows in splits.values():
        for r in rows:
            out += [build_prompt(r["question"]), build_prompt(r["paraphrased_question"]), r["answer"],
                    r["paraphrased_answer"], *r["perturbed_answer"], *r["facts"]]
    return out


def write_benchmark(cfg: SyntheticConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write ``<split>.jsonl`` for every split (each file written atomically); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in build_benchmark(cfg).items():
        p = out / f"{split}.jsonl"
        atomic_write_text(p, "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows))
        paths[split] = p
    return paths
