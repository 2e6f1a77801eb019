"""Derive MAGPIE's template pieces from a model's OWN chat template, byte-exact, for any model.

Everything is obtained by rendering the tokenizer's chat template through transformers'
``apply_chat_template(..., tokenize=False)`` with sentinel messages and cutting the text at the
sentinels; there is no per-family table of strings. Consequences worth knowing:

* ``pre_query`` includes whatever the template puts before the first user text when no system
  prompt is given: BOS, a default system prompt it injects (Qwen2.5, DeepSeek-Coder, Vicuna), headers.
* ``post_query`` is the template's *generation prompt* after a user turn. A few templates render a
  past assistant turn with a slightly different prefix (Vicuna writes ``" ASSISTANT: " + reply.strip()``
  but prompts with ``" ASSISTANT:"``); that history form is kept in ``history_post_query``. The round-trip
  ``pre + U1 + post + A1 + follow_up + U2 + post`` is then exact for a reply ``A1`` as the model writes it
  after ``post_query`` (i.e. starting with the template's gap, a space for Vicuna).
* :meth:`ChatFormat.user_prompt` and :meth:`ChatFormat.assistant_prompt` always render through the
  template, so trimming, history rewriting (Qwen3 / DeepSeek-R1 drop ``<think>`` blocks from past
  turns), BOS-only-on-first-message and system prompts merged into a user turn (Mistral v0.3) are exact.
* Where the official MAGPIE code's hand-written string disagrees with the model's template, the template
  wins: Mistral-7B-Instruct-v0.2 renders ``"<s>[INST] "``, not the official ``"<s> [INST] "``.
* Templates that reject a system role (Mistral v0.2, Gemma) work; only asking for a system prompt raises
  :class:`ChatFormatError`.

``load_chat_format(..., allow_config_only=True)`` (used by ``magpie-hub templates``) also accepts a
folder that holds a ``tokenizer_config.json`` with a chat template but no vocabulary: the strings are
derived exactly (they only need the template and the special-token strings); token ids then come only
from the config's ``added_tokens_decoder`` and ``generation_config.json``.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from magpie_hub.chat.config_tokenizer import tokenizer_from_config
from magpie_hub.errors import ChatFormatError, ModelError
from magpie_hub.models import (
    VOCAB_FILES,
    generation_eos_ids,
    has_vocabulary,
    load_auto_tokenizer,
    local_dir,
    no_vocabulary,
    resolve_model,
)

# Sentinels: letters only (survive trim/strip), long and odd enough never to occur in a template.
_U1, _U2, _U3 = "QzxMagpieUserOneQzx", "QzxMagpieUserTwoQzx", "QzxMagpieUserThreeQzx"
_A1, _A2 = "QzxMagpieReplyOneQzx", "QzxMagpieReplyTwoQzx"
_SYS = "QzxMagpieSystemQzx"
_NEXT = "QzxMagpieNextUserQzx"



def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _split_once(text: str, sentinel: str, what: str) -> tuple[str, str]:
    if text.count(sentinel) != 1:
        raise ChatFormatError(f"the chat template does not render the {what} verbatim (it rewrites message "
                              "text), so MAGPIE pieces cannot be cut from it: use a model with a plain chat template")
    head, tail = text.split(sentinel)
    return head, tail


def _dedupe(items) -> tuple:
    return tuple(dict.fromkeys(x for x in items if x is not None and x != ""))


def _config_token_ids(directory: Path) -> dict[str, int]:
    """Added-token ids from a config-only folder's tokenizer_config.json (the model's real ids)."""
    try:
        cfg = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {v["content"]: int(k) for k, v in (cfg.get("added_tokens_decoder") or {}).items()
            if isinstance(v, dict) and "content" in v}


class ChatFormat:
    """MAGPIE's pieces of one chat template (see the module docstring for the exact semantics)."""

    def __init__(self, tokenizer, model: str = "", *, extra_eos_ids: Sequence[int] = (),
                 token_ids: dict[str, int] | None = None, date_string: str | None = None):
        """``token_ids`` replaces the tokenizer's vocabulary for id lookups (config-only folders);
        ``date_string`` is the date that date-printing templates render (default: today, pinned)."""
        if not getattr(tokenizer, "chat_template", None):
            raise ChatFormatError(f"{model or 'the tokenizer'} has no chat template (tokenizer_config.json "
                                  "'chat_template' or chat_template.jinja): use an instruction-tuned model")
        self.model = model
        self.tokenizer = tokenizer
        self.has_vocabulary = token_ids is None
        self._token_ids = token_ids
        self.bos_token: str | None = tokenizer.bos_token
        # templates that print today's date (Llama-3.1+) read `date_string` when it is defined: pinned once
        # per format, so a run that crosses midnight renders every prompt with the same date
        self.date_string = date_string or datetime.date.today().strftime("%d %b %Y")
        self._derive()
        self._derive_stops(extra_eos_ids)

    # -- rendering -------------------------------------------------------------------------------------
    def _render(self, messages: list[dict[str, str]], generation: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                                      date_string=self.date_string)
        except Exception as exc:  # jinja2 TemplateError from raise_exception(), or a template bug
            raise ChatFormatError(f"the chat template of {self.model or 'the model'} failed to render "
                                  f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}): "
                                  "check the conversation roles it accepts") from None
        if not isinstance(text, str):
            raise ChatFormatError("apply_chat_template(tokenize=False) did not return text: upgrade transformers")
        return text

    def _derive(self) -> None:
        r1 = self._render([_msg("user", _U1)], True)
        self.pre_query, self.post_query = _split_once(r1, _U1, "user message")
        r2 = self._render([_msg("user", _U1), _msg("assistant", _A1), _msg("user", _U2)], True)
        if not r2.startswith(self.pre_query + _U1):
            raise ChatFormatError("the chat template renders the first turn differently once a reply follows: "
                                  "MAGPIE cannot use a fixed pre-query for it")
        rest = r2[len(self.pre_query) + len(_U1):]
        self.history_post_query, rest = _split_once(rest, _A1, "assistant message")
        self.follow_up, tail = _split_once(rest, _U2, "second user message")
        if tail != self.post_query:
            raise ChatFormatError("the chat template's generation prompt changes from turn to turn: not supported")
        r3 = self._render([_msg("user", _U1), _msg("assistant", _A1), _msg("user", _U2),
                           _msg("assistant", _A2), _msg("user", _U3)], True)
        expected = r2[:-len(self.post_query) or None] + self.history_post_query + _A2 + self.follow_up + _U3
        if r3 != expected + self.post_query:
            raise ChatFormatError("the chat template renders later turns differently from the second: "
                                  "MAGPIE's follow-up piece is not well defined for it")
        # history form == generation prompt + a gap the model writes itself (Vicuna: one space)
        self.reply_gap = (self.history_post_query[len(self.post_query):]
                          if self.history_post_query.startswith(self.post_query) else None)
        self.supports_system, self._system_error = True, ""
        try:
            rs = self.tokenizer.apply_chat_template([_msg("system", _SYS), _msg("user", _U1)], tokenize=False,
                                                    add_generation_prompt=True, date_string=self.date_string)
        except Exception as exc:  # raise_exception('System role not supported') and the like
            self.supports_system, self._system_error = False, (str(exc).splitlines() or [""])[0][:160]
        else:
            if _SYS not in rs or _U1 not in rs:
                self.supports_system, self._system_error = False, "the template drops the system message"
        # where a system prompt lands in a multi-turn prompt: before the first turn (most templates) or
        # inside the LAST user turn (Mistral v0.3 / Nemo); user_prompt() is exact either way
        self.system_first = self.supports_system and self._render(
            [_msg("system", _SYS), _msg("user", _U1), _msg("assistant", _A1), _msg("user", _U2)], True
        ).startswith(self.pre_query_system(_SYS) + _U1)
        self.bos_in_template = bool(self.bos_token) and self.pre_query.startswith(self.bos_token)

    # -- stops -----------------------------------------------------------------------------------------
    def _specials(self) -> list[str]:
        tok = self.tokenizer
        names = list(tok.all_special_tokens)
        names += [t.content for t in tok.added_tokens_decoder.values()]  # control tokens, special or not
        return sorted(_dedupe(names), key=len, reverse=True)

    def _stop_after(self, text: str, specials: list[str]) -> str:
        """The end-of-turn marker at the start of ``text``: its first special/added token, else its stripped text."""
        best = None
        for tok in specials:
            pos = text.find(tok)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, tok)
        return best[1] if best else text.strip()

    def _token_id(self, token: str) -> int | None:
        if self._token_ids is not None:
            return self._token_ids.get(token)
        tok = self.tokenizer
        ids = tok.convert_tokens_to_ids([token])
        tid = ids[0] if ids else None
        if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id and token != tok.unk_token):
            return None
        return int(tid) if tok.convert_ids_to_tokens(int(tid)) == token else None

    def _role_markers(self) -> tuple[str, ...]:
        """Every special token the template writes around a turn (role headers, turn ends, BOS): none of
        them can be part of a turn's text, so each one stops a turn (the official code stops Llama-3
        instructions on ``<|start_header_id|>`` / ``<|end_header_id|>`` as well as ``<|eot_id|>``)."""
        tok = self.tokenizer
        flagged = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values() if t.special}
        pieces = [self.pre_query, self.post_query, self.follow_up, self.history_post_query]
        if self.supports_system:
            pieces.append(self.pre_query_system(_SYS))
        text = "".join(pieces)
        # headers first, BOS last: an HTTP server takes only its first few stop strings (TGI: 4)
        found = [(t == self.bos_token, text.find(t), t) for t in flagged if t and t in text]
        return tuple(t for *_, t in sorted(found))

    def _derive_stops(self, extra_eos_ids: Sequence[int]) -> None:
        specials = self._specials()
        eos = self.tokenizer.eos_token
        self.role_markers = self._role_markers()
        self.user_stop = _dedupe([self._stop_after(self.post_query, specials), eos, *self.role_markers])
        self.assistant_stop = _dedupe([self._stop_after(self.follow_up, specials), eos, *self.role_markers])
        self.stop = _dedupe([*self.user_stop, *self.assistant_stop])
        ends = _dedupe([self._stop_after(self.post_query, specials), self._stop_after(self.follow_up, specials), eos])
        ids = [self._token_id(s) for s in ends]
        if self.has_vocabulary and self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        self.stop_token_ids = _dedupe([*ids, *extra_eos_ids])      # the turn ends (the model's eos ids)
        # ids of the role markers: a generation backend stops on them too (local: stop ids)
        self.role_marker_ids = _dedupe(i for i in map(self._token_id, self.role_markers)
                                       if i is not None and i not in self.stop_token_ids)

    # -- public API ------------------------------------------------------------------------------------
    def _system_messages(self, system: str | None) -> list[dict[str, str]]:
        if system is None:
            return []
        if not self.supports_system:
            raise ChatFormatError(f"the chat template of {self.model or 'this model'} does not accept a system "
                                  f"prompt ({self._system_error}): drop the system prompt (--system / the "
                                  "recipe's system_prompt) or use a model whose template has a system role")
        return [_msg("system", system)]

    def pre_query_system(self, system: str) -> str:
        """Everything before the first user text when ``system`` is the system prompt."""
        text = self._render([*self._system_messages(system), _msg("user", _U1)], True)
        return _split_once(text, _U1, "user message")[0]

    def pre_query_without_default_system(self) -> str:
        """The pre-query without the system block the template injects when no system prompt is given
        (Qwen2 / Qwen2.5 default prompts, the Llama-3.1+ date block); the pre-query itself when it injects none."""
        if not (self.supports_system and self.system_first):
            return self.pre_query
        head, tail = _split_once(self.pre_query_system(_SYS), _SYS, "system message")
        start = self.bos_token if self.bos_token and head.startswith(self.bos_token) else ""
        injected = self.pre_query != head + tail or head != start   # default text, or an empty system turn
        if not (self.pre_query.startswith(head) and self.pre_query.endswith(tail) and injected):
            return self.pre_query            # no system turn before the first user turn: nothing to drop
        # tail = end of the system turn + the user header: the header follows the turn's end marker (a special
        # token), else (plain-text templates such as Vicuna's) the whitespace that separates the turns
        specials = [t for t in self._specials() if t in tail]
        if specials:
            end = min(specials, key=tail.find)
            header = tail[tail.find(end) + len(end):].lstrip("\n")
        else:
            header = tail.lstrip()
        if self.pre_query in (start + header, header):
            return self.pre_query
        return start + header

    @staticmethod
    def _history(history: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for user, reply in history:
            out += [_msg("user", user), _msg("assistant", reply)]
        return out

    def user_prompt(self, history: Sequence[tuple[str, str]] = (), system: str | None = None) -> str:
        """The prompt that makes the model write the NEXT user text, rendered through the template
        (``pre(+system) + u1 + post + a1 + follow_up + ...``, with the template's own history rendering)."""
        msgs = [*self._system_messages(system), *self._history(history), _msg("user", _NEXT)]
        return _split_once(self._render(msgs, False), _NEXT, "next user message")[0]

    def assistant_prompt(self, history: Sequence[tuple[str, str]], user: str, system: str | None = None) -> str:
        """Byte-identical to ``apply_chat_template(history + [user], add_generation_prompt=True)``."""
        msgs = [*self._system_messages(system), *self._history(history), _msg("user", user)]
        return self._render(msgs, True)

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered prompt, never doubling a BOS the template already wrote."""
        if not self.has_vocabulary:
            raise no_vocabulary(self.model)
        own_bos = self.bos_in_template or bool(self.bos_token and text.startswith(self.bos_token))
        return list(self.tokenizer(text, add_special_tokens=not own_bos)["input_ids"])

    def to_dict(self, system: str | None = None) -> dict[str, Any]:
        """The ``magpie-hub templates --json`` object."""
        return {
            "pre_query": self.pre_query,
            "pre_query_system": None if system is None else self.pre_query_system(system),
            "post_query": self.post_query,
            "follow_up": self.follow_up,
            # a past reply renders as history_post_query + reply + follow_up; history_post_query ==
            # post_query + reply_gap when the template re-inserts a gap the model writes itself (Vicuna: " ")
            "history_post_query": self.history_post_query,
            "reply_gap": self.reply_gap,
            "stop": list(self.stop),
            "user_stop": list(self.user_stop),
            "assistant_stop": list(self.assistant_stop),
            "bos_in_template": self.bos_in_template,
        }

    def __repr__(self) -> str:
        return f"ChatFormat(model={self.model!r}, pre_query={self.pre_query!r}, post_query={self.post_query!r})"


def load_chat_format(model_or_dir: str, revision: str | None = None, *,
                     allow_config_only: bool = False, date_string: str | None = None) -> ChatFormat:
    """ChatFormat of a Hub id, a local folder or a registered reference (``tiny:...``).

    ``allow_config_only`` accepts a folder with a chat template but no vocabulary (strings only)."""
    name = resolve_model(str(model_or_dir))
    local = local_dir(name)
    tok = None
    try:
        tok = load_auto_tokenizer(name, revision)
    except ModelError:  # fall back only for a folder without any vocabulary file, never for a broken one
        if not (allow_config_only and local is not None and (local / "tokenizer_config.json").is_file()
                and not any((local / f).is_file() for f in VOCAB_FILES)):
            raise
    if tok is not None and has_vocabulary(tok):
        return ChatFormat(tok, str(model_or_dir), extra_eos_ids=generation_eos_ids(name, revision),
                          date_string=date_string)
    if not allow_config_only or local is None:
        raise no_vocabulary(model_or_dir)
    tok = tokenizer_from_config(local, train=False)
    return ChatFormat(tok, str(model_or_dir), extra_eos_ids=generation_eos_ids(name, revision),
                      token_ids=_config_token_ids(local), date_string=date_string)
