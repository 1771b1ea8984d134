"""The generation contract: valid text, suppressed specials, scores, defaults, the reference, the CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from kogpt2.constraints import Utf8Guard, byte_piece_ids
from kogpt2.generation import GenerationConfig, Generator

PROMPTS = ["이때", "그날 밤", "마침내 그는", "아이들은 강가에서 오래 기다렸다", "노인은"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from kogpt2.model import load_model

    return load_model(tiny_model_dir)


def biased_model(tiny_model_dir, favoured: list[int], logit: float):
    """The tiny model made context-free: tokens in ``favoured`` get ``logit``, all others 0."""
    from kogpt2.model import load_model

    model, tok = load_model(tiny_model_dir)
    tr = model.transformer
    emb = tr.wte.embeddings.numpy()
    emb[:, 0] = 0.0
    emb[favoured, 0] = 1.0
    tr.wte.embeddings.assign(emb)
    tr.ln_f.gamma.assign(np.zeros_like(tr.ln_f.gamma.numpy()))
    beta = np.zeros_like(tr.ln_f.beta.numpy())
    beta[0] = logit
    tr.ln_f.beta.assign(beta)
    return model, tok


# -- valid UTF-8 ----------------------------------------------------------------------------


def test_utf8_guard_only_ever_allows_bytes_that_form_valid_utf8():
    byte_ids = np.arange(256, dtype=np.int64) + 10  # piece <0xNN> has id 10 + NN
    table = byte_piece_ids((int(i), f"<0x{i - 10:02X}>") for i in byte_ids)
    assert np.array_equal(table, byte_ids)
    rng = np.random.default_rng(0)
    rows = 64
    guard = Utf8Guard(table, rows)
    emitted: list[list[int]] = [[] for _ in range(rows)]
    for _ in range(200):
        logits = rng.normal(size=(rows, 300)).astype(np.float32)
        guard.mask(logits, np.arange(rows))
        chosen = np.array([rng.choice(np.flatnonzero(np.isfinite(row))) for row in logits])
        guard.advance(np.arange(rows), chosen)
        for r, t in enumerate(chosen.tolist()):
            if 10 <= t < 266:
                emitted[r].append(t - 10)
    for r in range(rows):
        data = bytes(emitted[r])
        cut = len(data) - guard.open_bytes(r)
        data[:cut].decode("utf-8")  # raises on any invalid sequence
        if guard.open_bytes(r):
            with pytest.raises(UnicodeDecodeError):
                data.decode("utf-8")  # the open tail is what gets dropped
    assert sum(len(e) for e in emitted) > 5000 and any(b >= 0xF0 for e in emitted for b in e)


def test_sampled_text_never_holds_replacement_characters(tiny_model_dir):
    model, tok = biased_model(tiny_model_dir, [], 0.0)
    byte_ids = [i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")]
    assert len(byte_ids) == 256  # the tiny tokenizer has byte fallback
    model, tok = biased_model(tiny_model_dir, byte_ids, 6.0)  # bytes are most of the mass
    cfg = GenerationConfig(num_samples=24, max_new_tokens=9, top_p=1.0, seed=3)
    free = Generator(model, tok).generate(PROMPTS[:2], cfg.replace(valid_utf8=False))
    assert sum("\ufffd" in s.text for s in free) > 10  # what sampling did before the guard
    guarded = Generator(model, tok).generate(PROMPTS[:2], cfg)
    assert not any("\ufffd" in s.text for s in guarded)
    assert any(s.dropped_tokens for s in guarded)  # characters left open at the budget were dropped
    for s in guarded:
        assert s.new_tokens == len(s.new_ids) == 9 - s.dropped_tokens or s.finish_reason == "eos"
        assert sum(tok.id_to_piece(i).startswith("<0x") for i in s.new_ids) > 0


def _unprintable(text: str) -> list[str]:
    import unicodedata

    return [c for c in text if c not in "\t\n" and unicodedata.category(c) in {"Cc", "Co", "Cn", "Cs"}]


def test_the_byte_state_allows_only_bytes_that_can_finish_a_printable_character():
    from kogpt2.constraints import next_bytes, unprintable_pieces

    start = next_bytes((), True)
    assert start[ord("a")] and start[ord("\n")] and start[ord("\t")] and start[256]
    assert not start[0x00] and not start[0x13] and not start[0x7F] and not start[ord("\r")]
    assert not start[0x80] and not start[0xC0] and not start[0xF5]  # continuation, overlong, past U+10FFFF
    assert start[0xEA] and not start[0xEE] and not start[0xF4]  # Hangul; all private use (U+E000.., plane 16)
    assert next_bytes((), False)[0xEE] and next_bytes((), False)[0x13]  # valid UTF-8 alone allows them
    after_c2 = next_bytes((0xC2,), True)  # U+0080 .. U+00BF: C1 controls, then Latin-1 signs
    assert not after_c2[256] and not after_c2[0x80] and not after_c2[0x9F] and after_c2[0xA0] and after_c2[0xBF]
    after_ef = next_bytes((0xEF,), True)  # U+F000 .. U+F8FF private use, then CJK compatibility
    assert not after_ef[0x80] and not after_ef[0xA3] and after_ef[0xA4]
    assert not next_bytes((0xED,), False)[0xA0]  # surrogates are never valid
    assert unprintable_pieces([(5, "가\x7f"), (6, "가 나"), (7, "\ue000"), (8, "\t\n")]) == [5, 7]


def test_generated_characters_are_always_printable(tiny_model_dir):
    """An untrained byte-fallback model, unfiltered and hot: byte pieces spell every kind of character."""
    from kogpt2.model import load_model

    model, tok = load_model(tiny_model_dir)
    byte_ids = {i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")}
    assert len(byte_ids) == 256  # the tiny tokenizer has byte fallback
    gen = Generator(model, tok)
    cfg = GenerationConfig(num_samples=64, max_new_tokens=24, top_p=1.0, temperature=3.0, seed=11)
    free = gen.generate(PROMPTS[:4], cfg.replace(valid_utf8=False))
    assert sum(bool(_unprintable(s.continuation)) for s in free) > 100  # what the model does unguarded
    guarded = gen.generate(PROMPTS[:4], cfg)
    assert len(guarded) == 256
    assert [c for s in guarded for c in _unprintable(s.continuation)] == []
    assert not any("\ufffd" in s.text for s in guarded)
    assert sum(t in byte_ids for s in guarded for t in s.new_ids) > 2000  # most characters were spelled in bytes
    assert sum(ord(c) > 0x7F and not 0xAC00 <= ord(c) <= 0xD7A3 for s in guarded for c in s.continuation) > 300


def test_special_pieces_are_never_sampled_unless_asked(tiny_model_dir):
    model, tok = biased_model(tiny_model_dir, [], 0.0)
    specials = sorted((set(tok.special_ids) | {tok.unk_id}) - {tok.eos_id})
    assert {tok.bos_id, tok.pad_id, tok.unk_id} <= set(specials)
    model, tok = biased_model(tiny_model_dir, specials, 8.0)
    cfg = GenerationConfig(num_samples=8, max_new_tokens=6, top_p=1.0)
    default = Generator(model, tok).generate(PROMPTS[:2], cfg)
    assert not any(set(s.new_ids) & set(specials) for s in default)
    allowed = Generator(model, tok).generate(PROMPTS[:2], cfg.replace(suppress_tokens=()))
    assert sum(len(set(s.new_ids) & set(specials)) for s in allowed) > 10


# -- scores ---------------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.0, 1.8])
def test_scores_are_log_probabilities_under_the_raw_model(tiny, penalty):
    import tensorflow as tf

    model, tok = tiny
    cfg = GenerationConfig(strategy="greedy", max_new_tokens=6, repetition_penalty=penalty)
    for s in Generator(model, tok).generate(PROMPTS[:3], cfg):
        seq = [tok.bos_id, *tok.encode(s.prompt), *s.new_ids]
        logp = tf.nn.log_softmax(model(tf.constant([seq]), training=False).logits[0]).numpy()
        start = len(seq) - len(s.new_ids)
        expected = sum(logp[start - 1 + i, t] for i, t in enumerate(s.new_ids))
        assert s.logprob_sum == pytest.approx(expected, abs=1e-3)
        assert s.logprob_mean == pytest.approx(expected / len(s.new_ids), abs=1e-3)


# -- min_new_tokens and stop strings ----------------------------------------------------------


def test_min_new_tokens_holds_back_eos_and_stop_strings_end_rows(tiny_model_dir, tiny):
    model, tok = biased_model(tiny_model_dir, [1], 12.0)  # </s> nearly always
    assert all(s.new_tokens == 1 for s in Generator(model, tok).generate(PROMPTS, GenerationConfig()))
    held = Generator(model, tok).generate(PROMPTS, GenerationConfig(min_new_tokens=4))
    assert all(s.new_tokens == 5 and s.finish_reason == "eos" for s in held)

    model, tok = tiny
    plain = Generator(model, tok).generate(PROMPTS, GenerationConfig(strategy="greedy", max_new_tokens=12))
    target = next(s for s in plain if len(s.continuation.strip()) > 4)
    stop = target.continuation.strip()[1:3]
    stopped = Generator(model, tok).generate(
        [target.prompt], GenerationConfig(strategy="greedy", max_new_tokens=12, stop=(stop,))
    )[0]
    assert stopped.finish_reason == "stop" and stop in stopped.continuation
    assert stopped.new_tokens < target.new_tokens and target.new_ids[: stopped.new_tokens] == stopped.new_ids


# -- one contract ---------------------------------------------------------------------------


def test_defaults_come_from_the_library_then_the_folder_then_the_flags(tiny_model_dir, tmp_path):
    import shutil

    from kogpt2.commands.generate import add_arguments, resolve
    from kogpt2.generation import write_generation_config

    def cli(*argv, folder=None):
        p = __import__("argparse").ArgumentParser()
        add_arguments(p)
        return resolve(p.parse_args(["--model", "m", "x", *argv]), folder)[0]

    assert cli() == GenerationConfig() and GenerationConfig().top_p == 0.95  # one set of defaults
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    write_generation_config(folder, GenerationConfig(top_k=40, temperature=0.8, max_new_tokens=30), {"eos_token_id": 1})
    from_folder = cli(folder=folder)
    assert (from_folder.top_k, from_folder.temperature, from_folder.max_new_tokens) == (40, 0.8, 30)
    flagged = cli("--top_k", "5", "--max-new-tokens", "7", "--num_return_sequences", "3", folder=folder)
    assert (flagged.top_k, flagged.temperature, flagged.max_new_tokens, flagged.num_samples) == (5, 0.8, 7, 3)
    greedy = cli("--greedy", folder=folder)  # the folder's sampling settings mean nothing for greedy
    assert greedy.greedy and (greedy.top_k, greedy.temperature, greedy.max_new_tokens) == (0, 1.0, 30)
    assert cli("--do_sample", "--stop", "다.", "--stop", "\n", "--min-new-tokens", "2").stop == ("다.", "\n")
    with pytest.raises(ValueError, match="--greedy cannot be combined with --top-k"):
        cli("--greedy", "--top-k", "3")
    # a --config file between the folder and the flags (a bulk job's job.json works: other keys ignored)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"top_k": 9, "max_new_tokens": 11, "batch_size": 8, "seeds": ["s.txt"]}))
    from_file = cli("--config", str(job), "--max-new-tokens", "12", folder=folder)
    assert (from_file.top_k, from_file.temperature, from_file.max_new_tokens) == (9, 0.8, 12)
    hf = json.loads((folder / "generation_config.json").read_text())
    assert hf["do_sample"] is True and hf["top_k"] == 40 and hf["eos_token_id"] == 1


# -- the reference implementation -------------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 2}])
def test_greedy_equals_transformers_generate_token_for_token(tiny_model_dir, extra):
    """Our batched, left-padded, cached greedy decoding vs ``TFGPT2LMHeadModel.generate(do_sample=False)``."""
    import tensorflow as tf

    from kogpt2.model import load_model

    model, tok = load_model(tiny_model_dir)
    emb = model.transformer.wte.embeddings
    emb.assign(emb.numpy() * 4.0)  # spread the logits: no near-ties decide a token
    suppressed = sorted((set(tok.special_ids) | {tok.unk_id}) - {tok.eos_id})
    cfg = GenerationConfig(strategy="greedy", max_new_tokens=10, valid_utf8=False, **extra)
    ours = Generator(model, tok, batch_size=8).generate(PROMPTS, cfg)  # five prompt lengths in one batch
    assert len({len(tok.encode(p)) for p in PROMPTS}) >= 4
    for s in ours:
        ids = tf.constant([[tok.bos_id, *tok.encode(s.prompt)]])
        ref = model.generate(
            ids,
            do_sample=False,
            max_new_tokens=10,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
            suppress_tokens=suppressed,
            repetition_penalty=extra.get("repetition_penalty", 1.0),
            no_repeat_ngram_size=extra.get("no_repeat_ngram_size", 0),
        ).numpy()[0, ids.shape[1] :]
        ref_ids = list(ref)
        if tok.eos_id in ref_ids:
            ref_ids = ref_ids[: ref_ids.index(tok.eos_id) + 1]
        assert list(s.new_ids) == ref_ids, s.prompt


# -- the CLI for real work -------------------------------------------------------------------


def test_cli_reads_prompts_from_a_file_and_stdin_and_writes_jsonl(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from kogpt2.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("이때\n\n그날 밤\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(tiny_model_dir), "--max_new_tokens", "4", "--num-return-sequences", "2"]
    assert main([*args, "--input", str(prompts), "--jsonl", "--output", str(out), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["prompt"], r["sample_index"]) for r in rows] == [
        ("이때", 0),
        ("이때", 1),
        ("그날 밤", 0),
        ("그날 밤", 1),
    ]
    assert all(r["logprob_sum"] < 0 and r["new_tokens"] <= 4 for r in rows)
    assert "4/4 rows" in capsys.readouterr().err  # more than one batch: a progress bar

    monkeypatch.setattr("sys.stdin", io.StringIO("노인은\n"))
    assert main([*args, "--greedy"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0].startswith("노인은")

    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["generate", "--model", str(tiny_model_dir)]) == 2
    assert "no prompt" in capsys.readouterr().err
