"""The Chinese text encoder IAP trains: a BERT/RoBERTa-style encoder + a projection.

On disk (``chinese_encoder/``, what ``iap-rt train`` writes and ``iap-rt export`` reads)::

    config.json            Hugging Face config of the encoder (model_type bert/roberta/...)
    model.safetensors      encoder weights (a "bert." prefix and MLM heads are tolerated)
    projection.safetensors {"weight": (D, hidden), "bias": (D,)} when hidden != D
    iap_encoder.json       {"projection_dim": D or null, "max_length": S}
    tokenizer.json         HF tokenizers file (WordPiece) + vocab.txt

Weights are read and written as safetensors only; configs are loaded locally with
``AutoConfig`` (no ``trust_remote_code``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from iap_rt.errors import ArtifactError, ArtifactNotFoundError, ConfigError
from iap_rt.fileio import atomic_path, ensure_dir, write_json_atomic

META = "iap_encoder.json"


class ChineseTextEncoder(nn.Module):
    """``input_ids, attention_mask -> (N, S, D)`` embeddings for the UNet's cross-attention."""

    def __init__(self, config, projection_dim: int | None = None, max_length: int = 77):
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_config(config, add_pooling_layer=False)
        hidden = config.hidden_size
        self.max_length = int(max_length)
        self.projection = (
            nn.Linear(hidden, projection_dim)
            if projection_dim is not None and projection_dim != hidden
            else None
        )

    @property
    def output_dim(self) -> int:
        if self.projection is not None:
            return self.projection.out_features
        return self.encoder.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.projection(h) if self.projection is not None else h  # (N, S, D)

    # ---- files --------------------------------------------------------------------
    def save(self, out: str | os.PathLike, tokenizer=None) -> Path:
        """Write the directory layout above (``tokenizer``: a ``tokenizers.Tokenizer``)."""
        out = ensure_dir(out)
        write_json_atomic(out / "config.json", self.encoder.config.to_dict())
        state = {k: v.detach().contiguous() for k, v in self.encoder.state_dict().items()}
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(state, str(tmp))
        if self.projection is not None:
            proj = {k: v.detach().contiguous() for k, v in self.projection.state_dict().items()}
            with atomic_path(out / "projection.safetensors") as tmp:
                save_file(proj, str(tmp))
        write_json_atomic(
            out / META,
            {
                "projection_dim": self.projection.out_features if self.projection else None,
                "max_length": self.max_length,
            },
        )
        if tokenizer is not None:
            from iap_rt.fileio import write_text_atomic

            write_text_atomic(out / "tokenizer.json", tokenizer.to_str())
        return out

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        projection_dim: int | None = None,
        max_length: int | None = None,
    ) -> ChineseTextEncoder:
        """Load a ``chinese_encoder/`` directory, or a plain HF encoder directory.

        A plain HF directory (config.json + model.safetensors, no ``iap_encoder.json``) gets a
        fresh projection to ``projection_dim`` when the widths differ.
        """
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ArtifactNotFoundError(
                f"{cfg_file} is missing: {path} is not a Hugging Face encoder directory",
                fix="pass the chinese_encoder/ directory `iap-rt train` wrote, or a local "
                "BERT/RoBERTa directory with config.json and model.safetensors.",
            )
        meta = json.loads((path / META).read_text("utf-8")) if (path / META).is_file() else {}
        if meta:
            projection_dim = meta.get("projection_dim")
        max_length = max_length or meta.get("max_length") or 77
        config = load_encoder_config(cfg_file)
        model = cls(config, projection_dim, max_length)
        weights = path / "model.safetensors"
        if weights.is_file():
            model._load_encoder_weights(weights)
        elif list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise ArtifactError(
                f"{path} holds only pickled weights (.bin/.pt); iap-rt reads safetensors only",
                fix="convert them once with a trusted tool to model.safetensors.",
            )
        else:
            raise ArtifactNotFoundError(f"{weights} is missing")
        if model.projection is not None and meta:
            pfile = path / "projection.safetensors"
            if not pfile.is_file():
                raise ArtifactNotFoundError(f"{pfile} is missing")
            model.projection.load_state_dict(load_file(str(pfile)))
        return model

    def _load_encoder_weights(self, weights: Path) -> None:
        state = load_file(str(weights))
        prefixes = ("bert.", "roberta.", "model.", "encoder.")
        own = self.encoder.state_dict()
        fixed = {}
        for k, v in state.items():
            key = k
            if key not in own:
                for p in prefixes:
                    if key.startswith(p) and key[len(p) :] in own:
                        key = key[len(p) :]
                        break
            if key in own:
                fixed[key] = v
        missing = [k for k in own if k not in fixed and not k.endswith("position_ids")]
        if missing:
            raise ArtifactError(
                f"{weights} lacks {len(missing)} encoder tensor(s), e.g. {missing[:3]}",
                fix="check that config.json and model.safetensors belong to the same model.",
            )
        self.encoder.load_state_dict(fixed, strict=False)


def load_encoder_config(cfg_file: Path):
    """``AutoConfig`` from a local config.json; only encoder model types are accepted."""
    from transformers import AutoConfig

    data = json.loads(Path(cfg_file).read_text("utf-8"))
    model_type = data.get("model_type")
    supported = ("bert", "roberta", "xlm-roberta", "ernie", "megatron-bert")
    if model_type not in supported:
        raise ConfigError(
            f"{cfg_file}: model_type {model_type!r} is not a supported encoder",
            fix=f"use a BERT/RoBERTa-style encoder ({', '.join(supported)}).",
        )
    return AutoConfig.for_model(**data)
