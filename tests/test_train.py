"""The trainer, end to end on CPU: flags, config files, run folder, exact resume, faults, signals, bad input."""

import json
import math
import signal
import subprocess
import time

import pytest
import torch
import yaml

from train_fixtures import PYTHON, read_rows, subprocess_env, tiny_data_fixture, tiny_run_fixture, train_argv  # noqa: F401
from vatt_fast import train as train_mod
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
    monkeypatch.setattr(train_mod, "_init_distributed", lambda device: None)
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
    import vatt_fast.nn.losses as losses

    monkeypatch.setattr(losses, "VATTLoss", _NaNOnCalls(losses.VATTLoss, {2}))
    summary = main(train_argv(tiny_data, tmp_path / "r", 4))
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 4 and math.isfinite(summary["final_loss"])
    rows = read_rows(tmp_path / "r")
    assert rows[1]["loss"] is None and all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 1)


def test_repeated_nonfinite_losses_stop_the_run(tiny_data, tmp_path, monkeypatch):
    import vatt_fast.nn.losses as losses

    monkeypatch.setattr(losses, "VATTLoss", _NaNOnCalls(losses.VATTLoss, {"always"}))
    with pytest.raises(NonFiniteLossError, match="NaN/inf for 2 consecutive steps.*lower --lr"):
        main(train_argv(tiny_data, tmp_path / "r", 5, 4, "--max-nonfinite", "2"))


# --- options --------------------------------------------------------------------------------
def test_activation_checkpointing_gives_the_same_losses(tiny_data, tmp_path):
    base = ("--attention", "math", "--kernels", "reference")
    main(train_argv(tiny_data, tmp_path / "a", 2, 4, *base))
    main(train_argv(tiny_data, tmp_path / "b", 2, 4, *base, "--activation-checkpointing"))
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [loss for _, loss in a] == pytest.approx([loss for _, loss in b], rel=1e-5)


def test_bf16_autocast_on_cpu(tiny_data, tmp_path):
    summary = main(train_argv(tiny_data, tmp_path / "r", 2, 4, "--precision", "bf16"))
    assert summary["precision"] == "bf16" and math.isfinite(summary["final_loss"])


@pytest.mark.slow
def test_compile(tiny_data, tmp_path):
    base = ("--attention", "math", "--kernels", "reference")
    main(train_argv(tiny_data, tmp_path / "eager", 2, 4, *base))
    # aot_eager traces forward and backward as inductor does, without the C++ compile (minutes on 2 cores).
    main(train_argv(tiny_data, tmp_path / "compiled", 2, 4, *base, "--compile", "--compile-backend", "aot_eager"))
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert [loss for _, loss in compiled] == pytest.approx([loss for _, loss in eager], rel=1e-4)


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
    monkeypatch.setattr(train_mod, "_init_distributed", lambda device: None)
    monkeypatch.setattr(train_mod, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match=r"written by 1 rank\(s\) but this run has 2; .* resume with 1 process"):
        main(["--resume", str(tiny_run), "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu"])
