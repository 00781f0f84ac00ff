"""engine.tokenizer against transformers' AutoTokenizer on the same directories: ids, text and prompts must match."""

from __future__ import annotations

import json
import random
import shutil
from datetime import datetime

import pytest
from tokenizer_fixtures import CHATML_TEMPLATE, build_bytelevel_dir, build_metaspace_dir
from tokenizers import Tokenizer as RawTokenizer

from engine.errors import ModelLoadError, ValidationError
from engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "",
    "Hello, world!",
    " leading space and trailing space ",
    "The quick brown fox jumps over the lazy dog.",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01 \u3053\u3093\u306b\u3061\u306f",
    "Emoji \U0001f600\U0001f680 \U0001f44d\U0001f3fd \u2764\ufe0f and \U0001f9ec (unseen)",
    "Tabs\tand  double  spaces   and\n\nnew lines.\n",
    "def add(a, b):\n    return a + b\n",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe; e\u0301 (combining accent)",
    "specials inline: <|im_start|>user\nhi<|im_end|> <s> </s> <unk> <|endoftext|> <tool_call>",
    "I'm sure they'll say we've done it; it's 3.14159 and 12345.",
    "\u0000\u0007 control chars \u200b zero width",
]

CLASSES = {
    "bytelevel": ("Qwen2Tokenizer", "PreTrainedTokenizerFast"),
    "metaspace": ("LlamaTokenizer", "PreTrainedTokenizerFast"),
}
BUILDERS = {"bytelevel": build_bytelevel_dir, "metaspace": build_metaspace_dir}
CASES = [(family, cls) for family, classes in CLASSES.items() for cls in classes]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{c}" for f, c in CASES])
def pair(request, tmp_path_factory):
    """(our Tokenizer, transformers tokenizer) loaded from the same directory."""
    family, cls = request.param
    path = BUILDERS[family](tmp_path_factory.mktemp(family), tokenizer_class=cls)
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def bytelevel_dir(tmp_path_factory):
    return build_bytelevel_dir(tmp_path_factory.mktemp("bytelevel"))


@pytest.fixture(scope="module")
def metaspace_dir(tmp_path_factory):
    return build_metaspace_dir(tmp_path_factory.mktemp("metaspace"))


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, **changes):
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


# ----- encode / decode parity -----


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pair, add_special_tokens):
    ours, ref = pair
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=add_special_tokens) == ref.encode(
            text, add_special_tokens=add_special_tokens
        ), text


def test_decode_matches_transformers(pair):
    ours, ref = pair
    rng = random.Random(0)
    cases = [ours.encode(t) for t in TEXTS]
    cases += [[rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 30))] for _ in range(200)]
    for ids in cases:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids


def test_tokens_and_vocabulary_match_transformers(pair):
    ours, ref = pair
    ids = list(range(ours.vocab_size))
    assert ours.vocab_size == len(ref)
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_id == ref.eos_token_id
    assert ours.pad_token_id == ref.pad_token_id
    assert ours.all_special_ids == {i for i, tok in ref.added_tokens_decoder.items() if tok.special}
    assert ours.special_tokens == ref.special_tokens_map
    assert ours.model_max_length == ref.model_max_length


def test_token_text_is_the_text_a_token_adds_mid_sequence(pair):
    ours, ref = pair
    anchor = ref.encode("the", add_special_tokens=False)[-1]
    for token_id in range(ours.vocab_size):
        # Reference: what transformers' decode adds when the token follows another one.
        expected = ref.decode([anchor, token_id])[len(ref.decode([anchor])):]
        if "\ufffd" not in expected:  # a lone partial byte merges differently with each neighbour
            assert ours.token_text(token_id) == expected, ours.convert_ids_to_tokens([token_id])


def test_eos_token_ids_include_generation_config(bytelevel_dir, metaspace_dir):
    qwen = Tokenizer.from_dir(bytelevel_dir)
    gen = json.loads((bytelevel_dir / "generation_config.json").read_text())
    assert qwen.eos_token_ids == {qwen.eos_token_id, *gen["eos_token_id"]}
    assert len(qwen.eos_token_ids) == 2
    llama = Tokenizer.from_dir(metaspace_dir)
    assert llama.eos_token_ids == {llama.eos_token_id}
    assert llama.bos_token_id is not None and llama.pad_token_id is None


