"""The trainer, end to end on CPU: flags, config files, run folder, exact resume, faults, signals, bad input."""

import json
import math
import signal
import subprocess
import time

import pytest
import torch
import yaml

from train_helpers import PYTHON, read_rows, subprocess_env, train_argv
from vatt_fast import train as train_mod
from vatt_fast.models.vatt import VATT as _VATT  # the real class, before any test patches it
from vatt_fast.train import NonFiniteLossError, build_parser, lr_at, main, parse_args


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_rows(run_dir)]


# --- arguments -----------------------------------------------------------------------------
def test_every_flag_is_kebab_case_with_help_and_choices():
    parser = build_parser()
    enums = {"--precision", "--kernels", "--attention", "--loader", "--device", "--preset"}
    for action in parser._actions:
        if action.dest == "help":
            continue
        for opt in action.option_strings:
            assert opt.startswith("--") and "_" not in opt and opt == opt.lower(), opt
        assert action.help, action.option_strings
        if set(action.option_strings) & enums:
            assert action.choices, action.option_strings
    flags = {o for a in parser._actions for o in a.option_strings}
    required = {
        "--preset", "--data", "--out", "--batch-size", "--steps", "--lr", "--warmup-steps", "--precision",
        "--compile", "--activation-checkpointing", "--kernels", "--attention", "--loader", "--workers", "--seed",
        "--resume", "--eval-every", "--log-every", "--save-every", "--config", "--fsdp",
    }  # fmt: skip
    assert required <= flags, required - flags


def test_unknown_flag_value_names_value_and_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--attention", "fastest"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'fastest'" in err and "flash_attn" in err and "sdpa" in err


def test_config_file_defaults_and_flag_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"steps": 7, "lr": 0.01, "warmup-steps": 3, "attention": "math", "model": {"drop_token": 0.25}}))
    args = parse_args(["--config", str(cfg), "--steps", "9"])
    assert (args.steps, args.lr, args.warmup_steps, args.attention) == (9, 0.01, 3, "math")
    assert args.model == {"drop_token": 0.25}
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"batch_size": 6}))
    assert parse_args(["--config", str(js)]).batch_size == 6


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """--compile-mode is passed to every torch.compile call of both scopes (Inductor only)."""
    from vatt_fast.models import create_model
    from vatt_fast.training.setup import compile_model

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((type(self).__name__, kw)))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(("forward_fused", kw)) or fn)
    model = create_model("tiny")
    compile_model(model, model, "model", "inductor", "reduce-overhead")
    assert calls == [("VATT", {"backend": "inductor", "mode": "reduce-overhead"})]
    calls.clear()
    compile_model(model, model, "blocks", "inductor", "max-autotune")
    assert len(calls) == 2 * 6 and all(kw == {"backend": "inductor", "mode": "max-autotune"} for _, kw in calls)
    calls.clear()
    compile_model(model, model, "model", "aot_eager")
    assert calls == [("VATT", {"backend": "aot_eager"})]
    with pytest.raises(ValueError, match="--compile-mode reduce-overhead is an Inductor mode, but --compile-backend is"):
        compile_model(model, model, "model", "aot_eager", "reduce-overhead")
    assert parse_args(["--compile-mode", "reduce-overhead"]).compile_mode == "reduce-overhead"


def test_kernels_default_is_the_layers_process_default(monkeypatch):
    """--kernels unset takes $VATT_FAST_KERNELS (as the layers do), else auto; the flag wins."""
    from vatt_fast.models.config import get_config
    from vatt_fast.training.params import fill_defaults

    def kernels(argv):
        args = parse_args(argv)
        fill_defaults(args, get_config("tiny"))
        return args.kernels

    monkeypatch.delenv("VATT_FAST_KERNELS", raising=False)
    assert kernels([]) == "auto"
    monkeypatch.setenv("VATT_FAST_KERNELS", "reference")
    assert kernels([]) == "reference"
    assert kernels(["--kernels", "triton"]) == "triton"
    monkeypatch.setenv("VATT_FAST_KERNELS", "fastest")
    with pytest.raises(ValueError, match="VATT_FAST_KERNELS='fastest' is not a kernel implementation"):
        kernels([])


