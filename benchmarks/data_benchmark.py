"""Measure the data path on corpora of growing size: preparation time, time to the first step, memory, disk.

    python benchmarks/data_benchmark.py --sizes_mb 10,100            # a table per size, then an extrapolation
    python benchmarks/data_benchmark.py --sizes_mb 10,100,1000 --peer_up_to_mb 100 --single_proc_up_to_mb 100

The corpora are made of wikitext-2's train lines (../shared/data/wikitext), repeated and shuffled until they reach
the size (train.txt; validation.txt is 5% more, made the same way): real English text and real line lengths, but far
more repetitive than a real corpus, which changes nothing here (the tokenizer's work per byte does not depend on
repetition). Every measurement runs in a fresh process, one at a time, and its peak RSS is that process's own
(`wait4`'s ru_maxrss: resident pages, memory-mapped file pages included).

For each size:
- tokenization, cold: build the token store (`token_store.open_token_store`) with --num_proc 1 and with every core,
  each into an empty folder, the text already converted to Arrow by `datasets` (that conversion, done once per
  corpus, is timed on its own);
- the training run, warm: `train_bert.py` on the prepared store, tiny model, 20 steps, 3 times; time from process
  start to the first logged step (median), peak RSS (largest);
- the peer recipe, Hugging Face run_mlm's (reimplemented minimally here): `map` tokenization with
  return_special_tokens_mask, `map(group_texts)` into 128-token chunks, then the same tiny model trained 20 steps on
  DataCollatorForLanguageModeling batches: its cold preparation time (all cores), disk, warm time to the first step
  and peak RSS.

TOKENIZERS_PARALLELISM=false everywhere: processes are then the only parallelism, so "1 process" means one core.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext"
TOKENIZER = ROOT.parent / "shared" / "data" / "roberta-base"
TINY_MODEL = {"num_layers": 2, "num_heads": 2, "h_dim": 64, "ff_dim": 128, "max_seq_length": 128, "batch_size": 8}
STEPS = 20
WARM_RUNS = 3  # the median time to the first step, the largest peak RSS
MIB = 2**20


# ----------------------------------------------------------------------------------------------------------------------
# Corpora and child processes.
# ----------------------------------------------------------------------------------------------------------------------


def make_corpus(directory: Path, size_mb: int, seed: int = 0) -> Path:
    """train.txt of about `size_mb` MB and validation.txt of 5% of that, from shuffled repeats of wikitext lines."""
    if (directory / "validation.txt").is_file():
        return directory
    import datasets

    lines = [line for line in datasets.load_dataset(str(WIKITEXT), "wikitext-2-v1", split="train")["text"]]
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, target in (("train", size_mb * 10**6), ("validation", size_mb * 10**6 // 20)):
        written = 0
        with open(directory / f"{split}.txt.tmp", "w") as file:
            while written < target:
                rng.shuffle(lines)
                for line in lines:
                    file.write(line.rstrip("\n") + "\n")
                    written += len(line.encode()) + 1
                    if written >= target:
                        break
        os.rename(directory / f"{split}.txt.tmp", directory / f"{split}.txt")
    return directory


def run_child(command: list[str], first_step_file: Path | None = None) -> dict:
    """Run `command`; return its wall time, peak RSS (MiB), time to the first step (when a file matching the glob
    `first_step_file` appears, non-empty) and the JSON it printed last, if any."""
    start = time.time()
    # Files, not pipes: nobody reads a pipe until the child ends, and a long run's progress bars fill its 64 KiB,
    # which blocks the child's next write for ever.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, cwd=ROOT, env=os.environ)
        first_step = None
        while True:  # wait4 (not poll) so the child's resource usage is ours to read
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if (
                first_step is None
                and first_step_file is not None
                and any(os.path.getsize(path) > 0 for path in glob.glob(str(first_step_file)))
            ):
                first_step = time.time() - start
            if pid:
                break
            time.sleep(0.05)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    result = {
        "wall_s": time.time() - start,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "first_step_s": first_step,
        "stderr": stderr,
    }
    json_lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return {**result, **(json.loads(json_lines[-1]) if json_lines else {})}


def folder_mib(path: Path) -> float:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) / MIB


# ----------------------------------------------------------------------------------------------------------------------
# What the children run (`python data_benchmark.py _child MODE ...`).
# ----------------------------------------------------------------------------------------------------------------------


def child_load(corpus: str) -> None:
    """Convert the text to Arrow once (the datasets cache), as every later run finds it."""
    from pretraining.corpus import load_text_dataset

    load_text_dataset(corpus, None)


def child_tokenize(corpus: str, store: str, num_proc: int) -> None:
    """Build the token store from scratch in `store`; print the seconds it took."""
    from pretraining import token_store
    from pretraining.corpus import load_text_dataset, load_tokenizer

    raw = load_text_dataset(corpus, None)
    tokenizer = load_tokenizer(str(TOKENIZER))
    start, cpu_start = time.perf_counter(), os.times()
    tokens, _ = token_store.open_token_store(corpus, None, tokenizer, store, num_proc, raw)
    cpu = os.times()
    cpu_seconds = sum(
        getattr(cpu, name) - getattr(cpu_start, name) for name in ("user", "system", "children_user", "children_system")
    )
    print(
        json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds, "tokens": len(tokens["train"])})
    )


def child_peer(corpus: str, cache: str, num_proc: int, train: bool, first_step_file: str) -> None:
    """Hugging Face run_mlm's recipe: tokenize (map), group_texts (map), DataCollatorForLanguageModeling batches."""
    import datasets
    import torch
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    import train_bert

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    raw = datasets.load_dataset("text", data_files={s: f"{corpus}/{s}.txt" for s in ("train", "validation")})
    block_size = TINY_MODEL["max_seq_length"]

    def tokenize_function(examples):
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples):  # run_mlm.py's, verbatim in substance: concatenate each batch, drop its remainder
        concatenated = {k: sum(examples[k], []) for k in examples.keys()}
        total_length = (len(concatenated[list(examples.keys())[0]]) // block_size) * block_size
        return {k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}

    tokenized = raw.map(
        tokenize_function,
        batched=True,
        num_proc=num_proc,
        remove_columns=["text"],
        cache_file_names={s: f"{cache}/{s}-tokenized.arrow" for s in raw},
    )
    grouped = tokenized.map(
        group_texts, batched=True, num_proc=num_proc, cache_file_names={s: f"{cache}/{s}-grouped.arrow" for s in raw}
    )
    prepared = time.perf_counter() - start
    if train:
        torch.manual_seed(0)
        model = train_bert.create_model(
            TINY_MODEL["num_layers"],
            TINY_MODEL["num_heads"],
            TINY_MODEL["ff_dim"],
            TINY_MODEL["h_dim"],
            0.1,
            tokenizer,
            block_size,
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(
            grouped["train"].with_format("torch"),
            batch_size=TINY_MODEL["batch_size"],
            shuffle=True,
            collate_fn=DataCollatorForLanguageModeling(tokenizer),
        )
        for step, batch in zip(range(STEPS), loader):
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == 0:
                Path(first_step_file).write_text("1")
    print(json.dumps({"seconds": prepared, "train_blocks": len(grouped["train"])}))


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark.
# ----------------------------------------------------------------------------------------------------------------------


def measure_size(size_mb: int, work: Path, single_proc: bool, peer: bool) -> dict:
    """Every figure of one corpus size."""
    me = [sys.executable, str(Path(__file__).resolve()), "_child"]
    corpus = make_corpus(work / f"corpus_{size_mb}mb", size_mb)
    text_mib = folder_mib(corpus)
    row: dict = {"size_mb": size_mb, "text_mib": text_mib}
    row["text_to_arrow_s"] = run_child([*me, "load", str(corpus)])["wall_s"]
    num_cores = os.cpu_count() or 1
    for num_proc in ([1] if single_proc else []) + [num_cores]:
        store = work / f"store_{size_mb}mb_{num_proc}proc"
        shutil.rmtree(store, ignore_errors=True)
        result = run_child([*me, "tokenize", str(corpus), str(store), str(num_proc)])
        row[f"tokenize_{num_proc}proc_s"] = result["seconds"]
        row[f"tokenize_{num_proc}proc_cpu_s"] = result["cpu_seconds"]
        row[f"tokenize_{num_proc}proc_rss_mib"] = result["peak_rss_mib"]
        row["tokens"] = result["tokens"]
        row["store_mib"] = folder_mib(store)
        if num_proc == 1:
            shutil.rmtree(store)
    row["num_cores"] = num_cores
    row.update(measure_warm_start(corpus, work / f"store_{size_mb}mb_{num_cores}proc", work))
    if peer:
        cache = work / f"peer_{size_mb}mb"
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir()
        marker = work / "peer_first_step"
        cold = run_child([*me, "peer", str(corpus), str(cache), str(num_cores), "0", str(marker)])
        row["peer_prepare_s"], row["peer_disk_mib"] = cold["seconds"], folder_mib(cache)
        marker.unlink(missing_ok=True)
        warm = run_child([*me, "peer", str(corpus), str(cache), str(num_cores), "1", str(marker)], marker)
        row["peer_first_step_s"], row["peer_train_rss_mib"] = warm["first_step_s"], warm["peak_rss_mib"]
        marker.unlink(missing_ok=True)
        shutil.rmtree(cache)
    return row


def measure_warm_start(corpus: Path, store: Path, work: Path) -> dict:
    """`train_bert.py` on a prepared store, WARM_RUNS times: median time to the first step, largest peak RSS."""
    experiments = work / "experiments"
    shutil.rmtree(experiments, ignore_errors=True)
    flags = {
        **TINY_MODEL,
        "checkpoint_dir": str(experiments),
        "dataset": str(corpus),
        "tokenizer": str(TOKENIZER),
        "data_cache": str(store),
        "num_iterations": STEPS,
        "log_every": 1,
        "eval_every": STEPS,
        "checkpoint_every": STEPS,
        "warmup_steps": 2,
    }
    command = [sys.executable, str(ROOT / "train_bert.py"), *[f"--{k}={v}" for k, v in flags.items()]]
    warm = []
    for _ in range(WARM_RUNS):
        warm.append(run_child(command, experiments / "bert_pretrain.*" / "metrics.jsonl"))
        if "token store: reusing" not in warm[-1]["stderr"]:
            raise RuntimeError(f"the warm run did not reuse the store:\n{warm[-1]['stderr'][-3000:]}")
        shutil.rmtree(experiments, ignore_errors=True)
    return {
        "warm_first_step_s": statistics.median(run["first_step_s"] for run in warm),
        "train_rss_mib": max(run["peak_rss_mib"] for run in warm),
    }


def tiled_store(size_mb: int, source_mb: int, work: Path) -> dict:
    """Warm figures only, at a size whose tokenization there was no time for: the corpus is made as usual, but its
    store is written by repeating the `source_mb` corpus's store until it holds as many tokens as the text would
    (the tokens per MB measured at `source_mb`), under the key the real store would have. Every later step (the
    run finding the store by key, memory-mapping it, cutting blocks, shuffling the block order) is the real one."""
    import json as json_module

    import numpy as np

    from pretraining import token_store
    from pretraining.corpus import load_tokenizer

    corpus = make_corpus(work / f"corpus_{size_mb}mb", size_mb)
    source_root = work / f"store_{source_mb}mb_{os.cpu_count()}proc"
    [source] = [path for path in source_root.iterdir() if path.is_dir()]
    tokenizer = load_tokenizer(str(TOKENIZER))
    store = token_store.token_store_dir(
        token_store.corpus_sources(str(corpus), None)[0], tokenizer, str(work / f"store_{size_mb}mb_tiled")
    )
    shutil.rmtree(store.parent, ignore_errors=True)
    store.mkdir(parents=True)
    meta = json_module.loads((source / "meta.json").read_text())
    for split, info in meta["splits"].items():
        tokens = np.load(source / f"{split}.tokens.npy", mmap_mode="r")
        target = int(len(tokens) * folder_mib(corpus) / folder_mib(work / f"corpus_{source_mb}mb"))
        repeats = -(-target // len(tokens))
        token_store.write_npy(
            store / f"{split}.tokens.npy",
            tokens.dtype,
            target,
            (np.asarray(tokens[: min(len(tokens), target - i * len(tokens))]) for i in range(repeats)),
        )
        np.save(store / f"{split}.line_ends.npy", np.zeros(0, dtype=np.int64))  # not read by training
        info.update(tokens=target)
    (store / "meta.json").write_text(json_module.dumps(meta))
    row = {
        "size_mb": size_mb,
        "text_mib": folder_mib(corpus),
        "tokens": meta["splits"]["train"]["tokens"],
        "store_mib": folder_mib(store),
        "tiled_from_mb": source_mb,
        "num_cores": os.cpu_count(),
    }
    return {**row, **measure_warm_start(corpus, store.parent, work)}


def fmt(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def report(rows: list[dict]) -> str:
    """The markdown tables: one row per size, a ratio line, and the extrapolation."""
    cores = rows[0]["num_cores"]
    lines = [
        f"| text (MB) | tokens | text → Arrow, once (s) | tokenize, 1 process (s) | tokenize, {cores} processes "
        f"(s [CPU-s]) | speed-up | store on disk (MiB) | warm: start → first step (s) | training peak RSS (MiB) | "
        f"run_mlm recipe: prepare, {cores} processes (s) | its disk (MiB) | its start → first step (s) | "
        f"its peak RSS (MiB) |",
        "|" + "---|" * 13,
    ]
    for row in rows:
        one, many = row.get("tokenize_1proc_s"), row.get(f"tokenize_{cores}proc_s")
        lines.append(
            f"| {row['size_mb']:,}{' (store tiled*)' if 'tiled_from_mb' in row else ''} | {row['tokens']:,} | "
            f"{fmt(row.get('text_to_arrow_s'))} | {fmt(one)} | {fmt(many)}"
            f"{' [' + fmt(row[f'tokenize_{cores}proc_cpu_s'], 0) + ']' if many else ''} | "
            f"{fmt(one / many if one else None, 2)}{'x' if one else ''} | {fmt(row['store_mib'])} | "
            f"{fmt(row['warm_first_step_s'])} | {fmt(row['train_rss_mib'], 0)} | {fmt(row.get('peer_prepare_s'))} | "
            f"{fmt(row.get('peer_disk_mib'))} | {fmt(row.get('peer_first_step_s'))} | "
            f"{fmt(row.get('peer_train_rss_mib'), 0)} |"
        )
    small, large = rows[0], rows[-1]
    if "tiled_from_mb" in large:
        lines += [
            "",
            f"*Warm figures only: the store of the {large['size_mb']:,} MB corpus was tiled from the "
            f"{large['tiled_from_mb']:,} MB corpus's store, to the token count the text would give (see "
            "`tiled_store`); it was not tokenized.",
        ]
    lines += [
        "",
        f"Largest vs smallest ({large['size_mb']:,} MB vs {small['size_mb']:,} MB): training peak RSS "
        f"{large['train_rss_mib'] - small['train_rss_mib']:+.0f} MiB, warm time to the first step "
        f"{large['warm_first_step_s'] / small['warm_first_step_s']:.2f}x.",
    ]
    tokenized = [row for row in rows if f"tokenize_{cores}proc_s" in row]
    if len(rows) >= 2:
        lines += ["", extrapolation(small, tokenized[-1], large, cores)]
    return "\n".join(lines)


def extrapolation(small: dict, tokenized: dict, large: dict, cores: int) -> str:
    """Disk, RAM and preparation time for bigger corpora: store size and preparation time per MB from the largest
    tokenized size, the memory slope between the smallest and the largest size."""
    mb = lambda row: row["text_mib"] * MIB / 1e6  # noqa: E731
    store_per_mb, tokens_per_mb = tokenized["store_mib"] / mb(tokenized), tokenized["tokens"] / mb(tokenized)
    prep_per_mb = tokenized[f"tokenize_{cores}proc_s"] / mb(tokenized)
    rss_per_mb = max(0.0, (large["train_rss_mib"] - small["train_rss_mib"]) / (mb(large) - mb(small)))  # noise: < 0
    lines = [
        f"| corpus | text | token store on disk | datasets' Arrow copy of the text | training RAM (RSS) | of "
        f"which the epoch's block order | preparation, {cores} cores | preparation, 64 cores |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order_mib_per_mb = tokens_per_mb / (TINY_MODEL["max_seq_length"] - 2) * 8 / MIB  # int64 per block
    other_rss_per_mb = max(0.0, rss_per_mb - order_mib_per_mb)  # what the measured slope leaves unexplained
    for name, size_mb in (("Wikipedia + BookCorpus", 16_000), ("100 GB", 100_000)):
        order_mib = order_mib_per_mb * size_mb
        rss = large["train_rss_mib"] + (order_mib_per_mb + other_rss_per_mb) * (size_mb - mb(large))
        hours = prep_per_mb * size_mb / 3600
        lines.append(
            f"| {name} | {size_mb / 1000:,.0f} GB | {store_per_mb * size_mb / 1024:,.1f} GiB | "
            f"~{size_mb / 1000 * 1.0:,.0f} GB | ~{rss:,.0f} MiB | {order_mib:,.0f} MiB | {hours:,.1f} h | "
            f"{hours * cores / 64 * 60:,.0f} min |"
        )
    lines.append(
        f"\nSlopes from the measured sizes: {store_per_mb:.2f} MiB of store and {tokens_per_mb:,.0f} tokens "
        f"per MB of text; {prep_per_mb:.2f} s of preparation per MB with {cores} processes; training RSS "
        f"{rss_per_mb * 1000:+.1f} MiB per GB of text measured, of which the epoch's shuffled block order (a "
        f"torch.randperm, 8 bytes per 128-token block) explains {order_mib_per_mb * 1000:.1f}; training RAM = "
        f"the largest size's RSS + that order's growth + {other_rss_per_mb * 1000:.1f} MiB per GB for the "
        f"rest. 64 cores assumes tokenization keeps scaling with processes."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes_mb", default="10,100", help="corpus sizes in MB of train text, comma-separated")
    parser.add_argument("--work_dir", default="/tmp/data_benchmark", help="corpora, stores and caches go here")
    parser.add_argument(
        "--single_proc_up_to_mb",
        type=int,
        default=10**9,
        help="measure 1-process tokenization only up to this size (it is the slowest part)",
    )
    parser.add_argument("--peer_up_to_mb", type=int, default=10**9, help="run the run_mlm recipe up to this size")
    parser.add_argument(
        "--tiled_mb",
        type=int,
        default=None,
        help="also this size, warm figures only, its store tiled from the largest measured one's (see tiled_store)",
    )
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf_datasets_cache")  # the corpora's Arrow copies stay in work
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(
        f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} cores; uptime before: {uptime}",
        flush=True,
    )
    rows = []
    for size_mb in map(int, args.sizes_mb.split(",")):
        rows.append(measure_size(size_mb, work, size_mb <= args.single_proc_up_to_mb, size_mb <= args.peer_up_to_mb))
        print(json.dumps(rows[-1]), flush=True)
    if args.tiled_mb:
        rows.append(tiled_store(args.tiled_mb, rows[-1]["size_mb"], work))
        print(json.dumps(rows[-1]), flush=True)
    print(f"# uptime after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}\n")
    print(report(rows))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        mode, *rest = sys.argv[2:]
        if mode == "load":
            child_load(*rest)
        elif mode == "tokenize":
            child_tokenize(rest[0], rest[1], int(rest[2]))
        else:
            child_peer(rest[0], rest[1], int(rest[2]), rest[3] == "1", rest[4])
    else:
        main()
