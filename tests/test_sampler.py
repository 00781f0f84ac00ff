"""Sampler knobs checked against hand-computed references: exact logit arithmetic for the processors,
exact support sets for the filters, and empirical frequencies (many draws, fixed global seed) for sampling."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import Sampler, apply_logit_processors, sampling_probs
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

DRAWS = 20_000
# Frequencies over DRAWS draws have a standard deviation of at most 0.0035; this is >4 sigma.
FREQ_TOL = 0.015


def make_seq(params: SamplingParams | None = None, prompt=(0,), output=(), seq_id: int = 0, **kw) -> Sequence:
    seq = Sequence(seq_id, f"req-{seq_id}", 0, list(prompt), params or SamplingParams(**kw), max_tokens=1000)
    for tok in output:
        seq.append_token(tok)
    return seq


def frequencies(logits_row: torch.Tensor, params: SamplingParams, draws: int = DRAWS) -> torch.Tensor:
    """Empirical distribution of the sampler's choice for one row, drawn `draws` times in one batch."""
    seqs = [make_seq(params) for _ in range(draws)]
    tokens = Sampler()(logits_row.expand(draws, -1), seqs).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=logits_row.numel()).float() / draws


def log_probs(*probs: float) -> torch.Tensor:
    return torch.tensor(probs).log()


def support(probs_row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs_row > 0).flatten().tolist())


def nucleus(probs: list[float], top_p: float) -> set[int]:
    """Reference: the smallest most-likely-first set whose mass reaches top_p."""
    kept, mass = set(), 0.0
    for tok in sorted(range(len(probs)), key=lambda t: -probs[t]):
        kept.add(tok)
        mass += probs[tok]
        if mass >= top_p:
            break
    return kept


@pytest.fixture(autouse=True)
def _fixed_global_seed():
    torch.manual_seed(0)


def test_greedy_is_argmax():
    logits = torch.randn(16, 300)
    out = Sampler()(logits, [make_seq(temperature=0.0) for _ in range(16)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 16


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_scaled_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
    freq = frequencies(logits, SamplingParams(temperature=temperature))
    expected = torch.softmax(logits / temperature, dim=-1)
    assert torch.allclose(freq, expected, atol=FREQ_TOL)


def test_temperature_raises_entropy():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0])

    def entropy(p: torch.Tensor) -> float:
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    entropies = [entropy(frequencies(logits, SamplingParams(temperature=t))) for t in (0.3, 1.0, 3.0)]
    assert entropies[0] < entropies[1] < entropies[2]


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.9, 1.7, -0.2])
    seq = make_seq(top_k=3)
    probs = sampling_probs(logits[None], [seq])[0]
    assert support(probs) == {1, 5, 3}
    expected = torch.zeros(7)
    expected[[1, 5, 3]] = torch.softmax(logits[[1, 5, 3]], dim=-1)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.allclose(frequencies(logits, seq.params), expected, atol=FREQ_TOL)


@pytest.mark.parametrize("with_top_p_row", [False, True], ids=["top-k only", "with top-p"])
def test_top_k_keeps_exactly_k_among_ties(with_top_p_row):
    # A top-p row in the batch sends every row down the full-sort path instead of the top-k one.
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 2.0, 0.0]] * 2)
    seqs = [make_seq(top_k=2), make_seq(top_p=0.5) if with_top_p_row else make_seq(top_k=9)]
    probs = sampling_probs(logits, seqs)
    assert len(support(probs[0])) == 2 and support(probs[0]) <= {1, 2, 3, 4}
    assert torch.allclose(probs[0].sum(), torch.tensor(1.0))
    assert len(support(probs[1])) == (3 if with_top_p_row else 6)  # 3 x 0.222 is the first prefix >= 0.5


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.8, 0.9, 0.99])
def test_top_p_keeps_minimal_nucleus(top_p):
    dist = [0.15, 0.05, 0.4, 0.1, 0.3]
    logits = log_probs(*dist)
    params = SamplingParams(top_p=top_p)
    probs = sampling_probs(logits[None], [make_seq(params)])[0]
    kept = nucleus(dist, top_p)
    assert support(probs) == kept
    expected = torch.tensor([dist[t] if t in kept else 0.0 for t in range(5)])
    expected /= expected.sum()
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.allclose(frequencies(logits, params), expected, atol=FREQ_TOL)


def test_top_p_applies_to_top_k_survivors():
    # top_k=2 leaves {2: 0.4, 4: 0.3} -> renormalized {0.571, 0.429}; top_p=0.5 then keeps token 2 only.
    logits = log_probs(0.15, 0.05, 0.4, 0.1, 0.3)
    probs = sampling_probs(logits[None], [make_seq(top_k=2, top_p=0.5)])[0]
    assert support(probs) == {2}


