"""End-to-end CPU inference: our engine against llama.cpp on a random-weight model of the BitNet b1.58
2B4T shape (DESIGN.md sections 4 and 6), with the same thread count, side by side in one run.

    python bench/e2e.py [--shape 2b4t|small] [--threads 2] [--reps 3] [--rounds 2] [--out PATH]
    python bench/run.py --e2e [2b4t|small] [--threads N] [--out PATH]        (the same)

For each engine and format: prefill tokens/s of a 128-token prompt, decode tokens/s of 64 greedy
tokens after it (medians over --rounds turns of every engine, each a fresh process timing --reps runs
after a warm-up run), peak memory, and the decode roofline
(bytes streamed per token over the read bandwidth probed right before and after the engine's run);
the ratios against llama.cpp TQ2_0 and the section-6 targets are printed and written as JSON:
``{"meta": {...}, "rows": [one per engine, format and head; see make_row()], "targets":
[bench/run.py's target rows]}``. It reports, it never asserts.

Peak memory is the worker's VmHWM less its RSS before loading the model (the interpreter, torch and
the engine's library), against 1.1 x the file size + a float32 KV cache of N_CTX positions.

The GGUF files are written straight from random ternary codes with the exporter's BitnetWriter (no
transformers model is built) and cached under bench/out/e2e/, keyed by shape: i2_s (architecture
bitnet-b1.58, relu2) and tq2_0 / tq1_0 (bitnet, silu), all holding the same codes. Every engine runs
in its own subprocess, so its peak RSS (VmHWM) is its own.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import wrinklefree
from wrinklefree import ops

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / "out" / "e2e"
BOS = 257  # the stand-in vocabulary: 256 bytes, one merged token, bos, eos, unused rows
GENERATOR_VERSION = 2  # bump when the files' contents change, so cached ones are rebuilt

# 2b4t: BitNet b1.58 2B4T (DESIGN.md section 4). small: the same structure in a 35 MB file (1/30 of
# 2b4t's), for checking the plumbing in seconds; its figures mean little (call overheads dominate).
SHAPES = {
    "2b4t": dict(
        vocab_size=128256,
        hidden_size=2560,
        intermediate_size=6912,
        num_hidden_layers=30,
        num_attention_heads=20,
        num_key_value_heads=5,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    ),
    "small": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    ),
}
FORMATS = ("i2_s", "tq2_0", "tq1_0")
ACTIVATION = {"i2_s": "relu2", "tq2_0": "silu", "tq1_0": "silu"}  # what each format's reader computes
HEADS = ("f16", "int8")
PROMPT_TOKENS = 128
DECODE_TOKENS = 64
N_CTX = 256  # prompt + decoded tokens fit; llama.cpp's smallest context
BW_PROBE_BYTES = 256 << 20  # as bench/run.py: 8x the L3, so it measures DRAM


# DESIGN.md section 6: our engine against llama.cpp TQ2_0, same threads, same run.
DECODE_VS_LLAMA_F16 = 1.5
DECODE_ROOFLINE_SHARE = 0.90
DECODE_VS_LLAMA_INT8 = 2.0
PREFILL_VS_LLAMA = 3.0
MEMORY_VS_FILE = 1.1  # peak memory <= 1.1 x file size + KV cache
BASELINE = ("llama.cpp", "tq2_0", "f16")
BUSY_CORES = 0.1  # other processes' CPU during a run above which its timings are flagged


# ---- the model files ----------------------------------------------------------------------------


def model_config(shape: dict, fmt: str):
    from transformers import BitNetConfig

    from wrinklefree.export.gguf_writer import check_activation

    config = BitNetConfig(**shape, hidden_act=ACTIVATION[fmt], tie_word_embeddings=True, bos_token_id=BOS,
                          eos_token_id=BOS + 1, pad_token_id=None)  # fmt: skip
    config.name_or_path = "random-bitnet"
    check_activation(config, fmt)
    return config


def projection_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """[M, K] of each projection kind."""
    d, f = shape["hidden_size"], shape["intermediate_size"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return {
        "ATTN_Q": (d, d),
        "ATTN_K": (kv, d),
        "ATTN_V": (kv, d),
        "ATTN_OUT": (d, d),
        "FFN_GATE": (f, d),
        "FFN_UP": (f, d),
        "FFN_DOWN": (d, f),
    }


def ternary_bytes(shape: dict, fmt: str) -> int:
    """Bytes of every layer's projections in ``fmt``: what decoding streams besides the head."""
    per_layer = sum(ops.FORMATS[fmt].nbytes(m, k) for m, k in projection_shapes(shape).values())
    return per_layer * shape["num_hidden_layers"]


