"""
MoRA and LoRA, and a small LLaMA to try them on, in one file.

Read it top to bottom:
  1. the adapters, one block you can copy on its own (it needs torch only):
     LoRA (Hu et al., 2021): dW = (alpha / r) B A, two thin matrices, rank(dW) <= r;
     MoRA (Jiang et al., 2024, arXiv 2405.12130): dW x = f_decomp(M f_comp(x)), one square
     matrix M (r^ x r^) with LoRA's parameter count, and a rank that can reach min(d, k);
  2. helpers to put adapters into any model, merge them and save them (PEFT's names);
  3. the model: a LLaMA-like transformer (RMSNorm, rotary attention, SwiGLU).

Notation (as in the paper): a frozen nn.Linear W0 of shape (d, k), d = out_features,
k = in_features; an adapter adds dW x to W0 x.
"""

import functools
import inspect
import math
import operator
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Adapters: y = W0 x + dW x, W0 frozen


class AdapterLinear(nn.Module):
    """A frozen nn.Linear W0 (`base`) plus a trained update dW. Subclasses write forward and
    get_delta_weight from the same formula, and reset_adapter.

    merge() folds dW into W0, so that forward is W0 alone; unmerge() takes it out again. The
    merged flag (and what a subclass needs to rebuild its update) travels in the state dict as a
    tensor, so that safetensors and save_pretrained can store it.
    """

    def __init__(self, base, r, dropout):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        _check_rank(r)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.base = base.requires_grad_(False)
        self.r = r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    # PEFT's conventions: the layer reports its base layer's shape, weight and bias
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)

    def _warn_if_oversized(self, n_params):
        d, k = self.out_features, self.in_features
        if n_params > d * k:  # Python shows each distinct message once
            warnings.warn(f"{type(self).__name__} with r={self.r} on a {k}->{d} layer has {n_params} parameters, "
                          f"more than the full {d}x{k} matrix ({d * k}); a smaller r does as much", stacklevel=3)

    @torch.no_grad()
    def _fold(self, sign):
        """W0 += sign * dW, added in float32 at least and rounded once. A non-finite result is
        refused before W0 changes (PEFT's safe_merge): unmerge() could not undo it."""
        w = self.base.weight
        new = (w.to(torch.promote_types(w.dtype, torch.float32)) + sign * self.get_delta_weight()).to(w.dtype)
        if not new.is_meta and not torch.isfinite(new).all():
            raise ValueError(f"{type(self).__name__}({self.extra_repr()}): the update is not finite (NaN or inf); "
                             f"W0 left unchanged")
        w.copy_(new)

    def merge(self):
        if self.merged:
            warnings.warn("adapter already merged; merge() does nothing", stacklevel=2)
            return
        self._fold(+1)
        self.merged = True

    def unmerge(self):
        if not self.merged:
            warnings.warn("adapter is not merged; unmerge() does nothing", stacklevel=2)
            return
        self._fold(-1)
        self.merged = False

    def merge_and_reinit(self):
        """ReLoRA / ReMoRA (Sec. 5.3): fold dW into W0 for good, then start a fresh adapter."""
        if self.merged:
            raise ValueError("merge_and_reinit() needs an unmerged adapter")
        self._fold(+1)
        self.reset_adapter()

    def get_extra_state(self):  # a merged layer loaded from its state must not be merged twice
        return torch.tensor([float(self.merged)], dtype=torch.float64)

    def set_extra_state(self, state):  # a dict: this project's checkpoints from before the tensor format
        self.merged = bool(state["merged"] if isinstance(state, dict) else state[0])


def _check_rank(r):
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"rank r must be a positive integer, got {r!r}")


# -----------------------------------------------------------------------------
# LoRA: dW = (alpha / r) B A


