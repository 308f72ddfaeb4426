"""Muon orthogonalizes; its stacked step is the per-matrix definition and resumes from per-matrix state; the
distributed optimizers match the single-process ones exactly (2 gloo ranks)."""

import os

import torch
import torch.multiprocessing as mp

from tests.model_fixtures import tiny_model
from vibechat.muon import Muon, zeropower_via_newtonschulz5


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


def _per_matrix_muon(params, grads_per_step, lr=0.02, momentum=0.95):
    """Muon's definition, one matrix at a time: Nesterov momentum, Newton-Schulz, a step scaled for tall shapes."""
    params = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, g, buf in zip(params, grads, bufs):
            buf.lerp_(g, 1 - momentum)
            update = zeropower_via_newtonschulz5(g.lerp(buf, momentum))
            p.add_(update * max(1.0, g.size(0) / g.size(1)) ** 0.5, alpha=-lr)
    return params


def _muon_shapes():
    torch.manual_seed(0)
    shapes = [(16, 16), (64, 16), (16, 64), (16, 16), (64, 16)]  # two of one shape, tall and wide
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads_per_step = [[torch.randn(s) for s in shapes] for _ in range(3)]
    return params, grads_per_step


def _run_muon(opt, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()


def test_stacked_muon_step_equals_the_per_matrix_definition():
    params, grads_per_step = _muon_shapes()
    expected = _per_matrix_muon(params, grads_per_step)
    _run_muon(Muon(params, lr=0.02, momentum=0.95), params, grads_per_step)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)


def test_muon_state_dict_keeps_one_momentum_buffer_per_matrix_and_resumes_exactly():
    params, grads_per_step = _muon_shapes()
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    _run_muon(Muon(reference), reference, grads_per_step)

    first = Muon(params)
    _run_muon(first, params, grads_per_step[:1])
    saved = first.state_dict()
    shapes = [tuple(p.shape) for group in first.param_groups for p in group["params"]]
    assert [tuple(s["momentum_buffer"].shape) for s in saved["state"].values()] == shapes
    # loaded buffers are separate tensors, as in checkpoints of the per-matrix Muon
    resumed = Muon(params)
    resumed.load_state_dict({"state": {k: {"momentum_buffer": v["momentum_buffer"].clone()}
                                       for k, v in saved["state"].items()},
                             "param_groups": saved["param_groups"]})
    _run_muon(resumed, params, grads_per_step[1:])
    for p, r in zip(params, reference):
        assert torch.equal(p, r)


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
