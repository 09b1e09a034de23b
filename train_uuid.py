"""
Memorise pairs of random UUIDs: the MoRA paper's headline experiment (Sec. 5.1), at laptop scale.

Each pair is trained as the text "key:value\n". Nothing in a key predicts its value, so the only
way to produce the value is to store it in the weights: the task measures how fast a method can
write new knowledge into a model. The paper finds that, at the same number of trainable
parameters, MoRA memorises much faster than LoRA, close to full fine-tuning (FFT).

    python train_uuid.py --method mora --rank 256     # one run
    python train_uuid.py --method all --seeds 3        # the paper's five rows, same data and seeds
    python train_uuid.py --method variants             # Sec. 6.2: MoRA's four compressions at r = 8
    python train_uuid.py --method all --setting paper-ratio   # ranks 8 and 256 truly low-rank (width 1024)
"""

import argparse
import copy
import json
import math
import os
import random
import time
import uuid
import warnings
from contextlib import nullcontext

import torch
import torch.nn as nn

from mora import (DEFAULT_TARGETS, Llama, LlamaConfig, adapter_state_dict, apply_adapters, count_parameters,
                  count_singular_values, effective_weights, merge_and_unload, resolve_variant)

# Character-level tokens: a UUID is 32 hex digits and 4 dashes, so 16 + 1 characters, plus the
# ":" between key and value and "\n" to end a pair. A subword tokenizer would cut the random hex
# into arbitrary pieces and make the accuracy depend on how it happens to split them.
CHARS = "0123456789abcdef-:\n"
STOI = {c: i for i, c in enumerate(CHARS)}
END = "\n"
UUID_LEN = 36
PROMPT_LEN = UUID_LEN + 1  # "key:"
SEQ_LEN = 2 * UUID_LEN + 2  # "key:value\n"

# The paper's five rows (Table 2): FFT, then LoRA and MoRA at ranks 8 and 256.
ALL_RUNS = [("fft", None), ("lora", 8), ("mora", 8), ("lora", 256), ("mora", 256)]
# Sec. 6.2 (--method variants): MoRA's four compressions / decompressions, with the paper's Table 4,
# GSM8K accuracy (%) of LLaMA-2 7B at r = 8 and 256: another task, so only the order compares.
PAPER_TABLE4 = {"truncation": {8: 59.5, 256: 66.6}, "sharing": {8: 62.5, 256: 67.9},
                "decoupling": {8: 63.6, 256: 67.8}, "rotation": {8: 64.2, 256: 67.9}}
# Peak learning rates from the sweeps in results/README.md (results/uuid_lr_sweep.json and
# uuid_variants_lr_sweep.json); the paper's 3e-4 is for a 7B model. Ranks 8 and 256 were tuned, other
# ranks take the nearer one's. Each variant was tuned at rank 8; at 256 the others take sharing's rate.
DEFAULT_LR = {"fft": 5e-3, "lora": {8: 7e-3, 256: 2e-3},
              "mora": {"rotation": {8: 1e-2, 256: 2e-3}, "sharing": {8: 5e-3, 256: 2e-3},
                       "truncation": {8: 1e-2, 256: 2e-3}, "decoupling": {8: 1e-2, 256: 2e-3}}}
RANK, SV_THRESHOLD = 8, 0.1  # default rank; Sec. 6.1 counts singular values of dW above 0.1
# Model and data by --setting (explicit flags override). The default is fast on a CPU, but there
# rank 256 is twice the width: its adapters hold more numbers than the matrices they adapt. In the
# paper, ranks 8 and 256 are 1/512 and 1/16 of the width; paper-ratio makes them 1/128 and 1/4, with
# the default's SwiGLU ratio (2.75) and LLaMA's heads of 64. Its learning rates are DEFAULT_LR's, tuned at width 128.
SETTINGS = {"default": dict(dim=128, hidden_dim=352, n_heads=4, n_layers=2, pairs=100, steps=900, batch_size=64),
            "paper-ratio": dict(dim=1024, hidden_dim=2816, n_heads=16, n_layers=2, pairs=100, steps=900, batch_size=64)}


