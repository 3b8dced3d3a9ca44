"""Text to token ids exactly as written: prompts are assembled from pieces, so no piece may add special tokens."""

from __future__ import annotations


def encode(tokenizer, text: str, lead: bool = False) -> list[int]:
    """Token ids of `text` without special tokens; with `lead`, after the tokenizer's own BOS, once (chat
    templates often write it themselves)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    bos = tokenizer.bos_token_id
    if lead and bos is not None and tokenizer("x")["input_ids"][:1] == [bos] and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ids
