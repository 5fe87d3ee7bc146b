"""``python -m rewardlab.align`` = ``rewardlab finetune`` (for ``accelerate launch -m rewardlab.align``)."""

from .cli import finetune_command

if __name__ == "__main__":
    finetune_command()
