"""Which ids a tokenizer has, and config token names -> ids (shared by the driver and the engine factory)."""

from __future__ import annotations

from typing import Any


def tokenizer_ids(tokenizer: Any) -> int | list[int]:
    """The ids the tokenizer can produce: a count n when they are exactly 0..n-1 (the usual case, and what travels
    cheaply to the engine's workers), else the sorted list. Embedding rows past them are padding."""
    ids = sorted({int(i) for i in tokenizer.get_vocab().values()})
    return len(ids) if ids == list(range(len(ids))) else ids


def token_ids_of(tokenizer: Any, names: list[str]) -> tuple[int, ...]:
    """'<eos>' is the tokenizer's EOS; any other entry must be a single token of the vocabulary (else an error)."""
    ids: list[int] = []
    for name in names:
        if name == "<eos>":
            if tokenizer.eos_token_id is None:
                raise ValueError("mixing.never_mix lists '<eos>' but the tokenizer has no EOS token")
            ids.append(int(tokenizer.eos_token_id))
            continue
        token_id = tokenizer.convert_tokens_to_ids(name)
        if token_id is None or token_id == tokenizer.unk_token_id:
            encoded = tokenizer.encode(name, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(f"mixing marker {name!r} is not one token of this tokenizer (encodes to {encoded})")
            token_id = encoded[0]
        ids.append(int(token_id))
    return tuple(ids)
