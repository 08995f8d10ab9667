"""Session-scoped tiny models (built from configs, seeded; exports cached once per session)."""

from __future__ import annotations

import pytest

try:
    import diffusers  # noqa: F401
    import torch

    torch.set_num_threads(1)
except ImportError:  # a runtime-only install: integration tests need the torch extras
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny diffusers-format SD 1.x-shaped pipeline directory."""
    from iap_rt.train.tiny import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd", seed=0)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """A tiny chinese_encoder/ (2-layer BERT + projection to 32, real WordPiece vocab)."""
    from iap_rt.train.tiny import make_tiny_encoder

    return make_tiny_encoder(tmp_path_factory.mktemp("tiny") / "encoder", seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_sd_dir, tiny_encoder_dir, tmp_path_factory):
    """The tiny base + encoder exported (fp32) to an iap-rt model directory. Read-only!"""
    from iap_rt.export.stage import export_model_dir

    return export_model_dir(
        tiny_sd_dir, tiny_encoder_dir, tmp_path_factory.mktemp("tiny") / "model", model_id="tiny"
    )
