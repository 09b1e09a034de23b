"""
What MoRA costs next to LoRA:

  python bench.py                                  # one layer at LLaMA-7B's shapes, CPU, float32
  python bench.py --device cuda                    # GPU, bfloat16
  python bench.py --model 60m --ranks 8 128        # training steps of this project's Llama
  python bench.py --json bench.json                # also add every figure to a JSON file

Layers: a frozen nn.Linear, adapted, forward + backward, the input requiring its gradient (as inside a network);
rows: the frozen layer, LoRA, every MoRA variant, PEFT's LoRA and MiSS where peft is installed. Model: training
steps of train_tiny_llama.py's model as it pretrains, batch 4 x 256 tokens, vocabulary 4,096. A time is the median
of --repeats samples taken round-robin, so that machine noise hits all rows alike. bound: the row's matrix-product
FLOPs (FlopCounterMode) over LoRA's, its time ratio if sums and copies cost nothing; saved MB: what autograd keeps
for the backward pass; peak MB: a row's steps in a process of their own, above what it held before them (CPU: the
resident set; CUDA: allocations).
"""

import collections, functools, math, multiprocessing, os, platform, signal, statistics, time, types

import common  # first: a Ctrl-C while torch loads is one line too
import torch
import torch.nn as nn
from concurrent.futures import ProcessPoolExecutor
from torch.utils.flop_counter import FlopCounterMode

from common import COUNT, PATH, POSITIVE_INT, SEED, THREADS, flag
from mora import PRESETS, VARIANTS, LlamaConfig, LoRALinear, MoRALinear, count_parameters

DEFAULT_LAYERS = ["4096:4096:8", "4096:4096:256", "4096:11008:8", "4096:11008:256"]  # attn, MLP
MIN_SAMPLE_S = 0.02  # a sample repeats a call to last this long (small shapes take microseconds)
MODEL_ROWS = {"full": ("full", None), "lora": ("lora", None), "mora sharing": ("mora", "sharing"),
              "mora rotation": ("mora", "rotation")}  # row: (train_tiny_llama's method, variant)
BATCH, SEQ_LEN, VOCAB = 4, 256, 4096

LAYER = flag(lambda text: tuple(map(int, text.split(":"))), lambda v: len(v) == 3 and all(
             0 < n < 2 ** 31 for n in v), "in:out:rank, three positive integers below 2**31")
