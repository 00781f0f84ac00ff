"""The offline and async engine APIs: validation, stopping, n, chat, streaming, abort and engine death."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading

import pytest

from engine import LLM, AsyncEngine, EngineDeadError, SamplingParams, ValidationError
from engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def llama(make_ckpt):
    return make_ckpt("llama")


@pytest.fixture(scope="module")
def llm(llama):
    return LLM(str(llama), max_model_len=128, num_kv_blocks=64)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, **{"max_tokens": 16, **kw})


# ---- validation --------------------------------------------------------------------------------


def test_prompt_longer_than_max_model_len_is_rejected(llm):
    with pytest.raises(ValidationError, match="maximum context length is 128") as e:
        llm.generate([[5] * 130], greedy())
    assert e.value.param == "prompt"
    with pytest.raises(ValidationError, match="120 in the prompt, 16 for the completion"):
        llm.generate([[5] * 120], greedy())
    assert not llm.engine.has_unfinished_requests() and llm.engine.core.pool.num_free == 64


def test_max_tokens_must_not_be_negative():
    with pytest.raises(ValidationError, match="max_tokens must be >= 0") as e:
        SamplingParams(max_tokens=-1)
    assert e.value.param == "max_tokens"


@pytest.mark.parametrize("field,value,allowed", [
    ("temperature", -0.5, r"\[0.0, 100.0\]"), ("top_p", 0.0, r"\(0.0, 1.0\]"), ("top_k", -2, ">= 0"),
    ("min_p", 1.5, r"\[0.0, 1.0\]"), ("presence_penalty", 3.0, r"\[-2.0, 2.0\]"), ("logprobs", 21, r"\[0, 20\]"),
    ("prompt_logprobs", 21, r"\[0, 20\]"), ("prompt_logprobs", -1, r"\[0, 20\]"),
    ("n", 0, r"\[1, 128\]"), ("repetition_penalty", 0.0, r"\(0.0"), ("stop", [""], "non-empty"),
])
def test_sampling_params_errors_name_field_and_range(field, value, allowed):
    with pytest.raises(ValidationError, match=allowed) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_token_ids_outside_vocab_are_rejected(llm):
    vocab = llm.engine.info.vocab_size
    with pytest.raises(ValidationError, match=f"0..{vocab - 1}"):
        llm.generate([[vocab + 5]], greedy())
    with pytest.raises(ValidationError, match="logit_bias"):
        llm.generate("hi", greedy(logit_bias={vocab: 1.0}))
    with pytest.raises(ValidationError, match="empty"):
        llm.generate([[]], greedy())


def test_request_that_cannot_fit_the_pool_is_rejected(llama):
    # max_model_len fits, but the pool (4 blocks of 16) cannot hold 100 tokens.
    engine = LLMEngine.from_args(str(llama), num_kv_blocks=4, max_model_len=100)
    assert engine.info.max_model_len == 64  # capped to the pool
    with pytest.raises(ValidationError, match="maximum context length is 64"):
        engine.add_request("a", [5] * 40, greedy(max_tokens=30))


# ---- stopping and outputs ------------------------------------------------------------------------


def test_stop_string_is_removed_and_finishes(llm):
    base = llm.generate("Once upon a time", greedy(max_tokens=24))[0].outputs[0]
    # Pick a stop string that spans the boundary between two generated tokens.
    tok = llm.get_tokenizer()
    texts = [tok.decode(base.token_ids[:i]) for i in range(len(base.token_ids) + 1)]
    cut = next(i for i in range(4, len(texts)) if len(texts[i]) - len(texts[i - 1]) >= 1 and len(texts[i - 1]) >= 2)
    stop = texts[cut][len(texts[cut - 1]) - 2 : len(texts[cut - 1]) + 1]
    out = llm.generate("Once upon a time", greedy(max_tokens=24, stop=[stop]))[0].outputs[0]
    expected = base.text[: base.text.index(stop)]
    assert out.text == expected and stop not in out.text
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate("Once upon a time", greedy(max_tokens=24, stop=[stop], include_stop_str_in_output=True))
    assert kept[0].outputs[0].text == expected + stop


def test_stop_token_ids_and_eos(llm):
    base = llm.generate("The river", greedy(max_tokens=12))[0].outputs[0]
    target = base.token_ids[5]
    out = llm.generate("The river", greedy(max_tokens=12, stop_token_ids=[target]))[0].outputs[0]
    first = base.token_ids.index(target)
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target
    # min_tokens holds the stop token back.
    held = llm.generate("The river", greedy(max_tokens=12, stop_token_ids=[target], min_tokens=12))[0].outputs[0]
    assert held.finish_reason == "length" and len(held.token_ids) == 12


def test_text_is_the_decode_of_the_tokens(llm):
    out = llm.generate("Prices: €12 and 🎉", SamplingParams(temperature=1.0, seed=3, max_tokens=32, ignore_eos=True))
    c = out[0].outputs[0]
    assert c.text == llm.get_tokenizer().decode(c.token_ids)
    assert c.finish_reason == "length" and len(c.token_ids) == 32


def test_n_samples_differ_and_come_back_in_order(llm):
    out = llm.generate("Hello", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_outputs_keep_prompt_order_and_accept_all_prompt_forms(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("alpha beta")
    a = llm.generate(["alpha beta", "gamma"], greedy(max_tokens=4))
    b = llm.generate([ids, tok.encode("gamma")], greedy(max_tokens=4))
    c = llm.generate(ids, greedy(max_tokens=4))
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert c[0].outputs[0].token_ids == a[0].outputs[0].token_ids
    assert a[0].prompt == "alpha beta" and a[0].prompt_token_ids == ids
    d = llm.generate([{"prompt": "alpha beta"}, {"prompt_token_ids": tok.encode("gamma")}], greedy(max_tokens=4))
    assert [o.outputs[0].token_ids for o in d] == [o.outputs[0].token_ids for o in a]
    with pytest.raises(ValidationError, match="prompt_token_ids"):
        llm.generate({"text": "x"}, greedy())


def test_cumulative_logprob_is_the_sum_of_sampled_logprobs(llm):
    out = llm.generate("Hello", greedy(max_tokens=6, logprobs=0))[0].outputs[0]
    assert len(out.logprobs) == 6 and all(lp.top == [] and lp.rank == 1 for lp in out.logprobs)
    assert out.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in out.logprobs))
    assert llm.generate("Hello", greedy(max_tokens=2))[0].outputs[0].cumulative_logprob is None


def test_chat_applies_the_template(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    tok = llm.get_tokenizer()
    expected_prompt = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    out = llm.chat(messages, greedy(max_tokens=4))[0]
    assert out.prompt_token_ids == expected_prompt
    assert out.outputs[0].token_ids == llm.generate(expected_prompt, greedy(max_tokens=4))[0].outputs[0].token_ids


def test_generation_config_supplies_default_params(llama, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(llama, d)
    gen = json.loads((d / "generation_config.json").read_text())
    gen.update(temperature=0.6, top_p=0.8, top_k=20, max_new_tokens=7)
    (d / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(str(d), max_model_len=64)
    p = llm.get_default_sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.6, 0.8, 20, 7)
    out = llm.generate("Hi", None)[0].outputs[0]
    assert out.finish_reason == "stop" or len(out.token_ids) == 7

    # An out-of-range value in the model's file is dropped (with a warning), the rest still apply.
    gen.update(temperature=-3.0)
    (d / "generation_config.json").write_text(json.dumps(gen))
    p = LLM(str(d), max_model_len=64).get_default_sampling_params()
    assert (p.temperature, p.top_p, p.max_tokens) == (1.0, 0.8, 7)


# ---- async engine --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def async_engine(llama):
    engine = AsyncEngine.from_args(str(llama), max_model_len=128, num_kv_blocks=64)
    yield engine
    engine.shutdown()


def collect(engine: AsyncEngine, prompt, params):
    async def go():
        deltas = []
        async for out in engine.add_request(prompt, params):
            deltas.append(out)
        return deltas

    return asyncio.run(go())


def test_async_stream_deltas_concatenate_to_offline_result(async_engine, llm):
    params = greedy(max_tokens=20, logprobs=1)
    deltas = collect(async_engine, "The quick brown fox", params)
    offline = llm.generate("The quick brown fox", params)[0].outputs[0]
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert "".join(c.text for d in deltas for c in d.outputs) == offline.text
    assert [t for d in deltas for c in d.outputs for t in c.token_ids] == offline.token_ids
    assert deltas[-1].outputs[-1].finish_reason == "length"


def test_async_concurrent_requests(async_engine):
    async def go():
        async def one(i):
            text = ""
            async for out in async_engine.add_request(f"prompt number {i}", greedy(max_tokens=6 + i)):
                text += "".join(c.text for c in out.outputs)
            return text

        return await asyncio.gather(*(one(i) for i in range(8)))

    texts = asyncio.run(go())
    assert len(texts) == 8
    assert async_engine.stats().num_running == 0


def test_async_validation_error_raises_before_streaming(async_engine):
    async def go():
        await async_engine.add_request([5] * 500, greedy())

    with pytest.raises(ValidationError, match="maximum context length"):
        asyncio.run(go())


def test_leaving_the_stream_aborts_and_frees_blocks(async_engine):
    async def go():
        stream = await async_engine.add_request("a long story", greedy(max_tokens=100))
        async for _ in stream:
            break  # the client goes away after the first delta
        await stream.aclose()
        for _ in range(200):
            if async_engine.stats().kv_cache_usage == 0.0 and async_engine.stats().num_running == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(go())
    assert async_engine.engine.core.pool.num_free == async_engine.engine.core.pool.num_blocks


def test_engine_death_reaches_every_caller(llama, monkeypatch):
    engine = AsyncEngine.from_args(str(llama), max_model_len=64, num_kv_blocks=32)

    def boom(*a, **k):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(engine.engine.core.runner, "execute", boom)

    async def go():
        stream = await engine.add_request("hello", greedy())
        async for _ in stream:
            pass

    with pytest.raises(EngineDeadError, match="simulated device failure"):
        asyncio.run(go())
    assert not engine.is_healthy
    with pytest.raises(EngineDeadError):
        asyncio.run(go())
    engine.shutdown()


def test_cancelled_consumer_aborts_and_stream_works_without_await(async_engine):
    async def go():
        stream = async_engine.add_request("a long story", greedy(max_tokens=100))  # no await needed
        first = asyncio.Event()

        async def consume():
            async for _ in stream:
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()  # e.g. the HTTP client went away mid-stream
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            s = async_engine.stats()
            if s.num_running == 0 and s.kv_cache_usage == 0.0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(go())


def test_the_engine_is_built_and_stepped_on_one_thread(llama):
    """Building on one thread and stepping on another gives each its own OpenMP team, which cost 30% on 2 cores
    (engine/async_engine.py); so the loop thread builds the engine, and a build error reaches the caller."""
    threads: dict[str, int] = {}

    def build() -> LLMEngine:
        threads["build"] = threading.get_ident()
        engine = LLMEngine.from_args(str(llama), max_model_len=64, num_kv_blocks=32)
        execute = engine.core.runner.execute

        def recording_execute(*args, **kwargs):
            threads["step"] = threading.get_ident()
            return execute(*args, **kwargs)

        engine.core.runner.execute = recording_execute
        return engine

    engine = AsyncEngine(build)
    try:
        assert len(collect(engine, "hello", greedy(max_tokens=3))[-1].outputs) == 1
        assert threads["build"] == threads["step"] == engine._thread.ident != threading.get_ident()
    finally:
        engine.shutdown()

    def broken() -> LLMEngine:
        raise RuntimeError("no such model")

    with pytest.raises(RuntimeError, match="no such model"):
        AsyncEngine(broken)
