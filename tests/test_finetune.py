"""python -m vatt_fast.finetune: the head, position interpolation, loading a pretraining checkpoint, the
schedule, the multi-view test, resume, 2 ranks against one process, and bad labels."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import PYTHON, read_rows, subprocess_env
from vatt_fast.checkpoint import find_latest, load_weights, read_weights_config
from vatt_fast.data.manifest import VideoRecord, read_manifest, record_from_json, record_to_json
from vatt_fast.finetune import main
from vatt_fast.finetuning import (
    Classifier,
    build_label_space,
    load_pretrained,
    make_views,
    mean_average_precision,
    predict_views,
    topk_accuracy,
)
from vatt_fast.finetuning.evaluate import average_precision
from vatt_fast.models.config import get_config
from vatt_fast.models.vatt import VATT
from vatt_fast.nn.embed import interpolate_pos_table


def ft_argv(checkpoint, data, out, steps=3, batch_size=4, *extra):
    """A fast in-process CPU fine-tuning run (no workers, no periodic test, 3 classes of views fewer)."""
    return [
        "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--steps", str(steps),
        "--batch-size", str(batch_size), "--log-every", "1", "--eval-every", "0", "--workers", "0", "--no-progress",
        "--peak-tflops", "0.1", "--device", "cpu", "--loader", "pyav", "--num-classes", "16", "--attention", "math",
        "--test-temporal-views", "2", *extra,
    ]  # fmt: skip


def _video(b, t, h, w):
    return torch.randint(0, 256, (b, t, h, w, 3), dtype=torch.uint8)


# --- model ---------------------------------------------------------------------------------
def test_head_shapes_and_position_interpolation():
    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=50)
    for modality, x in (("video", _video(3, 8, 32, 32)), ("audio", torch.randn(3, cfg.audio_samples))):
        logits = Classifier(cfg.replace(drop_token=0.0), modality, 5).eval()(x)
        assert logits.shape == (3, 5) and torch.all(logits == 0)  # zero-initialised head: uniform start

    pretrained = VATT(cfg).eval()
    weights = pretrained.state_dict()
    # 16 frames of 48x48 with 2x8x8 tubelets: grid 8x6x6 instead of 4x4x4; audio 1.6 s: 100 tokens instead of 50.
    new = cfg.replace(num_frames=16, frame_size=48, drop_token=0.0)
    video, audio = _video(2, 16, 48, 48), torch.randn(2, new.audio_samples)
    for modality, x, keys in (("video", video, {"t": 8, "h": 6, "w": 6}), ("audio", audio, {"": 100})):
        model = Classifier(new, modality, 4).eval()
        report = load_pretrained(model, weights)
        pe = model.encoder.patch_embed
        for axis, n in keys.items():
            name = f"pos_embed_{axis}" if axis else "pos_embed"
            old = weights[f"encoders.{modality}.patch_embed.{name}"]
            assert getattr(pe, name).shape == (n, 128)
            assert report["interpolated"][f"encoder.patch_embed.{name}"] == [old.shape[0], n]
            torch.testing.assert_close(getattr(pe, name).detach(), interpolate_pos_table(old, n), rtol=0, atol=0)
        # The loaded tables give what the pretrained encoder computes at the new geometry on the fly.
        with torch.no_grad():
            ours, _ = model.encoder(x)
            ref, _ = pretrained.encoders[modality](x)
        torch.testing.assert_close(ours, ref)


def test_load_from_pretraining_checkpoint(tiny_run, tiny_data, tmp_path):
    ckpt = find_latest(tiny_run)
    weights = load_weights(ckpt / "model.safetensors")
    model = Classifier(read_weights_config(ckpt / "model.safetensors").replace(drop_token=0.0), "video", 16)
    report = load_pretrained(model, weights)
    video_keys = [k for k in weights if k.startswith("encoders.video.")]
    assert report["loaded"] == len(video_keys) and report["missing"] == ["head.bias", "head.weight"]
    assert sorted(report["unused"]) == sorted(set(weights) - set(video_keys))  # every other key listed
    assert {"encoders.audio", "encoders.text"} <= set(report["unused_groups"])
    state = model.state_dict()
    for k in video_keys:
        torch.testing.assert_close(state["encoder." + k[len("encoders.video."):]], weights[k], rtol=0, atol=0)
    # A checkpoint of another width: every shape mismatch is an error naming the keys and the fix.
    wide = VATT(get_config("tiny", vocab_size=50, video_encoder=dict(depth=2, dim=64, num_heads=1, mlp_dim=128)))
    with pytest.raises(ValueError, match=r"have another shape \(encoder\..*: checkpoint \(1, 1, 64\), model \(1, 1, 128\).*--preset"):
        load_pretrained(model, wide.state_dict())
    # A checkpoint without the encoder (e.g. another model's file) is an error, not a silent skip.
    with pytest.raises(ValueError, match=r"missing \d+ key"):
        load_pretrained(model, {k: v for k, v in weights.items() if "backbone.blocks.0." not in k})
    # The command line refuses another preset, naming both and the fix, before building anything.
    with pytest.raises(ValueError, match=r"pretrained with preset 'tiny'.*--preset 'base'.*--preset tiny"):
        main(ft_argv(tiny_run, tiny_data, tmp_path / "x", 1, 4, "--preset", "base"))


# --- recipe, resume ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight(tiny_run, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "straight"
    summary = main(ft_argv(tiny_run, tiny_data, out, 6, 4, "--warmup-steps", "2", "--lr", "0.01", "--end-lr", "0.001"))
    return out, summary


def test_schedule_follows_warmup_then_cosine(straight):
    out, summary = straight
    rows = read_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    lr, end, warm, total = 0.01, 0.001, 2, 6
    for r in rows:
        s = r["step"] - 1  # the update about to be made
        want = lr * (s + 1) / warm if s < warm else end + (lr - end) * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        assert r["lr"] == pytest.approx(want, rel=1e-12)
    meta = json.loads((find_latest(out) / "meta.json").read_text())
    assert meta["args"]["momentum"] == 0.9 and meta["args"]["grad_clip"] == 0.75 and meta["args"]["label_smoothing"] == 0.1
    assert meta["finetune"]["classes"] == list(range(16)) and meta["pretrained"]["missing"] == ["head.bias", "head.weight"]
    for key in ("top1", "top5", "single_view_top1", "single_view_top5", "test_views", "wall_s"):
        assert summary[key] is not None
    assert summary["test_views"] == 2 * 3 and (out / "curves.png").is_file() and (out / "pretrained_keys.json").is_file()


def test_resume_is_exact(straight, tiny_run, tiny_data, tmp_path):
    ref, _ = straight
    out = tmp_path / "resumed"
    argv = ft_argv(tiny_run, tiny_data, out, 3, 4, "--warmup-steps", "2", "--lr", "0.01", "--end-lr", "0.001",
                   "--total-steps", "6")  # fmt: skip
    main(argv)
    main(["--resume", "auto", "--out", str(out), "--steps", "6", "--log-every", "1", "--workers", "0",
          "--no-progress", "--device", "cpu", "--loader", "pyav", "--peak-tflops", "0.1"])  # fmt: skip
    # The steps before the resume match bit for bit; from the first resumed step on (its forward
    # included: with ATEN_CPU_CAPABILITY=default the loss of step 4 differs by 9e-8 relative) the
    # rebuilt model's buffers sit at other addresses and the CPU kernels may block differently
    # (measured: grad norm and loss rel 1e-7, weights 7e-9). A lost momentum buffer or schedule,
    # or a replayed batch, moves the loss by 1e-3 or more.
    ours, theirs = [r["loss"] for r in read_rows(out)], [r["loss"] for r in read_rows(ref)]
    assert ours[:3] == theirs[:3] and ours == pytest.approx(theirs, rel=1e-6, abs=0)
    a = load_file(str(find_latest(out) / "model.safetensors"))
    b = load_file(str(find_latest(ref) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=lambda m, n=k: f"{n}: {m}")


# --- test protocol -------------------------------------------------------------------------
def test_multi_view_average_matches_explicit_loop():
    torch.manual_seed(1)
    cfg = get_config("tiny", vocab_size=50).replace(drop_token=0.0)
    model = Classifier(cfg, "video", 7).eval()
    torch.nn.init.normal_(model.head.weight)
    long_video = _video(3, 13, 37, 37)  # 13 frames, square of 37: windows of 8 at 0, 2, 3, 5; crops of 32 at 0, 2, 5
    views = make_views(long_video, num_frames=8, frame_size=32, temporal=4, spatial=3)
    assert views.shape == (3, 12, 8, 32, 32, 3)
    got = predict_views(model, views, False, torch.device("cpu"), chunk=5)
    for b in range(3):
        probs = []
        for t in (0, 2, 3, 5):
            for x in (0, 2, 5):
                clip = long_video[b : b + 1, t : t + 8, 2 : 2 + 32, x : x + 32]
                with torch.no_grad():
                    probs.append(torch.softmax(model(clip), dim=1)[0])
        torch.testing.assert_close(got[b], torch.stack(probs).mean(0))
    # The single view is the centre window's centre crop.
    single = make_views(long_video, num_frames=8, frame_size=32)
    assert torch.equal(single[:, 0], long_video[:, 2:10, 2:34, 2:34])
    # Audio: the same windows over the waveform (800 samples per frame for tiny), no crops.
    audio = torch.randn(2, 13 * 800)
    aviews = make_views(audio, num_frames=8, temporal=4, samples_per_frame=800)
    assert torch.equal(aviews[:, 1], audio[:, 2 * 800 : 10 * 800])


def test_topk_and_map_against_brute_force():
    torch.manual_seed(2)
    probs = torch.rand(9, 6)
    labels = torch.randint(0, 6, (9,))
    ranks = (probs > probs.gather(1, labels[:, None])).sum(1)  # classes scored above the true one
    assert topk_accuracy(probs, labels, 1) == pytest.approx(float((ranks < 1).float().mean()))
    assert topk_accuracy(probs, labels, 5) == pytest.approx(float((ranks < 5).float().mean()))
    multi = (torch.rand(9, 6) < 0.4).float()
    multi[0] = 1.0  # every class has a positive
    aps = []
    for c in range(6):
        pos = [i for i in range(9) if multi[i, c] > 0]
        # AP = mean over positives of (positives scored >= it) / (clips scored >= it)
        aps.append(sum(sum(multi[j, c] > 0 and probs[j, c] >= probs[i, c] for j in range(9))
                       / sum(probs[j, c] >= probs[i, c] for j in range(9)) for i in pos) / len(pos))  # fmt: skip
    assert mean_average_precision(probs, multi) == pytest.approx(float(sum(aps) / 6))
    assert average_precision(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([False, True, True])) == pytest.approx(
        (1 / 2 + 2 / 3) / 2
    )


# --- distributed ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_match_one_process(tiny_run, tiny_data, tmp_path):
    single = tmp_path / "single"
    argv = ft_argv(tiny_run, tiny_data, single, 3, 8, "--warmup-steps", "1")
    main(argv)
    dist_out = tmp_path / "ddp"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vatt_fast.finetune",
           *ft_argv(tiny_run, tiny_data, dist_out, 3, 8, "--warmup-steps", "1")]  # fmt: skip
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = read_rows(single), read_rows(dist_out)
    assert [r["step"] for r in two] == [1, 2, 3]
    # Same weights, same clips and augmentation draws: only the summation order differs (SGD has no
    # eps to amplify it; see tests/test_train_distributed.py for how the tolerances were sized).
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    a = load_file(str(find_latest(dist_out) / "model.safetensors"))
    b = load_file(str(find_latest(single) / "model.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=lambda m, n=k: f"{n}: {m}")
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (single, dist_out))
    assert s2["world_size"] == 2 and s2["eval_clips"] == s1["eval_clips"]
    assert s2["top1"] == pytest.approx(s1["top1"]) and s2["single_view_top1"] == pytest.approx(s1["single_view_top1"])


# --- bad input -----------------------------------------------------------------------------
def _rec(i, label=None, split="train", labels=None):
    return VideoRecord(id=f"v{i}", video="v.webm", audio="a.flac", duration=2.0, label=label, split=split, labels=labels)


def test_bad_labels_name_the_value_and_the_fix():
    train = [_rec(i, i % 3) for i in range(6)]
    with pytest.raises(ValueError, match=r"2 of the 8 rows of the 'train' split have no label \('v6', 'v7'\).*\"label\""):
        build_label_space(train + [_rec(6), _rec(7)])
    with pytest.raises(ValueError, match=r"single class \(label 4 on all 3 rows\).*at least 2 classes.*--num-classes"):
        build_label_space([_rec(i, 4) for i in range(3)])
    with pytest.raises(ValueError, match=r"row 'v9' of the 'val' split has label 17, out of range for --num-classes 16 "
                                         r"\(classes 0\.\.15\); pass --num-classes 18"):  # fmt: skip
        build_label_space(train, [_rec(9, 17, "val")], num_classes=16)
    with pytest.raises(ValueError, match=r"row 'v2' of the 'train' split has label -2: labels are class indices >= 0"):
        build_label_space(train[:2] + [_rec(2, -2)])
    with pytest.raises(ValueError, match=r"'val' split has label\(s\) \[5, 8\] that the train split never has \(e\.g\. row "
                                         r"'v10'\).*--num-classes"):  # fmt: skip
        build_label_space(train, [_rec(10, 5, "val"), _rec(11, 8, "val"), _rec(12, 1, "val")])
    space = build_label_space([_rec(0, 7), _rec(1, 3)], [_rec(2, 7, "val")])
    assert space.classes == [3, 7] and space.targets([_rec(2, 7, "val")]).tolist() == [1]


def test_multi_label_rows(tmp_path):
    row = {"id": "a", "video": "a.webm", "audio": "a.flac", "duration": 1.0, "captions": [], "label": [3, 1]}
    rec = record_from_json(row, tmp_path)
    assert rec.labels == [3, 1] and rec.label is None and record_to_json(rec, tmp_path)["label"] == [3, 1]
    space = build_label_space([rec, _rec(1, 2)])
    assert space.multi_label and space.classes == [1, 2, 3]
    assert space.targets([rec, _rec(1, 2)]).tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def test_cli_rejects_out_of_range_labels_before_training(tiny_run, tiny_data, tmp_path):
    assert max(r.label for r in read_manifest(tiny_data, "train")) >= 2
    with pytest.raises(ValueError, match=r"has label \d+, out of range for --num-classes 2 \(classes 0\.\.1\); pass --num-cl"):
        main(ft_argv(tiny_run, tiny_data, tmp_path / "bad", 1, 4, "--num-classes", "2"))
    assert not (tmp_path / "bad").exists()  # failed before the run folder was made
