"""Generate text with a GGUF model on the CPU.

    python -m wrinklefree.generate --model model.gguf --prompt "Once upon a time" --max-tokens 64 --temperature 0

Streams the text to stdout as it is generated, then prints prompt and decode speeds to stderr. Exits 2 with a
one-line message for a missing or unreadable model file or a bad option. An empty prompt generates from the
beginning-of-sequence token alone (when the model file has one).
"""

from __future__ import annotations

import argparse
import sys

from wrinklefree.inference import Engine, GenerationStats
from wrinklefree.inference.engine import HEADS

# The options that set Engine / generate() parameters, named in errors about those parameters.
OPTIONS = {
    "n_ctx": "--ctx",
    "threads": "--threads",
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "repetition_penalty": "--repetition-penalty",
    "seed": "--seed",
    "stop": "--stop",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wrinklefree.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the .gguf file")
    p.add_argument(
        "--prompt", required=True, help="the text to continue (or the user message with --chat); empty: start from bos"
    )
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens; 0 = all (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1] (default 0.95)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--threads", type=int, default=None, help="CPU kernel threads (default: all available)")
    p.add_argument("--ctx", type=int, default=2048, help="context length, capped at the model's (default 2048)")
    p.add_argument("--head", choices=HEADS, default="f16", help="output head: as stored, or int8 (faster decode)")
    p.add_argument(
        "--mmap",
        action="store_true",
        help="run the weights from the file's mapping: faster load, page cache shared between processes, slower decode",
    )
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    return p


def format_stats(stats: GenerationStats) -> str:
    """The one-line summary printed to stderr."""
    return (
        f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s | "
        f"decode: {stats.decode_tokens} tokens, {stats.decode_tps:.1f} tok/s"
    )


def option_message(error: Exception) -> str:
    """The message of an Engine / generate() error, naming the option instead of the parameter it is about."""
    message = str(error)
    name, sep, rest = message.partition(" must be ")
    return f"{OPTIONS[name]} must be {rest}" if sep and name in OPTIONS else message


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        engine = Engine(args.model, n_ctx=args.ctx, threads=args.threads, head=args.head, use_mmap=args.mmap)
        pieces = engine.generate(
            args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop=args.stop,
            chat=args.chat,
        )
    except (FileNotFoundError, IsADirectoryError, ValueError) as e:
        print(f"error: {option_message(e)}", file=sys.stderr)
        return 2
    code = 0
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:  # Ctrl-C ends the generation, not the report
        code = 130
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(format_stats(engine.last_stats), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
