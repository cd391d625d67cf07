"""tools.serve's request checks (parse_call), without a server: what each OpenAI request
shape becomes, and the one error body each bad one gets."""

from __future__ import annotations

import pytest

from tools.serve import ApiError, parse_call


def chat(messages: object, **fields: object):
    return parse_call({"model": "m", "messages": messages, **fields}, "chat", "m")


def test_text_parts_and_a_null_assistant_turn_are_chat_messages():
    """The openai client's typed content parts and an assistant turn with null content were
    refused as malformed messages."""
    call = chat(
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}],
            },
            {"role": "assistant", "content": None},
            {"role": "user", "content": "Go on", "name": "ann"},
        ]
    )
    assert call.prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Go on"},
    ]


@pytest.mark.parametrize(
    ("messages", "message", "code"),
    [
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "content parts of type image_url are not supported: this server reads text parts only.",
            "unsupported",
        ),
        (
            [{"role": "user", "content": None}],
            '\'messages\' must be a non-empty list of {"role": ..., "content": ...} objects '
            "whose content is text or a list of text parts.",
            "invalid_type",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            '\'messages\' must be a non-empty list of {"role": ..., "content": ...} objects '
            "whose content is text or a list of text parts.",
            "invalid_type",
        ),
        (
            ["Hi"],  # e774b48 read its role before checking it: a TypeError, a 500
            '\'messages\' must be a non-empty list of {"role": ..., "content": ...} objects '
            "whose content is text or a list of text parts.",
            "invalid_type",
        ),
        (
            [],
            '\'messages\' must be a non-empty list of {"role": ..., "content": ...} objects '
            "whose content is text or a list of text parts.",
            "invalid_type",
        ),
    ],
)
def test_messages_the_server_cannot_read(messages, message, code):
    with pytest.raises(ApiError) as e:
        chat(messages)
    assert (str(e.value), e.value.body()["error"]["code"], e.value.status) == (message, code, 400)


def test_chat_fields_openai_clients_send_switched_off_are_accepted():
    off = {
        "response_format": {"type": "text"},
        "tools": [],
        "tool_choice": "none",
        "parallel_tool_calls": True,
        "store": False,
        "logprobs": False,
        "top_logprobs": 0,
        "frequency_penalty": 0.0,
    }
    assert chat([{"role": "user", "content": "Hi"}], **off).prompt == [
        {"role": "user", "content": "Hi"}
    ]
    for field, value, what in [
        (
            "response_format",
            {"type": "json_object"},
            "structured output (a response_format other than text)",
        ),
        ("tool_choice", "auto", "tool calls"),
        ("top_logprobs", 3, "logprobs"),
        ("store", True, "stored completions"),
    ]:
        with pytest.raises(ApiError) as e:
            chat([{"role": "user", "content": "Hi"}], **{field: value})
        assert str(e.value) == f"'{field}' is not supported: this server does not do {what}."
