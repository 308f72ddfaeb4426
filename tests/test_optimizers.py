"""Muon orthogonalizes; the distributed optimizers match the single-process ones exactly (2 gloo ranks)."""

import os

import torch
import torch.multiprocessing as mp

from tests.model_fixtures import tiny_model
from vibechat.muon import zeropower_via_newtonschulz5


def test_newton_schulz_output_is_nearly_orthogonal():
    torch.manual_seed(0)
    G = torch.randn(64, 32)
    X = zeropower_via_newtonschulz5(G, steps=5)
    singular_values = torch.linalg.svdvals(X)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25


def test_newton_schulz_keeps_the_singular_vectors():
    torch.manual_seed(0)
    G = torch.randn(32, 32)
    U, _, Vh = torch.linalg.svd(G)
    X = zeropower_via_newtonschulz5(G, steps=10)
    cosine = (X * (U @ Vh)).sum() / (X.norm() * (U @ Vh).norm())
    assert cosine > 0.95


STEPS, BATCH = 4, 8


def _batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (BATCH, 17), generator=g) for _ in range(STEPS)]


def _train(model, optimizers, batches, rows=slice(None)):
    for b in batches:
        model(b[rows, :-1], b[rows, 1:]).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _dist_worker(rank, world, rendezvous, out_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    # a file rendezvous: no port to race for on a busy machine
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    model = tiny_model(seed=0)
    optimizers = model.setup_optimizers()
    assert [type(o).__name__ for o in optimizers] == ["DistAdamW", "DistMuon"]
    half = BATCH // world
    state = _train(model, optimizers, _batches(), rows=slice(rank * half, (rank + 1) * half))
    if rank == 0:
        torch.save(state, out_path)
    torch.distributed.destroy_process_group()


def test_dist_optimizers_on_two_gloo_ranks_match_single_process(tmp_path):
    out = str(tmp_path / "dist.pt")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2, join=True)
    model = tiny_model(seed=0)
    single = _train(model, model.setup_optimizers(), _batches())
    dist_state = torch.load(out)
    for name, value in single.items():
        torch.testing.assert_close(dist_state[name], value, rtol=1e-4, atol=1e-5, msg=name)
