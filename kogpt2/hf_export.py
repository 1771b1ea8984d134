"""Hugging Face tokenizer files for a model folder, so ``AutoTokenizer.from_pretrained(folder)`` opens it.

A SentencePiece tokenizer is converted to a ``tokenizers`` ``tokenizer.json`` that encodes like
:meth:`kogpt2.tokenizer.Tokenizer.encode`:

* normalizer: NFKC as Python's (``tokenizers``' NFKC follows an older Unicode version: the 72
  characters it does not map, e.g. U+32FF ㋿ -> 令和, are mapped first), then the model's own
  SentencePiece normalizer (its precompiled charsmap, e.g. ``nmt_nfkc``), its whitespace rules
  (leading and trailing spaces dropped, runs collapsed) and the ``▁`` dummy prefix;
* model: a BPE model (SentencePiece BPE, KoGPT2 v1) whose merges are the pairs of pieces that
  join into a piece, ranked by the joined piece's score; or a Unigram model (SentencePiece
  unigram, ``train_tokenizer``) with the same scores;
* special and reserved pieces (``<s>``, ``</s>``, ``<pad>``, ``<unk>``, ``<usr>``, ``<unusedN>``,
  byte pieces) are never produced from text: BPE has no merge into them, Unigram gives them a
  score no segmentation can prefer, and characters no piece covers are segmented on their own so
  a reserved piece cannot swallow them; ``tokenizer_config.json`` sets
  ``split_special_tokens: true`` so a typed ``</s>`` is text, as in our ``encode``;
* byte fallback and ``<unk>`` as SentencePiece: a run of characters no piece covers becomes one
  ``<unk>``, or its UTF-8 bytes where the model has byte pieces;
* decoding drops special pieces and gives ``ㅋㅋ`` back as ``ㅋㅋ``, as our ``decode``.

The SentencePiece model proto is read on the wire (no generated protobuf module: the one
sentencepiece ships needs protobuf 7, TensorFlow keeps protobuf 6).

Known differences:

* Unigram models only: where two segmentations score exactly the same, SentencePiece's float32
  sums pick one by rounding and ``tokenizers``' float64 sums another: the same pieces in another
  order (equal as a multiset, equal decoded). In practice a run of one repeated unit
  (``ㅎㅎㅎㅎㅎㅎㅎㅎㅎ``, ``♥♥♥♥♥♥♥``, 17 dots): 369 of the 356,238 shared reviews with an
  8,000-piece unigram tokenizer trained on reviews.
* BPE models, in principle: SentencePiece breaks a tie between two different pairs that merge
  into the same piece by position, ``tokenizers`` by rank; they could differ where such pairs
  overlap (``[ㅋ, ㅋㅋ, ㅋ]``). Never seen: 0 differing lines with KoGPT2 v1 (the novel, all
  356,238 reviews, 46,000 generated edge cases) and with an 8,000-piece BPE tokenizer trained on
  reviews (all reviews).
"""

from __future__ import annotations

import functools
import json
import os
import struct
import sys
import tempfile
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kogpt2.tokenizer import (
    _COMPAT_JAMO,
    CONVERTED_FROM_KEY,
    HFJsonTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    _proto_fields,
    file_fingerprint,
)

#: The files :func:`write_hf_tokenizer` writes into a model folder.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2
_SPACE = "\u2581"


class HFExportError(ValueError):
    """A tokenizer cannot be written as Hugging Face files that encode exactly like it."""


# ----------------------------------------------------------------------------- the model proto


def _scalar(raw: bytes, wire: int) -> int | float:
    """The value of a varint (wire 0) or fixed32 float (wire 5) field from its raw bytes."""
    pos = 0
    while raw[pos] & 0x80:  # skip the key
        pos += 1
    pos += 1
    if wire == 5:
        return float(struct.unpack("<f", raw[pos : pos + 4])[0])
    value = shift = 0
    for b in raw[pos:]:
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            break
    return value


