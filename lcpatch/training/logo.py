"""LOGO's trainer (Tang et al., 2024, arXiv 2410.18533) on TRL's CPOTrainer.

Per row: one preferred answer y_w, M dis-preferred answers y_l^1..y_l^M (`lcpatch data logo`), and

    loss = −log σ(β · [r(y_w) − mean_j r(y_l^j) − γ/β]) + λ_sft · CE(y_w)

with r(y) the mean log-prob of y's tokens given the prompt (length-normalised, reference-free) and
CE(y_w) the mean token cross-entropy of the batch's preferred answers. That is CPOTrainer's SimPO loss
(simpo_gamma = γ, cpo_alpha = λ_sft) once the M rejected rewards are averaged into one, which is what
`concatenated_forward` hands it: TRL's loss code and metrics (rewards/chosen, rewards/rejected — the
mean over M —, rewards/accuracies, rewards/margins, nll_loss) are used as they are.

Every forward reads the row at synthesised positions (`lcpatch.training.positions`): the real context
cut into `chunk_size`-token chunks spread over `virtual_length`, question and answers at the end,
one of the row's covering layouts drawn by `LOGOCollator` each time the row is used.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from trl.experimental.cpo import CPOConfig, CPOTrainer

from ..api import patched_recipe
from ..data.logo import encode_prompt, read_rows, split_chunks
from ..data.tokens import padding_id
from ..errors import LcpatchError
from ..fields import AUTO
from . import sequence_parallel
from .config import LOGOTraining, check_plain_position_share
from .positions import covering_offsets, synthesize_positions


@dataclass
class LOGOConfig(CPOConfig):
    """CPOConfig with LOGO's fields; `max_length` is the real length (prompt + longest answer)."""

    beta: float = LOGOTraining.beta
    gamma_over_beta: float = LOGOTraining.gamma_over_beta
    sft_weight: float = LOGOTraining.sft_weight
    num_rejected: int = LOGOTraining.num_rejected
    chunk_size: int = LOGOTraining.chunk_size
    virtual_length: int = LOGOTraining.virtual_length
    offsets_per_example: int | None = None  # None: the fewest covering layouts of each row
    plain_position_share: float = LOGOTraining.plain_position_share

    def __post_init__(self):
        self.loss_type = "simpo"
        self.simpo_gamma = self.gamma_over_beta * self.beta  # CPO subtracts simpo_gamma / beta from the margin
        self.cpo_alpha = self.sft_weight
        self.remove_unused_columns = False  # LOGOCollator reads the tokenised columns, not forward()'s arguments
        check_plain_position_share(self.plain_position_share)
        super().__post_init__()


