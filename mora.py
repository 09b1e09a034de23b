"""
MoRA and LoRA next to a small LLaMA-like transformer, in one file.

Read it top to bottom:
  1. the model: config, RMSNorm, rotary helpers, attention, SwiGLU MLP, block, model;
  2. what the adapters share: a frozen base layer, merging, the state they save;
  3. LoRA (Hu et al., 2021): dW = (alpha / r) B A, two thin matrices;
  4. MoRA (Jiang et al., 2024, arXiv 2405.12130): dW x = f_decomp(M f_comp(x)), one square
     matrix M of size r^ x r^ with the same parameter count, and a rank that can reach
     min(d, k) where LoRA's stays at r or below;
  5. helpers to put adapters into a model, merge them and save them.

Notation (as in the paper): a frozen nn.Linear W0 of shape (d, k), d = out_features,
k = in_features; an adapter adds dW x to W0 x.
"""

import inspect
import math
import operator
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. The model


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


def rope_cos_sin(dim, n_positions, theta=10000.0, dtype=None):
    """Rotary tables (n_positions, dim): position i turns pair (j, j + dim/2) by i * theta^(-2j/dim).

    Serves both the attention's positions and MoRA's rotation variant, whose "positions"
    are block indices (Eq. 9).
    """
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float64), freqs)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half convention: same angle for j and j + dim/2
    dtype = dtype or torch.get_default_dtype()
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x, cos, sin):
    """z_j = x_j cos - x_(j+h) sin,  z_(j+h) = x_(j+h) cos + x_j sin  (h = half the last dim)."""
    return x * cos + rotate_half(x) * sin


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
        cos, sin = rope_cos_sin(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
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
        cos, sin = self.cos[:T], self.sin[:T]
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


# -----------------------------------------------------------------------------
# 2. Adapters: what LoRA and MoRA share


def _check_rank(r):
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"rank r must be a positive integer, got {r!r}")


_warned_shapes = set()


class AdapterLinear(nn.Module):
    """Wraps a frozen nn.Linear W0 and adds a trained update: y = W0 x + b + dW x.

    merge() folds dW into W0 (then forward uses W0 alone), unmerge() takes it out again; the
    `merged` flag makes a second merge a no-op and travels in the state dict. Merge math runs
    in float32 at least. Subclasses define the update: add_delta_, get_delta_weight, reset_adapter.
    """

    def __init__(self, base, r, dropout):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        _check_rank(r)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.base = base
        base.requires_grad_(False)
        self.r = r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.dense = False  # set by subclasses once they know their size, see forward

    def _check_size(self, n_params):
        """An adapter with more numbers than the full d x k update gains nothing over it: say so
        (once per shape), and compute its update through the dense dW, which is then cheaper."""
        d, k = self.out_features, self.in_features
        self.dense = n_params > d * k
        if self.dense and (type(self), d, k, n_params) not in _warned_shapes:
            _warned_shapes.add((type(self), d, k, n_params))
            warnings.warn(f"{type(self).__name__} with r={self.r} on a {k}->{d} layer has {n_params} "
                          f"parameters, more than the full {d}x{k} matrix ({d * k}); a smaller r does as much", stacklevel=3)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        if self.merged:
            return self.base(x)
        # Accumulate into W0 x in place, saving a full-size temporary: nn.Linear keeps its input,
        # not its output, for the backward pass. On rows of x, the base's output is a tensor of its
        # own rather than a view of one (an in-place update of a view would make autograd copy the
        # whole gradient in the backward pass). A forward hook on `base` sees W0 x + b only.
        rows = x.reshape(-1, self.in_features)
        out, rows = self.base(rows), self.dropout(rows)
        if self.dense:  # exact, and cheaper when the factored form is larger than dW itself
            out += rows @ self.get_delta_weight().to(rows.dtype).T
        else:
            self.add_delta_(out, rows)
        return out.view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def _fold(self, sign):
        w, delta = self.base.weight, self.get_delta_weight()  # float32 at least
        w.copy_(w.to(delta.dtype) + sign * delta.to(w.device))

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

    def get_extra_state(self):  # so that a saved merged model is not merged a second time on load
        return {"merged": self.merged}

    def set_extra_state(self, state):
        self.merged = bool(state["merged"])


