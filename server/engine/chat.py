"""Chat input: messages rendered by the served model's own chat template, never a request's.

The template is the one the tokenizer loaded from the model directory (``chat_template`` in
``tokenizer_config.json`` or ``chat_template.jinja``); ``apply_chat_template`` renders it in
transformers' ``ImmutableSandboxedEnvironment``. The end-of-turn tokens are found once by
rendering a probe conversation: the special tokens the template puts right after an assistant
message's content end a chat reply just like EOS does.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import ChatTemplateMissingError, FieldViolation, InvalidRequestError
from .types import ChatInput

logger = logging.getLogger(__name__)

_PROBE = "\x00peftserve-probe\x00"


class ChatRenderer:
    """Renders ``ChatInput`` into prompt token ids with the model's own template."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.end_of_turn_ids: tuple[int, ...] = self._end_of_turn_ids() if self.has_template else ()

    def _end_of_turn_ids(self) -> tuple[int, ...]:
        try:
            rendered = self._tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}],
                tokenize=False,
            )
        except Exception as error:  # a template may refuse the probe; chat still works
            logger.warning("chat template: could not find its end-of-turn token (%s)", error)
            return ()
        tail = str(rendered).split(_PROBE, 1)[-1]
        special = set(self._tokenizer.all_special_ids)
        ids: list[int] = []
        for token in self._tokenizer(tail, add_special_tokens=False)["input_ids"]:
            if token not in special:
                break  # only the special tokens right after the content
            ids.append(int(token))
        return tuple(dict.fromkeys(ids))

    def render(self, chat: ChatInput) -> list[int]:
        """Prompt token ids; raises ``ChatTemplateMissingError`` or ``InvalidRequestError``."""
        if not self.has_template:
            raise ChatTemplateMissingError("chat")
        if not chat.messages:
            raise InvalidRequestError.single("chat.messages", "must not be empty")
        violations = [
            FieldViolation(f"chat.messages[{i}].role", "must not be empty")
            for i, message in enumerate(chat.messages)
            if not message.role
        ]
        if violations:
            raise InvalidRequestError(violations)
        add_generation_prompt = chat.add_generation_prompt
        if chat.continue_final_message:
            if add_generation_prompt:
                raise InvalidRequestError.single(
                    "chat.add_generation_prompt",
                    "must not be true with continue_final_message (the reply continues the "
                    "final message instead)",
                )
            add_generation_prompt = False
        elif add_generation_prompt is None:
            add_generation_prompt = True
        messages = [{"role": m.role, "content": m.content} for m in chat.messages]
        try:
            text = self._tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=chat.continue_final_message,
            )
        except ValueError as error:
            field = "chat.continue_final_message" if chat.continue_final_message else "chat"
            raise InvalidRequestError.single(
                field, f"the chat template refused it: {error}"
            ) from None
        except Exception as error:  # jinja2 TemplateError, e.g. raise_exception() for a role
            raise InvalidRequestError.single(
                "chat.messages", f"the chat template refused the messages: {error}"
            ) from None
        # The template writes the special tokens itself (bos, turn markers).
        return list(self._tokenizer(str(text), add_special_tokens=False)["input_ids"])
