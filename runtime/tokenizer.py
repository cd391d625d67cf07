"""Tokenizer, chat templates and streaming detokenization, read from a Hugging Face model folder.

It gives the same ids, text and prompts as transformers' tokenizer for the same folder without
importing transformers: `tokenizer.json` runs on the `tokenizers` library, and chat templates
render on jinja2 set up as transformers' `chat_template_utils` sets it up.

    tok = Tokenizer.from_dir("path/to/model")
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    stream = StreamDecoder(tok)
    text = "".join(stream.push(t) for t in generated) + stream.flush()
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer  # wrapped by Tokenizer below

# The names under which transformers hands a message's reasoning to templates.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TokenizerError(ValueError):
    """A model folder whose tokenizer files cannot serve a request; the message says how to fix it."""


class Tokenizer:
    """A model's tokenizer: ids, special-token ids and chat templates from its folder.

    Attributes: `bos_id` and `pad_id` (or None), `eos_ids` (every id that ends generation),
    `special_ids` (ids that decoding skips), `vocab_size` (ids it can produce, added tokens
    included), `special_tokens` (`{"bos_token": "<bos>", ...}`, the template variables) and
    `chat_templates` (`{"default": ..., "tool_use": ...}`).
    """

    def __init__(
        self,
        hf: HFTokenizer,
        special_tokens: Mapping[str, str],
        chat_templates: Mapping[str, str],
        generation_config: Mapping[str, Any],
        source: str,
    ):
        # transformers turns padding and truncation off unless a call asks for them.
        hf.no_padding()
        hf.no_truncation()
        self.hf = hf
        self.special_tokens = dict(special_tokens)
        self.chat_templates = dict(chat_templates)
        self.source = source
        gen = generation_config
        self.bos_id = self._token_id("bos_token", gen.get("bos_token_id"))
        self.pad_id = self._token_id("pad_token", gen.get("pad_token_id"))
        self.eos_ids = frozenset(
            _id_list(gen.get("eos_token_id")) + _id_list(self._token_id("eos_token"))
        )
        added = hf.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, token in added.items() if token.special)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json, chat template files and generation_config.json
        (or, without it, config.json's token ids)."""
        folder = Path(path)
        if folder.is_file():  # else "tokenizer.json has no tokenizer.json"
            raise TokenizerError(
                f"{folder} is a file; point at the Hugging Face model folder that holds "
                "tokenizer.json."
            )
        if not (folder / "tokenizer.json").is_file():
            raise TokenizerError(
                f"{folder} has no tokenizer.json; point at a Hugging Face model folder that "
                "includes its tokenizer files."
            )
        config = _read_json(folder / "tokenizer_config.json")
        try:
            hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for any unreadable file
            raise TokenizerError(
                f"{folder / 'tokenizer.json'} cannot be read ({e}); re-download the model's "
                "tokenizer files."
            ) from None
        return cls(
            hf,
            _special_tokens(config, _read_json(folder / "special_tokens_map.json")),
            _chat_templates(folder, config),
            _generation_config(folder),
            source=str(folder),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what tokenizer.json's post-processor adds.

        `add_bos_token` in tokenizer_config.json plays no part: transformers 5 ignores it too
        when tokenizer.json exists.
        """
        if not isinstance(text, str):  # tokenizers says "TextInputSequence must be str"
            raise TokenizerError(f"Tokenizer.encode takes the text as a str, not {_shown(text)}.")
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, a list (or any iterable) of ints; `tokenizers` checks each id natively."""
        seq = None
        try:
            seq = ids if isinstance(ids, list) else list(ids)
            return self.hf.decode(seq, skip_special_tokens=skip_special_tokens)
        except (TypeError, OverflowError):  # "invalid literal for int()", "Can't extract `str`"
            raise TokenizerError(self._not_ids(ids, seq)) from None

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """The prompt for `messages`, as transformers' `apply_chat_template(..., tokenize=False)`.

        `extra` become template variables (`tools`, `documents`, `enable_thinking`, ...) and win
        over special tokens of the same name, as in transformers.
        """
        if not messages:
            raise TokenizerError("The conversation is empty; pass at least one message.")
        variables = {"tools": None, "documents": None, **self.special_tokens, **extra}
        try:
            template = _compile(self._chat_template(tools=variables["tools"] is not None))
            return template.render(
                messages=_template_messages(messages),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"The chat template of {self.source} failed: {e}") from e

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> list[int]:
        """Ids of the rendered chat; no special tokens are added, as the template writes its own."""
        text = self.apply_chat_template(messages, add_generation_prompt, **extra)
        return self.encode(text, add_special_tokens=False)

    def _chat_template(self, tools: bool) -> str:
        """The template transformers picks: "tool_use" when tools are given and it exists, else "default"."""
        templates = self.chat_templates
        if not templates:
            raise TokenizerError(
                f"The model in {self.source} has no chat template; send plain text prompts, or add "
                "a chat_template to its tokenizer_config.json."
            )
        if tools and "tool_use" in templates:
            return templates["tool_use"]
        if "default" not in templates:
            raise TokenizerError(
                f"The model in {self.source} has chat templates named {sorted(templates)} but none "
                "named 'default'; rename the one to use to 'default'."
            )
        return templates["default"]

    def _not_ids(self, ids: Any, seq: list[Any] | None) -> str:
        """Why `decode` refused `ids` (`seq`: them as a list, or None where they are no iterable)."""
        wanted = (
            f"Tokenizer.decode takes a list of token ids (ints from 0 to {self.vocab_size - 1})"
        )
        if seq is None or isinstance(ids, str | bytes):
            return f"{wanted}, not {_shown(ids)}."
        for n, i in enumerate(seq):
            if not isinstance(i, numbers.Integral) or not 0 <= i < 2**32:
                return f"{wanted}; item {n} is {_shown(i)}."
        return f"{wanted}, not {_shown(ids)}."

    def _token_id(self, name: str, fallback: int | None = None) -> int | None:
        token = self.special_tokens.get(name)
        found = self.hf.token_to_id(token) if token is not None else None
        return fallback if found is None else found


class StreamDecoder:
    """Turns generated ids into text deltas as they arrive, for streaming.

    Tokens cannot be decoded one by one: SentencePiece's leading "▁" and a character's UTF-8
    bytes spread over byte-fallback or byte-level tokens only decode right in context. So each
    step decodes a window (the tokens emitted last step, as context, plus the new ones) and emits
    what the new ones add. Text that ends in U+FFFD is a character whose remaining bytes have not
    arrived; it waits. Skipped special tokens are dropped up front, so a window never starts at
    one: decoders that strip the text's first space would otherwise strip a real space.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._start = 0  # first id of the window: the context starts here
        self._emitted = 0  # ids whose text has been emitted

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (often "", never half a character)."""
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back, at the end of generation."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        context = self._decode(self.ids[self._start : self._emitted])
        text = self._decode(self.ids[self._start :])
        if text.endswith("\ufffd") and not final:
            return ""
        self._start, self._emitted = self._emitted, len(self.ids)
        return text[len(context) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def _shown(value: Any) -> str:
    """A value in an error: its type and a short repr (a long prompt or list is cut)."""
    text = repr(value)
    return f"{type(value).__name__} ({text[:40] + '...' if len(text) > 40 else text})"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _generation_config(folder: Path) -> dict[str, Any]:
    """generation_config.json, or where a folder has none, config.json's token ids as
    transformers' `GenerationConfig.from_model_config` takes them: the outer config's, then its
    `text_config`'s (a multimodal checkpoint's decoder) for those it lacks."""
    if (folder / "generation_config.json").is_file():
        return _read_json(folder / "generation_config.json")
    config = _read_json(folder / "config.json")
    text = config.get("text_config") or {}
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: text.get(k) if config.get(k) is None else config[k] for k in keys}


def _id_list(value: int | list[int] | None) -> list[int]:
    """generation_config.json gives an id, a list of ids, or nothing."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _special_tokens(config: Mapping[str, Any], legacy_map: Mapping[str, Any]) -> dict[str, str]:
    """The special tokens transformers passes to templates: every `*_token` entry, as text.

    Entries are strings or serialized AddedTokens. As in transformers, the old
    special_tokens_map.json overrides the config when the config lacks `added_tokens_decoder`,
    and a dict `extra_special_tokens` names more (Gemma-3's `image_token`, ...).
    """
    entries = dict(config)
    if "added_tokens_decoder" not in config:
        entries.update(legacy_map)
    if isinstance(entries.get("extra_special_tokens"), dict):
        entries.update(entries["extra_special_tokens"])
    tokens = {}
    for key, value in entries.items():
        if isinstance(value, dict):
            value = value.get("content")
        if key.endswith("_token") and isinstance(value, str):
            tokens[key] = value
    return tokens


def _chat_templates(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named chat templates. Template files, which transformers 5 saves, replace the config's."""
    files = {}
    if (folder / "chat_template.jinja").is_file():
        files["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for path in sorted((folder / "additional_chat_templates").glob("*.jinja")):
        files[path.stem] = path.read_text(encoding="utf-8")
    if files:
        return files
    template = config.get("chat_template")
    if isinstance(template, str):
        return {"default": template}
    return {t["name"]: t["template"] for t in template or []}


def _template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as transformers hands them to templates.

    Keys set to None are dropped (OpenAI-style `content=None` would render as "None"; templates
    test for missing keys), and reasoning under any of its names is readable under all of them.
    """
    out = []
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders
    its body unchanged, in its own scope as transformers' call block does."""

    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson`: plain `json.dumps`, where jinja's escapes HTML and sorts keys."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    """A chat template in transformers' environment: sandboxed (templates come with downloaded
    models), blocks trimmed, loop controls, and its `tojson`, `raise_exception`, `strftime_now`."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)
