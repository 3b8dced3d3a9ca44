"""Batched greedy generation for data builders, with a progress bar and resumable JSON-lines shards.

    shards = JsonlShards("pairs-work/chosen")          # rows already written are skipped on a rerun
    answers = generate_batched(model, tokenizer, prompts, max_new_tokens=128, batch_size=8, shards=shards)

`prompts` are token-id lists (render chat templates first); the answers come back as text, in prompt
order. The model is used as it is: wrap the call in `lcpatch.patched(model, recipe)` to generate under
a long-context recipe (its generate() feeds long prompts in chunks through the method's cache).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from ..errors import LcpatchError
from .tokens import padding_id

if TYPE_CHECKING:
    import torch


class JsonlShards:
    """Rows ({"key": ..., ...}) appended as JSON lines to `folder`/shard-NNNNN.jsonl, one file per `write`.

    A shard is written to a temporary name and renamed, so an interrupted run leaves only whole shards;
    reopening the folder resumes: `done()` holds every row written so far, by key.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _files(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.jsonl"))

    def done(self) -> dict[str, dict]:
        rows = {}
        for path in self._files():
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                rows[row["key"]] = row
        return rows

    def write(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        if not rows:
            return
        files = self._files()
        number = int(files[-1].stem.split("-")[1]) + 1 if files else 0
        path = self.folder / f"shard-{number:05d}.jsonl"
        staging = path.with_suffix(".partial")
        staging.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        staging.rename(path)


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def generate_batched(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    *,
    keys: list[str] | None = None,
    shards: JsonlShards | None = None,
    desc: str = "generating",
) -> list[str]:
    """Greedy answers (text, special tokens dropped) to `prompts`, `batch_size` left-padded prompts per call.

    Prompts are batched by length (least padding). With `shards`, every finished batch is written there
    as {"key", "text"} rows (`keys`: one per prompt, default its index) and prompts already there are
    not generated again.
    """
    import torch  # here, not at the top: the data builders' --help imports this module and must not load torch

    if keys is None:
        keys = [str(i) for i in range(len(prompts))]
    if len(keys) != len(prompts) or len(set(keys)) != len(keys):
        raise LcpatchError(f"generate_batched needs one distinct key per prompt; got {len(keys)} for {len(prompts)}.")
    if not all(prompts):
        raise LcpatchError("generate_batched got an empty prompt; every prompt needs at least one token.")
    pad_id = padding_id(tokenizer)
    answers = {key: row["text"] for key, row in (shards.done() if shards else {}).items() if key in set(keys)}
    todo = sorted((i for i, key in enumerate(keys) if key not in answers), key=lambda i: len(prompts[i]))
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=desc, unit="prompt") as bar,
        ):
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                ids, mask = _left_padded([prompts[i] for i in batch], pad_id, model.device)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                )
                texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
                rows = [{"key": keys[i], "text": text.strip()} for i, text in zip(batch, texts, strict=True)]
                if shards is not None:
                    shards.write(rows)
                answers.update((row["key"], row["text"]) for row in rows)
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return [answers[key] for key in keys]
