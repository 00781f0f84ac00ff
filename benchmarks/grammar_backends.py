"""Grammar engines for constrained decoding, measured side by side: llguidance and xgrammar (issue 19).

    python3 -m venv .bench/grammar
    .bench/grammar/bin/pip install torch==2.13.0 xgrammar llguidance tokenizers
    .bench/grammar/bin/python -m benchmarks.grammar_backends [--vocab-size N] [--out FILE.json]

xgrammar needs torch, triton and transformers, which attnserve does not ship, so this runs from its own venv
and imports nothing from the project but its cases (benchmarks/grammar_cases.py).

What it does:
  1. trains a byte-level BPE tokenizer (`tokenizers`) on generated English-like and JSON text, and hands the
     same vocabulary to both engines (checked token by token);
  2. compiles 11 JSON schemas, a regex, a choice list and a Lark grammar with each engine: compile time p50
     over --reps fresh compilations (xgrammar's compiler cache off; llguidance has no grammar cache, every
     LLMatcher compiles), and whether it compiled at all;
  3. walks one hand-written valid instance per case token by token (our tokenizer's tokens), timing every
     next-token bitmask (mean, p99, first mask of a fresh matcher) and checking that the token taken is allowed;
  4. batch of 32: per case, 32 fresh matchers in lockstep fill one (32, vocab/32) int32 bitmask per step with
     the engine's parallel API (llguidance LLExecutor, xgrammar BatchGrammarMatcher); plus one mixed batch
     (32 slots cycling through all cases) with the parallel API and with a per-row loop;
  5. probes: strings each engine should accept or reject (keywords it ignores show up as wrong verdicts);
  6. prints a table and writes everything to --out as JSON.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import random
import statistics
import sys
import time

import llguidance
import torch
import xgrammar as xgr
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from benchmarks.grammar_cases import Case, cases, regex_of_choices

EOS = "<|endoftext|>"


# ----------------------------------------------------------------------------------------------- tokenizer

_SYLLABLES = ("ka to ri ne sa mo lu vi den tar pel on is ex qua ber ston ing ed er al ly ment tion str pro con re"
              " un in th e a o ou ch sh ar st le an es ic ous ive at or").split()
_COMMON = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an"
           " they you were her she there been one all we their has would when if so no will can more other what"
           " time about some into than only new name email user id type value date status error order price item"
           " data result message count list true false null total items address city country phone url title").split()


def corpus(seed: int, n_lines: int) -> list[str]:
    """English-like prose over a Zipf-distributed vocabulary, followed by a JSON record per line."""
    rng = random.Random(seed)
    words, seen = list(_COMMON), set(_COMMON)
    while len(words) < 40000:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    cum, acc = [], 0.0
    for i in range(len(words)):
        acc += 1.0 / (i + 1)
        cum.append(acc)
    lines = []
    for _ in range(n_lines):
        ws = rng.choices(words, cum_weights=cum, k=60)
        ws[0] = ws[0].title()
        prose = " ".join(ws[:30]) + ", " + " ".join(ws[30:]) + "."
        rec = {"id": rng.randint(0, 99999), "name": f"{ws[1].title()} {ws[2].title()}",
               "email": f"{ws[3]}.{ws[4]}@{ws[5]}.com", "tags": ws[6:6 + rng.randint(0, 4)],
               "score": round(rng.uniform(-100, 100), rng.randint(0, 3)), "active": rng.random() < 0.5,
               "created": f"20{rng.randint(10, 29)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
                          f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z",
               "note": None if rng.random() < 0.3 else " ".join(ws[10:10 + rng.randint(1, 8)])}
        indent = rng.choice([None, None, 2])
        lines.append(prose + "\n" + json.dumps(rec, indent=indent))
    return lines


def build_tokenizer(vocab_size: int, seed: int, n_lines: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(seed, n_lines), trainer)
    return tok


# ----------------------------------------------------------------------------------------------- engines

class CompileError(Exception):
    pass


class LLG:
    name = "llguidance"

    def __init__(self, hf: Tokenizer, threads: int, slices: str = "general"):
        t0 = time.perf_counter()
        sl = {"general": None, "json": llguidance.LLTokenizer.json_slices(), "none": []}[slices]
        self.tok = llguidance.LLTokenizer(hf.to_str(), n_vocab=hf.get_vocab_size(), eos_token=hf.token_to_id(EOS),
                                          slices=sl)
        self.setup_s = time.perf_counter() - t0
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.nbytes = 4 * ((hf.get_vocab_size() + 31) // 32)

    def grammar(self, case: Case) -> str:
        if case.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(case.spec)
        if case.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(case.spec)
        if case.kind == "choice":
            return llguidance.LLMatcher.grammar_from_regex(regex_of_choices(case.spec))
        return llguidance.LLMatcher.grammar_from_lark(case.spec)

    def compile(self, case: Case):
        """There is no compiled-grammar object: each LLMatcher compiles its grammar (no cache to defeat)."""
        grammar = self.grammar(case)
        m = llguidance.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise CompileError(m.get_error())
        return grammar

    def matcher(self, compiled):
        return llguidance.LLMatcher(self.tok, compiled, log_level=0)

    def fill(self, m, mask: torch.Tensor, row: int) -> None:
        m.unsafe_compute_mask_ptr(mask[row].data_ptr(), self.nbytes)

    def accept(self, m, token: int) -> bool:
        return m.consume_token(token)

    def batch_fill(self, ms: list, mask: torch.Tensor, per_row: bool = False) -> None:
        if per_row:
            for i, m in enumerate(ms):
                self.fill(m, mask, i)
        else:
            self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(ms)], mask.data_ptr(),
                                                  self.nbytes, mask.shape[0])


class XGR:
    name = "xgrammar"

    def __init__(self, hf: Tokenizer, threads: int, dynamic: bool = False):
        t0 = time.perf_counter()
        vocab = sorted(hf.get_vocab().items(), key=lambda kv: kv[1])
        assert [i for _, i in vocab] == list(range(len(vocab)))
        self.info = xgr.TokenizerInfo([t for t, _ in vocab], xgr.VocabType.BYTE_LEVEL, vocab_size=len(vocab),
                                      stop_token_ids=[hf.token_to_id(EOS)])
        # cache off so that every compile_* call does the full work
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False,
                                           enable_dynamic_compilation=dynamic)
        self.setup_s = time.perf_counter() - t0
        self.batcher = xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, case: Case):
        try:
            if case.kind == "json":
                return self.compiler.compile_json_schema(json.dumps(case.spec))
            if case.kind == "regex":
                return self.compiler.compile_regex(case.spec)
            if case.kind == "choice":
                return self.compiler.compile_regex(regex_of_choices(case.spec))
            return self.compiler.compile_lark(case.spec)
        except Exception as exc:   # noqa: BLE001 - any failure is a coverage result
            raise CompileError(f"{type(exc).__name__}: {exc}") from exc

    def matcher(self, compiled):
        return xgr.GrammarMatcher(compiled)

    def fill(self, m, mask: torch.Tensor, row: int) -> None:
        m.fill_next_token_bitmask(mask, row)

    def accept(self, m, token: int) -> bool:
        return m.accept_token(token)

    def batch_fill(self, ms: list, mask: torch.Tensor, per_row: bool = False) -> None:
        if per_row:
            for i, m in enumerate(ms):
                m.fill_next_token_bitmask(mask, i)
        else:
            self.batcher.batch_fill_next_token_bitmask(ms, mask)


# ----------------------------------------------------------------------------------------------- measurements

def bit(mask_row: torch.Tensor, token: int) -> bool:
    return bool((int(mask_row[token // 32]) >> (token % 32)) & 1)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def check_text(engine, compiled, ids: list[int], eos: int, width: int) -> tuple[bool, int]:
    """Does the engine accept the token sequence and then allow EOS? Returns (accepted, tokens taken)."""
    m = engine.matcher(compiled)
    mask = torch.zeros((1, width), dtype=torch.int32)
    for k, tok in enumerate(ids):
        engine.fill(m, mask, 0)
        if not bit(mask[0], tok) or not engine.accept(m, tok):
            return False, k
    engine.fill(m, mask, 0)
    return bit(mask[0], eos), len(ids)


def walk(engine, compiled, ids: list[int], eos: int, width: int, reps: int) -> dict:
    """Fresh matcher per rep; time every next-token mask along the valid instance, then the EOS mask."""
    times, first, steps, masks = [], [], None, []
    mask = torch.zeros((1, width), dtype=torch.int32)
    for rep in range(reps):
        m = engine.matcher(compiled)
        ok_steps = 0
        for k in range(len(ids) + 1):
            t0 = time.perf_counter_ns()
            engine.fill(m, mask, 0)
            dt = time.perf_counter_ns() - t0
            times.append(dt / 1e3)
            if k == 0:
                first.append(dt / 1e3)
            if rep == 0:
                masks.append(mask[0].clone())
            if k == len(ids):
                ok_steps += bit(mask[0], eos)
                break
            if not bit(mask[0], ids[k]) or not engine.accept(m, ids[k]):
                break
            ok_steps += 1
        steps = ok_steps if steps is None else min(steps, ok_steps)
    return {"steps": steps, "of": len(ids) + 1, "mean_us": statistics.fmean(times), "p50_us": pct(times, 50),
            "p99_us": pct(times, 99), "max_us": max(times), "first_us": statistics.median(first),
            "n": len(times), "_masks": masks}


def batch_lockstep(engine, compiled, ids: list[int], width: int, bs: int) -> dict:
    ms = [engine.matcher(compiled) for _ in range(bs)]
    mask = torch.zeros((bs, width), dtype=torch.int32)
    times = []
    for k in range(len(ids) + 1):
        t0 = time.perf_counter_ns()
        engine.batch_fill(ms, mask)
        times.append((time.perf_counter_ns() - t0) / 1e3)
        if k == len(ids) or not all(engine.accept(m, ids[k]) for m in ms):
            break
    return {"steps": len(times), "mean_us": statistics.fmean(times), "p99_us": pct(times, 99),
            "first_us": times[0]}


def batch_mixed(engine, compiled: dict, toks: dict, width: int, bs: int, steps: int, per_row: bool) -> dict:
    """bs slots cycle through the cases; a slot that finished its instance gets a fresh matcher (untimed)."""
    names = [n for n in toks if n in compiled]
    slots = []
    for i in range(bs):
        n = names[i % len(names)]
        slots.append([n, engine.matcher(compiled[n]), (i * 7) % 3])   # small stagger: start at token 0..2
    for s in slots:
        for tok in toks[s[0]][:s[2]]:
            engine.accept(s[1], tok)
    mask = torch.zeros((bs, width), dtype=torch.int32)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        engine.batch_fill([s[1] for s in slots], mask, per_row=per_row)
        times.append((time.perf_counter_ns() - t0) / 1e3)
        for s in slots:
            ids = toks[s[0]]
            if s[2] >= len(ids) or not engine.accept(s[1], ids[s[2]]):
                s[1], s[2] = engine.matcher(compiled[s[0]]), 0
            else:
                s[2] += 1
    return {"steps": steps, "mean_us": statistics.fmean(times), "p50_us": pct(times, 50), "p99_us": pct(times, 99)}


def cpu_snapshot() -> tuple[float, float, float, float]:
    """(machine busy s, machine total s, this process's CPU s, steal s), to tell how busy others were."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return (sum(v) - v[3] - v[4] - v[7]) / hz, sum(v) / hz, t.user + t.system, v[7] / hz


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--corpus-lines", type=int, default=12000, help="lines of generated training text")
    ap.add_argument("--reps", type=int, default=5, help="compilations per case (p50 reported)")
    ap.add_argument("--walk-reps", type=int, default=3, help="walks per case, each with a fresh matcher")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--mixed-steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2, help="threads for the engines' parallel paths")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llg-slices", choices=("general", "json", "none"), default="general",
                    help="llguidance's mask slicer (default: its general_slices())")
    ap.add_argument("--xgr-dynamic", action="store_true",
                    help="xgrammar enable_dynamic_compilation: build mask cache entries on first use, not at compile")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    snap0 = cpu_snapshot()
    t0 = time.perf_counter()
    hf = build_tokenizer(args.vocab_size, args.seed, args.corpus_lines)
    train_s = time.perf_counter() - t0
    n_vocab, eos = hf.get_vocab_size(), hf.token_to_id(EOS)
    width = (n_vocab + 31) // 32
    print(f"tokenizer: byte-level BPE, {n_vocab} tokens, trained in {train_s:.1f} s", flush=True)

    engines = [LLG(hf, args.threads, args.llg_slices), XGR(hf, args.threads, args.xgr_dynamic)]
    llg, xg = engines
    # same vocabulary: every token decodes to the same bytes in both engines
    decoded = xg.info.decoded_vocab
    differ = [i for i in range(n_vocab) if i != eos and llg.tok.decode_bytes([i]) != decoded[i]]
    notes = [f"token {i}: llguidance {llg.tok.decode_bytes([i])!r} xgrammar {decoded[i]!r}" for i in differ]
    print(f"vocabulary check: {n_vocab - 1 - len(differ)} of {n_vocab - 1} non-EOS tokens decode identically"
          + (f"; differ: {notes}" if notes else ""), flush=True)

    result = {"date": time.strftime("%Y-%m-%d"), "machine": {"platform": platform.platform(),
              "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(), "python": platform.python_version()},
              "versions": {p: md.version(p) for p in ("llguidance", "xgrammar", "tokenizers", "torch", "transformers")},
              "args": vars(args), "tokenizer": {"vocab": n_vocab, "train_s": train_s, "vocab_differ": notes},
              "setup_s": {e.name: e.setup_s for e in engines}, "cases": {}, "mixed_batch": {}}

    # warm-up, untimed: the first grammar an engine ever compiles and steps pays one-time costs
    warm = Case("warm", "json", {"type": "object", "properties": {"a": {"type": "string"}}}, '{"a": "b"}')
    for e in engines:
        walk(e, e.compile(warm), hf.encode(warm.valid).ids, eos, width, 1)

    all_cases = cases()
    compiled: dict[str, dict] = {e.name: {} for e in engines}
    toks = {c.name: hf.encode(c.valid).ids for c in all_cases}
    for case in all_cases:
        ids = toks[case.name]
        row = {"kind": case.kind, "tokens": len(ids)}
        for e in engines:
            r: dict = {}
            try:
                ts = []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    g = e.compile(case)
                    ts.append(time.perf_counter() - t)
                compiled[e.name][case.name] = g
                r["compile_ms_p50"] = statistics.median(ts) * 1e3
                r["compile_ms_max"] = max(ts) * 1e3
            except CompileError as exc:
                r["error"] = str(exc)[:400]
                row[e.name] = r
                continue
            g = compiled[e.name][case.name]
            r["walk"] = walk(e, g, ids, eos, width, args.walk_reps)
            r["batch"] = batch_lockstep(e, g, ids, width, args.batch)
            wrong = []
            for text, expect, what in case.probes:
                got, _ = check_text(e, g, hf.encode(text).ids, eos, width)
                if got != expect:
                    wrong.append(f"{what}: {'accepted' if got else 'rejected'} {text[:60]!r}")
            r["probes_ok"], r["probes"], r["probe_failures"] = len(case.probes) - len(wrong), len(case.probes), wrong
            row[e.name] = r
        la, xa = row["llguidance"].get("walk"), row["xgrammar"].get("walk")
        if la and xa:
            same = sum(bool(torch.equal(a, b)) for a, b in zip(la["_masks"], xa["_masks"]))
            row["masks_identical"] = f"{same}/{min(len(la['_masks']), len(xa['_masks']))}"
        for e in engines:
            row[e.name].get("walk", {}).pop("_masks", None)
        result["cases"][case.name] = row
        print(f"  {case.name}: done", flush=True)

    for e in engines:
        result["mixed_batch"][e.name] = {
            "parallel": batch_mixed(e, compiled[e.name], toks, width, args.batch, args.mixed_steps, False),
            "per_row": batch_mixed(e, compiled[e.name], toks, width, args.batch, args.mixed_steps, True)}

    # ------------------------------------------------------------------ table
    def pair(row: dict, f) -> str:
        return " / ".join("FAIL" if "error" in row[e.name] else f(row[e.name]) for e in engines)

    cols = [("tok", None),
            ("compile ms L/X", lambda r: f"{r['compile_ms_p50']:.1f}"),
            ("1st mask us L/X", lambda r: f"{r['walk']['first_us']:.0f}"),
            ("mask mean us L/X", lambda r: f"{r['walk']['mean_us']:.1f}"),
            ("mask p99 us L/X", lambda r: f"{r['walk']['p99_us']:.0f}"),
            ("walk L/X", lambda r: f"{r['walk']['steps']}/{r['walk']['of']}"),
            (f"batch{args.batch} us L/X", lambda r: f"{r['batch']['mean_us']:.0f}"),
            ("probes L/X", lambda r: f"{r['probes_ok']}/{r['probes']}")]
    lines = ["| case | " + " | ".join(c for c, _ in cols) + " | same masks |", "|" + "---|" * (len(cols) + 2)]
    for name, row in result["cases"].items():
        cells = [str(row["tokens"]) if f is None else pair(row, f) for _, f in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row.get('masks_identical', '-')} |")
    print()
    print(f"L = llguidance {result['versions']['llguidance']}, X = xgrammar {result['versions']['xgrammar']}; "
          f"vocab {n_vocab}; tokenizer setup L {llg.setup_s * 1e3:.0f} ms, X {xg.setup_s * 1e3:.0f} ms")
    print("\n".join(lines))
    print()
    for e in engines:
        mb = result["mixed_batch"][e.name]
        print(f"mixed batch of {args.batch}, {args.mixed_steps} steps, {e.name}: parallel API mean "
              f"{mb['parallel']['mean_us']:.0f} us p99 {mb['parallel']['p99_us']:.0f} us; per-row loop mean "
              f"{mb['per_row']['mean_us']:.0f} us p99 {mb['per_row']['p99_us']:.0f} us")
    for name, row in result["cases"].items():
        for e in engines:
            r = row[e.name]
            if "error" in r:
                print(f"compile failure {e.name} {name}: {r['error'][:200]}")
            for w in r.get("probe_failures", []):
                print(f"wrong verdict {e.name} {name}: {w}")
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    snap1 = cpu_snapshot()
    others = max(0.0, (snap1[0] - snap0[0]) - (snap1[2] - snap0[2])) / max(1e-9, snap1[1] - snap0[1])
    steal = (snap1[3] - snap0[3]) / max(1e-9, snap1[1] - snap0[1])
    result["machine"]["others_cpu_share"], result["machine"]["steal_share"] = others, steal
    print(f"other processes used {100 * others:.0f}% of the machine's CPU time during this run"
          f" (hypervisor steal {100 * steal:.0f}%)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
