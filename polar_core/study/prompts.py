"""How a prompt is run: as few-shot text, or as a turn of the chat template.

The task suite's prompts are few-shot blocks ending in "Q: ...\\nA:": they run
as plain text and the answer ends at the first newline. Anything else is a
question: an instruct model (its tokenizer has a chat template) gets it as a
chat turn and answers until end-of-sequence; a base model (Gemma 3 270M)
would ramble on, so it gets "Question: ...\\nAnswer:" and its answer ends at
the first newline. The explorer, the CLI and the prompt search all decide it
here, the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

from polar_core.engine.models import LoadedModel
from polar_core.study.checker import answer_rule
from polar_core.study.tasks import STOP_TEXT


@dataclass(frozen=True)
class PromptStyle:
    """How to encode a prompt and where its answer ends."""

    few_shot: bool
    chat: bool  # through the chat template
    stop_strings: tuple[str, ...]  # the answer is cut before the first of these
    template: str = "{prompt}"  # what the model reads, the prompt in its place

    def text(self, prompt: str) -> str:
        """The text the model is given for `prompt`."""
        return self.template.replace("{prompt}", prompt)

    @property
    def wrapped(self) -> bool:
        """Whether the prompt is put into a question/answer frame (base models)."""
        return self.template != "{prompt}"

    def answer_rule(self, exact: bool = False) -> str:
        """How its answers are checked (polar_core.study.checker): "exact" for
        few-shot answers or when asked, "contains" for free text."""
        return answer_rule(self.few_shot, exact)


def is_few_shot(prompt: str) -> bool:
    """A few-shot prompt ends in "A:" (the task suite's "Q: ...\\nA:" form)."""
    return prompt.rstrip().endswith("A:")


BASE_MODEL_TEMPLATE = "Question: {prompt}\nAnswer:"


def has_chat_template(lm: LoadedModel) -> bool:
    """Whether the model is an instruct model with a chat template."""
    return bool(getattr(lm.tokenizer, "chat_template", None))


def prompt_style(lm: LoadedModel, prompt: str) -> PromptStyle:
    """Few-shot prompts: plain text, the answer ends at a newline. Other
    prompts: the chat template when the tokenizer has one; for a base model,
    "Question: ...\\nAnswer:", the answer ending at a newline."""
    if is_few_shot(prompt):
        return PromptStyle(few_shot=True, chat=False, stop_strings=(STOP_TEXT,))
    if has_chat_template(lm):
        return PromptStyle(few_shot=False, chat=True, stop_strings=())
    return PromptStyle(few_shot=False, chat=False, stop_strings=(STOP_TEXT,), template=BASE_MODEL_TEMPLATE)


def shown_answer(text: str, style: PromptStyle) -> str:
    """The answer as a person reads it: cut at the style's stop string, stripped.

    A character whose bytes the token limit cut in half decodes as U+FFFD at
    the very end; it is dropped (it is no character of the answer).
    """
    for stop in style.stop_strings:
        text = text.split(stop, 1)[0]
    return text.rstrip("\ufffd").strip()
