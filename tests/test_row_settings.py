"""Per-row and named sampling settings (kogpt2.row_settings): coercion, validation, precedence."""

from __future__ import annotations

import pytest

from kogpt2.generation_config import GenerationConfig
from kogpt2.row_settings import SettingError, effective, read_config_grid, row_overrides

BASE = GenerationConfig(top_p=0.9, max_new_tokens=20)


def test_row_columns_are_coerced_and_empty_means_the_default() -> None:
    row = {"temperature": "0.7", "top_k": 5.0, "num_samples": "3", "top_p": "", "max_new_tokens": None, "x": 1}
    assert row_overrides(row) == {"temperature": 0.7, "top_k": 5, "num_samples": 3}
    assert row_overrides({"seed": "이때", "random_seed": 7}) == {"seed": 7}  # seed is the text column by default
    assert row_overrides({"text": "이때", "seed": 7}, text_column="text") == {"seed": 7}
    for value, message in (("hot", "not a number"), (2.5, "not a whole number"), (True, "not a number")):
        with pytest.raises(SettingError, match=message) as err:
            row_overrides({"top_k": value})
        assert err.value.field == "top_k"
    with pytest.raises(SettingError, match="top_p") as err:
        effective(BASE, {"top_p": 1.7}, None)
    assert err.value.field == "top_p"


def test_a_named_configuration_wins_over_the_row_and_greedy_drops_its_sampling(tmp_path) -> None:
    grid = tmp_path / "grid.jsonl"
    grid.write_text('{"name": "g", "strategy": "greedy"}\n\n{"name": "hot", "temperature": 1.5}\n', encoding="utf-8")
    g, hot = read_config_grid(str(grid), BASE)
    assert (g.name, g.config.greedy, hot.config.temperature, hot.config.top_p) == ("g", True, 1.5, 0.9)
    row = {"temperature": 0.6, "num_samples": 2}
    assert effective(BASE, row, hot).temperature == 1.5 and effective(BASE, row, hot).num_samples == 2
    as_greedy = effective(BASE, row, g)
    assert as_greedy.greedy and as_greedy.temperature == 1.0 and as_greedy.num_samples == 2
    assert effective(BASE, row, None).temperature == 0.6


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"name": "a", "top_pp": 0.5}', "did you mean 'top_p'"),
        ('{"name": "a"}\n{"name": "a"}', "used twice"),
        ('{"top_p": 0.5}', '"name" must be'),
        ('{"name": "a", "top_p": 2}', r"line 1 \(a\): top_p: must be a finite number > 0 and <= 1"),
        ("not json", "not JSON"),
        ("", "no configuration"),
    ],
)
def test_a_grid_file_is_validated_whole_naming_the_line(tmp_path, text: str, message: str) -> None:
    grid = tmp_path / "grid.jsonl"
    grid.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_config_grid(str(grid), BASE)
