"""
What MoRA costs next to LoRA and the plain frozen layer: a benchmark anyone can rerun.

  python bench.py                          # CPU, float32
  python bench.py --device cuda            # GPU, bfloat16
  python bench.py --json bench.json        # also write every figure to a file

1. Layer level. One frozen nn.Linear, adapted as in training: forward + backward with the input
   requiring grad (as it does inside a network), at LLaMA-7B shapes and at the tiny model's.
   Rows: the plain frozen layer, LoRA, every MoRA variant, and MoRA's rotation written the
   straightforward way (rotate the activations) so that the gain of the layer's formulation
   shows. Then inference: a merged layer against the plain one (the same layer, so the same time).
2. Model level. Training steps of the tiny LLaMA with full fine-tuning, LoRA and MoRA at equal
   rank: tokens/s, and the achieved FLOP/s as a fraction of what one large plain matmul reaches
   in the same run (a "roofline" figure that reads the same on any machine).

Every time is the median of --repeats samples after --warmup. The samples of the configurations
being compared are taken round-robin (one of each in turn), so that machine noise hits them all
alike, and a ratio is only ever between figures of the same run.
"""

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mora import LlamaConfig, Llama, LoRALinear, MoRALinear, VARIANTS, PRESETS, apply_adapters, count_parameters, mora_rank

# LLaMA-7B's projections (4096 -> 4096 for attention, 4096 -> 11008 for the MLP) at r = 8 and 256,
# then the tiny model's (64 -> 64, 64 -> 176, 176 -> 64) at the model-level rank.
DEFAULT_LAYERS = ["4096:4096:8", "4096:4096:256", "4096:11008:8", "4096:11008:256", "64:64:8", "64:176:8", "176:64:8"]
MIN_SAMPLE_S = 0.02  # a sample repeats a call until it lasts about this long (tiny shapes run in microseconds)


def int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value < 2**63:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to 2**63 - 1, got {text!r}")
        return value
    return parse


def layer_spec(text):
    """in_features:out_features:rank, each at least 1, with an r^ of at least 1 for every variant."""
    try:
        k, d, r = (int(v) for v in text.split(":"))
        if min(k, d, r) < 1:
            raise ValueError
        mora_rank(k, d, r, "rotation")
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants in_features:out_features:rank, positive integers with r^ >= 1, got {text!r}")
    return k, d, r


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (or cuda:N)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute type. Layer level: the layer, its adapter and the input in this type (a model "
                        "loaded for fine-tuning); model level: float32 weights under autocast to it (mixed-precision "
                        "training). Default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="CPU threads for torch (default: torch's own choice)")
    p.add_argument("--layers", nargs="*", type=layer_spec, default=[layer_spec(s) for s in DEFAULT_LAYERS], metavar="IN:OUT:R",
                   help=f"layer-level cases as in_features:out_features:rank (default: {' '.join(DEFAULT_LAYERS)}); "
                        "an empty list skips the layer level")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT",
                   help=f"MoRA variants timed at the layer level (default: all of {', '.join(VARIANTS)})")
    p.add_argument("--tokens", type=int_at_least(1), default=2048,
                   help="tokens per forward pass: T at the layer level, batch x sequence length at the model level "
                        "(default: 2048)")
    p.add_argument("--model", default="tiny", choices=list(PRESETS),
                   help="LLaMA preset of the model level (default: tiny)")
    p.add_argument("--no-model", action="store_true", help="skip the model level")
    p.add_argument("--model-rank", type=int_at_least(1), default=8, help="rank r of LoRA and MoRA at the model level (default: 8)")
    p.add_argument("--seq-len", type=int_at_least(1), default=256, help="sequence length at the model level (default: 256)")
    p.add_argument("--vocab-size", type=int_at_least(1), default=4096,
                   help="vocabulary of the model level, a small BPE vocabulary (default: 4096)")
    p.add_argument("--matmul-size", type=int_at_least(1), default=4096,
                   help="n of the n x n @ n x n matmul whose FLOP/s the model's are compared with (default: 4096)")
    p.add_argument("--repeats", type=int_at_least(1), default=10,
                   help="timed samples of each configuration, median reported (default: 10)")
    p.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed calls of each configuration first (default: 2)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of weights and inputs (default: 0)")
    p.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    # Everything is checked here, before a run that can take twenty minutes.
    if not args.no_model and args.tokens % args.seq_len:
        p.error(f"--tokens {args.tokens} is not a multiple of --seq-len {args.seq_len}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device: unknown device {args.device!r}")
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device: only cpu and cuda are measured here, got {str(args.device)!r}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not os.path.isdir(folder):
            p.error(f"--json {args.json!r}: not a file in an existing folder")
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    return args


# -----------------------------------------------------------------------------
# Timing and memory


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(args):
    """Mixed-precision training for bfloat16: float32 weights, matmuls in bfloat16."""
    return torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")


def time_round_robin(fns, args):
    """Median seconds per call of each fn. Samples are taken one fn after the other, round after
    round, so that a slow spell of the machine lands on every configuration alike."""
    calls = {}
    for name, fn in fns.items():  # warm up, and pick how many calls make one sample
        for _ in range(args.warmup):
            fn()
        sync(args.device)
        t0 = time.perf_counter()
        fn()
        sync(args.device)
        calls[name] = max(1, math.ceil(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-9)))
    samples = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            if args.device.type == "cuda":  # CUDA events time the GPU's work, not the Python launching it
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls[name]):
                    fn()
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                for _ in range(calls[name]):
                    fn()
                seconds = time.perf_counter() - t0
            samples[name].append(seconds / calls[name])
    return {name: (statistics.median(s), s) for name, s in samples.items()}


