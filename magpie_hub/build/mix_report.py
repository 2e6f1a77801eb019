"""The mix report of a config built with mix targets (manifest ``configs.{name}.mix``; the closing table
in :mod:`magpie_hub.build.progress` and the card's ``mix.md.j2`` read it)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from magpie_hub.build.steer import Arm
from magpie_hub.recipe.mix import MixTarget, bucket_targets


def mix_report(mix: MixTarget, rows: int, classifier: Any, per_candidate: dict[int, tuple],
               accepted: list[int], outcome: Counter, *, tokens: int, waves: int) -> dict[str, Any]:
    """The manifest's ``configs.{name}.mix``: target vs achieved per bucket and dimension, acceptance,
    tokens per accepted row, and the steering the accepted rows of each bucket needed."""
    dims = list(mix.dims())
    took = set(accepted)
    report_dims: dict[str, Any] = {}
    for pos, dim in enumerate(dims):
        targets = bucket_targets(mix.model_copy(update={"joint": False}), rows)[pos]
        table = {}
        for key, n in targets.items():
            label = key[pos]
            hits = [c for c, (_, k, _) in per_candidate.items() if k[pos] == label]
            got = [c for c in hits if c in took]
            steer = Counter(_arm_name(per_candidate[c][0], dim) for c in got)
            table[label] = {"target_rows": n, "target_share": round(n / rows, 4), "rows": len(got),
                            "share": round(len(got) / max(len(accepted), 1), 4), "classified": len(hits),
                            "overflow": sum(per_candidate[c][2] == "overflow" for c in hits),
                            "steered_by": dict(steer.most_common(4))}
        report_dims[dim] = table
    distance = {d: round(sum(abs(b["share"] - b["target_share"]) for b in t.values()), 4)
                for d, t in report_dims.items()}
    generated = len(per_candidate) + outcome["failed"] + outcome["after_full"]
    return {
        "mode": mix.mode, "joint": mix.joint, "tolerance": mix.tolerance, "classifier": classifier.info(),
        "buckets": report_dims, "distance": distance,
        "within_tolerance": all(abs(b["share"] - b["target_share"]) <= mix.tolerance + 1e-9
                                for t in report_dims.values() for b in t.values()),
        "candidates": generated, "accepted": len(accepted),
        "acceptance_rate": round(len(accepted) / generated, 4) if generated else None,
        "rejected": {k: int(v) for k, v in sorted(outcome.items())},
        "generated_tokens": int(tokens),
        "tokens_per_accepted_row": round(tokens / len(accepted), 1) if accepted else None,
        "waves": waves, "wave_size": mix.steer.wave,
    }


def _arm_name(arm: Arm, dim: str) -> str:
    prompt = arm.prompt(dim)
    return f"{prompt or 'no prompt'} @T={arm.temperature:g}"


__all__ = ["mix_report"]
