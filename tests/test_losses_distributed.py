"""Two gloo processes on this machine: the losses fed one global batch split across two
ranks give the single-process loss value (on every rank) and, on each rank's inputs,
the single-process input gradients; and the collectives of vatt_fast.distributed.

All checks run in one start of the two processes (once per module) to keep the
start-up cost low; each rank saves what it computed and the tests compare here.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parity import assert_parity
from vatt_fast import distributed as vdist
from vatt_fast.nn.losses import MILNCELoss, NCELoss, VATTLoss

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

WORLD = 2
B_LOCAL, K, D = 3, 4, 7  # odd sizes; global batch 6
JOIN_TIMEOUT_S = 150
# fork starts in well under a second where spawn re-imports torch (~10 s on 2 cores);
# the children only use the CPU and set one intra-op thread (libgomp is not fork-safe).
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


IMPLS = ("reference", "chunked", "triton")


def _triton_runs_here() -> bool:
    """Whether the Triton kernels can run on this machine's CPU tensors (the interpreter)."""
    from vatt_fast.kernels import _dispatch
    from vatt_fast.kernels import nce as nce_mod

    return _dispatch.has_triton("mil_nce") and nce_mod.INTERPRETING


def _make_data() -> dict:
    g = torch.Generator().manual_seed(1234)
    n = WORLD * B_LOCAL
    mask = torch.rand(n, K, generator=g) > 0.4
    mask[:, 0] |= ~mask.any(dim=1)
    mask[1] = False  # rank 0 holds a clip without captions
    mask[4] = False  # and so does rank 1
    data = {
        "video": torch.randn(n, D, generator=g, dtype=torch.float64),
        "audio": torch.randn(n, D, generator=g, dtype=torch.float64),
        "text": torch.randn(n, K, D, generator=g, dtype=torch.float64),
        "mask": mask,
        "gather_x": torch.randn(n, 5, generator=g, dtype=torch.float64),
        "gather_w": torch.randn(WORLD, n, 5, generator=g, dtype=torch.float64),
    }
    return data


