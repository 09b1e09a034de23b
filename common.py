"""What the scripts share: flags and their rules, the rate schedule, the optimizer, Sec. 6.1's
count, safe outputs, one-line errors and interrupts, tables, plots. It imports mora, torch and the
standard library (matplotlib for a plot)."""

import argparse, contextlib, importlib.util, json, math, os, signal, sys, warnings

def _stop(signum, frame):  # SIGTERM ends a run as Ctrl-C does
    raise KeyboardInterrupt

def _excepthook(kind, error, traceback):  # Ctrl-C while torch loads, before main_guard runs
    if not issubclass(kind, KeyboardInterrupt):
        return sys.__excepthook__(kind, error, traceback)
    print("interrupted: before anything was kept", file=sys.stderr, flush=True)
    os._exit(130)

signal.signal(signal.SIGTERM, _stop)
sys.excepthook = _excepthook  # before the heavy imports below; scripts import this module first

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

# Flags --------------------------------------------------------------------------------------------
def flag(convert, ok=bool, what=None):
    """An argparse type: convert, then check; an error is one line (convert's own if no `what`)."""
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

# below 2**31: torch's sizes and counts
POSITIVE_INT = flag(int, lambda v: 0 < v < 2 ** 31, "a positive integer below 2**31")
COUNT = flag(int, lambda v: 0 <= v < 2 ** 31, "an integer from 0 to 2**31 - 1")
NON_NEGATIVE = flag(float, lambda v: 0 <= v < math.inf, "a finite number of at least 0")
def whole_as_int(text):  # 8 and 8.0 are one setting: a run saved with either is found by the other
    value = float(text)
    return int(value) if value.is_integer() else value

POSITIVE = flag(whole_as_int, lambda v: 0 < v < math.inf, "a positive finite number")
RATE = flag(float, lambda v: 0 < v <= 1, "a learning rate above 0 and at most 1")
THREADS = flag(int, lambda v: 0 < v <= 1024, "a thread count from 1 to 1024")
SEED = flag(int, lambda v: 0 <= v < 2 ** 63, "an integer from 0 to 2**63 - 1")
FRACTION = flag(float, lambda v: 0 < v < 1, "a number between 0 and 1")
PATH = flag(str, lambda v: v != "", "a path")

def device(name):
    """An argparse type: 'auto' (cuda, then mps, then cpu) or a device this machine has."""
    has = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(kind for kind, ok in has.items() if ok) if name == "auto" else name
    with contextlib.suppress(RuntimeError):
        dev = torch.device(name)
        if has.get(dev.type) and (dev.index or 0) < (torch.cuda.device_count() if dev.type == "cuda" else 1):
            return dev
    raise argparse.ArgumentTypeError(f"{name!r} is not a device of this machine "
                                     f"({', '.join(kind for kind, ok in has.items() if ok)})")

class Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Adds '(default: X)' to a help unless the default is None (computed), False or in the help."""
    def _get_help_string(self, action):
        own = action.default is None or action.default is False or "(default" in (action.help or "")
        return action.help if own else super()._get_help_string(action)

def quiet():  # under torchrun one process speaks for all: rank 0
    return os.environ.get("RANK", "0") != "0"

class Parser(argparse.ArgumentParser):
    """argparse with that help; under torchrun a bad flag is said once, by rank 0."""
    def __init__(self, **kwargs):
        super().__init__(formatter_class=Help, **kwargs)

    def error(self, message):
        if quiet():
            self.exit(2)
        super().error(message)

def add_run_flags(p, seed, log_every):
    """The flags of every training script."""
    p.add_argument("--seed", type=SEED, default=seed,
                   help="the first seed: initial weights, data and batch order")
    seeds = flag(int, lambda v: 0 < v <= 1000, "a count from 1 to 1000")
    p.add_argument("--seeds", type=seeds, default=1, help="run each over the seeds --seed, "
                   "--seed + 1, ...: the tables show the mean (min-max)")
    p.add_argument("--device", type=device, default="auto",
                   help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bfloat16 on CUDA")
    p.add_argument("--log-every", type=POSITIVE_INT, default=log_every, help="steps between progress lines")
    p.add_argument("--json", type=PATH, metavar="PATH", help="add each run to this JSON as it ends "
                   "(replacing one with the same settings)")
    p.add_argument("--plot", type=PATH, metavar="PATH",
                   help="plot the curves, mean and (min-max) (needs matplotlib)")

def check_run_flags(p, args, folders=(), planned=()):
    """The rules of those flags, and of every output, before any work."""
    if args.seed + args.seeds > 2 ** 63:
        p.error(f"--seed {args.seed} with --seeds {args.seeds} goes past 2**63 - 1")
    check_outputs(p, [("--json", args.json), ("--plot", args.plot)], folders, planned, runs=args.json)
    if args.plot and os.path.splitext(args.plot)[1].lower() not in (".png", ".pdf", ".svg", ".jpg"):
        p.error(f"--plot {args.plot}: name a .png, .pdf, .svg or .jpg file")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error(f"--plot {args.plot} needs matplotlib (pip install matplotlib)")
    auto = "bfloat16" if args.device.type == "cuda" else "float32"
    args.dtype = {"auto": auto}.get(args.dtype, args.dtype)
    if args.warmup >= args.steps:
        note(f"--warmup {args.warmup} is not below --steps {args.steps}: the rate never reaches its peak")

def note(text):
    if not quiet():
        print(f"note: {text}", file=sys.stderr)

def parse_given(parser, argv, names):
    """parser.parse_args, and which of names the command line gave: those start as None, so that
    argparse fills only the others with their defaults, as it does for what a namespace lacks."""
    args = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(names)))
    args.given = {name for name in names if getattr(args, name) is not None}
    for name in set(names) - args.given:
        setattr(args, name, parser.get_default(name))
    return args

def note_ignored(args, readers, users):
    """A note for each flag given that nothing run reads; readers: {flag: its readers}."""
    for name, readers_of in readers.items():
        if name in args.given and not set(readers_of) & set(users):
            note(f"--{name.replace('_', '-')} is ignored by --method {args.method} "
                 f"(only {', '.join(readers_of)} read it)")

# Training -----------------------------------------------------------------------------------------
def lr_factor(step, steps, warmup, decay="linear", floor=0.0, restart_every=0, rewarmup=0):
    """The share of peak rate at step (0-based): warm-up, then linear or cosine decay to floor."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "linear":
        shape = max(0.0, (steps - step) / max(1, steps - warmup))
    else:
        shape = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    factor = floor + (1 - floor) * shape
    if restart_every and step >= restart_every and rewarmup:  # ReLoRA's warm-ups after merges (5.3)
        factor *= min(1.0, (step % restart_every + 1) / rewarmup)
    return factor

def optimizer(model, weight_decay, lr, projection_lr=None, betas=(0.9, 0.95), device=None):
    """AdamW over the trainable parameters; matrices decay, norms do not. projection_lr is the rate
    of what trains in q ... down (adapters, or full training's weights); 'peak_lr' for lr_factor."""
    adapters = [m for m in model.modules() if isinstance(m, AdapterLinear)]
    owners = adapters or [m for n, m in model.named_modules() if matches(n, DEFAULT_TARGETS)]
    projection = {id(p) for m in owners for p in m.parameters(recurse=False)} if projection_lr else set()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [(projection_lr, weight_decay, [p for p in params if id(p) in projection]),
              (lr, weight_decay, [p for p in params if id(p) not in projection and p.dim() >= 2]),
              (lr, 0.0, [p for p in params if id(p) not in projection and p.dim() < 2])]
    groups = [{"params": ps, "weight_decay": wd, "peak_lr": peak} for peak, wd, ps in groups if ps]
    fused = True if getattr(device, "type", 0) == "cuda" else None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)

@torch.no_grad()
def effective_weights(model, targets=DEFAULT_TARGETS):
    """{name: W0 + dW} in float32, each projection in targets: adapted (merged or not) or plain."""
    weights = {}
    for n, m in model.named_modules():
        if isinstance(m, AdapterLinear) and matches(n, targets):
            weights[n] = m.base.weight.float() + (0 if m.merged else m.get_delta_weight().float())
        elif isinstance(m, nn.Linear) and matches(n, targets):
            weights[n] = m.weight.float().clone()
    return weights

@torch.no_grad()
def update_ranks(before, after, threshold=0.1):
    """Sec. 6.1: how many singular values of each layer's learnt update (after - before: snapshots
    of effective_weights) are above threshold (the paper's 0.1); per projection, mean and shape."""
    ranks = {}
    for name, w in after.items():
        n = int((torch.linalg.svdvals(w.cpu() - before[name].cpu()) > threshold).sum())
        ranks.setdefault(name.rpartition(".")[2], {"shape": list(w.shape), "n": []})["n"].append(n)
    return {p: {"shape": r["shape"], "above_threshold": sum(r["n"]) / len(r["n"])} for p, r in ranks.items()}

