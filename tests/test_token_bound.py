"""The lower bound on a text's token count (engine/token_bound.py) never exceeds the real count, for every tokenizer
shape it claims to bound, and is not given for shapes where no bound holds. Prompts that certainly exceed the context
are refused before they are tokenized, quickly and without keeping memory (issue 24, finding 3)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, normalizers, pre_tokenizers

from engine.errors import ValidationError
from engine.token_bound import max_chars_per_token, min_tokens
from engine.tokenizer import Tokenizer
from server_process import ServerProcess
from tokenizer_fixtures import build_bytelevel_dir, build_metaspace_dir
from tools.bpe import build_bpe_tokenizer

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"

# Pieces of text that tokenizers split in different ways: words, whitespace runs, digits, punctuation, accents and
# combining marks (which NFC/NFKC normalizers compose), CJK, emoji (several byte tokens each), special tokens' text.
PIECES = ["the", " quick", "  ", "\t", "\n\n", "   \n", "12345", "3.14", "!!", "?", "caf\u00e9", "e\u0301", "\ufb01",
          "\u4f60\u597d", "\u3053\u3093\u306b\u3061\u306f", "\U0001f600", "\U0001f44d\U0001f3fd", "\u2764\ufe0f",
          "<|im_start|>", "<s>", "stra\u00dfe", "\u0130", "x" * 40, " " * 30]


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 200))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Backend]:
    return {
        "bytelevel": Tokenizer.from_dir(build_bytelevel_dir(tmp_path_factory.mktemp("bl"))).backend,
        "metaspace": Tokenizer.from_dir(build_metaspace_dir(tmp_path_factory.mktemp("ms"))).backend,
        "test-checkpoints": build_bpe_tokenizer(),
        "demo": Tokenizer.from_dir(DEMO).backend,
    }


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace", "test-checkpoints", "demo"])
def test_the_bound_never_exceeds_the_real_count(tokenizers, kind):
    backend = tokenizers[kind]
    chars = max_chars_per_token(backend)
    assert chars is not None and chars >= 1
    tight = []
    for text in random_texts(300, seed=hash(kind) % 1000):
        real = len(backend.encode(text, add_special_tokens=False).ids)
        bound = min_tokens(backend, chars, text)
        assert bound <= real, (kind, text)
        tight.append(bound / real)
    # And it says something: a long text's bound is a fair share of its real count, not 0.
    assert min_tokens(backend, chars, "hello world " * 10_000) > 0
    assert max(tight) > 0.1, max(tight)


def test_no_bound_where_a_token_may_stand_for_any_amount_of_text():
    wordpiece = Backend(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))  # [UNK] is a whole word
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    assert len(wordpiece.encode("x" * 10_000).ids) == 1 and max_chars_per_token(wordpiece) is None
    bpe = Backend(models.BPE({"a": 0, "b": 1}, [], byte_fallback=False))  # drops what it cannot spell
    assert len(bpe.encode("c" * 1000).ids) == 0 and max_chars_per_token(bpe) is None
    splitting = Backend(models.BPE({"a": 0}, [], byte_fallback=True))
    splitting.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # removes whitespace
    assert max_chars_per_token(splitting) is None
    removing = Backend(models.BPE({"a": 0}, [], byte_fallback=True))
    removing.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    assert max_chars_per_token(removing) is None
    no_bytes = Backend(models.BPE({"a": 0}, [], byte_fallback=True))  # fallback without its <0xNN> tokens
    assert max_chars_per_token(no_bytes) is None
    byte_tokens = {f"<0x{b:02X}>": b for b in range(256)}
    keeping = Backend(models.BPE({**byte_tokens, "hello": 256}, [], byte_fallback=True))
    keeping.normalizer = normalizers.NFKC()
    keeping.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="isolated"),
                                                     pre_tokenizers.Digits()])
    assert max_chars_per_token(keeping) == len("<0x00>")


def test_encode_refuses_a_text_that_cannot_fit_before_tokenizing_it():
    tok = Tokenizer.from_dir(DEMO)
    text = "word " * 80_000  # 400 KB
    start = time.perf_counter()
    with pytest.raises(ValidationError, match="maximum context length is 512") as e:
        tok.encode(text, max_tokens=512, what="the conversation")
    assert str(e.value).startswith("the conversation is too long: its 400000 characters make at least ")
    assert e.value.param == "prompt" and time.perf_counter() - start < 1.0
    short = "word " * 50
    assert tok.encode(short, max_tokens=512) == tok.encode(short)  # under the bound: tokenized as before


def test_huge_prompts_are_refused_quickly_and_memory_comes_back(make_ckpt):
    with ServerProcess(make_ckpt("llama"), "--max-model-len", "256") as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        small = {"prompt": "hello", "max_tokens": 2}
        assert http.post("/v1/completions", json=small).status_code == 200
        bodies = {
            "400 KB completion": ("/v1/completions", {"prompt": "word " * 80_000, "max_tokens": 2}, "prompt"),
            "4 MB completion": ("/v1/completions", {"prompt": "x" * 4_000_000, "max_tokens": 2}, "prompt"),
            "400 KB chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 80_000}]},
                            "prompt"),
        }
        for name, (route, body, param) in bodies.items():  # the first of each, before measuring memory
            response = http.post(route, json=body)
            assert response.status_code == 400 and response.json()["error"]["param"] == param, name
        baseline = server.rss_kib()
        slowest = 0.0
        for _ in range(17):
            for route, body, _param in bodies.values():
                start = time.perf_counter()
                assert http.post(route, json=body).status_code == 400
                slowest = max(slowest, time.perf_counter() - start)
        # Loosely: about 10-60 ms each on the 2-core CI machine (docs/reliability.md), against seconds to tokenize.
        assert slowest < 1.0, slowest
        assert server.rss_kib() < baseline * 1.1, (baseline, server.rss_kib())
        assert http.post("/v1/completions", json=small).status_code == 200