class LOGOCollator:
    """Tokenised rows -> one batch of B·(M+1) sequences: the B preferred answers first, then the first
    rejected answer of every row, then the second, ...; right-padded, labels on the answers only, and
    `position_ids` from one covering layout per row, drawn from `seed`; with `plain_position_share` p, a
    row is read at its plain positions 0..n-1 instead with probability p (the short-context reading the
    model is also asked to keep)."""

    def __init__(
        self,
        pad_token_id: int,
        virtual_length: int,
        offsets_per_example: int | None = None,
        seed: int = 0,
        plain_position_share: float = 0.0,
    ):
        if not isinstance(pad_token_id, int):
            raise LcpatchError(
                f"LOGOCollator's pad_token_id must be a token id, not {pad_token_id!r}: pass "
                "lcpatch.data.tokens.padding_id(tokenizer) (the pad token, else EOS) for tokenizers without a pad token."
            )
        self.pad_token_id = pad_token_id
        self.virtual_length = virtual_length
        self.offsets_per_example = offsets_per_example
        self.plain_position_share = plain_position_share
        self.rng = random.Random(seed)

    def layout(self, row: dict) -> torch.Tensor:
        """Positions of the row's prompt followed by its longest answer."""
        chunks, head = row["chunk_lengths"], row["head_length"]
        tail = len(row["prompt_input_ids"]) - head - sum(chunks) + max(map(len, row["completion_input_ids"]))
        # Drawn only when asked for, so that a share of 0 leaves the layouts of a seed as they were.
        if self.plain_position_share and self.rng.random() < self.plain_position_share:
            return torch.arange(head + sum(chunks) + tail)
        offsets = covering_offsets(chunks, tail, self.virtual_length, head, count=self.offsets_per_example)
        return synthesize_positions(chunks, tail, self.virtual_length, self.rng.choice(offsets), head)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        layouts = [self.layout(row) for row in rows]
        sequences = [
            (row["prompt_input_ids"], row["completion_input_ids"][j], positions)
            for j in range(len(rows[0]["completion_input_ids"]))
            for row, positions in zip(rows, layouts, strict=True)
        ]
        width = max(len(prompt) + len(answer) for prompt, answer, _ in sequences)
        width += -width % sequence_parallel.configured_size()  # DeepSpeed's Ulysses loader cuts rows evenly
        batch = {
            "input_ids": torch.full((len(sequences), width), self.pad_token_id),
            "attention_mask": torch.zeros(len(sequences), width, dtype=torch.long),
            "position_ids": torch.zeros(len(sequences), width, dtype=torch.long),
            "labels": torch.full((len(sequences), width), -100),
        }
        for i, (prompt, answer, positions) in enumerate(sequences):
            n = len(prompt) + len(answer)
            batch["input_ids"][i, :n] = torch.tensor(prompt + answer)
            batch["attention_mask"][i, :n] = 1
            batch["position_ids"][i, :n] = positions[:n]
            batch["labels"][i, len(prompt) : n] = torch.tensor(answer)
        return batch


def _target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of log-probs of the targets (-100: none) that logits[:, i] predicts, and their count."""
    mask = targets != -100
    logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (logps * mask).sum(-1), mask.sum(-1)


def _sharded_answer_log_probs(model, batch: dict[str, torch.Tensor], sp) -> tuple[torch.Tensor, ...]:
    """answer_log_probs on this rank's shard (sharded here, or already by DeepSpeed's Ulysses data loader),
    sums and counts summed over the SP group before any reward is formed; logits: this shard's."""
    shard = dict(batch) if "shift_labels" in batch else sequence_parallel.shard_batch(batch, sp)
    targets = shard.pop("shift_labels")
    logits = model(**shard, use_cache=False).logits.float()
    sums, counts = _target_log_probs(logits, targets)
    return sequence_parallel.reduce_sum(sums, sp), sequence_parallel.reduce_sum(counts, sp), logits


def answer_log_probs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of its answer tokens' log-probs, their count, and the logits (fp32) over the
    batch's answer region. Only that region goes through the LM head (`logits_to_keep`); the attention
    mask is always passed, so transformers never reads the position jumps as packed-sequence boundaries.
    Under sequence parallelism, each rank scores its shard and the sums are reduced over the group."""
    sp = sequence_parallel.active()
    if sp is not None:
        return _sharded_answer_log_probs(model, batch, sp)
    labels = batch["labels"]
    first_answer = int((labels != -100).int().argmax(-1).min())
    keep = labels.shape[1] - first_answer + 1  # from the token that predicts the earliest answer token
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
        logits_to_keep=keep,
    ).logits.float()
    return (*_target_log_probs(logits[:, :-1], labels[:, first_answer:]), logits)


def tokenize_logo_row(tokenizer, row: dict, num_rejected: int, chunk_size: int, real_length: int) -> dict:
    """A LOGO row as LOGOCollator reads it: prompt tokens (the context cut so that prompt + longest answer
    fit `real_length`), its head length, the context's chunk lengths, and the answers (chosen first) + EOS."""
    rejected = row["rejected"]
    if isinstance(rejected, str) or len(rejected) != num_rejected:
        found = 1 if isinstance(rejected, str) else len(rejected)
        raise LcpatchError(
            f"LOGO row {row.get('key', '')!r} has {found} rejected answer(s); training.num_rejected is "
            f"{num_rejected}: build the data with that many (`lcpatch data logo --num-rejected`)."
        )
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] + eos for a in [row["chosen"], *rejected]]
    prompt = encode_prompt(tokenizer, row["context"], row["prompt"])
    room = real_length - len(prompt.head) - len(prompt.tail) - max(map(len, answers))
    if room < 1:
        raise LcpatchError(
            f"LOGO row {row.get('key', '')!r}: its prompt and longest answer leave no room for context in "
            f"training.real_length = {real_length} tokens; raise real_length or shorten the answers."
        )
    context = prompt.context[:room]
    return {
        "prompt_input_ids": prompt.head + context + prompt.tail,
        "head_length": len(prompt.head),
        "chunk_lengths": [len(chunk) for chunk in split_chunks(context, chunk_size)],
        "completion_input_ids": answers,
    }


