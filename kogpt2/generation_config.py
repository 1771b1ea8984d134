"""How to continue prompts: :class:`GenerationConfig`, one contract for the CLI, the Python
API and the bulk pipeline, and the model folder's ``generation_config.json`` it reads and writes.

No TensorFlow here: model folders (:mod:`kogpt2.model`) write the file, and generation
(:mod:`kogpt2.generation`) uses the config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kogpt2.flags import flag
from kogpt2.sampling import SAMPLERS, row_seed
from kogpt2.validate import check_bool, check_choice, check_int, check_number, is_int

DECODING_STRATEGIES = ("greedy", "sample")
#: The file of a model folder that holds its generation defaults (transformers' name and keys).
GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_TOP_P = 0.95
#: The sampling settings, at the values that mean "no effect" (what greedy requires).
SAMPLING_NEUTRAL = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


@dataclass(frozen=True)
class GenerationConfig:
    """How to continue prompts: one contract for the CLI, the Python API and the bulk pipeline.

    The defaults sample with top-p 0.95 and 100 new tokens. A model folder's
    ``generation_config.json`` overrides them (:meth:`from_folder`), and flags or keyword
    arguments override that. Invalid values raise ``ValueError`` naming the field.

    Attributes:
        strategy: ``sample`` or ``greedy`` (best token each step).
        temperature: divides the logits before sampling (> 0); 1.0 for greedy.
        top_k: sample among the k best tokens; 0 = no cut.
        top_p: sample within the smallest set of best tokens holding this mass, in (0, 1]; 1.0 = no cut.
        repetition_penalty: > 0; > 1 discourages tokens already in the prompt or output.
        no_repeat_ngram_size: forbid repeating any n-gram of this size; 0 = off.
        num_samples: outputs per prompt (transformers: ``num_return_sequences``).
        max_new_tokens: generation budget per output (the notebook's 100).
        min_new_tokens: ``</s>`` is banned before this many new tokens.
        stop: stop strings: a row ends (``finish_reason="stop"``) once its continuation holds one.
        suppress_tokens: ids never generated; None = every special piece but ``</s>``.
        valid_utf8: allow byte pieces only where they form valid UTF-8 (no U+FFFD in the text).
        seed: run seed; with the prompt and sample index it fixes each output.
    """

    strategy: str = field(default="sample", metadata=flag("sample or greedy", choices=DECODING_STRATEGIES, cli=False))
    temperature: float = field(default=1.0, metadata=flag("divides the logits before sampling, > 0", metavar="T"))
    top_k: int = field(default=0, metadata=flag("sample among the K best tokens (0 = no cut)", metavar="K"))
    top_p: float = field(
        default=None,  # type: ignore[assignment]  # resolved in __post_init__: 0.95 sampling, 1.0 greedy
        metadata=flag(f"nucleus mass in (0, 1] (default {DEFAULT_TOP_P} when sampling)", metavar="P"),
    )
    repetition_penalty: float = field(
        default=1.0, metadata=flag("> 1 discourages tokens already in the prompt or output", metavar="R")
    )
    no_repeat_ngram_size: int = field(default=0, metadata=flag("never repeat an N-gram (0 = off)", metavar="N"))
    num_samples: int = field(
        default=1, metadata=flag("outputs per prompt", metavar="N", aliases=("--num-return-sequences",))
    )
    max_new_tokens: int = field(default=100, metadata=flag("budget per output, </s> included", metavar="N"))
    min_new_tokens: int = field(default=0, metadata=flag("no </s> before N new tokens", metavar="N"))
    stop: tuple[str, ...] = field(
        default=(), metadata=flag("end a row once its continuation holds TEXT (finish_reason stop)", metavar="TEXT")
    )
    suppress_tokens: tuple[int, ...] | None = field(default=None, metadata=flag("ids never generated", cli=False))
    valid_utf8: bool = field(default=True, metadata=flag("byte pieces only where valid UTF-8", cli=False))
    seed: int = field(default=0, metadata=flag("run seed", metavar="S"))

    def __post_init__(self) -> None:
        owner = "GenerationConfig"
        check_choice(owner, "strategy", self.strategy, DECODING_STRATEGIES)
        if self.top_p is None:  # not given: the strategy's own default
            object.__setattr__(self, "top_p", 1.0 if self.strategy == "greedy" else DEFAULT_TOP_P)
        check_number(owner, "temperature", self.temperature, gt=0)
        check_int(owner, "top_k", self.top_k, low=0, note="0 = no top-k cut")
        check_number(owner, "top_p", self.top_p, gt=0, le=1, note="1.0 = no nucleus cut")
        check_number(owner, "repetition_penalty", self.repetition_penalty, gt=0, note="1.0 = none")
        check_int(owner, "no_repeat_ngram_size", self.no_repeat_ngram_size, low=0, note="0 = off")
        check_int(owner, "num_samples", self.num_samples, low=1)
        check_int(owner, "max_new_tokens", self.max_new_tokens, low=1)
        check_int(owner, "min_new_tokens", self.min_new_tokens, low=0, high=self.max_new_tokens)
        if isinstance(self.stop, str) or not all(isinstance(x, str) and x for x in self.stop):
            raise ValueError(f"{owner}.stop={self.stop!r}: must be a tuple of non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.suppress_tokens is not None:
            if isinstance(self.suppress_tokens, str) or not all(is_int(i) and i >= 0 for i in self.suppress_tokens):
                raise ValueError(
                    f"{owner}.suppress_tokens={self.suppress_tokens!r}: must be token ids >= 0, or None "
                    "(every special piece but </s>)"
                )
            object.__setattr__(self, "suppress_tokens", tuple(int(i) for i in self.suppress_tokens))
        check_bool(owner, "valid_utf8", self.valid_utf8)
        check_int(owner, "seed", self.seed, low=0, high=2**63 - 1)
        if self.strategy == "greedy":
            for name, neutral in SAMPLING_NEUTRAL.items():
                if getattr(self, name) != neutral:
                    raise ValueError(
                        f"{owner}.{name}={getattr(self, name)!r} has no effect with strategy='greedy': "
                        f"leave it at {neutral!r} or use strategy='sample'"
                    )

    @property
    def greedy(self) -> bool:
        return self.strategy == "greedy"

    def row_seed(self, prompt: str, sample_index: int) -> int:
        """The random seed of output ``(prompt, sample_index)`` in this run."""
        return row_seed(prompt, sample_index, self.seed)

    def describe(self) -> dict[str, Any]:
        """The config as plain JSON-able values (the strategy columns of the Parquet output)."""
        d = asdict(self)
        d["stop"] = list(self.stop)
        d["suppress_tokens"] = None if self.suppress_tokens is None else list(self.suppress_tokens)
        return d

    def summary(self) -> str:
        """One readable line: ``sample, top-p 0.95, 2 samples, 40 new tokens, seed 0``."""
        parts = [self.strategy]
        if not self.greedy:
            if self.top_k:
                parts.append(f"top-k {self.top_k}")
            if self.top_p < 1:
                parts.append(f"top-p {self.top_p:g}")
            if self.temperature != 1:
                parts.append(f"temperature {self.temperature:g}")
        if self.repetition_penalty != 1:
            parts.append(f"repetition penalty {self.repetition_penalty:g}")
        if self.no_repeat_ngram_size:
            parts.append(f"no repeated {self.no_repeat_ngram_size}-grams")
        parts.append(f"{self.num_samples} sample{'s' if self.num_samples > 1 else ''} per seed")
        parts.append(f"{self.max_new_tokens} new tokens")
        if self.min_new_tokens:
            parts.append(f"at least {self.min_new_tokens}")
        if self.stop:
            parts.append(f"stop at {', '.join(repr(x) for x in self.stop)}")
        return ", ".join(parts) + f", seed {self.seed}"

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- transformers' generation_config.json -------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """This config in transformers' ``generation_config.json`` keys."""
        d: dict[str, Any] = {
            "do_sample": not self.greedy,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "num_return_sequences": self.num_samples,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
        }
        if self.stop:
            d["stop_strings"] = list(self.stop)
        if self.suppress_tokens is not None:
            d["suppress_tokens"] = list(self.suppress_tokens)
        return d

    @classmethod
    def hf_overrides(cls, hf: dict[str, Any]) -> dict[str, Any]:
        """Our fields from the keys of a ``generation_config.json`` (keys it does not hold are left out)."""
        out: dict[str, Any] = {}
        if "do_sample" in hf:
            out["strategy"] = "sample" if hf["do_sample"] else "greedy"
        for ours, theirs in _HF_KEYS.items():
            if hf.get(theirs) is not None:
                out[ours] = hf[theirs]
        if isinstance(out.get("stop"), str):
            out["stop"] = (out["stop"],)
        if "stop" in out:
            out["stop"] = tuple(out["stop"])
        if "suppress_tokens" in out:
            out["suppress_tokens"] = tuple(out["suppress_tokens"])
        if out.get("strategy") == "greedy":
            for name in ("temperature", "top_k", "top_p"):
                out.pop(name, None)  # transformers keeps them with do_sample=false; they mean nothing there
        elif hf.get("do_sample") is None:
            out.pop("strategy", None)
        return out

    @classmethod
    def from_layers(cls, *layers: dict[str, Any], names: tuple[str, ...] = ()) -> GenerationConfig:
        """The one place settings meet: our defaults, then each layer in turn (later ones win).

        The order every caller uses: a model folder's ``generation_config.json``
        (:meth:`folder_layer`), a ``--config`` file, the flags given, then a bulk job's per-row or
        named settings. A value of None means "not given". Greedy versus sampling is decided
        here and only here:

        - a layer that chooses ``strategy="greedy"`` drops the sampling settings (temperature,
          top-k, top-p) of the layers before it; one that also sets a sampling setting itself is
          refused;
        - a layer that sets a sampling setting without naming a strategy chooses sampling over an
          earlier layer's greedy.

        Args:
            layers: settings by field name.
            names: how each layer is named in errors (``("the model folder", "--config", "flags")``).

        Raises:
            ValueError: a layer combining greedy with a sampling setting, or an invalid value.
        """
        settings: dict[str, Any] = {}
        for n, layer in enumerate(layers):
            given = {k: v for k, v in layer.items() if v is not None}
            sampling = [k for k in SAMPLING_NEUTRAL if k in given]
            if given.get("strategy") == "greedy":
                clash = [k for k in sampling if given[k] != SAMPLING_NEUTRAL[k]]
                if clash:
                    where = f" ({names[n]})" if n < len(names) else ""
                    flags = ", ".join("--" + k.replace("_", "-") for k in clash)
                    raise ValueError(f"--greedy cannot be combined with {flags}{where}: greedy takes the best token")
                for k in SAMPLING_NEUTRAL:
                    settings.pop(k, None)
            elif settings.get("strategy") == "greedy" and (given.get("strategy") == "sample" or sampling):
                settings["strategy"] = "sample"  # sampling chosen over an earlier greedy: greedy's neutral
                for k in SAMPLING_NEUTRAL:  # values go, the sampling defaults apply where this layer is silent
                    settings.pop(k, None)
            settings.update(given)
        return cls(**settings)

    @classmethod
    def folder_layer(cls, folder: str | Path | None) -> dict[str, Any]:
        """A model folder's ``generation_config.json`` as a layer of :meth:`from_layers` ({} without one)."""
        if folder is None:
            return {}
        path = Path(folder) / GENERATION_CONFIG_FILE
        return cls.hf_overrides(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else {}

    @classmethod
    def from_folder(cls, folder: str | Path | None, **overrides: Any) -> GenerationConfig:
        """Our defaults, then the folder's ``generation_config.json`` (when present), then ``overrides``."""
        return cls.from_layers(cls.folder_layer(folder), overrides)


_HF_KEYS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "repetition_penalty": "repetition_penalty",
    "no_repeat_ngram_size": "no_repeat_ngram_size",
    "num_samples": "num_return_sequences",
    "max_new_tokens": "max_new_tokens",
    "min_new_tokens": "min_new_tokens",
    "stop": "stop_strings",
    "suppress_tokens": "suppress_tokens",
}


def write_generation_config(folder: str | Path, config: GenerationConfig, special: dict[str, int]) -> Path:
    """Write ``config`` as the folder's ``generation_config.json`` (transformers' keys, plus our ids).

    Args:
        folder: a model folder.
        config: the defaults generation should use with this model.
        special: ``bos_token_id``, ``eos_token_id``, ``pad_token_id``.
    """
    path = Path(folder) / GENERATION_CONFIG_FILE
    doc = {**special, **config.to_hf_dict()}
    doc.pop("num_return_sequences", None)  # a per-call choice, not a model default
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


#: Rows decoded together by default.
DEFAULT_BATCH_SIZE = 256
#: Computation types of the decoder.
DTYPES = ("float32", "bfloat16")
#: The decoder's cached attention: ``native`` (a compiled CPU kernel, built on first use), ``xla``, or
#: ``auto`` (native on a CPU where the kernel builds, else xla with a warning); see :mod:`kogpt2.decoder`.
ATTENTIONS = ("auto", "native", "xla")


@dataclass(frozen=True)
class DecodeSettings:
    """How a generator computes (not what it generates): one definition for ``kogpt2 generate`` and
    the bulk pipeline (whose :class:`~pipelines.generate_config.GenerateJob` reuses these flags)."""

    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata=flag("rows decoded together", metavar="N"))
    dtype: str = field(default="float32", metadata=flag("computation type", choices=DTYPES))
    sampler: str = field(
        default="host",
        metadata=flag(
            "where the token draw runs: host (numpy; fastest on CPU) or graph (XLA, beside the model: for GPUs)",
            choices=SAMPLERS,
        ),
    )
    attention: str = field(
        default="auto",
        metadata=flag(
            "the cached attention: native (a compiled CPU kernel, built on first use with g++), xla, or auto "
            "(native where it builds, else xla with a warning). The two round differently: near-tie tokens can flip",
            choices=ATTENTIONS,
        ),
    )

    def __post_init__(self) -> None:
        check_int("DecodeSettings", "batch_size", self.batch_size, low=1)
        check_choice("DecodeSettings", "dtype", self.dtype, DTYPES)
        check_choice("DecodeSettings", "sampler", self.sampler, SAMPLERS)
        check_choice("DecodeSettings", "attention", self.attention, ATTENTIONS)

    @staticmethod
    def flag(name: str) -> dict[str, Any]:
        """The flag metadata of one field, for a config that carries the same setting."""
        return dict(next(f for f in dataclasses.fields(DecodeSettings) if f.name == name).metadata)


