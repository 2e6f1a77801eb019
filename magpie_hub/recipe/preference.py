"""Recipe sub-model of a preference (DPO) config: k sampled responses per instruction, a reward model
scores them, best vs worst become ``chosen`` / ``rejected`` (the official Magpie-DPO recipe:
``exp/gen_po_multi_res.py`` samples k = 5 at T = 0.8, ``exp/gen_po_rewards.py`` scores with ArmoRM,
``data_po/process_po.ipynb`` takes the highest and the lowest score)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_PREFERENCE_REWARD = "RLHFlow/ArmoRM-Llama3-8B-v0.1"   # the official Magpie-DPO reward model


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RewardModel(_Strict):
    """The reward model: a sequence-classification head with one label, or (``trust_remote_code``) a
    model whose output has ``score`` (ArmoRM)."""

    model: str = DEFAULT_PREFERENCE_REWARD
    # classifier: the reward model's head (or its ``score``); loglik: a documented stand-in for offline runs,
    # the mean log-probability of the response under a causal LM (tags/reward.py: LogLikelihoodScorer)
    scorer: Literal["classifier", "loglik"] = "classifier"
    revision: str | None = None
    trust_remote_code: bool = False
    max_length: int = Field(4096, ge=1)
    inference_batch: int = Field(8, ge=1)
    device: str | None = None
    dtype: str | None = None


class PreferenceOptions(_Strict):
    k: int = 5
    temperature: float = Field(0.8, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    reward: RewardModel = Field(default_factory=RewardModel)
    # all k scores equal (or chosen and rejected the same text): the attempt is generated again with new
    # seeds and counted under ``dropped.tie``, so a config still holds exactly its rows
    ties: Literal["regenerate"] = "regenerate"

    @field_validator("k")
    @classmethod
    def _k(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"k must be >= 2 (a preference pair needs two responses; got {value})")
        if value > 64:
            raise ValueError(f"k must be <= 64 (got {value})")
        return value

    def settings(self) -> dict[str, Any]:
        reward = self.reward.model_dump(include={"model", "revision", "trust_remote_code", "max_length", "scorer"})
        return {"k": self.k, "temperature": self.temperature, "top_p": self.top_p, "reward": reward,
                "ties": self.ties}