@pytest.mark.parametrize(
    "content, match",
    [({"stepz": 3}, "unknown key 'stepz'"), ({"precision": "fp8"}, "precision='fp8' is not one of")],
)
def test_config_file_errors(tmp_path, content, match):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match=match):
        parse_args(["--config", str(cfg)])


def test_lr_schedule_against_formula():
    kw = dict(lr=1e-3, end_lr=1e-4, warmup_steps=10, total_steps=50)
    assert lr_at(0, **kw) == pytest.approx(1e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)
    for s in (10, 17, 33, 49):
        p = (s - 10) / 40
        assert lr_at(s, **kw) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * p)))
    assert lr_at(50, **kw) == pytest.approx(1e-4) and lr_at(80, **kw) == pytest.approx(1e-4)


# --- a run and its folder ----------------------------------------------------------------
def test_run_folder_contents(tiny_run):
    run = tiny_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png", "train.log", "vocab.txt"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = run / "checkpoints" / "step-00000004"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "state.pt").is_file()
    rows = read_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["clips_per_s"] > 0 and r["tokens_per_s"] > 0 and 0 <= r["data_wait"] <= 1
        assert {"loss_vt", "loss_va", "lr", "mfu", "mem_gb"} <= set(r)
        assert r["loss"] == pytest.approx((r["loss_vt"] + r["loss_va"]) / 2, rel=1e-5)
    evals = read_rows(run, "eval")
    assert len(evals) == 1 and evals[0]["step"] == 4 and "loss" in evals[0]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("steps", "clips_per_s", "mfu", "t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "v2a_r1", "chance_r1"):
        assert key in summary, key
    assert summary["steps"] == 4 and summary["chance_r1"] == pytest.approx(1 / 3) and summary["status"] == "done"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["steps"] == 4 and resolved["batch_size"] == 4 and resolved["model"]["name"] == "tiny"
    assert resolved["model"]["vocab_size"] == len((run / "vocab.txt").read_text().splitlines())
    # The resolved config is itself a valid --config.
    again = parse_args(["--config", str(run / "config.yaml")])
    assert again.steps == 4 and again.model["vocab_size"] == resolved["model"]["vocab_size"]


def test_periodic_eval_rows(tiny_data, tmp_path):
    argv = train_argv(tiny_data, tmp_path / "r", 4)
    argv[argv.index("--eval-every") + 1] = "2"
    main(argv)
    assert [r["step"] for r in read_rows(tmp_path / "r", "eval")] == [2, 4]


# --- exact resume --------------------------------------------------------------------------
def test_resume_is_exact(tiny_data, tmp_path):
    """6 steps straight == 3 steps + resume + 3 steps: the same loss at every step."""
    main(train_argv(tiny_data, tmp_path / "straight", 6))
    main(train_argv(tiny_data, tmp_path / "split", 3, 4, "--total-steps", "6"))
    summary = main(train_argv(tiny_data, tmp_path / "split", 6, 4, "--resume", "auto"))
    assert summary["steps"] == 6
    straight, split = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert [s for s, _ in split] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in split] == [loss for _, loss in straight]  # bit-for-bit on CPU


def test_resume_auto_without_checkpoint_starts_fresh(tiny_data, tmp_path):
    summary = main(train_argv(tiny_data, tmp_path / "fresh", 2, 4, "--resume", "auto"))
    assert summary["steps"] == 2


def test_resume_from_other_preset_fails_before_work(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "step-00000004"
    with pytest.raises(ValueError, match=r"--preset 'tiny'.*--preset 'base'.*pass --preset tiny"):
        main(["--preset", "base", "--resume", str(ckpt), "--out", str(tmp_path / "o"), "--no-progress"])
    assert not (tmp_path / "o").exists()


def test_resume_with_other_model_config_fails(tiny_run, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"va_dim": 96}}))
    with pytest.raises(ValueError, match="va_dim: checkpoint 128, this run 96"):
        main(["--config", str(cfg), "--resume", str(tiny_run), "--out", str(tmp_path / "o"), "--no-progress"])


