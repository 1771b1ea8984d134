"""``kogpt2 train``: fine-tune a model folder, or train a preset, on preprocessing shards."""

from __future__ import annotations

import argparse

HELP = "fine-tune or train GPT-2 from preprocessed shards"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="DIR", help="preprocessing output (info.json, shards, COMPLETED)")
    p.add_argument(
        "--model",
        required=True,
        metavar="PATH_OR_PRESET",
        help="model folder to fine-tune, or a preset to train from scratch: tiny, small, base",
    )
    p.add_argument(
        "--output", required=True, metavar="DIR", help="output model folder (+ history.json, curves.png, logs/)"
    )
    p.add_argument("--epochs", type=int, default=10, help="maximum epochs (default 10)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch size (default 16)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, Adam (default 1e-4)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default 0)")
    p.add_argument(
        "--lr-schedule",
        choices=["constant", "linear", "cosine"],
        default="constant",
        help="after warmup: constant (default), linear decay to 0 (transformers' default) or cosine decay to 0",
    )
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay (default 0: Adam)")
    p.add_argument("--clip-norm", type=float, default=None, help="clip gradients to this global norm")
    p.add_argument(
        "--early-stopping-patience",
        type=int,
        default=2,
        help="stop after N epochs without a better validation loss; 0 = off (default 2). The best epoch is saved",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of preset weights, dropout and shuffling (default 0)")
    p.add_argument(
        "--mixed-precision",
        nargs="?",
        const="auto",
        default="no",
        choices=["no", "bf16", "fp16", "auto"],
        metavar="{no,bf16,fp16}",
        help="compute dtype: no = float32 (default; on CPU bf16 is emulated on most chips), bf16 (CPUs, GPUs), "
        "fp16 with loss scaling (GPUs only); the bare flag, as in earlier releases, is fp16 on GPUs, bf16 on CPUs",
    )
    p.add_argument("--xla", action="store_true", help="compile the train step with XLA (jit_compile)")
    p.add_argument("--steps-per-execution", type=int, default=1, help="train steps per tf.function call")
    p.add_argument(
        "--strategy",
        choices=["auto", "mirrored", "default", "multi_worker"],
        default="auto",
        help="tf.distribute strategy; multi_worker: MultiWorkerMirroredStrategy over the cluster in TF_CONFIG "
        "(run the same command on every worker; the chief writes --output)",
    )
    p.add_argument("--shuffle-buffer", type=int, default=10_000, help="examples in the shuffle buffer")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer of the shards, for preset training")
    p.add_argument("--max-seconds", type=float, default=None, help="time budget: stop after the epoch that passes it")
    p.add_argument(
        "--save-steps",
        type=int,
        default=0,
        metavar="N",
        help="also checkpoint every N batches within an epoch, so --resume continues mid-epoch (default 0: epoch ends)",
    )
    p.add_argument(
        "--eval-steps",
        type=int,
        default=0,
        metavar="N",
        help="also score the validation split every N batches (history.json 'evaluations'; default 0: epoch ends)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    group.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    p.add_argument("--quiet", action="store_true", help="no Keras progress output")


def config_from_args(args: argparse.Namespace) -> object:
    """The :class:`~kogpt2.training.TrainConfig` of parsed arguments."""
    from kogpt2.training import TrainConfig

    return TrainConfig(
        data=args.data,
        model=args.model,
        output=args.output,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule,
        weight_decay=args.weight_decay,
        clip_norm=args.clip_norm,
        early_stopping_patience=args.early_stopping_patience,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        jit_compile=args.xla,
        steps_per_execution=args.steps_per_execution,
        strategy=args.strategy,
        shuffle_buffer=args.shuffle_buffer,
        tokenizer=args.tokenizer,
        resume=args.resume,
        overwrite=args.overwrite,
        max_seconds=args.max_seconds,
        save_steps=args.save_steps,
        eval_steps=args.eval_steps,
    )


def run(args: argparse.Namespace) -> int:
    import logging

    from kogpt2.training import train

    if not getattr(args, "verbose", False):  # absl logs a line per checkpoint shard at INFO
        logging.getLogger("absl").setLevel(logging.WARNING)

    config = config_from_args(args)
    result = train(config, progress=not args.quiet)  # type: ignore[arg-type]
    print(result.summary(), flush=True)
    return 0
