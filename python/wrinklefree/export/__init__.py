"""Export: GGUF files for bitnet.cpp (I2_S) and llama.cpp (TQ2_0, TQ1_0, F16).

export_gguf(model_or_path, outfile, outtype, tokenizer=None)    write one .gguf file
load_training_checkpoint(path) -> (model, tokenizer)            a wrinklefree.train checkpoint, ready for it
python -m wrinklefree.export CHECKPOINT --outfile model.gguf --outtype i2_s|tq2_0|tq1_0|f16
"""

from wrinklefree.export.checkpoint import load_training_checkpoint
from wrinklefree.export.gguf_writer import OUTTYPES, export_gguf, i2s_readable

__all__ = ["OUTTYPES", "export_gguf", "i2s_readable", "load_training_checkpoint"]
