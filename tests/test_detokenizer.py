"""IncrementalDetokenizer: deltas must concatenate to the tokenizer's full decode, hold back split characters and
possible stop-string starts, and never emit any part of a matched stop string.

Every expectation is computed from `tokenizer.decode` of the whole id list (the `tokenizers` library's own decode),
never from this module's output."""

from __future__ import annotations

import random

import pytest
from tokenizer_fixtures import _corpus, build_bytelevel_dir, build_metaspace_dir
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
MULTILINGUAL = (
    "Hello, world! \u4f60\u597d\uff0c\u4e16\u754c\uff01 Emoji \U0001f600\U0001f680 \U0001f44d\U0001f3fd "
    "\u2764\ufe0f and \U0001f9ec\U0001fab8, caf\u00e9 na\u00efve \u3053\u3093\u306b\u3061\u306f "
    "\u0915\u094d\u0937 \u05e9\u05dc\u05d5\u05dd."
)


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, Tokenizer]:
    return {
        "bytelevel": Tokenizer.from_dir(build_bytelevel_dir(tmp_path_factory.mktemp("bytelevel"))),
        "metaspace": Tokenizer.from_dir(build_metaspace_dir(tmp_path_factory.mktemp("metaspace"))),
    }


def _with_decoder(tok: Tokenizer, decoder) -> Tokenizer:
    backend = RawTokenizer.from_str(tok.backend.to_str())
    backend.decoder = decoder
    return Tokenizer(backend)


class _UpperEveryOther:
    """A custom Python decoder: its behaviour is unknown to the detokenizer, which must fall back to full decodes.
    It upper-cases every other token counting from the first, so a window that starts anywhere but at token 0
    would get the case of the new tokens wrong."""

    def decode_chain(self, tokens: list[str]) -> list[str]:
        return [(t.upper() if i % 2 else t).replace("\u2581", " ") for i, t in enumerate(tokens)]


def _bpe_suffix_tokenizer() -> Tokenizer:
    # Old-style BPE with an end-of-word suffix: the BPEDecoder turns the suffix into a space except on the last token.
    backend = RawTokenizer(models.BPE(unk_token="[UNK]", end_of_word_suffix="</w>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=250, special_tokens=["[UNK]", "[EOS]"], end_of_word_suffix="</w>",
                                  show_progress=False)
    backend.train_from_iterator(_corpus(), trainer=trainer)
    backend.decoder = decoders.BPEDecoder(suffix="</w>")
    return Tokenizer(backend)


VARIANTS = {
    "metaspace-always": lambda t: _with_decoder(t["metaspace"], decoders.Metaspace(prepend_scheme="always")),
    "metaspace-never": lambda t: _with_decoder(t["metaspace"], decoders.Metaspace(prepend_scheme="never")),
    "bytefallback-metaspace": lambda t: _with_decoder(
        t["metaspace"], decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])),
    "strip-two": lambda t: _with_decoder(t["metaspace"], decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 2, 0)])),
    "wordpiece": lambda t: _with_decoder(t["metaspace"], decoders.WordPiece(prefix="\u2581", cleanup=False)),
    "ctc": lambda t: _with_decoder(t["metaspace"], decoders.CTC("<unk>", "\u2581", cleanup=False)),
    "no-decoder": lambda t: _with_decoder(t["metaspace"], None),
    "bytelevel-over-bytes": lambda t: _with_decoder(t["metaspace"], decoders.ByteLevel()),
    "custom": lambda t: _with_decoder(t["metaspace"], decoders.Decoder.custom(_UpperEveryOther())),
    "bpe-suffix": lambda t: _bpe_suffix_tokenizer(),
}


# ----- helpers -----


def run(tok: Tokenizer, ids: list[int], **kwargs) -> tuple[list[str], str | None, IncrementalDetokenizer]:
    """Feed ids one at a time, like the engine; flush at the end unless a stop string matched."""
    det = IncrementalDetokenizer(tok, **kwargs)
    deltas, out = [], []
    for token in ids:
        out.append(token)
        delta, matched = det.step(out)
        deltas.append(delta)
        if matched is not None:
            return deltas, matched, det
    deltas.append(det.flush())
    return deltas, det.matched_stop, det


