"""The text prefix: peak memory of encoding it, and the cost of padding episodes to the cache's longest utterance.

Memory: the embeddings stage's prefix for N CLINC150 utterances, each way in its own subprocess (ru_maxrss is a
process's peak): `one_shot` holds every utterance's float32 hidden states, then the whole float16 table (the
stage before streaming), `stream` encodes a chunk of utterances at a time and appends its table rows to the
Parquet file (`text.stream_utterances`, `flows.cache.table_appender`).

Padding: second-order MAML meta-training episodes/s and test-time evaluation (10 steps, queries scored at 0 and
10; episodes ordered by their longest utterance, as `TextTasks.open` orders them, 25 adapted at once) on the
cached prefix of ProtAugment's BANKING77 (max_length 64), with each call's rows padded to their own longest
utterance (`CachedTopEncoder(trim=True)`, the default) or to the cache's (`trim=False`), alternating subprocesses.

    python benchmarks/text_prefix.py --memory [--utterances 4000]
    python benchmarks/text_prefix.py --padding
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_json_atomic  # noqa: E402
from components import text  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_worker(args) -> dict:
    torch.set_num_threads(args.threads)
    import pyarrow.parquet  # noqa: F401 (both ways write Parquet: its import is not the data's memory)

    texts = text.load_clinc150(SHARED / "clinc150")["text"].iloc[:args.utterances].tolist()
    encoder = text.load_minilm()
    text.encode_utterances(texts[-256:], 2, args.max_length, encoder)  # warm-up: the kernels' own buffers
    loaded = rss_mb()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        if args.mode == "one_shot":  # the stage before streaming: everything dense, then one table
            backbone, tokenizer = encoder
            first = len(backbone.encoder.layer) - 2
            hidden, mask = text.encode_prefix(backbone, tokenizer, texts, first, args.max_length)
            top = text.TopEncoder(backbone, text.TopEncoderConfig(n_layers=2, lora_r=0))
            sentences = F.normalize(text.sentence_embeddings(top, hidden, mask), dim=-1).numpy()
            text.prefix_table(hidden, mask).to_parquet(Path(out) / "prefix.parquet", index=False)
            pd.DataFrame(sentences).rename(columns=str).to_parquet(Path(out) / "sentences.parquet", index=False)
        else:
            from flows.cache import table_appender

            with table_appender(Path(out)) as write:
                sentences, _ = text.stream_utterances(texts, 2, args.max_length, write, chunk=args.chunk,
                                                      encoder=encoder)
                write("sentences", sentences)
        size = sum(f.stat().st_size for f in Path(out).iterdir()) / 2 ** 20
    return {"mode": args.mode, "chunk": args.chunk if args.mode == "stream" else None, "seconds":
            time.perf_counter() - start, "rss_after_load_mb": loaded, "peak_rss_mb": rss_mb(), "parquet_mb": size}


def memory(args) -> dict:
    rows = []
    for mode, chunk in (("stream", 2048), ("one_shot", 0), ("stream", 512)):
        rows.append(subprocess_run(args, ["--mode", mode, "--chunk", str(chunk or 256)]))
        r = rows[-1]
        print(f"{mode:<9} chunk {str(r['chunk']):>5}: peak RSS {r['peak_rss_mb']:6.0f} MB "
              f"({r['peak_rss_mb'] - r['rss_after_load_mb']:+6.0f} MB over the warmed-up model), "
              f"{r['seconds']:5.1f} s, "
              f"Parquet {r['parquet_mb']:.0f} MB")
    return {"rows": rows}


def padding_worker(args) -> dict:
    from components.episodes import class_members, episodes_from_rows, sample_rows
    from components.evaluation import evaluate_init
    from components.metalearners import MetaLearner, MetaLearnerConfig

    torch.set_num_threads(args.threads)
    table = pd.read_json(SHARED / "protaugment" / "BANKING77" / "full.jsonl", lines=True)
    table = table.iloc[:args.utterances]
    backbone, tokenizer = text.load_minilm()
    prefix, _, _ = text.encode_utterances(table["sentence"].tolist(), 2, args.max_length, (backbone, tokenizer))
    hidden, mask = text.prefix_from_table(prefix, len(table))
    top = text.TopEncoder(backbone, text.TopEncoderConfig(n_layers=2, n_way=5, lora_r=8))
    model = text.CachedTopEncoder(top, hidden, mask, trim=args.mode == "trim")
    adapted = text.adapted_names(model)
    learner = MetaLearner(model, MetaLearnerConfig(algorithm="maml", inner_steps=1, fast_lr=0.5), F.cross_entropy,
                          adapted=adapted, frozen=[n for n, _ in model.named_parameters() if n not in set(adapted)])
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    labels = table["label"].to_numpy()
    members = class_members(labels, sorted(set(labels)))

    def episodes(n: int, seed: int):
        return episodes_from_rows(sample_rows(members, 5, args.shots, 5, n, seed)[0], args.shots)

    def iteration(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        learner.meta_backward(episodes(4, i))
        opt.step()

    iteration(10_000)  # warm-up
    start = time.perf_counter()
    for i in range(args.iterations):
        iteration(i)
    train = args.iterations * 4 / (time.perf_counter() - start)
    test = episodes(args.episodes, 99)
    chars = torch.tensor(table["sentence"].str.len().to_numpy(dtype=np.int64))  # as TextTasks.open orders them
    test = test.index(torch.argsort(torch.maximum(chars[test.x_spt].amax(1), chars[test.x_qry].amax(1)), stable=True))
    start = time.perf_counter()
    scores = evaluate_init(learner, test, 10, 25, lambda z, y: (z.argmax(-1) == y).float().mean(), [0, 10])
    evaluation = args.episodes / (time.perf_counter() - start)
    return {"mode": args.mode, "train_episodes_per_s": train, "test_episodes_per_s": evaluation,
            "accuracy_10_steps": float(np.mean(scores[-1])), "cache_width": int(mask.shape[1]),
            "median_tokens": float(mask.sum(1).median()), "peak_rss_mb": rss_mb()}


def padding(args) -> dict:
    runs = {"trim": [], "full": []}
    for _ in range(args.rounds):
        for mode in runs:
            runs[mode].append(subprocess_run(args, ["--mode", mode]))
    table = {mode: {k: statistics.median(r[k] for r in rs) for k in ("train_episodes_per_s", "test_episodes_per_s")}
             | {"accuracy_10_steps": rs[0]["accuracy_10_steps"], "runs": rs} for mode, rs in runs.items()}
    first = runs["trim"][0]
    print(f"BANKING77 (ProtAugment), {args.utterances} utterances, max_length {args.max_length}: cache width "
          f"{first['cache_width']}, median {first['median_tokens']:.0f} tokens; 5-way {args.shots}-shot, 5 queries")
    for mode, t in table.items():
        print(f"  {mode:<4}: MAML meta-training {t['train_episodes_per_s']:6.2f} episodes/s, evaluation "
              f"{t['test_episodes_per_s']:6.2f} episodes/s, accuracy after 10 steps {t['accuracy_10_steps']:.4f}")
    for key in ("train_episodes_per_s", "test_episodes_per_s"):
        table[f"{key}_ratio"] = table["trim"][key] / table["full"][key]
    print(f"  trim / full: {table['train_episodes_per_s_ratio']:.2f}x meta-training, "
          f"{table['test_episodes_per_s_ratio']:.2f}x evaluation")
    return table


def subprocess_run(args, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        keys = ("utterances", "max_length", "threads", "shots", "iterations", "episodes")
        part = "--memory" if args.memory else "--padding"
        cmd = [sys.executable, __file__, "--worker", "--worker-out", str(out), part,
               *extra, *(x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k))))]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        return json.loads(out.read_text())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", action="store_true")
    p.add_argument("--padding", action="store_true")
    p.add_argument("--utterances", type=int, default=None, help="default: 4000 (memory), 3000 (padding)")
    p.add_argument("--max-length", type=int, default=None, help="default: 32 (memory, CLINC150), 64 (padding)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--iterations", type=int, default=10, help="--padding: timed meta-iterations (meta-batch 4)")
    p.add_argument("--episodes", type=int, default=50, help="--padding: timed test episodes")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "text-prefix.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=text.PREFIX_CHUNK, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.utterances = args.utterances or (4000 if args.memory else 3000)
    args.max_length = args.max_length or (32 if args.memory else 64)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        write_json_atomic((memory_worker if args.memory else padding_worker)(args), args.worker_out)
        return
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    part = "memory" if args.memory else "padding"
    out[part] = {"results": memory(args) if args.memory else padding(args),
                 "settings": {k: str(v) for k, v in vars(args).items()},
                 "command": "python benchmarks/text_prefix.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    write_json_atomic(out, args.out)


if __name__ == "__main__":
    main()
