"""
MoRA and LoRA, and a small LLaMA to try them on, in one file.

Read it top to bottom:
  1. the adapters, one block you can copy on its own (it needs torch only):
     LoRA (Hu et al., 2021): dW = (alpha / r) B A, two thin matrices, rank(dW) <= r;
     MoRA (Jiang et al., 2024, arXiv 2405.12130): dW x = f_decomp(M f_comp(x)), one square
     matrix M (r^ x r^) with LoRA's parameter count, and a rank that can reach min(d, k);
  2. helpers to put adapters into any model, merge them and save them (PEFT's names);
  3. the model: a LLaMA-like transformer (RMSNorm, rotary attention, SwiGLU).
Notation (the paper's): a frozen nn.Linear W0 of shape (d, k), d = out_features, k = in_features;
an adapter adds dW x to W0 x.
"""

import contextlib, functools, json, math, os, re, stat, warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Adapters: y = W0 x + dW x, W0 frozen


class AdapterLinear(nn.Module):
    """A frozen nn.Linear W0 (`base`) plus a trained update dW. A subclass gives update(x) = dW x,
    get_delta_weight() = dW by the same formula, reset_adapter() and `settings` (saved state)."""

    def __init__(self, base, r, dropout):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"rank r must be a positive integer, got {r!r}")
        if isinstance(dropout, bool) or not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"dropout must be a number from 0 to below 1, got {dropout!r}")
        self.base = base.requires_grad_(False)
        self.r = r
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()  # on the adapter's input only
        self.merged = self.disabled = False
        self.reinits = 0  # merge_and_reinit calls: W0 holds what the adapter learnt before

    # PEFT's conventions: the layer reports its base layer's shape, weight and bias
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)

    def forward(self, x):  # W0 x + dW x
        if self.merged or self.disabled:
            return self.base(x)
        return self.base(x) + self.update(self.dropout(x))

    def merge(self):  # W0 <- W0 + dW
        self._fold(merge=True)

    def unmerge(self):  # W0 <- W0 - dW
        self._fold(merge=False)

    def merge_and_reinit(self):
        """ReLoRA / ReMoRA (Sec. 5.3): fold dW into W0 for good, then start a fresh adapter."""
        if not self.merged:
            self.merge()
        self.merged, self.reinits = False, self.reinits + 1
        self.reset_adapter()

    @torch.no_grad()
    def _fold(self, merge):
        word = "merge" if merge else "unmerge"
        if self.disabled:  # inside disable_adapters: merging would put the adapter into the outputs
            raise ValueError(f"{word} inside disable_adapters is refused")
        if merge == self.merged:
            return warnings.warn(f"adapter already {word}d; nothing done", stacklevel=3)
        self.base.weight.copy_(self.folded(merge))
        self.merged = merge

    @torch.no_grad()
    def folded(self, merge=True):
        """W0 +/- dW, added in float32 at least, rounded once; refused if not finite (safe_merge)."""
        w = self.base.weight
        new = (w.to(torch.promote_types(w.dtype, torch.float32)) + (1 if merge else -1) * self.get_delta_weight())
        if not new.is_meta and not torch.isfinite(new := new.to(w.dtype)).all():
            raise ValueError(f"{type(self).__name__}({self.extra_repr()}): W0 +/- dW is not finite; W0 left unchanged")
        return new

    # -------------------------------------------------------------------------
    # Saved state (a first reading can skip to LoRA): what gives the weights their meaning travels
    # with them. _extra_state is [kind, merged, *settings], one float64 tensor (safetensors stores
    # tensors alone); a subclass names its settings (alpha, variant) and checks them in valid().
    # A load is checked before it changes anything: here for one layer, in check_states for a model.

    KINDS = ("LoRALinear", "MoRALinear")  # the first number of a saved state

    def get_extra_state(self):
        kind = self.KINDS.index(type(self).__name__)
        return torch.tensor([kind, self.merged, *self.settings], dtype=torch.float64)

    def set_extra_state(self, state):
        self.merged, self.settings = bool(state[1]), state[2:].tolist()

    def check_state(self, state_dict, prefix):
        """Refused: another kind of adapter, settings the layer cannot take, a merged adapter
        without the base.weight that holds its update."""
        saved, kind = state_dict.get(prefix + "_extra_state"), type(self).__name__
        if saved is None:
            return
        number = self.KINDS.index(kind)
        if not (torch.is_tensor(saved) and saved.shape == (2 + len(self.settings),) and saved[1] in (0, 1)
                and saved[0] == number):
            raise ValueError(f"the saved state {saved.tolist() if torch.is_tensor(saved) else saved!r} "
                             f"is not a {kind}'s [kind {number}, merged, settings]")
        self.valid(saved[2:].tolist())
        if prefix + "base.weight" not in state_dict and (saved[1] or self.merged):
            raise ValueError("a merged adapter loads only with its base.weight, into an unmerged layer")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # A zero-size 'weight' that no nn.Linear loads: from_pretrained of an unmerged save fails
        # loudly where it would fill the layer with noise
        destination[prefix + "weight"] = torch.empty(0)

    def _load_from_state_dict(self, state_dict, prefix, metadata, strict, missing, unexpected, errors):
        self.check_state(state_dict, prefix)  # the saved settings win: they give the weights meaning
        super()._load_from_state_dict(state_dict, prefix, metadata, strict, missing, unexpected, errors)
        if prefix + "weight" in unexpected:  # the marker of _save_to_state_dict
            unexpected.remove(prefix + "weight")


