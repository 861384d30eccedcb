"""A tiny word-level tokenizer built locally (no downloads) with a BOS-adding post-processor, so that a double BOS
can happen and be caught."""
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<｜User｜>", "<｜Assistant｜>", "<think>"]
WORDS = (
    "What is 2 plus 3 ? Please reason step by step , and put your final answer within \\ boxed { } . a b c d e"
).split()

GENERIC_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|user|> {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} <|assistant|>{% endif %}"
)
R1_OLD_CHAT = (  # older DeepSeek-R1-Distill revisions: no trailing <think>
    "{{ bos_token }}{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
R1_NEW_CHAT = R1_OLD_CHAT.replace("<｜Assistant｜>{% endif %}", "<｜Assistant｜><think>\n{% endif %}")


def build_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    tok.chat_template = chat_template
    return tok


CHAT_TEMPLATES = {"generic": GENERIC_CHAT, "r1_old": R1_OLD_CHAT, "r1_new": R1_NEW_CHAT, None: None}


@pytest.fixture
def make_tokenizer():
    """make_tokenizer("generic" | "r1_old" | "r1_new" | None) -> a tokenizer with that chat template."""
    return lambda kind: build_tokenizer(CHAT_TEMPLATES[kind])
