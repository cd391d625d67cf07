"""runtime.tokenizer against transformers' tokenizer for the same folder, as the oracle.

Folders: the real Gemma-3-270M (byte-fallback SentencePiece BPE), and small tokenizers trained
here: byte-level BPEs dressed as Llama 3 and Qwen (ChatML), and a Llama-2-style byte-fallback
BPE whose decoder strips the first space (the hard case for streaming).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from runtime.tokenizer import StreamDecoder, Tokenizer, TokenizerError
from tests.fixtures.templates import GEMMA3_TEMPLATE

# The official Gemma-3 instruction template (the GGUF-derived folder ships none).

# Llama-3.1-style: strftime_now, tools through tojson(indent=4), {% generation %}, {% break %}.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions:\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] == 'stop' %}{% break %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['role'] == 'assistant' %}
        {% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# The original Llama-3-8B-Instruct template, shipped as chat_template.jinja beside LLAMA3_TEMPLATE.
LLAMA3_JINJA_FILE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# ChatML without whitespace control, so trim_blocks/lstrip_blocks decide the output; plus
# Qwen3's reasoning and `enable_thinking`.
QWEN_TEMPLATE = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}{% if message.name is defined %} ({{ message.name }}){% endif %}

    {% if message.reasoning_content %}
<think>
{{ message.reasoning_content }}
</think>

    {% endif %}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
    {% if enable_thinking is defined and not enable_thinking %}
<think>

</think>

    {% endif %}
{% endif %}
"""

# Qwen2.5's template, which the tokenizer picks as "tool_use" when tools are given.
QWEN_TOOL_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA2_SPECIALS = ["<unk>", "<s>", "</s>"]

# Llama 3's pre-tokenizer split.
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# CJK and emoji outside this corpus stay split into bytes, one or more per token.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I'm fine, thanks.",
    "Streaming text should never show half a character.",
    "你好，世界。 Tokenizers split text into pieces.",
    "def main():\n    print('hello')\n    return 0\n",
    "Numbers like 12345 and 3.14159 appear too.",
] * 20

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,   runs of spaces\tand\ttabs  ",
    "line one\nline two\n\n\nafter blank lines\r\n",
    "日本語のテキストと中文字符，你好世界",
    "emoji 😀👍🏽 flags 🇯🇵🇫🇷 family 👨‍👩‍👧 and ∑∫√ symbols",
    "mixed: naïve café — “quotes” ½ 🎉 end",
    "rare: 🪿 goose, 🦩 flamingo, ꙮ, 𝔘, 𐍈 and 𠀀",  # byte fallback even in Gemma's vocabulary
    "",
    " ",
    "\n",
]

SPECIAL_TEXTS = {
    "gemma": "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n<bos>x<eos> [multimodal]",
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|begin_of_text|>",
    "qwen": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
    "llama2": "<s>[INST] Hi [/INST] ok</s><unk>",
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city; returns <json> with temperature in °C — 東京 works too.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name"}},
                "required": ["city"],
            },
        },
    }
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse.\n"},
        {"role": "user", "content": "  What is 2+2?  "},
    ],
    [
        {"role": "system", "content": "Answer in Japanese when asked."},
        {"role": "user", "content": "Say hi in Japanese."},
        {"role": "assistant", "content": "こんにちは 👋"},
        {"role": "user", "content": 'Now <b>bold</b> & "quoted":\n\n- a\n- b'},
    ],
    [
        {"role": "user", "content": "First"},
        {"role": "assistant", "content": "Second\n"},
        {"role": "user", "content": "Third"},
        {"role": "assistant", "content": "Fourth"},
        {"role": "user", "content": "Fifth 🎉"},
    ],
]

QWEN_CONVERSATIONS = [
    *CONVERSATIONS,
    [
        {"role": "user", "content": "Think first."},
        {"role": "assistant", "content": "Done.", "reasoning": "2 + 2 = 4, so…"},
        {"role": "user", "content": "Again.", "name": None},  # None keys are dropped
        {"role": "assistant", "content": "Agreed.", "name": "Bob"},
    ],
]

TOOL_CONVERSATION = [
    {"role": "system", "content": "Use tools when needed."},
    {"role": "user", "content": "Weather in 東京?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "東京 <Tokyo>"}},
            }
        ],
    },
    {"role": "tool", "content": '{"temperature": 21, "unit": "°C"}'},
]