def head_bytes(shape: dict, head: str) -> int:
    """Bytes of the output head read per token: the f16 embedding, or int8 rows plus a float32 scale each."""
    v, d = shape["vocab_size"], shape["hidden_size"]
    return v * d * 2 if head == "f16" else v * d + 4 * v


def kv_bytes(shape: dict, n_ctx: int, elem: int = 4) -> int:
    """KV cache of ``n_ctx`` positions (float32 by default: our engine's)."""
    hd = shape["hidden_size"] // shape["num_attention_heads"]
    return 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * hd * n_ctx * elem


def vocab(n_vocab: int) -> dict:
    """BitnetWriter.add_vocab arguments of a stand-in gpt2 vocabulary: the 256 byte tokens, one merge (llama.cpp
    needs some), bos, eos, then unused rows. The benchmark feeds token ids, never text."""
    from gguf import TokenType
    from tokenizers import pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["\u0120t", "<|bos|>", "<|eos|>"]  # "Ġt": " t"
    types = [TokenType.NORMAL] * 257 + [TokenType.CONTROL] * 2
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types += [TokenType.UNUSED] * (n_vocab - len(types))
    return dict(tokens=tokens, types=types, merges=["\u0120 t"], bos=BOS, eos=BOS + 1)


def build_file(path: Path, shape: dict, fmt: str) -> None:
    """Random ternary codes (uniform over -1, 0, 1; seeded per tensor, so every format holds the same
    model) with scales that keep activations near unit size, unit norms, an N(0, 1) f16 embedding."""
    from wrinklefree.atomic import atomic_path
    from wrinklefree.export.gguf_writer import NORM_KINDS, PROJECTION_KINDS, BitnetWriter

    config = model_config(shape, fmt)
    shapes = projection_shapes(shape)
    with atomic_path(path) as tmp:
        out = BitnetWriter(tmp, config, fmt)
        try:
            out.add_vocab(**vocab(shape["vocab_size"]))
            g = torch.Generator().manual_seed(0)
            v, d = shape["vocab_size"], shape["hidden_size"]
            emb = torch.empty(v, d, dtype=torch.float16)
            for i in range(0, v, 8192):  # in slices: no float32 copy of the whole table
                emb[i : i + 8192] = torch.randn(min(8192, v - i), d, generator=g)
            out.add_token_embedding(emb)
            out.add_norm("OUTPUT_NORM", None, torch.ones(d))
            for layer in range(shape["num_hidden_layers"]):
                for kind in NORM_KINDS:
                    n = shape["intermediate_size"] if kind == "FFN_SUB_NORM" else d
                    out.add_norm(kind, layer, torch.ones(n))
                for j, kind in enumerate(PROJECTION_KINDS):
                    m, k = shapes[kind]
                    g.manual_seed(1000 * (layer + 1) + j)
                    codes = torch.randint(0, 3, (m, k), generator=g, dtype=torch.int8) - 1
                    out.add_projection(kind, layer, codes, torch.tensor((1.5 / k) ** 0.5))
        except BaseException:
            out.close()
            raise
        out.write()


