"""``python -m wrinklefree.export CHECKPOINT --outfile model.gguf [--outtype auto]``

CHECKPOINT is either a checkpoint of ``python -m wrinklefree.train`` (a directory holding ``.metadata``,
e.g. ``outputs/checkpoints/RUN/STAGE_checkpoint/checkpoints/final``, or that stage directory itself, for its
``final`` or newest ``step_N`` checkpoint), rebuilt from the config and tokenizer it records; or a
transformers `bitnet` checkpoint directory (config.json + safetensors, as ``save_bitnet`` writes).
The model's FFN activation decides which outtypes fit: relu2 exports to i2_s, silu to tq2_0, tq1_0 and f16;
``--outtype auto`` (the default) takes the first that fits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wrinklefree.export.checkpoint import load_training_checkpoint
from wrinklefree.export.gguf_writer import OUTTYPES, export_gguf
from wrinklefree.train.checkpoint import find_checkpoint


def export_checkpoint(checkpoint: str, outfile: str, outtype: str, tokenizer: str | None = None) -> Path:
    """Export either kind of checkpoint directory (see the module docstring); the tokenizer defaults to the
    checkpoint's own."""
    source = Path(checkpoint)
    trained = find_checkpoint(source)
    if trained is not None:
        model, own_tokenizer = load_training_checkpoint(trained)
        return export_gguf(model, outfile, outtype, tokenizer=tokenizer or own_tokenizer)
    if (source / "config.json").is_file():
        return export_gguf(source, outfile, outtype, tokenizer=tokenizer)
    what = "directory" if source.is_dir() else ("file" if source.exists() else "path (it does not exist)")
    raise FileNotFoundError(
        f"{checkpoint}: this {what} is neither a trainer checkpoint (a directory with .metadata, or a stage "
        "directory holding final/ or step_N/ ones) nor a transformers bitnet checkpoint (a directory with "
        "config.json)"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m wrinklefree.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "checkpoint",
        help="a wrinklefree.train checkpoint (.../checkpoints/final, or its stage directory) or a transformers "
        "`bitnet` checkpoint directory (config.json + safetensors)",
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
    try:
        out = export_checkpoint(args.checkpoint, args.outfile, args.outtype, tokenizer=args.tokenizer)
    except (ValueError, FileNotFoundError, KeyError) as e:  # bad input: a message, not a traceback
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
