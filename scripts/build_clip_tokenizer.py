"""Regenerate rewardlab/models/assets/clip_tokenizer.json from the shipped CLIP BPE vocabulary.

    .venv/bin/python scripts/build_clip_tokenizer.py
"""

from pathlib import Path

from rewardlab.io.atomic import write_text
from rewardlab.models.clip import CLIP_TOKENIZER_FILE, build_clip_tokenizer

target = Path(__file__).resolve().parents[1] / "rewardlab" / "models" / "assets" / CLIP_TOKENIZER_FILE
write_text(target, build_clip_tokenizer().to_str())
print(f"wrote {target}")