def model_file(shape_name: str, fmt: str, cache_dir: Path = CACHE_DIR) -> Path:
    """The cached file of ``shape_name`` in ``fmt``, built on first use (~15 s for a 2b4t file)."""
    shape = SHAPES[shape_name]
    key = hashlib.sha256(json.dumps([shape, GENERATOR_VERSION], sort_keys=True).encode()).hexdigest()[:10]
    path = cache_dir / f"{shape_name}-{key}-{fmt}.gguf"
    if not path.is_file():
        t0 = time.perf_counter()
        print(f"building {path} ...", end=" ", flush=True)
        build_file(path, shape, fmt)
        print(f"{path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


# ---- one engine, in its own process ---------------------------------------------------------------


def proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Ours:
    def __init__(self, path: str, threads: int, head: str) -> None:
        from wrinklefree.inference import Engine

        self.engine = Engine(path, n_ctx=N_CTX, threads=threads, head=head)
        # TQ2_0 is repacked to I2_S at load, TQ1_0 too where the kernels have no fast TQ1_0 matmul
        self.runs_format = self.engine.ternary_format

    def prefill(self, tokens: list[int]) -> int:
        self.engine.reset()
        return int(self.engine.logits(tokens).argmax())

    def step(self, token: int) -> int:
        return int(self.engine.logits([token]).argmax())


class LlamaCpp:
    def __init__(self, path: str, threads: int, head: str) -> None:
        import llama_cpp
        import numpy as np

        if head != "f16":
            raise ValueError("llama.cpp runs the head as stored (f16)")
        self.runs_format = None  # the file's
        self.llm = llama_cpp.Llama(
            model_path=path, n_ctx=N_CTX, n_batch=PROMPT_TOKENS, n_ubatch=PROMPT_TOKENS,
            n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False,
        )  # fmt: skip
        n_vocab = self.llm.n_vocab()

        def last_argmax() -> int:
            ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
            return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (n_vocab,)).argmax())

        self.last_argmax = last_argmax

    def prefill(self, tokens: list[int]) -> int:
        self.llm.reset()  # the next eval drops the cache from position 0
        self.llm.eval(tokens)
        return self.last_argmax()

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return self.last_argmax()


ENGINES = {"wrinklefree": Ours, "llama.cpp": LlamaCpp}


def worker(spec: dict) -> dict:
    """Load one engine, time ``reps`` prefills of the prompt and decodes of DECODE_TOKENS greedy tokens
    after it (after one untimed warm-up run of both), and report the process's memory."""
    rss_before = proc_status_kb("VmRSS")
    t0 = time.perf_counter()
    engine = ENGINES[spec["provider"]](spec["path"], spec["threads"], spec["head"])
    load_s = time.perf_counter() - t0
    rss_loaded = proc_status_kb("VmRSS")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(BOS + 2, spec["n_vocab"], (PROMPT_TOKENS,), generator=g).tolist()

    prefill_s, decode_s = [], []
    for _ in range(spec["reps"] + 1):  # the first run warms up (page faults of the weights, caches)
        t0 = time.perf_counter()
        tokens = [engine.prefill(prompt)]
        t1 = time.perf_counter()
        for _ in range(DECODE_TOKENS - 1):
            tokens.append(engine.step(tokens[-1]))
        prefill_s.append(t1 - t0)
        decode_s.append(time.perf_counter() - t1)
    return {
        "load_s": load_s,
        "warmup_prefill_s": prefill_s[0],
        "warmup_decode_s": decode_s[0],
        "prefill_runs_s": prefill_s[1:],
        # DECODE_TOKENS greedy tokens: the first comes from the prefill's logits, so the timed steps are
        # DECODE_TOKENS - 1 single-token evaluations
        "decode_runs_s": decode_s[1:],
        "tokens": tokens,
        "runs_format": engine.runs_format,
        "rss_before_load_kb": rss_before,
        "rss_loaded_kb": rss_loaded,
        "vm_hwm_kb": proc_status_kb("VmHWM"),
        "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def run_worker(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise RuntimeError(f"{spec['provider']} {spec['fmt']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the run ------------------------------------------------------------------------------------


def runs(engines: list[str]) -> list[tuple[str, str, str]]:
    out = []
    if "wrinklefree" in engines:
        out += [("wrinklefree", fmt, head) for fmt in FORMATS for head in HEADS]
    if "llama.cpp" in engines:
        out += [("llama.cpp", fmt, "f16") for fmt in ("tq2_0", "tq1_0")]
    return out


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes of the machine have used, including time stolen by the hypervisor;
    CPU seconds of this process and its finished children)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    ours = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))  # fmt: skip
    return machine, ours


