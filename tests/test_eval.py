"""python -m vatt_fast.eval: retrieval and linear probe from a checkpoint, and its errors."""

import json
import shutil
import subprocess

import pytest

from train_fixtures import PYTHON, subprocess_env, tiny_data_fixture, tiny_run_fixture  # noqa: F401
from vatt_fast.eval import load_model, main


def test_retrieval_matches_the_trainer(tiny_run, tiny_data, tmp_path, capsys):
    out = tmp_path / "r.json"
    res = main(["--checkpoint", str(tiny_run), "--data", str(tiny_data), "--task", "retrieval", "--workers", "0", "--device", "cpu", "--loader", "pyav",
                "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "t2v" in printed and "v2t" in printed and "v2a" in printed and "chance" in printed
    summary = json.loads((tiny_run / "summary.json").read_text())
    # The trainer's final evaluation used the same weights, split and protocol.
    assert res["t2v"]["r1"] == pytest.approx(summary["t2v_r1"])
    assert res["t2v"]["medr"] == pytest.approx(summary["t2v_medr"])
    assert res["v2a"]["r1"] == pytest.approx(summary["v2a_r1"])
    for task in ("t2v", "v2t", "v2a"):
        assert set(res[task]) >= {"r1", "r5", "r10", "medr"}
    assert json.loads(out.read_text())["chance"]["r1"] == pytest.approx(1 / 3)


def test_retrieval_from_a_lone_safetensors_file(tiny_run, tiny_data, tmp_path):
    weights = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_run / "checkpoints" / "step-00000004" / "model.safetensors", weights)
    res = main(["--checkpoint", str(weights), "--data", str(tiny_data), "--workers", "0", "--device", "cpu", "--loader", "pyav"])
    ref = main(["--checkpoint", str(tiny_run), "--data", str(tiny_data), "--workers", "0", "--device", "cpu", "--loader", "pyav"])
    assert res["t2v"] == ref["t2v"]


def test_linear_probe(tiny_run, tiny_data, capsys):
    res = main(["--checkpoint", str(tiny_run), "--data", str(tiny_data), "--task", "linear-probe", "--workers", "0", "--device", "cpu", "--loader", "pyav"])
    for name in ("video", "audio"):
        assert 0.0 <= res[name]["accuracy"] <= 1.0 and res[name]["num_classes"] >= 2
    assert res["train_clips"] == 21 and res["test_clips"] == 3
    assert "accuracy" in capsys.readouterr().out


def test_loaded_model_equals_trained_weights(tiny_run):
    import torch

    from vatt_fast.checkpoint import load_weights

    model = load_model(str(tiny_run), torch.device("cpu"))
    weights = load_weights(tiny_run / "checkpoints" / "step-00000004" / "model.safetensors")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    assert not model.training


def test_errors(tiny_run, tiny_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        main(["--checkpoint", str(tmp_path / "none"), "--data", str(tiny_data)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--checkpoint", str(tiny_run), "--data", str(tmp_path / "nodata")])
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    (other / "vocab.txt").write_text((other / "vocab.txt").read_text() + "extraword\n")
    with pytest.raises(ValueError, match="vocabulary of .* words but the checkpoint was trained with"):
        main(["--checkpoint", str(tiny_run), "--data", str(other)])


def test_unknown_task_names_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(tmp_path), "--task", "probe"])
    assert exc.value.code == 2
    assert "invalid choice: 'probe'" in capsys.readouterr().err


def test_cli_reports_errors_in_one_line(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "vatt_fast.eval", "--checkpoint", str(tmp_path / "x")],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.startswith("error: no checkpoint at")