@pytest.mark.parametrize(("min_p", "kept"), [(0.1, {0, 1, 2, 3}), (0.25, {0, 1, 2}), (0.4, {0, 1})])
def test_min_p_threshold_is_relative_to_top_prob(min_p, kept):
    dist = [0.5, 0.25, 0.15, 0.1]
    params = SamplingParams(min_p=min_p)
    probs = sampling_probs(log_probs(*dist)[None], [make_seq(params)])[0]
    assert support(probs) == kept
    expected = torch.tensor([dist[t] if t in kept else 0.0 for t in range(4)])
    expected /= expected.sum()
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.allclose(frequencies(log_probs(*dist), params), expected, atol=FREQ_TOL)


def test_disabled_filters_are_no_ops():
    # Logits spread over ~60 nats give tail probabilities near 1e-26, where a rounded cumulative sum
    # would reach 1 early; top_p=1 must still keep them. The second row makes the sort path run.
    logits = torch.randn(2, 1000) * 10
    seqs = [make_seq(top_p=1.0, top_k=0, min_p=0.0), make_seq(top_p=0.5, top_k=10)]
    probs = sampling_probs(logits, seqs)
    assert torch.equal(probs[0], torch.softmax(logits[0], dim=-1))
    assert support(probs[0]) == set(range(1000))
    assert len(support(probs[1])) <= 10


def test_repetition_penalty_follows_hf_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0]] * 3)
    seqs = [
        make_seq(repetition_penalty=2.0, prompt=[0, 0], output=[1]),
        make_seq(repetition_penalty=0.5, prompt=[4], output=[3]),
        make_seq(prompt=[0, 1, 2], output=[3]),  # penalty 1: untouched
    ]
    out = apply_logit_processors(logits, seqs)
    assert out.tolist() == [
        [1.0, -2.0, 0.5, -0.5, 3.0],  # positive divided, negative multiplied, each token once
        [2.0, -1.0, 0.5, -0.25, 6.0],  # penalty < 1 rewards repetition
        [2.0, -1.0, 0.5, -0.5, 3.0],
    ]


def test_presence_and_frequency_penalties_use_output_counts_only():
    logits = torch.zeros(2, 8)
    seqs = [
        make_seq(presence_penalty=0.5, frequency_penalty=0.25, prompt=[7, 7], output=[3, 3, 5]),
        make_seq(frequency_penalty=-1.0, output=[2, 2, 2]),
    ]
    out = apply_logit_processors(logits, seqs)
    expected = torch.zeros(2, 8)
    expected[0, 3] = -(0.5 + 0.25 * 2)
    expected[0, 5] = -(0.5 + 0.25 * 1)
    expected[1, 2] = 3.0
    assert torch.equal(out, expected)


def test_logit_bias_is_added_before_penalties():
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    seq = make_seq(logit_bias={0: 1.0, 2: -0.5}, repetition_penalty=2.0, prompt=[0])
    # (1.0 + 1.0) / 2 = 1.0; penalizing first would give 1.5.
    assert apply_logit_processors(logits, [seq]).tolist() == [[1.0, 0.0, -0.5, 0.0]]


def test_logit_bias_forces_and_bans_tokens():
    logits = torch.tensor([[5.0, 1.0, -3.0, 0.0]]).expand(500, -1)
    forced = Sampler()(logits, [make_seq(logit_bias={2: 100.0}) for _ in range(500)])
    assert set(forced.token_ids) == {2}
    banned = Sampler()(logits[:1], [make_seq(temperature=0.0, logit_bias={0: -100.0})])
    assert banned.token_ids == [1]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    eos = frozenset({1})
    logits = torch.tensor([[0.0, 50.0, 49.0, 1.0, 0.5]])

    def processed(num_output: int, **kw) -> torch.Tensor:
        params = SamplingParams(min_tokens=3, stop_token_ids=[2], eos_token_ids=eos, **kw)
        return apply_logit_processors(logits, [make_seq(params, output=[4] * num_output)])[0]

    for kw in ({}, {"ignore_eos": True}):
        below = processed(2, **kw)
        assert below[1] == below[2] == float("-inf")
        assert torch.equal(below[[0, 3, 4]], logits[0, [0, 3, 4]])
        assert torch.equal(processed(3, **kw), logits[0])

    params = SamplingParams(min_tokens=3, stop_token_ids=[2], eos_token_ids=eos)
    sampled = Sampler()(logits.expand(1000, -1), [make_seq(params, output=[4, 4]) for _ in range(1000)])
    assert not {1, 2} & set(sampled.token_ids)
    reached = Sampler()(logits, [make_seq(params.clone(temperature=0.0), output=[4, 4, 4])])
    assert reached.token_ids == [1]


VOCAB = 500
STEPS = 12