def saved_for_backward_mb(forward, exclude):
    """Megabytes that autograd keeps for the backward pass of forward(): distinct storages,
    the tensors in `exclude` (weights, which exist anyway) left out."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(kept.values()) / 2**20


def peak_mb(fn, device):
    """Peak memory of one call above what was allocated before it; CUDA only (None elsewhere)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# -----------------------------------------------------------------------------
# 1. Layer level


def bench_layer(k, d, r, args):
    dev, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    base = nn.Linear(k, d, bias=False, device=dev, dtype=dtype).requires_grad_(False)  # LLaMA's have no bias
    layers = {"base": base, "lora": LoRALinear(base, r)}
    for v in args.variants:
        layers[f"mora {v}"] = MoRALinear(base, r, variant=v)
    if "rotation" in args.variants:
        layers["mora rotation, activations rotated"] = literal = MoRALinear(base, r, variant="rotation")
        literal.turn_M = False  # Eq. 9 as it reads, the yardstick of MoRALinear's regrouped form
    with torch.no_grad():  # a trained adapter, not the zero update of step 0 (the time is the same)
        for layer in layers.values():
            for p in layer.parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.01)

    x = torch.randn(args.tokens, k, device=dev, dtype=dtype, requires_grad=True)  # inside a network it needs a grad
    g = torch.randn(args.tokens, d, device=dev, dtype=dtype)

    def train_step(layer):
        trainable = [p for p in layer.parameters() if p.requires_grad]

        def step():
            layer(x).backward(g)
            x.grad = None  # as zero_grad(set_to_none=True)
            for p in trainable:
                p.grad = None
        return step

    timed = time_round_robin({name: train_step(layer) for name, layer in layers.items()}, args)
    rows = []
    for name, layer in layers.items():
        seconds, samples = timed[name]
        saved = saved_for_backward_mb(lambda: layer(x), exclude=[*layer.parameters(), *layer.buffers()])
        rows.append(dict(name=name, ms=seconds * 1e3, samples_ms=[s * 1e3 for s in samples],
                         vs_lora=seconds / timed["lora"][0], vs_base=seconds / timed["base"][0],
                         trainable_params=count_parameters(layer, trainable_only=True),
                         r_hat=getattr(layer, "r_hat", None), saved_mb=saved, peak_mb=peak_mb(train_step(layer), dev)))

    # Inference: a merged adapter is W0 + dW in one nn.Linear, so it costs what the plain layer costs.
    merged_name = "mora rotation" if "rotation" in args.variants else "lora"
    merged = copy.deepcopy(layers[merged_name])  # a copy: merging changes the base weight the others share
    merged.merge()

    def infer(layer):
        def call():
            with torch.no_grad():
                layer(x)
        return call

    inf = time_round_robin({"base": infer(base), "merged": infer(merged)}, args)
    inference = dict(merged=merged_name, base_ms=inf["base"][0] * 1e3, merged_ms=inf["merged"][0] * 1e3,
                     merged_vs_base=inf["merged"][0] / inf["base"][0])
    return dict(in_features=k, out_features=d, r=r, tokens=args.tokens, rows=rows, inference=inference)


def print_layer(res):
    k, d, r = res["in_features"], res["out_features"], res["r"]
    print(f"\nlayer {k} -> {d}, r = {r}, T = {res['tokens']} tokens: forward + backward")
    print(f"{'':36s} {'ms':>9s} {'x LoRA':>7s} {'x base':>7s} {'saved MB':>9s} {'peak MB':>8s} {'r^':>5s} {'params':>10s}")
    for row in res["rows"]:
        peak = "-" if row["peak_mb"] is None else f"{row['peak_mb']:.1f}"
        r_hat = "-" if row["r_hat"] is None else str(row["r_hat"])
        print(f"{row['name']:36s} {row['ms']:9.2f} {row['vs_lora']:7.3f} {row['vs_base']:7.3f} {row['saved_mb']:9.1f} "
              f"{peak:>8s} {r_hat:>5s} {row['trainable_params']:10,d}")
    inf = res["inference"]
    print(f"inference, {inf['merged']} merged: {inf['merged_ms']:.2f} ms, plain layer {inf['base_ms']:.2f} ms, "
          f"x base {inf['merged_vs_base']:.3f}")