# -----------------------------------------------------------------------------
# LoRA: dW = (alpha / r) B A


class LoRALinear(AdapterLinear):
    """LoRA: A (r, k) Kaiming-uniform, B (d, r) zeros, so dW = 0 at the start; r (d + k) trained.
    alpha defaults to r (scaling 1); use_rslora scales by alpha / sqrt(r) instead (rsLoRA, as PEFT)."""

    def __init__(self, base, r, alpha=None, dropout=0.0, use_rslora=False):
        super().__init__(base, r, dropout)
        self.settings = [r if alpha is None else alpha, use_rslora]  # alpha and use_rslora, checked
        self.A = nn.Parameter(base.weight.new_empty(r, self.in_features))  # (r, k)
        self.B = nn.Parameter(base.weight.new_empty(self.out_features, r))  # (d, r)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self):
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        nn.init.zeros_(self.B)

    def update(self, x):  # (alpha / r) B A x, scaling the thin (..., r) tensor
        return (x @ self.A.T * self.scaling) @ self.B.T

    def get_delta_weight(self):
        """dW = (alpha / r) B A, (d, k), in float32 at least (differentiable: detach to analyse)."""
        dtype = torch.promote_types(self.A.dtype, torch.float32)
        return self.B.to(dtype) @ self.A.to(dtype) * self.scaling

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"

    @property
    def settings(self):  # saved state: A and B mean nothing without their scaling
        return [self.alpha, float(self.use_rslora)]

    @settings.setter
    def settings(self, values):
        self.alpha, self.use_rslora = self.valid(values)
        self.scaling = self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def valid(self, values):
        alpha, rslora = values
        if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and 0 < alpha < math.inf):
            raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
        if rslora not in (0, 1):
            raise ValueError(f"LoRA use_rslora must be a bool, got {rslora!r}")
        return alpha, bool(rslora)


# -----------------------------------------------------------------------------
# MoRA: dW x = f_decomp(M f_comp(x)), M square (r^ x r^), zero-initialised, no scaling. f_comp takes
# the k inputs (last dimension) to n blocks of r^ values, (..., n, r^): n = 1 but for decoupling and
# rotation. f_decomp takes the n r^ outputs, side by side, to d.


def zero_pad(v, n):  # truncation: v cut, or padded with zeros, to length n (F.pad: 2 passes)
    if n <= v.shape[-1]:
        return v[..., :n]
    return torch.cat([v, v.new_zeros(*v.shape[:-1], n - v.shape[-1])], -1)


def truncate(x, r_hat):  # truncation's f_comp: x cut to r^ (or padded)
    return zero_pad(x, r_hat).contiguous()  # a copy: M's product would keep a view's whole x for the backward


def cyclic_pad(v, n):
    """v_(t mod len(v)) for t < n: the inputs padded with the first inputs again (x~, not zeros),
    and T (Eq. 6), out_i = y_(i mod r^), which also tiles the blocks of decoupling and rotation.
    Tile (at the end of this part) makes the copies, and adds their gradients up cheaply."""
    return v[..., :n] if n <= v.shape[-1] else Tile.apply(v, n)


def split_blocks(x, r_hat, n):  # decoupling and rotation: x~ cut into n blocks of r^
    return cyclic_pad(x, n * r_hat).unflatten(-1, (n, r_hat))


