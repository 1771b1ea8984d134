"""Generation library: strategies, stopping, reproducibility, prompt cuts, the decoder and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_sentences

from kogpt2.generation import GenerationConfig
from kogpt2.sampling import (
    DrawInputs,
    HostSampler,
    VocabRules,
    repeated_ngram_bans,
    row_seed,
    seen_tokens,
    take_rows,
    uniforms,
)

PROMPTS = ["이때", "그날 밤", "마침내 그는", "아이들은 강가에서 오래 기다렸다", "노인은"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from kogpt2.model import load_model

    return load_model(tiny_model_dir)


def gen(tiny, prompts, batch_size=64, **kw):
    from kogpt2.generation import generate

    model, tok = tiny
    kw.setdefault("max_new_tokens", 12)
    return generate(model, tok, prompts, GenerationConfig(**kw), batch_size=batch_size)


def texts(samples):
    return {(s.prompt, s.sample_index): s.text for s in samples}


def draw(logits, seeds, step=0, **kw):
    """Tokens the sampler draws for numpy ``logits`` (every token allowed)."""
    vocab = logits.shape[1]
    tokens, _ = HostSampler(vocab).draw(logits, DrawInputs.make(seeds, step, **kw), VocabRules.open(vocab))
    return tokens


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"strategy": "beam"}, "strategy"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size"),
        ({"num_samples": 0}, "num_samples"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"seed": -1}, "seed"),
        ({"strategy": "greedy", "top_p": 0.9}, "top_p"),
        ({"strategy": "greedy", "temperature": 0.7}, "temperature"),
    ],
)
def test_config_rejects_nonsense_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"GenerationConfig\.{field}="):
        GenerationConfig(**kwargs)


def test_config_is_frozen_and_defaults_to_the_notebook_budget():
    cfg = GenerationConfig()
    assert cfg.max_new_tokens == 100 and cfg.strategy == "sample"
    with pytest.raises(AttributeError):
        cfg.top_p = 0.5  # type: ignore[misc]


# -- pure sampling pieces -------------------------------------------------------------------


def test_row_seed_and_uniforms_are_pure_functions_of_stable_ids():
    assert row_seed("이때", 0, 7) == row_seed("이때", 0, 7)
    assert len({row_seed("이때", i, s) for i in range(3) for s in range(3)}) == 9
    seeds = np.array([row_seed(p, 0, 0) for p in PROMPTS], dtype=np.uint64)
    u = uniforms(seeds, step=3, attempts=17)
    assert u.shape == (5, 17) and np.all((u >= 0) & (u < 1))
    np.testing.assert_array_equal(u[[2, 0]], uniforms(seeds[[2, 0]], step=3, attempts=17))  # alone == in a batch
    np.testing.assert_array_equal(u[:, :1], uniforms(seeds, step=3))  # attempt a is the same draw however many
    assert not np.array_equal(u, uniforms(seeds, step=4, attempts=17))


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    pairs = seen_tokens(np.array([[0, 1, 0, 9], [2, 2, 0, 0]]), np.array([3, 2]))  # id 9 is past the length
    np.testing.assert_array_equal(pairs, [[0, 0], [0, 1], [1, 2]])
    logits = np.array([[4.0, 3.0, -1.0], [-1.0, -1.5, -3.0]], dtype=np.float32)
    seeds = np.arange(2, dtype=np.uint64)
    assert draw(logits, seeds, greedy=True).tolist() == [0, 0]
    penalized = np.array([[0, 0], [1, 0]])  # 4 / 2 < 3 in row 0; -1 * 2 < -1.5 in row 1
    assert draw(logits, seeds, greedy=True, penalized=penalized, penalty=np.array([2.0, 2.0])).tolist() == [1, 1]


def test_no_repeat_ngram_bans_the_token_that_would_repeat_a_bigram():
    bans = repeated_ngram_bans(np.array([[1, 2, 3, 1, 0], [4, 4, 4, 0, 0]]), np.array([4, 3]), 2)
    np.testing.assert_array_equal(bans, [[0, 2], [1, 4]])  # "1 2" seen and suffix "1"; "4 4" seen, suffix "4"
    logits = np.zeros((1, 6), dtype=np.float32)
    logits[0, 2] = 5.0
    assert draw(logits, np.zeros(1, np.uint64), greedy=True, banned=bans[:1]).tolist() == [0]


def test_nucleus_sampling_keeps_only_the_nucleus_and_matches_its_distribution():
    p = np.array([0.5, 0.3, 0.15, 0.05])  # top_p 0.75 keeps {0, 1}: renormalized 0.625 / 0.375
    logits = np.log(p)[None].repeat(4000, axis=0).astype(np.float32)
    seeds = np.array([row_seed("x", i, 0) for i in range(4000)], dtype=np.uint64)
    drawn = draw(logits, seeds, top_p=0.75)
    assert set(drawn.tolist()) == {0, 1}
    assert abs(np.mean(drawn == 0) - 0.625) < 0.03
    full = draw(logits, seeds, top_p=1.0)
    assert abs(np.mean(full == 3) - 0.05) < 0.015
    top2 = draw(logits, seeds, top_k=2)
    assert set(top2.tolist()) == {0, 1} and abs(np.mean(top2 == 0) - 0.625) < 0.03
    # per-row settings in one call: each row drawn as it would be alone
    mixed = draw(logits, seeds, top_p=np.where(np.arange(4000) % 2, 0.75, 1.0), top_k=np.arange(4000) % 3 == 0)
    for i in (0, 1, 2, 3, 4, 5):
        alone = draw(logits[i : i + 1], seeds[i : i + 1], top_p=0.75 if i % 2 else 1.0, top_k=int(i % 3 == 0))
        assert mixed[i] == alone[0]


def test_nucleus_draws_cover_a_large_vocabulary_exactly():
    """Block sums over 256-token blocks, then a search inside the block: every token reachable, none outside the nucleus."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(1, 1000)).astype(np.float32).repeat(3000, axis=0)
    seeds = np.arange(3000, dtype=np.uint64)
    p = np.exp(logits[0] - logits[0].max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    nucleus = set(order[: int(np.searchsorted(np.cumsum(p[order]), 0.5)) + 1].tolist())
    drawn = draw(logits, seeds, top_p=0.5)
    assert set(drawn.tolist()) <= nucleus and len(set(drawn.tolist())) > len(nucleus) // 2
    full = draw(logits, seeds)
    assert np.max(full) > 768  # the last, partial block is reached
    heavy = order[0]
    assert abs(np.mean(full == heavy) - p[heavy]) < 4 * np.sqrt(p[heavy] / 3000) + 1e-3


def mixed_draw_case():
    """48 rows of 700 logits with every kind of setting and constraint, spread over the batch."""
    rng = np.random.default_rng(5)
    rows, vocab = 48, 700
    logits = (rng.normal(size=(rows, vocab)) * 2).astype(np.float32)
    logits[30, 300] = logits[40, 301] = 20.0  # greedy rows whose best token is penalized / banned
    byte_of = np.full(vocab, 256, np.int32)
    byte_of[10:266] = np.arange(256)
    static_ok = np.ones(vocab, bool)
    static_ok[[0, 3, 5]] = False
    rules = VocabRules(static_ok, byte_of, 1)
    allowed = np.ones((rows, 257), bool)
    allowed[:, :32] = False  # control bytes
    allowed[::7, :] = False  # inside a character: only a few continuation bytes
    allowed[::7, 0x80:0x84] = True
    inputs = DrawInputs.make(
        np.arange(rows, dtype=np.uint64),
        2,
        greedy=np.arange(rows) % 5 == 0,
        temperature=np.where(np.arange(rows) % 3 == 0, 0.7, 1.0),
        top_k=np.where(np.arange(rows) % 4 == 1, 20, 0),
        top_p=np.where(np.arange(rows) % 2 == 0, 0.9, 1e-4),
        allowed_bytes=allowed,
        ban_eos=np.arange(rows) % 6 == 0,
        penalized=np.array([[1, 2], [2, 40], [4, 2], [30, 300], [31, 500]]),
        penalty=np.array([1.5, 1.5, 0.5, 100.0, 0.5]),
        banned=np.array([[1, 7], [9, 8], [25, 3], [40, 301]]),
        idle=np.isin(np.arange(rows), [10, 32, 45]),  # finished rows: nothing drawn
    )
    return logits, inputs, rules


def test_the_compiled_draw_equals_the_host_draw():
    """The XLA sampler (an alternative to measure) runs the same algorithm: same tokens, same scores."""
    from kogpt2.graph_sampling import GraphSampler

    logits, inputs, rules = mixed_draw_case()
    vocab, byte_of = logits.shape[1], rules.byte_of
    host_tokens, host_lp = HostSampler(vocab, threads=1).draw(logits, inputs, rules)
    graph_tokens, graph_lp = GraphSampler(vocab).draw(logits, inputs, rules)
    np.testing.assert_array_equal(host_tokens, graph_tokens)
    np.testing.assert_allclose(host_lp, graph_lp, atol=1e-4)
    assert all(0x80 <= byte_of[t] < 0x84 for t in host_tokens[::7])  # inside a character: its next byte
    assert host_tokens[[10, 32, 45]].tolist() == [0, 0, 0]
    assert not set(np.delete(host_tokens, [10, 32, 45]).tolist()) & {0, 3, 5, *range(10, 42)}


@pytest.mark.parametrize("threads", [2, 3])
def test_a_batch_drawn_in_parts_on_threads_draws_what_one_part_draws(threads):
    """Rows are independent: cut into parts (each with its own penalties and bans), the same tokens and scores."""
    logits, inputs, rules = mixed_draw_case()
    vocab = logits.shape[1]
    one = HostSampler(vocab, threads=1)
    many = HostSampler(vocab, threads=threads)
    tokens, scores = one.draw(logits, inputs, rules)
    assert tokens[30] != 300 and tokens[40] != 301  # the constraints of rows in a later part apply there
    for _ in range(2):  # the second time with the parts' buffers reused
        got_tokens, got_scores = many.draw(logits, inputs, rules)
        np.testing.assert_array_equal(got_tokens, tokens)
        np.testing.assert_array_equal(got_scores, scores)
    assert many.draw(logits[:20], take_rows(inputs, 0, 20), rules)[0].tolist() == tokens[:20].tolist()  # one part


def test_a_greedy_row_whose_best_token_is_not_allowed_takes_the_best_allowed_one():
    """Each constraint in turn hits a row's best token: the row takes the next best allowed token, as masking would."""
    rows, vocab = 8, 400
    logits = np.tile(np.linspace(0.0, 1.0, vocab, dtype=np.float32)[::-1], (rows, 1))  # token 0 best, then 1, 2...
    byte_of = np.full(vocab, 256, np.int32)
    byte_of[100:356] = np.arange(256)
    static_ok = np.ones(vocab, bool)
    static_ok[3] = False
    logits[1, 3] = 5.0  # row 1: the best token is suppressed for every row
    allowed = np.ones((rows, 257), bool)
    logits[2, 100] = 5.0  # row 2: the best token is the byte 0x00, not allowed there
    allowed[2, 0] = False
    logits[3, 1] = 5.0  # row 3: the best token is </s>, banned before min_new_tokens
    logits[4, 9] = 5.0  # row 4: the best token would repeat an n-gram
    logits[5, 7] = 5.0  # row 5: the best token is under a repetition penalty that brings it below token 0
    logits[5, 0] = 4.0
    allowed[6, :] = False  # row 6: inside a character, only bytes 0x80-0x81 may come next
    allowed[6, 0x80:0x82] = True
    logits[7, 12] = 0.5  # row 7: a penalty below 1 raises token 12 above the unconstrained best
    inputs = DrawInputs.make(
        np.arange(rows, dtype=np.uint64),
        0,
        greedy=True,
        allowed_bytes=allowed,
        ban_eos=np.arange(rows) == 3,
        penalized=np.array([[5, 7], [7, 12]]),
        penalty=np.array([3.0, 0.1]),
        banned=np.array([[4, 9]]),
    )
    tokens, scores = HostSampler(vocab).draw(logits, inputs, VocabRules(static_ok, byte_of, 1))
    assert tokens.tolist() == [0, 0, 0, 0, 0, 0, 100 + 0x80, 12]
    logz = np.log(np.exp(logits.astype(np.float64)).sum(axis=1))
    np.testing.assert_allclose(scores, logits[np.arange(rows), tokens] - logz, atol=1e-5)  # under the raw logits


def test_greedy_ties_and_tiny_cuts_pick_the_best_token():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 50)).astype(np.float32)
    logits[0, 7] = logits[0, 30] = logits[0].max() + 1  # a tie: the lower id wins
    seeds = np.arange(8, dtype=np.uint64)
    best = draw(logits, seeds, greedy=True)
    assert best[0] == 7
    np.testing.assert_array_equal(best, np.argmax(logits, axis=1))
    for kw in ({"top_k": 1, "top_p": 1.0}, {"top_k": 0, "top_p": 1e-6}, {"top_k": 5, "top_p": 1e-6}):
        np.testing.assert_array_equal(draw(logits, seeds, **kw), best)