# --- bad input -------------------------------------------------------------------------------
def test_missing_data_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data '.*nowhere' does not exist; pass --data DIR"):
        main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no manifest.jsonl"):
        main(["--data", str(tmp_path / "empty")])


def test_resume_auto_needs_out():
    with pytest.raises(ValueError, match="--resume auto needs --out"):
        main(["--resume", "auto"])


def test_batch_not_divisible_by_world_size(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "init_distributed", lambda device: None)
    monkeypatch.setattr(train_mod, "get_world_size", lambda: 3)
    with pytest.raises(ValueError, match=r"--batch-size 8 \(global\) is not divisible by the world size 3.*--batch-size 6"):
        main(train_argv(tiny_data, tmp_path / "o", 2, 8))
    assert not (tmp_path / "o").exists()


# --- faults ---------------------------------------------------------------------------------
class _NaNOnCalls:
    """Wraps VATTLoss; returns NaN losses on the given (1-based) calls."""

    def __init__(self, real, calls):
        self.real, self.calls, self.n = real, set(calls), 0

    def __call__(self, *args, **kwargs):
        module = self.real(*args, **kwargs)
        outer = self

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = module

            def forward(self, outputs):
                out = self.inner(outputs)
                outer.n += 1
                if outer.n in outer.calls or "always" in outer.calls:
                    out = {k: v * float("nan") for k, v in out.items()}
                return out

        return Wrapped()


def test_nonfinite_loss_is_skipped_and_counted(tiny_data, tmp_path, monkeypatch):
    import vatt_fast.training.setup as training_setup

    monkeypatch.setattr(training_setup, "VATTLoss", _NaNOnCalls(training_setup.VATTLoss, {2}))
    summary = main(train_argv(tiny_data, tmp_path / "r", 4))
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 4 and math.isfinite(summary["final_loss"])
    rows = read_rows(tmp_path / "r")
    assert rows[1]["loss"] is None and all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 1)


def test_repeated_nonfinite_losses_stop_the_run(tiny_data, tmp_path, monkeypatch):
    import vatt_fast.training.setup as training_setup

    monkeypatch.setattr(training_setup, "VATTLoss", _NaNOnCalls(training_setup.VATTLoss, {"always"}))
    with pytest.raises(NonFiniteLossError, match="NaN/inf for 2 consecutive steps.*lower --lr"):
        main(train_argv(tiny_data, tmp_path / "r", 5, 4, "--max-nonfinite", "2"))


# --- it learns, and every speed flag acts ------------------------------------------------------
@pytest.mark.slow
def test_training_learns(learn_data, tmp_path):
    """120 steps of the tiny preset: the loss falls and zero-shot retrieval beats chance clearly.

    Measured on the 2-core CI machine: loss 3.9 -> 2.2, R@1 t2v 25%, v2t 31%, v2a 25%
    against chance 6.25% (16 val clips); the bounds leave room for other CPUs.
    """
    argv = train_argv(learn_data, tmp_path / "r", 120, 16)
    argv[argv.index("--log-every") + 1] = "5"
    summary = main(argv)
    losses = [r["loss"] for r in read_rows(tmp_path / "r")]
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.8, losses
    chance = summary["chance_r1"]
    assert chance == pytest.approx(1 / 16)
    mean_r1 = (summary["t2v_r1"] + summary["v2t_r1"] + summary["v2a_r1"]) / 3
    assert mean_r1 >= 2.5 * chance, summary
    assert summary["t2v_medr"] < summary["chance_medr"], summary


class _Recorder:
    """Stands in for ``VATT`` in the trainer: records the initial weights, the dtypes that every
    Linear layer produced, how often each Transformer block ran, and the kernel impl it was given."""

    def __init__(self, hooks: bool = True):
        from vatt_fast.nn.transformer import Block

        self.initial, self.dtypes, self.block_calls, self.models = {}, set(), 0, []
        recorder = self

        class RecordingVATT(_VATT):
            def __init__(self, config):
                super().__init__(config)
                recorder.initial = {k: v.detach().clone() for k, v in self.state_dict().items()}
                recorder.models.append(self)
                if not hooks:
                    return
                for m in self.modules():
                    if isinstance(m, torch.nn.Linear):
                        m.register_forward_hook(lambda mod, inp, out: recorder.dtypes.add(out.dtype))
                    if isinstance(m, Block):
                        m.register_forward_pre_hook(lambda mod, inp: setattr(recorder, "block_calls", recorder.block_calls + 1))

        self.cls = RecordingVATT

    def install(self, monkeypatch):
        import vatt_fast.training.setup as training_setup

        monkeypatch.setattr(training_setup, "VATT", self.cls)
        return self


