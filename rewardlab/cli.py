"""The ``rewardlab`` command line. Subcommands of each capability live in that capability's package
and are imported only when used, so ``rewardlab score`` never imports training or diffusion stacks."""

from __future__ import annotations

import importlib

import click

# command name -> "module:attribute" of a click command
LAZY_COMMANDS = {
    "models": "rewardlab.cli_score:models_command",
    "score": "rewardlab.cli_score:score_command",
    "rank": "rewardlab.cli_score:rank_command",
    "eval": "rewardlab.eval.cli:eval_command",
    "train": "rewardlab.train.cli:train_command",
    "cycle": "rewardlab.cycle.cli:cycle_group",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in LAZY_COMMANDS if self._available(name)]

    @staticmethod
    def _available(name: str) -> bool:
        module = LAZY_COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module) is not None

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = LAZY_COMMANDS.get(name)
        if target is None or not self._available(name):
            return None
        module, attribute = target.split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rewardlab")
def cli() -> None:
    """Image-text reward models: score, rank, evaluate, train, and build cycle-consistency data."""


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
