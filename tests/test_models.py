"""The VATT model: presets, parameter counts against the release, batch contract, bad input."""

import pytest
import torch

from vatt_fast.models import PRESETS, create_model, get_config


def _batch(cfg, B=3, K=None, device="cpu", dtype=torch.uint8):
    K = K or cfg.num_captions
    g = torch.Generator().manual_seed(1)
    video = torch.randint(0, 256, (B, cfg.num_frames, cfg.frame_size, cfg.frame_size, 3), generator=g, dtype=torch.uint8)
    text = torch.randint(1, cfg.vocab_size, (B, K, cfg.caption_len), generator=g)
    text[:, :, -2:] = 0  # padding at the end of every caption
    text[0, -1] = 0  # a missing caption
    return {
        "video": video.to(device=device, dtype=dtype),
        "audio": torch.randn(B, cfg.audio_samples, generator=g).to(device),
        "text": text.to(device),
        "text_mask": (text != 0).any(-1).to(device),
    }


# Parameter counts of the release (VATT_SPEC.md / issue 2), each encoder with its tokenizer
# and position embedding; text without the word table.
RELEASE_COUNTS = [
    ("base", "video", 87.4e6),
    ("base", "audio", 86.1e6),
    ("medium", "video", 154.3e6),
    ("large", "video", 305.5e6),
    ("medium", "text", 19.0e6),
]


@pytest.mark.parametrize("preset,part,expected", RELEASE_COUNTS)
def test_parameter_counts_match_release(preset, part, expected):
    with torch.device("meta"):
        model = create_model(preset)
    n = model.num_params(part, exclude_word_table=(part == "text"))
    assert abs(n - expected) / expected < 0.005, f"{preset}/{part}: {n / 1e6:.2f}M vs release {expected / 1e6:.1f}M"


def test_ma_medium_shares_one_backbone():
    with torch.device("meta"):
        model = create_model("ma-medium")
    bb = {id(model.encoders[k].backbone) for k in ("video", "audio", "text")}
    assert len(bb) == 1
    # Each modality keeps its own tokenizer and aggregation token.
    assert model.encoders["video"].adapter.agg_token is not model.encoders["audio"].adapter.agg_token
    # The shared backbone is counted once: about Medium + three tokenizers + heads.
    assert model.num_params() < 1.2 * 154.3e6 + 60e6


def test_every_preset_is_consistent():
    for name in PRESETS:
        cfg = get_config(name)
        assert cfg.num_video_tokens == cfg.video_grid[0] * cfg.video_grid[1] * cfg.video_grid[2]
        assert cfg.audio_samples % cfg.audio_patch == 0
    medium = get_config("medium")
    assert medium.num_video_tokens == 1568 and medium.num_audio_tokens == 1200 and medium.audio_samples == 153_600


def test_tiny_forward_backward_contract():
    cfg = get_config("tiny")
    model = create_model("tiny")
    batch = _batch(cfg, B=4)
    out = model(batch)
    assert out["video_va"].shape == (4, cfg.va_dim)
    assert out["audio_va"].shape == (4, cfg.va_dim)
    assert out["video_vt"].shape == (4, cfg.vt_dim)
    assert out["text_vt"].shape == (4, cfg.num_captions, cfg.vt_dim)
    assert out["video_features"].shape == (4, cfg.video_encoder.dim)
    assert out["text_features"].shape == (4, cfg.num_captions, cfg.text_encoder.dim)
    assert all(torch.isfinite(v).all() for v in out.values())
    loss = sum(v.float().pow(2).mean() for v in out.values())
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None for g in grads)


def test_droptoken_only_in_training():
    cfg = get_config("tiny", drop_token=0.5)
    model = create_model(cfg)
    batch = _batch(cfg, B=2)
    model.eval()
    a = model(batch)["video_va"]
    b = model(batch)["video_va"]
    torch.testing.assert_close(a, b)  # eval: no random token drop
    model.train()
    tokens = model.encoders["video"].patch_embed(batch["video"])
    kept = model.encoders["video"].drop_token.sample_keep(2, tokens.shape[1], tokens.device)
    assert kept.shape[-1] == cfg.num_video_tokens // 2