EXACT_NO_TOKENIZER = "{} has no tokenizer.json; point at a Hugging Face model folder that includes its tokenizer files."
EXACT_NO_TEMPLATE = "The model in {} has no chat template; send plain text prompts, or add a chat_template to its tokenizer_config.json."
EXACT_NO_DEFAULT = "The model in {} has chat templates named ['a', 'b'] but none named 'default'; rename the one to use to 'default'."
EXACT_TEMPLATE_RAISED = "The chat template of {} failed: Conversation roles must alternate user/assistant/user/assistant/..."
EXACT_EMPTY = "The conversation is empty; pass at least one message."


Pair = tuple[Tokenizer, PreTrainedTokenizerBase]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


def _byte_level_bpe(specials: list[str]) -> Backend:
    """A Llama-3/Qwen-style byte-level BPE trained on CORPUS."""
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _llama2_bpe() -> Backend:
    """A Llama-2-style byte-fallback BPE: "▁" for spaces, <0xNN> byte tokens, and a decoder
    that strips the first space."""
    tok = Backend(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=LLAMA2_SPECIALS, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    data["model"].update(byte_fallback=True, fuse_unk=True, unk_token="<unk>")
    tok = Backend.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def _with_padding(tok: Backend) -> Backend:
    """Padding and truncation saved in tokenizer.json, which transformers switches off."""
    tok.enable_padding(pad_id=0, pad_token="<|endoftext|>", length=48)
    tok.enable_truncation(max_length=12)
    return tok


def _save(folder: Path, backend: Backend, config: dict, generation: dict) -> Path:
    folder.mkdir(parents=True)
    backend.save(str(folder / "tokenizer.json"))
    _write_json(
        folder / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    )
    _write_json(folder / "generation_config.json", generation)
    return folder


@pytest.fixture(scope="session")
def small_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    llama3 = _byte_level_bpe(LLAMA3_SPECIALS)
    llama3.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 0)],
    )
    llama3_config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_TEMPLATE,
    }
    dirs = {
        "llama3": _save(
            root / "llama3", llama3, llama3_config, {"bos_token_id": 0, "eos_token_id": [1, 4]}
        ),
        "qwen": _save(
            root / "qwen",
            _with_padding(_byte_level_bpe(QWEN_SPECIALS)),
            {
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": [
                    {"name": "default", "template": QWEN_TEMPLATE},
                    {"name": "tool_use", "template": QWEN_TOOL_TEMPLATE},
                ],
            },
            {"bos_token_id": 0, "eos_token_id": [2, 0], "pad_token_id": 0},
        ),
        "llama2": _save(
            root / "llama2",
            _llama2_bpe(),
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
            {"bos_token_id": 1, "eos_token_id": 2},
        ),
    }
    # transformers 5 writes the template to chat_template.jinja, which wins over the config's.
    dirs["llama3_jinja"] = root / "llama3_jinja"
    shutil.copytree(dirs["llama3"], dirs["llama3_jinja"])
    (dirs["llama3_jinja"] / "chat_template.jinja").write_text(LLAMA3_JINJA_FILE)
    return dirs


@pytest.fixture(scope="session")
def gemma_chat_dir(gemma3_270m_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Gemma-3-270M tokenizer with the official chat template in its config."""
    folder = tmp_path_factory.mktemp("gemma_chat")
    for name in ("tokenizer.json", "special_tokens_map.json", "generation_config.json"):
        if (gemma3_270m_dir / name).exists():
            (folder / name).symlink_to(gemma3_270m_dir / name)
    config = json.loads((gemma3_270m_dir / "tokenizer_config.json").read_text())
    config.setdefault("chat_template", GEMMA3_TEMPLATE)
    _write_json(folder / "tokenizer_config.json", config)
    return folder


@pytest.fixture(scope="session")
def load_pair() -> Callable[[Path], Pair]:
    """`load_pair(folder)`: ours and transformers' tokenizer for a folder, loaded once each."""
    pairs: dict[Path, Pair] = {}

    def load(folder: Path) -> Pair:
        if folder not in pairs:
            pairs[folder] = (Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder))
        return pairs[folder]

    return load