def test_temperatures_too_small_for_float32_take_the_best_token():
    # logits / 1e-39 overflows float32 to inf (and inf - inf to NaN): such a temperature means greedy
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(16, 300)) * 5).astype(np.float32)
    seeds = np.arange(16, dtype=np.uint64)
    best = np.argmax(logits, axis=1)
    for t in (1e-39, 1e-20, 5e-5):
        for kw in ({"top_k": 0, "top_p": 1.0}, {"top_k": 0, "top_p": 0.9}, {"top_k": 20, "top_p": 1.0}):
            np.testing.assert_array_equal(draw(logits, seeds, step=3, temperature=t, **kw), best)


# -- the decoder matches the transformers model ---------------------------------------------


def test_decoder_logits_match_the_transformers_model(tiny):
    from kogpt2.decoder import Decoder
    from kogpt2.tf_setup import import_tf

    tf = import_tf()
    model, _ = tiny
    dec = Decoder(model, "float32")
    prompts = [[0, 10, 20, 30], [0, 55], [0, 7, 8, 9, 10, 11]]
    width = 8
    ids = np.full((3, width), 3)
    starts = np.array([width - len(p) for p in prompts])
    for b, p in enumerate(prompts):
        ids[b, starts[b] :] = p
    outs = [dec.prefill(ids, starts, width + 3)]
    seqs = [list(p) for p in prompts]
    for step, new in enumerate([[40, 41, 42], [50, 51, 52]]):
        for b in range(3):
            seqs[b].append(new[b])
        outs.append(dec.step(np.array(new), starts, width + step))
    for b in range(3):
        ref = model(tf.constant([seqs[b]]), training=False).logits.numpy()[0]
        n = len(prompts[b])
        for step, out in enumerate(outs):
            np.testing.assert_allclose(out[b], ref[n - 1 + step], atol=1e-4)


