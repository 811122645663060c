"""Checkpoints: safetensors weights with aliases, RNG round trips, atomic writes, pruning, safe loading."""

import json
import pickle
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from vatt_fast.checkpoint import (
    STATE_NAME,
    WEIGHTS_NAME,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    read_meta,
    read_weights_config,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    save_weights,
    set_rng_state,
)
from vatt_fast.models import create_model


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = self.a  # the same module under two names (like the shared backbone)
        self.c = nn.Linear(3, 7)


def test_weights_round_trip_stores_shared_tensors_once(tmp_path):
    m = _Shared()
    path = tmp_path / "w.safetensors"
    save_weights(path, m.state_dict(), {"note": "x"})
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["note"] == "x"
    assert keys == {"a.weight", "a.bias", "c.weight", "c.bias"}
    loaded = load_weights(path)
    assert set(loaded) == set(m.state_dict())
    for k, v in m.state_dict().items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    fresh = _Shared()
    fresh.load_state_dict(loaded)
    torch.testing.assert_close(fresh.c.weight, m.c.weight, rtol=0, atol=0)


def test_rng_round_trip():
    state = rng_state()
    want = (torch.rand(4), np.random.rand(3), [random.random() for _ in range(3)])
    torch.rand(7), np.random.rand(2), random.random()
    set_rng_state(state)
    got = (torch.rand(4), np.random.rand(3), [random.random() for _ in range(3)])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2] == want[2]


def _model_and_opt():
    model = create_model("tiny", vocab_size=37, num_captions=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return model, opt


def test_save_load_round_trip(tmp_path):
    model, opt = _model_and_opt()
    root = tmp_path / "checkpoints"
    path = save_checkpoint(root, 7, model, opt, {"schedule": {"lr": 0.1}}, {"preset": "tiny"},
                           per_rank={"loader": {"epoch": 1, "batch": 3}})  # fmt: skip
    assert path == root / "step-00000007"
    assert read_meta(path)["step"] == 7 and read_meta(path)["preset"] == "tiny"
    cfg = read_weights_config(path / WEIGHTS_NAME)
    assert cfg == model.config

    model2, opt2 = create_model("tiny", vocab_size=37, num_captions=3), None
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    state = load_checkpoint(path, model2, opt2)
    assert state["step"] == 7 and state["schedule"] == {"lr": 0.1}
    assert state["per_rank"] == [{"loader": {"epoch": 1, "batch": 3}}] and len(state["rng"]) == 1
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(v2, v, rtol=0, atol=0, msg=k)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(s2[i][k], s1[i][k], rtol=0, atol=0)


def test_crash_mid_write_keeps_previous_latest(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    root = tmp_path / "checkpoints"
    first = save_checkpoint(root, 1, model, opt, {}, {})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(root, 2, model, opt, {}, {})
    monkeypatch.undo()
    assert find_latest(tmp_path) == first
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001"]
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # a failed write removes its partial folder
    (root / ".tmp-step-00000002-999-x").mkdir()  # what a killed writer leaves, never under step-*
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001"]
    save_checkpoint(root, 3, model, opt, {}, {})
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # cleaned up by the next save


def test_keep_last_and_resave_same_step(tmp_path):
    model, opt = _model_and_opt()
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8, 8):
        save_checkpoint(root, step, model, opt, {"k": step}, {}, keep=2)
    assert [p.name for p in list_checkpoints(root)] == ["step-00000006", "step-00000008"]
    assert find_latest(tmp_path).name == "step-00000008"


def test_loading_refuses_pickled_objects(tmp_path):
    model, opt = _model_and_opt()
    path = save_checkpoint(tmp_path / "checkpoints", 1, model, opt, {}, {})
    state = torch.load(path / STATE_NAME, weights_only=True)
    state["evil"] = _Shared  # a class: only a full unpickler would rebuild it
    torch.save(state, path / STATE_NAME)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path, create_model("tiny", vocab_size=37, num_captions=3))


def test_resolve_checkpoint(tmp_path):
    model, opt = _model_and_opt()
    path = save_checkpoint(tmp_path / "checkpoints", 5, model, opt, {}, {})
    assert resolve_checkpoint(tmp_path) == path
    assert resolve_checkpoint(path) == path
    assert resolve_checkpoint(path / WEIGHTS_NAME) == path / WEIGHTS_NAME
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path / "nowhere")
    assert json.loads((path / "meta.json").read_text())["world_size"] == 1


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    """Temporary files are 0600; what lands under the final name is 0666 less the umask, as open() gives."""
    import os
    import stat

    from vatt_fast.io import atomic_path, atomic_write

    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "d", directory=True) as d:
            (d / "f").write_text("y")
        (tmp_path / "plain.txt").write_text("z")
    finally:
        os.umask(umask)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "plain.txt") == 0o644
    assert mode(tmp_path / "d") == 0o755
