"""Benchmark ``prepare-data``: tokens per second and peak memory at 1, 2 and N workers.

    python scripts/bench_prepare.py --out bench_prepare.json            # 200 MB corpus
    python scripts/bench_prepare.py --size-mb 2 --workers 1,2 --out x.json  # a quick look

Steps, all in a temporary directory (``--workdir`` to choose it):
1. Generate a JSONL corpus of at least ``--size-mb`` MB, deterministically:
   the Python standard library's ``.py`` files (the embedded corpus), one
   record each, in a seeded shuffled order per repetition, repeated until the
   size is reached. One big file, so the reader's streaming is exercised.
2. Train one SentencePiece tokenizer (vocab 4096) on a 5 MB slice of the
   stdlib (``--tokenizer-mb``), once; every timed run reuses it (``--tokenizer-path``), so the runs
   time scanning + tokenization + writing, which is what grows with the data.
3. For each worker count, run ``python -m locmoe_train.data.prepare`` as a
   child process, sampling with psutil the resident memory of the main
   process and of its worker processes every 0.2 s; the outputs of all runs
   must be byte-identical (their ``.bin``/``.idx`` hashes are compared).
4. Run the largest worker count once more on a ``--small-mb`` prefix of the
   corpus: peak memory that does not grow with the input shows the streaming.

The JSON written has one row per worker count (wall seconds, tokens, tokens/s,
peak RSS of the main process, of the largest worker and of all together),
the corpus description, the machine's CPU count and load averages, and a
projection of the hours needed for 10B tokens at the best measured rate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from locmoe_train.data.corpus import iter_documents  # noqa: E402
from locmoe_train.data.encode_pool import default_workers  # noqa: E402

SAMPLE_S = 0.2
VOCAB_SIZE = 4096
PROJECT_TOKENS = 10_000_000_000
MIB = 1 << 20


def generate_corpus(path: str, size_mb: float, seed: int) -> Dict[str, int]:
    """Write stdlib files as JSONL records, reshuffled each pass, until ``size_mb`` MB."""
    texts = [text for _, text in iter_documents(None)]
    target = int(size_mb * 1e6)
    written = records = passes = 0
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            order = list(range(len(texts)))
            rng.shuffle(order)
            passes += 1
            for i in order:
                line = json.dumps({"text": texts[i]}) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                records += 1
                if written >= target:
                    break
    return {"bytes": written, "records": records, "stdlib_passes": passes}


def train_tokenizer(workdir: str, sample_mb: float) -> str:
    out = os.path.join(workdir, "tokenizer_run")
    subprocess.run([sys.executable, "-m", "locmoe_train.data.prepare", "--output", out,
                    "--max-bytes", str(int(sample_mb * 1e6)), "--vocab-size", str(VOCAB_SIZE),
                    "--force"],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return os.path.join(out, "tokenizer.model")


def output_digest(out_dir: str) -> str:
    digest = hashlib.sha256()
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx", "valid_documents.txt"):
        with open(os.path.join(out_dir, name), "rb") as f:
            for block in iter(lambda: f.read(MIB), b""):
                digest.update(block)
    return digest.hexdigest()


def run_one(corpus: str, tokenizer: str, out_dir: str, workers: int, log) -> Dict[str, object]:
    cmd = [sys.executable, "-m", "locmoe_train.data.prepare", "--input", corpus, "--output",
           out_dir, "--tokenizer-path", tokenizer, "--workers", str(workers), "--force"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)
    main = psutil.Process(proc.pid)
    peak_main = peak_worker = peak_total = 0
    while proc.poll() is None:
        try:
            rss_main = main.memory_info().rss
            children = [c.memory_info().rss for c in main.children(recursive=True)]
        except psutil.Error:  # the process ended between poll() and the sample
            break
        peak_main = max(peak_main, rss_main)
        peak_worker = max([peak_worker] + children)
        peak_total = max(peak_total, rss_main + sum(children))
        time.sleep(SAMPLE_S)
    wall = time.monotonic() - start
    if proc.wait() != 0:
        raise SystemExit(f"bench_prepare: {' '.join(cmd)} failed (rc {proc.returncode}); "
                         "see the log")
    with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    tokens = meta["train"]["tokens"] + meta["valid"]["tokens"]
    return {"workers": workers, "wall_s": round(wall, 2), "tokens": tokens,
            "documents": meta["train"]["documents"] + meta["valid"]["documents"],
            "tokens_per_s": round(tokens / wall),
            "peak_rss_main_mib": round(peak_main / MIB, 1),
            "peak_rss_largest_worker_mib": round(peak_worker / MIB, 1),
            "peak_rss_total_mib": round(peak_total / MIB, 1),
            "digest": output_digest(out_dir)}


def _memory(row: Dict[str, object]) -> Dict[str, object]:
    return {k: v for k, v in row.items() if k.startswith("peak_rss") or k == "tokens"}


def parse_workers(text: str) -> List[int]:
    counts: List[int] = []
    for item in text.split(","):
        n = default_workers() if item.strip() == "N" else int(item)
        if n < 1:
            raise SystemExit(f"bench_prepare: --workers entries must be >= 1 or N, got {item!r}")
        if n not in counts:
            counts.append(n)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=200.0,
                        help="corpus size in MB (default: %(default)s)")
    parser.add_argument("--workers", default="1,2,N",
                        help="comma-separated worker counts, N = all CPUs (default: %(default)s)")
    parser.add_argument("--small-mb", type=float, default=50.0,
                        help="size of the smaller corpus for the memory-vs-size check "
                        "(default: %(default)s; 0 skips it)")
    parser.add_argument("--tokenizer-mb", type=float, default=5.0,
                        help="stdlib text the tokenizer is trained on (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="corpus shuffle seed")
    parser.add_argument("--workdir", default=None, help="where the corpus and outputs go "
                        "(default: a temporary directory, removed at the end)")
    parser.add_argument("--out", default="bench_prepare.json", help="JSON results file")
    args = parser.parse_args(argv)
    counts = parse_workers(args.workers)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_prepare_")
    os.makedirs(workdir, exist_ok=True)
    try:
        log_path = os.path.join(workdir, "prepare.log")
        t0 = time.monotonic()
        corpus_path = os.path.join(workdir, "corpus.jsonl")
        corpus = generate_corpus(corpus_path, args.size_mb, args.seed)
        corpus["generate_s"] = round(time.monotonic() - t0, 1)
        print(f"bench_prepare: corpus {corpus}", flush=True)
        t0 = time.monotonic()
        tokenizer = train_tokenizer(workdir, args.tokenizer_mb)
        tokenizer_s = round(time.monotonic() - t0, 1)
        rows = []
        with open(log_path, "w") as log:
            for workers in counts:
                out_dir = os.path.join(workdir, f"out_w{workers}")
                row = run_one(corpus_path, tokenizer, out_dir, workers, log)
                shutil.rmtree(out_dir)
                print(f"bench_prepare: {row}", flush=True)
                rows.append(row)
            memory_vs_size = None
            if args.small_mb > 0:
                small_path = os.path.join(workdir, "corpus_small.jsonl")
                small = generate_corpus(small_path, args.small_mb, args.seed)
                out_dir = os.path.join(workdir, "out_small")
                small_row = run_one(small_path, tokenizer, out_dir, max(counts), log)
                shutil.rmtree(out_dir)
                os.remove(small_path)
                large_row = next(r for r in rows if r["workers"] == max(counts))
                memory_vs_size = {
                    "workers": max(counts),
                    "small": {"corpus_bytes": small["bytes"], **_memory(small_row)},
                    "large": {"corpus_bytes": corpus["bytes"], **_memory(large_row)}}
                print(f"bench_prepare: memory vs size {memory_vs_size}", flush=True)
        best = max(rows, key=lambda r: r["tokens_per_s"])
        result = {
            "command": " ".join([os.path.basename(sys.executable), "scripts/bench_prepare.py"]
                                + list(argv if argv is not None else sys.argv[1:])),
            "machine": {"cpus": os.cpu_count(), "available_cpus": default_workers(),
                        "python": platform.python_version(),
                        "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
            "corpus": corpus, "tokenizer": {"vocab_size": VOCAB_SIZE,
                                           "sample_mb": args.tokenizer_mb,
                                           "train_s": tokenizer_s},
            "runs": rows, "memory_vs_size": memory_vs_size,
            "identical_outputs": len({r["digest"] for r in rows}) == 1,
            "projection_10B_tokens_hours": round(PROJECT_TOKENS / best["tokens_per_s"] / 3600, 1),
            "projection_workers": best["workers"],
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps({k: result[k] for k in ("identical_outputs", "projection_10B_tokens_hours")}))
    if not result["identical_outputs"]:
        print("bench_prepare: outputs differ between worker counts", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