def test_add_bos_token_flag_is_ignored_like_transformers(metaspace_dir, tmp_path):
    # transformers 5 lets tokenizer.json's post-processor alone decide about BOS/EOS.
    path = _copy(metaspace_dir, tmp_path)
    _edit_json(path / "tokenizer_config.json", add_bos_token=False, add_eos_token=True)
    ours, ref = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path))
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text)


def test_special_tokens_missing_from_tokenizer_json_are_added(bytelevel_dir, tmp_path):
    path = _copy(bytelevel_dir, tmp_path)
    _edit_json(path / "tokenizer_config.json", pad_token="<pad>", additional_special_tokens=["<|extra|>"])
    ours, ref = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path))
    text = "a<pad>b<|extra|>c"
    assert ours.encode(text) == ref.encode(text)
    assert ours.vocab_size == len(ref)
    assert ours.pad_token_id == ref.pad_token_id
    assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)


def test_special_tokens_map_is_used_by_old_configs(bytelevel_dir, tmp_path):
    path = _copy(bytelevel_dir, tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    for key in ("eos_token", "pad_token", "bos_token", "unk_token"):
        config.pop(key)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    ours, ref = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path))
    assert ours.eos_token_id == ref.eos_token_id is not None


def test_padding_and_truncation_in_tokenizer_json_are_not_applied(bytelevel_dir, tmp_path):
    path = _copy(bytelevel_dir, tmp_path)
    backend = RawTokenizer.from_file(str(path / "tokenizer.json"))
    backend.enable_padding(pad_token="<|endoftext|>", pad_id=backend.token_to_id("<|endoftext|>"), length=64)
    backend.enable_truncation(max_length=5)
    backend.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["pad_token"]  # then transformers takes the pad token from tokenizer.json's padding
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path))
    assert ours.pad_token_id == ref.pad_token_id == backend.token_to_id("<|endoftext|>")
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text)
    assert len(ours.encode(TEXTS[3])) > 5


def test_model_max_length_sentinel_means_no_limit(bytelevel_dir, tmp_path):
    path = _copy(bytelevel_dir, tmp_path)
    _edit_json(path / "tokenizer_config.json", model_max_length=1000000000000000019884624838656)
    assert Tokenizer.from_dir(path).model_max_length is None


# ----- chat templates -----

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "You are terse. \u4f60\u597d \U0001f600"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And <|im_end|> 3+3?"},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair, add_generation_prompt):
    ours, ref = pair
    for messages in CONVERSATIONS:
        prompt = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert prompt == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        ids = ref.apply_chat_template(messages, tokenize=True, return_dict=False,
                                      add_generation_prompt=add_generation_prompt)
        assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == ids


def test_llama_template_uses_bos_eos_and_raise_exception(metaspace_dir):
    ours = Tokenizer.from_dir(metaspace_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(metaspace_dir))
    prompt = ours.apply_chat_template(CONVERSATIONS[1])
    assert prompt.startswith("<s>[INST] <<SYS>>") and "</s>" in prompt
    assert prompt == ref.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    with pytest.raises(ValidationError, match="Conversation roles must alternate") as err:
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert err.value.param == "messages"


FEATURE_TEMPLATE = (
    "{%- set ns = namespace(count=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.index > 2 %}{% break %}{% endif -%}"
    "{%- set ns.count = ns.count + 1 -%}"
    "{% generation %}[{{ message.role }}] {{ message.content }}{% endgeneration %}\n"
    "{%- endfor -%}"
    "{%- if tools %}TOOLS={{ tools | tojson }}\nINDENTED={{ tools[0] | tojson(indent=2) }}\n{% endif -%}"
    "{%- if enable_thinking is defined %}THINK={{ enable_thinking }}\n{% endif -%}"
    "{%- if messages[-1].reasoning_content is defined %}R={{ messages[-1].reasoning_content }}\n{% endif -%}"
    "count={{ ns.count }} year={{ strftime_now('%Y') }} eos={{ eos_token }}"
    "{%- if add_generation_prompt %}\nGO{% endif %}"
)