@pytest.fixture
def folder_of(request: pytest.FixtureRequest, small_dirs: dict[str, Path]) -> Callable[[str], Path]:
    """`folder_of("qwen")`; "gemma" and "gemma_chat" pull in the real model only when asked."""

    def folder(kind: str) -> Path:
        if kind == "gemma":
            return request.getfixturevalue("gemma3_270m_dir")
        if kind == "gemma_chat":
            return request.getfixturevalue("gemma_chat_dir")
        return small_dirs[kind]

    return folder


TOKENIZERS = ["gemma", "llama3", "qwen", "llama2"]


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_encode_matches_transformers(kind: str, folder_of, load_pair) -> None:
    ours, theirs = load_pair(folder_of(kind))
    for text in [*TEXTS, SPECIAL_TEXTS[kind]]:
        for add in (True, False):
            assert ours.encode(text, add) == theirs.encode(text, add_special_tokens=add), (
                text,
                add,
            )


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_decode_matches_transformers(kind: str, folder_of, load_pair) -> None:
    ours, theirs = load_pair(folder_of(kind))
    for text in [*TEXTS, SPECIAL_TEXTS[kind]]:
        ids = theirs.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip), text
        assert ours.decode(ids) == ours.decode(ids, skip_special_tokens=True)  # skips by default


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_special_ids_match_transformers(kind: str, folder_of, load_pair) -> None:
    folder = folder_of(kind)
    ours, theirs = load_pair(folder)
    generation = GenerationConfig.from_pretrained(folder)
    gen_eos = generation.eos_token_id
    gen_eos = set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
    assert ours.eos_ids == gen_eos | {theirs.eos_token_id}
    expected_bos = (
        theirs.bos_token_id if theirs.bos_token_id is not None else generation.bos_token_id
    )
    assert ours.bos_id == expected_bos
    expected_pad = (
        theirs.pad_token_id if theirs.pad_token_id is not None else generation.pad_token_id
    )
    assert ours.pad_id == expected_pad
    assert ours.vocab_size == len(theirs)
    assert ours.special_ids == {i for i, t in theirs.added_tokens_decoder.items() if t.special}


def test_gemma_special_ids(gemma3_270m_dir: Path, load_pair) -> None:
    tok, _ = load_pair(gemma3_270m_dir)
    assert (tok.bos_id, tok.pad_id, tok.vocab_size) == (2, 0, 262144)
    assert 1 in tok.eos_ids
    assert tok.encode("<start_of_turn>", add_special_tokens=False) == [105]


def test_special_ids_without_generation_config_come_from_config_json(
    small_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """As transformers' generate falls back: the outer config's ids, then text_config's."""
    folder = tmp_path / "llama3"
    shutil.copytree(small_dirs["llama3"], folder)
    (folder / "generation_config.json").unlink()
    config = {"bos_token_id": 0, "text_config": {"eos_token_id": [1, 2], "pad_token_id": 3}}
    _write_json(folder / "config.json", config)
    generation = GenerationConfig.from_model_config(config)
    ours = Tokenizer.from_dir(folder)
    theirs = AutoTokenizer.from_pretrained(folder)
    assert ours.eos_ids == {*generation.eos_token_id, theirs.eos_token_id} == {1, 2, 4}
    assert (ours.bos_id, ours.pad_id) == (theirs.bos_token_id, generation.pad_token_id) == (0, 3)


def _assert_renders_like_transformers(folder: Path, load_pair, conversations, **extra) -> None:
    ours, theirs = load_pair(folder)
    for messages in conversations:
        for prompt in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=prompt, **extra)
            expected = theirs.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt, **extra
            )
            assert text == expected, (messages, prompt)
            ids = theirs.apply_chat_template(
                messages, add_generation_prompt=prompt, return_dict=False, **extra
            )
            assert ours.encode_chat(messages, add_generation_prompt=prompt, **extra) == ids


@pytest.mark.parametrize("kind", ["gemma_chat", "llama3", "llama3_jinja"])
def test_chat_template_matches_transformers(kind: str, folder_of, load_pair) -> None:
    _assert_renders_like_transformers(folder_of(kind), load_pair, CONVERSATIONS)


