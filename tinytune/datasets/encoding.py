"""Samples -> token ids and pre-shifted labels, with exact token-level loss masks and truncation.

A conversation is rendered to segments (``templates``). Text between two special tokens is
tokenized whole, exactly as the full rendered string would be; where the trainable flag changes
inside such a stretch, the border token is found by also encoding the stretch's prefix. The
per-token "trainable" mask then decides the labels:
``labels[i] = tokens[i + 1] if token i + 1 is trainable else -100``; the last label is -100.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import numpy as np

from tinytune.datasets.data_errors import DatasetError
from tinytune.datasets.styles import ChatSample, PreferenceSample, TextSample
from tinytune.datasets.templates import Segment, TemplateError
from tinytune.datasets.templates.template_spec import check_enable_thinking

IGNORE_INDEX = -100
TRUNCATION_POLICIES = ("balanced", "prompt_first", "right", "drop")
DEFAULT_TRUNCATION = "balanced"
# Why a sample was changed or dropped (counted per dataset in the cache's meta.json).
TRUNCATED_PROMPT = "truncated_prompt"  # prompt cut from the left, answer whole
TRUNCATED_ANSWER = "truncated_answer"  # answer cut at its end (no end-of-turn), prompt kept its share
TRUNCATED_RIGHT = "truncated_right"  # truncation=right cut the end
TEXT_CHUNKED = "text_chunked"  # a long text split into max_seq_len chunks
DROPPED_TOO_LONG = "too_long"  # truncation=drop
DROPPED_NO_TRAINED = "no_trained_tokens"  # nothing left to train after truncation
DROP_REASONS = (DROPPED_TOO_LONG, DROPPED_NO_TRAINED)


def answer_budget(prompt_len: int, answer_len: int, limit: int) -> int:
    """Tokens of the answer kept when ``prompt_len + answer_len > limit`` (``balanced`` policy).

    A short answer (under half the limit) is kept whole; else a short prompt (under half) is kept
    whole; else both are cut in proportion to their lengths (LLaMA-Factory's rule).
    """
    if answer_len * 2 < limit:
        return answer_len
    if prompt_len * 2 < limit:
        return limit - prompt_len
    return int(limit * answer_len / (prompt_len + answer_len))


def labels_from_mask(tokens: list[int], mask: list[bool]) -> list[int]:
    """Pre-shifted labels: the target of position ``i`` is token ``i + 1`` when that token is trained."""
    n = len(tokens)
    if n < 2:
        return [IGNORE_INDEX] * n
    t = np.asarray(tokens, dtype=np.int64)
    m = np.asarray(mask, dtype=bool)
    labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(m[1:], t[1:], IGNORE_INDEX)
    return labels.tolist()


def flat_labels(tokens: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """:func:`labels_from_mask` for many sequences stored back to back.

    Args:
        tokens: int [n] all sequences concatenated.
        mask: bool [n] trainable flag per token.
        lengths: int [k] sequence lengths (sum = n).

    Returns:
        int32 [n] pre-shifted labels; the last position of every sequence is ``IGNORE_INDEX``.
    """
    n = len(tokens)
    labels = np.full(n, IGNORE_INDEX, dtype=np.int32)
    if n > 1:
        labels[:-1] = np.where(mask[1:], tokens[1:], IGNORE_INDEX)
    ends = np.cumsum(lengths) - 1
    labels[ends[lengths > 0]] = IGNORE_INDEX
    return labels


def _apply_policy(segments: list[Segment], train_on_input: bool, mask_history: bool) -> list[bool]:
    if train_on_input:
        return [True] * len(segments)
    if mask_history:
        last = max((s.message for s in segments if s.train), default=-1)
        return [s.train and s.message == last for s in segments]
    return [s.train for s in segments]


@dataclass
class _Plan:
    """Token pieces of one sequence before encoding: (text or None, special id or None, trainable)."""

    pieces: list[tuple[str | None, int | None, bool]]
    answer_piece: int  # index of the first piece of the last answer turn (for truncation)


@dataclass
class Encoded:
    """One tokenized sequence."""

    tokens: list[int]
    labels: list[int]


class SampleEncoder:
    """Turns samples into token/label sequences.

    Args:
        tokenizer: a tinytune ``Tokenizer`` (see docs/ARCHITECTURE.md).
        template: a bound template (``get_template(...).bind(tokenizer)``); unused for text samples.
        max_seq_len: longest sequence kept (None: no limit).
        train_on_input: train on prompt tokens too.
        mask_history: train only on the last assistant turn.
        truncation: what to do with a sequence longer than ``max_seq_len`` (every case counted):
            ``balanced`` (default): the prompt keeps its share (:func:`answer_budget`), cut from the
            left after a leading BOS so the answer's turn header stays; an answer that must be cut
            loses its end and its end-of-turn token (a cut answer never teaches the model to stop).
            ``prompt_first``: cut the prompt from the left and keep the answer whole; an answer
            that alone does not fit is cut as in ``balanced``. ``right``: cut the end.
            ``drop``: drop the sample. A sample left with no trained token is dropped.
        enable_thinking: Qwen3 thinking switch passed to the template (None = as-is).
    """

    def __init__(
        self,
        tokenizer,
        template=None,
        *,
        max_seq_len: int | None = None,
        train_on_input: bool = False,
        mask_history: bool = False,
        truncation: str = DEFAULT_TRUNCATION,
        enable_thinking: bool | None = None,
    ):
        if truncation not in TRUNCATION_POLICIES:
            raise DatasetError(
                f"unknown truncation {truncation!r}; choose from {', '.join(TRUNCATION_POLICIES)}",
                hint="Fix `truncation` in the dataset config",
            )
        self.tokenizer = tokenizer
        self.template = template
        self.max_seq_len = max_seq_len
        self.train_on_input = train_on_input
        self.mask_history = mask_history
        self.truncation = truncation
        self.enable_thinking = check_enable_thinking(enable_thinking)
        self.bos_id = getattr(tokenizer, "bos_id", None)
        self.eos_id = getattr(tokenizer, "eos_id", None)

    # -- planning -------------------------------------------------------------------------------
    def _takes_tools(self) -> bool:
        """Whether the template's ``render`` accepts ``tools=`` (and so renders tool calls)."""
        if "_tools_ok" not in self.__dict__:
            try:
                params = inspect.signature(self.template.render).parameters
            except (TypeError, ValueError):
                params = {}
            self._tools_ok = "tools" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
        return self._tools_ok

    def _plan_chat(self, messages: list[dict], mask_history: bool, tools: list | None = None) -> _Plan:
        kwargs = {"enable_thinking": self.enable_thinking}
        if tools or any(m.get("tool_calls") for m in messages):
            if not self._takes_tools():
                what = "a `tools` column" if tools else "tool calls"
                raise TemplateError(
                    f"template {getattr(self.template, 'name', '?')!r} cannot render {what}; "
                    "use a template with tool support"
                )
            if tools:
                kwargs["tools"] = tools
        segments = self.template.render(messages, **kwargs)
        flags = _apply_policy(segments, self.train_on_input, mask_history)
        last_answer = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        pieces: list[tuple[str | None, int | None, bool]] = []
        answer_piece = None
        for seg, flag in zip(segments, flags):
            if answer_piece is None and seg.message == last_answer:
                answer_piece = len(pieces)
            if seg.special is not None:
                tid = self.bos_id if seg.special == "bos" else self.eos_id
                if tid is not None:
                    pieces.append((None, tid, flag))
            elif seg.text:
                if pieces and pieces[-1][0] is not None and pieces[-1][2] == flag and answer_piece != len(pieces):
                    pieces[-1] = (pieces[-1][0] + seg.text, None, flag)  # merge runs with the same flag
                else:
                    pieces.append((seg.text, None, flag))
        return _Plan(pieces, len(pieces) if answer_piece is None else answer_piece)

    def _plan_text(self, text: str) -> _Plan:
        pieces: list[tuple[str | None, int | None, bool]] = []
        if self.bos_id is not None:
            pieces.append((None, self.bos_id, True))
        pieces.append((text, None, True))
        if self.eos_id is not None:
            pieces.append((None, self.eos_id, True))
        return _Plan(pieces, 0)

    # -- encoding -------------------------------------------------------------------------------
    _MEMO_LEN = 64  # texts up to this many characters are remembered (template scaffolding repeats)
    _MEMO_SIZE = 1 << 16

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Encodes texts (no BOS/EOS): short repeated ones come from a memo, each distinct text
        of the batch is encoded once, all in one ``encode_batch`` call. The returned lists may be
        shared between equal texts; callers must not modify them."""
        if not texts:
            return []
        memo = self.__dict__.setdefault("_memo", {})
        if len(memo) > self._MEMO_SIZE:
            memo.clear()
        todo: dict[str, int] = {}
        for t in texts:
            if t not in memo and t not in todo:
                todo[t] = len(todo)
        if todo:
            tok = self.tokenizer
            new = list(todo)
            if hasattr(tok, "encode_batch"):
                ids = tok.encode_batch(new, add_bos=False, add_eos=False)
            else:
                ids = [tok.encode(t, add_bos=False, add_eos=False) for t in new]
            limit = self._MEMO_LEN
            fresh = dict(zip(new, ids))
            memo.update((t, v) for t, v in fresh.items() if len(t) <= limit)
            return [memo[t] if t in memo else fresh[t] for t in texts]
        return [memo[t] for t in texts]

    def _truncate(self, tokens: list[int], mask: list[bool], answer_start: int):
        """Applies the truncation policy.

        Returns:
            ``(tokens, mask, reason)`` (reason None when unchanged), or the reason string when
            the sample is dropped.
        """
        limit = self.max_seq_len
        if limit is None or len(tokens) <= limit:
            return tokens, mask, None
        if self.truncation == "drop":
            return DROPPED_TOO_LONG
        if self.truncation == "right":
            tokens, mask, reason = tokens[:limit], mask[:limit], TRUNCATED_RIGHT
        else:
            answer_len = len(tokens) - answer_start
            keep_answer = (
                answer_len
                if self.truncation == "prompt_first" and answer_len < limit
                else answer_budget(answer_start, answer_len, limit)
            )
            keep_prompt = limit - keep_answer
            head = 1 if (self.bos_id is not None and tokens and tokens[0] == self.bos_id and keep_prompt >= 1) else 0
            cut = answer_start - (keep_prompt - head)
            end = answer_start + keep_answer
            reason = TRUNCATED_PROMPT if keep_answer == answer_len else TRUNCATED_ANSWER
            tokens, mask = tokens[:head] + tokens[cut:end], mask[:head] + mask[cut:end]
        if not any(mask[1:]):
            return DROPPED_NO_TRAINED
        return tokens, mask, reason

    def _special_split(self):
        """Regex that splits text at special-token strings (the tokenizer's hard boundaries)."""
        if not hasattr(self, "_split_re"):
            specials = getattr(self.tokenizer, "special_tokens", None) or {}
            names = sorted((s for s in specials if s), key=len, reverse=True)
            self._specials = dict(specials)
            self._split_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
            firsts = sorted({n[0] for n in names})
            self._special_firsts = firsts[0] if len(firsts) == 1 else tuple(firsts)
        return self._split_re

    def _may_hold_special(self, text: str) -> bool:
        """Cheap pre-check: False when no special-token string can occur in ``text``."""
        firsts = self._special_firsts
        if isinstance(firsts, str):
            return firsts in text
        return any(c in text for c in firsts)

    def _layout(self, plan: _Plan, requests: list[str]) -> list[tuple]:
        """Cuts a plan into special-token ids and text stretches between them.

        Text between two special tokens is tokenized independently by the tokenizer, so each
        stretch is encoded whole (exactly like the full rendered string). Where the trainable flag
        changes inside a stretch, the border is found by also encoding the stretch's prefix.
        Appends the texts to encode to ``requests``.
        """
        split = self._special_split()
        layout: list[tuple] = []
        stretch: list[list] = []  # [text, flag, starts_answer]

        def close():
            if stretch:
                full = len(requests)
                if len(stretch) == 1:  # the usual case: one flag, no border inside
                    requests.append(stretch[0][0])
                    layout.append(("text", [(stretch[0][1], stretch[0][2])], full, ()))
                else:
                    texts = [t for t, _, _ in stretch]
                    requests.append("".join(texts))
                    prefixes = []
                    for j in range(1, len(stretch)):
                        prefixes.append(len(requests))
                        requests.append("".join(texts[:j]))
                    layout.append(("text", [(f, a) for _, f, a in stretch], full, prefixes))
                stretch.clear()

        for k, (text, tid, flag) in enumerate(plan.pieces):
            answer = k == plan.answer_piece
            if text is None:
                close()
                layout.append(("id", tid, flag, answer))
                continue
            parts = split.split(text) if split is not None and self._may_hold_special(text) else [text]
            for j, part in enumerate(parts):
                if j % 2:
                    close()
                    layout.append(("id", self._specials[part], flag, answer))
                    answer = False
                elif part:
                    if stretch and stretch[-1][1] == flag and not answer:
                        stretch[-1][0] += part
                    else:
                        stretch.append([part, flag, answer])
                    answer = False
        close()
        return layout

    def _border_by_text(self, full: list[int], prefix_text: str, n: int) -> int:
        """Extends ``n`` over the tokens of ``full`` whose text lies wholly inside ``prefix_text``.

        Used only where the prefix's own tokens are not a token prefix of the stretch (BPE merged
        differently across the border, e.g. two prompt spaces followed by answer digits). A token
        that straddles the border decodes past ``prefix_text`` (or to a partial character) and so
        goes right, as everywhere else.
        """
        while n < len(full) and prefix_text.startswith(self.tokenizer.decode(full[: n + 1], skip_special_tokens=False)):
            n += 1
        return n

    def __getstate__(self):  # worker processes get no memo
        state = dict(self.__dict__)
        state.pop("_memo", None)
        return state

    def encode_plans(self, plans: list[_Plan | None]) -> list[tuple[list[int], list[bool], int] | None]:
        """Tokenizes planned pieces (every text of every plan in one ``encode_batch`` call).

        Returns:
            per plan: ``(tokens, trainable mask, index of the first token of the last answer)``.
        """
        requests: list[str] = []
        layouts = [None if plan is None else self._layout(plan, requests) for plan in plans]
        encoded = self._encode_texts(requests)
        out = []
        for layout in layouts:
            if layout is None:
                out.append(None)
                continue
            tokens: list[int] = []
            mask: list[bool] = []
            answer_start = None
            for entry in layout:
                if entry[0] == "id":
                    _, tid, flag, answer = entry
                    if answer and answer_start is None:
                        answer_start = len(tokens)
                    tokens.append(tid)
                    mask.append(flag)
                    continue
                _, subs, full_i, prefix_is = entry
                full = encoded[full_i]
                borders = [0]
                for pi in prefix_is:
                    pre = encoded[pi]
                    if len(pre) <= len(full) and full[: len(pre)] == pre:
                        n = len(pre)  # the usual case: the prefix's tokens start the stretch
                    else:
                        n = 0
                        limit = min(len(pre), len(full))
                        while n < limit and pre[n] == full[n]:
                            n += 1
                        n = self._border_by_text(full, requests[pi], n)
                    borders.append(max(n, borders[-1]))  # a token that straddles the border goes right
                borders.append(len(full))
                for (flag, answer), a, b in zip(subs, borders, borders[1:]):
                    if answer and answer_start is None:
                        answer_start = len(tokens) + a
                    mask.extend([flag] * (b - a))
                tokens.extend(full)
            out.append((tokens, mask, len(tokens) if answer_start is None else answer_start))
        return out

    def _encode_raw(self, samples: list) -> list:
        """Per sample: a list of ``(tokens, mask)`` sequences, a drop reason (``"too_long"``,
        ``"no_trained_tokens"``), or an error message. ``self.last_reasons[k]`` holds why sample
        ``k`` was truncated (None: it was not)."""
        reasons: list[str | None] = [None] * len(samples)
        self.last_reasons = reasons
        plans: list[_Plan | None] = []
        owners: list[int] = []
        results: list = [None] * len(samples)
        for k, s in enumerate(samples):
            try:
                if isinstance(s, ChatSample):
                    new = [self._plan_chat(s.messages, self.mask_history, s.tools)]
                elif isinstance(s, PreferenceSample):
                    new = [self._plan_chat(s.chosen, True, s.tools), self._plan_chat(s.rejected, True, s.tools)]
                elif isinstance(s, TextSample):
                    new = [self._plan_text(s.text)]
                else:
                    raise TypeError(f"unknown sample type {type(s).__name__}")
            except TemplateError as e:
                results[k] = str(e)
                continue
            plans.extend(new)
            owners.extend([k] * len(new))
            results[k] = []
        for k, enc in zip(owners, self.encode_plans(plans)):
            if isinstance(results[k], str):
                continue
            tokens, mask, answer_start = enc
            if isinstance(samples[k], TextSample):
                step = self.max_seq_len or len(tokens)
                for a in range(0, len(tokens), step):
                    t, m = tokens[a : a + step], mask[a : a + step]
                    if len(t) > 1:
                        results[k].append((t, m))
                if len(tokens) > step:
                    reasons[k] = TEXT_CHUNKED
                continue
            cut = self._truncate(tokens, mask, answer_start)
            if isinstance(cut, str):
                results[k] = cut
                continue
            if reasons[k] is None or cut[2] is not None:  # a pair reports a truncated side
                reasons[k] = cut[2]
            results[k].append(cut[:2])
        return results

    def encode_samples(self, samples: list) -> list[list[Encoded] | DatasetError | str]:
        """Encodes a batch of samples.

        Returns:
            per sample: a list of sequences (one for chat, two [chosen, rejected] for preference,
            one or more chunks for long text), a drop reason (``"too_long"``,
            ``"no_trained_tokens"``), or the ``DatasetError``/``TemplateError`` message for a
            sample the template cannot render.
        """
        return [
            res if isinstance(res, str) else [Encoded(t, labels_from_mask(t, m)) for t, m in res]
            for res in self._encode_raw(samples)
        ]

    def encode_samples_flat(self, samples: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """Like :meth:`encode_samples`, but all sequences back to back in numpy arrays.

        Returns:
            ``(tokens int32 [n], labels int32 [n], lengths int64 [k], outcomes)`` where
            ``outcomes[i]`` is the number of sequences of sample ``i``, a drop reason, or an
            error message; ``self.last_reasons[i]`` says why a kept sample was truncated.
        """
        tokens: list[int] = []
        mask: list[bool] = []
        lengths: list[int] = []
        outcomes: list = []
        for res in self._encode_raw(samples):
            if isinstance(res, str):
                outcomes.append(res)
                continue
            outcomes.append(len(res))
            for t, m in res:
                tokens.extend(t)
                mask.extend(m)
                lengths.append(len(t))
        tok = np.asarray(tokens, dtype=np.int32)
        lens = np.asarray(lengths, dtype=np.int64)
        return tok, flat_labels(tok, np.asarray(mask, dtype=bool), lens), lens, outcomes