# -----------------------------------------------------------------------------
# 3. LoRA: dW = (alpha / r) B A


class LoRALinear(AdapterLinear):
    """LoRA: A (r, k) Kaiming-uniform, B (d, r) zeros, so dW = 0 at the start.

    alpha defaults to r (scaling 1). Trainable parameters: r (d + k).
    """

    def __init__(self, base, r, alpha=None, dropout=0.0):
        super().__init__(base, r, dropout)
        self.alpha = r if alpha is None else alpha
        self.scaling = self.alpha / r
        w = base.weight
        self.A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.empty(self.out_features, r, device=w.device, dtype=w.dtype))
        self.reset_adapter()
        self._check_size(r * (self.in_features + self.out_features))

    @torch.no_grad()
    def reset_adapter(self):
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        nn.init.zeros_(self.B)

    def add_delta_(self, out, x):  # out (N, d) += dW x for x (N, k)
        out += (x @ self.A.T * self.scaling) @ self.B.T  # scale the thin (N, r) tensor, not (N, d)

    def get_delta_weight(self):
        """The explicit (d, k) update, in float32 at least (differentiable; detach for analysis)."""
        dtype = torch.promote_types(self.A.dtype, torch.float32)
        return self.B.to(dtype) @ self.A.to(dtype) * self.scaling

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"


# -----------------------------------------------------------------------------
# 4. MoRA: dW x = f_decomp(M f_comp(x)), M square (r^ x r^), zero-initialised, no scaling

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


# Building blocks (Sec. 4). Compressions map the k inputs to r^ values; decompressions add r^
# values into the d outputs, in place. Each has a 0/1 matrix form, used for merging (in MoRALinear).
# The decompressions spread y to a full-size tensor and add it to the whole of out: adding through
# views of out would save that temporary, but autograd then copies out's whole gradient twice in
# the backward pass (CopySlices), which costs more.


