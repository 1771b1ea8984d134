"""GenerationConfig: validation, and the one place where layers of settings meet (greedy vs sampling)."""

from __future__ import annotations

import pytest

from kogpt2.generation_config import DEFAULT_TOP_P, GenerationConfig


def test_top_p_defaults_by_strategy_and_greedy_refuses_sampling_values() -> None:
    assert GenerationConfig().top_p == DEFAULT_TOP_P and GenerationConfig(strategy="greedy").top_p == 1.0
    # an explicit top-p with greedy is refused, even one equal to the sampling default (never reset silently)
    with pytest.raises(ValueError, match=r"top_p=0\.95 has no effect with strategy='greedy'"):
        GenerationConfig(strategy="greedy", top_p=DEFAULT_TOP_P)
    with pytest.raises(ValueError, match=r"GenerationConfig\.top_p=1\.5: must be a finite number > 0 and <= 1"):
        GenerationConfig(top_p=1.5)


def test_layers_later_wins_and_greedy_is_decided_in_one_place() -> None:
    folder = {"temperature": 0.8, "top_k": 40, "max_new_tokens": 30}
    # greedy chosen by a later layer drops the earlier layers' sampling settings, keeps the rest
    greedy = GenerationConfig.from_layers(folder, {"strategy": "greedy"})
    assert greedy.greedy and (greedy.temperature, greedy.top_k, greedy.top_p, greedy.max_new_tokens) == (1, 0, 1, 30)
    # a layer setting greedy and a sampling value is refused, naming the layer
    with pytest.raises(ValueError, match=r"--greedy cannot be combined with --top-p \(flags\)"):
        GenerationConfig.from_layers(folder, {"strategy": "greedy", "top_p": 0.9}, names=("folder", "flags"))
    # a sampling setting after a greedy layer chooses sampling, with the sampling defaults where silent
    sampled = GenerationConfig.from_layers({"strategy": "greedy"}, {"temperature": 0.7})
    assert (sampled.strategy, sampled.temperature, sampled.top_p) == ("sample", 0.7, DEFAULT_TOP_P)
    assert GenerationConfig.from_layers({"top_k": 5}, {"top_k": None}).top_k == 5  # None: not given
    assert GenerationConfig.from_folder(None, max_new_tokens=7) == GenerationConfig(max_new_tokens=7)


def test_hf_generation_config_round_trips() -> None:
    config = GenerationConfig(top_k=40, temperature=0.8, stop=("다.",), suppress_tokens=(3,))
    assert GenerationConfig.from_layers(GenerationConfig.hf_overrides(config.to_hf_dict())) == config.replace(
        num_samples=1
    )
    greedy = GenerationConfig.hf_overrides({"do_sample": False, "temperature": 0.7, "top_p": 0.9})
    assert greedy == {"strategy": "greedy"}  # transformers keeps sampling values with do_sample=false: meaningless