# -- command-line flags ----------------------------------------------------------------------


def add_generation_arguments(p: Any) -> None:
    """The strategy flags, one per :class:`GenerationConfig` field (None = not given), and ``--greedy`` /
    ``--do-sample``: shared by ``kogpt2 generate`` and the bulk pipeline."""
    from kogpt2.flags import add_config_arguments

    g = p.add_argument_group(
        "strategy (defaults: sampling, top-p 0.95, 100 new tokens; the model folder's generation_config.json "
        "overrides them, a --config file overrides that, these flags override all)"
    )
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--greedy", action="store_true", default=None, help="take the best token each step (identical on every run)"
    )
    mode.add_argument(
        "--do-sample", action="store_true", default=None, help="sample (transformers' spelling; the default)"
    )
    add_config_arguments(g, GenerationConfig, unset=True)


def flag_layer(args: Any) -> dict[str, Any]:
    """The strategy flags given (:func:`add_generation_arguments`) as a layer of :meth:`GenerationConfig.from_layers`."""
    from kogpt2.flags import given_values

    layer = given_values(args, [f.name for f in dataclasses.fields(GenerationConfig)])
    if getattr(args, "greedy", None):
        layer["strategy"] = "greedy"
    elif getattr(args, "do_sample", None):
        layer["strategy"] = "sample"
    return layer