class LoRALinear(AdapterLinear):
    """LoRA: A (r, k) Kaiming-uniform, B (d, r) zeros, so dW = 0 at the start.

    alpha defaults to r (scaling 1). Trainable parameters: r (d + k).
    """

    def __init__(self, base, r, alpha=None, dropout=0.0):
        super().__init__(base, r, dropout)
        alpha = r if alpha is None else alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
        self.alpha, self.scaling = alpha, alpha / r
        w = base.weight
        self.A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.empty(self.out_features, r, device=w.device, dtype=w.dtype))
        self.reset_adapter()
        self._warn_if_oversized(r * (self.in_features + self.out_features))

    @torch.no_grad()
    def reset_adapter(self):
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        nn.init.zeros_(self.B)

    def forward(self, x):  # W0 x + (alpha / r) B A x
        if self.merged:
            return self.base(x)
        return self.base(x) + (self.dropout(x) @ self.A.T * self.scaling) @ self.B.T  # scale the thin (..., r) tensor

    def get_delta_weight(self):
        """The explicit (d, k) update, in float32 at least (differentiable; detach for analysis)."""
        dtype = torch.promote_types(self.A.dtype, torch.float32)
        return self.B.to(dtype) @ self.A.to(dtype) * self.scaling

    def get_extra_state(self):  # A and B mean nothing without their scaling
        return torch.cat([super().get_extra_state(), torch.tensor([self.alpha], dtype=torch.float64)])

    def set_extra_state(self, state):
        super().set_extra_state(state)
        if isinstance(state, dict):  # the old format did not save alpha: the layer keeps its own
            return
        alpha = state[1].item()
        if alpha != self.alpha:
            warnings.warn(f"LoRA adapter saved with alpha={alpha:g} loaded into a layer built with alpha={self.alpha:g}; "
                          f"using the saved alpha={alpha:g}", stacklevel=2)
            self.alpha, self.scaling = alpha, alpha / self.r

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"


# -----------------------------------------------------------------------------
# MoRA: dW x = f_decomp(M f_comp(x)), M square (r^ x r^), zero-initialised, no scaling

# The order is part of the saved format: _extra_state stores a variant as its index here.
VARIANTS = ("truncation", "sharing", "decoupling", "rotation", "sharing_gs_ri", "sharing_gs_t", "sharing_cs_ri")
OFFICIAL_TYPES = {1: "sharing", 2: "sharing_gs_ri", 3: "sharing_gs_t", 4: "sharing_cs_ri", 6: "rotation"}
# (f_comp, f_decomp) of the sharing family, in ReMoRA's cycle order
SHARING_GROUPINGS = {"sharing": ("CS", "T"), "sharing_gs_ri": ("GS", "RI"), "sharing_gs_t": ("GS", "T"), "sharing_cs_ri": ("CS", "RI")}


def resolve_variant(variant):
    """A variant name, or an official mora_type number (1, 2, 3, 4, 6) as int or string."""
    number = None
    if isinstance(variant, str) and variant.isdigit():
        number = int(variant)
    elif not isinstance(variant, (bool, str)):
        try:
            number = operator.index(variant)  # int, numpy integers
        except TypeError:
            pass
    if number in OFFICIAL_TYPES:
        return OFFICIAL_TYPES[number]
    if variant in VARIANTS:
        return variant
    raise ValueError(f"unknown MoRA variant {variant!r}; choose one of {', '.join(VARIANTS)} "
                     f"or an official number {', '.join(map(str, OFFICIAL_TYPES))}")


def mora_rank(in_features, out_features, r, variant="rotation"):
    """r^ = round(sqrt((d + k) r)), so r^ * r^ ~= r (d + k), LoRA's parameter count at rank r.

    The paper writes a floor, the official code rounds (as here). Rotation pairs dimensions,
    so its r^ is rounded down to an even number.
    """
    _check_rank(r)
    variant = resolve_variant(variant)
    r_hat = int(math.sqrt((in_features + out_features) * r) + 0.5)
    if variant == "rotation":
        r_hat = r_hat // 2 * 2
    if r_hat < 1:
        raise ValueError(f"r={r} gives r^={r_hat} for a {in_features}->{out_features} layer with variant {variant!r}")
    return r_hat


# Compressions f_comp (Sec. 4): the k inputs, last dimension of x, to r^ values.


def truncate(x, r_hat):
    """Truncation: x_(0:r^), zero-padded when k < r^."""
    return F.pad(x[..., :r_hat], (0, max(0, r_hat - x.shape[-1])))


