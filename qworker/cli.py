"""The ``qworker`` command line: worker, submit, status, dead-letter (and more, lazily).

Every option of ``qworker worker`` can also come from a ``QWORKER_*`` environment
variable (shown in ``--help``). Commands live in their own modules and are imported only
when run, so ``qworker --help`` stays fast and other commands plug in by adding one line
to ``COMMANDS``.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click command; add yours here.
COMMANDS: dict[str, str] = {
    "worker": "qworker.worker.cli_worker:worker",
    "submit": "qworker.worker.cli_admin:submit",
    "status": "qworker.worker.cli_admin:status",
    "dead-letter": "qworker.worker.cli_admin:dead_letter",
    "demo": "qworker.demo:demo",
    "bench": "qworker.loadgen:bench",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use (see ``COMMANDS``)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS and name not in self.commands:
            module, attr = COMMANDS[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qworker")
def main() -> None:
    """qworker: LLM inference workers fed by a Redis stream."""


if __name__ == "__main__":
    main()
