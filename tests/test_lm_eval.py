"""EleutherAI's lm-evaluation-harness (`lm_eval`) against the live server, compared with lm-eval's own `hf` backend
on the same tiny checkpoint, per sample.

The server is driven through `local-completions` (loglikelihood from echo + logprobs on token-id prompts,
loglikelihood_rolling, generate_until) and `local-chat-completions` (generate_until with the chat template). The
tasks are written here into tmp_path (local JSON lines, loaded by the `json` dataset builder); nothing is downloaded.

Token ids: `local-completions` takes its tokenizer from the server (`tokenizer_backend=auto` finds vLLM's
/tokenizer_info and /tokenize) and never adds BOS (the remote tokenizer encodes with add_special_tokens=False), so
`hf` runs with add_bos_token=False: both sides then score and generate from exactly the same ids. The chat template
writes BOS itself, on both sides.

One server subprocess serves the whole module, and each backend runs each task once.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import lm_eval
from checkpoints import hf_greedy
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
from server_process import ServerProcess

MODEL = "test-model"
MAX_MODEL_LEN = 256
LOGLIK_TOL = 1e-3

# Multiple choice: each question gets the model's own greedy continuation (so some is_greedy flags are True, which a
# random model would otherwise never give) and two fixed words.
MC_QUESTIONS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The quick brown fox jumps over the",
    "Once upon a time, in a small village,",
    "def add(a, b):\n    return",
    "My favourite colour is",
    "The river flows into the",
    "Two plus two equals",
]
MC_OTHER_CHOICES = [" blue", " the sea"]
MC_GREEDY_TOKENS = 2

# Greedy decoding on these (without BOS, and in the chat template) never comes closer to a tie than a top-1 minus
# top-2 logit gap of 0.02 in 10 steps, far above fp32 noise ("The quick brown fox" had a step at 0.003).
GEN_PROMPTS = [
    "A quick brown fox",
    "Once upon a time, in a small village,",
    "User: What is the tallest mountain in the world?\nAssistant:",
    "Rivers shape the land they flow through.",
    "Numbers: 3, 14, 159,",
    "def add(a, b):",
]
GEN_KWARGS = {"until": [".", "\n", "Straßen"], "max_gen_toks": 10, "do_sample": False, "temperature": 0.0}

# Rolling windows this long (tokens) split most documents into several, so that later windows score a continuation
# after a context that is not BOS (lm-eval's first window is conditioned on the prefix token alone, a later one on
# the tokens before it that the window still has room for).
ROLLING_WINDOW = 12
ROLLING_DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Rivers shape the land they flow through, carving valleys over thousands of years.",
    "Le petit café au coin de la rue ouvre à sept heures.",
    "Numbers: 3, 14, 159, 2653. Prices: $4.50, €12.",
]


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def offline_hub():
    """lm-eval, datasets and transformers never reach for the network here; huggingface_hub and datasets read the
    variables at import, so their module constants are set too. Undone after the module."""
    import datasets.config
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def ckpt(make_ckpt) -> Path:
    return make_ckpt("llama")


@pytest.fixture(scope="module")
def hf_model(ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, hf_model) -> dict[str, dict]:
    """name -> lm-eval task config (dict) over JSON lines written here."""
    model, tok = hf_model
    root = tmp_path_factory.mktemp("lm_eval_tasks")

    def data(name: str, docs: list[dict]) -> dict:
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        # cache_dir: the datasets cache (Arrow files) stays in tmp_path too.
        return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)},
                                                            "cache_dir": str(root / "hf_datasets")},
                "test_split": "test"}

    mc_docs = []
    for i, question in enumerate(MC_QUESTIONS):
        ids = tok(question, add_special_tokens=False).input_ids
        greedy = hf_greedy(model, ids, max_new_tokens=MC_GREEDY_TOKENS).output_ids
        choice = tok.decode(greedy)
        choices = [choice, *MC_OTHER_CHOICES]
        mc_docs.append({"question": question, "choices": choices, "answer": i % len(choices)})
    return {
        "attn_mc": {
            "task": "attn_mc", **data("mc", mc_docs), "output_type": "multiple_choice",
            "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
            # The greedy choices already carry their leading space (or none); the fixed ones have theirs.
            "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        },
        "attn_gen": {
            "task": "attn_gen", **data("gen", [{"prompt": p, "target": "x"} for p in GEN_PROMPTS]),
            "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
            "generation_kwargs": dict(GEN_KWARGS),
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        },
        "attn_ppl": {
            "task": "attn_ppl", **data("ppl", [{"text": t} for t in ROLLING_DOCS]),
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        },
    }


def evaluate(model, model_args: str | None, task_configs: list[dict], **kwargs) -> dict[str, list[dict]]:
    """task name -> lm-eval's logged samples (sorted by doc_id) of one simple_evaluate run."""
    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[json.loads(json.dumps(t)) for t in task_configs],
        task_manager=TaskManager(include_defaults=False), log_samples=True, batch_size=1, bootstrap_iters=0,
        **kwargs)
    return {name: sorted(samples, key=lambda s: s["doc_id"]) for name, samples in results["samples"].items()}