def cyclic_pad(x, length):
    """x~_t = x_(t mod k) for t < length: padding reuses the first inputs (not zeros)."""
    copies = -(-length // x.shape[-1])
    if copies > 1:
        x = x.repeat(*(1,) * (x.dim() - 1), copies)
    return x[..., :length]


def chunk_sum(x, r_hat):
    """CS (Eq. 6, sharing): cut x~ into ceil(k / r^) chunks of length r^ and add them up."""
    n_chunks = -(-x.shape[-1] // r_hat)
    return cyclic_pad(x, n_chunks * r_hat).unflatten(-1, (n_chunks, r_hat)).sum(-2)


def _group_sizes(n, n_groups):
    """n items in n_groups contiguous groups (GS, RI): the first (n mod n_groups) groups have
    floor(n / n_groups) + 1 members, the rest floor(n / n_groups), possibly none.
    Returns the two runs as (count, size)."""
    size, n_big = divmod(n, n_groups)
    return (n_big, size + 1), (n_groups - n_big, size)


def group_sum(x, r_hat):
    """GS: add up each of r^ contiguous groups of the k inputs (no padding)."""
    (n_big, big), (n_small, small) = _group_sizes(x.shape[-1], r_hat)
    split = n_big * big
    return torch.cat([x[..., :split].unflatten(-1, (n_big, big)).sum(-1),
                      x[..., split:].unflatten(-1, (n_small, small)).sum(-1)], dim=-1)


def split_blocks(x, r_hat, n_blocks):
    """Decoupling: x~ cut into n_blocks blocks of r^, each to be multiplied by M: (..., n_blocks, r^)."""
    return cyclic_pad(x, n_blocks * r_hat).unflatten(-1, (n_blocks, r_hat))


def rope_cos_sin(dim, n_positions, theta=10000.0, dtype=None, device=None):
    """Rotary tables (n_positions, dim): position i turns the pair (j, j + dim/2) by i * theta^(-2j/dim).

    Serves MoRA's rotation (Eq. 9), whose positions are block indices, and the model's attention.
    Not buffers but computed when needed, once per shape, dtype and device: a model loaded through
    the meta device or cast to another dtype gets the right tables, and none can go stale.
    """
    dtype = dtype or torch.get_default_dtype()
    return _rope_tables(dim, n_positions, float(theta), dtype, torch.device("cpu" if device is None else device))


@functools.lru_cache(maxsize=64)  # ~10 small operations otherwise, in every forward of every layer
def _rope_tables(dim, n_positions, theta, dtype, device):
    with torch.inference_mode(False):  # a table first made under inference_mode must still serve training
        exact = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=exact, device=device)[: dim // 2] / dim)
        angles = torch.outer(torch.arange(n_positions, dtype=exact, device=device), freqs)
        angles = torch.cat([angles, angles], dim=-1)  # rotate-half convention: same angle for j and j + dim/2
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x, cos, sin):
    """z_j = x_j cos - x_(j+h) sin,  z_(j+h) = x_(j+h) cos + x_j sin  (h = half the last dim)."""
    return x * cos + rotate_half(x) * sin


def rotate_blocks(blocks, cos, sin):
    """Rotation (Eq. 9): block i of x~ turned by the angles i * theta_j, as RoPE turns position i."""
    return apply_rotary(blocks, cos, sin)


# Decompressions f_decomp: r^ values (or n_blocks blocks of them) to the d outputs.


def zero_pad(y, d):
    """Truncation: [y; 0] to length d (cut when r^ > d)."""
    return F.pad(y[..., :d], (0, max(0, d - y.shape[-1])))


def tile(y, d):
    """T (Eq. 6, sharing): out_i = y_(i mod len(y)); with len(y) >= d this keeps the first d values."""
    n = y.shape[-1]
    if n < d:
        y = y.repeat(*(1,) * (y.dim() - 1), -(-d // n))
    return y[..., :d]


def interleave(y, d):
    """RI: out_i = y_g(i), g(i) the group of output i when the d outputs form r^ contiguous groups."""
    (n_big, big), (n_small, small) = _group_sizes(d, y.shape[-1])
    return torch.cat([y[..., :n_big].repeat_interleave(big, -1), y[..., n_big:].repeat_interleave(small, -1)], -1)


def concat_blocks(y, d):
    """Decoupling / rotation: the n_blocks block outputs side by side, the first d kept (tiled when shorter)."""
    return tile(y.flatten(-2), d)


class MoRALinear(AdapterLinear):
    """MoRA: a frozen nn.Linear plus dW x = f_decomp(M f_comp(x)), M (r^ x r^) zero-initialised.

    r is LoRA's rank for the same budget; r^ = mora_rank(k, d, r, variant). There is no
    alpha / r scaling (the paper has none). Works for every shape: k or d not divisible by r^,
    r^ >= k, r^ > 2k. `variant` is a name or the official code's mora_type number:

    variant (paper, Sec. 4)  type  f_comp          f_decomp            rank(dW) at most
    truncation               -     x[:r^]          [y; 0]              r^
    sharing (Eq. 6)          1     chunk sum (CS)  tile (T)            r^
    decoupling               -     blocks of r^    concatenate blocks  min(d, k)
    rotation (Eq. 9)         6     rotated blocks  concatenate blocks  min(d, k)
    sharing_gs_ri            2     group sum (GS)  interleave (RI)     r^
    sharing_gs_t             3     group sum (GS)  tile (T)            r^
    sharing_cs_ri            4     chunk sum (CS)  interleave (RI)     r^

    The last three are the other groupings ReMoRA cycles through between merges (1, 2, 3, 4, 1, ...).
    Which to pick: rotation for small r (its rank is not capped by r^), sharing for large r
    (as cheap as LoRA, and r^ is already large).
    """

    turn_M = True  # rotation: compute M R_i x_i as (M R_i) x_i, see forward (False: as Eq. 9 reads)

    def __init__(self, base, r, variant="rotation", dropout=0.0):
        super().__init__(base, r, dropout)
        self.variant = resolve_variant(variant)
        k, d = self.in_features, self.out_features
        self.r_hat = mora_rank(k, d, r, self.variant)
        w = base.weight
        self.M = nn.Parameter(torch.zeros(self.r_hat, self.r_hat, device=w.device, dtype=w.dtype))
        # Decoupling and rotation cut x~ into blocks of r^; only the blocks whose outputs are
        # kept (the first d) are needed, so n_blocks <= ceil(k / r^).
        self.n_blocks = min(-(-k // self.r_hat), -(-d // self.r_hat))
        self._warn_if_oversized(self.r_hat ** 2)

    def f_comp(self, x):  # (..., k) -> (..., r^), or (..., n_blocks, r^) for decoupling and rotation
        v, r_hat = self.variant, self.r_hat
        if v == "truncation":
            return truncate(x, r_hat)
        if v in SHARING_GROUPINGS:
            return chunk_sum(x, r_hat) if SHARING_GROUPINGS[v][0] == "CS" else group_sum(x, r_hat)
        blocks = split_blocks(x, r_hat, self.n_blocks)
        if v == "rotation":
            blocks = rotate_blocks(blocks, *rope_cos_sin(r_hat, self.n_blocks, dtype=x.dtype, device=x.device))
        return blocks

    def f_decomp(self, y):  # -> (..., d)
        v, d = self.variant, self.out_features
        if v == "truncation":
            return zero_pad(y, d)
        if v in SHARING_GROUPINGS:
            return tile(y, d) if SHARING_GROUPINGS[v][1] == "T" else interleave(y, d)
        return concat_blocks(y, d)

    def forward(self, x):
        if self.merged:
            return self.base(x)
        z = self.dropout(x)
        if self.variant == "rotation" and self.turn_M:  # the same update, regrouped; see rotated_blocks
            return self.base(x) + self.f_decomp(self.rotated_blocks(z))
        return self.base(x) + self.f_decomp(self.f_comp(z) @ self.M.T)  # W0 x + f_decomp(M f_comp(x))

    def rotated_blocks(self, x):
        """Rotation, faster: M (R_i x_i) = (M R_i) x_i. Turning the r^ x r^ matrix M once per block
        costs far less than turning the activations (N x r^ per block) when there are many tokens:
        bench.py measures 9% less time for the layer at 4096 x 4096, r = 8, 2048 tokens (fp32, CPU).
        M R_i is each row of M turned by -phi_i: apply_rotary with -sin. Returns (..., n_blocks, r^)."""
        cos, sin = rope_cos_sin(self.r_hat, self.n_blocks, dtype=self.M.dtype, device=self.M.device)
        M_i = apply_rotary(self.M, cos[:, None, :], -sin[:, None, :])  # (n_blocks, r^, r^)
        x_i = cyclic_pad(x, self.n_blocks * self.r_hat).split(self.r_hat, dim=-1)  # views (of a copy only when padded)
        return torch.stack([x_b @ M_b.T for x_b, M_b in zip(x_i, M_i)], dim=-2)

    def get_delta_weight(self):
        """The explicit (d, k) update, in float32 at least (differentiable; detach for analysis).
        The update is linear in x, so dW^T is the update of the k unit vectors: the same f_comp and
        f_decomp as forward, applied to the identity, 1024 rows at a time (not k x k at once)."""
        dtype, k = torch.promote_types(self.M.dtype, torch.float32), self.in_features
        M = self.M.to(dtype)
        rows = []
        for start in range(0, k, 1024):
            i = torch.arange(start, min(start + 1024, k), device=M.device)
            units = torch.zeros(len(i), k, dtype=dtype, device=M.device)
            units[i - start, i] = 1  # the unit vectors e_start, e_(start + 1), ...
            rows.append(self.f_decomp(self.f_comp(units) @ M.T))
        return torch.cat(rows).T

    @torch.no_grad()
    def reset_adapter(self):
        self.M.zero_()

    def merge_and_reinit(self):
        """ReMoRA (Sec. 5.3): also move the sharing family to its next grouping (1 -> 2 -> 3 -> 4 -> 1),
        so that successive merges add new directions."""
        super().merge_and_reinit()
        if self.variant in SHARING_GROUPINGS:
            order = list(SHARING_GROUPINGS)
            self.variant = order[(order.index(self.variant) + 1) % len(order)]

    def get_extra_state(self):  # the grouping changes under ReMoRA, so it travels with M
        return torch.cat([super().get_extra_state(), torch.tensor([VARIANTS.index(self.variant)], dtype=torch.float64)])

    def set_extra_state(self, state):
        if isinstance(state, dict):  # the old format saved the variant's name
            variant = resolve_variant(state["variant"])
        elif 0 <= int(state[1]) < len(VARIANTS):
            variant = VARIANTS[int(state[1])]
        else:
            raise ValueError(f"saved MoRA state names no variant (index {int(state[1])})")
        if variant != self.variant and not (variant in SHARING_GROUPINGS and self.variant in SHARING_GROUPINGS):
            raise ValueError(f"cannot load MoRA variant {variant!r} into a {self.variant!r} layer")
        super().set_extra_state(state)
        self.variant = variant

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, r_hat={self.r_hat}, variant={self.variant!r}"


# -----------------------------------------------------------------------------
# 2. Putting adapters into a model (names as in loralib / PEFT)

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # this file's Llama; Hugging Face LLaMA: q_proj ... down_proj


def mark_only_adapters_as_trainable(model):
    for p in model.parameters():
        p.requires_grad = False
    for _, layer in adapter_layers(model):
        for p in layer.parameters(recurse=False):
            p.requires_grad = True
    return model


def _output_layer(model):
    """The layer "all-linear" leaves out, as PEFT does: the output head."""
    if callable(getattr(model, "get_output_embeddings", None)):  # Hugging Face models
        return model.get_output_embeddings()
    return next((m for n, m in model.named_modules() if n.rpartition(".")[2] in ("lm_head", "head")), None)


def apply_adapters(model, method="lora", r=8, targets=DEFAULT_TARGETS, **layer_kwargs):
    """Wrap the targeted nn.Linear layers with a LoRALinear or MoRALinear, freeze everything else,
    and return the model (changed in place).

    A target matches a module whose dotted name equals it or ends with "." + target (PEFT's rule):
    "q" matches every layers.N.attn.q, "mlp.up" every layers.N.mlp.up. "all-linear" targets every
    nn.Linear but the output head. A targeted layer whose weight is tied to another module's (a head
    sharing the embedding) is given its own copy, with a warning, so that merging leaves the other
    unchanged. All checks come before any change: on an error the model is left as it was.
    """
    layer_cls = {"lora": LoRALinear, "mora": MoRALinear}.get(method)
    if layer_cls is None:
        raise ValueError(f"unknown method {method!r}; choose 'lora' or 'mora'")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    _check_rank(r)
    all_linear = targets == ("all-linear",)
    head = _output_layer(model) if all_linear else None
    matches, found, skipped = [], set(), ()
    for name, module in model.named_modules():
        if not name or name.startswith(skipped):
            continue
        if isinstance(module, AdapterLinear):
            skipped += (name + ".",)
        if isinstance(module, nn.MultiheadAttention):  # it reads out_proj.weight directly: an adapter would be ignored
            skipped += (name + ".",)
        hits = {t for t in targets if name == t or name.endswith("." + t)}
        if all_linear and isinstance(module, nn.Linear) and module is not head:
            hits = {"all-linear"}
        if not hits:
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target {sorted(hits)[0]!r} matches {name!r}, a {type(module).__name__}, not an nn.Linear")
        matches.append((name, module))
        found |= hits
    missing = [t for t in targets if t not in found]
    if missing:
        raise ValueError(f"target(s) {missing} match no nn.Linear in the model")
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    try:
        new_layers = [(name, layer_cls(module, r, **layer_kwargs)) for name, module in matches]
    except ValueError:
        for p, flag in trainable:  # building a layer freezes its base: undo that
            p.requires_grad_(flag)
        raise
    owners = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name, layer in new_layers:
        others = [n for n in owners[id(layer.base.weight)] if n != f"{name}.weight"]
        if others:
            warnings.warn(f"{name}.weight is tied to {others[0]}; giving {name} its own copy, so that merging "
                          f"its adapter leaves {others[0]} unchanged", stacklevel=2)
            layer.base.weight = nn.Parameter(layer.base.weight.detach().clone(), requires_grad=False)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer)
    return mark_only_adapters_as_trainable(model)


def adapter_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLinear)]


def merge_and_unload(model):
    """Merge every adapter into its base layer and put the plain nn.Linear back (in place);
    returns the model (the base layer itself when given a single adapter layer)."""
    if isinstance(model, AdapterLinear):
        return merge_and_unload(nn.ModuleDict({"layer": model}))["layer"]
    layers, merged_now = adapter_layers(model), []
    for name, layer in layers:  # all or nothing: a refused merge undoes the merges before it
        if not layer.merged:
            try:
                layer.merge()
            except ValueError as e:
                for done in merged_now:
                    done.unmerge()
                raise ValueError(f"{name}: {e}") from None
            merged_now.append(layer)
    for name, layer in layers:
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.base)
    return model


def _refuse_merged(model, what):
    merged = [name for name, layer in adapter_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"{what} needs unmerged adapters (a merged one lives in its base weight); unmerge {merged[0]!r} first")


def adapter_state_dict(model):
    """Only the adapters' entries, all tensors (safetensors can store them): A and B or M, and each
    layer's _extra_state (its merged flag, LoRA's alpha, MoRA's variant); not the frozen model."""
    _refuse_merged(model, "adapter_state_dict")
    prefixes = [f"{name}." if name else "" for name, _ in adapter_layers(model)]
    return {k: v for k, v in model.state_dict().items()
            if any(k.startswith(p) and not k[len(p):].startswith("base.") for p in prefixes)}


def load_adapter_state_dict(model, state_dict, strict=True):
    """Load what adapter_state_dict saved; with strict, any missing or unexpected key or a
    shape mismatch is a ValueError."""
    _refuse_merged(model, "load_adapter_state_dict")
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if strict and (missing or unexpected):
        raise ValueError(f"adapter state dict mismatch: missing {missing}, unexpected {unexpected}")
    for k, v in state_dict.items():
        if k in expected and torch.is_tensor(v) and v.shape != expected[k].shape:
            raise ValueError(f"adapter tensor {k!r} has shape {tuple(v.shape)}, the model has {tuple(expected[k].shape)}")
    model.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
    return model


@torch.no_grad()
def effective_weights(model, targets=DEFAULT_TARGETS):
    """{name: W0 + dW} in float32 for every layer named in targets: adapted (merged or not) or a
    plain nn.Linear (full training). The difference of two such snapshots is the learnt update."""
    weights = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] not in targets:
            continue
        if isinstance(module, AdapterLinear):
            w = module.base.weight.float()
            weights[name] = w if module.merged else w + module.get_delta_weight().float()
        elif isinstance(module, nn.Linear):
            weights[name] = module.weight.float()
    return weights


