"""Improving generators with rewards: ReFL, DRaFT-K and AlignProp on diffusers (``rewardlab finetune``).

Imports of diffusers, peft and accelerate happen inside the submodules, so ``import rewardlab.align``
stays cheap.
"""

_EXPORTS = {
    "FinetuneConfig": "finetune", "Finetuner": "finetune",
    "refl_loss": "refl", "refl_x0": "refl", "draw_stop_index": "refl",
    "sample_with_grad_window": "backprop", "draw_grad_steps": "backprop", "negative_reward_loss": "backprop",
    "wrap_pipeline": "rewardlab.diffusion", "Generator": "rewardlab.diffusion",
    "load_prompts": "data", "load_image_text_pairs": "data",
    "add_lora": "lora", "save_lora": "lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        module = _EXPORTS[name]
        return getattr(importlib.import_module(module if "." in module else f".{module}", __name__), name)
    raise AttributeError(name)
