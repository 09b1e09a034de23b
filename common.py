"""
What the training scripts share, written once: flags and their rules, the learning-rate schedule, the
optimizer, Sec. 6.1's count, outputs written safely, one-line errors and interrupts, tables and plots.
It imports mora, torch and the standard library only (matplotlib for a plot).
"""

import argparse, contextlib, importlib.util, json, math, os, signal, sys, warnings

def _stop(signum, frame):  # SIGTERM ends a run as Ctrl-C does
    raise KeyboardInterrupt

def _excepthook(kind, error, traceback):  # Ctrl-C before main_guard runs (importing torch takes seconds)
    if not issubclass(kind, KeyboardInterrupt):
        return sys.__excepthook__(kind, error, traceback)
    print("interrupted: before anything was kept", file=sys.stderr, flush=True)
    os._exit(130)

signal.signal(signal.SIGTERM, _stop)
sys.excepthook = _excepthook  # set before the heavy imports below; a script imports this module first

import torch
import torch.nn as nn

from mora import DEFAULT_TARGETS, AdapterLinear, atomic_files, matches

try:
    import fcntl  # file locks (POSIX); elsewhere two runs on one JSON are not guarded
except ImportError:
    fcntl = None

class Fail(Exception):
    """Bad input, or a fault the user can mend: said in one line, without a traceback."""

class Stopped(Exception):
    """Ctrl-C or SIGTERM, with what the run has kept and how to go on."""

def why(error):  # an exception in a few words
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"

# Flags ----------------------------------------------------------------------------------------------------------------
def flag(convert, ok=bool, what=None):
    """An argparse type: convert, then check; a bad value is one line naming the flag and the value
    (in convert's own words when there is no `what`)."""
    def parse(text):
        try:
            value = convert(text)
        except (ValueError, OverflowError) as e:
            if what is None:
                raise argparse.ArgumentTypeError(str(e)) from None
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse

POSITIVE_INT = flag(int, lambda v: 0 < v < 2 ** 31, "a positive integer below 2**31")  # torch's sizes and counts
COUNT = flag(int, lambda v: 0 <= v < 2 ** 31, "an integer from 0 to 2**31 - 1")
NON_NEGATIVE = flag(float, lambda v: 0 <= v < math.inf, "a finite number of at least 0")
POSITIVE = flag(float, lambda v: 0 < v < math.inf, "a positive finite number")
RATE = flag(float, lambda v: 0 < v <= 1, "a learning rate above 0 and at most 1")
THREADS = flag(int, lambda v: 0 < v <= 1024, "a thread count from 1 to 1024")
SEED = flag(int, lambda v: 0 <= v < 2 ** 63, "an integer from 0 to 2**63 - 1")
FRACTION = flag(float, lambda v: 0 < v < 1, "a number between 0 and 1")
PATH = flag(str, lambda v: v != "", "a path")

def device(name):
    """An argparse type: 'auto' (cuda, then mps, then cpu) or a device this machine has."""
    have = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(kind for kind, ok in have.items() if ok) if name == "auto" else name
    with contextlib.suppress(RuntimeError):
        dev = torch.device(name)
        if have.get(dev.type) and (dev.index or 0) < (torch.cuda.device_count() if dev.type == "cuda" else 1):
            return dev
    raise argparse.ArgumentTypeError(f"{name!r} is not a device of this machine "
                                     f"({', '.join(kind for kind, ok in have.items() if ok)})")

class Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows '(default: X)' after each help, but where the default is computed (None), a switch is off or the help
    names its default itself."""
    def _get_help_string(self, action):
        own = action.default is None or action.default is False or "(default" in (action.help or "")
        return action.help if own else super()._get_help_string(action)

def add_run_flags(p, seed, log_every):
    """The flags of every training script."""
    p.add_argument("--seed", type=SEED, default=seed, help="the first seed: initial weights, data and batch order")
    p.add_argument("--seeds", type=flag(int, lambda v: 0 < v <= 1000, "a count from 1 to 1000"), default=1,
                   help="run each over the seeds --seed, --seed + 1, ...: the tables show the mean (min-max)")
    p.add_argument("--device", type=device, default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="auto: bfloat16 on CUDA")
    p.add_argument("--log-every", type=POSITIVE_INT, default=log_every, help="steps between progress lines")
    p.add_argument("--json", type=PATH, metavar="PATH", help="add each run to this JSON as it ends (replacing one with "
                   "the same settings)")
    p.add_argument("--plot", type=PATH, metavar="PATH", help="plot the curves, mean and (min-max) (needs matplotlib)")

def check_run_flags(p, args, folders=(), planned=()):
    """The rules of those flags, and of every output, before any work."""
    if args.seed + args.seeds > 2 ** 63:
        p.error(f"--seed {args.seed} with --seeds {args.seeds} goes past 2**63 - 1")
    check_outputs(p, [("--json", args.json), ("--plot", args.plot)], folders, planned, runs=args.json)
    if args.plot and os.path.splitext(args.plot)[1].lower() not in (".png", ".pdf", ".svg", ".jpg"):
        p.error(f"--plot {args.plot}: name a .png, .pdf, .svg or .jpg file")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error(f"--plot {args.plot} needs matplotlib (pip install matplotlib)")
    args.dtype = {"auto": "bfloat16" if args.device.type == "cuda" else "float32"}.get(args.dtype, args.dtype)
    if args.warmup >= args.steps:
        note(f"--warmup {args.warmup} is not below --steps {args.steps}: the rate never reaches its peak")

def note(text):
    if os.environ.get("RANK", "0") == "0":  # once, not once per process
        print(f"note: {text}", file=sys.stderr)

def note_ignored(parser, args, readers, users):
    """A note for each flag set to other than its default that nothing run reads; readers: {flag: its readers}."""
    for name, readers_of in readers.items():
        if getattr(args, name) != parser.get_default(name) and not set(readers_of) & set(users):
            note(f"--{name.replace('_', '-')} is ignored by --method {args.method} (only {', '.join(readers_of)} "
                 f"read it)")

# Training -------------------------------------------------------------------------------------------------------------
def lr_factor(step, steps, warmup, decay="linear", floor=0.0, restart_every=0, rewarmup=0):
    """The share of the peak learning rate at step (0-based): a linear warm-up, then a linear or cosine
    decay to floor; with restart_every, ReLoRA's jagged schedule: a warm-up again after each merge (Sec. 5.3)."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "linear":
        shape = max(0.0, (steps - step) / max(1, steps - warmup))
    else:
        shape = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    factor = floor + (1 - floor) * shape
    if restart_every and step >= restart_every and rewarmup:
        factor *= min(1.0, (step % restart_every + 1) / rewarmup)
    return factor

def optimizer(model, weight_decay, lr, projection_lr=None, betas=(0.9, 0.95), device=None):
    """AdamW over the trainable parameters; matrices decay, norms do not. With projection_lr, what trains in the
    projections q ... down (the adapters, or the weights themselves in full training) has that rate. Each group
    keeps its rate as 'peak_lr', for lr_factor to scale."""
    adapters = [m for m in model.modules() if isinstance(m, AdapterLinear)]
    owners = adapters or [m for n, m in model.named_modules() if matches(n, DEFAULT_TARGETS)]
    projection = {id(p) for m in owners for p in m.parameters(recurse=False)} if projection_lr else set()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [(projection_lr, weight_decay, [p for p in params if id(p) in projection]),
              (lr, weight_decay, [p for p in params if id(p) not in projection and p.dim() >= 2]),
              (lr, 0.0, [p for p in params if id(p) not in projection and p.dim() < 2])]
    groups = [{"params": ps, "weight_decay": wd, "peak_lr": peak} for peak, wd, ps in groups if ps]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True if getattr(device, "type", 0) == "cuda" else None)

@torch.no_grad()
def effective_weights(model, targets=DEFAULT_TARGETS):
    """{name: W0 + dW}, a float32 copy, for every projection named in targets, adapted (merged or not) or a plain
    nn.Linear (full training). The difference of two such snapshots is the learnt update (Sec. 6.1)."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear) and matches(name, targets):
            weights[name] = module.base.weight.float() + (0 if module.merged else module.get_delta_weight().float())
        elif isinstance(module, nn.Linear) and matches(name, targets):
            weights[name] = module.weight.float().clone()
    return weights

@torch.no_grad()
def update_ranks(before, after, threshold=0.1):
    """Sec. 6.1: how many singular values of each layer's learnt update (after - before, two effective_weights
    snapshots) are above threshold, the paper's 0.1; per projection, the mean over its layers and its shape."""
    ranks = {}
    for name, w in after.items():
        n = int((torch.linalg.svdvals(w.cpu() - before[name].cpu()) > threshold).sum())
        ranks.setdefault(name.rpartition(".")[2], {"shape": list(w.shape), "n": []})["n"].append(n)
    return {p: {"shape": r["shape"], "above_threshold": sum(r["n"]) / len(r["n"])} for p, r in ranks.items()}

# Outputs --------------------------------------------------------------------------------------------------------------
def check_outputs(parser, files=(), folders=(), planned=(), runs=None):
    """Every output path, before any work: files, folders and planned (files a run will write in a folder it makes)
    are [(flag, path or None)]. No path is the same as another's; a file is not a folder and its folder is writable;
    a folder is not a file and can be made. The runs JSON, if it exists, must hold runs: it is added to (save_runs)."""
    seen = {}
    for (name, path), kind in [(f, "file") for f in files] + [(f, "folder") for f in folders] + \
                              [(f, "planned") for f in planned]:
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            parser.error(f"{name} {path}: the same path as {seen[real]}")
        seen[real] = name
        if kind == "planned":
            continue
        is_folder = kind == "folder"
        if os.path.exists(path) and not (os.path.isdir if is_folder else os.path.isfile)(path):  # a FIFO would block
            parser.error(f"{name} {path}: " + ("is a file, not a folder" if is_folder else "is a folder"
                                               if os.path.isdir(path) else "is not a regular file"))
        parent = real if is_folder else os.path.dirname(real)
        while is_folder and not os.path.exists(parent):  # a folder is made, with its parents; a file's must exist
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            parser.error(f"{name} {path}: cannot write in {parent} (no such folder, or not writable)")
    try:
        read_runs(runs) if runs else None
    except Fail as e:
        parser.error(str(e))

