"""Small tokenizer directories, built with the `tokenizers` library, in the shapes Hugging Face models ship.

Two families cover the decoders LLMs use:
- byte-level BPE laid out like Qwen2 (NFC, regex split, ByteLevel bytes-to-unicode, ByteLevel decoder), with ChatML
  special tokens and a ChatML chat template;
- SentencePiece-style BPE laid out like Llama 2 (Metaspace `▁`, `<0xNN>` byte-fallback tokens, a decoder that strips
  the leading space), with `<s>` prepended by the post-processor.
Both are trained on a small multilingual corpus so that CJK and emoji text ends up split across byte tokens.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A Llama-2-chat-like template: uses bos_token/eos_token, raise_exception and whitespace control.
LLAMA_TEMPLATE = """{% if messages[0]['role'] == 'system' %}
    {% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}
    {% set messages = messages[1:] %}
{% else %}
    {% set system = '' %}
{% endif %}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{- bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' -}}
    {% else %}
        {{- ' ' + message['content'] | trim + ' ' + eos_token -}}
    {% endif %}
{% endfor %}"""

QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today?",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 appear in text.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u4eca\u5929\u5929\u6c14\u5f88\u597d\u3002",
    "\u3053\u3093\u306b\u3061\u306f\u4e16\u754c",
    "Emoji: \U0001f600 \U0001f680 \U0001f44d\U0001f3fd and \u2764\ufe0f",
    "Tabs\tand  double  spaces   and\n\nnew lines.",
    "I'm sure they'll say we've done it; it's fine.",
]


def _corpus() -> list[str]:
    # Repetition makes common words whole tokens; rotation varies the contexts the merges see.
    lines = []
    for i in range(40):
        for j, sentence in enumerate(_SENTENCES):
            lines.append(sentence if (i + j) % 3 else sentence.lower())
    return lines


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def build_bytelevel_dir(path: Path, *, tokenizer_class: str = "Qwen2Tokenizer") -> Path:
    """Qwen2-style byte-level BPE with ChatML tokens, a chat template and a two-id eos in generation_config."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # A non-special added token: decoded even with skip_special_tokens=True.
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    _write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": tokenizer_class,
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "model_max_length": 32768,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHATML_TEMPLATE,
        },
    )
    _write_json(
        path / "generation_config.json",
        {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]},
    )
    return path


def build_metaspace_dir(path: Path, *, tokenizer_class: str = "LlamaTokenizer") -> Path:
    """Llama-2-style BPE: `▁` word prefix, `<0xNN>` byte fallback, `<s>` from the post-processor."""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Trained on split words (pieces never span a `▁`, as in SentencePiece) with a small alphabet, so that rare
    # characters (CJK, emoji) can only be spelled with byte tokens.
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    # The trainer breaks ties between equally frequent characters in hash order, which differs between
    # processes; choosing the alphabet here (by count, then by character) keeps the vocabulary stable.
    counts = Counter(ch for text in _corpus() for ch in text.replace(" ", "\u2581"))
    alphabet = sorted(counts, key=lambda ch: (-counts[ch], ch))[:45]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet,
        limit_alphabet=len(alphabet), show_progress=False,
    )
    trainer_tok.train_from_iterator(_corpus(), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]

    # Llama numbers the byte tokens 3..258, right after the three specials; every learned piece follows.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in trained["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    _write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": tokenizer_class,
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                          "rstrip": False, "single_word": False},
            "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                          "rstrip": False, "single_word": False},
            "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "normalized": False,
                          "rstrip": False, "single_word": False},
            "pad_token": None,
            "legacy": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 4096,
            "chat_template": LLAMA_TEMPLATE,
        },
    )
    _write_json(path / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    return path
