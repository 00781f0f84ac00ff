"""Byte-level BPE tokenizers trained with the `tokenizers` library, and their files in the layout transformers
writes. The demo model's tokenizer (tools/train_demo_model.py) is trained with train_byte_level_bpe on its own
corpus; build_bpe_tokenizer trains the small one of the tests' random checkpoints and the offline benchmark's
model on the fixed corpus of tools/tokenizer_corpus.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tools.tokenizer_corpus import TOKENIZER_CORPUS

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# Trainer special tokens take the first ids in this order: bos=0, eos=1, pad=2, im_start=3, im_end=4.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

# ChatML. Content may be a string or a list of OpenAI-style parts, of which only text parts render.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# build_bpe_tokenizer's context length as written into tokenizer_config.json.
_MAX_POSITIONS = 2048


def build_bpe_tokenizer(vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the built-in corpus; the same vocab and merges every time."""
    return train_byte_level_bpe(TOKENIZER_CORPUS.split("\n\n"), vocab_size, SPECIAL_TOKENS, BOS_TOKEN)


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str], bos_token: str,
                         split: pre_tokenizers.PreTokenizer | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`: special tokens take the first ids, in order, and `bos_token` is
    prepended when encoding with special tokens (Llama style; nothing is appended).

    Byte-level means any Unicode text encodes (unseen characters fall back to their UTF-8 bytes), and multi-byte
    characters can be split across tokens, which detokenization must handle. If the texts run out of pairs to merge,
    the vocabulary ends up smaller than `vocab_size`. `split` replaces GPT-2's word split, which ByteLevel does
    otherwise.
    """
    tokenizer = Tokenizer(models.BPE())
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A",
        pair=f"{bos_token} $A {bos_token} $B",
        special_tokens=[(bos_token, tokenizer.token_to_id(bos_token))],
    )
    return tokenizer


def chat_eos_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids that end a generation: eos, and <|im_end|>, which closes an assistant turn in ChatML."""
    return [tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(IM_END_TOKEN)]


def write_tokenizer_files(
    tokenizer: Tokenizer,
    out_dir: Path,
    *,
    chat_template: str = CHATML_TEMPLATE,
    model_max_length: int = _MAX_POSITIONS,
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
    bos_token: str = BOS_TOKEN,
    eos_token: str = EOS_TOKEN,
    pad_token: str = PAD_TOKEN,
) -> None:
    """Write tokenizer.json and a tokenizer_config.json (the layout transformers writes) for a byte-level BPE
    tokenizer: this module's (the defaults), or one with other special tokens (the demo model's)."""
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    added_tokens = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok in special_tokens
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added_tokens,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
        "bos_token": bos_token,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "model_max_length": model_max_length,
        "pad_token": pad_token,
        # The generic class keeps tokenizer.json's pre-tokenizer and post-processor as they are.
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(out_dir / "tokenizer_config.json", config)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