def _assert_matches_eager(losses, reference):
    """Step 1 to fp32 rounding; later steps through Adam with eps 0.1 (the ``stable_adam`` fixture),
    where a loss moves by at most |grad| * |weight difference| (tolerances measured and explained
    in tests/test_train_distributed.py)."""
    assert losses[0] == pytest.approx(reference[0], rel=1e-5)
    assert losses[1:] == pytest.approx(reference[1:], rel=1e-4)


def _final_weights(run_dir, step):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def _assert_weights_moved(initial, final):
    """Every parameter tensor that the loss reaches was updated (buffers aside)."""
    params = [k for k in final if "running_" not in k and "num_batches" not in k]
    unchanged = [k for k in params if torch.equal(initial[k], final[k])]
    assert not unchanged, f"the optimizer step left these parameters unchanged: {unchanged}"


_BASE = ("--attention", "math", "--kernels", "reference")


@pytest.fixture(scope="module")
def eager_reference(tiny_data, tmp_path_factory, stable_adam):
    """The plain eager fp32 run (math attention, reference kernels) that every speed flag must match."""
    out = tmp_path_factory.mktemp("eager") / "r"
    main(train_argv(tiny_data, out, 3, 4, *_BASE, "--config", stable_adam))
    return {"loss": [r["loss"] for r in read_rows(out)], "weights": _final_weights(out, 3)}


def test_eager_fp32_run_updates_every_parameter_in_fp32(tiny_data, tmp_path, stable_adam, monkeypatch):
    rec = _Recorder().install(monkeypatch)
    main(train_argv(tiny_data, tmp_path / "r", 3, 4, *_BASE, "--config", stable_adam))
    assert rec.dtypes == {torch.float32}
    _assert_weights_moved(rec.initial, _final_weights(tmp_path / "r", 3))


def test_bf16_autocasts_and_matches_fp32(tiny_data, tmp_path, stable_adam, eager_reference, monkeypatch):
    rec = _Recorder().install(monkeypatch)
    summary = main(train_argv(tiny_data, tmp_path / "r", 3, 4, *_BASE, "--config", stable_adam, "--precision", "bf16"))
    assert summary["precision"] == "bf16"
    # Autocast ran every Linear layer in bf16 (the heads' and losses' fp32 parts are not Linear).
    assert rec.dtypes == {torch.bfloat16}
    _assert_weights_moved(rec.initial, _final_weights(tmp_path / "r", 3))
    # Step 1 (same weights, same clips): bf16 keeps 8 bits of mantissa through two Transformer
    # layers and the heads' BatchNorm, and the loss divides cosine similarities by tau = 0.07,
    # so it lands a few percent from fp32's (3.7% measured); an fp32 run would be exact.
    losses = [r["loss"] for r in read_rows(tmp_path / "r")]
    assert losses[0] == pytest.approx(eager_reference["loss"][0], rel=0.1)
    assert losses[0] != eager_reference["loss"][0]
    assert all(math.isfinite(x) for x in losses)