# Outputs ------------------------------------------------------------------------------------------
def check_outputs(parser, files=(), folders=(), planned=(), runs=None):
    """Every output, before any work: files, folders and planned (paths only kept apart from the
    others: a run's files in a folder it made, a cache that may be read-only) are [(flag, path or
    None)], each its own path, writable; an existing runs JSON holds runs."""
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
        if is_folder and os.path.islink(path) and not os.path.exists(path):
            parser.error(f"{name} {path}: a link to nothing ({os.readlink(path)})")
        if os.path.exists(path) and not (os.path.isdir if is_folder else os.path.isfile)(path):
            parser.error(f"{name} {path}: " + ("is a file, not a folder" if is_folder
                                               else "is a folder" if os.path.isdir(path)
                                               else "is not a regular file"))  # a FIFO would block
        parent = real if is_folder else os.path.dirname(real)
        while is_folder and not os.path.exists(parent):  # made with parents; a file's must exist
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            parser.error(f"{name} {path}: cannot write in {parent} (no such folder, or not writable)")
    try:
        read_runs(runs) if runs else None
    except Fail as e:
        parser.error(str(e))

def read_checkpoint(path, hint):
    """A checkpoint read as data (weights_only: no code runs); a fault is one line, with hint."""
    if not os.path.isfile(path):  # a folder, or a pipe that would wait forever
        raise Fail(f"{path} is not a file; {hint}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, cut, foreign, or pickled code
        raise Fail(f"{path} is not a readable checkpoint ({why(e)}); {hint}") from None

def read_runs(path):
    """{"runs": [...], "script": ...} at path; empty if no file, refused if another script's."""
    script = os.path.basename(sys.argv[0])
    if not os.path.exists(path):
        return {"runs": [], "script": script}
    try:
        with open(path) as f:
            doc = json.load(f)
        assert isinstance(doc, dict) and isinstance(doc["runs"], list)
        assert all(isinstance(r, dict) for r in doc["runs"])
        assert doc.setdefault("script", script) == script
        return doc
    except (OSError, ValueError, KeyError, AssertionError):
        raise Fail(f"--json {path} exists and does not hold runs of {script}; choose another path") from None

def key(run):  # what makes two runs the same run
    return json.dumps(run.get("settings", id(run)), sort_keys=True)

def save_runs(path, runs):
    """Add runs to the JSON under a lock, replacing same-settings runs: no finished run is lost."""
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

# Errors and interrupts ----------------------------------------------------------------------------
def main_guard(main):
    """Run main: an error is one line 'error: ...', an interrupt one line of what was kept and how
    to go on; under torchrun only rank 0 speaks."""
    try:
        main()
    except (Fail, OSError, MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not any(w in str(e) for w in ("memory", "overflow")):
            raise  # a bug: not torch's "out of memory" or "Storage size calculation overflowed"
        sys.exit(1 if quiet() else f"error: {(str(e).splitlines() or [type(e).__name__])[0]}")
    except (Stopped, KeyboardInterrupt) as e:
        for s in (signal.SIGINT, signal.SIGTERM):  # said once: a later signal stays silent
            signal.signal(s, signal.SIG_IGN)
        if not quiet():
            kept = e if isinstance(e, Stopped) else "before anything was kept"
            print(f"interrupted: {kept}", file=sys.stderr)
        sys.exit(130)

@contextlib.contextmanager
def on_interrupt(kept):
    """Turn Ctrl-C or SIGTERM inside the block into Stopped(kept()), the words of what was kept."""
    try:
        yield
    except KeyboardInterrupt:
        raise Stopped(kept()) from None

# Reports ------------------------------------------------------------------------------------------
def spread(values, digits=1):
    """Mean over seeds, then (min-max) if there are several; '-' if none (all diverged)."""
    f = lambda v: f"{v:,.{digits}f}"
    if not values:
        return "-"
    mean = f(sum(values) / len(values))
    return mean + (f" ({f(min(values))}-{f(max(values))})" if len(values) > 1 else "")

def table(head, rows):  # markdown
    return "\n".join("| " + " | ".join(line) + " |" for line in [head, ["---"] * len(head), *rows])

def plot(series, path, ylabel, xlabel="step"):
    """series: {label: [a curve [[x, value], ...] per seed]}; draws the mean, a (min-max) band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, curves in series.items():
        steps = sorted({s for c in curves for s, _ in c})
        at = [[v for c in curves for s2, v in c if s2 == s] for s in steps]
        line, = ax.plot(steps, [sum(v) / len(v) for v in at], marker="o", markersize=3, label=label)
        if len(curves) > 1:
            ax.fill_between(steps, [min(v) for v in at], [max(v) for v in at],
                            color=line.get_color(), alpha=0.2)
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
