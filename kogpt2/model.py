"""Model folders: load, create and save GPT-2 LM models with their tokenizer.

A model folder is self-describing: ``save_pretrained`` weights and config, the
tokenizer file, and ``kogpt2.json`` recording what produced them.
"""

from __future__ import annotations

import json
import logging
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kogpt2.outputs import MODEL_INFO_FILE
from kogpt2.tf_setup import import_tf
from kogpt2.tokenizer import Tokenizer, file_fingerprint, load_tokenizer
from kogpt2.validate import check_int

log = logging.getLogger(__name__)

#: Safe weight files, in the order ``TFGPT2LMHeadModel.from_pretrained`` prefers them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "tf_model.h5", "tf_model.h5.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
#: Every weight file a model folder may hold (single or sharded, any framework): a saved folder keeps one.
WEIGHT_PATTERNS = (
    "model*.safetensors",
    "model.safetensors.index.json",
    "tf_model*.h5",
    "tf_model.h5.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "flax_model*.msgpack",
    "flax_model.msgpack.index.json",
)


class ModelLoadError(ValueError):
    """A model folder or id cannot be loaded safely."""


@dataclass(frozen=True)
class Preset:
    """A GPT-2 shape. Vocabulary size comes from the tokenizer."""

    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int = 1024

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "n_positions"):
            check_int("Preset", name, getattr(self, name), low=1)
        if self.n_embd % self.n_head:
            raise ValueError(f"Preset.n_embd={self.n_embd} must be divisible by n_head={self.n_head}")


PRESETS: dict[str, Preset] = {
    "tiny": Preset(n_layer=2, n_embd=128, n_head=2, n_positions=256),
    "small": Preset(n_layer=6, n_embd=512, n_head=8),
    "base": Preset(n_layer=12, n_embd=768, n_head=12),  # the KoGPT2 shape
}


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a saved model or a data set."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("kogpt2-pipeline", "tensorflow", "tf-keras", "transformers", "sentencepiece", "apache-beam"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def model_fingerprint(folder: str | Path) -> str:
    """sha256 of the weights that load: the first of :data:`WEIGHT_FILES` present, in
    ``from_pretrained``'s order (``model.safetensors`` before ``tf_model.h5``).

    A sharded checkpoint (an ``*.index.json``) is hashed over the index and every shard it names,
    in the index's order, so a changed shard changes the fingerprint.
    """
    import hashlib
    import json

    folder = resolve_model_folder(folder)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            if not name.endswith(".index.json"):
                return file_fingerprint(folder / name)
            index = json.loads((folder / name).read_text(encoding="utf-8"))
            shards = sorted(set(dict(index.get("weight_map") or {}).values()))
            digest = hashlib.sha256(f"{name}\t{file_fingerprint(folder / name)}\n".encode())
            for shard in shards:
                if not (folder / shard).is_file():
                    raise ModelLoadError(f"{folder}: {name} names {shard}, which is missing")
                digest.update(f"{shard}\t{file_fingerprint(folder / shard)}\n".encode())
            return digest.hexdigest()
    raise ModelLoadError(f"{folder}: no weight file ({', '.join(WEIGHT_FILES)})")