def run_once(shape_name: str, provider: str, fmt: str, head: str, threads: int, reps: int) -> dict:
    """One worker run, with the read bandwidth probed right before and after it (the VM's drifts), and the
    CPU that other processes used meanwhile (``other_cpu_cores``, in cores on average): two cores leave no
    room, so a busy neighbour slows the engines, and llama.cpp's spinning threads most of all."""
    probes = [ops.read_bandwidth(BW_PROBE_BYTES, 3)]
    machine0, ours0 = cpu_seconds()
    t0 = time.perf_counter()
    r = run_worker(
        dict(provider=provider, path=str(model_file(shape_name, fmt)), fmt=fmt, head=head, threads=threads,
             reps=reps, n_vocab=SHAPES[shape_name]["vocab_size"])
    )  # fmt: skip
    wall = time.perf_counter() - t0
    machine1, ours1 = cpu_seconds()
    probes.append(ops.read_bandwidth(BW_PROBE_BYTES, 3))
    other = max(0.0, (machine1 - machine0) - (ours1 - ours0)) / wall
    return {**r, "read_bw_probes": probes, "other_cpu_cores": other}


def make_row(shape_name: str, provider: str, fmt: str, head: str, threads: int, runs: list[dict]) -> dict:
    """One engine's row from its worker runs (one per round): tokens/s of prefill (``prefill_tokens_per_s``,
    median of ``prefill_runs_s``) and decode (``decode_tokens_per_s``, median of ``decode_runs_s``, each
    DECODE_TOKENS - 1 single-token steps); the greedy ``tokens``; ``decode_bytes_per_token`` (ternary weights in
    the format the engine runs + head), the mean read bandwidth of the probes beside the runs,
    ``roofline_tokens_per_s`` and ``pct_roofline``; memory in MB (``peak_rss_mb`` = VmHWM,
    ``rss_before_load_mb``, ``model_memory_mb`` = their difference, the largest over the runs, against
    ``memory_allowance_mb``); ``prefill_ratio`` / ``decode_ratio`` over llama.cpp TQ2_0 (set by add_ratios)."""
    shape = SHAPES[shape_name]
    path = model_file(shape_name, fmt)
    probes = [b for r in runs for b in r["read_bw_probes"]]
    bw = statistics.mean(probes)
    prefill_runs = [t for r in runs for t in r["prefill_runs_s"]]
    decode_runs = [t for r in runs for t in r["decode_runs_s"]]
    prefill = statistics.median(prefill_runs)
    decode = statistics.median(decode_runs) / (DECODE_TOKENS - 1)  # seconds per decoded token
    runs_format = runs[0]["runs_format"] or fmt  # the format the engine streams its ternary weights in
    streamed = ternary_bytes(shape, runs_format) + head_bytes(shape, head)
    file_bytes = path.stat().st_size
    kv = kv_bytes(shape, N_CTX)
    peak = max(runs, key=lambda r: r["vm_hwm_kb"] - r["rss_before_load_kb"])
    return {
        "kernel": "e2e",
        "provider": provider,
        "mode": "inference",
        "device": "cpu",
        "shape": {"model": shape_name, "fmt": fmt, "head": head, "threads": threads},
        "file": str(path.relative_to(BENCH_DIR.parent)) if path.is_relative_to(BENCH_DIR.parent) else path.name,
        "file_bytes": file_bytes,
        "rounds": len(runs),
        # CPU that other processes took during each run, in cores: above ~0.1 the timings are suspect
        "other_cpu_cores": [r["other_cpu_cores"] for r in runs],
        "load_s": statistics.median(r["load_s"] for r in runs),
        "prompt_tokens": PROMPT_TOKENS,
        "prefill_runs_s": prefill_runs,
        "warmup_prefill_s": [r["warmup_prefill_s"] for r in runs],
        "prefill_tokens_per_s": PROMPT_TOKENS / prefill,
        "decode_tokens": DECODE_TOKENS,
        "decode_runs_s": decode_runs,
        "warmup_decode_s": [r["warmup_decode_s"] for r in runs],
        "decode_tokens_per_s": 1 / decode,
        "tokens": runs[-1]["tokens"],
        "runs_format": runs_format,
        "decode_bytes_per_token": streamed,
        "read_bw_gb_per_s": bw / 1e9,
        "read_bw_probes_gb_per_s": [b / 1e9 for b in probes],
        "roofline_tokens_per_s": bw / streamed,
        "pct_roofline": 100 * streamed / decode / bw,
        "decode_gb_per_s": streamed / decode / 1e9,
        "rss_before_load_mb": peak["rss_before_load_kb"] / 1024,
        "rss_loaded_mb": peak["rss_loaded_kb"] / 1024,
        "peak_rss_mb": peak["vm_hwm_kb"] / 1024,
        "ru_maxrss_mb": peak["ru_maxrss_kb"] / 1024,
        "model_memory_mb": (peak["vm_hwm_kb"] - peak["rss_before_load_kb"]) / 1024,
        "kv_bytes": kv,
        "memory_allowance_mb": (MEMORY_VS_FILE * file_bytes + kv) / 2**20,
        "baseline": " ".join(BASELINE[:2]),
        "prefill_ratio": None,
        "decode_ratio": None,
    }