def read_checkpoint(path, hint):
    """A checkpoint read as data (weights_only: a file cannot run code); any fault is one line, with the hint."""
    if not os.path.isfile(path):  # a folder, or a pipe that would wait forever
        raise Fail(f"{path} is not a file; {hint}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, cut, foreign, or pickled code
        raise Fail(f"{path} is not a readable checkpoint ({why(e)}); {hint}") from None

def read_runs(path):
    """The runs JSON at path, {"runs": [...], "script": the script that wrote them}; none yet if there is no file.
    One script's runs only: another script's file is refused, not mixed into."""
    script = os.path.basename(sys.argv[0])
    if not os.path.exists(path):
        return {"runs": [], "script": script}
    try:
        with open(path) as f:
            doc = json.load(f)
        assert isinstance(doc, dict) and isinstance(doc["runs"], list) and all(isinstance(r, dict) for r in doc["runs"])
        assert doc.setdefault("script", script) == script
        return doc
    except (OSError, ValueError, KeyError, AssertionError):
        raise Fail(f"--json {path} exists and does not hold runs of {script}; choose another path") from None

def key(run):  # what makes two runs the same run
    return json.dumps(run.get("settings", id(run)), sort_keys=True)

def save_runs(path, runs):
    """Add runs to the JSON at path, under a lock on its folder: a run there with the same settings is replaced,
    every other kept. A rerun, an interrupted run or another run on the same file never loses a finished run."""
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        if fcntl:
            fcntl.flock(folder, fcntl.LOCK_EX)  # closing the folder releases it
        doc = read_runs(path)
        doc["runs"] = [r for r in doc["runs"] if key(r) not in {key(new) for new in runs}] + runs
        with atomic_files([path], "w") as (f,):
            json.dump(doc, f, indent=1)
    finally:
        os.close(folder)

# Errors and interrupts ------------------------------------------------------------------------------------------------
def main_guard(main):
    """Run a script's main: bad input, a full disk or too large a model is one line 'error: ...'; Ctrl-C or
    SIGTERM one line saying what was kept and how to resume. Under torchrun only rank 0 speaks."""
    quiet = os.environ.get("RANK", "0") != "0"
    try:
        main()
    except (Fail, OSError, MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not any(w in str(e) for w in ("memory", "overflow")):  # too large for
            raise  # torch: "can't allocate memory", "out of memory", "Storage size calculation overflowed"
        sys.exit(1 if quiet else f"error: {(str(e).splitlines() or [type(e).__name__])[0]}")
    except (Stopped, KeyboardInterrupt) as e:
        for s in (signal.SIGINT, signal.SIGTERM):  # said once: a second signal during the exit stays silent
            signal.signal(s, signal.SIG_IGN)
        if not quiet:
            print(f"interrupted: {e if isinstance(e, Stopped) else 'before anything was kept'}", file=sys.stderr)
        sys.exit(130)

@contextlib.contextmanager
def on_interrupt(kept):
    """Turn Ctrl-C or SIGTERM inside the block into Stopped(kept()), the words of what was kept."""
    try:
        yield
    except KeyboardInterrupt:
        raise Stopped(kept()) from None

# Reports --------------------------------------------------------------------------------------------------------------
def spread(values, digits=1):
    """Mean over seeds, then (min-max) when there are several; '-' when there is none (all diverged)."""
    f = lambda v: f"{v:,.{digits}f}"
    if not values:
        return "-"
    return f(sum(values) / len(values)) + (f" ({f(min(values))}-{f(max(values))})" if len(values) > 1 else "")

def table(head, rows):  # markdown
    return "\n".join("| " + " | ".join(line) + " |" for line in [head, ["---"] * len(head), *rows])

def plot(series, path, ylabel, xlabel="step"):
    """series: {label: [curve of each seed]}, a curve [[x, value], ...], x a step unless xlabel says. Draws the mean
    over the seeds and a band from their min to their max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, curves in series.items():
        steps = sorted({s for c in curves for s, _ in c})
        at = [[v for c in curves for s2, v in c if s2 == s] for s in steps]
        line, = ax.plot(steps, [sum(v) / len(v) for v in at], marker="o", markersize=3, label=label)
        if len(curves) > 1:
            ax.fill_between(steps, [min(v) for v in at], [max(v) for v in at], color=line.get_color(), alpha=0.2)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_files([path]) as (f,):
        fig.savefig(f, format=os.path.splitext(path)[1][1:].lower(), dpi=120)
    plt.close(fig)
    print(f"wrote {path}")

def format_time(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"