def parse_args(argv=None):
    p = common.Parser(description=__doc__)
    p.add_argument("--device", type=common.device, default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="of the layer, its adapter and "
                   "the input, or the model's autocast (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=THREADS, help="CPU threads for torch (default: torch's own choice)")
    p.add_argument("--layers", nargs="+", type=LAYER, default=[LAYER(s) for s in DEFAULT_LAYERS],
                   metavar="IN:OUT:R", help="layers as in_features:out_features:rank "
                   f"(default: {' '.join(DEFAULT_LAYERS)})")
    p.add_argument("--tokens", type=POSITIVE_INT, default=2048, help="tokens T in one forward pass of a layer")
    p.add_argument("--model", choices=list(PRESETS),
                   help="time training steps of the model at this preset instead")
    p.add_argument("--ranks", nargs="+", type=POSITIVE_INT, default=[8, 128],
                   help="the adapters' ranks, with --model")
    p.add_argument("--repeats", type=POSITIVE_INT, default=10, help="timed samples of each row, median reported")
    p.add_argument("--warmup", type=COUNT, default=2, help="untimed calls of each row first")
    p.add_argument("--seed", type=SEED, default=0, help="seed of weights and inputs")
    p.add_argument("--json", type=PATH, metavar="PATH", help="add each layer's or rank's figures "
                   "to this JSON as it is timed (replacing one with the same settings)")
    args = p.parse_args(argv)
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device: only cpu and cuda are timed here, got {args.device}")
    if args.model and args.device.type == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        p.error("--model on a CPU reads its peak memory from /proc (Linux); elsewhere use --device cuda")
    common.check_outputs(p, files=[("--json", args.json)], runs=args.json)
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    return args

def sample(fn, calls, device):  # seconds a call
    torch.cuda.synchronize() if device.type == "cuda" else None
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize() if device.type == "cuda" else None
    return (time.perf_counter() - t0) / calls

def time_round_robin(fns, args):
    """{name: [seconds a call]}: after warm-ups, a sample of each fn in turn, round after round."""
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    calls = {name: max(1, math.ceil(MIN_SAMPLE_S / max(sample(fn, 1, args.device), 1e-9)))
             for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            samples[name].append(sample(fn, calls[name], args.device))
    return samples

def flops(fn):  # of the matrix products in one call: the work no implementation can skip
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()

def saved_for_backward_mb(forward, exclude):
    """MB autograd saves for forward()'s backward: distinct storages but exclude's (kept anyway)."""
    excluded, kept = {t.untyped_storage().data_ptr() for t in exclude}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in excluded:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(kept.values()) / 2 ** 20

def peft_layers(base, r):
    """PEFT's LoRA, and MiSS at LoRA's parameter count ((r', d), r' = r (k + d) / d), if there."""
    try:
        from peft import LoraConfig, MissConfig, get_peft_model
    except ImportError:
        print("note: no rows of PEFT's LoRA and MiSS: pip install peft (0.17 or later)")
        return {}
    k, d = base.in_features, base.out_features
    wrap = lambda config: get_peft_model(nn.Sequential(collections.OrderedDict(lin=base)), config)
    r_miss = min(k, max(1, round(r * (k + d) / d)))  # MiSS takes r' <= k
    return {"peft lora": wrap(LoraConfig(r=r, lora_alpha=r, target_modules=["lin"])),
            f"peft miss (r={r_miss})": wrap(MissConfig(r=r_miss, target_modules=["lin"]))}

def bench_layer(k, d, r, args):
    dev, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    base = nn.Linear(k, d, bias=False, device=dev, dtype=dtype).requires_grad_(False)  # as LLaMA's
    layers = {"frozen layer": base, "lora": LoRALinear(base, r)}
    layers.update({f"mora {v}": MoRALinear(base, r, v) for v in VARIANTS})
    layers.update({name: layer.to(dev, dtype) for name, layer in peft_layers(base, r).items()})
    with torch.no_grad():  # a trained adapter, not the zero update of step 0 (the time is the same)
        for p in (p for layer in layers.values() for p in layer.parameters() if p.requires_grad):
            p.normal_(0.0, 0.01)
    x = torch.randn(args.tokens, k, device=dev, dtype=dtype, requires_grad=True)  # as in a network
    g = torch.randn(args.tokens, d, device=dev, dtype=dtype)

    def train_step(layer):
        def step():
            layer(x).backward(g)
            x.grad = None  # as zero_grad(set_to_none=True)
            for p in layer.parameters():
                p.grad = None
        return step
    steps = {name: train_step(layer) for name, layer in layers.items()}
    work = {name: flops(step) for name, step in steps.items()}
    samples = {n: [s * 1e3 for s in ss] for n, ss in time_round_robin(steps, args).items()}
    return dict(in_features=k, out_features=d, r=r, tokens=args.tokens, rows=against_lora([dict(
        name=n, ms=statistics.median(samples[n]), samples_ms=samples[n], flops=work[n],
        saved_mb=saved_for_backward_mb(lambda: m(x), m.parameters()), r_hat=getattr(m, "r_hat", None),
        trainable_params=count_parameters(m, trainable_only=True)) for n, m in layers.items()]))

def against_lora(rows):  # each row's time, matrix FLOPs and peak memory over LoRA's
    lora = next(row for row in rows if row["name"] == "lora")
    for row in rows:
        row.update(vs_lora=row["ms"] / lora["ms"], bound=row["flops"] / lora["flops"])
        if "peak_mb" in row:  # None where LoRA's peak is nothing
            row.update(peak_vs_lora=row["peak_mb"] / lora["peak_mb"] if lora["peak_mb"] else None)
    return rows

def peak_memory_mb(device, reset=False):
    """Peak MB since the last reset (CUDA's allocations, or VmHWM on Linux); with reset, MB now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device) if reset else torch.cuda.synchronize(device)
        return (torch.cuda.memory_allocated if reset else torch.cuda.max_memory_allocated)(device) / 2 ** 20
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS" if reset else "VmHWM"].split()[0]) / 2 ** 10

def training_step(name, r, args):
    """(step, model): train_tiny_llama's model, row name's adapters at rank r, one random batch."""
    import train_tiny_llama as ttl
    method, variant = MODEL_ROWS[name]
    cfg = LlamaConfig(**PRESETS[args.model], vocab_size=VOCAB, max_seq_len=SEQ_LEN)
    options = types.SimpleNamespace(seed=args.seed, rank=r, lora_alpha=r, variant=variant)
    model = ttl.build_model(cfg, method, options).to(args.device)
    optimizer = common.optimizer(model, 0.0, ttl.DEFAULT_LR, ttl.DEFAULT_PROJ_LR[method], device=args.device)
    tokens = torch.Generator().manual_seed(args.seed)
    idx = torch.randint(0, VOCAB, (BATCH, SEQ_LEN + 1), generator=tokens).to(args.device)
    autocast = torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        with autocast:
            loss = model(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, model

def step_memory(name, r, args):
    """In a process of its own: two steps' peak memory above what was held (at least 0: the kernel's
    peak lags; step 1 makes AdamW's moments), a step's matrix FLOPs and the trainable parameters."""
    torch.set_num_threads(args.threads) if args.threads else None
    step, model = training_step(name, r, args)
    resting = peak_memory_mb(args.device, reset=True)
    work = flops(step)
    step()
    return dict(peak_mb=max(0.0, peak_memory_mb(args.device) - resting), flops=work,
                trainable_params=count_parameters(model, trainable_only=True))

def in_own_process(fn, *args):
    """fn(*args) in a fresh process, Ctrl-C and SIGTERM blocked: we answer them in one line."""
    quiet = {signal.SIGINT, signal.SIGTERM}
    with ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as pool:
        signal.pthread_sigmask(signal.SIG_BLOCK, quiet)  # outlives exec: no traceback from worker
        try:
            future = pool.submit(fn, *args)  # the worker starts here
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, quiet)
        return future.result()

def bench_model(r, args):
    """Each row's memory in a fresh process (a peak of its own), then all times round-robin here."""
    rows = [dict(name=name, **in_own_process(step_memory, name, r, args)) for name in MODEL_ROWS]
    steps = {name: training_step(name, r, args)[0] for name in MODEL_ROWS}
    for row, samples in zip(rows, time_round_robin(steps, args).values()):  # every sample kept: noise shows
        samples_ms = [s * 1e3 for s in samples]
        ms = statistics.median(samples_ms)
        row.update(ms=ms, samples_ms=samples_ms, tokens_per_s=BATCH * SEQ_LEN / ms * 1e3)
    return dict(model=args.model, r=r, batch=BATCH, seq_len=SEQ_LEN, vocab_size=VOCAB, rows=against_lora(rows))

def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = ({"gpu": torch.cuda.get_device_name(args.device), "cuda": torch.version.cuda}
           if args.device.type == "cuda" else {})
    info = dict(device=str(args.device), dtype=args.dtype, cpu=platform.processor() or platform.machine(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__, **gpu)
    machine = ", ".join(f"{k} {v}" for k, v in info.items())
    print(machine + f"; median of {args.repeats} samples, rows interleaved")
    jobs = [functools.partial(bench_model, r) for r in args.ranks] if args.model else [
        functools.partial(bench_layer, *shape) for shape in args.layers]
    done = []
    kept = lambda: f"{len(done)} of {len(jobs)} timed" + f", and in {args.json}" * bool(args.json and done)
    with common.on_interrupt(kept):
        for job in jobs:
            done.append(res := job(args))
            report(res, args)
            if args.json:  # the figures depend on the shapes, the machine and these flags
                settings = {**info, **{k: v for k, v in res.items() if k != "rows"},
                            **{k: getattr(args, k) for k in ("repeats", "warmup", "seed")}}
                common.save_runs(args.json, [{"settings": settings, "rows": res["rows"]}])
    if args.json:
        print(f"\nadded {len(done)} runs to {args.json}")

COLUMNS = {"ms": ("ms", ".1f"), "tokens_per_s": ("tokens/s", ",.0f"), "vs_lora": ("x LoRA", ".3f"),
           "bound": ("bound", ".3f"), "saved_mb": ("saved MB", ".1f"),
           "peak_mb": ("peak MB", ".0f"), "peak_vs_lora": ("peak x LoRA", ".3f"),
           "r_hat": ("r^", ""), "trainable_params": ("trainable", ",")}

def report(res, args):  # print the figures of one layer or rank
    what = f"model {args.model}" if args.model else f"layer {res['in_features']} -> {res['out_features']}"
    print(f"\n{what}, r = {res['r']}: {'training steps' if args.model else 'forward + backward'}\n")
    shown = [c for c in COLUMNS if c in res["rows"][0]]
    cell = lambda row, c: "-" if row[c] is None else format(row[c], COLUMNS[c][1])
    print(common.table(["", *(COLUMNS[c][0] for c in shown)],
                       [[row["name"], *(cell(row, c) for c in shown)] for row in res["rows"]]))

if __name__ == "__main__":
    common.main_guard(main)
