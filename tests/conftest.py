"""Session fixtures shared by the test modules: small datasets, one trained run, a config file.

Each is built once per session, on first use. The builders live in ``data_helpers`` and
``train_helpers`` and are imported inside the fixtures, so collecting a test module
that needs none of them (on a GPU machine without PyAV, say) imports no media library.
The device fixture and the Triton interpreter switch are in the root ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest


# --- data tests --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset (16 videos: 14 train, 2 val)."""
    from vatt_fast.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("data") / "synthetic", videos=16, seed=3, workers=1)


@pytest.fixture(scope="session")
def timed_dir(tmp_path_factory) -> Path:
    """Videos whose frames, audio and captions encode time (``data_helpers.timed_level``/``timed_audio``)."""
    from data_helpers import build_timed

    return build_timed(tmp_path_factory.mktemp("data") / "timed")


@pytest.fixture(scope="session")
def bad_dir(synthetic_dir, tmp_path_factory) -> Path:
    """One good record, one per bad-data kind (``data_helpers.BAD_IDS``), one row missing ``duration``."""
    from data_helpers import build_bad

    return build_bad(synthetic_dir, tmp_path_factory.mktemp("data") / "bad")


@pytest.fixture(scope="session")
def zoo_dir(synthetic_dir, tmp_path_factory) -> Path:
    """Every broken media kind of ``data_helpers.ZOO``, each after a valid record (ids ``good_<k>``)."""
    from data_helpers import build_zoo

    return build_zoo(synthetic_dir, tmp_path_factory.mktemp("data") / "zoo")


# --- trainer and evaluation tests ---------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """24 small videos (21 train, 3 val) in the vatt_fast layout."""
    from train_helpers import SYNTH_KW
    from vatt_fast.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("synthetic") / "data"
    generate_synthetic(out, **SYNTH_KW)
    return out


@pytest.fixture(scope="session")
def learn_data(tmp_path_factory) -> Path:
    """128 small videos (112 train, 16 val): enough for a 120-step run to show learning."""
    from train_helpers import SYNTH_KW
    from vatt_fast.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("synthetic-learn") / "data"
    generate_synthetic(out, **{**SYNTH_KW, "videos": 128})
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """The run folder of a 4-step tiny training run on ``tiny_data``."""
    from train_helpers import train_argv
    from vatt_fast.train import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    main(train_argv(tiny_data, out, 4))
    return out


@pytest.fixture(scope="session")
def stable_adam(tmp_path_factory) -> str:
    """A ``--config`` file raising Adam's eps from 1e-7 to 0.1, for runs compared step by step.

    With eps 1e-7 the first Adam update ``lr * g / (|g| + eps)`` turns rounding noise in a
    gradient that is mathematically ~0 into a full-size step of either sign, so two
    correct runs that sum in a different order drift apart from step 2 on. With eps 0.1
    an error ``delta`` in a gradient moves a weight by at most ``lr / 0.1 * delta``.
    tests/test_train_distributed.py measures and explains the resulting tolerances.
    """
    path = tmp_path_factory.mktemp("cfg") / "stable_adam.yaml"
    path.write_text("model:\n  adam_eps: 0.1\n")
    return str(path)