def test_head_groups_change_no_logit_bit(tmp_path):
    """The XLA attention split into head groups (run side by side) computes every head as before."""
    from transformers import GPT2Config, TFGPT2LMHeadModel

    from kogpt2.decoder import Decoder
    from kogpt2.tf_setup import import_tf

    tf = import_tf()
    tf.random.set_seed(3)
    model = TFGPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4))
    model(tf.constant([[1, 2]]))
    ids = np.array([[3, 3, 5, 6], [7, 8, 9, 10], [3, 11, 12, 13]])
    starts = np.array([2, 0, 1])
    logits = {}
    for splits in (1, 2, 4):
        dec = Decoder(model, "float32", cache_growth=8, attention_splits=splits, attention="xla")
        assert dec.attention_splits == splits
        outs = [dec.prefill(ids, starts, 20).numpy()]
        for slot in range(4, 12):  # crosses the level at 8
            outs.append(dec.step(np.array([slot, slot + 1, slot + 2]), starts, slot).numpy())
        dec.select_rows(np.array([2, 0]))  # a row finished
        outs.append(dec.step(np.array([20, 21]), starts[[2, 0]], 12).numpy())
        logits[splits] = outs
    for splits in (2, 4):
        for a, b in zip(logits[1], logits[splits], strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="attention_splits=3"):
        Decoder(model, "float32", attention_splits=3)


