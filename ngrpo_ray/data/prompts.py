"""Named prompt templates and chat-template rendering to token ids (one BOS, "<think>\\n" where R1 expects it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

R1_ASSISTANT_MARKER = "<｜Assistant｜>"  # DeepSeek-R1(-Distill) chat templates end the prompt with this
THINK_OPEN = "<think>\n"


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    text: str  # the instruction with a {question} placeholder
    origin: str

    def format(self, question: str) -> str:
        return self.text.replace("{question}", question)  # not str.format: questions are full of LaTeX braces


PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate(
            "r1",
            "{question}\nPlease reason step by step, and put your final answer within \\boxed{}.",
            "DeepSeek-R1's recommended instruction; the paper's prompt",
        ),
        PromptTemplate(
            "released_code",
            "{question} Let's think step by step and output the final answer within \\boxed{}.",
            "the suffix the authors' released code (ZJUSCL/N-GRPO) appends",
        ),
        PromptTemplate(
            "gpqa",
            "{question}\n\nLet's think step by step and output the final answer in the last line as:\n"
            "Answer: <A/B/C/D>",
            "the released code's GPQA-Diamond instruction (the question already lists the choices A-D)",
        ),
        PromptTemplate(
            "demo",
            "Example: Sam has 2 cards. He finds 5 more cards. How many cards does Sam have now?\n"
            "Answer: 2 + 5 = 7. The answer is \\boxed{7}.\n\n"
            "Now solve: {question}\nAnswer in the same way, with the final number in \\boxed{}.",
            "one-shot instruction for the small CPU demo model: SmolLM2-135M boxes ~2% of answers with a bare "
            "instruction and ~43% with this example (measured on level-1 problems, T 0.7)",
        ),
        PromptTemplate("plain", "{question}", "the question alone"),
    )
}


def get_template(name: str) -> PromptTemplate:
    if name not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; known: {sorted(PROMPT_TEMPLATES)}")
    return PROMPT_TEMPLATES[name]


def render_prompt_text(
    tokenizer: Any,
    question: str,
    template: str = "r1",
    use_chat_template: bool = True,
    append_think: bool | None = None,
) -> str:
    """The exact prompt text the model sees.

    append_think: None (auto) adds "<think>\\n" only when the chat template is R1-style (it renders
    "<｜Assistant｜>") and did not emit it itself (older R1 revisions); True always makes the prompt end with it;
    False never adds it.
    """
    content = get_template(template).format(question)
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass use_chat_template=False for a raw prompt")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = content
    wants_think = append_think if append_think is not None else (use_chat_template and R1_ASSISTANT_MARKER in text)
    if wants_think and not text.endswith(THINK_OPEN):
        text = text + "\n" if text.endswith(THINK_OPEN.strip()) else text + THINK_OPEN
    return text


def render_prompt(
    tokenizer: Any,
    question: str,
    template: str = "r1",
    use_chat_template: bool = True,
    append_think: bool | None = None,
) -> list[int]:
    """Prompt token ids with exactly one BOS where the model uses one.

    A chat template writes its own special tokens (R1's emits the BOS), so its text is tokenized with
    add_special_tokens=False, as transformers' apply_chat_template(tokenize=True) does; a raw prompt gets the
    tokenizer's usual special tokens. A leading BOS that still appears twice is collapsed.
    """
    text = render_prompt_text(tokenizer, question, template, use_chat_template, append_think)
    ids = list(tokenizer(text, add_special_tokens=not use_chat_template)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids.pop(0)
    return ids
