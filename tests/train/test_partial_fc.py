"""Partial FC against an independent margin-softmax cross-entropy, on 1 and 2 (gloo) processes."""

from __future__ import annotations

import math

import pytest
import torch

from tests.train.dist_util import spawn
from unicom_cli.train.partial_fc import PartialFC

B, D, C = 8, 6, 11


def reference_loss_and_grads(emb, weight, labels, s, m1, m2, m3, threshold=0.0):
    """The reference's margin softmax CE in float64, written from its definition.

    Forward: cos = normalised emb · normalised centre, clamped to [-1, 1]; non-target cosines
    above ``threshold`` (when > 0) become 0; the target becomes cos(m1·acos(cos) + m2) − m3;
    logits = s × that; mean cross-entropy. Backward (straight-through margin): dL/dcos_ij =
    s·(softmax_ij − onehot_ij)/B for kept entries, 0 for filtered ones; chained to the inputs
    through the normalisation by autograd.
    """
    e = emb.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    cos = (e / e.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    with torch.no_grad():
        value = cos.clamp(-1, 1).clone()
        onehot = torch.zeros_like(value)
        onehot[torch.arange(len(labels)), labels] = 1.0
        kept = torch.ones_like(value)
        if threshold > 0:
            kept[(value > threshold) & (onehot == 0)] = 0.0
        value = value * kept
        rows = torch.arange(len(labels))
        value[rows, labels] = torch.cos(m1 * torch.acos(value[rows, labels]) + m2) - m3
        logits = s * value
        loss = (torch.logsumexp(logits, 1) - logits[rows, labels]).mean()
        grad_cos = s * (torch.softmax(logits, 1) - onehot) * kept / len(labels)
        grad_cos = grad_cos * ((cos > -1) & (cos < 1))  # the clamp
    cos.backward(grad_cos)
    return loss.item(), e.grad, w.grad


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, generator=gen, dtype=torch.float64).float()
    weight = torch.randn(C, D, generator=gen) * 0.5
    labels = torch.tensor([0, 3, 3, 7, 10, 5, 1, 7])
    return emb, weight, labels


def _run(pfc, emb, weight, labels, step=0):
    with torch.no_grad():
        pfc.weight.copy_(weight)
    x = emb.clone().requires_grad_(True)
    loss = pfc(x, labels, step=step)
    loss.backward()
    return loss.item(), x.grad, pfc.weight.grad


@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.25, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 0.35),
                                      (1.0, 0.3, 0.2), (0.9, 0.4, 0.1)])
def test_one_process_equals_the_straight_through_reference(m1, m2, m3):
    emb, weight, labels = _data()
    loss, x_grad, w_grad = _run(PartialFC(D, C, s=16.0, m1=m1, m2=m2, m3=m3, rank=0, world=1),
                                emb, weight, labels)
    ref_loss, ref_x, ref_w = reference_loss_and_grads(emb, weight, labels, 16.0, m1, m2, m3)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert loss > 0.1
    torch.testing.assert_close(x_grad.double(), ref_x, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_grad.double(), ref_w, rtol=1e-4, atol=1e-6)


