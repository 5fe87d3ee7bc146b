"""The ``rewardlab`` command line. Subcommands of each capability live in that capability's package
and are imported only when used, so ``rewardlab score`` never imports training or diffusion stacks."""

from __future__ import annotations

import importlib
import logging
import os

import click

from .errors import RewardLabError
from .io.safe_text import for_terminal

# command name -> "module:attribute" of a click command
LAZY_COMMANDS = {
    "models": "rewardlab.scoring.cli:models_command",
    "score": "rewardlab.scoring.cli:score_command",
    "rank": "rewardlab.scoring.cli:rank_command",
    "convert": "rewardlab.scoring.cli:convert_command",
    "eval": "rewardlab.eval.cli:eval_command",
    "train": "rewardlab.train.cli:train_command",
    "cycle": "rewardlab.cycle.cli:cycle_group",
    "finetune": "rewardlab.align.cli:finetune_command",
    "search": "rewardlab.search.cli:search_command",
    "pairs": "rewardlab.search.cli:pairs_command",
    "calibrate": "rewardlab.rl.cli:calibrate_command",
    "serve": "rewardlab.serve.cli:serve_command",
}


class CLIError(click.ClickException):
    """One line on stderr, ``error: <what> — <how to fix>``, with the error's exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {for_terminal(self.message)}", err=True, file=file)


def debug_enabled(ctx: click.Context | None = None) -> bool:
    root = ctx.find_root() if ctx is not None else None
    return bool(os.environ.get("REWARDLAB_DEBUG")) or bool(root and root.params.get("debug"))


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

    def invoke(self, ctx: click.Context):
        """Run the subcommand; rewardlab errors become one line (tracebacks only with --debug)."""
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except RewardLabError as exc:
            if debug_enabled(ctx):
                raise
            raise CLIError(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise click.exceptions.Abort() from None
        except BrokenPipeError:  # `rewardlab models | head`: the reader left; stop quietly
            import sys

            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
            raise click.exceptions.Exit(0) from None
        except Exception as exc:
            if debug_enabled(ctx):
                raise
            raise CLIError(f"unexpected {type(exc).__name__}: {exc} — rerun with --debug for the traceback "
                           "and report it", 1) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rewardlab")
@click.option("--debug", is_flag=True, help="Show full tracebacks (also REWARDLAB_DEBUG=1).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning",
              show_default=True, help="Logging level of rewardlab's modules.")
def cli(debug: bool, log_level: str) -> None:
    """Image-text reward models: score, rank, evaluate, train, and build cycle-consistency data."""
    logging.basicConfig(level=logging.DEBUG if debug else getattr(logging, log_level.upper()),
                        format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
