"""kogpt2.trainer: training's model, its masked loss and token metrics against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kogpt2.dataset import IGNORE_ID
from kogpt2.model import new_model
from kogpt2.tf_setup import import_keras, import_tf
from kogpt2.trainer import LMTrainer, token_stats

tf = import_tf()
keras = import_keras()


def test_masked_loss_matches_a_hand_computation(tiny_tokenizer) -> None:
    model = new_model("tiny", tiny_tokenizer, seed=1)
    pad = tiny_tokenizer.pad_id
    inputs = np.array([[0, 270, 280, 290, 1, pad], [0, 300, 1, pad, pad, pad]], dtype=np.int32)
    targets = np.array([[270, 280, 290, 1, IGNORE_ID, IGNORE_ID], [300, 1] + [IGNORE_ID] * 4], dtype=np.int32)
    logits = model(tf.constant(inputs)).logits.numpy().astype(np.float64)  # (2, 6, V)

    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    real = targets != IGNORE_ID
    nll = np.array([-logp[b, t, targets[b, t]] for b, t in zip(*np.nonzero(real), strict=True)])
    hand = nll.sum() / real.sum()  # 6 real targets out of 12
    correct = sum(logits[b, t].argmax() == targets[b, t] for b, t in zip(*np.nonzero(real), strict=True))

    nll_sum, n_correct, count = (float(v) for v in token_stats(tf.constant(targets), tf.constant(logits, tf.float32)))
    loss = nll_sum / max(count, 1.0)  # what LMTrainer minimizes: the sum over real targets over their count
    assert loss == pytest.approx(hand, rel=1e-5)
    assert count == 6 and n_correct == correct and nll_sum == pytest.approx(nll.sum(), rel=1e-5)
    # The notebook's loss averaged over padding too: a different number.
    unmasked = -np.mean(np.take_along_axis(logp, np.where(real, targets, pad)[..., None], -1))
    assert abs(unmasked - hand) > 1e-3

    scorer = LMTrainer(model)
    scorer.compile()
    scores = scorer.evaluate(tf.data.Dataset.from_tensors((inputs, targets)), verbose=0, return_dict=True)
    assert scores["loss"] == pytest.approx(hand, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(hand), rel=1e-5)
    assert scores["accuracy"] == pytest.approx(correct / 6)
