import pytest

from ngrpo_ray.data import Problem, filter_by_prompt_length, get_template, render_prompt, render_prompt_text
from ngrpo_ray.data.problem import LoadReport

Q = "What is 2 plus 3 ?"


def ids_of(tok, tokens):
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def test_named_templates_are_the_published_strings():
    assert get_template("r1").format("Q?") == (
        "Q?\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert get_template("released_code").format("Q?") == (
        "Q? Let's think step by step and output the final answer within \\boxed{}."
    )
    assert get_template("gpqa").format("Q?\n\nA) x") == (
        "Q?\n\nA) x\n\nLet's think step by step and output the final answer in the last line as:\nAnswer: <A/B/C/D>"
    )
    # LaTeX braces in a question survive (str.format would choke on them)
    assert get_template("r1").format(r"\frac{1}{2}").startswith(r"\frac{1}{2}")
    with pytest.raises(ValueError, match="unknown prompt template"):
        get_template("nope")


def test_chat_template_gives_exactly_one_bos(make_tokenizer):
    tok = make_tokenizer("generic")
    ids = render_prompt(tok, Q, "plain")
    expected = ["<s>", "<|user|>", "What", "is", "2", "plus", "3", "?", "<|assistant|>"]
    assert ids == ids_of(tok, expected)
    # the naive way (special tokens on) doubles the BOS: the case render_prompt exists to avoid
    text = render_prompt_text(tok, Q, "plain")
    assert tok(text)["input_ids"][:2] == ids_of(tok, ["<s>", "<s>"])


def test_raw_prompt_gets_the_tokenizers_bos(make_tokenizer):
    tok = make_tokenizer(None)
    expected = ["<s>", "What", "is", "2", "plus", "3", "?"]
    assert render_prompt(tok, Q, "plain", use_chat_template=False) == ids_of(tok, expected)
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(tok, Q, "plain")


def test_think_is_appended_only_to_r1_templates_that_lack_it(make_tokenizer):
    old, new, generic = make_tokenizer("r1_old"), make_tokenizer("r1_new"), make_tokenizer("generic")
    assert render_prompt_text(old, Q, "plain") == "<s><｜User｜>What is 2 plus 3 ?<｜Assistant｜><think>\n"
    assert render_prompt_text(new, Q, "plain") == "<s><｜User｜>What is 2 plus 3 ?<｜Assistant｜><think>\n"
    assert render_prompt_text(generic, Q, "plain") == "<s><|user|> What is 2 plus 3 ? <|assistant|>"
    assert render_prompt_text(old, Q, "plain", append_think=False).endswith("<｜Assistant｜>")
    assert render_prompt_text(generic, Q, "plain", append_think=True).endswith("<|assistant|><think>\n")
    assert render_prompt_text(old, Q, "plain", use_chat_template=False) == Q  # auto never touches raw prompts
    expected = ["<s>", "<｜User｜>", "What", "is", "2", "plus", "3", "?", "<｜Assistant｜>", "<think>"]
    assert render_prompt(old, Q, "plain") == render_prompt(new, Q, "plain") == ids_of(old, expected)


def test_r1_template_inside_the_chat_template(make_tokenizer):
    tok = make_tokenizer("r1_new")
    text = render_prompt_text(tok, Q, "r1")
    assert text == (
        "<s><｜User｜>What is 2 plus 3 ?\nPlease reason step by step, and put your final answer within \\boxed{}."
        "<｜Assistant｜><think>\n"
    )
    ids = render_prompt(tok, Q, "r1")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids[-2:] == ids_of(tok, ["<｜Assistant｜>", "<think>"])


def test_length_filter_counts_what_it_drops(make_tokenizer):
    tok = make_tokenizer("generic")
    problems = [Problem(str(i), " ".join("abcde"[: i + 1]), "1", "t") for i in range(5)]  # 1..5 tokens
    report = LoadReport("t", "-", rows_read=5, kept=5)
    kept, dropped = filter_by_prompt_length(problems, tok, 3, report=report)
    assert [p.id for p in kept] == ["0", "1", "2"] and dropped == 2
    assert (report.filtered_too_long, report.kept) == (2, 3)
    # counting the rendered chat prompt: 3 extra tokens (<s>, <|user|>, <|assistant|>)
    kept, dropped = filter_by_prompt_length(problems, tok, 5, render=lambda p: render_prompt(tok, p.question, "plain"))
    assert [p.id for p in kept] == ["0", "1"] and dropped == 3
    with pytest.raises(ValueError, match="max_tokens"):
        filter_by_prompt_length(problems, tok, 0)