@pytest.mark.parametrize(
    "heads, cpus, splits", [(12, 2, 2), (12, 5, 4), (12, 1, 1), (12, 64, 12), (2, 8, 2), (7, 4, 1)]
)
def test_default_head_groups_divide_the_heads_up_to_the_cpus(heads, cpus, splits):
    from kogpt2.decoder import default_attention_splits

    assert default_attention_splits(heads, cpus) == splits


# -- strategies on the tiny model -----------------------------------------------------------


def test_greedy_is_deterministic_and_ignores_sample_index(tiny):
    a = gen(tiny, PROMPTS[:3], strategy="greedy", num_samples=2)
    b = gen(tiny, PROMPTS[:3], strategy="greedy", num_samples=2)
    assert texts(a) == texts(b)
    assert [(s.prompt, s.sample_index) for s in a] == [(p, i) for p in PROMPTS[:3] for i in range(2)]
    assert a[0].text == a[1].text
    assert all(
        s.text.startswith(s.prompt) and s.text == s.text[: len(s.text) - len(s.continuation)] + s.continuation
        for s in a
    )


def test_top_k_1_and_tiny_top_p_and_cold_temperature_equal_greedy(tiny):
    greedy = texts(gen(tiny, PROMPTS, strategy="greedy"))
    assert texts(gen(tiny, PROMPTS, top_k=1)) == greedy
    assert texts(gen(tiny, PROMPTS, top_p=1e-6)) == greedy
    assert texts(gen(tiny, PROMPTS, temperature=1e-4)) == greedy
    assert texts(gen(tiny, PROMPTS, top_p=0.95)) != greedy


