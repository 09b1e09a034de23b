"""
What MoRA costs next to LoRA and the plain frozen layer:

  python bench.py                          # CPU, float32
  python bench.py --device cuda            # GPU, bfloat16
  python bench.py --json bench.json        # also add every figure to a JSON file

One frozen nn.Linear at LLaMA-7B's shapes, adapted as in training: forward + backward with the input requiring
its gradient (as inside a network). Rows: the frozen layer alone, LoRA and every MoRA variant; their time and what
autograd keeps for the backward pass. A time is the median of --repeats samples taken round-robin (a row after the
other), so that machine noise hits all rows alike; a ratio is between figures of one run.
"""

import argparse, math, platform, statistics, time

import common  # first: a Ctrl-C while torch loads is one line too
import torch
import torch.nn as nn

from common import COUNT, PATH, POSITIVE_INT, SEED, THREADS
from mora import VARIANTS, LoRALinear, MoRALinear, count_parameters

DEFAULT_LAYERS = ["4096:4096:8", "4096:4096:256", "4096:11008:8", "4096:11008:256"]  # attention, MLP; r = 8 and 256
MIN_SAMPLE_S = 0.02  # a sample repeats a call until it lasts about this long (small shapes run in microseconds)

def layer_spec(text):
    """in_features:out_features:rank, three positive integers."""
    k, d, r = (POSITIVE_INT(v) for v in text.split(":"))
    return k, d, r

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.Help)
    p.add_argument("--device", type=common.device, default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="of the layer, its adapter and the input "
                   "(default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=THREADS, help="CPU threads for torch (default: torch's own choice)")
    p.add_argument("--layers", nargs="+", type=common.flag(layer_spec, what="in:out:rank, positive integers"),
                   default=[layer_spec(s) for s in DEFAULT_LAYERS], metavar="IN:OUT:R",
                   help=f"layers as in_features:out_features:rank (default: {' '.join(DEFAULT_LAYERS)})")
    p.add_argument("--tokens", type=POSITIVE_INT, default=2048, help="tokens T in one forward pass")
    p.add_argument("--repeats", type=POSITIVE_INT, default=10, help="timed samples of each row, median reported")
    p.add_argument("--warmup", type=COUNT, default=2, help="untimed calls of each row first")
    p.add_argument("--seed", type=SEED, default=0, help="seed of weights and inputs")
    p.add_argument("--json", type=PATH, metavar="PATH", help="add each layer's figures to this JSON as it is timed "
                   "(replacing one with the same settings)")
    args = p.parse_args(argv)
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device: only cpu and cuda are timed here, got {args.device}")
    common.check_outputs(p, files=[("--json", args.json)], runs=args.json)
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    return args

def time_round_robin(fns, args):
    """{name: samples, seconds a call}: after the warm-up, a sample of each fn in turn, round after round."""
    def sample(fn, calls):
        torch.cuda.synchronize() if args.device.type == "cuda" else None
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize() if args.device.type == "cuda" else None
        return (time.perf_counter() - t0) / calls
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    calls = {name: max(1, math.ceil(MIN_SAMPLE_S / max(sample(fn, 1), 1e-9))) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            samples[name].append(sample(fn, calls[name]))
    return samples

def saved_for_backward_mb(forward, exclude):
    """Megabytes that autograd keeps for the backward pass of forward(): distinct storages, but the weights
    in `exclude` (which exist anyway)."""
    excluded, kept = {t.untyped_storage().data_ptr() for t in exclude}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in excluded:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(kept.values()) / 2 ** 20

def bench_layer(k, d, r, args):
    dev, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    base = nn.Linear(k, d, bias=False, device=dev, dtype=dtype).requires_grad_(False)  # LLaMA's have no bias
    layers = {"frozen layer": base, "lora": LoRALinear(base, r)}
    layers.update({f"mora {v}": MoRALinear(base, r, v) for v in VARIANTS})
    with torch.no_grad():  # a trained adapter, not the zero update of step 0 (the time is the same)
        for p in (p for layer in layers.values() for p in layer.parameters() if p.requires_grad):
            p.normal_(0.0, 0.01)
    x = torch.randn(args.tokens, k, device=dev, dtype=dtype, requires_grad=True)  # inside a network it needs a grad
    g = torch.randn(args.tokens, d, device=dev, dtype=dtype)

    def train_step(layer):
        def step():
            layer(x).backward(g)
            x.grad = None  # as zero_grad(set_to_none=True)
            for p in layer.parameters():
                p.grad = None
        return step
    samples = time_round_robin({name: train_step(layer) for name, layer in layers.items()}, args)
    ms = {name: statistics.median(s) * 1e3 for name, s in samples.items()}
    return dict(in_features=k, out_features=d, r=r, tokens=args.tokens, rows=[dict(
        name=name, ms=ms[name], samples_ms=[s * 1e3 for s in samples[name]], vs_lora=ms[name] / ms["lora"],
        vs_frozen=ms[name] / ms["frozen layer"], trainable_params=count_parameters(layer, trainable_only=True),
        r_hat=getattr(layer, "r_hat", None), saved_mb=saved_for_backward_mb(lambda: layer(x), layer.parameters()))
        for name, layer in layers.items()])

def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.type == "cuda"
    gpu = {"gpu": torch.cuda.get_device_name(args.device), "cuda": torch.version.cuda} if cuda else {}
    info = dict(device=str(args.device), dtype=args.dtype, cpu=platform.processor() or platform.machine(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__, **gpu)
    print(", ".join(f"{k} {v}" for k, v in info.items()) + f"; median of {args.repeats} samples, rows interleaved")
    layers = []
    kept = lambda: f"{len(layers)} of {len(args.layers)} layers timed" + f", and in {args.json}" * bool(
        args.json and layers)
    with common.on_interrupt(kept):
        for shape in args.layers:
            layers.append(res := bench_layer(*shape, args))
            print(f"\nlayer {res['in_features']} -> {res['out_features']}, r = {res['r']}, T = {res['tokens']}: "
                  f"forward + backward\n")
            print(common.table(["", "ms", "x LoRA", "x frozen layer", "saved MB", "r^", "trainable"], [
                [row["name"], f"{row['ms']:.2f}", f"{row['vs_lora']:.3f}", f"{row['vs_frozen']:.3f}",
                 f"{row['saved_mb']:.1f}", str(row["r_hat"] or "-"), f"{row['trainable_params']:,}"]
                for row in res["rows"]]))
            if args.json:  # a layer's figures depend on its shape, the machine and these flags
                settings = {**info, **{k: res[k] for k in ("in_features", "out_features", "r", "tokens")},
                            **{k: getattr(args, k) for k in ("repeats", "warmup", "seed")}}
                common.save_runs(args.json, [{"settings": settings, "rows": res["rows"]}])
    if args.json:
        print(f"\nadded {len(layers)} layers to {args.json}")

if __name__ == "__main__":
    common.main_guard(main)
