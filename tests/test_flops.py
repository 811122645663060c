"""FLOP counts of vatt_fast.flops: a hand count for tiny, torch's FlopCounterMode on real models, the paper's figure."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vatt_fast.flops import clip_flops, encoder_layer_flops, kept_tokens, tokens_per_clip, train_step_flops
from vatt_fast.models import create_model, get_config


def test_tiny_hand_count():
    # tiny: d=128, MLP 512, depth 2 everywhere; video 8x32x32 in 2x8x8 tubelets = 64 tokens,
    # audio 0.8 s at 8 kHz in 128-sample patches = 50 tokens, DropToken 0.5 -> 32 and 25 kept;
    # text: 2 captions of 8 words; heads va=128, vt=64.
    layer = lambda n: 8 * n * 128 * 128 + 4 * n * n * 128 + 4 * n * 128 * 512  # noqa: E731
    video = 2 * layer(32 + 1) + 2 * 32 * (2 * 8 * 8 * 3) * 128
    audio = 2 * layer(25 + 1) + 2 * 25 * 128 * 128
    text = 2 * (2 * layer(8 + 1))
    heads = 2 * (128 * 128 + 128 * 128 + 128 * 64) + 2 * 128 * 128 + 2 * 2 * 128 * 64
    assert (video, audio, text, heads) == (30_213_120, 21_958_656, 14_321_664, 147_456)
    got = clip_flops("tiny", train=True)
    assert (got.video, got.audio, got.text, got.heads, got.loss) == (video, audio, text, heads, 0)
    assert got.total == 66_640_896
    assert tokens_per_clip("tiny") == {"video": 32, "audio": 25, "text": 16, "total": 73}


def test_layer_formula_by_terms():
    n, d, m = 7, 12, 40
    terms = 2 * n * d * 3 * d + 2 * n * n * d + 2 * n * n * d + 2 * n * d * d + 2 * n * d * m * 2
    assert encoder_layer_flops(n, d, m) == terms


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"word_dim": 24, "num_captions": 3, "caption_len": 5, "drop_token": 0.3},
        {"shared_backbone": True, "num_frames": 16, "frame_size": 24},
    ],
)
@pytest.mark.parametrize("train", [True, False])
def test_matches_torch_flop_counter(overrides, train):
    """Our formula against torch's own count of every matmul/conv the model runs (math attention)."""
    model = create_model("tiny", vocab_size=50, **overrides).set_attention_backend("math").set_kernel_impl("reference")
    model.train(train)
    cfg = model.config
    B = 3
    batch = {
        "video": torch.randint(0, 256, (B, cfg.num_frames, cfg.frame_size, cfg.frame_size, 3), dtype=torch.uint8),
        "audio": torch.randn(B, cfg.audio_samples),
        "text": torch.randint(1, 50, (B, cfg.num_captions, cfg.caption_len)),
    }
    with FlopCounterMode(display=False) as counter:
        model(batch)
    assert counter.get_total_flops() == B * clip_flops(cfg, train=train).total


def test_paper_figures():
    # VATT_SPEC.md: MBS with DropToken 0.5 about 396 GFLOPs per clip forward, 855 without.
    assert clip_flops("medium", train=True).total / 1e9 == pytest.approx(396, rel=0.02)
    assert clip_flops("medium", train=False).total / 1e9 == pytest.approx(855, rel=0.02)


def test_train_step_is_three_forwards_plus_loss():
    cfg = get_config("base")
    G = 37
    fwd = clip_flops(cfg, train=True).total
    loss = 2 * G * (cfg.va_dim + cfg.num_captions * cfg.vt_dim)
    assert train_step_flops(cfg, G) == 3 * G * (fwd + loss)


def test_kept_tokens_matches_droptoken():
    from vatt_fast.nn.embed import DropToken

    for n, rate in [(1568, 0.5), (50, 0.9), (7, 0.3), (1, 0.5), (1200, 0.0)]:
        assert kept_tokens(n, rate) == (DropToken(rate).num_kept(n) if rate else n)