def test_subset_of_modalities_and_float_video():
    cfg = get_config("tiny")
    model = create_model("tiny").eval()
    batch = _batch(cfg, B=2)
    only_video = model({"video": batch["video"]})
    assert set(only_video) == {"video_features", "video_va", "video_vt"}
    # Raw float pixels give the same result as uint8 pixels.
    as_float = model({"video": batch["video"].float()})
    torch.testing.assert_close(only_video["video_vt"], as_float["video_vt"], rtol=1e-4, atol=1e-4)


def test_missing_caption_is_finite():
    cfg = get_config("tiny")
    model = create_model("tiny").eval()
    batch = _batch(cfg, B=2)
    batch["text"][1] = 0  # clip 1 has no caption at all
    out = model({"text": batch["text"]})
    assert torch.isfinite(out["text_vt"]).all()


def test_ma_tiny_runs():
    model = create_model("tiny", shared_backbone=True)
    cfg = model.config
    out = model(_batch(cfg, B=2))
    assert out["text_vt"].shape == (2, cfg.num_captions, cfg.vt_dim)
    out["video_va"].sum().backward()


def test_state_dict_round_trip():
    a = create_model("tiny").eval()
    b = create_model("tiny").eval()
    b.load_state_dict(a.state_dict())
    batch = _batch(a.config, B=2)
    torch.testing.assert_close(a(batch)["video_vt"], b(batch)["video_vt"])


def test_attention_backend_switch_keeps_output():
    model = create_model("tiny").eval()
    batch = _batch(model.config, B=2)
    ref = model.set_attention_backend("math")(batch)
    out = model.set_attention_backend("sdpa")(batch)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4)


def test_grad_checkpointing_same_grads():
    torch.manual_seed(0)
    model = create_model("tiny")
    batch = _batch(model.config, B=2)
    model.eval()  # no randomness between the two passes
    model(batch)["video_vt"].sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(batch)["video_vt"].sum().backward()
    for n, g in ref.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-5, atol=1e-6)


# --- bad input ------------------------------------------------------------------------------


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*tiny"):
        create_model("huge")


def test_unknown_override():
    with pytest.raises(TypeError, match="unknown config field"):
        create_model("tiny", widht=3)


def test_mismatched_batch_sizes():
    cfg = get_config("tiny")
    model = create_model("tiny")
    batch = _batch(cfg, B=3)
    batch["audio"] = batch["audio"][:2]
    with pytest.raises(ValueError, match=r"different batch sizes.*'video': 3.*'audio': 2"):
        model(batch)


def test_token_ids_out_of_vocabulary():
    cfg = get_config("tiny")
    model = create_model("tiny")
    batch = _batch(cfg, B=2)
    batch["text"][0, 0, 0] = cfg.vocab_size + 5
    with pytest.raises(ValueError, match=str(cfg.vocab_size + 5)):
        model(batch)


def test_token_id_dtype():
    cfg = get_config("tiny")
    model = create_model("tiny").eval()
    batch = _batch(cfg, B=2)
    with torch.no_grad():
        ref = model(batch)["text_vt"]
        torch.testing.assert_close(model({**batch, "text": batch["text"].int()})["text_vt"], ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expects int64 word ids, got dtype torch.float32.*Vocabulary.encode"):
        model({**batch, "text": batch["text"].float()})


def test_wrong_channel_count():
    cfg = get_config("tiny")
    model = create_model("tiny")
    video = torch.zeros(2, cfg.num_frames, cfg.frame_size, cfg.frame_size, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\(2, 8, 32, 32, 4\)"):
        model({"video": video})


def test_frames_not_divisible_by_tubelet():
    cfg = get_config("tiny")
    model = create_model("tiny")
    video = torch.zeros(2, cfg.num_frames + 1, cfg.frame_size, cfg.frame_size, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=str(cfg.num_frames + 1)):
        model({"video": video})


def test_bad_preset_geometry():
    with pytest.raises(ValueError, match="does not divide num_frames 9"):
        get_config("tiny", num_frames=9)