@torch.no_grad()
def count_singular_values(update, threshold=0.1):
    """Sec. 6.1: the number of singular values of an update dW above threshold (the paper's 0.1)."""
    return int((torch.linalg.svdvals(update.detach().float().cpu()) > threshold).sum())


def count_parameters(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# -----------------------------------------------------------------------------
# 3. The model: a LLaMA-like transformer


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 128           # hidden size
    hidden_dim: int = 352    # SwiGLU intermediate size
    n_heads: int = 4
    n_layers: int = 4
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim {self.dim} does not split into n_heads {self.n_heads} heads of even size "
                             f"(rotary embedding turns pairs of dimensions)")

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# The LLaMA family used by ReLoRA and the MoRA paper (Sec. 5.3): dim / hidden_dim / heads / layers.
# The names count parameters with a 32k vocabulary; "tiny" is for tests and quick CPU runs.
PRESETS = {
    "tiny": dict(dim=64, hidden_dim=176, n_heads=4, n_layers=2),
    "9m": dict(dim=128, hidden_dim=352, n_heads=4, n_layers=4),
    "20m": dict(dim=256, hidden_dim=688, n_heads=4, n_layers=4),
    "35m": dict(dim=384, hidden_dim=1024, n_heads=8, n_layers=6),
    "60m": dict(dim=512, hidden_dim=1376, n_heads=8, n_layers=8),
    "130m": dict(dim=768, hidden_dim=2048, n_heads=12, n_layers=12),
    "250m": dict(dim=768, hidden_dim=2560, n_heads=16, n_layers=24),
    "1b": dict(dim=2048, hidden_dim=5461, n_heads=32, n_layers=24),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)  # pre-norm residual blocks
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith((".o.weight", ".down.weight")):  # scaled residual projections (GPT-2)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        h = self.embed(idx)  # (B, T, C)
        cos, sin = rope_cos_sin(self.cfg.dim // self.cfg.n_heads, T, self.cfg.rope_theta, dtype=h.dtype, device=h.device)
        for layer in self.layers:
            h = layer(h, cos, sin)
        logits = self.head(self.norm(h))  # (B, T, V)
        loss = None
        if targets is not None:  # positions marked -100 are ignored
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None):
        """Append max_new_tokens tokens to idx (B, T): greedy when temperature == 0, else sampled."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.cfg.max_seq_len:])
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_id = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits[logits < kth] = -float("inf")
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat([idx, next_id], dim=1)
        return idx

    def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.95), device_type="cpu", projection_lr=None):
        """AdamW over the trainable parameters; matrices decay, norms do not. With projection_lr,
        what trains in the projections q ... down (the adapters, or the weights themselves in full
        training) has that rate. Each group keeps its rate as 'peak_lr', for a schedule to scale."""
        params = [p for p in self.parameters() if p.requires_grad]
        projection = set()
        if projection_lr is not None:
            adapters = [m for m in self.modules() if isinstance(m, AdapterLinear)]
            linears = [m for n, m in self.named_modules() if n.rpartition(".")[2] in DEFAULT_TARGETS]
            projection = {id(p) for m in adapters or linears for p in m.parameters(recurse=False) if p.requires_grad}
        groups = [
            {"params": [p for p in params if id(p) in projection], "weight_decay": weight_decay, "peak_lr": projection_lr},
            {"params": [p for p in params if id(p) not in projection and p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in projection and p.dim() < 2], "weight_decay": 0.0},
        ]
        groups = [{"peak_lr": learning_rate, **g} if g.get("peak_lr") is None else g for g in groups if g["params"]]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))
