"""kogpt2.precision: --mixed-precision's values and the Keras policy they resolve to."""

from __future__ import annotations

import pytest

from kogpt2.precision import AUTO, dtype_policy, normalize_precision, resolve_policy
from kogpt2.tf_setup import import_keras


def test_the_old_boolean_and_none_are_understood() -> None:
    assert (
        normalize_precision(True) == AUTO and normalize_precision(False) == "no" and normalize_precision(None) == "no"
    )
    assert normalize_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="--mixed-precision 'fp8': must be one of no, bf16, fp16"):
        normalize_precision("fp8")


def test_policies_by_device() -> None:
    assert resolve_policy("no", has_gpu=True) == "float32"
    assert resolve_policy("auto", has_gpu=False) == "mixed_bfloat16"
    assert resolve_policy("fp16", has_gpu=True) == "mixed_float16"
    with pytest.raises(ValueError, match="no GPU is visible"):
        resolve_policy("fp16", has_gpu=False)


def test_dtype_policy_restores_the_previous_one() -> None:
    keras = import_keras()
    before = keras.mixed_precision.global_policy().name
    with dtype_policy("mixed_bfloat16"):
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == before