def step_logits(step: int, rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randn(rows, VOCAB, generator=gen) * 2


def generate(seqs: list[Sequence], target_row: int, global_seed: int) -> list[int]:
    """Run STEPS steps; the target row always sees the same logits, the other rows random ones."""
    torch.manual_seed(global_seed)  # the unseeded rows' noise must not reach the seeded row
    sampler = Sampler()
    for step in range(STEPS):
        logits = step_logits(step, len(seqs), seed=global_seed)
        logits[target_row] = step_logits(step, 1, seed=0)[0]
        for seq, tok in zip(seqs, sampler(logits, seqs).token_ids):
            seq.append_token(tok)
    return seqs[target_row].output_token_ids


def test_same_seed_same_tokens_different_seed_differs():
    first = generate([make_seq(seed=1234)], 0, global_seed=1)
    again = generate([make_seq(seed=1234)], 0, global_seed=2)
    other = generate([make_seq(seed=4321)], 0, global_seed=1)
    assert first == again
    assert first != other


def test_seeded_row_is_independent_of_batch():
    alone = generate([make_seq(seed=1234, top_k=50, prompt=[5])], 0, global_seed=1)

    others = []
    for i in range(64):
        kinds = [
            {},
            {"temperature": 0.0},
            {"seed": 99 + i, "top_p": 0.9},
            {"top_k": 5, "repetition_penalty": 1.3},
            {"min_p": 0.05, "logit_bias": {3: 2.0}},
        ]
        others.append(make_seq(seq_id=i + 1, **kinds[i % len(kinds)]))
    target = make_seq(seed=1234, top_k=50, prompt=[5])
    batch = others[:37] + [target] + others[37:]
    assert generate(batch, 37, global_seed=7) == alone


def test_logprobs_come_from_raw_distribution():
    logits = torch.randn(6, 100) * 3
    # Row 5's bias forces the raw argmin, so its sampled token has the worst raw rank.
    worst = int(logits[5].argmin())
    seqs = [
        make_seq(logprobs=None),
        make_seq(logprobs=0, temperature=0.7),
        make_seq(logprobs=1, top_k=5, presence_penalty=1.0, output=[3]),
        make_seq(logprobs=5, temperature=0.0, logit_bias={7: 4.0}),
        make_seq(logprobs=20, top_p=0.8, min_p=0.1),
        make_seq(logprobs=3, logit_bias={worst: 100.0}),
    ]
    out = Sampler()(logits, seqs)
    expected = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[0] is None
    for i in range(1, 6):
        lp = out.logprobs[i]
        tok = out.token_ids[i]
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(float(expected[i, tok]), abs=1e-6)
        assert lp.rank == 1 + int((expected[i] > expected[i, tok]).sum())
        n = seqs[i].params.logprobs
        top = expected[i].topk(n) if n else None
        assert [t for t, _ in lp.top] == ([] if top is None else top.indices.tolist())
        for (_, value), ref in zip(lp.top, [] if top is None else top.values.tolist()):
            assert value == pytest.approx(ref, abs=1e-6)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    assert out.token_ids[5] == worst and out.logprobs[5].rank == 100


def test_bf16_logits_are_upcast():
    logits = (torch.randn(3, 64) * 4).to(torch.bfloat16)
    seqs = [make_seq(logprobs=2, temperature=0.0), make_seq(logprobs=2), make_seq(logprobs=0, top_k=3)]
    out = Sampler()(logits, seqs)
    expected = torch.log_softmax(logits.float(), dim=-1)
    assert out.token_ids[0] == int(logits[0].float().argmax())
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i].logprob == pytest.approx(float(expected[i, tok]), abs=1e-6)


def test_mixed_batch_of_greedy_and_sampled_rows():
    rows = 400
    logits = torch.randn(rows, 50)
    seqs = [make_seq(temperature=0.0) if i % 2 == 0 else make_seq(top_k=3) for i in range(rows)]
    tokens = Sampler()(logits, seqs).token_ids
    top3 = logits.topk(3).indices
    for i, tok in enumerate(tokens):
        if i % 2 == 0:
            assert tok == int(logits[i].argmax())
        else:
            assert tok in top3[i].tolist()
    # Sampled rows must not collapse to argmax: about a third of them should pick something else.
    not_argmax = sum(tokens[i] != int(logits[i].argmax()) for i in range(1, rows, 2))
    assert not_argmax > rows // 10


def test_degenerate_rows_do_not_crash():
    logits = torch.full((4, 10), float("-inf"))
    logits[2] = 0.0
    seqs = [
        make_seq(temperature=0.0, logprobs=2),
        make_seq(top_k=3, top_p=0.5, min_p=0.2, logprobs=2),
        make_seq(top_p=0.3, min_p=0.5),
        make_seq(seed=3, repetition_penalty=1.5, frequency_penalty=1.0, output=[1]),
    ]
    out = Sampler()(logits, seqs)
    assert all(0 <= tok < 10 for tok in out.token_ids)
    assert len(out.logprobs[1].top) == 2


def test_processors_leave_raw_logits_untouched():
    logits = torch.randn(2, 20)
    before = logits.clone()
    seqs = [make_seq(logit_bias={1: 5.0}, min_tokens=2, stop_token_ids=[3]), make_seq(repetition_penalty=2.0)]
    apply_logit_processors(logits, seqs)
    Sampler()(logits, seqs)
    assert torch.equal(logits, before)


def test_logprobs_count_larger_than_vocab():
    out = Sampler()(torch.randn(1, 5), [make_seq(logprobs=20)])
    assert len(out.logprobs[0].top) == 5
    assert math.isclose(sum(math.exp(v) for _, v in out.logprobs[0].top), 1.0, rel_tol=1e-5)