def resolve_model_folder(path: str | Path) -> Path:
    """A local model folder as it is, or the committed version of a training output folder (its ``COMPLETED``)."""
    from kogpt2 import outputs

    try:
        return Path(outputs.version_root(str(path), job="train"))
    except outputs.NotCommittedError as exc:
        raise ModelLoadError(str(exc)) from None


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files in a model folder (:data:`WEIGHT_PATTERNS`), sorted."""
    folder = Path(folder)
    return sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})


def _align_special_ids(model: Any, tokenizer: Tokenizer, source: str) -> None:
    """Make the model config's special ids agree with the tokenizer's (the tokenizer wins)."""
    config = model.config
    wrong = {}
    for attr, want in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)):
        have = getattr(config, attr, None)
        if have != want:
            wrong[attr] = have
            setattr(config, attr, want)
    if getattr(config, "pad_token_id", None) != tokenizer.pad_id:
        config.pad_token_id = tokenizer.pad_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    if wrong:
        msg = (
            f"{source}: config.json special ids {wrong} disagree with the tokenizer "
            f"(bos={tokenizer.bos_id}, eos={tokenizer.eos_id}, vocab {tokenizer.vocab_size}); "
            "using the tokenizer's ids"
        )
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)


def _resolve(path_or_id: str | Path) -> Path:
    p = Path(path_or_id)
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{p} is a file; give the model folder that holds config.json")
        return resolve_model_folder(p)
    text = str(path_or_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelLoadError(f"model folder not found: {text}")
    # A hub id such as skt/kogpt2-base-v2: fetch safe files only, on a networked machine.
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            text,
            allow_patterns=["*.json", "*.h5", "*.safetensors", "*.spiece", "*.model", "*.txt"],
        )
    except Exception as exc:
        raise ModelLoadError(f"{text}: not a local folder, and the hub download failed: {exc}") from exc
    return Path(local)


def load_model(path_or_id: str | Path, *, allow_pickle: bool = False) -> tuple[Any, Tokenizer]:
    """Load a TF GPT-2 LM model and its tokenizer.

    Args:
        path_or_id: a KoGPT2 v1 folder (``config.json``, ``tf_model.h5``,
            ``gpt2_kor_tokenizer.spiece``), a ``save_pretrained`` folder (h5 or
            safetensors), or a hub id (networked machines only).
        allow_pickle: load PyTorch pickle weights (``pytorch_model.bin``, needs torch).
            Off by default: unpickling runs arbitrary code.

    Returns:
        ``(model, tokenizer)``; the model config's bos/eos/pad ids follow the tokenizer.

    Raises:
        ModelLoadError: no folder; no safe weights; weights and ``config.json`` disagree (a
            weight the config's shape needs is missing from the file, or the file holds weights
            the config has no place for: e.g. ``config.json`` without ``n_layer`` makes a 6-layer
            checkpoint a 12-layer model with 6 random layers); or the model's vocabulary is not
            the tokenizer's. A model vocabulary larger than the tokenizer's is refused, not
            masked: a sampled id past the tokenizer's last piece could not be decoded.
        TokenizerError: the folder holds no readable tokenizer.
    """
    folder = _resolve(path_or_id)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: no config.json; not a model folder")
    tokenizer = load_tokenizer(folder)
    has_safe = any((folder / n).is_file() for n in WEIGHT_FILES)
    has_pickle = any((folder / n).is_file() for n in PICKLE_FILES)
    if not has_safe and not has_pickle:
        raise ModelLoadError(f"{folder}: no weights ({', '.join(WEIGHT_FILES)})")
    if not has_safe and not allow_pickle:
        raise ModelLoadError(
            f"{folder} holds only pickle weights (pytorch_model.bin). Unpickling can run "
            "arbitrary code, so it is refused; convert them to safetensors or tf_model.h5, "
            "or pass allow_pickle=True (--allow-pickle) if you trust the file"
        )
    import_tf()
    from transformers import TFGPT2LMHeadModel

    kwargs: dict[str, Any] = {}
    if not has_safe:
        kwargs["from_pt"] = True
    model, loading = TFGPT2LMHeadModel.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    _check_loading_info(folder, loading)
    if model.config.vocab_size != tokenizer.vocab_size:
        relation = "smaller" if model.config.vocab_size < tokenizer.vocab_size else "larger"
        consequence = (
            "some pieces have no embedding"
            if relation == "smaller"
            else "the model could sample ids the tokenizer cannot decode"
        )
        raise ModelLoadError(
            f"{folder}: model vocabulary {model.config.vocab_size} (config.json vocab_size) is {relation} than the "
            f"tokenizer's {tokenizer.vocab_size} ({tokenizer.path.name}): {consequence}; "
            "use the tokenizer the model was trained with"
        )
    _align_special_ids(model, tokenizer, str(folder))
    return model, tokenizer


def _check_loading_info(folder: Path, loading: dict[str, Any]) -> None:
    """Refuse weights that do not fit ``config.json``: missing, unexpected or mis-shaped ones, named."""
    problems = []
    for kind, what in (
        ("missing_keys", "missing from the weight file (they would be random)"),
        ("unexpected_keys", "unexpected (in the weight file, with no place in the model)"),
        ("mismatched_keys", "of the wrong shape"),
    ):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in loading.get(kind) or ())
        if names:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            problems.append(f"weights {what}: {shown}")
    if problems:
        raise ModelLoadError(
            f"{folder}: config.json and the weights disagree; "
            + "; ".join(problems)
            + ". Check config.json (n_layer, n_embd, n_head, vocab_size) against the checkpoint"
        )


def new_model(preset: str | Preset, tokenizer: Tokenizer, *, seed: int | None = None) -> Any:
    """Create a randomly initialized GPT-2 LM model of a preset shape.

    Args:
        preset: ``tiny`` (2 x 128), ``small`` (6 x 512), ``base`` (12 x 768) or a :class:`Preset`.
        tokenizer: gives the vocabulary size and special ids.
        seed: seeds TensorFlow's initializers, for reproducible weights.

    Returns:
        A built ``TFGPT2LMHeadModel``.

    Raises:
        ValueError: unknown preset name.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r}: must be one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    tf = import_tf()
    from transformers import GPT2Config, TFGPT2LMHeadModel

    config = GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_positions=preset.n_positions,
        n_embd=preset.n_embd,
        n_layer=preset.n_layer,
        n_head=preset.n_head,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    if seed is not None:
        tf.keras.utils.set_random_seed(seed)
    model = TFGPT2LMHeadModel(config)
    model(tf.constant([[tokenizer.bos_id]], dtype=tf.int32))  # build the weights
    _align_special_ids(model, tokenizer, "new_model")
    return model


