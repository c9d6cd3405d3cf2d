"""Partial FC against an independent margin-softmax cross-entropy, on 1 and 2 (gloo) processes."""

from __future__ import annotations

import math

import pytest
import torch

from tests.train.dist_util import spawn
from unicom_cli.train.partial_fc import PartialFC

B, D, C = 8, 6, 11


def plain_margin_ce(emb, weight, labels, s, m1, m2, m3):
    """Textbook margin softmax CE, one row at a time (no sharding, no tricks)."""
    losses = []
    for i in range(emb.shape[0]):
        e = emb[i] / emb[i].norm()
        row = []
        for c in range(weight.shape[0]):
            w = weight[c] / weight[c].norm()
            cos = (e * w).sum()
            if c == labels[i]:
                theta = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
                cos = torch.cos(m1 * theta + m2) - m3
            row.append(s * cos)
        row = torch.stack(row)
        losses.append(torch.logsumexp(row, 0) - row[labels[i]])
    return torch.stack(losses).mean()


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, generator=gen, dtype=torch.float64).float()
    weight = torch.randn(C, D, generator=gen) * 0.5
    labels = torch.tensor([0, 3, 3, 7, 10, 5, 1, 7])
    return emb, weight, labels


@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.3, 0.0), (1.0, 0.0, 0.35), (1.0, 0.3, 0.2), (0.9, 0.4, 0.1)])
def test_one_process_equals_plain_margin_ce(m1, m2, m3):
    emb, weight, labels = _data()
    pfc = PartialFC(D, C, s=16.0, m1=m1, m2=m2, m3=m3, rank=0, world=1)
    with torch.no_grad():
        pfc.weight.copy_(weight)
    x = emb.clone().requires_grad_(True)
    loss = pfc(x, labels)
    loss.backward()

    x_ref = emb.clone().requires_grad_(True)
    w_ref = weight.clone().requires_grad_(True)
    ref = plain_margin_ce(x_ref, w_ref, labels, 16.0, m1, m2, m3)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert loss.item() > 0.1
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pfc.weight.grad, w_ref.grad, rtol=1e-4, atol=1e-6)


def test_sampling_and_num_feat_equal_plain_ce_on_the_selection():
    emb, weight, labels = _data(1)
    pfc = PartialFC(D, C, s=32.0, m2=0.25, sample_rate=0.4, num_feat=4, seed=5, rank=0, world=1)
    with torch.no_grad():
        pfc.weight.copy_(weight)
    x = emb.clone().requires_grad_(True)
    loss = pfc(x, labels, step=3)
    loss.backward()
    selected = pfc.last_selected
    assert set(labels.tolist()) <= set(selected.tolist())  # every target centre is kept
    assert len(selected) < C  # and some negatives are dropped
    # Reproduce the documented draw independently: seed*1_000_003+step, dims first, then classes.
    gen = torch.Generator().manual_seed(5 * 1_000_003 + 3)
    dims = torch.randperm(D, generator=gen)[:4]
    keep = torch.rand(C, generator=gen) < 0.4
    keep[labels] = True
    assert selected.tolist() == keep.nonzero().squeeze(1).tolist()

    x_ref = emb.clone().requires_grad_(True)
    w_ref = weight.clone().requires_grad_(True)
    remap = {c: i for i, c in enumerate(selected.tolist())}
    ref = plain_margin_ce(x_ref[:, dims], w_ref[selected][:, dims],
                          torch.tensor([remap[int(y)] for y in labels]), 32.0, 1.0, 0.25, 0.0)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pfc.weight.grad, w_ref.grad, rtol=1e-4, atol=1e-6)
    unused = sorted(set(range(C)) - set(selected.tolist()))
    assert pfc.weight.grad[unused].abs().max() == 0


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


CASES = [(1.0, None), (0.5, 4)]


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


def test_two_processes_equal_one_process(tmp_path):
    """Same global batch: same loss, centre and backbone gradients, same sampled classes."""
    spawn(_two_process_worker, 2, str(tmp_path))
    for case, (sample_rate, num_feat) in enumerate(CASES):
        emb, weight, labels = _data(2)
        torch.manual_seed(0)
        backbone = torch.nn.Linear(D, D)
        pfc = PartialFC(D, C, s=32.0, m2=0.3, sample_rate=sample_rate, num_feat=num_feat, seed=9,
                        rank=0, world=1)
        with torch.no_grad():
            pfc.weight.copy_(weight)
        x = emb.clone().requires_grad_(True)
        loss = pfc(backbone(x), labels, step=4)
        loss.backward()
        parts = [torch.load(tmp_path / f"case{case}-rank{r}.pt") for r in range(2)]
        for part in parts:
            assert part["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
            torch.testing.assert_close(part["lin_grad"], backbone.weight.grad, rtol=1e-4, atol=1e-6)
        # Embedding gradients come back × world so that DDP's averaging gives the global gradient.
        torch.testing.assert_close(torch.cat([p["x_grad"] for p in parts]) / 2, x.grad, rtol=1e-4,
                                   atol=1e-6)
        torch.testing.assert_close(torch.cat([p["w_grad"] for p in parts]), pfc.weight.grad,
                                   rtol=1e-4, atol=1e-6)
        assert parts[1]["start"] == 6  # contiguous slices 0..5 and 6..10
        assert torch.cat([p["selected"] for p in parts]).tolist() == pfc.last_selected.tolist()
        if sample_rate < 1:
            assert len(pfc.last_selected) < C


def test_centre_init_does_not_depend_on_world_size():
    full = PartialFC(D, C, seed=3, rank=0, world=1).weight
    halves = [PartialFC(D, C, seed=3, rank=r, world=2).weight for r in (0, 1)]
    assert torch.equal(torch.cat(halves), full)
    assert full.std().item() == pytest.approx(0.01, rel=0.3)