def random_ids(tok: Tokenizer, rng: random.Random, length: int) -> list[int]:
    """Ids biased towards the tricky ones: special tokens, byte tokens, whitespace-only tokens, unknown ids."""
    pieces = tok.convert_ids_to_tokens(range(tok.vocab_size))
    special = sorted(tok.all_special_ids)
    byte_ids = [i for i, p in enumerate(pieces) if p and len(p) == 6 and p.startswith("<0x")]
    spaces = [i for i, p in enumerate(pieces) if p and set(p) <= {"\u2581", "\u0120", " ", "\u010a"}]
    ids = []
    for _ in range(length):
        r = rng.random()
        if r < 0.12 and special:
            ids.append(rng.choice(special))
        elif r < 0.35 and byte_ids:
            ids.append(rng.choice(byte_ids))
        elif r < 0.45 and spaces:
            ids.append(rng.choice(spaces))
        elif r < 0.48:
            ids.append(tok.vocab_size + rng.randrange(8))  # an id the model may emit but the vocabulary lacks
        else:
            ids.append(rng.randrange(tok.vocab_size))
    return ids


def expected_stop(full: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Reference semantics: read the full text one character at a time; the first stop string to complete wins
    (the longest one if several complete at the same character)."""
    for end in range(1, len(full) + 1):
        done = [s for s in stops if full.endswith(s, 0, end)]
        if done:
            stop = max(done, key=len)
            return full[:end if include else end - len(stop)], stop
    return full, None


def stable_prefix(tok: Tokenizer, ids: list[int], k: int) -> str:
    """For byte-level BPE: the text decode(ids[:j]) for the last j <= k whose decode does not end in a split
    character, i.e. everything that is certain after k tokens."""
    for j in range(k, -1, -1):
        text = tok.decode(ids[:j])
        if not text.endswith(REPLACEMENT):
            return text
    return ""


# ----- exactness without stop strings -----


@pytest.mark.parametrize("family", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("skip", [True, False])
def test_random_sequences_concatenate_to_full_decode(toks, family, skip):
    tok = toks[family]
    rng = random.Random(f"{family}{skip}")
    for _ in range(1500):
        ids = random_ids(tok, rng, rng.randint(1, 24))
        deltas, matched, det = run(tok, ids, skip_special_tokens=skip)
        full = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == full == det.text, (ids, deltas)
        assert matched is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_other_decoders_concatenate_to_full_decode(toks, variant):
    tok = VARIANTS[variant](toks)
    rng = random.Random(variant)
    for _ in range(300):
        ids = random_ids(tok, rng, rng.randint(1, 20))
        for skip in (True, False):
            deltas, _, _ = run(tok, ids, skip_special_tokens=skip)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), (variant, ids, deltas)


@pytest.mark.parametrize("family", ["bytelevel", "metaspace"])
def test_real_text_streams_without_replacement_characters(toks, family):
    tok = toks[family]
    ids = tok.encode(MULTILINGUAL, add_special_tokens=False)
    # The test is only meaningful if some characters really are split across tokens.
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)
    deltas, _, _ = run(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == MULTILINGUAL
    assert not any(REPLACEMENT in d for d in deltas)
    assert sum(1 for d in deltas if d) > 10  # streamed, not released in one piece at the end


def test_bytelevel_emits_text_as_soon_as_it_is_certain(toks):
    tok = toks["bytelevel"]
    ids = tok.encode(MULTILINGUAL + " " + " ".join(_corpus()[:12]), add_special_tokens=False)
    det = IncrementalDetokenizer(tok)
    for k in range(1, len(ids) + 1):
        det.step(ids[:k])
        assert det.text == stable_prefix(tok, ids, k), k


def test_byte_fallback_run_is_held_until_a_normal_token_closes_it(toks):
    tok = toks["metaspace"]
    pieces = tok.encode("a \u4e2d\u6587 b", add_special_tokens=False)
    names = tok.convert_ids_to_tokens(pieces)
    first_byte = next(i for i, name in enumerate(names) if name.startswith("<0x"))
    last_byte = max(i for i, name in enumerate(names) if name.startswith("<0x"))
    assert last_byte - first_byte >= 5  # both characters are spelled in bytes
    det = IncrementalDetokenizer(tok)
    for k in range(1, len(pieces) + 1):
        det.step(pieces[:k])
        if first_byte < k <= last_byte + 1:
            # Held while the run is open: one more byte could still turn the whole run into U+FFFD.
            assert det.text == tok.decode(pieces[:first_byte])
        elif k == last_byte + 2:
            assert det.text == tok.decode(pieces[:k])  # the next normal token releases the run
    assert det.text + det.flush() == tok.decode(pieces) == "a \u4e2d\u6587 b"

    # Why: an incomplete character at the end of a run spoils the complete one before it.
    spoiled = pieces[first_byte:first_byte + 3] + pieces[first_byte:first_byte + 1]
    assert "\u4e2d" not in tok.decode(spoiled)
    deltas, _, _ = run(tok, spoiled)
    assert "".join(deltas) == tok.decode(spoiled)


def test_skip_special_tokens_both_ways(toks):
    tok = toks["bytelevel"]
    ids = tok.encode("<|im_start|>assistant\nHi <tool_call> there<|im_end|><|endoftext|>", add_special_tokens=False)
    skipped, _, _ = run(tok, ids, skip_special_tokens=True)
    kept, _, _ = run(tok, ids, skip_special_tokens=False)
    assert "".join(skipped) == tok.decode(ids, skip_special_tokens=True) == "assistant\nHi <tool_call> there"
    assert "".join(kept) == tok.decode(ids, skip_special_tokens=False)
    assert "".join(kept).endswith("<|im_end|><|endoftext|>")


def test_no_new_tokens_gives_no_text(toks):
    tok = toks["bytelevel"]
    ids = tok.encode("Hello world", add_special_tokens=False)
    det = IncrementalDetokenizer(tok)
    det.step(ids)
    assert det.step(ids) == ("", None)


# ----- stop strings -----


def _stream_text(tok: Tokenizer) -> tuple[str, list[int]]:
    text = "Hello world, the quick brown fox jumps over the lazy dog. \u4f60\u597d\U0001f600 done."
    return text, tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("family", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens(toks, family, include):
    tok = toks[family]
    text, ids = _stream_text(tok)
    stop = "quick brown f"
    assert not any(stop in tok.token_text(i) for i in ids)  # the match must span tokens
    deltas, matched, det = run(tok, ids, stop=[stop], include_stop_str_in_output=include)
    cut = text.index(stop) + (len(stop) if include else 0)
    assert matched == stop == det.matched_stop
    assert "".join(deltas) == text[:cut] == det.text
    if not include:
        assert not any(stop[:2] in d for d in deltas)


@pytest.mark.parametrize("family", ["bytelevel", "metaspace"])
def test_stop_string_inside_multibyte_characters(toks, family):
    tok = toks[family]
    text, ids = _stream_text(tok)
    deltas, matched, _ = run(tok, ids, stop=["\u597d\U0001f600"])
    assert matched == "\u597d\U0001f600"
    assert "".join(deltas) == text[:text.index("\u597d")]
    assert not any(REPLACEMENT in d for d in deltas)


def test_first_completed_stop_wins(toks):
    tok = toks["bytelevel"]
    text, ids = _stream_text(tok)
    # "own" completes (inside "brown") before "brown fox" does, although "brown fox" starts earlier.
    deltas, matched, _ = run(tok, ids, stop=["brown fox", "own", "lazy"])
    assert (matched, "".join(deltas)) == ("own", text[:text.index("own")])
    # Two stops completing at the same character: the longer (earlier-starting) one.
    deltas, matched, _ = run(tok, ids, stop=["fox", "brown fox"])
    assert (matched, "".join(deltas)) == ("brown fox", text[:text.index("brown")])
    assert expected_stop(text, ["brown fox", "own", "lazy"], False) == (text[:text.index("own")], "own")


def test_possible_stop_start_is_held_then_released(toks):
    tok = toks["bytelevel"]
    text, ids = _stream_text(tok)
    stop = "quick brown cat"
    det = IncrementalDetokenizer(tok, stop=[stop])
    for k in range(1, len(ids) + 1):
        delta, matched = det.step(ids[:k])
        assert matched is None
        certain = stable_prefix(tok, ids, k)
        # Everything certain is out, except a tail that could still grow into the stop string.
        held = next(n for n in range(len(stop) - 1, -1, -1) if n == 0 or certain.endswith(stop[:n]))
        assert det.text == certain[:len(certain) - held], k
    assert det.text + det.flush() == text


def test_stop_found_in_text_released_by_flush(toks):
    tok = toks["metaspace"]
    ids = tok.encode("ab \U0001f600", add_special_tokens=False)
    eos = tok.eos_token_id
    det = IncrementalDetokenizer(tok, stop=["\U0001f600"])
    # The emoji's byte run is still open when eos arrives (eos is skipped, so it does not close the run).
    for k in range(1, len(ids) + 1):
        assert det.step(ids[:k])[1] is None
    assert det.step(ids + [eos]) == ("", None)
    assert det.text + det.flush() == "ab "
    assert det.matched_stop == "\U0001f600"


def test_stop_strings_on_visible_special_tokens(toks):
    tok = toks["bytelevel"]
    ids = tok.encode("hi<|im_end|>there", add_special_tokens=False)
    deltas, matched, _ = run(tok, ids, stop=["<|im_end|>"], skip_special_tokens=False)
    assert (matched, "".join(deltas)) == ("<|im_end|>", "hi")
    deltas, matched, _ = run(tok, ids, stop=["<|im_end|>"], skip_special_tokens=True)
    assert (matched, "".join(deltas)) == (None, "hithere")


def test_after_a_stop_nothing_more_is_emitted(toks):
    tok = toks["bytelevel"]
    text, ids = _stream_text(tok)
    det = IncrementalDetokenizer(tok, stop=["world"])
    k = next(k for k in range(1, len(ids) + 1) if det.step(ids[:k])[1] is not None)
    assert det.step(ids[:k + 1]) == ("", None)
    assert det.flush() == ""
    assert det.text == "Hello "


@pytest.mark.parametrize("family", ["bytelevel", "metaspace"])
def test_random_stop_strings_match_reference(toks, family):
    tok = toks[family]
    rng = random.Random(family)
    lines = _corpus()[:10] + [MULTILINGUAL]
    for trial in range(600):
        if trial % 2:
            ids = tok.encode(rng.choice(lines), add_special_tokens=False)
        else:
            ids = random_ids(tok, rng, rng.randint(1, 24))
        skip = rng.random() < 0.7
        include = rng.random() < 0.5
        full = tok.decode(ids, skip_special_tokens=skip)
        stops = []
        for _ in range(rng.randint(1, 3)):
            if full and rng.random() < 0.8:
                a = rng.randrange(len(full))
                stops.append(full[a:a + rng.randint(1, 8)])
            else:
                stops.append(rng.choice(["zzz", "\n\n", "the", "\U0001f600!"]))
        deltas, matched, _ = run(tok, ids, skip_special_tokens=skip, stop=stops, include_stop_str_in_output=include)
        text, stop = expected_stop(full, stops, include)
        assert ("".join(deltas), matched) == (text, stop), (ids, stops, include, skip, deltas)
        if not include:
            assert not any(s in "".join(deltas) for s in stops)
        if REPLACEMENT not in full:
            assert not any(REPLACEMENT in d for d in deltas)


# ----- cost -----


def test_decoded_window_does_not_grow_with_output_length(toks):
    tok = toks["metaspace"]
    # The same text over and over: a decode whose cost grows with the output would decode longer and longer windows.
    ids = (tok.encode(" ".join(_corpus()[:10]) + " " + MULTILINGUAL + " ", add_special_tokens=False) * 50)[:2000]
    assert len(ids) == 2000
    decoded_lengths = []
    original = tok.decode

    def counting_decode(window, skip_special_tokens=True):
        decoded_lengths.append(len(window))
        return original(window, skip_special_tokens)

    tok.decode = counting_decode
    try:
        deltas, _, _ = run(tok, ids, stop=["never appears"])
    finally:
        del tok.decode
    assert "".join(deltas) == tok.decode(ids)
    half = len(decoded_lengths) // 2
    assert max(decoded_lengths[half:]) <= max(decoded_lengths[:half])
    assert sum(decoded_lengths) <= 8 * len(ids)