TOOLS = [{"type": "function", "function": {"name": "m\u00e9t\u00e9o", "description": "Wetter \u2600\ufe0f",
                                             "parameters": {"type": "object", "properties": {}}}}]


def test_template_features_match_transformers(bytelevel_dir):
    ours = Tokenizer.from_dir(bytelevel_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(bytelevel_dir))
    messages = [
        {"role": "user", "content": "caf\u00e9"},
        {"role": "assistant", "content": "ok", "reasoning": "thought"},
        {"role": "user", "content": "more"},
    ]
    kwargs = dict(chat_template=FEATURE_TEMPLATE, tools=TOOLS, enable_thinking=False)
    prompt = ours.apply_chat_template(messages, **kwargs)
    assert prompt == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    assert "m\u00e9t\u00e9o" in prompt and f"year={datetime.now().year}" in prompt
    # The reasoning alias reaches the template only through the last message; check it for that case too.
    tail = messages[:2]
    assert ours.apply_chat_template(tail, **kwargs) == ref.apply_chat_template(
        tail, tokenize=False, add_generation_prompt=True, **kwargs
    )


def test_content_parts_are_joined_with_newlines(bytelevel_dir):
    ours = Tokenizer.from_dir(bytelevel_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(bytelevel_dir))
    parts = [{"role": "user", "content": [{"type": "text", "text": "line one"}, {"type": "text", "text": "two"}]}]
    joined = [{"role": "user", "content": "line one\ntwo"}]
    expected = ref.apply_chat_template(joined, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(parts) == expected


def test_assistant_tool_call_without_content(bytelevel_dir):
    ours = Tokenizer.from_dir(bytelevel_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(bytelevel_dir))
    template = (
        "{% for m in messages %}{{ m.role }}:{% if m.content is defined %}{{ m.content }}{% endif %}"
        "{% for c in m.tool_calls or [] %}<call>{{ c.function | tojson }}</call>{% endfor %}\n{% endfor %}"
    )
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "1"},
    ]
    prompt = ours.apply_chat_template(messages, chat_template=template)
    assert prompt == ref.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    assert "assistant:<call>" in prompt


def test_chat_template_jinja_file_wins_over_config(bytelevel_dir, tmp_path):
    path = _copy(bytelevel_dir, tmp_path)
    (path / "chat_template.jinja").write_text("FILE:{% for m in messages %}{{ m.content }}{% endfor %}")
    ours, ref = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path))
    assert ours.chat_template == ref.chat_template
    assert ours.apply_chat_template(CONVERSATIONS[0]) == "FILE:Hi there"


def test_named_templates_and_tool_use_selection(bytelevel_dir, tmp_path):
    path = _copy(bytelevel_dir, tmp_path)
    _edit_json(path / "tokenizer_config.json", chat_template=[
        {"name": "default", "template": CHATML_TEMPLATE},
        {"name": "tool_use", "template": "TOOLS {{ tools | length }}: {{ messages[0].content }}"},
    ])
    ours, ref = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path))
    for tools in (None, TOOLS):
        assert ours.apply_chat_template(CONVERSATIONS[0], tools=tools) == ref.apply_chat_template(
            CONVERSATIONS[0], tools=tools, tokenize=False, add_generation_prompt=True
        )
    assert ours.chat_template == CHATML_TEMPLATE
    assert ours.apply_chat_template(CONVERSATIONS[0], chat_template="tool_use", tools=[]) == "TOOLS 0: Hi there"

    templates_dir = path / "chat_templates"
    templates_dir.mkdir()
    (templates_dir / "tool_use.jinja").write_text("FROM FILE {{ messages | length }}")
    assert Tokenizer.from_dir(path).apply_chat_template(CONVERSATIONS[1], tools=TOOLS) == "FROM FILE 4"


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"content": "x"}], r"messages\[0\].role must be one of"),
        ([{"role": "robot", "content": "x"}], "'robot'"),
        ([{"role": "user"}], r"messages\[0\].content is required"),
        ([{"role": "user", "content": None}], "content is required"),
        ([{"role": "assistant", "content": None}], "content is required"),
        ([{"role": "user", "content": 5}], "string or a list of text parts"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "'image_url'"),
        ([{"role": "user", "content": [{"type": "text"}]}], "without a string 'text'"),
        ([{"role": "user", "content": ["text"]}], "content part object"),
        ([{"role": "assistant", "content": "x", "tool_calls": "nope"}], "tool_calls must be a list"),
    ],
)
def test_bad_messages_raise_validation_error(bytelevel_dir, messages, match):
    ours = Tokenizer.from_dir(bytelevel_dir)
    with pytest.raises(ValidationError, match=match) as err:
        ours.apply_chat_template(messages)
    assert err.value.param == "messages"


