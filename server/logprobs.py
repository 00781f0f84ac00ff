"""Logprobs as the API shows them: OpenAI's legacy completions object, chat's content list, and vLLM's
prompt_logprobs."""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.outputs import TokenLogprob


def token_label(tokenizer, token_id: int, as_ids: bool) -> str:
    """How a token is named in logprobs: its text, or `token_id:N` (vLLM's return_tokens_as_token_ids, for tokens
    whose text is not unique or not valid UTF-8 on its own)."""
    return f"token_id:{token_id}" if as_ids else tokenizer.token_text(token_id)


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[TokenLogprob | None], offset: int,
                        as_ids: bool = False) -> tuple[dict, int]:
    """OpenAI's legacy logprobs object for some tokens, whose text starts at character `offset` of the choice. A
    None entry (the first prompt token, which has no prefix to be predicted from) has null logprobs."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, lp in zip(token_ids, logprobs):
        label = token_label(tokenizer, token_id, as_ids)
        tokens.append(label)
        offsets.append(offset)
        offset += len(tokenizer.token_text(token_id))
        if lp is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(lp.logprob)
        alternatives = {token_label(tokenizer, t, as_ids): v for t, v in lp.top}
        alternatives.setdefault(label, lp.logprob)
        top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}, offset


def prompt_logprobs_json(tokenizer, logprobs: list[TokenLogprob | None] | None, as_ids: bool = False) -> list | None:
    """vLLM's prompt_logprobs: per prompt token, null for the first, else {token id: {logprob, rank,
    decoded_token}} for the prompt token itself and then its top alternatives."""
    if logprobs is None:
        return None
    out: list[dict | None] = []
    for lp in logprobs:
        if lp is None:
            out.append(None)
            continue
        entries = {str(lp.token_id): {"logprob": lp.logprob, "rank": lp.rank,
                                      "decoded_token": token_label(tokenizer, lp.token_id, as_ids)}}
        for rank, (token_id, value) in enumerate(lp.top, start=1):
            entries.setdefault(str(token_id), {"logprob": value, "rank": rank,
                                               "decoded_token": token_label(tokenizer, token_id, as_ids)})
        out.append(entries)
    return out


def with_top(logprobs: list[TokenLogprob | None], k: int) -> list[TokenLogprob | None]:
    """Prompt logprobs with at most k alternatives each: the engine computed the largest k the request asked
    for (echo's logprobs and prompt_logprobs may differ)."""
    return [lp if lp is None or len(lp.top) <= k else dataclasses.replace(lp, top=lp.top[:k]) for lp in logprobs]


def chat_logprobs(tokenizer, logprobs: list[TokenLogprob], as_ids: bool = False) -> list[dict[str, Any]]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_label(tokenizer, token_id, as_ids)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs]