def test_sampling_depends_on_seed_temperature_and_sample_index(tiny):
    base = gen(tiny, PROMPTS, num_samples=2, top_p=0.95, seed=1)
    assert texts(base) == texts(gen(tiny, PROMPTS, num_samples=2, top_p=0.95, seed=1))
    assert texts(base) != texts(gen(tiny, PROMPTS, num_samples=2, top_p=0.95, seed=2))
    assert texts(base) != texts(gen(tiny, PROMPTS, num_samples=2, top_p=0.95, seed=1, temperature=3.0))
    assert len({s.text for s in base}) == len(base)  # every sample differs
    assert len({s.row_seed for s in base}) == len(base)


def test_same_text_whatever_the_batch_and_order(tiny):
    kw = {"num_samples": 2, "top_p": 0.9, "repetition_penalty": 1.3, "max_new_tokens": 16}
    together = texts(gen(tiny, PROMPTS, **kw))
    reordered = texts(gen(tiny, PROMPTS[::-1], batch_size=3, **kw))
    alone = {}
    for p in PROMPTS:
        alone.update(texts(gen(tiny, [p], batch_size=1, **kw)))
    assert together == reordered == alone


def test_repetition_penalty_and_no_repeat_ngram_prevent_repeats(tiny):
    def ids(s):
        return list(s.new_ids)

    plain = gen(tiny, PROMPTS, strategy="greedy", max_new_tokens=20)
    assert any(len(set(ids(s))) < len(ids(s)) for s in plain)  # a random model loops without them

    penalized = gen(tiny, PROMPTS, strategy="greedy", max_new_tokens=20, repetition_penalty=100.0)
    assert all(len(set(ids(s))) == len(ids(s)) for s in penalized)

    _, tok = tiny
    banned = gen(tiny, PROMPTS, strategy="greedy", max_new_tokens=20, no_repeat_ngram_size=2)
    for s in banned:
        seq = [tok.bos_id, *tok.encode(s.prompt), *ids(s)]
        bigrams = list(zip(seq, seq[1:], strict=False))
        assert len(bigrams) == len(set(bigrams)), s.text


@pytest.fixture(scope="module")
def eos_model(tiny_model_dir):
    """The tiny model made context-free: every step gives </s> probability 0.08 (greedy: always </s>)."""
    from kogpt2.model import load_model

    model, tok = load_model(tiny_model_dir)
    tr = model.transformer
    emb = tr.wte.embeddings.numpy()
    emb[:, 0] = 0.0
    emb[tok.eos_id, 0] = 1.0
    tr.wte.embeddings.assign(emb)
    tr.ln_f.gamma.assign(np.zeros_like(tr.ln_f.gamma.numpy()))
    beta = np.zeros_like(tr.ln_f.beta.numpy())
    beta[0] = np.log(0.08 / 0.92 * (tok.vocab_size - 1))  # logits: eos = beta[0], every other token 0
    tr.ln_f.beta.assign(beta)
    return model, tok