def default_lr(method, rank, variant=None):
    if method == "fft":
        return DEFAULT_LR["fft"]
    # ReMoRA's other sharing groupings (official types 2 to 4) take sharing's rates
    tuned = DEFAULT_LR["lora"] if method == "lora" else DEFAULT_LR["mora"].get(variant, DEFAULT_LR["mora"]["sharing"])
    return tuned[min(tuned, key=lambda r: abs(math.log(rank / r)))]


def default_variant(rank):
    """The official advice: rotation (type 6) for small ranks, sharing (type 1) for large ones."""
    return "rotation" if rank < 128 else "sharing"


# -----------------------------------------------------------------------------
# data


def make_pairs(n, seed):
    """n (key, value) pairs of random version-4 UUIDs, the same for the same seed."""
    rng = random.Random(seed)
    new = lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return [(new(), new()) for _ in range(n)]


def encode(text):
    return [STOI[c] for c in text]


def decode(ids):
    return "".join(CHARS[i] for i in ids)


def make_examples(pairs, loss_on="all"):
    """Inputs and targets (N, SEQ_LEN - 1). loss_on="all" trains on the whole text, as the official
    run does; "value" masks the key's positions (-100) so only the value and end are learnt."""
    tokens = torch.tensor([encode(f"{k}:{v}{END}") for k, v in pairs])
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    if loss_on == "value":
        y[:, : PROMPT_LEN - 1] = -100
    return x, y


def char_accuracy(pred, target):
    """Share of characters right, position by position; a wrong length counts the missing or
    extra characters as wrong."""
    if not pred and not target:
        return 1.0
    return sum(p == t for p, t in zip(pred, target)) / max(len(pred), len(target))


@torch.no_grad()
def evaluate(model, pairs, device, autocast, batch_size=512):
    """Mean character accuracy (%) of the value generated greedily from "key:" (not teacher-forced)."""
    model.eval()
    total = 0.0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        prompt = torch.tensor([encode(f"{k}:") for k, _ in chunk], device=device)
        with autocast:
            out = model.generate(prompt, UUID_LEN + 1)[:, PROMPT_LEN:].tolist()
        for ids, (_, value) in zip(out, chunk):
            total += char_accuracy(decode(ids).split(END)[0], value)
    model.train()
    return 100.0 * total / len(pairs)


# -----------------------------------------------------------------------------
# model


def base_model(args, seed, device, pretrained=None):
    """The frozen starting point: a fixed seeded initialisation, or a copy of a model saved by
    train_tiny_llama.py (load_pretrained). The seed also fixes the adapters' initialisation."""
    torch.manual_seed(seed)
    if pretrained is not None:
        return copy.deepcopy(pretrained[0]), pretrained[1]
    cfg = LlamaConfig(vocab_size=len(CHARS), dim=args.dim, hidden_dim=args.hidden_dim,
                      n_heads=args.n_heads, n_layers=args.n_layers, max_seq_len=SEQ_LEN)
    return Llama(cfg).to(device), f"random init (seed {seed})"