def test_bf16_weights_run_on_copies_with_the_numbers_of_autocast(tiny_data, tmp_path, monkeypatch):
    """--bf16-weights on: every Linear sees a bf16 weight in the forward, and the run's losses and
    final fp32 weights are those of plain autocast (--bf16-weights off), bit for bit; resuming
    such a run (the copies rebuilt from the loaded fp32 weights) is exact too."""
    seen = set()
    real_forward = torch.nn.Linear.forward

    def spy(self, x):
        if torch.is_grad_enabled():  # training steps (the final evaluation runs on the fp32 weights)
            seen.add(self.weight.dtype)
        return real_forward(self, x)

    off = main(train_argv(tiny_data, tmp_path / "off", 4, 4, "--precision", "bf16", "--bf16-weights", "off"))
    assert seen == set()  # (the spy is not installed yet)
    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    main(train_argv(tiny_data, tmp_path / "on", 4, 4, "--precision", "bf16", "--bf16-weights", "on"))
    assert seen == {torch.bfloat16}
    assert off["precision"] == "bf16"
    assert [x for _, x in _losses(tmp_path / "on")] == [x for _, x in _losses(tmp_path / "off")]
    on_w, off_w = _final_weights(tmp_path / "on", 4), _final_weights(tmp_path / "off", 4)
    assert all(torch.equal(on_w[k], off_w[k]) and on_w[k].dtype == off_w[k].dtype for k in off_w)
    # 2 steps, then resume for 2 more (--bf16-weights auto: on for this single-process bf16 run):
    # the same losses as the straight run.
    seen.clear()
    main(train_argv(tiny_data, tmp_path / "split", 2, 4, "--total-steps", "4", "--precision", "bf16"))
    main(train_argv(tiny_data, tmp_path / "split", 4, 4, "--precision", "bf16", "--resume", "auto"))
    assert seen == {torch.bfloat16}
    assert [x for _, x in _losses(tmp_path / "split")] == [x for _, x in _losses(tmp_path / "on")]


def test_activation_checkpointing_recomputes_and_matches_eager(tiny_data, tmp_path, stable_adam, eager_reference, monkeypatch):
    plain = _Recorder().install(monkeypatch)
    main(train_argv(tiny_data, tmp_path / "plain", 1, 4, *_BASE))
    plain_calls = plain.block_calls
    rec = _Recorder().install(monkeypatch)
    main(train_argv(tiny_data, tmp_path / "r", 3, 4, *_BASE, "--config", stable_adam, "--activation-checkpointing"))
    from vatt_fast.nn.transformer import Block

    blocks = sum(isinstance(m, Block) for m in rec.models[0].modules())
    # Without checkpointing each block runs once per step (and once per evaluation batch); with
    # it, once more in every backward.
    evals = plain_calls - blocks  # the final evaluation's forwards (the plain run made one step)
    assert rec.block_calls == 3 * blocks + 3 * blocks + evals
    _assert_matches_eager([r["loss"] for r in read_rows(tmp_path / "r")], eager_reference["loss"])
    final = _final_weights(tmp_path / "r", 3)
    for name, w in eager_reference["weights"].items():
        torch.testing.assert_close(final[name], w, rtol=0, atol=1e-4 if "running_" in name else 1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "auto"])
def test_attention_flag_selects_the_kernel_and_matches_math(tiny_data, tmp_path, stable_adam, eager_reference, monkeypatch, attention):
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    argv = train_argv(tiny_data, tmp_path / "r", 3, 4, "--attention", attention, "--kernels", "reference", "--config", stable_adam)
    main(argv)
    assert calls, "torch SDPA never ran"
    _assert_matches_eager([r["loss"] for r in read_rows(tmp_path / "r")], eager_reference["loss"])
    calls.clear()
    main(train_argv(tiny_data, tmp_path / "m", 1, 4, *_BASE))
    assert not calls, "--attention math called SDPA"


