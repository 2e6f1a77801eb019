"""Recipe options that decide how close a build stays to the official MAGPIE code (docs/fidelity.md).

* ``pre_query`` (recipe-wide, or per config): ``derived`` (default: the model's own template), ``official``
  (the official code's string for the model's family, ``magpie_hub/chat/official.py``), ``official:FAMILY``,
  or the text itself. ``drop_default_system: true`` removes the system block a template injects when no
  system prompt is given (Qwen2/Qwen2.5 default prompts, the Llama-3.1+ date block) from the derived string.
* ``template_date``: the date that date-printing templates (Llama-3.1+) render; default: the day the run
  starts, pinned for the whole run. Set it to rebuild the same prompts on another day.
* ``follow_up_sampling``: how turns 2.. sample their instruction. Default ``{temperature: 1.0, top_p: 1.0}``,
  as the official ``gen_mt.py`` (``--instruction_temperature 1.0 --instruction_top_p 1.0``); ``same`` reuses
  the row's own instruction mix.

Only settings that differ from the defaults enter the config fingerprint (:func:`chat_settings`), so
fingerprints of older single-turn builds hold.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_FORMS = "derived, official, official:FAMILY or the pre-query text itself"


def check_pre_query(value: str | None) -> str | None:
    """A recipe ``pre_query`` value (None = not set here); the family name is checked when the build starts."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"pre_query is empty: give {_FORMS}")
    if value.startswith("official:") and not value.partition(":")[2].strip():
        raise ValueError("pre_query: official: name the family after the colon, e.g. official:llama-3.1")
    return value


class FollowUpSampling(BaseModel):
    """Sampling of the follow-up instructions (turns 2..)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)   # off, as the official code
    no_repeat_ngram_size: int | None = Field(None, ge=1, le=1024)


FollowUp = FollowUpSampling | Literal["same"]


class ChatFields(BaseModel):
    """Mixin of the recipe-level fields (Recipe inherits them; ConfigRecipe has ``pre_query`` /
    ``drop_default_system`` of its own, None = the recipe's)."""

    pre_query: str = "derived"
    drop_default_system: bool = False
    template_date: str | None = None
    follow_up_sampling: FollowUp = Field(default_factory=FollowUpSampling)

    @field_validator("pre_query")
    @classmethod
    def _pre_query(cls, value: str) -> str:
        return check_pre_query(value)

    @field_validator("template_date")
    @classmethod
    def _date(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("template_date is empty: give the date as the template prints it, e.g. 26 Jul 2024")
        return value


class ConfigChatFields(BaseModel):
    """Mixin of a config's own ``pre_query`` / ``drop_default_system`` (None = the recipe's)."""

    pre_query: str | None = None
    drop_default_system: bool | None = None

    @field_validator("pre_query")
    @classmethod
    def _pre_query(cls, value: str | None) -> str | None:
        return check_pre_query(value)


def config_pre_query(recipe, config: str) -> tuple[str, bool]:
    """(pre_query setting, drop_default_system) of ``config``: its own, else the recipe's."""
    cfg = recipe.configs[config]
    pre = cfg.pre_query if cfg.pre_query is not None else recipe.pre_query
    drop = cfg.drop_default_system if cfg.drop_default_system is not None else recipe.drop_default_system
    return pre, drop


def chat_settings(recipe, config: str) -> dict[str, Any]:
    """The settings above that ``config``'s rows depend on, only where they differ from the defaults."""
    pre, drop = config_pre_query(recipe, config)
    out: dict[str, Any] = {}
    if pre != "derived":
        out["pre_query"] = pre
    if drop:
        out["drop_default_system"] = True
    if recipe.template_date is not None:
        out["template_date"] = recipe.template_date
    if recipe.configs[config].turns > 1:
        follow = recipe.follow_up_sampling
        out["follow_up_sampling"] = follow if isinstance(follow, str) else follow.model_dump(exclude_none=True)
    return out


__all__ = ["ChatFields", "ConfigChatFields", "FollowUp", "FollowUpSampling", "chat_settings", "check_pre_query", "config_pre_query"]