def add_ratios(rows: list[dict]) -> None:
    base = next((r for r in rows if (r["provider"], r["shape"]["fmt"], r["shape"]["head"]) == BASELINE), None)
    if base is None:
        return
    for r in rows:
        r["prefill_ratio"] = r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        r["decode_ratio"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]


def target(name: str, row: dict, value: float | None, goal: float, unit: str, at_most: bool = False) -> dict:
    """A row of bench/run.py's targets list (same keys)."""
    met = None if value is None else (value <= goal if at_most else value >= goal)
    return {
        "target": name,
        "kernel": "e2e",
        "shape": row["shape"],
        "device": "cpu",
        "value": value,
        "goal": goal,
        "goal_op": "<=" if at_most else ">=",
        "unit": unit,
        "met": met,
        "note": "" if value is not None else "n/a (no llama.cpp TQ2_0 row)",
    }


def evaluate_targets(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r["provider"] != "wrinklefree":
            continue
        if r["shape"]["head"] == "f16":
            out.append(target("e2e decode, f16 head", r, r["decode_ratio"], DECODE_VS_LLAMA_F16, "x llama.cpp TQ2_0"))
            out.append(target("e2e decode roofline", r, r["pct_roofline"], 100 * DECODE_ROOFLINE_SHARE, "% roofline"))
        else:
            out.append(target("e2e decode, int8 head", r, r["decode_ratio"], DECODE_VS_LLAMA_INT8, "x llama.cpp TQ2_0"))
        out.append(target("e2e prefill", r, r["prefill_ratio"], PREFILL_VS_LLAMA, "x llama.cpp TQ2_0"))
        out.append(
            target("e2e peak memory", r, r["model_memory_mb"] / r["memory_allowance_mb"], 1.0,
                   "x (1.1 file + KV)", at_most=True)
        )  # fmt: skip
    return out


def print_row(r: dict) -> None:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    s = r["shape"]
    print(
        f"{r['provider']:<12} {s['fmt']:<6} {s['head']:<5} {r['load_s']:>6.1f} {r['prefill_tokens_per_s']:>9.1f} "
        f"{r['decode_tokens_per_s']:>8.1f} {r['roofline_tokens_per_s']:>8.1f} {r['pct_roofline']:>6.1f} "
        f"{r['read_bw_gb_per_s']:>7.1f} {r['file_bytes'] / 2**20:>8.0f} {r['peak_rss_mb']:>8.0f} "
        f"{r['model_memory_mb']:>8.0f} {f(r['prefill_ratio'], '7.2f'):>7} {f(r['decode_ratio'], '7.2f'):>7} "
        f"{max(r['other_cpu_cores']):>6.2f}",
        flush=True,
    )


def print_header() -> None:
    print(
        f"{'provider':<12} {'fmt':<6} {'head':<5} {'load s':>6} {'prefill/s':>9} {'decode/s':>8} {'roof/s':>8} "
        f"{'% roof':>6} {'read BW':>7} {'file MB':>8} {'peak MB':>8} {'model MB':>8} {'pf x':>7} {'dec x':>7} "
        f"{'others':>6}"
    )


def main(argv: list[str] | None = None) -> None:
    from run import cpu_model, print_targets  # bench/run.py, beside this file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="2b4t", help="2b4t (default) or small (plumbing)")
    ap.add_argument("--threads", type=int, default=2, help="threads of every engine (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="timed prefill + decode runs per engine and round")
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="run every engine this many times in turn, each in a fresh process, and take the medians over all "
        "runs: the VM's bandwidth drifts by minutes, so interleaving keeps the ratios fair",
    )
    ap.add_argument("--engines", default="wrinklefree,llama.cpp", help="comma-separated: wrinklefree, llama.cpp")
    ap.add_argument("--out", default=None, help="JSON output (default bench/out/e2e-<shape>.json)")
    args = ap.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        sys.exit(f"unknown engines {sorted(unknown)}; choose from {list(ENGINES)}")
    ops.set_num_threads(args.threads)  # the bandwidth probe reads with the engines' thread count

    start = time.perf_counter()
    shape = SHAPES[args.shape]
    for fmt in FORMATS:
        model_file(args.shape, fmt)
    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = None
        if "llama.cpp" in engines:
            print("llama_cpp is not installed (pip install '.[interop]'): llama.cpp rows skipped")
            engines.remove("llama.cpp")
    meta = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "isa": ops.get_isa(),
        "wrinklefree_version": wrinklefree.__version__,
        "torch_version": torch.__version__,
        "llama_cpp_python_version": llama_version,
        "python_version": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": args.shape,
        "model_shape": shape,
        "prompt_tokens": PROMPT_TOKENS,
        "decode_tokens": DECODE_TOKENS,
        "n_ctx": N_CTX,
        "reps": args.reps,
        "rounds": args.rounds,
        "read_bw_probe_bytes": BW_PROBE_BYTES,
        "ternary_bytes": {fmt: ternary_bytes(shape, fmt) for fmt in FORMATS},
        "head_bytes": {head: head_bytes(shape, head) for head in HEADS},
    }
    print(
        f"{meta['cpu']} | {args.threads} threads | model {args.shape} (random weights) | prompt {PROMPT_TOKENS}, "
        f"decode {DECODE_TOKENS} | wrinklefree {meta['wrinklefree_version']} | llama-cpp-python {llama_version}\n"
        "roof/s = read BW (probed before and after the run) / bytes streamed per decoded token (ternary weights "
        "in the format the engine runs + the head);\nmodel MB = peak RSS - RSS before loading; pf x, dec x = "
        "prefill, decode speed over llama.cpp TQ2_0's;\nothers = CPU cores other processes used during the run "
        "(the largest over rounds; above ~0.1 the timings are disturbed: rerun on a quiet machine)\n"
    )
    print_header()
    results: dict[tuple[str, str, str], list[dict]] = {key: [] for key in runs(engines)}
    for rnd in range(args.rounds):
        if args.rounds > 1:
            print(f"round {rnd + 1} of {args.rounds}")
        for key, done in results.items():
            done.append(run_once(args.shape, *key, args.threads, args.reps))
            print_row(make_row(args.shape, *key, args.threads, done[-1:]))
    rows = [make_row(args.shape, *key, args.threads, done) for key, done in results.items()]
    add_ratios(rows)
    print(f"\nall rounds ({args.rounds} x {args.reps} runs per engine; medians), with the ratios:")
    print_header()
    for r in rows:
        print_row(r)
    targets = evaluate_targets(rows)
    print_targets(targets)
    busy = [r for r in rows if max(r["other_cpu_cores"]) > BUSY_CORES]
    if busy:
        print(
            f"\nWARNING: other processes used > {BUSY_CORES} cores during {len(busy)} of {len(rows)} engines' runs "
            "(column `others`): these figures are disturbed; rerun on a quiet machine"
        )
    meta["wall_s"] = time.perf_counter() - start
    out = Path(args.out or BENCH_DIR / "out" / f"e2e-{args.shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "targets": targets}, indent=1) + "\n")
    print(f"\nwrote {out} ({len(rows)} rows) in {meta['wall_s']:.1f} s")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        main()