def load_pretrained(path, device):
    """A model saved by train_tiny_llama.py --out (any method: adapters are merged into their
    layers), its vocabulary cut down to our characters. Each character must be a single token of
    its vocabulary, found in the checkpoint's "token_bytes" (no tokenizer needed)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        fp = ckpt["fingerprint"]
        cfg = LlamaConfig(**fp["model"])
    except Exception:
        raise SystemExit(f"error: {path} is not a checkpoint saved by train_tiny_llama.py") from None
    if cfg.max_seq_len < SEQ_LEN:
        raise SystemExit(f"error: {path} has max_seq_len {cfg.max_seq_len}, a pair needs {SEQ_LEN} (train it with --seq-len {SEQ_LEN} or more)")
    if "token_bytes" not in ckpt:
        raise SystemExit(f"error: {path} has no token_bytes (an older train_tiny_llama.py saved it): save it again")
    vocab = ckpt["token_bytes"]  # bytes of each token id
    missing = [c for c in CHARS if c.encode() not in vocab]
    if missing:
        raise SystemExit(f"error: the vocabulary of {path} ({fp.get('encoding')}) has no single token for {missing}")
    model, method = Llama(cfg), fp["method"]
    if method != "full":  # the run's own adapters, so that its state dict loads as saved
        kind = "lora" if method in ("lora", "relora") else "mora"
        kwargs = {"alpha": fp.get("lora_alpha")} if kind == "lora" else {"variant": fp["variant"]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_adapters(model, kind, r=fp["rank"], targets=DEFAULT_TARGETS, **kwargs)
    model.load_state_dict(ckpt["model"])
    model = merge_and_unload(model).requires_grad_(True)  # as a fresh model: FFT trains it all, adapters re-freeze it
    rows = [vocab.index(c.encode()) for c in CHARS]
    with torch.no_grad():  # keep our characters' rows of the embedding and the output head
        model.embed = nn.Embedding.from_pretrained(model.embed.weight[rows].clone(), freeze=False)
        model.head.weight = nn.Parameter(model.head.weight[rows].clone())
        model.head.out_features = len(CHARS)
    model.cfg.vocab_size = len(CHARS)
    return model.to(device), f"{path} ({method}, step {ckpt.get('step', '?')})"


# -----------------------------------------------------------------------------
# training


def lr_at(step, max_lr, warmup, total):
    """Linear warm-up, then linear decay to zero (the paper's schedule)."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    return max_lr * max(0.0, (total - step) / max(1, total - warmup))


def update_ranks(before, after):
    """Sec. 6.1: singular values of each projection's learnt update W_final - W_init above the
    paper's 0.1, averaged over layers, per projection name."""
    counts = {}
    for name, w in after.items():
        c = counts.setdefault(name.rpartition(".")[2], {"shape": list(w.shape), "n": []})
        c["n"].append(count_singular_values(w - before[name], SV_THRESHOLD))
    return {p: {"shape": c["shape"], "above_threshold": sum(c["n"]) / len(c["n"])} for p, c in counts.items()}


def train_one(method, rank, variant, lr, seed, args, device, pretrained=None, progress=""):
    """One run; pairs, initialisation and batch order all follow the seed."""
    pairs = make_pairs(args.pairs, seed)
    eval_pairs = pairs if args.eval_pairs >= len(pairs) else random.Random(seed).sample(pairs, args.eval_pairs)
    model, base_desc = base_model(args, seed, device, pretrained)
    if method != "fft":
        kwargs = {"variant": variant} if method == "mora" else {"alpha": args.lora_alpha}
        with warnings.catch_warnings():  # an adapter larger than its matrix: main has said so in one line
            warnings.simplefilter("ignore")
            apply_adapters(model, method, r=rank, **kwargs)
    before = {n: w.clone() for n, w in effective_weights(model).items()}  # a plain layer's is the weight itself
    params = count_parameters(model, trainable_only=True)
    run = {"method": method, "rank": rank, "variant": variant, "lr": lr, "seed": seed, "trainable_params": params}
    print(f"\n== {progress}{run_label(run)}, seed {seed}: {params:,} trainable parameters, lr {lr:g}, base: {base_desc}")

    x_all, y_all = make_examples(pairs, args.loss_on)
    x_all, y_all = x_all.to(device), y_all.to(device)
    optimizer = model.configure_optimizers(args.weight_decay, lr, betas=(0.9, 0.999), device_type=device.type)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    gen = torch.Generator().manual_seed(seed + 1)  # the same batches for every method at one seed
    order, pos = torch.randperm(len(pairs), generator=gen).to(device), 0
    accuracy, t0, tokens, diverged = {}, time.time(), 0, None
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > len(pairs):  # a new epoch
            order, pos = torch.randperm(len(pairs), generator=gen).to(device), 0
        idx = order[pos:pos + args.batch_size]
        pos += args.batch_size
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step - 1, lr, args.warmup, args.steps)
        with autocast:
            _, loss = model(x_all[idx], y_all[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tokens += idx.numel() * x_all.shape[1]
        if step % args.log_every == 0 or step in args.eval_at or step == args.steps:  # always at the last step
            last_loss = loss.item()  # only here: .item() waits for the GPU
            if not math.isfinite(last_loss):  # the weights are lost: later steps and counts mean nothing
                print(f"  step {step:4d}/{args.steps} | loss {last_loss} | diverged: run stopped (try a lower --lr)", flush=True)
                diverged = step
                break
            acc_msg = ""
            if step in args.eval_at:
                accuracy[step] = evaluate(model, eval_pairs, device, autocast)
                acc_msg = f" | acc {accuracy[step]:5.1f}%"
            elapsed = time.time() - t0
            print(f"  step {step:4d}/{args.steps} | loss {last_loss:.4f}{acc_msg} | {tokens / elapsed:7.0f} tok/s"
                  f" | {elapsed:5.0f}s elapsed, ETA {elapsed / step * (args.steps - step):4.0f}s", flush=True)
    run.update(accuracy={str(s): round(a, 2) for s, a in accuracy.items()}, diverged=diverged,
               final_loss=None if diverged else last_loss, seconds=round(time.time() - t0, 1),
               update_rank=None if diverged else update_ranks(before, effective_weights(model)))
    if args.out and not diverged:
        state = model.state_dict() if method == "fft" else adapter_state_dict(model)
        name = [method] + ([f"r{rank}"] if rank else []) + ([variant] if variant else []) + [f"lr{lr:g}", f"seed{seed}"]
        torch.save(state, os.path.join(args.out, "_".join(name) + ".pt"))  # one file per run of a sweep
    return run


# -----------------------------------------------------------------------------
# reporting


def run_label(run):
    if run["method"] == "fft":
        return "FFT"
    return ("LoRA" if run["method"] == "lora" else f"MoRA ({run['variant']})") + f" r={run['rank']}"


def by_config(runs):
    """The runs grouped by method, rank, variant and lr: one group holds a row's seeds."""
    groups = {}
    for r in runs:
        groups.setdefault((r["method"], r["rank"], r["variant"], r["lr"]), []).append(r)
    return list(groups.values())


def spread(values, digits=1):
    """Mean over seeds, then (min-max) when there are several; "diverged" when no seed got there."""
    f = lambda v: f"{v:.{digits}f}"
    if not values:
        return "diverged"
    return f(sum(values) / len(values)) + (f" ({f(min(values))}-{f(max(values))})" if len(values) > 1 else "")


def table(groups, head, cells):
    """A markdown table, one row per group of seeds: cells(group) gives its cells after its name."""
    lines = ["| " + " | ".join(["run", *head]) + " |", "|" + "---|" * (len(head) + 1)]
    for g in groups:
        n = sum(bool(r["diverged"]) for r in g)  # only said when some seeds diverged; cells say "diverged" for all
        label = run_label(g[0]) + (f" ({n} of {len(g)} seeds diverged)" if 0 < n < len(g) else "")
        lines.append("| " + " | ".join([label, *cells(g)]) + " |")
    return "\n".join(lines)


def report(groups, args, seconds):
    """The accuracy table (Table 2's), Table 4 beside Sec. 6.2's, and the Sec. 6.1 singular-value counts."""
    print(f"\nValue accuracy (%) generated greedily from the key, {args.pairs} pairs, " + (
        f"mean (min-max) over {args.seeds} seeds" if args.seeds > 1 else f"seed {args.seed}") + f" ({seconds:.0f}s in all):\n")
    print(table(groups, ["trainable params", "lr", *(f"step {s}" for s in args.eval_at), "time"], lambda g: [
        f"{g[0]['trainable_params']:,}", f"{g[0]['lr']:g}", *(spread([r["accuracy"][str(s)] for r in g if str(s) in r["accuracy"]])
                                                             for s in args.eval_at), f"{sum(r['seconds'] for r in g) / len(g):.0f}s"]))
    if args.method == "variants":
        print("\nThe paper's Table 4: GSM8K accuracy (%) of LLaMA-2 7B, fine-tuned with each variant (another task: compare the order):\n")
        print("| variant | r=8 | r=256 |\n|---|---|---|\n" + "\n".join(f"| {v} | {t[8]} | {t[256]} |" for v, t in PAPER_TABLE4.items()))
    print(f"\nSingular values of the learnt update W_final - W_init above {SV_THRESHOLD} (Sec. 6.1, mean over layers):\n")
    shapes = next((r["update_rank"] for g in groups for r in g if r["update_rank"]), {})  # diverged runs have none
    print(table(groups, ["lr", *(f"{p} {c['shape'][0]}x{c['shape'][1]}" for p, c in shapes.items())], lambda g: [f"{g[0]['lr']:g}", *(
        spread([r["update_rank"][p]["above_threshold"] for r in g if r["update_rank"]], 0) for p in shapes)]))


def plot(groups, path, table4=False):
    """Mean accuracy over seeds against steps, the band from min to max; with table4, the paper's figures."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("note: --plot needs matplotlib (pip install matplotlib); no plot written")
    fig, ax = plt.subplots(figsize=(6, 4))
    for g in groups:
        steps = sorted({int(s) for r in g for s in r["accuracy"]})
        accs = [[r["accuracy"][str(s)] for r in g if str(s) in r["accuracy"]] for s in steps]
        paper = PAPER_TABLE4[g[0]["variant"]].get(g[0]["rank"]) if table4 else None
        label = f"{run_label(g[0])}, lr {g[0]['lr']:g}" + (f" (paper, GSM8K: {paper})" if paper else "")
        line, = ax.plot(steps, [sum(a) / len(a) for a in accs], marker="o", label=label)
        if len(g) > 1:
            ax.fill_between(steps, [min(a) for a in accs], [max(a) for a in accs], color=line.get_color(), alpha=0.2)
    ax.set(xlabel="step", ylabel="value character accuracy (%)", ylim=(0, 102))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


# -----------------------------------------------------------------------------
# command line


def variant_type(text):
    try:
        return resolve_variant(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def device_type(name):
    """'auto' (the best available) or cpu, cuda[:n] or mps, when this machine has it."""
    have = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return next(kind for kind, ok in have.items() if ok)
    try:
        if have.get(torch.device(name).type):
            return name
    except RuntimeError:
        pass
    raise argparse.ArgumentTypeError(f"{name!r} is not a device this machine has ({', '.join(k for k, ok in have.items() if ok)})")


# The flags each method ignores (given explicitly, they earn a note), and the integer flags' least values.
IGNORED = {"fft": ("rank", "variant", "lora_alpha"), "lora": ("variant",), "mora": ("lora_alpha",), "all": ("rank",),
           "variants": ("variant", "lora_alpha")}
MINIMUM = dict(rank=1, pairs=1, steps=1, eval_pairs=1, batch_size=1, dim=1, hidden_dim=1, n_heads=1, n_layers=1,
               log_every=1, threads=1, warmup=0, seeds=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    by_setting = lambda k: "default: " + "; ".join([str(SETTINGS["default"][k])] + [
        f"{v[k]} with --setting {name}" for name, v in SETTINGS.items() if v[k] != SETTINGS["default"][k]])
    p.add_argument("--method", default="mora", choices=["fft", "lora", "mora", "all", "variants"],
                   help="fft: train every weight; lora / mora: adapters on q,k,v,o,gate,up,down; all: the paper's five rows; "
                   "variants: MoRA truncation, sharing, decoupling and rotation at --rank (Sec. 6.2) (default: mora)")
    p.add_argument("--rank", type=int, default=None, help=f"LoRA rank r; MoRA gets the same parameter budget (default: {RANK}; ignored by fft and all)")
    p.add_argument("--variant", type=variant_type, default=None, help="MoRA variant, name or official number (default: rotation below rank 128, sharing from 128)")
    p.add_argument("--setting", default="default", choices=list(SETTINGS),
                   help="default: width 128, fast on a CPU; paper-ratio: width 1024, where ranks 8 and 256 are truly low-rank (default: default)")
    p.add_argument("--pairs", type=int, default=None, help=f"number of key-value pairs ({by_setting('pairs')})")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps ({by_setting('steps')})")
    p.add_argument("--eval-at", default="100,300,500,700,900",
                   help="comma-separated steps at which to measure accuracy (default: the paper's 300,500,700,900, and 100)")
    p.add_argument("--eval-pairs", type=int, default=500, help="pairs evaluated, a fixed seeded subset when fewer than --pairs (default: 500)")
    p.add_argument("--batch-size", type=int, default=None, help=f"pairs per step ({by_setting('batch_size')})")
    p.add_argument("--lr", default=None, help="peak learning rate, or a comma-separated list to sweep: every run is repeated "
                   "at each (default: tuned per method, rank and variant, see DEFAULT_LR)")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps, then linear decay to zero (default: 50)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha, positive (default: r, i.e. scaling 1)")
    p.add_argument("--loss-on", default="all", choices=["all", "value"], help="all: loss on the whole text, as the official run; value: on the value only (default: all)")
    p.add_argument("--dim", type=int, default=None, help=f"model width ({by_setting('dim')})")
    p.add_argument("--hidden-dim", type=int, default=None, help=f"SwiGLU width ({by_setting('hidden_dim')})")
    p.add_argument("--n-heads", type=int, default=None, help=f"attention heads ({by_setting('n_heads')})")
    p.add_argument("--n-layers", type=int, default=None, help=f"transformer blocks ({by_setting('n_layers')})")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from a model saved by train_tiny_llama.py --out (any method; its shape replaces --dim etc.) instead of a random one")
    p.add_argument("--seed", type=int, default=0, help="the first seed of the pairs, the initial model and the batch order (default: 0)")
    p.add_argument("--seeds", type=int, default=1, help="repeat each run over this many seeds, --seed, --seed + 1, ...; the tables "
                   "show the mean and (min-max), the JSON every seed (default: 1)")
    p.add_argument("--device", type=device_type, default="auto", help="cuda, mps or cpu (default: auto, the best available)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines (default: 50)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the runs and the config as JSON, after each run")
    p.add_argument("--plot", default=None, metavar="PATH", help="plot accuracy against steps (needs matplotlib)")
    p.add_argument("--out", default=None, metavar="DIR", help="save each run's trained weights (adapters only for lora / mora), "
                   "one file per method, rank, variant, lr and seed")
    args = p.parse_args(argv)
    given = [f"--{k.replace('_', '-')}" for k in IGNORED[args.method] if getattr(args, k) is not None]
    if given:
        print(f"note: --method {args.method} ignores {', '.join(given)}")
    args.rank = RANK if args.rank is None else args.rank
    for name, value in SETTINGS[args.setting].items():  # explicit flags override the setting
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    try:
        args.eval_at = sorted({int(s) for s in args.eval_at.split(",") if s.strip()})
    except ValueError:
        p.error(f"--eval-at takes comma-separated step numbers, got {args.eval_at!r}")
    for name, low in MINIMUM.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if not 0 <= args.seed <= 2**64 - 1 - args.seeds:  # torch's 64 bits hold the last seed + 1 (the batch order); Random(-s) is Random(s)
        p.error(f"--seed must lie in 0..{2**64 - 1 - args.seeds} (2**64 - 1 - --seeds), got {args.seed}")
    if not 0 <= args.weight_decay < math.inf:
        p.error(f"--weight-decay must be a finite number at least 0, got {args.weight_decay}")
    if args.lora_alpha is not None and not 0 < args.lora_alpha < math.inf:
        p.error(f"--lora-alpha must be a positive number, got {args.lora_alpha}")
    bad = [s for s in args.eval_at if not 1 <= s <= args.steps]
    if bad or not args.eval_at:
        p.error(f"--eval-at steps must lie in 1..{args.steps} (--steps), got {bad or args.eval_at}")
    if args.lr is not None:
        try:
            args.lr = [float(s) for s in args.lr.split(",") if s.strip()]
        except ValueError:
            p.error(f"--lr takes a number or comma-separated numbers, got {args.lr!r}")
        if not args.lr or not all(0 < lr < math.inf for lr in args.lr):
            p.error(f"--lr must be positive and finite, got {args.lr}")
    if args.init_from is not None and not os.path.isfile(args.init_from):
        p.error(f"--init-from: no such file {args.init_from!r}")
    if args.init_from is None:
        try:
            LlamaConfig(dim=args.dim, n_heads=args.n_heads)
        except ValueError as e:
            p.error(f"--dim {args.dim} / --n-heads {args.n_heads}: {e}")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):  # checked now, not after hours of training
        if path is not None and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(path) or ".")):
            p.error(f"{flag} {path!r}: " + ("is a folder" if os.path.isdir(path) else "its folder does not exist"))
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out!r} is an existing file, not a folder")
    if args.batch_size > args.pairs:
        print(f"note: --batch-size {args.batch_size} is larger than --pairs {args.pairs}: each step trains on all {args.pairs} pairs")
    return args


def rank_note(ranks, width, hidden, hint=True):
    """The paper's ranks are at most 1/16 of the width; over a quarter, updating is not low-rank, and once r (d + k)
    >= d k for every projection (the MLP's is the last to get there), each adapter is full-size."""
    full = sorted({r for r in ranks if r * (width + hidden) >= width * hidden})
    wide = sorted({r for r in ranks if 4 * r > width} - set(full))
    says = []
    if full:
        says.append(f"rank {' and '.join(map(str, full))} makes each adapter full-size at the width {width} "
                    f"(as many numbers as the matrix it adapts, or more)")
    if wide:
        says.append(f"rank {' and '.join(map(str, wide))} is over a quarter of the width {width}")
    if says:
        setting = "; --setting paper-ratio (width 1024) keeps ranks up to 256 low-rank" if hint else ""
        return f"note: {'; '.join(says)}, so not low-rank{setting}"


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.precision == "auto":
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    if args.method == "variants":
        rows = [("mora", args.rank, v) for v in PAPER_TABLE4]
    else:
        rows = ALL_RUNS if args.method == "all" else [(args.method, None if args.method == "fft" else args.rank)]
        rows = [(m, r, (args.variant or default_variant(r)) if m == "mora" else None) for m, r in rows]
    pretrained = load_pretrained(args.init_from, device) if args.init_from else None  # loaded once, copied per run
    cfg = pretrained[0].cfg if pretrained else args  # a checkpoint's width is its own: no setting changes it
    note = rank_note([r for _, r, _ in rows if r], cfg.dim, cfg.hidden_dim, hint=not pretrained)
    if note:  # one line for what the layers would warn per shape
        print(note)
    print(f"{args.pairs} UUID pairs, {args.steps} steps of {args.batch_size} pairs, accuracy on {min(args.eval_pairs, args.pairs)} pairs "
          f"at steps {args.eval_at}, loss on {args.loss_on}, seeds {args.seed}..{args.seed + args.seeds - 1}, device {device} "
          f"({args.precision}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    config = {k: v for k, v in vars(args).items() if k not in ("json", "plot", "out")}
    config.update(torch=torch.__version__, threads=torch.get_num_threads())
    jobs = [(m, r, v, lr, seed) for m, r, v in rows for lr in args.lr or [default_lr(m, r, v)]
            for seed in range(args.seed, args.seed + args.seeds)]
    results, t0 = [], time.time()
    for i, job in enumerate(jobs):
        results.append(train_one(*job, args, device, pretrained, progress=f"[{i + 1}/{len(jobs)}] "))
        if args.json:  # after each run, so that a kill loses only the run under way; atomically (write, rename)
            with open(args.json + ".tmp", "w") as f:
                json.dump({"runs": results, "config": {**config, "total_seconds": round(time.time() - t0, 1)}}, f, indent=2)
            os.replace(args.json + ".tmp", args.json)
    groups = by_config(results)
    report(groups, args, time.time() - t0)
    if args.json:
        print(f"\nJSON written to {args.json}")
    if args.plot:
        plot(groups, args.plot, table4=args.method == "variants")
    return results


if __name__ == "__main__":
    main()