def test_generation_stops_at_eos_and_reports_why(eos_model):
    from kogpt2.generation import generate

    model, tok = eos_model
    greedy = generate(model, tok, ["이때"], GenerationConfig(strategy="greedy"))[0]
    assert (greedy.finish_reason, greedy.new_tokens, greedy.new_ids, greedy.continuation) == (
        "eos",
        1,
        (tok.eos_id,),
        "",
    )

    cfg = GenerationConfig(num_samples=12, max_new_tokens=15, top_p=1.0)
    batch = generate(model, tok, PROMPTS[:2], cfg)  # 24 rows finishing at different steps
    reasons = {s.finish_reason for s in batch}
    assert reasons == {"eos", "length"}
    for s in batch:
        if s.finish_reason == "eos":
            assert s.new_ids[-1] == tok.eos_id and tok.eos_id not in s.new_ids[:-1] and s.new_tokens <= 15
        else:
            assert s.new_tokens == 15 and tok.eos_id not in s.new_ids
    alone = [
        generate(model, tok, [s.prompt], GenerationConfig(max_new_tokens=15, top_p=1.0, num_samples=12), batch_size=1)
        for s in batch[:1]
    ]
    assert [s.text for s in alone[0]] == [s.text for s in batch[:12]]


def test_long_prompts_are_cut_from_the_left_with_a_warning(tiny):
    from kogpt2.generation import generate

    model, tok = tiny
    long_prompt = " ".join(make_sentences(12))
    cfg = GenerationConfig(strategy="greedy", max_new_tokens=200)  # tiny model: 256 positions -> 56 prompt tokens
    with pytest.warns(UserWarning, match="1 of 2 prompts are longer than 56 tokens.*cut from the left"):
        cut, short = generate(model, tok, [long_prompt, "이때"], cfg)
    assert cut.truncated and cut.prompt_tokens == 56 and not short.truncated
    assert make_sentences(12)[-1].split()[-1] in cut.text and make_sentences(1)[0] not in cut.text
    with pytest.raises(ValueError, match="max_new_tokens=300"):
        generate(model, tok, ["이때"], GenerationConfig(max_new_tokens=300))


def test_bfloat16_generation_runs(tiny):
    from kogpt2.generation import generate

    model, tok = tiny
    out = generate(model, tok, PROMPTS[:2], GenerationConfig(strategy="greedy", max_new_tokens=5), dtype="bfloat16")
    assert [s.new_tokens for s in out] == [5, 5]


# -- CLI ------------------------------------------------------------------------------------


def test_cli_prints_one_line_per_sample_and_greedy_repeats(tiny_model_dir, capsys):
    from kogpt2.cli import main

    argv = ["generate", "--model", str(tiny_model_dir), "이때", "그날", "--greedy", "--max-new-tokens", "6"]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == first
    assert len(first) == 2 and first[0].startswith("이때") and first[1].startswith("그날")

    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "이때",
                "--num-samples",
                "3",
                "--top-k",
                "20",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_cli_rejects_greedy_with_sampling_flags(tiny_model_dir, capsys):
    from kogpt2.cli import main

    assert main(["generate", "--model", str(tiny_model_dir), "이때", "--greedy", "--top-p", "0.9"]) == 2
    assert "--greedy cannot be combined with --top-p" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model_dir), "이때", "--top-p", "2"]) == 2
    assert "top_p=2.0" in capsys.readouterr().err


def test_compiles_are_bounded_by_length_buckets_and_cache_levels(tiny):
    from kogpt2.generation import Generator

    model, tok = tiny
    gen = Generator(model, tok, batch_size=4, cache_growth=16, attention="xla")
    cfg = GenerationConfig(strategy="greedy", max_new_tokens=5)
    gen.generate(["이때", "그날"], cfg)
    first = gen.compiles
    assert first == 3  # prefill and step traces, one attention shape (the host sampler compiles nothing)
    assert gen.decoder._shapes == {(2, 16)}
    gen.generate(["마침내 그는", "노인은"], cfg)  # other prompts, same length bucket and batch shape
    gen.generate(["그날", "이때"], cfg)
    assert gen.compiles == first
    # a longer budget grows the cache level by level (multiples of 16): one attention shape per level
    gen.generate(["이때", "그날"], cfg.replace(max_new_tokens=40, min_new_tokens=40))
    assert {c for _, c in gen.decoder._shapes} == {16, 32, 48}  # slots 8 .. 46
    assert gen.compiles == first + 2


def test_the_native_attention_compiles_nothing_per_shape(tiny):
    from kogpt2.generation import Generator

    model, tok = tiny
    gen = Generator(model, tok, batch_size=4, cache_growth=16, attention="native")
    cfg = GenerationConfig(strategy="greedy", max_new_tokens=5)
    gen.generate(["이때", "그날"], cfg)
    assert gen.compiles == 2  # the prefill and step traces
    gen.generate(["이때", "그날", "마침내 그는"], cfg.replace(max_new_tokens=40, min_new_tokens=40))  # levels, batches
    assert gen.compiles == 2 and gen.decoder.capacity == 48