def cyclic_pad(x, length):
    """x~_t = x_(t mod k) for t < length: padding reuses the first inputs (not zeros)."""
    copies = -(-length // x.shape[-1])
    if copies > 1:
        x = x.repeat(*(1,) * (x.dim() - 1), copies)
    return x[..., :length]


def chunk_sum(x, r_hat):
    """CS: cut x~ into ceil(k / r^) chunks of length r^ and add them up."""
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


def tile_add_(out, y):
    """T: out_i += y_(i mod len(y)); with len(y) >= d this keeps the first d values."""
    d, n = out.shape[-1], y.shape[-1]
    if n < d:
        y = y.tile(-(-d // n))
    out.add_(y[..., :d])


def interleave_add_(out, y):
    """RI: out_i += y_g(i), g(i) the group of output i when the d outputs form r^ contiguous groups."""
    (n_big, big), (n_small, small) = _group_sizes(out.shape[-1], y.shape[-1])
    out.add_(torch.cat([y[..., :n_big].repeat_interleave(big, -1), y[..., n_big:].repeat_interleave(small, -1)], -1))


def group_index(n, r_hat):
    """g(t) for t < n: the group of item t (as in _group_sizes), as a tensor of indices."""
    (n_big, big), (n_small, small) = _group_sizes(n, r_hat)
    return torch.repeat_interleave(torch.arange(r_hat), torch.tensor([big] * n_big + [small] * n_small))


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
        if self.variant == "rotation":  # Eq. 9: block i is turned by angles i * theta_j
            cos, sin = rope_cos_sin(self.r_hat, self.n_blocks, dtype=torch.promote_types(w.dtype, torch.float32))
            self.register_buffer("cos", cos.to(w.device), persistent=False)
            self.register_buffer("sin", sin.to(w.device), persistent=False)
        self._check_size(self.r_hat ** 2)

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

    @staticmethod
    def rotated_blocks(M, cos, sin):
        """M_i = M R_i for each block i (Eq. 9), shape (n_blocks, r^, r^).

        Rotating the small matrix instead of the large activations gives the same product for
        less work: M R_i = M cos_i + M' sin_i with M' = [M[:, h:], -M[:, :h]], that is, each
        row of M turned by -phi_i: apply_rotary with -sin.
        """
        cos, sin = cos.to(M), sin.to(M)  # M's dtype and device
        return apply_rotary(M, cos[:, None, :], -sin[:, None, :])

    def add_delta_(self, out, x):  # out (N, d) += dW x for x (N, k)
        v, r_hat, M = self.variant, self.r_hat, self.M
        if v == "truncation":  # keep the first r^ inputs, fill the first r^ outputs
            n_in, n_out = min(x.shape[-1], r_hat), min(out.shape[-1], r_hat)
            out[:, :n_out].add_(x[:, :n_in] @ M[:n_out, :n_in].T)
        elif v in SHARING_GROUPINGS:  # Eq. 6: inputs and outputs share rows / columns of M
            comp, decomp = SHARING_GROUPINGS[v]
            c = chunk_sum(x, r_hat) if comp == "CS" else group_sum(x, r_hat)  # (N, r^)
            y = c @ M.T
            if decomp == "T":
                tile_add_(out, y)
            else:
                interleave_add_(out, y)
        else:  # decoupling / rotation: every block of x~ gets its own M_i, outputs concatenated
            x = cyclic_pad(x, self.n_blocks * r_hat)  # (N, n_blocks r^)
            if v == "decoupling":  # M_i = M: one matmul over all the blocks
                y = (x.unflatten(-1, (self.n_blocks, r_hat)) @ M.T).flatten(-2)
            else:  # block by block on views of x, so that no copy of the activations is made or kept
                blocks = zip(x.split(r_hat, dim=-1), self.rotated_blocks(M, self.cos, self.sin))
                y = torch.cat([x_i @ M_i.T for x_i, M_i in blocks], dim=-1)
            tile_add_(out, y)  # keep the first d, or tile when shorter than d

    def get_delta_weight(self):
        """The explicit (d, k) update, so that forward(x) - W0 x == dW x; in float32 at least
        (differentiable; detach for analysis)."""
        dtype = torch.promote_types(self.M.dtype, torch.float32)
        M, r_hat, k, d = self.M.to(dtype), self.r_hat, self.in_features, self.out_features
        dev = M.device
        v = self.variant
        if v == "truncation":
            dw = torch.zeros(d, k, dtype=dtype, device=dev)
            dw[:r_hat, :r_hat] = M[:d, :k]
            return dw
        if v in SHARING_GROUPINGS:  # dW = D M C with fixed 0/1 matrices C (r^, k) and D (d, r^)
            comp, decomp = SHARING_GROUPINGS[v]
            C = torch.zeros(r_hat, k, dtype=dtype, device=dev)
            if comp == "CS":  # C[t mod r^, t mod k] += 1 over the padded length
                t = torch.arange(-(-k // r_hat) * r_hat, device=dev)
                C.index_put_((t % r_hat, t % k), torch.ones(len(t), dtype=dtype, device=dev), accumulate=True)
            else:  # GS: C[g(t), t] = 1
                C[group_index(k, r_hat).to(dev), torch.arange(k, device=dev)] = 1
            # D has a single 1 per row, at column i mod r^ (T) or g(i) (RI): D @ X picks rows of X
            i = torch.arange(d, device=dev)
            return (M @ C)[i % r_hat if decomp == "T" else group_index(d, r_hat).to(dev)]
        # Decoupling / rotation: block i of the (n_blocks r^, k) matrix holds M_i on the diagonal;
        # its columns past k (the cyclic padding) are added onto the first columns.
        if v == "rotation":  # tables rebuilt in float32 even if the layer's are bfloat16
            blocks = self.rotated_blocks(M, *rope_cos_sin(r_hat, self.n_blocks, dtype=dtype))
        else:
            blocks = M.expand(self.n_blocks, -1, -1)
        dw = torch.zeros(self.n_blocks * r_hat, k, dtype=dtype, device=dev)
        for i, block in enumerate(blocks):
            rows = slice(i * r_hat, (i + 1) * r_hat)
            dw[rows].index_add_(1, torch.arange(i * r_hat, (i + 1) * r_hat, device=dev) % k, block)
        return dw[torch.arange(d, device=dev) % dw.shape[0]]  # first d rows, tiled when fewer

    def get_extra_state(self):  # the grouping changes under ReMoRA, so it travels with M
        return {**super().get_extra_state(), "variant": self.variant}

    def set_extra_state(self, state):
        variant = resolve_variant(state["variant"])
        if variant != self.variant and not (variant in SHARING_GROUPINGS and self.variant in SHARING_GROUPINGS):
            raise ValueError(f"cannot load MoRA variant {variant!r} into a {self.variant!r} layer")
        super().set_extra_state(state)
        self.variant = variant

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, r_hat={self.r_hat}, variant={self.variant!r}"


# -----------------------------------------------------------------------------
# 5. Model-level helpers (names as in loralib / PEFT)

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def mark_only_adapters_as_trainable(model):
    for p in model.parameters():
        p.requires_grad = False
    for _, layer in adapter_layers(model):
        for p in layer.parameters(recurse=False):
            p.requires_grad = True
    return model


def apply_adapters(model, method="lora", r=8, targets=DEFAULT_TARGETS, **layer_kwargs):
    """Wrap every nn.Linear whose attribute name (or full dotted name) is in `targets` with a
    LoRALinear or MoRALinear, freeze everything else, and return the model (changed in place).
    All checks come before any change: on an error the model is left as it was."""
    layer_cls = {"lora": LoRALinear, "mora": MoRALinear}.get(method)
    if layer_cls is None:
        raise ValueError(f"unknown method {method!r}; choose 'lora' or 'mora'")
    if isinstance(targets, str):
        targets = (targets,)
    _check_rank(r)
    matches, found = [], set()
    for parent_name, parent in model.named_modules():
        if isinstance(parent, AdapterLinear):
            continue
        for child_name, child in parent.named_children():
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            hits = {child_name, full_name} & set(targets)
            if not hits:
                continue
            if not isinstance(child, nn.Linear):
                raise ValueError(f"target {sorted(hits)[0]!r} matches {full_name!r}, a {type(child).__name__}, not an nn.Linear")
            matches.append((parent, child_name, child))
            found |= hits
    missing = [t for t in targets if t not in found]
    if missing:
        raise ValueError(f"target(s) {missing} match no nn.Linear in the model")
    new_layers = [(parent, name, layer_cls(child, r, **layer_kwargs)) for parent, name, child in matches]
    for parent, name, layer in new_layers:
        setattr(parent, name, layer)
    return mark_only_adapters_as_trainable(model)


def adapter_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLinear)]


def merge_and_unload(model):
    """Merge every adapter into its base layer and put the plain nn.Linear back (in place);
    returns the model (the base layer itself when given a single adapter layer)."""
    if isinstance(model, AdapterLinear):
        return merge_and_unload(nn.Sequential(model))[0]
    for name, layer in adapter_layers(model):
        if not layer.merged:
            layer.merge()
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.base)
    return model


def _refuse_merged(model, what):
    merged = [name for name, layer in adapter_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"{what} needs unmerged adapters (a merged one lives in its base weight); unmerge {merged[0]!r} first")


def adapter_state_dict(model):
    """Only the adapters' entries (A, B / M, their flags, MoRA's variant), not the frozen model."""
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