def test_gemma_chat_template_text(gemma_chat_dir: Path, load_pair) -> None:
    text = load_pair(gemma_chat_dir)[0].apply_chat_template(CONVERSATIONS[1])
    assert text == (
        "<bos><start_of_turn>user\nYou are terse.\n\n\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_chat_template_jinja_file_wins(small_dirs: dict[str, Path]) -> None:
    messages = CONVERSATIONS[0]
    plain = Tokenizer.from_dir(small_dirs["llama3"]).apply_chat_template(messages)
    from_file = Tokenizer.from_dir(small_dirs["llama3_jinja"]).apply_chat_template(messages)
    assert "Today Date" in plain
    assert from_file == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_qwen_chat_template_matches_transformers(small_dirs: dict[str, Path], load_pair) -> None:
    folder = small_dirs["qwen"]
    _assert_renders_like_transformers(folder, load_pair, QWEN_CONVERSATIONS)
    _assert_renders_like_transformers(folder, load_pair, QWEN_CONVERSATIONS, enable_thinking=False)
    # Tools select the "tool_use" template; tojson keeps non-ASCII and "<" as they are.
    _assert_renders_like_transformers(folder, load_pair, [TOOL_CONVERSATION], tools=TOOLS)
    text = Tokenizer.from_dir(folder).apply_chat_template(TOOL_CONVERSATION, tools=TOOLS)
    assert '"arguments": {"city": "東京 <Tokyo>"}' in text


def test_llama3_tools_and_special_token_override(small_dirs: dict[str, Path], load_pair) -> None:
    folder = small_dirs["llama3"]
    _assert_renders_like_transformers(folder, load_pair, CONVERSATIONS[:2], tools=TOOLS)
    _assert_renders_like_transformers(folder, load_pair, CONVERSATIONS[:1], bos_token="[BOS]")
    stop = [*CONVERSATIONS[2], {"role": "stop", "content": ""}, {"role": "user", "content": "x"}]
    _assert_renders_like_transformers(folder, load_pair, [stop])


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_dir(tmp_path)
    assert str(err.value) == EXACT_NO_TOKENIZER.format(tmp_path)


def test_a_file_instead_of_the_folder(tmp_path: Path) -> None:
    """Before: "<folder>/tokenizer.json has no tokenizer.json"."""
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_dir(str(tmp_path / "tokenizer.json"))
    assert str(err.value) == (
        f"{tmp_path / 'tokenizer.json'} is a file; point at the Hugging Face model folder that "
        "holds tokenizer.json."
    )


def test_no_chat_template(small_dirs: dict[str, Path]) -> None:
    folder = small_dirs["llama2"]
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_dir(folder).encode_chat(CONVERSATIONS[0])
    assert str(err.value) == EXACT_NO_TEMPLATE.format(folder)


def test_gemma_folder_without_template(gemma3_270m_dir: Path, load_pair) -> None:
    config = json.loads((gemma3_270m_dir / "tokenizer_config.json").read_text())
    if "chat_template" in config:
        pytest.skip("this GGUF carries a chat template")
    with pytest.raises(TokenizerError) as err:
        load_pair(gemma3_270m_dir)[0].apply_chat_template(CONVERSATIONS[0])
    assert str(err.value) == EXACT_NO_TEMPLATE.format(gemma3_270m_dir)


def test_named_templates_without_default(small_dirs: dict[str, Path], tmp_path: Path) -> None:
    shutil.copy(small_dirs["qwen"] / "tokenizer.json", tmp_path)
    templates = [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]
    _write_json(tmp_path / "tokenizer_config.json", {"chat_template": templates})
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_dir(tmp_path).apply_chat_template(CONVERSATIONS[0])
    assert str(err.value) == EXACT_NO_DEFAULT.format(tmp_path)


def test_template_exception_and_empty_conversation(gemma_chat_dir: Path, load_pair) -> None:
    tok, _ = load_pair(gemma_chat_dir)
    with pytest.raises(TokenizerError) as err:
        tok.apply_chat_template([{"role": "assistant", "content": "I speak first"}])
    assert str(err.value) == EXACT_TEMPLATE_RAISED.format(gemma_chat_dir)
    with pytest.raises(TokenizerError) as err:
        tok.apply_chat_template([])
    assert str(err.value) == EXACT_EMPTY


def _stream(tok: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    stream = StreamDecoder(tok, skip_special_tokens=skip)
    return [stream.push(i) for i in ids] + [stream.flush()]


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_stream_decoder(kind: str, folder_of, load_pair) -> None:
    tok, _ = load_pair(folder_of(kind))
    split_chars = 0
    for text in [*TEXTS, SPECIAL_TEXTS[kind], SPECIAL_TEXTS[kind] + TEXTS[5] + SPECIAL_TEXTS[kind]]:
        ids = tok.encode(text)
        split_chars += sum("\ufffd" in tok.decode([i]) for i in ids)
        for skip in (True, False):
            deltas = _stream(tok, ids, skip)
            full = tok.decode(ids, skip_special_tokens=skip)
            assert "".join(deltas) == full, (text, deltas)
            if "\ufffd" not in full:
                assert not any("\ufffd" in d for d in deltas), deltas
    assert split_chars > 0  # some characters did arrive split over several tokens


def test_stream_decoder_emits_as_soon_as_complete(small_dirs: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(small_dirs["llama2"])
    ids = tok.encode("a 😀 b", add_special_tokens=False)
    deltas = _stream(tok, ids, skip=True)
    assert "😀" in deltas[ids.index(tok.hf.token_to_id("<0x80>"))]  # the emoji's last byte
    assert deltas[0] == "a"  # the first space is stripped, as decode does
    assert "".join(deltas) == "a 😀 b"


def test_stream_decoder_keeps_space_after_skipped_special(small_dirs: dict[str, Path]) -> None:
    """A decoder that strips the first space must not strip the one after a skipped <s>."""
    tok = Tokenizer.from_dir(small_dirs["llama2"])
    ids = tok.encode("one") + tok.encode("two", add_special_tokens=True)
    assert "".join(_stream(tok, ids, skip=True)) == tok.decode(ids) == "one two"


def test_special_token_variables(small_dirs: dict[str, Path], tmp_path: Path, load_pair) -> None:
    """Every `*_token` reaches templates; special_tokens_map.json overrides an old-style config."""
    shutil.copy(small_dirs["qwen"] / "tokenizer.json", tmp_path)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "boi_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": True},
        "extra_special_tokens": {"image_token": "<|endoftext|>"},
        "chat_template": "{{ bos_token }}|{{ eos_token }}|{{ boi_token }}|{{ image_token }}",
    }
    _write_json(tmp_path / "tokenizer_config.json", config)
    _write_json(tmp_path / "special_tokens_map.json", {"eos_token": {"content": "<|endoftext|>"}})
    _assert_renders_like_transformers(tmp_path, load_pair, CONVERSATIONS[:1])
    ours, theirs = load_pair(tmp_path)
    assert ours.apply_chat_template(CONVERSATIONS[0]) == "|<|endoftext|>|<|im_start|>|<|endoftext|>"
    assert ours.eos_ids == {theirs.eos_token_id} == {0}


def test_encode_and_decode_refuse_what_is_not_text_or_ids(small_dirs: dict[str, Path]) -> None:
    """Before: tokenizers' "TextInputSequence must be str", "invalid literal for int() with base
    10: 'a'", "'int' object is not iterable", "number too small to fit in target type"; and
    decode([1.5]) was the text of id 1."""
    tok = Tokenizer.from_dir(small_dirs["llama3"])
    last = tok.vocab_size - 1
    ids = f"Tokenizer.decode takes a list of token ids (ints from 0 to {last})"
    cases = [
        (lambda: tok.encode(5), "Tokenizer.encode takes the text as a str, not int (5)."),
        (
            lambda: tok.encode(None),
            "Tokenizer.encode takes the text as a str, not NoneType (None).",
        ),
        (lambda: tok.decode("abc"), f"{ids}, not str ('abc')."),
        (lambda: tok.decode(7), f"{ids}, not int (7)."),
        (lambda: tok.decode([1.5]), f"{ids}; item 0 is float (1.5)."),
        (lambda: tok.decode([5, "a"]), f"{ids}; item 1 is str ('a')."),
        (lambda: tok.decode((5, -1)), f"{ids}; item 1 is int (-1)."),
    ]
    for call, message in cases:
        with pytest.raises(TokenizerError) as err:
            call()
        assert str(err.value) == message
    assert tok.decode((5, 6)) == tok.decode(iter([5, 6])) == tok.decode([5, 6])
