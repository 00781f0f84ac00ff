"""Offline batch inference: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from pathlib import Path

from tqdm import tqdm

from engine.errors import ValidationError
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

Prompt = str | list[int]


class LLM:
    """Runs prompts to completion through the same engine the server uses.

    LLM(model=None, **engine_args): model is a Hugging Face model directory or hub id ORG/NAME (None: the
    built-in demo model); engine_args are EngineArgs fields (revision, device, dtype, max_model_len, ...).
    """

    def __init__(self, model: str | Path | None = None, **engine_args):
        self.engine = LLMEngine.from_args(model, **engine_args)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes, if any (they also end with this process)."""
        self.engine.shutdown()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    def generate(
        self,
        prompts: Prompt | dict | list,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, a vLLM-style dict ({"prompt": ...} or {"prompt_token_ids": ...}),
        or a list of those. Outputs come back in prompt order. priority: one per prompt, lower first (needs
        scheduling_policy="priority", as in vLLM)."""
        prompt_list = _as_prompt_list(prompts)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompt_list):
                raise ValidationError(
                    f"got {len(sampling_params)} sampling params for {len(prompt_list)} prompts", "sampling_params"
                )
            params_list = sampling_params
        else:
            params_list = [sampling_params or self.get_default_sampling_params()] * len(prompt_list)
        if priority is not None and len(priority) != len(prompt_list):
            raise ValidationError(f"got {len(priority)} priorities for {len(prompt_list)} prompts", "priority")
        # Validate everything before queueing anything, so a bad prompt leaves the engine untouched.
        prepared = [
            self.engine.prepare_request(str(next(self._ids)), p, sp, priority=0 if priority is None else priority[i])
            for i, (p, sp) in enumerate(zip(prompt_list, params_list))
        ]
        for req in prepared:
            self.engine.add_prepared(req)
        return self._run([r.request_id for r in prepared], use_tqdm and len(prepared) > 1)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **template_kwargs,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations, rendered with the model's chat template."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        tok = self.get_tokenizer()
        prompts = [
            tok.encode_chat(conv, add_generation_prompt=add_generation_prompt, chat_template=chat_template, **template_kwargs)
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], show_progress: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="generate", unit="req", disable=not show_progress)
        generated = 0
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                out = final.get(delta.request_id)
                if out is None:
                    out = final[delta.request_id] = RequestOutput(
                        delta.request_id, delta.prompt, delta.prompt_token_ids, [], False
                    )
                _merge(out, delta)
                generated += sum(len(c.token_ids) for c in delta.outputs)
                if delta.finished:
                    bar.update(1)
                    bar.set_postfix(tokens=generated, refresh=False)
        bar.close()
        return [final[i] for i in request_ids]


def _as_prompt_list(prompts: Prompt | dict | list) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    elif isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValidationError(
            "prompts must be a string, a list of token ids, a {'prompt': ...} or {'prompt_token_ids': ...} dict, "
            "or a non-empty list of those", "prompt"
        )
    return [_unwrap(p) for p in prompts]


def _unwrap(prompt) -> Prompt:
    # vLLM-style prompt dicts.
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt["prompt_token_ids"]
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValidationError("a prompt dict needs a 'prompt' or 'prompt_token_ids' key", "prompt")
    return prompt


def _merge(out: RequestOutput, delta: RequestOutput) -> None:
    """Accumulate a delta into the cumulative output, keeping samples ordered by index."""
    by_index = {c.index: c for c in out.outputs}
    for c in delta.outputs:
        acc = by_index.get(c.index)
        if acc is None:
            acc = by_index[c.index] = CompletionOutput(c.index, "", [], [] if c.logprobs is not None else None)
        acc.text += c.text
        acc.token_ids.extend(c.token_ids)
        if c.logprobs is not None:
            acc.logprobs.extend(c.logprobs)
        acc.finish_reason, acc.stop_reason = c.finish_reason, c.stop_reason
    out.outputs = [by_index[i] for i in sorted(by_index)]
    out.finished = delta.finished
    out.metrics = delta.metrics
    out.num_cached_tokens = delta.num_cached_tokens
    if delta.prompt_logprobs is not None:
        out.prompt_logprobs = delta.prompt_logprobs
