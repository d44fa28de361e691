"""``python -m wrinklefree.export CHECKPOINT --outfile model.gguf --outtype i2_s``"""

from __future__ import annotations

import argparse

from wrinklefree.export.gguf_writer import OUTTYPES, export_gguf


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wrinklefree.export", description=__doc__)
    p.add_argument("checkpoint", help="a transformers `bitnet` checkpoint directory (config.json + safetensors)")
    p.add_argument("--outfile", required=True, help="the .gguf file to write")
    p.add_argument("--outtype", choices=OUTTYPES, default="i2_s", help="i2_s: bitnet.cpp; tq2_0, tq1_0, f16: llama.cpp")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's tokenizer.json)")
    args = p.parse_args(argv)
    try:
        out = export_gguf(args.checkpoint, args.outfile, args.outtype, tokenizer=args.tokenizer)
    except (ValueError, FileNotFoundError, KeyError) as e:  # bad input: a message, not a traceback
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"wrote {out} ({args.outtype})")


if __name__ == "__main__":
    main()
