"""CPU inference over GGUF files: the engine, its tokenizer and sampling.

Engine(path, n_ctx=2048, threads=None, head="f16", use_mmap=False)
                                                        load a model; .generate(prompt, ...) streams text
GGUFTokenizer(metadata)                                 the byte-level BPE tokenizer stored in a GGUF file
SamplingParams, Sampler                                 greedy / temperature, top-k, top-p, repetition penalty, seed
python -m wrinklefree.generate --model model.gguf --prompt "..."
"""

from wrinklefree.inference.engine import Engine, GenerationStats
from wrinklefree.inference.sampling import Sampler, SamplingParams
from wrinklefree.inference.tokenizer import GGUFTokenizer, IncrementalDecoder

__all__ = ["Engine", "GGUFTokenizer", "GenerationStats", "IncrementalDecoder", "Sampler", "SamplingParams"]