def preset_name(config: Any) -> str | None:
    """The preset whose shape matches a GPT-2 config, if any."""
    for name, p in PRESETS.items():
        if (config.n_layer, config.n_embd, config.n_head) == (p.n_layer, p.n_embd, p.n_head):
            return name
    return None


def save_model(model: Any, tokenizer: Tokenizer, folder: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Save a self-describing model folder.

    Writes ``save_pretrained`` output (``config.json``, ``tf_model.h5``), the tokenizer
    file, the Hugging Face tokenizer files (``tokenizer.json`` converted from a SentencePiece
    tokenizer, ``tokenizer_config.json``, ``special_tokens_map.json``: ``AutoTokenizer`` opens
    the folder and encodes as ``load_tokenizer`` does), ``generation_config.json`` (the
    project's generation defaults) and ``kogpt2.json`` (tokenizer facts, model shape, library
    versions and the caller's ``info``: data fingerprint, steps, ...). Weight files the folder held before
    (``model.safetensors``, ``pytorch_model.bin``, shards, ...) are removed once the new
    weights are written, so the folder holds one weight file and ``kogpt2.json``'s
    fingerprint is of the file that loads.

    Args:
        model: a TF GPT-2 LM model.
        tokenizer: its tokenizer.
        folder: output folder (created).
        info: what produced the weights, merged into ``kogpt2.json["info"]``.

    Returns:
        The folder path.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    _align_special_ids(model, tokenizer, "save_model")
    before = {p: _stamp(p) for p in weight_files(out)}
    model.save_pretrained(str(out))
    for stale in (p for p in weight_files(out) if p in before and _stamp(p) == before[p]):
        stale.unlink()  # old weights would shadow the new ones (from_pretrained prefers safetensors)
    tokenizer.save(out)
    cfg = model.config
    _write_hf_files(tokenizer, out, cfg.n_positions)
    record = {
        "format_version": 1,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": {"file": tokenizer.canonical_name, **tokenizer.describe()},
        "model": {
            "preset": preset_name(cfg),
            "n_layer": cfg.n_layer,
            "n_embd": cfg.n_embd,
            "n_head": cfg.n_head,
            "n_positions": cfg.n_positions,
            "vocab_size": cfg.vocab_size,
            "fingerprint": model_fingerprint(out),
        },
        "info": dict(info or {}),
        "versions": library_versions(),
    }
    (out / MODEL_INFO_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
    return out


def _write_hf_files(tokenizer: Tokenizer, folder: Path, n_positions: int | None) -> None:
    """Write the Hugging Face tokenizer files and ``generation_config.json`` into a model folder.

    A tokenizer that cannot be converted exactly is logged and gets no ``tokenizer.json`` (stale
    Hugging Face files are removed): the folder still loads with :func:`load_model`.
    """
    from kogpt2.generation_config import GenerationConfig, write_generation_config
    from kogpt2.hf_export import HF_TOKENIZER_FILES, HFExportError, write_hf_tokenizer

    try:
        write_hf_tokenizer(tokenizer, folder, model_max_length=n_positions)
    except HFExportError as exc:
        msg = f"{folder}: no Hugging Face tokenizer files written ({exc}); load the folder with kogpt2.model.load_model"
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
        for name in HF_TOKENIZER_FILES:
            stale = folder / name
            if stale.is_file() and stale.resolve() != tokenizer.path.resolve():
                stale.unlink()
    special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    write_generation_config(folder, GenerationConfig(), special)


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def read_model_info(folder: str | Path) -> dict[str, Any]:
    """Return ``kogpt2.json`` of a model folder (or of a training output's current version), or ``{}``."""
    path = resolve_model_folder(folder) / MODEL_INFO_FILE
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text(encoding="utf-8")))