def test_kernels_flag_reaches_every_fused_op(tiny_data, tmp_path, stable_adam, eager_reference, monkeypatch):
    from vatt_fast.nn.embed import AudioPatchEmbed, DropToken, VideoPatchEmbed

    rec = _Recorder(hooks=False).install(monkeypatch)
    main(train_argv(tiny_data, tmp_path / "r", 3, 4, "--attention", "math", "--kernels", "auto", "--config", stable_adam))
    fused = [m for m in rec.models[0].modules() if isinstance(m, (VideoPatchEmbed, AudioPatchEmbed, DropToken))]
    assert fused and {m.impl for m in fused} == {"auto"}
    # On the CPU, auto is the reference for the model's ops and the chunked NCE for the loss (the
    # same sums in another order): the same numbers up to fp32 rounding.
    _assert_matches_eager([r["loss"] for r in read_rows(tmp_path / "r")], eager_reference["loss"])
    # No Triton kernel runs on CPU tensors outside the interpreter, so --kernels triton must
    # refuse here (with the reason) rather than quietly run the reference.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises((NotImplementedError, RuntimeError), match="triton"):
        main(train_argv(tiny_data, tmp_path / "t", 1, 4, "--attention", "math", "--kernels", "triton"))


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compile_runs_compiled_graphs_and_matches_eager(tiny_data, tmp_path, stable_adam, eager_reference, monkeypatch, scope):
    from torch._dynamo.utils import counters

    from vatt_fast.nn.transformer import Block

    counters.clear()
    rec = _Recorder(hooks=False).install(monkeypatch)
    # aot_eager traces forward and backward as inductor does, without the C++ compile (minutes on 2 cores).
    argv = train_argv(tiny_data, tmp_path / "r", 3, 4, *_BASE, "--config", stable_adam, "--compile", "--compile-backend",
                      "aot_eager", "--compile-scope", scope)
    main(argv)
    assert counters["stats"]["unique_graphs"] > 0, dict(counters["stats"])
    blocks = [m for m in rec.models[0].modules() if isinstance(m, Block)]
    assert blocks and all((m._compiled_call_impl is not None) == (scope == "blocks") for m in blocks)
    assert counters["aot_autograd"]["total"] > 0, dict(counters["aot_autograd"])  # forward and backward graphs
    _assert_matches_eager([r["loss"] for r in read_rows(tmp_path / "r")], eager_reference["loss"])
    _assert_weights_moved(rec.initial, _final_weights(tmp_path / "r", 3))


def test_compile_failure_stops_before_training_with_the_workaround(tiny_data, tmp_path):
    from torch._dynamo import register_backend
    from torch._dynamo.exc import BackendCompilerFailed

    @register_backend(name="vatt_test_broken")
    def broken(gm, example_inputs):
        raise AssertionError("simulated Inductor failure")

    with pytest.raises(train_mod.CompileError) as exc:
        main(train_argv(tiny_data, tmp_path / "r", 3, 4, "--compile", "--compile-backend", "vatt_test_broken"))
    message = str(exc.value)
    assert f"torch {torch.__version__}" in message and "simulated Inductor failure" in message
    assert "without --compile" in message and "--compile-backend aot_eager" in message
    assert isinstance(exc.value.__cause__, BackendCompilerFailed)
    assert not (tmp_path / "r" / "checkpoints").exists() or not list((tmp_path / "r" / "checkpoints").iterdir())


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_data, tmp_path):
    out = tmp_path / "r"
    argv = train_argv(tiny_data, out, 10_000, 4, "--save-every", "0")
    proc = subprocess.Popen([PYTHON, "-m", "vatt_fast.train", *argv], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and len(read_rows(out)) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0]
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "got SIGTERM" in output and "--resume auto" in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 2 <= summary["steps"] < 10_000
    ckpt = out / "checkpoints" / f"step-{summary['steps']:08d}"
    assert (ckpt / "model.safetensors").is_file()
    # ...and the run continues from there.
    resumed = main(train_argv(tiny_data, out, summary["steps"] + 1, 4, "--resume", "auto", "--save-every", "0"))
    assert resumed["steps"] == summary["steps"] + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_bf16(tiny_data, tmp_path):
    argv = train_argv(tiny_data, tmp_path / "r", 3, 8)
    argv[argv.index("--device") + 1] = "cuda"
    argv[argv.index("--loader") + 1] = "auto"
    argv.remove("--peak-tflops")
    argv.remove("0.1")
    summary = main(argv)
    assert summary["precision"] == "bf16" and summary["device"] != "cpu"
    assert math.isfinite(summary["final_loss"]) and summary["mfu"] is not None and summary["clips_per_s"] > 0


def test_resume_with_other_world_size_fails_before_work(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "init_distributed", lambda device: None)
    monkeypatch.setattr(train_mod, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match=r"written by 1 rank\(s\) but this run has 2; .* resume with 1 process"):
        main(["--resume", str(tiny_run), "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu"])