def test_cache_growth_changes_nothing_but_the_cache_size(tiny):
    from kogpt2.generation import Generator

    model, tok = tiny
    cfg = GenerationConfig(num_samples=3, max_new_tokens=40, top_p=0.9, seed=5)
    runs = {g: Generator(model, tok, batch_size=16, cache_growth=g).generate(PROMPTS, cfg) for g in (0, 16, 32)}
    assert texts(runs[0]) == texts(runs[16]) == texts(runs[32])
    assert max(s.new_tokens for s in runs[0]) > 32  # levels were crossed
    graph = Generator(model, tok, batch_size=16, sampler="graph").generate(PROMPTS, cfg)  # the draw in XLA
    assert texts(graph) == texts(runs[32])
    assert [s.logprob_sum for s in graph] == pytest.approx([s.logprob_sum for s in runs[32]], abs=1e-3)


def test_batches_of_long_rows_get_fewer_rows_so_a_worker_needs_no_more_memory(tiny):
    """rows x cache slots stays within a full batch of BATCH_SLOTS-slot rows (the cache and the prefill's
    activations grow with it), and each row's text is what it is in any other batch."""
    from kogpt2.decode_loop import BATCH_SLOTS, rows_per_batch
    from kogpt2.generation import Generator

    assert rows_per_batch(256, 107) == rows_per_batch(256, BATCH_SLOTS) == 256
    assert rows_per_batch(256, 131) == 240  # 250 fit: a multiple of 16, few shapes
    assert rows_per_batch(256, 356) == 80  # a 256-token prompt bucket with 100 new tokens
    assert [rows_per_batch(16, 137), rows_per_batch(4, 1024), rows_per_batch(1, 256)] == [8, 1, 1]
    model, tok = tiny
    prompts = [f"{p} {i}" for i in range(6) for p in ("이때", "노인은")]  # 12 rows, one length bucket
    seen = []
    generator = Generator(model, tok, batch_size=16)
    prefill = generator.decoder.prefill

    def spy(ids, starts, capacity):
        seen.append((ids.shape[0], capacity))
        return prefill(ids, starts, capacity)

    generator.decoder.prefill = spy
    cfg = GenerationConfig(top_p=0.9, max_new_tokens=130, seed=3)
    long = generator.generate(prompts, cfg)
    assert [rows for rows, _ in seen] == [8, 4]  # 137 slots: 8 rows a batch, not 16
    assert all(rows * slots <= 16 * BATCH_SLOTS for rows, slots in seen)
    seen.clear()
    generator.generate(prompts, cfg.replace(max_new_tokens=20))
    assert [rows for rows, _ in seen] == [16]  # short rows: the full batch (12 padded to 16)
    alone = Generator(model, tok, batch_size=1).generate(prompts[8:], cfg)  # rows of the second batch, one by one
    assert texts(alone) == {k: v for k, v in texts(long).items() if k[0] in prompts[8:]}


def test_partial_batches_are_padded_to_few_shapes_so_compiles_stay_bounded(tiny):
    """A job's last batches have every size; the decoder only sees powers of two (and the full batch)."""
    from kogpt2.generation import Generator, padded_batch

    assert [padded_batch(n, 64) for n in (1, 2, 3, 5, 33, 63, 64, 70)] == [1, 2, 4, 8, 64, 64, 64, 70]
    assert [padded_batch(n, 48) for n in (17, 33, 48)] == [32, 48, 48]
    model, tok = tiny
    gen = Generator(model, tok, batch_size=8)
    cfg = GenerationConfig(strategy="greedy", max_new_tokens=4)
    words = [*PROMPTS, "우리는", "사람들은", "어머니는"]
    alone = {p: gen.generate([p], cfg)[0].text for p in words}
    for n in range(1, 9):  # one partial batch of each size
        texts_n = [s.text for s in gen.generate(words[:n], cfg)]
        assert texts_n == [alone[p] for p in words[:n]]  # padding rows change nothing
    assert {b for b, _ in gen.decoder._shapes} <= {1, 2, 4, 8}