@dataclass
class SpmModel:
    """The parts of a SentencePiece ``ModelProto`` that decide how text is encoded."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = _UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def parse_spm(model_proto: bytes) -> SpmModel:
    """Read the pieces, trainer and normalizer settings of a SentencePiece model.

    Args:
        model_proto: the bytes of a ``.spiece`` / ``.model`` file.

    Returns:
        The parsed :class:`SpmModel`.

    Raises:
        HFExportError: the bytes are not a SentencePiece model.
    """
    out = SpmModel()
    try:
        for number, wire, _raw, payload in _proto_fields(model_proto):
            if number == 1 and wire == 2:
                piece, score, kind = "", 0.0, _NORMAL
                for n, w, r, p in _proto_fields(payload):
                    if n == 1:
                        piece = p.decode("utf-8")
                    elif n == 2 and w == 5:
                        score = float(_scalar(r, w))
                    elif n == 3 and w == 0:
                        kind = int(_scalar(r, w))
                out.pieces.append((piece, score, kind))
            elif number == 2 and wire == 2:  # TrainerSpec
                for n, w, r, _ in _proto_fields(payload):
                    if n == 3 and w == 0:
                        out.model_type = int(_scalar(r, w))
                    elif n == 35 and w == 0:
                        out.byte_fallback = bool(_scalar(r, w))
                    elif n == 24 and w == 0:
                        out.treat_whitespace_as_suffix = bool(_scalar(r, w))
            elif number == 3 and wire == 2:  # NormalizerSpec
                for n, w, r, p in _proto_fields(payload):
                    if n == 2 and w == 2:
                        out.charsmap = p
                    elif n == 3 and w == 0:
                        out.add_dummy_prefix = bool(_scalar(r, w))
                    elif n == 4 and w == 0:
                        out.remove_extra_whitespaces = bool(_scalar(r, w))
                    elif n == 5 and w == 0:
                        out.escape_whitespaces = bool(_scalar(r, w))
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise HFExportError(f"not a SentencePiece model: {exc}") from exc
    if not out.pieces:
        raise HFExportError("not a SentencePiece model: it has no pieces")
    return out


# ----------------------------------------------------------------------------- conversion


@functools.lru_cache(maxsize=1)
def _nfkc_gaps() -> tuple[tuple[str, str], ...]:
    """Characters whose NFKC form Python knows but the installed ``tokenizers`` NFKC does not
    (it follows an older Unicode version: e.g. U+32FF ㋿ -> 令和, U+1FBF0.. segmented digits)."""
    from tokenizers import normalizers

    nfkc = normalizers.NFKC()
    gaps = []
    for cp in range(sys.maxunicode + 1):
        c = chr(cp)
        if unicodedata.decomposition(c):
            want = unicodedata.normalize("NFKC", c)
            if nfkc.normalize_str(c) != want:
                gaps.append((c, want))
    return tuple(gaps)


def _char_class(chars: set[str]) -> str:
    """An Oniguruma character class body matching exactly ``chars`` (as code point ranges)."""
    cps = sorted(ord(c) for c in chars)
    parts: list[str] = []
    i = 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        parts.append(f"\\x{{{cps[i]:X}}}" if i == j else f"\\x{{{cps[i]:X}}}-\\x{{{cps[j]:X}}}")
        i = j + 1
    return "".join(parts)


def _bpe_merges(pieces: list[tuple[str, float, int]]) -> Iterator[tuple[str, str]]:
    """Pairs of pieces that join into a piece, best joined piece first (SentencePiece's order:
    by score; pairs joining into the same piece, longer left part first)."""
    mergeable = {p: i for i, (p, _, kind) in enumerate(pieces) if kind == _NORMAL}
    ranked = []
    for piece, i in mergeable.items():
        score = pieces[i][1]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, i, -len(left), left, right))
    ranked.sort()
    for *_, left, right in ranked:
        yield left, right


def _check(spm: SpmModel, unk_id: int) -> tuple[set[str], set[str]]:
    """Refuse what cannot be converted exactly; return (known characters, characters of reserved pieces)."""
    if spm.treat_whitespace_as_suffix:
        raise HFExportError("SentencePiece models with treat_whitespace_as_suffix are not supported")
    if spm.model_type not in (_UNIGRAM, _BPE):
        raise HFExportError(f"SentencePiece model type {spm.model_type} is not supported (only unigram and BPE)")
    if any(kind == _USER_DEFINED for _, _, kind in spm.pieces):
        raise HFExportError("SentencePiece user-defined pieces that text may match are not supported")
    if not 0 <= unk_id < len(spm.pieces):
        raise HFExportError("the SentencePiece model has no <unk> piece")
    known = {p for p, _, kind in spm.pieces if kind == _NORMAL and len(p) == 1}
    reserved_chars: set[str] = set()
    for piece, _, kind in spm.pieces:
        if kind == _NORMAL:
            missing = set(piece) - known
            if missing:
                raise HFExportError(f"piece {piece!r} holds characters that are not pieces themselves: {missing}")
        else:
            if len(piece) == 1:
                raise HFExportError(f"reserved one-character piece {piece!r} is not supported")
            if spm.model_type == _UNIGRAM and not spm.byte_fallback and not set(piece) & known:
                raise HFExportError(f"reserved piece {piece!r} is made of uncovered characters only")
            reserved_chars |= set(piece)
    if spm.model_type == _BPE:
        # SentencePiece BPE merges into an UNUSED piece and splits it back at the end; a BPE
        # model without that merge would segment the neighbours differently.
        pieces = {p for p, _, kind in spm.pieces if kind in (_NORMAL, _UNUSED)}
        for piece, _, kind in spm.pieces:
            if kind == _UNUSED and any(piece[:c] in pieces and piece[c:] in pieces for c in range(1, len(piece))):
                raise HFExportError(f"BPE piece {piece!r} is unused but two pieces merge into it; not supported")
    return known, reserved_chars


def spm_to_hf(model_proto: bytes) -> Any:
    """Convert a SentencePiece model to a ``tokenizers.Tokenizer`` that encodes like it.

    Args:
        model_proto: the model as SentencePiece encodes with it (for our tokenizers, the copy
            whose special pieces are UNUSED: see :func:`kogpt2.tokenizer.mark_pieces_unused`).

    Returns:
        A ``tokenizers.Tokenizer`` with no special tokens added yet.

    Raises:
        HFExportError: the model uses a feature that cannot be converted exactly.
    """
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    spm = parse_spm(model_proto)
    pieces = spm.pieces
    unk_id = next((i for i, (_, _, kind) in enumerate(pieces) if kind == _UNKNOWN), -1)
    known, reserved_chars = _check(spm, unk_id)
    unk_piece = pieces[unk_id][0]
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    model: Any
    pre_tokenizer: Any = None
    if spm.model_type == _BPE:
        model = models.BPE(
            vocab=vocab,
            merges=list(_bpe_merges(pieces)),
            unk_token=unk_piece,
            fuse_unk=True,
            byte_fallback=spm.byte_fallback,
            ignore_merges=False,
        )
    else:
        normal = [s for _, s, kind in pieces if kind == _NORMAL]
        longest = max((len(p) for p, _, kind in pieces if kind != _NORMAL), default=1)
        # Below any run of one-character pieces as long as the reserved piece: never chosen.
        reserved_score = min(normal, default=0.0) * (longest + 1) - 100.0
        scored = [(p, s if kind == _NORMAL else reserved_score) for p, s, kind in pieces]
        model = models.Unigram(scored, unk_id, spm.byte_fallback)
        if reserved_chars - known:
            # A character no piece covers must not be swallowed by a reserved piece ("<0x41>" with
            # "<" uncovered): it is segmented on its own (with byte fallback, one character at a
            # time: its bytes are the same; without, a run at a time: the run is one <unk>).
            run = "" if spm.byte_fallback else "+"
            pre_tokenizer = pre_tokenizers.Split(Regex(f"[^{_char_class(known)}]{run}"), behavior="isolated")
    # Python's NFKC first (Unicode 14 in 3.11), where the tokenizers NFKC is older: those characters
    # are mapped by hand, then tokenizers' NFKC composes as Python's does.
    steps: list[Any] = [normalizers.Replace(c, nfkc) for c, nfkc in _nfkc_gaps()]
    steps.append(normalizers.NFKC())
    if spm.charsmap:
        steps.append(normalizers.Precompiled(spm.charsmap))
    if spm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A | \z"), "")]
    if spm.add_dummy_prefix:
        steps.append(normalizers.Prepend(_SPACE if spm.escape_whitespaces else " "))
    if spm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", _SPACE))
    tok = HFTokenizer(model)
    tok.normalizer = normalizers.Sequence(steps)
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    dec: list[Any] = [decoders.Replace(_SPACE, " ")]
    if spm.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if spm.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    # as our decode: the conjoining jamo NFKC made (ᄏ) back to the compatibility jamo typed (ㅋ)
    dec += [decoders.Replace(chr(cp), compat) for cp, compat in sorted(_COMPAT_JAMO.items())]
    tok.decoder = decoders.Sequence(dec)
    specials = [p for p, _, kind in pieces if kind in (_CONTROL, _UNKNOWN, _UNUSED)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in specials])
    return tok


# ----------------------------------------------------------------------------- folder files


def _role_pieces(tokenizer: Tokenizer) -> dict[str, str]:
    return {
        "bos_token": tokenizer.id_to_piece(tokenizer.bos_id),
        "eos_token": tokenizer.id_to_piece(tokenizer.eos_id),
        "unk_token": tokenizer.id_to_piece(tokenizer.unk_id),
        "pad_token": tokenizer.id_to_piece(tokenizer.pad_id),
    }


def _file_in(folder: Path, tokenizer: Tokenizer) -> str:
    """The name of the tokenizer's own file inside ``folder`` (its saved copy or the original)."""
    for name in (tokenizer.canonical_name, tokenizer.path.name):
        path = folder / name
        if path.is_file() and file_fingerprint(path) == tokenizer.fingerprint:
            return name
    raise HFExportError(
        f"{folder} does not hold the tokenizer file {tokenizer.path.name} (sha256 {tokenizer.fingerprint[:12]}...); "
        "save the tokenizer into the folder first (Tokenizer.save or kogpt2.model.save_model)"
    )


