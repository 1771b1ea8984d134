"""The compiled attention kernel: the same attention as the XLA path, in place, over the filled slots
only; its build (cache, failures, two processes at once) and the fall back to XLA without it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def tiny_gpt2(n_embd: int, n_head: int, seed: int = 5):
    from transformers import GPT2Config, TFGPT2LMHeadModel

    from kogpt2.tf_setup import import_tf

    tf = import_tf()
    tf.random.set_seed(seed)
    model = TFGPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=n_embd, n_layer=2, n_head=n_head))
    model(tf.constant([[1, 2]]))
    return model


def run_decoder(dec, ids, starts):
    """Logits of a prefill, steps that cross a cache level, and a step after rows were dropped."""
    outs = [dec.prefill(ids, starts, 30).numpy()]
    rows = len(ids)
    for slot in range(ids.shape[1], 20):  # levels of 8: crosses 8 and 16
        outs.append(dec.step(np.arange(rows) + slot, starts, slot).numpy())
    keep = np.array([rows - 1, 0])
    dec.select_rows(keep)  # rows finished
    outs.append(dec.step(np.array([20, 21]), starts[keep], 20).numpy())
    return outs


@pytest.mark.parametrize(
    "n_embd, n_head, dtype",
    [
        (32, 2, "float32"),  # head_dim 16: the kernel's vector path
        (64, 2, "float32"),  # head_dim 32
        (48, 2, "float32"),  # head_dim 24: its scalar path
        (32, 2, "bfloat16"),
    ],
)
def test_the_kernel_computes_what_the_xla_attention_computes(n_embd, n_head, dtype):
    from kogpt2.decoder import Decoder

    model = tiny_gpt2(n_embd, n_head)
    ids = np.array([[3, 3, 5, 6, 9], [7, 8, 9, 10, 11], [3, 3, 3, 12, 13]])
    starts = np.array([2, 0, 3])
    native = Decoder(model, dtype, cache_growth=8, attention="native")
    xla = Decoder(model, dtype, cache_growth=8, attention="xla")
    assert (native.attention, native.attention_splits, native.xla_compiles) == ("native", 1, 0)
    got, want = run_decoder(native, ids, starts), run_decoder(xla, ids, starts)
    assert native.xla_compiles == 0 and xla.xla_compiles > 0  # no compile per (batch, capacity) shape
    tol = 2e-5 if dtype == "float32" else 5e-2
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=tol, rtol=tol)


def native_op():
    from kogpt2.native_ops import cached_attention_op

    return cached_attention_op()


def cache_case(rows=3, heads=2, slots=12, dim=16, seed=0):
    from kogpt2.tf_setup import import_tf

    tf = import_tf()
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((rows, heads, slots, dim)).astype(np.float32)
    values = rng.standard_normal((rows, heads, slots, dim)).astype(np.float32)
    qkv = rng.standard_normal((rows, 3 * heads * dim)).astype(np.float32)
    return tf, keys, values, qkv


def reference(keys, values, qkv, starts, slot):
    """numpy: the new key/value written at ``slot``, softmax attention over ``starts[b] .. slot``."""
    rows, heads, _, dim = keys.shape
    q, k_new, v_new = qkv.reshape(rows, 3, heads, dim).transpose(1, 0, 2, 3)
    keys, values = keys.copy(), values.copy()
    keys[:, :, slot], values[:, :, slot] = k_new, v_new
    out = np.zeros((rows, heads, dim), np.float64)
    for b in range(rows):
        for h in range(heads):
            s = keys[b, h, starts[b] : slot + 1] @ q[b, h] / np.sqrt(dim)
            w = np.exp(s - s.max())
            out[b, h] = (w / w.sum()) @ values[b, h, starts[b] : slot + 1]
    return out.reshape(rows, heads * dim), keys, values


def test_the_kernel_writes_in_place_and_reads_only_each_rows_filled_slots():
    """Slots before a row's start and after ``slot`` hold NaN: nothing of them reaches the output."""
    op = native_op()
    tf, keys, values, qkv = cache_case()
    starts, slot = np.array([0, 4, 9]), 9
    for array in (keys, values):
        array[:, :, slot + 1 :] = np.nan  # not filled yet
        array[1, :, :4] = np.nan  # row 1's left padding
    want, want_k, want_v = reference(keys, values, qkv, starts, slot)
    k_var, v_var = tf.Variable(keys), tf.Variable(values)
    out = op(k_var.handle, v_var.handle, tf.constant(qkv), tf.constant(starts, tf.int32), tf.constant(slot)).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_array_equal(k_var.numpy(), want_k)  # the new key at `slot`, nothing else changed
    np.testing.assert_array_equal(v_var.numpy(), want_v)