def hf_args(ckpt: Path, max_length: int = MAX_MODEL_LEN) -> str:
    return f"pretrained={ckpt},dtype=float32,add_bos_token=False,max_length={max_length}"


@pytest.fixture(scope="module")
def hf_samples(ckpt, tasks) -> dict[str, list[dict]]:
    return evaluate("hf", hf_args(ckpt), [tasks["attn_mc"], tasks["attn_gen"]], device="cpu")


@pytest.fixture(scope="module")
def hf_rolling_samples(ckpt, tasks) -> list[dict]:
    return evaluate("hf", hf_args(ckpt, ROLLING_WINDOW), [tasks["attn_ppl"]], device="cpu")["attn_ppl"]


@pytest.fixture(scope="module")
def hf_chat_samples(ckpt, tasks) -> list[dict]:
    return evaluate("hf", hf_args(ckpt), [tasks["attn_gen"]], device="cpu", apply_chat_template=True)["attn_gen"]


@pytest.fixture(scope="module")
def server(ckpt):
    # On the CPU in float32 like `hf` here, also on a machine with a GPU (where the server would pick bfloat16).
    with ServerProcess(ckpt, "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
                       "--device", "cpu", "--dtype", "float32") as proc:
        yield proc


def completions_lm(server: ServerProcess, tok, max_length: int = MAX_MODEL_LEN):
    """lm-eval's `local-completions` model on the server, with the tokenizer it detects by itself.

    max_length: lm-eval's API models keep one token less than they are given (and rolling windows one less again),
    so max_length + 2 here makes the same rolling windows as `hf` with max_length.
    custom_prefix_token_id: the token that conditions an empty context (the first rolling window) is BOS for `hf`;
    lm-eval 0.4.13's remote tokenizer picks `bos_token_id or eos_token_id`, which is EOS when BOS is id 0 (as here),
    so it is named explicitly. The server's own answer (BOS "<|begin_of_text|>", id 0) is checked below."""
    lm = get_model("local-completions").create_from_arg_string(
        f"model={MODEL},base_url={server.url}/v1/completions,tokenizer_backend=auto,max_length={max_length + 2},"
        f"custom_prefix_token_id={tok.bos_token_id}")
    assert lm.tokenizer_backend == "remote", "lm-eval did not detect the server's /tokenizer_info + /tokenize"
    assert (lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert lm.prefix_token_id == tok.bos_token_id
    return lm


@pytest.fixture(scope="module")
def server_samples(server, hf_model, tasks) -> dict[str, list[dict]]:
    return evaluate(completions_lm(server, hf_model[1]), None, [tasks["attn_mc"], tasks["attn_gen"]])


# ---- helpers ---------------------------------------------------------------------------------------


def _loglik_pairs(sample: dict) -> list[tuple[float, bool]]:
    """(loglikelihood, is_greedy) per request of a loglikelihood sample (one per choice)."""
    return [(float(ll), bool(greedy)) for ll, greedy in sample["filtered_resps"]]


def _top2_gaps(model, ids: list[int], start: int) -> list[float]:
    """fp64 top-1 minus top-2 logit at the positions predicting ids[start:] (how close to a tie each step is)."""
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(torch.tensor([ids])).logits[0, start - 1:len(ids) - 1]
    top2 = logits.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


# ---- tests -----------------------------------------------------------------------------------------


def test_hf_side_is_a_meaningful_reference(hf_samples, hf_rolling_samples, hf_model):
    """The premises of the comparisons: finite scores, some greedy choices and some not, and generations that
    differ from prompt to prompt (a model stuck on one token would make equality trivial)."""
    pairs = [p for s in hf_samples["attn_mc"] for p in _loglik_pairs(s)]
    assert len(pairs) == len(MC_QUESTIONS) * (1 + len(MC_OTHER_CHOICES))
    assert all(math.isfinite(ll) and ll < 0 for ll, _ in pairs)
    assert {greedy for _, greedy in pairs} == {True, False}
    generations = [s["filtered_resps"][0] for s in hf_samples["attn_gen"]]
    assert len(set(generations)) > 1
    assert all(math.isfinite(float(s["filtered_resps"][0])) for s in hf_rolling_samples)
    # one document fits in one window, the others need two or more
    assert {len(hf_model[1](d, add_special_tokens=False).input_ids) > ROLLING_WINDOW for d in ROLLING_DOCS} == \
        {True, False}


def test_multiple_choice_loglikelihoods_match_hf(server_samples, hf_samples, hf_model):
    model, tok = hf_model
    for ours, ref in zip(server_samples["attn_mc"], hf_samples["attn_mc"], strict=True):
        assert ours["doc_id"] == ref["doc_id"] and ours["arguments"] == ref["arguments"]
        for (ll, greedy), (ref_ll, ref_greedy), (context, continuation) in zip(
                _loglik_pairs(ours), _loglik_pairs(ref), ref["arguments"], strict=True):
            assert ll == pytest.approx(ref_ll, abs=LOGLIK_TOL), (context, continuation)
            if greedy != ref_greedy:  # say how close to a tie it was
                ctx_ids = tok(context, add_special_tokens=False).input_ids
                whole = tok(context + continuation, add_special_tokens=False).input_ids
                gaps = _top2_gaps(model, whole, len(ctx_ids))
                pytest.fail(f"is_greedy {greedy} (server) != {ref_greedy} (hf) for {context!r} + {continuation!r}; "
                            f"fp64 top-1 minus top-2 logit gaps over the continuation: {gaps}")
    assert [s["acc"] for s in server_samples["attn_mc"]] == [s["acc"] for s in hf_samples["attn_mc"]]


def test_generate_until_matches_hf(server_samples, hf_samples, hf_model):
    _assert_same_generations(server_samples["attn_gen"], hf_samples["attn_gen"], hf_model)


def test_loglikelihood_rolling_matches_hf(server, hf_model, tasks, hf_rolling_samples):
    lm = completions_lm(server, hf_model[1], max_length=ROLLING_WINDOW)
    server_rolling = evaluate(lm, None, [tasks["attn_ppl"]])["attn_ppl"]
    ours = [float(s["filtered_resps"][0]) for s in server_rolling]
    ref = [float(s["filtered_resps"][0]) for s in hf_rolling_samples]
    assert ours == pytest.approx(ref, abs=LOGLIK_TOL)
    for ours_sample, ref_sample in zip(server_rolling, hf_rolling_samples, strict=True):
        assert ours_sample["doc_id"] == ref_sample["doc_id"]
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            # per-sample metric values are (loglikelihood, words/bytes) pairs; the count must be the same text's
            assert ours_sample[metric][1] == ref_sample[metric][1]


def test_chat_completions_generate_until_matches_hf_with_the_chat_template(server, hf_chat_samples, hf_model, tasks):
    lm = get_model("local-chat-completions").create_from_arg_string(
        f"model={MODEL},base_url={server.url}/v1/chat/completions")
    ours = evaluate(lm, None, [tasks["attn_gen"]], apply_chat_template=True)["attn_gen"]
    _assert_same_generations(ours, hf_chat_samples, hf_model)


def _assert_same_generations(ours: list[dict], ref: list[dict], hf_model) -> None:
    model, tok = hf_model
    assert [s["doc_id"] for s in ours] == [s["doc_id"] for s in ref]
    for ours_sample, ref_sample in zip(ours, ref, strict=True):
        got, want = ours_sample["filtered_resps"][0], ref_sample["filtered_resps"][0]
        if got == want:
            continue
        # How close to a tie was greedy decoding on this prompt? (hf side, fp32, eos ignored)
        prompt = ref_sample["arguments"][0][0]
        # The chat prompt already starts with BOS (the template writes it); a plain one has none (see the top).
        ids = tok(prompt, add_special_tokens=False).input_ids
        margins = hf_greedy(model, ids, max_new_tokens=GEN_KWARGS["max_gen_toks"]).margins
        pytest.fail(f"generation for {prompt!r}: server {got!r} != hf {want!r}; "
                    f"hf top-1 minus top-2 logit per step: {[round(m, 4) for m in margins]}")
