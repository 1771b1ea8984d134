"""Scoring a model on a shard split: loss, accuracy and perplexity over real tokens (``kogpt2 evaluate``).

:func:`evaluate_model` scores a model folder (or a loaded model) on one split of a shard folder
with training's own model and metrics (:class:`kogpt2.trainer.LMTrainer`), and returns an
:class:`EvalResult`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kogpt2.dataset import check_tokenizer, make_dataset, open_shards
from kogpt2.tf_setup import import_tf
from kogpt2.trainer import LMTrainer

tf = import_tf()


@dataclass(frozen=True)
class EvalResult:
    """Scores of a model on one split.

    Attributes:
        model: the model folder scored (``"model"`` for a model passed in loaded).
        data: the shard folder.
        split: ``train`` or ``validation``.
        loss: mean cross-entropy per real target token (nats).
        perplexity: ``exp(loss)``.
        accuracy: share of real targets predicted exactly (argmax).
        tokens: number of real targets scored.
        examples: examples in the split (from ``info.json``).
    """

    model: str
    data: str
    split: str
    loss: float
    perplexity: float
    accuracy: float
    tokens: int
    examples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.split}: loss {self.loss:.4f}, perplexity {self.perplexity:.2f}, accuracy {self.accuracy:.4f} "
            f"over {self.tokens} tokens ({self.examples} examples)"
        )


def evaluate_model(
    model: str | Path | tuple[Any, Any],
    data: str | Path,
    split: str = "validation",
    *,
    batch_size: int = 32,
    strategy: Any = None,
    verbose: int = 0,
) -> EvalResult:
    """Score a model on one split of a shard folder.

    Args:
        model: a model folder (anything :func:`kogpt2.model.load_model` reads) or a
            ``(model, tokenizer)`` pair already loaded.
        data: the shard folder.
        split: ``train`` or ``validation``.
        batch_size: examples per batch.
        strategy: a ``tf.distribute`` strategy (default: the current one). A folder is
            loaded under it; a loaded model must have been built under it.
        verbose: Keras progress (0 silent).

    Returns:
        An :class:`EvalResult`.

    Raises:
        ShardError: the shard folder is unfinished or malformed, or the split is empty.
        TokenizerMismatchError: the shards were made with another tokenizer.
    """
    from kogpt2.model import load_model
    from kogpt2.tokenizer import load_tokenizer

    shards = open_shards(str(data))
    strategy = strategy or tf.distribute.get_strategy()
    if isinstance(model, tuple):
        lm, tokenizer = model
        name = "model"
        check_tokenizer(shards, tokenizer, model_vocab_size=lm.config.vocab_size, model=name)
    else:
        name = str(model)
        check_tokenizer(shards, load_tokenizer(model), model=name)  # before loading weights
        with strategy.scope():
            lm, tokenizer = load_model(model)
    if shards.num_examples(split) == 0:
        raise ValueError(f"{shards.folder}: the {split} split is empty")
    with strategy.scope():
        scorer = LMTrainer(lm)
        scorer.compile()
    scores = scorer.evaluate(make_dataset(shards, split, batch_size), verbose=verbose, return_dict=True)
    return EvalResult(
        model=name,
        data=shards.folder,
        split=split,
        loss=float(scores["loss"]),
        perplexity=float(scores["perplexity"]),
        accuracy=float(scores["accuracy"]),
        tokens=scorer.tokens_evaluated(),
        examples=shards.num_examples(split),
    )