def chunk_sum(x, r_hat):  # CS (Eq. 6, sharing): the ceil(k / r^) blocks of x~ summed
    return split_blocks(x, r_hat, -(-x.shape[-1] // r_hat)).sum(-2)


def contiguous_groups(v, n_groups):
    """v's last dimension as n_groups contiguous groups, the first (len mod n_groups) one larger."""
    size, n_big = divmod(v.shape[-1], n_groups)
    split = n_big * (size + 1)
    return v[..., :split].unflatten(-1, (n_big, size + 1)), v[..., split:].unflatten(-1, (n_groups - n_big, size))


def group_sum(x, r_hat):  # GS: c_j = the sum of group j of the k inputs (no padding)
    return torch.cat([group.sum(-1) for group in contiguous_groups(x, r_hat)], -1)


def interleave(y, d):  # RI: out_i = y_g(i), the d outputs in r^ contiguous groups
    size, n_big = divmod(d, y.shape[-1])
    return torch.cat([y[..., :n_big].repeat_interleave(size + 1, -1), y[..., n_big:].repeat_interleave(size, -1)], -1)


# variant: (f_comp, f_decomp). The order is part of the saved state (it holds an index).
VARIANTS = {
    "truncation": (truncate, zero_pad),
    "sharing": (chunk_sum, cyclic_pad),  # Eq. 6: CS, T
    "decoupling": (split_blocks, cyclic_pad),
    "rotation": (split_blocks, cyclic_pad),  # Eq. 9: block i turned by R_i before M
    "sharing_gs_ri": (group_sum, interleave),  # these three: ReMoRA's other groupings
    "sharing_gs_t": (group_sum, cyclic_pad),
    "sharing_cs_ri": (chunk_sum, interleave),
}
OFFICIAL_TYPES = {1: "sharing", 2: "sharing_gs_ri", 3: "sharing_gs_t", 4: "sharing_cs_ri", 6: "rotation"}
REMORA_CYCLE = ("sharing", "sharing_gs_ri", "sharing_gs_t", "sharing_cs_ri")  # types 1 -> 2 -> 3 -> 4


def resolve_variant(variant):
    """A variant name, or an official mora_type number (1, 2, 3, 4, 6) as int or string."""
    if str(variant) in map(str, OFFICIAL_TYPES):
        return OFFICIAL_TYPES[int(variant)]
    if isinstance(variant, str) and variant in VARIANTS:
        return variant
    raise ValueError(f"unknown MoRA variant {variant!r}; choose one of {', '.join(VARIANTS)} "
                     f"or an official number {', '.join(map(str, OFFICIAL_TYPES))}")


def mora_rank(in_features, out_features, r, variant="rotation"):
    """r^ = round(sqrt((d + k) r)), so r^ r^ ~= r (d + k), LoRA's parameter count at rank r (the
    paper floors, the official code rounds). Rotation pairs dimensions: its r^ is even, 2 or more."""
    r_hat = int(math.sqrt((in_features + out_features) * r) + 0.5)
    return max(2, r_hat // 2 * 2) if resolve_variant(variant) == "rotation" else r_hat


@functools.lru_cache(maxsize=64)  # ~10 small operations otherwise, in every forward of every layer
def rope_cos_sin(dim, n_positions, theta=10000.0, dtype=torch.float32, device=torch.device("cpu")):
    """Rotary tables (n_positions, dim): position i turns the pair (j, j + dim/2) by i theta^(-2j/dim)
    for MoRA's rotation (Eq. 9: positions are blocks) and attention. Not buffers: a meta-device load
    or a cast cannot spoil them."""
    with torch.inference_mode(False):  # a table made under inference_mode must serve training too
        exact = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=exact, device=device)[: dim // 2] / dim)
        angles = torch.outer(torch.arange(n_positions, dtype=exact, device=device), freqs)
        angles = torch.cat([angles, angles], dim=-1)  # rotate-half: one angle for j and j + dim/2
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):  # (x_j, x_(j+h)) -> (-x_(j+h), x_j), h = half the last dim: each pair a quarter turn
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x, cos, sin):
    """z_j = x_j cos - x_(j+h) sin,  z_(j+h) = x_(j+h) cos + x_j sin  (h = half the last dim)."""
    return x * cos + rotate_half(x) * sin


def block_product(z, blocks):  # y_i = B_i z_i for each block i: (..., n, r^) and (n, r^, r^)
    return torch.einsum("...ni,noi->...no", z, blocks)


class MoRALinear(AdapterLinear):
    """MoRA: dW x = f_decomp(M f_comp(x)), M (r^ x r^) zero-initialised, no alpha / r scaling. r is
    LoRA's rank for the same budget, r^ = mora_rank(k, d, r, variant); `variant` is a name in
    VARIANTS or its official number. Truncation and the sharing family (Eq. 6, ReMoRA's groupings)
    reach rank r^; decoupling and rotation are block-diagonal, dW = diag(M R_1, ..., M R_n), R_i = I
    (decoupling) or the turn of block i by the angles i theta_j (rotation, Eq. 9: RoPE across
    blocks), and reach min(d, k). Rotation suits small r (M alone is small), sharing large r (as
    cheap as LoRA). Exact for every shape (k or d not divisible by r^, r^ >= k, r^ > 2k)."""

    def __init__(self, base, r, variant="rotation", dropout=0.0):
        super().__init__(base, r, dropout)
        self.variant = resolve_variant(variant)
        self.r_hat = mora_rank(self.in_features, self.out_features, r, self.variant)
        self.M = nn.Parameter(base.weight.new_zeros(self.r_hat, self.r_hat))  # (r^, r^)

    @property
    def n_blocks(self):  # n: decoupling's and rotation's blocks that have outputs to keep
        return min(-(-self.in_features // self.r_hat), -(-self.out_features // self.r_hat))

    def blocks(self, M):
        """M R_i for each block i, (n, r^, r^): M with each row turned by -i theta_j (R_i^T turns
        back), far less work than turning each x_i."""
        if self.variant != "rotation":
            return M.expand(self.n_blocks, -1, -1)
        cos, sin = rope_cos_sin(self.r_hat, self.n_blocks, dtype=M.dtype, device=M.device)
        return apply_rotary(M, cos[:, None, :], -sin[:, None, :])

    def update(self, x, M=None):  # f_decomp(M f_comp(x)); decoupling, rotation: block i times M R_i
        f_comp, f_decomp = VARIANTS[self.variant]
        M = self.M if M is None else M
        if f_comp is split_blocks:  # diag(M R_1, ..., M R_n) x~, with a backward that keeps less
            y = BlockProduct.apply(x, M, self)  # (..., min(d, n r^))
        else:
            y = f_comp(x, self.r_hat) @ M.T  # (..., r^)
        return f_decomp(y, self.out_features)

    def get_delta_weight(self):
        """dW (d, k), in float32 at least (differentiable; detach for analysis). The update is
        linear: dW^T is update() of the k unit vectors, taken 1024 at a time (not k x k at once)."""
        dtype, k = torch.promote_types(self.M.dtype, torch.float32), self.in_features
        units = lambda i: F.one_hot(torch.arange(i, min(i + 1024, k), device=self.M.device), k).to(dtype)
        return torch.cat([self.update(units(i), self.M.to(dtype)) for i in range(0, k, 1024)]).T

    @torch.no_grad()
    def reset_adapter(self):
        self.M.zero_()

    def merge_and_reinit(self):
        """ReMoRA (Sec. 5.3): the sharing family moves to its next grouping: merges add new directions."""
        super().merge_and_reinit()
        if self.variant in REMORA_CYCLE:
            self.variant = REMORA_CYCLE[(REMORA_CYCLE.index(self.variant) + 1) % len(REMORA_CYCLE)]

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, r_hat={self.r_hat}, {self.variant}"

    @property
    def settings(self):  # saved state: the grouping changes under ReMoRA, so it travels with M
        return [list(VARIANTS).index(self.variant)]

    @settings.setter
    def settings(self, values):
        self.variant = self.valid(values)

    def valid(self, values):  # a variant whose r^ is this layer's
        variant = list(VARIANTS)[int(values[0])] if len(values) == 1 and values[0] in range(len(VARIANTS)) else None
        if variant is None or mora_rank(self.in_features, self.out_features, self.r, variant) != self.r_hat:
            raise ValueError(f"MoRA variant index {values} does not fit this layer (r^ = {self.r_hat})")
        return variant


# -----------------------------------------------------------------------------
# Speed, not maths (a first reading can skip): two autograd Functions that compute what the plain
# operations above compute, keep less for the backward pass, and give autograd's gradients to the
# last bit, written out in plain operations (so reverse mode differentiates them again, and
# torch.compile traces them). Each is checked against plain autograd, gradcheck and gradgradcheck in the tests.


class Tile(torch.autograd.Function):
    """cyclic_pad as one step of autograd's graph, so that the gradients are added as autograd adds
    them, to the last bit. One wrap (x~) is written exactly: a wider tile cut to n is up to 2x x."""

    generate_vmap_rule = True  # torch.func's transforms (vmap, jacrev) take it as a plain operation

    @staticmethod
    def forward(v, n):
        if n < 2 * v.shape[-1]:  # x~: one wrap, written exactly
            return torch.cat([v, v[..., :n - v.shape[-1]]], -1)
        return v.unsqueeze(-2).expand(*v.shape[:-1], -(-n // v.shape[-1]), -1).flatten(-2)[..., :n]  # T

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.length = inputs[0].shape[-1]

    @staticmethod
    def backward(ctx, grad):
        return cyclic_pad_adjoint(grad, ctx.length), None


def cyclic_pad_adjoint(grad, length):  # cyclic_pad's gradient: each v_t's copies added up (differentiable)
    n = grad.shape[-1]
    if n <= length:  # a cut: nothing for the inputs left out
        return zero_pad(grad, length)
    if n < 2 * length:  # x~: the wrap added back onto the first inputs (a padded sum: 3x slower)
        head = grad[..., :length].clone()
        head[..., :n - length] += grad[..., length:]
        return head
    copies = -(-n // length)
    return zero_pad(grad, copies * length).unflatten(-1, (copies, length)).sum(-2)


class BlockProduct(torch.autograd.Function):
    """Decoupling and rotation: block_product(split_blocks(x), blocks(M)), whose backward keeps x and
    M alone (plain autograd keeps x~, up to 1.5x x, and rotation's blocks M R_i, k r^ numbers) and
    makes both again. Its gradients are plain autograd's to the last bit, in plain differentiable
    operations: reverse-mode second derivatives work (create_graph, jacrev), and torch.compile
    traces it whole."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, M, layer):  # (..., min(d, n r^)): the outputs past d cut here, where the backward is cheap
        y = block_product(split_blocks(x, layer.r_hat, layer.n_blocks), layer.blocks(M))
        return y.flatten(-2)[..., :layer.out_features]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:2])
        ctx.layer = inputs[2]

    @staticmethod
    def backward(ctx, grad):  # in grad's dtype, as the forward ran (under autocast: bfloat16)
        (x, M), layer = ctx.saved_tensors, ctx.layer
        grad = zero_pad(grad, layer.n_blocks * layer.r_hat).unflatten(-1, (layer.n_blocks, layer.r_hat))
        grad_x = grad_M = None  # each only if asked for: either costs as much as the forward
        if ctx.needs_input_grad[0]:  # x~'s gradient: the blocks M R_i, transposed, times grad
            grad_z = block_product(grad, layer.blocks(M).to(grad.dtype).transpose(-1, -2)).to(x.dtype)
            grad_x = cyclic_pad_adjoint(grad_z.flatten(-2), x.shape[-1])
        if ctx.needs_input_grad[1]:
            z = split_blocks(x, layer.r_hat, layer.n_blocks).to(grad.dtype)
            grad_B = torch.einsum("...no,...ni->noi", grad, z).to(M.dtype)  # summed over tokens
            grad_M = blocks_adjoint(layer, grad_B)
        return grad_x, grad_M, None


def blocks_adjoint(layer, grad_B):  # the gradient of layer.blocks(M), (n, r^, r^) -> (r^, r^)
    if layer.variant != "rotation":
        return grad_B.sum(0)  # M.expand: the blocks' gradients added up
    cos, sin = rope_cos_sin(layer.r_hat, layer.n_blocks, dtype=grad_B.dtype, device=grad_B.device)
    # blocks = M cos + rotate_half(M) (-sin), each term summed over the blocks as autograd sums it;
    # rotate_half's adjoint is -rotate_half
    return (grad_B * cos[:, None, :]).sum(0) + rotate_half((grad_B * sin[:, None, :]).sum(0))


# -----------------------------------------------------------------------------
# 2. Putting adapters into a model (names as in loralib / PEFT)

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # this file's Llama (Hugging Face: q_proj ...)
CONV1D = "; GPT-2's Conv1D holds its weight transposed: convert it to nn.Linear first (README)"


def matches(name, targets):
    """PEFT's rule: a target matches a module whose dotted name is it or ends with "." + target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def adapter_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLinear)]


def check_each(layers, check):  # every check made before any change: an error names its layer
    for name, layer in layers:
        try:
            check(name, layer)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


def apply_adapters(model, method="lora", r=8, targets=DEFAULT_TARGETS, **layer_kwargs):
    """Wrap the targeted nn.Linear layers with a LoRALinear or MoRALinear, freeze everything else,
    return the model. Targets follow PEFT (`matches`): "q" matches every layers.N.attn.q;
    "all-linear" takes every nn.Linear but the output head. A layer whose weight is tied to
    another's (a head sharing the embedding) gets its own copy, with a warning. All checks come
    before any change: on an error the model is as it was."""
    layer_cls = {"lora": LoRALinear, "mora": MoRALinear}.get(method)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if layer_cls is None:
        raise ValueError(f"unknown method {method!r}; choose 'lora' or 'mora'")
    if not targets:
        raise ValueError("no targets: name the layers to adapt, or 'all-linear'")
    all_linear, head = targets == ("all-linear",), None
    if all_linear:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else \
            next((m for n, m in model.named_modules() if n.rpartition(".")[2] in ("lm_head", "head")), None)
    matched, found, skipped = [], set(), ()
    for name, module in model.named_modules():
        if not name or name.startswith(skipped):
            continue
        if isinstance(module, (AdapterLinear, nn.MultiheadAttention)):  # MHA reads out_proj.weight itself
            skipped += (name + ".",)
        hits = {"all-linear"} if all_linear and isinstance(module, nn.Linear) and module is not head else \
            {t for t in targets if matches(name, (t,))}
        if hits and not isinstance(module, nn.Linear):
            kind = type(module).__name__
            raise ValueError(f"target {min(hits)!r} matches {name!r}, a {kind}, not an nn.Linear"
                             + (kind == "Conv1D") * CONV1D)
        matched += [(name, module)] if hits else []
        found |= hits
    missing = [t for t in targets if t not in found]
    if missing:
        conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
        raise ValueError(f"target(s) {missing} match no nn.Linear in the model" + conv1d * CONV1D)
    for name, module in matched:  # built first on the meta device: a bad argument changes nothing
        layer_cls(nn.Linear(module.in_features, module.out_features, device="meta"), r, **layer_kwargs)
    names = [(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False)]
    for name, module in matched:
        layer = layer_cls(module, r, **layer_kwargs)
        others = [n for n, i in names if i == id(module.weight) and n != f"{name}.weight"]
        if others:
            warnings.warn(f"{name}.weight is tied to {others[0]}; giving {name} its own copy, so that "
                          f"merging its adapter leaves {others[0]} unchanged", stacklevel=2)
            layer.base.weight = nn.Parameter(layer.base.weight.detach().clone(), requires_grad=False)
        _replace(model, name, layer)
    model.register_load_state_dict_pre_hook(check_states)
    model.requires_grad_(False)  # only the adapters train
    for _, layer in adapter_layers(model):
        layer.requires_grad_(True).base.requires_grad_(False)
    return model


def check_states(model, state_dict, prefix, *args):  # apply_adapters' hook: a load checked whole first
    layers = [(prefix + name, layer) for name, layer in adapter_layers(model)]
    check_each(layers, lambda name, layer: layer.check_state(state_dict, name + "."))


@contextlib.contextmanager
def disable_adapters(model):
    """Inside, every adapter layer computes W0 x alone (PEFT's disable_adapter()): the base model, for
    free. Leaving restores each layer as found, so blocks nest; merging inside is refused."""
    layers = [layer for _, layer in adapter_layers(model)]
    found = [layer.disabled for layer in layers]
    if any(layer.merged for layer in layers):
        raise ValueError("disable_adapters needs unmerged adapters (a merged one lives in its base weight)")
    try:
        for layer in layers:
            layer.disabled = True
        yield model
    finally:
        for layer, disabled in zip(layers, found):
            layer.disabled = disabled


def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def merge_and_unload(model):
    """Merge every adapter into its base layer and put the plain nn.Linear back; return the model."""
    layers = adapter_layers(model)
    unmerged = [(name, layer) for name, layer in layers if not layer.merged]
    check_each(unmerged, lambda name, layer: layer.folded())  # all or nothing
    for name, layer in layers:
        if not layer.merged:
            layer.merge()
        _replace(model, name, layer.base)
    return model


def adapter_state_dict(model):
    """Only the adapters' entries, all tensors: A and B or M, and each layer's _extra_state."""
    if any(layer.merged for _, layer in adapter_layers(model)):
        raise ValueError("adapters are saved and loaded unmerged (a merged one lives in its base weight)")
    prefixes = [f"{name}." if name else "" for name, _ in adapter_layers(model)]
    return {k: v for k, v in model.state_dict().items()
            if any(k.startswith(p) and k[len(p):].split(".")[0] not in ("base", "weight") for p in prefixes)}


def load_adapter_state_dict(model, state_dict):
    """Load what adapter_state_dict saved; a missing or unexpected key, a shape, NaN or inf: ValueError."""
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"adapter state dict mismatch: missing {missing}, unexpected {unexpected}")
    for k, v in expected.items():
        if v.shape != state_dict[k].shape or not torch.isfinite(state_dict[k]).all():
            raise ValueError(f"adapter tensor {k!r}: shape {tuple(state_dict[k].shape)}, the model's "
                             f"{tuple(v.shape)}; or not finite")
    model.load_state_dict(state_dict, strict=False)
    return model


# Adapters that travel: PEFT's folder, as stock PEFT writes LoRA and the official fork MoRA
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float8 has no isfinite


def is_targets(value):  # PEFT's target_modules, exclude_modules: a list of suffixes, or a full-match regex
    if isinstance(value, list):
        return all(isinstance(t, str) for t in value)
    with contextlib.suppress(re.error, RecursionError, TypeError):  # TypeError: not a list, not a string
        return value is None or bool(re.compile(value))
    return False


def targeted(name, targets):
    return bool(re.fullmatch(targets, name)) if isinstance(targets, str) else matches(name, targets or ())


# What an adapter_config.json may ask (MORA_SPEC 4c): the fields honoured here, metadata, PEFT's defaults of
# unused features. Any other field holding a value (not null, false or empty) may change what the weights
# mean: refused.
one_of, ANY = lambda *values: lambda v: v in values, lambda v: True
UNUSED = lambda v: v is None or v is False or v in ("", [], {})
CONFIG_FIELDS = {
    "peft_type": one_of("LORA"), "r": lambda v: type(v) is int and 0 < v < 2 ** 31, "bias": one_of("none"),
    "lora_alpha": lambda v: type(v) in (int, float) and 0 < v < math.inf,
    "lora_dropout": lambda v: type(v) in (int, float) and 0 <= v < 1, "use_rslora": one_of(True, False),
    "target_modules": is_targets, "exclude_modules": is_targets, "use_mora": one_of(True, False),
    "mora_type": lambda v: v is None or type(v) is int and v in OFFICIAL_TYPES, "mora_variant": one_of(*VARIANTS),
    "init_lora_weights": one_of(True, False, "gaussian"),  # how training began: A and B are as saved
    **dict.fromkeys(("task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                     "peft_version"), ANY),
    "megatron_core": one_of("megatron.core"), "qalora_group_size": one_of(16),
    "runtime_config": one_of({"ephemeral_gpu_offload": False}),
}


def read_adapter_folder(directory):
    """The config and weights of a PEFT folder, read whole first. A file that is not regular (a FIFO
    would block), a config that is not UTF-8 JSON or asks what CONFIG_FIELDS does not allow, weights
    that are not safetensors: one ValueError naming the file (a missing one: the system's error)."""
    paths = [os.path.join(directory, name) for name in ADAPTER_FILES]
    for path in paths:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"{path} is not a regular file")
    try:
        with open(paths[0], encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, RecursionError) as e:  # not UTF-8, or not JSON
        raise ValueError(f"{paths[0]} is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{paths[0]} holds no JSON object")
    bad = next((k for k, v in config.items() if not CONFIG_FIELDS.get(k, UNUSED)(v)), None)
    if bad is not None:
        raise ValueError(f"{paths[0]}: {bad} {config[bad]!r:.80} is not honoured here")
    from safetensors import SafetensorError  # only now: a config refused above needs no safetensors
    from safetensors.torch import load_file
    try:
        weights = load_file(paths[1])
    except (SafetensorError, OSError, ValueError) as e:  # a cut or foreign file
        raise ValueError(f"{paths[1]} is not a readable safetensors file: {e}") from None
    return config, weights


@contextlib.contextmanager
def atomic_files(paths, mode="wb", replace=True, follow_links=True):
    """Files to write, renamed to their paths in order once all are whole on disk: each file is the
    old one or the new one, never a part, and a failure before the renames leaves the old. Only a
    crash between two renames can mix them: name last the file that says what the others mean.
    replace=False: FileExistsError, never a replace. follow_links=False replaces a symbolic link
    itself, not its target. The temporaries get the umask's permissions."""
    paths = [os.path.realpath(p) if follow_links else os.path.abspath(p) for p in paths]
    folders = [p for p in paths if os.path.isdir(p)]
    if folders:  # a rename onto it would fail half-way through
        raise IsADirectoryError(f"{folders[0]} is a folder")
    temporaries = [f"{p}.{os.getpid()}.{os.urandom(4).hex()}.tmp" for p in paths]
    try:
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(open(os.open(t, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), mode))
                     for t in temporaries]
            yield files
            for f in files:
                f.flush()
                os.fsync(f.fileno())
        for temporary, path in zip(temporaries, paths):
            os.replace(temporary, path) if replace else os.link(temporary, path)
    finally:
        for temporary in temporaries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)


def save_adapter(model, directory):
    """Write the adapters to a folder PEFT reads: LoRA as stock PEFT's LoRA, MoRA as the official
    fork's (use_mora, mora_type). Truncation and decoupling have no official number: they are saved
    under this project's own key mora_variant, which the fork does not read. One setting for all."""
    layers = adapter_layers(model)
    adapter_state_dict(model)  # refuses merged adapters
    kinds = {(type(layer), layer.r, tuple(layer.settings), getattr(layer.dropout, "p", 0.0)) for _, layer in layers}
    if len(kinds) != 1:
        raise ValueError(f"save_adapter needs one kind, rank, setting and dropout for all adapters, got {len(kinds)}")
    adapters = {id(p) for _, layer in layers for p in layer.parameters()}
    others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapters]
    if others:
        warnings.warn(f"{len(others)} trainable parameters are no adapter's, {others[0]} the first: not saved",
                      stacklevel=2)
    if any(layer.reinits for _, layer in layers):
        warnings.warn("merge_and_reinit moved earlier updates into the base weights: the folder reproduces "
                      "this model on those, not on the original base", stacklevel=2)
    first, mora = layers[0][1], isinstance(layers[0][1], MoRALinear)
    config = {"peft_type": "LORA", "r": first.r, "lora_alpha": getattr(first, "alpha", first.r),
              "lora_dropout": getattr(first.dropout, "p", 0.0), "target_modules": [n for n, _ in layers],
              "bias": "none", "use_rslora": getattr(first, "use_rslora", False)}
    if mora:
        number = {v: n for n, v in OFFICIAL_TYPES.items()}.get(first.variant)
        config.update(use_mora=True, mora_type=number, **({} if number else {"mora_variant": first.variant}))
    tensors = {f"base_model.model.{n}.lora_{ab}.weight":  # the fork saves M twice, as lora_A and lora_B
               getattr(layer, "M" if mora else ab).detach().clone(memory_format=torch.contiguous_format)
               for n, layer in layers for ab in "AB"}
    from safetensors.torch import save  # only now: what is refused above needs no safetensors
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, n) for n in ADAPTER_FILES[::-1]]  # the config, which gives them meaning, last
    with atomic_files(paths, follow_links=False) as (st_file, json_file):  # a link there is replaced
        st_file.write(save(tensors))
        json_file.write(json.dumps(config, indent=2).encode())


def load_adapter(model, directory):
    """Put the adapters of a PEFT folder, stock LoRA (any alpha, rsLoRA) or official MoRA (types 1,
    2, 3, 4, 6), on the modules its keys name, load their weights and return the model: its outputs
    are those of the model saved. What would load wrongly without a word is a ValueError, before any
    change: a config field not honoured here, a key naming no target, a target without weights."""
    if adapter_layers(model):  # their weights are no part of the folder: the load would fail half-way
        raise ValueError("load_adapter needs a model without adapters (merge_and_unload them first)")
    config, weights = read_adapter_folder(directory)
    modules, names = dict(model.named_modules()), {}
    targets = [n for n, m in modules.items() if isinstance(m, nn.Linear) and targeted(n, config.get("target_modules"))
               and not targeted(n, config.get("exclude_modules"))]
    for k, tensor in weights.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", k)
        if not match or match[1] not in targets:
            raise ValueError(f"{directory}: the key {k} names no nn.Linear of the model in target_modules")
        names.setdefault(match[1], {})[match[2]] = tensor
    idle = [n for n in targets if n not in names]
    if idle:
        raise ValueError(f"{directory}: the target module {idle[0]} gets no weights")
    r, variant = config.get("r", 8), config.get("mora_variant", config.get("mora_type", 1))
    mora = config.get("use_mora") or "mora_variant" in config
    if "mora_variant" in config and (config.get("use_mora") is not True or config.get("mora_type") is not None):
        raise ValueError(f"{directory}: mora_variant goes with use_mora true and no mora_type, as save_adapter writes")
    if mora and variant is None:
        raise ValueError(f"{directory}: use_mora without a mora_type")
    for n, ab in names.items():
        k, d = modules[n].in_features, modules[n].out_features
        want = dict.fromkeys("AB", (mora_rank(k, d, r, variant),) * 2) if mora else {"A": (r, k), "B": (d, r)}
        for x, t in ab.items():
            if tuple(t.shape) != want[x] or t.dtype not in FLOATS or not torch.isfinite(t).all():
                raise ValueError(f"{directory}: {n}.lora_{x}, {t.dtype} of shape {tuple(t.shape)}, where the "
                                 f"layer wants {want[x]} finite floating-point numbers")
        if not mora and len(ab) == 1:
            raise ValueError(f"{directory}: {n}.lora_{'B' if 'A' in ab else 'A'} is missing (LoRA needs both)")
        if mora and len(ab) == 2 and not torch.equal(ab["A"], ab["B"]):
            raise ValueError(f"{directory}: {n}.lora_B differs from lora_A (the fork saves M twice)")
    settings = {"variant": variant} if mora else {"alpha": config.get("lora_alpha", 8),
                                                  "use_rslora": config.get("use_rslora", False)}
    apply_adapters(model, "mora" if mora else "lora", r=r, targets=list(names),
                   dropout=config.get("lora_dropout", 0), **settings)
    state = {f"{n}." + ("M" if mora else x): t for n, ab in names.items() for x, t in ab.items()}
    model.load_state_dict(state, strict=False)  # every tensor checked above
    return model


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
            raise ValueError(f"dim {self.dim} does not split into {self.n_heads} heads of even size (rotary pairs)")


# ReLoRA's and the paper's LLaMA sizes (Sec. 5.3), 32k vocabulary; "tiny" for tests. LlamaConfig(**PRESETS["60m"])
PRESETS = {
    "tiny": dict(dim=64, hidden_dim=176, n_heads=4, n_layers=2),
    "9m": dict(dim=128, hidden_dim=352, n_heads=4, n_layers=4),
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
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim, bias=False) for _ in range(4))

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate, self.up = (nn.Linear(cfg.dim, cfg.hidden_dim, bias=False) for _ in range(2))
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
        self.apply(lambda m: nn.init.normal_(m.weight, std=0.02) if isinstance(m, (nn.Linear, nn.Embedding)) else None)
        for name, p in self.named_parameters():
            if name.endswith((".o.weight", ".down.weight")):  # scaled residual projections (GPT-2)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        h = self.embed(idx)  # (B, T, C)
        cos, sin = rope_cos_sin(self.cfg.dim // self.cfg.n_heads, T, self.cfg.rope_theta, h.dtype, h.device)
        for layer in self.layers:
            h = layer(h, cos, sin)
        logits = self.head(self.norm(h))  # (B, T, V)
        loss = None
        if targets is not None:  # positions marked -100 are ignored
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        """Append max_new_tokens greedily chosen tokens to idx (B, T)."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.cfg.max_seq_len:])
            idx = torch.cat([idx, logits[:, -1, :].argmax(-1, keepdim=True)], dim=1)
        return idx
