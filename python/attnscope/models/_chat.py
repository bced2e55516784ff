"""Chat prompts: a conversation rendered by the model's own Jinja chat template."""

from __future__ import annotations

from ._model import check_encodable

_CHAT_ROLES = ("system", "user", "assistant")


def _check_messages(messages) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise TypeError(
            'messages must be a list of {"role": ..., "content": ...} dicts, got '
            f"{type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages is empty: give at least one user message")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(
                f'messages[{index}] must be a dict with exactly "role" and "content", '
                f"got {message!r}"
            )
        role, content = message["role"], message["content"]
        if role not in _CHAT_ROLES:
            raise ValueError(
                f"messages[{index}]['role'] must be one of {', '.join(_CHAT_ROLES)}, got {role!r}"
            )
        if not isinstance(content, str):
            raise TypeError(
                f"messages[{index}]['content'] must be a str, got {type(content).__name__}"
            )
        check_encodable(content, f"messages[{index}]['content']")
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] == "assistant":
        raise ValueError("the last message is the assistant's: end with a user message")
    return checked


def chat_prompt(model, messages) -> str:
    """`messages` rendered by the model's Jinja chat template, the assistant's turn opened."""
    messages = _check_messages(messages)
    if not model.chat_template:
        raise ValueError(f"{model.name} carries no chat template: use generate() with a prompt")
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    # As transformers renders templates: sandboxed, blocks trimmed.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        template = environment.from_string(model.chat_template)
        return template.render(messages=messages, add_generation_prompt=True)
    except TemplateError as error:
        raise ValueError(
            f"the chat template of {model.name} refused the messages: {error}"
        ) from None
