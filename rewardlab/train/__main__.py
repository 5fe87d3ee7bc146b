"""`python -m rewardlab.train ...` = `rewardlab train ...` (use with `accelerate launch -m rewardlab.train`)."""

from .cli import train_command

if __name__ == "__main__":
    train_command()
