"""The model folder's own tokenizer: loading it, writing prompts and conversations as token ids (a
conversation through the tokenizer's chat template), and turning generated ids back into text piece by
piece as they come."""

from __future__ import annotations

from pathlib import Path

from fiddlerc.errors import ModelFolderError, OptionError

# What a conversation is: [{"role": "system" | "user" | "assistant", "content": text}, ...]
ROLES = ("system", "user", "assistant")


def load_tokenizer(folder: str | Path):
    """The model folder's own tokenizer (never remote code), refused where it has no vocabulary."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())  # transformers' reasons span lines; the CLI prints errors on one
        raise ModelFolderError(
            f"{folder} has no usable tokenizer ({reason}): add the model's tokenizer files, or use the Python API "
            "with token ids"
        ) from None
    if len(tokenizer) == 0:
        raise ModelFolderError(
            f"{folder}'s tokenizer has an empty vocabulary: add the model's tokenizer files (tokenizer.json or its "
            "vocabulary), or use the Python API with token ids"
        )
    return tokenizer


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Plain text as the model reads it (with the tokenizer's own special tokens, a BOS where it adds one)."""
    if not text.strip():
        raise OptionError("the prompt is empty: give some text (--prompt, --prompt-file, or on standard input)")
    return list(tokenizer.encode(text))


def check_conversation(messages: object) -> list[dict]:
    """`messages` if it is a conversation (a non-empty list of {"role", "content"} with a known role and
    text content), else an OptionError that says which message is wrong."""
    if not isinstance(messages, list) or not messages:
        raise OptionError("a conversation is a non-empty list of {'role': ..., 'content': ...} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise OptionError(f"message {i} is not {{'role': one of {', '.join(ROLES)}, 'content': text}}: {m!r}")
    return messages


def has_chat_template(tokenizer, template: str | None = None) -> bool:
    """Whether conversations can be written: `template` given, or the tokenizer's own."""
    return template is not None or bool(getattr(tokenizer, "chat_template", None))


def chat_text(tokenizer, messages: list[dict], template: str | None = None) -> str:
    """The conversation as the chat template writes it, the assistant's turn opened for the answer."""
    check_conversation(messages)
    if not has_chat_template(tokenizer, template):
        raise OptionError(
            "this model's tokenizer has no chat template: give one (--chat-template FILE, a Jinja template as in "
            "tokenizer_config.json), or send plain text (without --chat)"
        )
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except Exception as e:  # a template's own error (jinja2's TemplateError, or its raise_exception)
        raise OptionError(f"the chat template failed on this conversation: {' '.join(str(e).split())}") from None


def chat_ids(tokenizer, messages: list[dict], template: str | None = None) -> list[int]:
    """The conversation's token ids: the template's text, whose special tokens (BOS among them) it writes
    itself, so none are added (as transformers' apply_chat_template tokenizes it)."""
    return list(tokenizer.encode(chat_text(tokenizer, messages, template), add_special_tokens=False))


class TextStream:
    """Generated token ids in, text pieces out, each as soon as it is whole: a character that spans
    several tokens (byte-level vocabularies, UTF-8) comes out once its last byte has. Decodes a window of
    the few latest tokens, not the whole answer, so each token costs the same however long the answer
    grows (the scheme vLLM's incremental detokenizer uses: the text of the window minus the text of its
    part already shown)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here (tokens before it are context for spacing only)
        self.read = 0  # tokens up to here are shown

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> str:
        """The new text that `token` completes ("" while a character is still partial)."""
        self.ids.append(int(token))
        shown = self._text(self.ids[self.prefix : self.read])
        text = self._text(self.ids[self.prefix :])
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown) :]

    def flush(self) -> str:
        """What is left at the end (a partial character shown as the decoder shows it)."""
        shown = self._text(self.ids[self.prefix : self.read])
        text = self._text(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(shown) :]
