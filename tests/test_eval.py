"""python -m vatt_fast.eval: retrieval and linear probe from a checkpoint, against features computed
here without vatt_fast.eval or the trainer's evaluate(); and its errors."""

import json
import shutil
import subprocess

import pytest
import torch
from test_metrics import brute_force_retrieval, metrics_from_ranks

from train_helpers import PYTHON, subprocess_env
from vatt_fast.checkpoint import WEIGHTS_NAME, load_weights, read_weights_config, resolve_checkpoint
from vatt_fast.data.loader import build_loader
from vatt_fast.eval import load_model, main
from vatt_fast.metrics import linear_probe
from vatt_fast.models.vatt import VATT

CPU = ["--workers", "0", "--device", "cpu", "--loader", "pyav"]


@torch.no_grad()
def embed_split(run_dir, data, split, batch_size):
    """The checkpoint's model (rebuilt from its weights file, eval mode, fp32) over one ordered pass of ``split``."""
    weights = resolve_checkpoint(run_dir) / WEIGHTS_NAME
    model = VATT(read_weights_config(weights))
    model.load_state_dict(load_weights(weights))
    model.eval()
    loader = build_loader(data, split, batch_size, preset=model.config, backend="pyav", num_workers=0, train=False,
                          drop_last=False, seed=0, rank=0, world_size=1)  # fmt: skip
    parts = {}
    for batch in loader:
        out = model(batch)
        for key, value in [*out.items(), *((k, batch[k]) for k in ("text_mask", "label", "index"))]:
            parts.setdefault(key, []).append(value)
    return {k: torch.cat(v) for k, v in parts.items()}


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


def test_retrieval_equals_brute_force_on_features_computed_here(tiny_run, tiny_data):
    """On the 21-clip train split (up to 2 captions each, 3 batches): more queries than val's 3 clips."""
    res = main(["--checkpoint", str(tiny_run), "--data", str(tiny_data), "--split", "train", "--batch-size", "8", *CPU])
    feats = embed_split(tiny_run, tiny_data, "train", 8)
    assert sorted(feats["index"].tolist()) == list(range(len(feats["index"])))  # each clip once
    ranks = brute_force_retrieval(feats["video_vt"], feats["text_vt"], feats["text_mask"], feats["video_va"], feats["audio_va"])
    assert len(ranks["v2a"]) == 21 and len(ranks["t2v"]) == int(feats["text_mask"].sum())
    for task in ("t2v", "v2t", "v2a"):
        assert res[task] == pytest.approx(metrics_from_ranks(ranks[task]), rel=1e-12), task
    assert res["chance"]["candidates"] == 21


def test_linear_probe_equals_a_probe_on_features_computed_here(tiny_run, tiny_data, capsys):
    res = main(["--checkpoint", str(tiny_run), "--data", str(tiny_data), "--task", "linear-probe", "--batch-size", "8", *CPU])
    assert "accuracy" in capsys.readouterr().out
    train, test = embed_split(tiny_run, tiny_data, "train", 8), embed_split(tiny_run, tiny_data, "val", 8)
    assert bool((train["label"] >= 0).all()) and bool((test["label"] >= 0).all())
    assert res["train_clips"] == len(train["label"]) == 21 and res["test_clips"] == len(test["label"]) == 3
    for name in ("video", "audio"):
        key = f"{name}_features"
        want = linear_probe(train[key], train["label"], test[key], test["label"], weight_decay=1e-4)
        assert res[name] == pytest.approx(want, rel=1e-9), name


def test_loaded_model_equals_trained_weights(tiny_run):
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
