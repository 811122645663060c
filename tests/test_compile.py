"""torch.compile of the whole VATT training step: one graph, same numbers as eager, checks kept.

``fullgraph=True`` raises on any graph break (a host sync such as ``int(tensor)``, Python
control flow on tensor values), so compiling at all is the no-graph-break check. The
``aot_eager`` backend traces forward and backward (AOTAutograd) but runs the ops eagerly, so
the comparison with eager is about the trace, not about a code generator; DropToken's
``randperm`` draws from the global RNG in both, so seeding both runs alike gives the same draw.
With ``impl="triton"`` the Transformer stacks take the fused path (``dropout_add_layer_norm`` and
``bias_gelu_dropout``), and the traced graph must contain those ops.
"""

import importlib

import pytest
import torch
from test_models import _batch
from torch._dynamo.testing import CompileCounterWithBackend

from vatt_fast.kernels._dispatch import triton_available
from vatt_fast.models import create_model, get_config
from vatt_fast.nn.losses import VATTLoss

# The tiny model is fp32 end to end; the compiled graph runs the same ops as eager, up to
# reassociation in decomposed ops, far below these tolerances (a different DropToken draw or a
# missing term moves the loss by O(0.1)).
RTOL, ATOL = 1e-4, 1e-5


def _step(model, loss_fn, batch):
    out = model(batch)
    return loss_fn(out, text_mask=batch["text_mask"])["loss"]


def _loss_and_grads(step, model, loss_fn, batch, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = step(model, loss_fn, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _triton_device():
    """Where the Triton kernels run here: CUDA (compiled, Inductor) or the CPU (interpreter)."""
    if not triton_available():
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return torch.device("cuda"), "inductor"
    if not importlib.import_module("vatt_fast.kernels.patch_embed").INTERPRETING:
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
    return torch.device("cpu"), "aot_eager"


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_compile_fullgraph_train_step_matches_eager(impl):
    """Reference kernels on the CPU; the Triton kernels on CUDA with Inductor (the interpreter on a
    CPU-only machine, where the ops are opaque custom ops)."""
    device, backend = (torch.device("cpu"), "aot_eager") if impl == "reference" else _triton_device()
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = create_model("tiny").train().set_kernel_impl(impl).to(device)
    assert cfg.drop_token > 0  # DropToken's random draw is part of the traced graph
    loss_fn = VATTLoss(gather=False, impl="reference")
    batch = {k: v.to(device) for k, v in _batch(cfg, B=3).items()}

    eager_loss, eager_grads = _loss_and_grads(_step, model, loss_fn, batch, seed=123)
    counter = CompileCounterWithBackend(backend)  # keeps the traced graphs
    compiled = torch.compile(_step, fullgraph=True, backend=counter)
    loss, grads = _loss_and_grads(compiled, model, loss_fn, batch, seed=123)
    code = "".join(gm.code for gm in counter.graphs)
    for op in ("vatt_fast.dropout_add_layer_norm", "vatt_fast.bias_gelu_dropout"):  # the fused block ops
        # 3 towers x (2 blocks x 2 + the final norm) fused LayerNorms; 3 x 2 MLPs
        want = {"reference": 0, "triton": 15 if "layer_norm" in op else 6}[impl]
        assert code.count(op + ".default(") == want, (op, code.count(op + ".default("))

    torch.testing.assert_close(loss, eager_loss, rtol=RTOL, atol=ATOL)
    assert grads.keys() == eager_grads.keys()
    for name in (
        "encoders.video.patch_embed.proj.weight",
        "encoders.video.patch_embed.pos_embed_t",
        "encoders.audio.patch_embed.pos_embed",
        "encoders.text.embed.word_embedding.weight",
        "encoders.text.backbone.blocks.0.attn.qkv.weight",
        "encoders.video.backbone.blocks.0.mlp.fc1.bias",
        "encoders.audio.backbone.blocks.1.norm1.weight",
        "encoders.text.backbone.norm.bias",
        "heads.video_to_va.0.weight",
        "heads.text_to_vt.weight",
    ):
        assert name in grads, f"{name} not found; parameter names: {sorted(grads)[:10]}..."
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=RTOL, atol=ATOL, msg=name)

    # The draw is live in the compiled graph: another seed drops other tokens.
    other, _ = _loss_and_grads(compiled, model, loss_fn, batch, seed=124)
    assert not torch.allclose(other, loss, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_token_id_check_eager_and_compiled():
    cfg = get_config("tiny")
    model = create_model("tiny").train().set_kernel_impl("reference")
    batch = _batch(cfg, B=2)
    batch["text"][0, 0, 0] = cfg.vocab_size + 5
    # Eager on CPU: the ids are read and the message names them.
    with pytest.raises(ValueError, match=rf"\[0, {cfg.vocab_size - 1}\].*max id {cfg.vocab_size + 5}.*vocab_size=len\(vocabulary\)"):
        model(batch)
    # Compiled: the check is an async assert inside the graph (no graph break), still fires.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=rf"word ids must lie in \[0, {cfg.vocab_size - 1}\].*vocab_size=len\(vocabulary\)"):
        compiled(batch)
