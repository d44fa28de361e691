"""``python -m wrinklefree.export CHECKPOINT --outfile model.gguf [--outtype auto]``

CHECKPOINT is either a checkpoint of ``python -m wrinklefree.train`` (a directory holding ``.metadata``,
e.g. ``outputs/checkpoints/RUN/STAGE_checkpoint/checkpoints/final``, or the stage directory
``STAGE_checkpoint`` or its ``checkpoints`` folder, for its ``final`` or else newest ``step_N`` checkpoint),
rebuilt from the config and tokenizer it records; or a transformers `bitnet` checkpoint directory
(config.json + safetensors, as ``save_bitnet`` writes).
The model's FFN activation decides which outtypes fit: relu2 exports to i2_s, silu to tq2_0, tq1_0 and f16;
``--outtype auto`` (the default) takes the first that fits.

The file is written to a temporary file beside --outfile and renamed into place when complete: a failed or
interrupted export (Ctrl-C, SIGTERM) leaves --outfile as it was and no temporary file. Errors are one line:
exit status 2 for bad arguments or checkpoints, 1 when writing fails, 130 on Ctrl-C, 143 on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

from wrinklefree.export.checkpoint import load_training_checkpoint
from wrinklefree.export.gguf_writer import OUTTYPES, check_outfile, export_gguf, load_tokenizer
from wrinklefree.train.checkpoint import find_checkpoint


class Terminated(BaseException):
    """Raised by the CLI's SIGTERM handler, so that a terminated export unwinds (and removes its temporary
    file) as an interrupted one does; a BaseException, like KeyboardInterrupt, so no ``except Exception``
    swallows it."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def export_checkpoint(checkpoint: str, outfile: str, outtype: str, tokenizer: Any = None) -> Path:
    """Export either kind of checkpoint directory (see the module docstring); the tokenizer (a transformers
    tokenizer or its directory) defaults to the checkpoint's own."""
    source = Path(checkpoint)
    trained = find_checkpoint(source)
    if trained is not None:
        check_outfile(outfile)  # before the model loads (export_gguf checks before it loads a directory)
        model, own_tokenizer = load_training_checkpoint(trained)
        return export_gguf(model, outfile, outtype, tokenizer=own_tokenizer if tokenizer is None else tokenizer)
    if (source / "config.json").is_file():
        return export_gguf(source, outfile, outtype, tokenizer=tokenizer)
    what = "directory" if source.is_dir() else ("file" if source.exists() else "path (it does not exist)")
    raise FileNotFoundError(
        f"{checkpoint}: this {what} is neither a trainer checkpoint (a directory with .metadata, or a stage "
        "directory holding final/ or step_N/ ones, directly or in checkpoints/) nor a transformers bitnet "
        "checkpoint (a directory with config.json)"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m wrinklefree.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "checkpoint",
        help="a wrinklefree.train checkpoint (.../STAGE_checkpoint/checkpoints/final, or STAGE_checkpoint or its "
        "checkpoints/ folder: final, else the newest step_N) or a transformers `bitnet` checkpoint directory "
        "(config.json + safetensors)",
    )
    p.add_argument("--outfile", required=True, help="the .gguf file to write")
    p.add_argument(
        "--outtype",
        choices=("auto", *OUTTYPES),
        default="auto",
        help="i2_s: bitnet.cpp; tq2_0, tq1_0, f16: llama.cpp; auto: i2_s for relu2 models, tq2_0 for silu ones",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory (default: the checkpoint's own: tokenizer/ of a trainer checkpoint, "
        "tokenizer.json of a bitnet one)",
    )
    args = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the temporary file is removed (only the main thread may set a handler)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    previous = signal.SIG_DFL if previous is None else previous  # None: a handler not set from Python
    try:
        out = _run(p, args)
    except KeyboardInterrupt:
        p.exit(130, f"{p.prog}: interrupted\n")
    except Terminated:
        p.exit(128 + signal.SIGTERM, f"{p.prog}: terminated\n")
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(f"wrote {out}")


def _run(p: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The export of ``args``, with the arguments checked first; errors exit with one line, not a traceback."""
    try:  # the arguments, before the model loads
        check_outfile(args.outfile, "--outfile")
        tokenizer = load_tokenizer(args.tokenizer, "--tokenizer") if args.tokenizer is not None else None
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    try:
        return export_checkpoint(args.checkpoint, args.outfile, args.outtype, tokenizer=tokenizer)
    except (ValueError, FileNotFoundError, KeyError) as e:  # bad input: a message, not a traceback
        p.exit(2, f"{p.prog}: error: {_message(e)}\n")
    except OSError as e:  # writing failed (export_gguf names the outfile)
        p.exit(1, f"{p.prog}: error: {_message(e)}\n")


def _message(e: BaseException) -> str:
    # KeyError's str() is the repr of its argument, in quotes
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


if __name__ == "__main__":
    main()
