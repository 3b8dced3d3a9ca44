"""Text to token ids exactly as written: prompts are assembled from pieces, so no piece may add special tokens."""

from __future__ import annotations

from ..errors import LcpatchError


def encode(tokenizer, text: str, lead: bool = False) -> list[int]:
    """Token ids of `text` without special tokens; with `lead`, after the tokenizer's own BOS, once (chat
    templates often write it themselves)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    bos = tokenizer.bos_token_id
    if lead and bos is not None and tokenizer("x")["input_ids"][:1] == [bos] and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ids


def padding_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS. Padding is masked out of attention
    and labels, so any real token serves; tokenizers converted from GGUF files often have no pad token."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise LcpatchError(
        f"{type(tokenizer).__name__} has neither a pad nor an EOS token, so batches cannot be padded: "
        "set one first, e.g. tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0) (any token of its "
        "vocabulary will do: padding is masked out)."
    )


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token the token of `padding_id`, in place: TRL's trainers and collators pad
    with `tokenizer.pad_token`."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(padding_id(tokenizer))