def _grads(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = fn(*inputs)
    loss.backward()
    return [loss.detach()] + [x.grad for x in inputs]


def _worker(rank: int, init_file: str, data: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        video, audio, text, mask = data["video"][sl], data["audio"][sl], data["text"][sl], data["mask"][sl]
        res = {"rank": vdist.get_rank(), "world": vdist.get_world_size(), "is_dist": vdist.is_dist()}

        res["nce"] = _grads(lambda v, a: NCELoss()(v, a), video, audio)
        res["mil"] = _grads(lambda v, t: MILNCELoss()(v, t, mask), video, text)
        res["mil_nomask"] = _grads(lambda v, t: MILNCELoss()(v, t), video, text)
        empty = torch.zeros_like(mask)
        res["mil_empty"] = _grads(lambda v, t: MILNCELoss()(v, t, empty), video, text)
        res["mil_local"] = _grads(lambda v, t: MILNCELoss(gather=False)(v, t, mask), video, text)
        res["vatt"] = _grads(
            lambda v, a, t: VATTLoss()(
                {"video_va": v, "audio_va": a, "video_vt": v[:, :5], "text_vt": t[..., :5], "text_mask": mask}
            )["loss"],
            video,
            audio,
            text,
        )

        # Each implementation in fp32 (the kernels take no float64), with and without masks.
        v32, a32, t32 = video.float(), audio.float(), text.float()
        for impl in IMPLS:
            if impl == "triton" and not _triton_runs_here():
                continue
            res[f"mil_{impl}"] = _grads(lambda v, t, i=impl: MILNCELoss(impl=i)(v, t, mask), v32, t32)
            res[f"nce_{impl}"] = _grads(lambda v, a, i=impl: NCELoss(impl=i)(v, a), v32, a32)

        # all_gather_with_grad: y = gather(x); loss_r = sum(w_r * y); grad_x on rank r must
        # be sum over ranks r' of w_r'[rows of r].
        x = data["gather_x"][sl].clone().requires_grad_(True)
        y = vdist.all_gather_with_grad(x)
        (y * data["gather_w"][rank]).sum().backward()
        res["gather_y"] = y.detach()
        res["gather_grad"] = x.grad
        res["gather_bool"] = vdist.all_gather_no_grad(mask)
        value = torch.tensor([float(rank + 1), -float(rank)], dtype=torch.float64)
        res["reduce"] = {op: vdist.all_reduce_value(value, op=op) for op in ("sum", "mean", "max", "min")}
        res["reduce_input_untouched"] = value.clone()
        try:
            vdist.all_gather_with_grad(torch.zeros(2 + rank, 3))
            res["unequal_error"] = None
        except ValueError as e:
            res["unequal_error"] = str(e)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    data = _make_data()
    ctx = mp.start_processes(
        _worker, args=(str(tmp / "init"), data, str(tmp)), nprocs=WORLD, join=False, start_method=START_METHOD
    )
    try:
        joined = False
        for _ in range(JOIN_TIMEOUT_S):
            if ctx.join(timeout=1):
                joined = True
                break
        if not joined:
            pytest.fail(f"the {WORLD} gloo processes did not finish within {JOIN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return data, results


def _check_split(single, results, key, names):
    """Loss identical on every rank == single; rank r's input grads == single grads of its rows."""
    loss, *grads = single
    for r, res in enumerate(results):
        got_loss, *got_grads = res[key]
        torch.testing.assert_close(got_loss, loss, rtol=1e-12, atol=1e-12)
        sl = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
        for name, g, gr in zip(names, grads, got_grads):
            torch.testing.assert_close(gr, g[sl], rtol=1e-10, atol=1e-12, msg=lambda m, name=name, r=r: f"{key} {name} rank {r}: {m}")
    assert results[0][key][0].item() == results[1][key][0].item()  # bitwise the same value


def test_process_group_queries(dist_run):
    _, results = dist_run
    assert [(r["rank"], r["world"], r["is_dist"]) for r in results] == [(0, 2, True), (1, 2, True)]


def test_nce_split_equals_single_process(dist_run):
    data, results = dist_run
    single = _grads(lambda v, a: NCELoss()(v, a), data["video"], data["audio"])
    _check_split(single, results, "nce", ("video", "audio"))


def test_mil_nce_split_equals_single_process_with_masks(dist_run):
    data, results = dist_run
    single = _grads(lambda v, t: MILNCELoss()(v, t, data["mask"]), data["video"], data["text"])
    _check_split(single, results, "mil", ("video", "text"))
    # The clips without captions still get video gradients (other clips' columns).
    assert results[0]["mil"][1][1].abs().sum() > 0
    single = _grads(lambda v, t: MILNCELoss()(v, t), data["video"], data["text"])
    _check_split(single, results, "mil_nomask", ("video", "text"))


def test_all_masked_global_batch_is_zero(dist_run):
    _, results = dist_run
    for res in results:
        loss, gv, gt = res["mil_empty"]
        assert loss.item() == 0.0
        assert torch.all(gv == 0) and torch.all(gt == 0)


def test_gather_false_is_local(dist_run):
    data, results = dist_run
    for r, res in enumerate(results):
        sl = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
        local = _grads(lambda v, t, sl=sl: MILNCELoss()(v, t, data["mask"][sl]), data["video"][sl], data["text"][sl])
        for got, want in zip(res["mil_local"], local):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_vatt_loss_split_equals_single_process(dist_run):
    data, results = dist_run
    single = _grads(
        lambda v, a, t: VATTLoss()(
            {"video_va": v, "audio_va": a, "video_vt": v[:, :5], "text_vt": t[..., :5], "text_mask": data["mask"]}
        )["loss"],
        data["video"],
        data["audio"],
        data["text"],
    )
    _check_split(single, results, "vatt", ("video", "audio", "text"))


def test_all_gather_with_grad(dist_run):
    data, results = dist_run
    w_total = data["gather_w"].sum(dim=0)
    for r, res in enumerate(results):
        torch.testing.assert_close(res["gather_y"], data["gather_x"], rtol=0, atol=0)  # rank-major layout
        sl = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
        torch.testing.assert_close(res["gather_grad"], w_total[sl], rtol=1e-12, atol=1e-12)
        assert res["gather_bool"].dtype == torch.bool
        assert torch.equal(res["gather_bool"], data["mask"])


def test_all_reduce_value(dist_run):
    _, results = dist_run
    for r, res in enumerate(results):
        red = res["reduce"]
        torch.testing.assert_close(red["sum"], torch.tensor([3.0, -1.0], dtype=torch.float64))
        torch.testing.assert_close(red["mean"], torch.tensor([1.5, -0.5], dtype=torch.float64))
        torch.testing.assert_close(red["max"], torch.tensor([2.0, 0.0], dtype=torch.float64))
        torch.testing.assert_close(red["min"], torch.tensor([1.0, -1.0], dtype=torch.float64))
        torch.testing.assert_close(res["reduce_input_untouched"], torch.tensor([r + 1.0, -r], dtype=torch.float64))


def test_unequal_local_batches_raise_on_every_rank(dist_run):
    _, results = dist_run
    for res in results:
        assert res["unequal_error"] is not None
        assert "[2, 3]" in res["unequal_error"] and "drop_last" in res["unequal_error"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", ["mil", "nce"])
def test_split_equals_single_process_over_impl(dist_run, impl, loss):
    """fp32, each implementation: the two ranks' losses and input gradients against the
    single-process loss over the double batch, with STYLE.md's parity rule (float64
    reference, plain = the single-process fp32 reference)."""
    data, results = dist_run
    if f"{loss}_{impl}" not in results[0]:
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    if loss == "mil":
        def single(dtype):
            fn = lambda v, t: MILNCELoss(impl="reference")(v, t, data["mask"])  # noqa: E731
            return _grads(fn, data["video"].to(dtype), data["text"].to(dtype))
    else:
        def single(dtype):
            return _grads(lambda v, a: NCELoss(impl="reference")(v, a), data["video"].to(dtype), data["audio"].to(dtype))
    ref, plain = single(torch.float64), single(torch.float32)
    names = ("loss", "video grad", "text grad" if loss == "mil" else "audio grad")
    for r, res in enumerate(results):
        sl = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
        for i, (name, got, rv, pv) in enumerate(zip(names, res[f"{loss}_{impl}"], ref, plain)):
            if i > 0:
                rv, pv = rv[sl], pv[sl]
            assert_parity(got, rv, pv, 5e-6 if i == 0 else 1e-6, f"{impl} {loss} rank {r} {name}", plain_rtol=1e-3)