def test_arcface_gradient_is_not_the_derivative_through_acos():
    """With the recipes' s = 32, m2 = 0.25 the two gradients differ by several percent: the
    test above can tell the reference's straight-through margin from the exact derivative."""
    emb, weight, labels = _data()
    _, x_grad, _ = _run(PartialFC(D, C, s=32.0, m2=0.25, rank=0, world=1), emb, weight, labels)
    e = emb.double().requires_grad_(True)
    w = weight.double()
    cos = (e / e.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    rows = torch.arange(B)
    target = torch.cos(torch.acos(cos[rows, labels]) + 0.25)
    logits = 32.0 * cos.index_put((rows, labels), target)
    (torch.logsumexp(logits, 1) - logits[rows, labels]).mean().backward()
    relative = (x_grad.double() - e.grad).norm() / e.grad.norm()
    assert relative > 0.02


@pytest.mark.parametrize("threshold", [0.2, 0.45])
def test_margin_filter_zeroes_negatives_above_the_threshold(threshold):
    emb, weight, labels = _data(3)
    weight[2] = emb[1] + 0.1 * weight[2]  # a negative very close to row 1's embedding
    pfc = PartialFC(D, C, s=32.0, m2=0.25, margin_filter=threshold, rank=0, world=1)
    loss, x_grad, w_grad = _run(pfc, emb, weight, labels)
    ref_loss, ref_x, ref_w = reference_loss_and_grads(emb, weight, labels, 32.0, 1.0, 0.25, 0.0,
                                                      threshold)
    unfiltered, _, _ = reference_loss_and_grads(emb, weight, labels, 32.0, 1.0, 0.25, 0.0)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert abs(ref_loss - unfiltered) > 1e-3  # the filter did something on this data
    torch.testing.assert_close(x_grad.double(), ref_x, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_grad.double(), ref_w, rtol=1e-4, atol=1e-6)


def test_margin_filter_zero_changes_nothing():
    emb, weight, labels = _data(3)
    off = _run(PartialFC(D, C, s=32.0, m2=0.25, rank=0, world=1), emb, weight, labels)
    zero = _run(PartialFC(D, C, s=32.0, m2=0.25, margin_filter=0.0, rank=0, world=1), emb,
                weight, labels)
    assert off[0] == zero[0] and torch.equal(off[1], zero[1]) and torch.equal(off[2], zero[2])


def _draw(seed: int, step: int, num_feat: int | None) -> torch.Tensor:
    """The documented draw: generator seed·1_000_003 + step, the dimensions first, then classes."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    if num_feat is not None:
        torch.randperm(D, generator=gen)
    return torch.rand(C, generator=gen)


@pytest.mark.parametrize("rate,step", [(0.4, 0), (0.4, 3), (0.75, 1), (0.1, 2)])
def test_sampling_keeps_exactly_int_rate_times_classes_with_every_positive(rate, step):
    emb, weight, labels = _data(1)
    pfc = PartialFC(D, C, s=32.0, m2=0.25, sample_rate=rate, seed=5, rank=0, world=1)
    _run(pfc, emb, weight, labels, step=step)
    selected = pfc.last_selected.tolist()
    positives = set(labels.tolist())
    count = int(rate * C)
    if len(positives) <= count:
        assert len(selected) == count
        # The negatives kept are the ones with the highest draws.
        draw = _draw(5, step, None)
        negatives = sorted(set(range(C)) - positives, key=lambda c: -draw[c].item())
        assert set(selected) == positives | set(negatives[:count - len(positives)])
    else:  # more positives than the count: only the positives (rate 0.1: int(1.1) = 1 < 6)
        assert set(selected) == positives
    assert positives <= set(selected)


def test_sampling_and_num_feat_equal_the_reference_on_the_selection():
    emb, weight, labels = _data(1)
    pfc = PartialFC(D, C, s=32.0, m2=0.25, sample_rate=0.7, num_feat=4, seed=5, rank=0, world=1)
    loss, x_grad, w_grad = _run(pfc, emb, weight, labels, step=3)
    selected = pfc.last_selected
    assert len(selected) == int(0.7 * C) and set(labels.tolist()) <= set(selected.tolist())
    gen = torch.Generator().manual_seed(5 * 1_000_003 + 3)
    dims = torch.randperm(D, generator=gen)[:4]
    remap = {c: i for i, c in enumerate(selected.tolist())}
    ref_loss, ref_x, ref_w = reference_loss_and_grads(
        emb[:, dims], weight[selected][:, dims], torch.tensor([remap[int(y)] for y in labels]),
        32.0, 1.0, 0.25, 0.0)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    expected_x = torch.zeros(B, D, dtype=torch.float64)
    expected_x[:, dims] = ref_x
    torch.testing.assert_close(x_grad.double(), expected_x, rtol=1e-4, atol=1e-6)
    expected_w = torch.zeros(C, D, dtype=torch.float64)
    expected_w[selected[:, None], dims] = ref_w
    torch.testing.assert_close(w_grad.double(), expected_w, rtol=1e-4, atol=1e-6)


def test_margin_lowers_target_logit_and_loss_is_finite_at_extremes():
    # Embeddings exactly equal to a centre (cos = 1) and opposite (cos = -1): no NaN anywhere.
    weight = torch.eye(3, 4)
    emb = torch.stack([weight[0], -weight[1]]).requires_grad_(True)
    pfc = PartialFC(4, 3, s=32.0, m2=0.5, rank=0, world=1)
    with torch.no_grad():
        pfc.weight.copy_(weight)
    loss = pfc(emb, torch.tensor([0, 1]))
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(emb.grad).all() and torch.isfinite(pfc.weight.grad).all()


CASES = [(1.0, None), (0.9, 4)]


def _two_process_worker(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    for case, (sample_rate, num_feat) in enumerate(CASES):
        emb, weight, labels = _data(2)
        torch.manual_seed(0)
        backbone = DDP(torch.nn.Linear(D, D))
        pfc = PartialFC(D, C, s=32.0, m2=0.3, sample_rate=sample_rate, num_feat=num_feat, seed=9)
        lo = pfc.class_start
        with torch.no_grad():
            pfc.weight.copy_(weight[lo:lo + pfc.local_classes])
        rows = slice(rank * B // world, (rank + 1) * B // world)
        x = emb[rows].clone().requires_grad_(True)
        loss = pfc(backbone(x), labels[rows], step=4)
        loss.backward()
        torch.save({"loss": loss.detach(), "x_grad": x.grad, "w_grad": pfc.weight.grad, "start": lo,
                    "selected": pfc.last_selected, "lin_grad": backbone.module.weight.grad},
                   f"{out}/case{case}-rank{rank}.pt")


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    """Sample rate 1.0: the same global batch gives the same loss, centre and backbone gradients
    on 2 processes as on 1. Below 1.0 each rank keeps int(rate × its classes) centres (5 of 6 and
    4 of 5 here, 9 of 11 on one process), so the runs differ; each equals the reference loss over
    the union of the ranks' selections."""
    spawn(_two_process_worker, 2, str(tmp_path))
    for case, (sample_rate, num_feat) in enumerate(CASES):
        emb, weight, labels = _data(2)
        parts = [torch.load(tmp_path / f"case{case}-rank{r}.pt") for r in range(2)]
        assert parts[1]["start"] == 6  # contiguous slices 0..5 and 6..10
        torch.manual_seed(0)
        backbone = torch.nn.Linear(D, D)
        if sample_rate < 1:
            for part, (lo, hi) in zip(parts, ((0, 6), (6, 11))):
                chosen = set(part["selected"].tolist())
                assert len(chosen) == int(sample_rate * (hi - lo))
                assert {y for y in labels.tolist() if lo <= y < hi} <= chosen
            selected = torch.cat([p["selected"] for p in parts])
            gen = torch.Generator().manual_seed(9 * 1_000_003 + 4)
            dims = torch.randperm(D, generator=gen)[:num_feat]
            remap = {c: i for i, c in enumerate(selected.tolist())}
            with torch.no_grad():
                emb = backbone(emb)
            ref_loss, _, ref_w = reference_loss_and_grads(
                emb[:, dims], weight[selected][:, dims],
                torch.tensor([remap[int(y)] for y in labels]), 32.0, 1.0, 0.3, 0.0)
            for part in parts:
                assert part["loss"].item() == pytest.approx(ref_loss, rel=1e-5)
            w_grad = torch.cat([p["w_grad"] for p in parts])
            torch.testing.assert_close(w_grad[selected][:, dims].double(), ref_w, rtol=1e-4,
                                       atol=1e-6)
            continue
        pfc = PartialFC(D, C, s=32.0, m2=0.3, sample_rate=sample_rate, num_feat=num_feat, seed=9,
                        rank=0, world=1)
        with torch.no_grad():
            pfc.weight.copy_(weight)
        x = emb.clone().requires_grad_(True)
        loss = pfc(backbone(x), labels, step=4)
        loss.backward()
        for part in parts:
            assert part["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
            torch.testing.assert_close(part["lin_grad"], backbone.weight.grad, rtol=1e-4, atol=1e-6)
        # Embedding gradients come back × world so that DDP's averaging gives the global gradient.
        torch.testing.assert_close(torch.cat([p["x_grad"] for p in parts]) / 2, x.grad, rtol=1e-4,
                                   atol=1e-6)
        torch.testing.assert_close(torch.cat([p["w_grad"] for p in parts]), pfc.weight.grad,
                                   rtol=1e-4, atol=1e-6)
        assert torch.cat([p["selected"] for p in parts]).tolist() == pfc.last_selected.tolist()


def test_centre_init_does_not_depend_on_world_size():
    full = PartialFC(D, C, seed=3, rank=0, world=1).weight
    halves = [PartialFC(D, C, seed=3, rank=r, world=2).weight for r in (0, 1)]
    assert torch.equal(torch.cat(halves), full)
    assert full.std().item() == pytest.approx(0.01, rel=0.3)