def test_messages_are_not_modified(bytelevel_dir):
    ours = Tokenizer.from_dir(bytelevel_dir)
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}], "name": None}]
    snapshot = json.dumps(messages)
    ours.apply_chat_template(messages)
    assert json.dumps(messages) == snapshot


@pytest.mark.parametrize(
    ("template", "param"),
    [
        ("{% for m in messages %}{{ m.content }", "chat_template"),  # syntax error
        ("{{ messages[0].content + 1 }}", "messages"),  # TypeError inside the template
        ("{{ messages.__class__.__mro__ }}", "messages"),  # sandbox: no dunder access
        ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "messages"),
        ("{{ messages.append(1) }}", "messages"),  # immutable sandbox
        ("{{ undefined_thing.attr }}", "messages"),
    ],
)
def test_broken_or_unsafe_templates_raise_validation_error(bytelevel_dir, template, param):
    ours = Tokenizer.from_dir(bytelevel_dir)
    with pytest.raises(ValidationError) as err:
        ours.apply_chat_template(CONVERSATIONS[0], chat_template=template)
    assert err.value.param == param


def test_bad_tools_raise_validation_error(bytelevel_dir):
    with pytest.raises(ValidationError) as err:
        Tokenizer.from_dir(bytelevel_dir).apply_chat_template(CONVERSATIONS[0], tools="search")
    assert err.value.param == "tools"


def test_no_chat_template(bytelevel_dir, tmp_path):
    path = _copy(bytelevel_dir, tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_dir(path)
    assert ours.chat_template is None
    with pytest.raises(ValidationError, match="no chat template"):
        ours.apply_chat_template(CONVERSATIONS[0])


# ----- loading errors -----


def test_missing_tokenizer_json(bytelevel_dir, tmp_path):
    path = _copy(bytelevel_dir, tmp_path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json.*fast tokenizer\.json is required"):
        Tokenizer.from_dir(path)


@pytest.mark.parametrize(
    "name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"]
)
def test_corrupt_json_names_the_file(bytelevel_dir, tmp_path, name):
    path = _copy(bytelevel_dir, tmp_path)
    if name == "special_tokens_map.json":  # read only by configs without added_tokens_decoder, like this one
        assert "added_tokens_decoder" not in json.loads((path / "tokenizer_config.json").read_text())
    (path / name).write_text('{"truncated": ')
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        Tokenizer.from_dir(path)


def test_bad_generation_config_eos(bytelevel_dir, tmp_path):
    path = _copy(bytelevel_dir, tmp_path)
    _edit_json(path / "generation_config.json", eos_token_id="</s>")
    with pytest.raises(ModelLoadError, match="generation_config.json"):
        Tokenizer.from_dir(path)


def test_optional_files_may_be_missing(bytelevel_dir, tmp_path):
    path = _copy(bytelevel_dir, tmp_path)
    (path / "tokenizer_config.json").unlink()
    (path / "generation_config.json").unlink()
    ours, ref = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path))
    assert ours.eos_token_ids == frozenset() and ours.chat_template is None
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text)