def write_hf_tokenizer(tokenizer: Tokenizer, folder: str | Path, *, model_max_length: int | None = None) -> list[Path]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``folder``.

    A SentencePiece tokenizer is converted (see the module docstring); ``tokenizer_config.json``
    names the SentencePiece file, so :func:`kogpt2.tokenizer.load_tokenizer` keeps loading it. A
    ``tokenizer.json`` tokenizer gets the two config files naming its special pieces. Writing
    again gives the same bytes.

    Args:
        tokenizer: the folder's tokenizer.
        folder: a model folder.
        model_max_length: the model's context length (``n_positions``), if known.

    Returns:
        The files written.

    Raises:
        HFExportError: the tokenizer uses a SentencePiece feature that cannot be converted exactly,
            or its file is not in ``folder``.
    """
    from transformers import PreTrainedTokenizerFast

    out = Path(folder)
    roles = _role_pieces(tokenizer)
    source: dict[str, str] | None = None
    if isinstance(tokenizer, SentencePieceTokenizer):
        backend = spm_to_hf(tokenizer.encoder_proto)
        source = {"file": _file_in(out, tokenizer), "fingerprint": tokenizer.fingerprint}
    elif isinstance(tokenizer, HFJsonTokenizer):
        from tokenizers import Tokenizer as HFTokenizer

        backend = HFTokenizer.from_file(str(tokenizer.path))
    else:  # pragma: no cover - no other kind exists
        raise HFExportError(f"cannot export a {type(tokenizer).__name__}")
    specials = sorted(
        (i for i in tokenizer.special_ids if i not in {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}),
    )
    extra = [tokenizer.id_to_piece(i) for i in specials if tokenizer.id_to_piece(i) not in roles.values()]
    kwargs: dict[str, Any] = {
        **roles,
        "additional_special_tokens": extra,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
    }
    if model_max_length:
        kwargs["model_max_length"] = int(model_max_length)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    # A tokenizer.json tokenizer keeps its own file (its fingerprint is the folder's): only the configs are new.
    names = HF_TOKENIZER_FILES if source is not None else HF_TOKENIZER_FILES[1:]
    with tempfile.TemporaryDirectory(dir=out, prefix=".hf-export-") as tmp:
        hf.save_pretrained(tmp, legacy_format=False)
        config_path = Path(tmp) / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if source is not None:
            config[CONVERTED_FROM_KEY] = source
        config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        for name in names:
            os.replace(Path(tmp) / name, out / name)
    return [out / name for name in names]


def export_folder(folder: str | Path) -> list[Path]:
    """Add the Hugging Face tokenizer files to an existing model folder (``kogpt2 export``).

    Args:
        folder: a model folder holding a tokenizer (``tokenizer.spiece``, ``gpt2_kor_tokenizer.spiece``,
            ``tokenizer.json``) and, optionally, ``config.json`` (its ``n_positions`` is the
            tokenizer's ``model_max_length``).

    Returns:
        The files written.

    Raises:
        HFExportError: not a folder, no tokenizer in it, or a tokenizer that cannot be converted.
    """
    from kogpt2.tokenizer import load_tokenizer

    path = Path(folder)
    if not path.is_dir():
        raise HFExportError(f"{path}: not a folder; give a model folder (config.json, weights, tokenizer)")
    try:
        tokenizer = load_tokenizer(path)
    except TokenizerError as exc:
        raise HFExportError(f"{exc}; nothing to export") from exc
    max_len = None
    config = path / "config.json"
    if config.is_file():
        try:
            max_len = json.loads(config.read_text(encoding="utf-8")).get("n_positions")
        except (ValueError, AttributeError):
            max_len = None
    return write_hf_tokenizer(tokenizer, path, model_max_length=max_len if isinstance(max_len, int) else None)
