"""Gated-attention MIL network (Ilse et al., ICML 2018) and its checkpoint format.

Instance embedding ``h_k`` = MLP([crop_encoder(crop_k), feature_mlp(x_k)]).
Gated attention ``a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))`` over the
instances of a bag (padded positions masked out); bag embedding ``z = sum_k a_k h_k``.

Empty bags (N = 0): there is nothing to attend to, so ``z`` is a learned
``empty_embedding`` vector (trained with the empty bags of the training set, whose
label distribution it absorbs together with the summary features); their attention
vector is all zeros. A bag of one instance gets attention exactly 1.

``z`` is concatenated with the standardised bag-level summary features
(:mod:`mil.dataset`) and classified by a small MLP into the 3 classes.

Normalisation statistics are registered buffers, so they are part of the
``state_dict``. Checkpoints are ``model.pth`` (``torch.save(state_dict)``, loaded
with ``weights_only=True``) plus ``model.json`` (feature spec, hyper-parameters).

:class:`MILEnsemble` averages the class probabilities and the attention of members
trained alike with different seeds. It is saved as one checkpoint per member
(``model.pth``, ``model_m1.pth``, ...); ``model.json`` lists them under
``meta.ensemble`` and :func:`load_checkpoint` returns the ensemble.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mil import CLASSES
from mil.dataset import FeatureSpec, Normalisation

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cmb-csvd-mil/1"


@dataclass
class ModelParams:
    """Architecture hyper-parameters (saved in model.json)."""

    embed_dim: int = 64
    attention_dim: int = 32
    crop_embed_dim: int = 32
    feature_hidden: int = 64
    classifier_hidden: int = 64
    dropout: float = 0.25
    n_classes: int = len(CLASSES)


class CropEncoder(nn.Module):
    """Small CNN: [M, C, S, S] -> [M, out_dim] (any S >= 4, global average pooling)."""

    def __init__(self, in_channels: int = 3, out_dim: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, out_dim, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode crops."""
        return self.net(x)