def test_a_tensor_read_from_the_cache_before_the_call_keeps_its_values():
    """The kernel writes in place only into a buffer nothing else holds: a live read is copied first."""
    op = native_op()
    tf, keys, values, qkv = cache_case()
    k_var, v_var = tf.Variable(keys), tf.Variable(values)
    before = k_var.read_value()  # shares the variable's buffer
    op(k_var.handle, v_var.handle, tf.constant(qkv), tf.constant([0, 0, 0], tf.int32), tf.constant(5))
    np.testing.assert_array_equal(before.numpy(), keys)
    assert not np.array_equal(k_var.numpy(), keys)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"slot": 12}, "slot 12 outside the cache's 12 slots"),
        ({"slot": -1}, "slot -1 outside"),
        ({"starts": [0, 7, 0]}, r"starts\[1\] = 7 outside \[0, slot 5\]"),
        ({"qkv_width": 95}, r"qkv must be \(3, 96\)"),
    ],
)
def test_the_kernel_refuses_bad_arguments_naming_them(change, message):
    op = native_op()
    tf, keys, values, qkv = cache_case()
    qkv = qkv[:, : change.get("qkv_width", qkv.shape[1])]
    starts = tf.constant(change.get("starts", [0, 0, 0]), tf.int32)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=message):
        op(
            tf.Variable(keys).handle,
            tf.Variable(values).handle,
            tf.constant(qkv),
            starts,
            tf.constant(change.get("slot", 5)),
        )


def test_auto_falls_back_to_xla_with_a_warning_when_the_kernel_cannot_be_built(monkeypatch, caplog):
    import kogpt2.decoder as decoder
    from kogpt2.native_ops import NativeOpError

    def no_kernel():
        raise NativeOpError("no C++ compiler: 'g++' not found (set CXX, or install g++)")

    monkeypatch.setattr(decoder, "cached_attention_op", no_kernel)
    decoder._warn_fallback.cache_clear()
    model = tiny_gpt2(32, 2)
    with caplog.at_level(logging.WARNING, logger="kogpt2.decoder"):
        dec = decoder.Decoder(model)
    assert dec.attention == "xla" and dec.attention_splits >= 1
    assert "using the slower XLA attention: no C++ compiler" in caplog.text
    with pytest.raises(NativeOpError, match="no C\\+\\+ compiler"):
        decoder.Decoder(model, attention="native")
    with pytest.raises(ValueError, match="head groups are the XLA attention's"):
        decoder.Decoder(model, attention="native", attention_splits=2)
    assert decoder.Decoder(model, attention="auto", attention_splits=2).attention == "xla"
    decoder._warn_fallback.cache_clear()


def test_a_missing_compiler_is_named(monkeypatch, tmp_path):
    from kogpt2 import native_ops

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(native_ops.CACHE_ENV, str(tmp_path / "ops"))
    with pytest.raises(native_ops.NativeOpError, match="no C\\+\\+ compiler: .*no-such-compiler"):
        native_ops.library_path()


def test_a_failed_build_says_why_and_leaves_no_file_in_the_cache(monkeypatch, tmp_path):
    from kogpt2 import native_ops

    cxx = tmp_path / "broken-cxx"
    cxx.write_text(
        '#!/bin/sh\nif [ "$1" = --version ]; then echo broken 1.0; exit 0; fi\n'
        'for a; do case "$a" in *.tmp) : > "$a";; esac; done\n'  # a partial output, as a crash leaves
        'echo "cached_attention.cc:1: error: simulated" >&2; exit 1\n'
    )
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv(native_ops.CACHE_ENV, str(tmp_path / "ops"))
    with pytest.raises(native_ops.NativeOpError, match=r"(?s)exit 1.*error: simulated"):
        native_ops.library_path()
    assert list((tmp_path / "ops").iterdir()) == []


@pytest.mark.slow
def test_two_processes_building_into_one_empty_cache_both_get_a_working_kernel(tmp_path):
    """Beam workers start together: each builds, renames into place, and loads a complete file."""
    script = textwrap.dedent(
        """
        import numpy as np
        import kogpt2
        from kogpt2.native_ops import cached_attention_op, library_path
        from kogpt2.tf_setup import import_tf
        tf = import_tf()
        op = cached_attention_op()
        k = tf.Variable(np.ones((1, 1, 4, 16), np.float32)); v = tf.Variable(np.ones((1, 1, 4, 16), np.float32))
        out = op(k.handle, v.handle, tf.ones([1, 48]), tf.constant([0]), tf.constant(2)).numpy()
        assert np.allclose(out, 1.0), out
        print(library_path())
        """
    )
    env = {**os.environ, "KOGPT2_OP_CACHE": str(tmp_path / "ops"), "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (_out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    paths = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(paths) == 1
    assert [f.name for f in (tmp_path / "ops").iterdir()] == [Path(paths.pop()).name]  # no temporary left