class LOGOTrainer(CPOTrainer):
    """CPOTrainer reading LOGO rows ({"prompt": question, "context", "chosen", "rejected": M answers}) at
    synthesised positions, with the M rejected rewards averaged (see the module docstring)."""

    _tag_names = ["trl", "lcpatch", "logo"]
    _name = "LOGO"
    _paper = {"title": "LOGO -- Long cOntext aliGnment via efficient preference Optimization", "id": "2410.18533"}

    def __init__(self, model, args: LOGOConfig, train_dataset, processing_class, eval_dataset=None, callbacks=None):
        recipe = patched_recipe(model)
        if recipe is not None and recipe.attention.method != "dense":
            raise LcpatchError(
                f"LOGO trains with synthesised position_ids, which attention.method {recipe.attention.method} "
                "does not read (it places keys itself); train with attention dense, then apply it for inference."
            )
        # Read by tokenize_row, which CPOTrainer.__init__ maps over the datasets.
        self.num_rejected, self.chunk_size = args.num_rejected, args.chunk_size
        super().__init__(
            model=model,
            args=args,
            data_collator=LOGOCollator(
                padding_id(processing_class),
                args.virtual_length,
                args.offsets_per_example,
                seed=args.seed + args.process_index,
                plain_position_share=args.plain_position_share,
            ),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
        )

    def tokenize_row(self, feature: dict, model=None) -> dict:
        return tokenize_logo_row(self.processing_class, feature, self.num_rejected, self.chunk_size, self.max_length)

    def concatenated_forward(self, model, batch: dict[str, torch.Tensor]):
        """(r(y_w), mean_j r(y_l^j), logits of y_w rows, logits of y_l rows, CE(y_w)) for CPOTrainer's loss."""
        sums, counts, logits = answer_log_probs(model, batch)
        rows = sums.shape[0] // (self.num_rejected + 1)
        rewards = sums / counts
        rejected = rewards[rows:].view(self.num_rejected, rows).mean(0)
        nll = -sums[:rows].sum() / counts[:rows].sum()
        return rewards[:rows], rejected, logits[:rows], logits[rows:], nll


def build_trainer(training: LOGOTraining, model, tokenizer, settings: dict) -> LOGOTrainer:
    """`lcpatch train`'s builder for training.method logo: the rows of training.data, the recipe's LOGO fields."""
    from datasets import Dataset

    args = LOGOConfig(
        **settings,
        beta=training.beta,
        gamma_over_beta=training.gamma_over_beta,
        sft_weight=training.sft_weight,
        num_rejected=training.num_rejected,
        chunk_size=training.chunk_size,
        virtual_length=training.virtual_length,
        offsets_per_example=None if training.offsets_per_example == AUTO else training.offsets_per_example,
        plain_position_share=training.plain_position_share,
        max_length=training.real_length,
    )
    rows = Dataset.from_list(read_rows(training.data))
    return LOGOTrainer(model, args, rows, tokenizer)