class GatedAttention(nn.Module):
    """Gated attention scores ``w^T (tanh(V h) * sigmoid(U h))`` (unnormalised)."""

    def __init__(self, dim: int, attention_dim: int) -> None:
        super().__init__()
        self.V = nn.Linear(dim, attention_dim)
        self.U = nn.Linear(dim, attention_dim)
        self.w = nn.Linear(attention_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [...] attention logits."""
        return self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)


@dataclass
class MILOutput:
    """Model outputs: class logits [B, C] and attention [B, N] (0 at padding)."""

    logits: torch.Tensor
    attention: torch.Tensor


class GatedAttentionMIL(nn.Module):
    """Gated-attention MIL classifier over lesion bags (see module docstring)."""

    def __init__(self, spec: FeatureSpec, params: ModelParams | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.params = p = params or ModelParams()
        n_feat = len(spec.feature_names)
        n_sum = len(spec.summary_names)
        parts = 0
        self.crop_encoder: nn.Module | None = None
        if spec.use_crops:
            self.crop_encoder = CropEncoder(spec.crop_channels, p.crop_embed_dim)
            parts += p.crop_embed_dim
        self.feature_mlp: nn.Module | None = None
        if n_feat:
            self.feature_mlp = nn.Sequential(nn.Linear(n_feat, p.feature_hidden), nn.ReLU())
            parts += p.feature_hidden
        if parts == 0:
            raise ValueError("the model needs crops or instance features")
        self.instance_head = nn.Sequential(
            nn.Linear(parts, p.embed_dim), nn.ReLU(), nn.Dropout(p.dropout)
        )
        self.attention = GatedAttention(p.embed_dim, p.attention_dim)
        self.empty_embedding = nn.Parameter(torch.zeros(p.embed_dim))
        self.classifier = nn.Sequential(
            nn.Linear(p.embed_dim + n_sum, p.classifier_hidden),
            nn.ReLU(),
            nn.Dropout(p.dropout),
            nn.Linear(p.classifier_hidden, p.n_classes),
        )
        self.register_buffer("feat_mean", torch.zeros(n_feat))
        self.register_buffer("feat_std", torch.ones(n_feat))
        self.register_buffer("summary_mean", torch.zeros(n_sum))
        self.register_buffer("summary_std", torch.ones(n_sum))
        self.register_buffer("crop_mean", torch.zeros(()))
        self.register_buffer("crop_std", torch.ones(()))

    def set_normalisation(self, norm: Normalisation) -> None:
        """Copy training-set standardisation statistics into the buffers."""
        with torch.no_grad():
            self.feat_mean.copy_(torch.as_tensor(norm.feat_mean))
            self.feat_std.copy_(torch.as_tensor(norm.feat_std))
            self.summary_mean.copy_(torch.as_tensor(norm.summary_mean))
            self.summary_std.copy_(torch.as_tensor(norm.summary_std))
            self.crop_mean.fill_(norm.crop_mean)
            self.crop_std.fill_(norm.crop_std)

    def embed_crops(self, crops: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Crop embeddings [B, N, E] of a padded batch; zeros at the padding.

        The CNN runs on the real instances only. Bag sizes are skewed (most patients have
        a few lesions, some have dozens), so a padded batch of the demo's bags is about
        70% padding; the attention gives padded positions no weight, so what they hold
        never reaches the output.
        """
        b, n = mask.shape
        out = crops.new_zeros((b, n, self.params.crop_embed_dim))
        if bool(mask.any()):
            out[mask] = self.crop_encoder((crops[mask] - self.crop_mean) / self.crop_std)
        return out

    def forward(
        self,
        crops: torch.Tensor,
        feats: torch.Tensor,
        mask: torch.Tensor,
        summary: torch.Tensor,
    ) -> MILOutput:
        """Classify a padded batch of bags.

        Args:
            crops: [B, N, C, S, S] (ignored when the model uses no crops).
            feats: [B, N, F] raw (log-transformed, unstandardised) instance features.
            mask: [B, N] bool, True for real instances.
            summary: [B, K] raw summary features (NaN = missing).
        """
        b, n = mask.shape
        parts = []
        if self.crop_encoder is not None:
            parts.append(self.embed_crops(crops, mask))
        if self.feature_mlp is not None:
            x = torch.nan_to_num((feats - self.feat_mean) / self.feat_std, nan=0.0)
            parts.append(self.feature_mlp(x))
        h = self.instance_head(torch.cat(parts, dim=-1))  # [B, N, D]
        logits_a = self.attention(h).masked_fill(~mask, float("-inf"))
        empty = ~mask.any(dim=1)  # [B]
        # An all-masked row would give NaN; give it zeros (its embedding is replaced).
        logits_a = logits_a.masked_fill(empty[:, None], 0.0)
        a = torch.softmax(logits_a, dim=1) * mask
        z = torch.einsum("bn,bnd->bd", a, h)
        z = torch.where(empty[:, None], self.empty_embedding.expand(b, -1), z)
        if self.summary_mean.numel():
            s = torch.nan_to_num((summary - self.summary_mean) / self.summary_std, nan=0.0)
            z = torch.cat([z, s], dim=1)
        return MILOutput(self.classifier(z), a)


class MILEnsemble(nn.Module):
    """Members with one feature spec; the output averages their probabilities.

    ``logits`` are the log of the mean member probability (so a softmax gives the
    mean back) and ``attention`` is the mean member attention (still summing to 1
    over a non-empty bag). Seed averaging steadies a small-cohort classifier whose
    single-seed accuracy moves by a few patients from seed to seed.
    """

    def __init__(self, members: Sequence[GatedAttentionMIL]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        spec0 = members[0].spec.to_dict()
        for i, m in enumerate(members[1:], start=1):
            if m.spec.to_dict() != spec0:
                raise ValueError(f"ensemble member {i} has a different feature spec "
                                 "from member 0; members must share their inputs")
        self.members = nn.ModuleList(members)
        self.spec = members[0].spec
        self.params = members[0].params

    def forward(
        self,
        crops: torch.Tensor,
        feats: torch.Tensor,
        mask: torch.Tensor,
        summary: torch.Tensor,
    ) -> MILOutput:
        """Mean probability and mean attention of the members (same inputs as one)."""
        outs = [m(crops, feats, mask, summary) for m in self.members]
        probs = torch.stack([torch.softmax(o.logits, dim=1) for o in outs]).mean(0)
        att = torch.stack([o.attention for o in outs]).mean(0)
        return MILOutput(torch.log(probs.clamp_min(1e-12)), att)


def _atomic_bytes(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(
    model: GatedAttentionMIL | MILEnsemble, directory: str | os.PathLike,
    meta: dict | None = None, name: str = "model",
) -> Path:
    """Write ``<dir>/<name>.pth`` (state_dict) and ``<dir>/<name>.json`` atomically.

    An ensemble writes its members 1.. as ``<name>_m<i>`` first and member 0 as
    ``<name>`` last, with ``meta["ensemble"]`` naming all of them, so a checkpoint
    that is read never points at members not yet written.
    """
    directory = Path(directory)
    meta = dict(meta or {})
    if isinstance(model, MILEnsemble):
        names = [name] + [f"{name}_m{i}" for i in range(1, len(model.members))]
        for i in range(1, len(model.members)):
            _save_one(model.members[i], directory,
                      {"ensemble_member": i, "ensemble_of": name}, names[i])
        meta["ensemble"] = names
        return _save_one(model.members[0], directory, meta, name)
    meta.pop("ensemble", None)
    return _save_one(model, directory, meta, name)


def _save_one(model: GatedAttentionMIL, directory: Path, meta: dict, name: str) -> Path:
    info = {
        "format": CHECKPOINT_FORMAT,
        "classes": list(CLASSES),
        "spec": model.spec.to_dict(),
        "params": asdict(model.params),
        "meta": meta,
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic_bytes(directory / f"{name}.pth", lambda fh: torch.save(state, fh))
    text = json.dumps(info, indent=2, default=str).encode()
    _atomic_bytes(directory / f"{name}.json", lambda fh: fh.write(text))
    return directory / f"{name}.pth"


def load_checkpoint(
    path: str | os.PathLike,
) -> tuple[GatedAttentionMIL | MILEnsemble, dict]:
    """Load a model saved by :func:`save_checkpoint` (path to the .pth or its folder).

    Returns:
        (model in eval mode - a :class:`MILEnsemble` when ``meta.ensemble`` lists
        several members - and member 0's model.json dict).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.pth"
    model, info = _load_one(path)
    names = info.get("meta", {}).get("ensemble") or []
    if len(names) <= 1:
        return model, info
    if not isinstance(names, list) or not all(isinstance(n, str) and n and "/" not in n
                                              and "\\" not in n for n in names):
        raise ValueError(f"{path.with_suffix('.json')}: meta.ensemble must list member "
                         f"names in the same folder, got {names!r}")
    members = [model] + [_load_one(path.parent / f"{n}.pth")[0] for n in names[1:]]
    ens = MILEnsemble(members)
    ens.eval()
    return ens, info


def _load_one(path: Path) -> tuple[GatedAttentionMIL, dict]:
    info_path = path.with_suffix(".json")
    if not path.is_file() or not info_path.is_file():
        raise FileNotFoundError(f"checkpoint needs {path} and {info_path}")
    info = json.loads(info_path.read_text())
    if info.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{info_path}: unknown checkpoint format {info.get('format')!r}")
    if list(info.get("classes", [])) != list(CLASSES):
        raise ValueError(f"{info_path}: classes {info.get('classes')} != {list(CLASSES)}")
    model = GatedAttentionMIL(FeatureSpec.from_dict(info["spec"]), ModelParams(**info["params"]))
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model, info