# -----------------------------------------------------------------------------
# 2. Model level


def count_flops(step):
    """Matmul FLOPs of one call as torch's FlopCounterMode counts them. Attention runs on its
    plain math kernel while counting, so that it counts (in full) on every device."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        step()
    return counter.get_total_flops()


def training_step(model, x, y, args):
    """forward + backward (what the FLOPs are counted on), and the whole step with AdamW."""
    opt = model.configure_optimizers(0.0, 1e-4, device_type=args.device.type)

    def forward_backward():
        with autocast(args):
            _, loss = model(x, y)
        loss.backward()

    def step():
        forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return forward_backward, step


def bench_model(args):
    dev = args.device
    cfg = LlamaConfig.from_preset(args.model, vocab_size=args.vocab_size, max_seq_len=args.seq_len)
    torch.manual_seed(args.seed)
    data = torch.randint(args.vocab_size, (args.tokens // args.seq_len, args.seq_len + 1), device=dev)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    methods = {"fft": None, "lora": {}, "mora rotation": {"variant": "rotation"}, "mora sharing": {"variant": "sharing"}}
    steps, flops, params = {}, {}, {}
    for name, kwargs in methods.items():
        torch.manual_seed(args.seed)  # the same model for every method
        model = Llama(cfg).to(dev)
        if kwargs is not None:
            apply_adapters(model, name.split()[0], r=args.model_rank, **kwargs)
        forward_backward, steps[name] = training_step(model, x, y, args)
        flops[name] = count_flops(forward_backward)
        model.zero_grad(set_to_none=True)
        params[name] = count_parameters(model, trainable_only=True)

    # The roofline: one large plain matmul in the same compute type, timed in the same rounds.
    n = args.matmul_size
    a, b = (torch.randn(n, n, device=dev) for _ in range(2))
    if args.dtype == "bfloat16":
        a, b = a.bfloat16(), b.bfloat16()
    steps["matmul"] = lambda: a @ b
    timed = time_round_robin(steps, args)
    matmul_flops_per_s = 2 * n**3 / timed["matmul"][0]
    rows = []
    for name in methods:
        seconds, samples = timed[name]
        rows.append(dict(method=name, ms=seconds * 1e3, samples_ms=[s * 1e3 for s in samples],
                         tokens_per_s=args.tokens / seconds, vs_lora=timed["lora"][0] / seconds,
                         trainable_params=params[name], flops_per_step=flops[name],
                         flops_per_s=flops[name] / seconds, roofline_fraction=flops[name] / seconds / matmul_flops_per_s))
    return dict(preset=args.model, config=dict(vars(cfg)), rank=args.model_rank, tokens=args.tokens,
                seq_len=args.seq_len, rows=rows, matmul=dict(n=n, ms=timed["matmul"][0] * 1e3,
                                                             flops_per_s=matmul_flops_per_s))


def print_model(res):
    mm = res["matmul"]
    print(f"\nmodel level: {res['preset']} LLaMA, {res['tokens']} tokens per step (sequences of {res['seq_len']}), "
          f"rank {res['rank']}; training step = forward + backward + AdamW")
    print(f"plain {mm['n']}x{mm['n']} matmul: {mm['ms']:.2f} ms, {mm['flops_per_s'] / 1e9:.1f} GFLOP/s")
    print(f"{'':16s} {'tokens/s':>10s} {'x LoRA':>7s} {'ms/step':>9s} {'GFLOP/step':>11s} {'GFLOP/s':>8s} "
          f"{'of matmul':>9s} {'params':>10s}")
    for row in res["rows"]:
        print(f"{row['method']:16s} {row['tokens_per_s']:10,.0f} {row['vs_lora']:7.3f} {row['ms']:9.2f} "
              f"{row['flops_per_step'] / 1e9:11.3f} {row['flops_per_s'] / 1e9:8.1f} {row['roofline_fraction']:9.1%} "
              f"{row['trainable_params']:10,d}")


# -----------------------------------------------------------------------------


def machine(args):
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:  # Linux names the CPU model here
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = dict(device=str(args.device), dtype=args.dtype, cpu=cpu, cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                platform=platform.platform())
    if args.device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(args.device), cuda=torch.version.cuda)
    return info


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine(args)
    print(", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"median of {args.repeats} samples after {args.warmup} warm-up calls, configurations interleaved")
    layers = []
    for shape in args.layers:
        layers.append(bench_layer(*shape, args))
        print_layer(layers[-1])
    model = None if args.no_model else bench_model(args)
    if model:
        print_model(model)
    if args.json:
        with open(args.json, "w") as f:  # default=str writes the torch.device
            json.dump(dict(machine=info, config=vars(args), layers=layers, model=model), f, indent=1, default=str)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
