"""`python -m minihbt.check SUBCOMMAND ...`: runs the subcommand's `main(argv)`.

COMMANDS is the table of subcommands: name -> (module, what it does). A subcommand is a
module with `main(argv)` returning the exit status; adding one is one line in the table.
Its module is imported by name when it runs, so `--help` and the other subcommands do not
depend on it.
"""
import importlib
import sys

from .. import cli

PROG = "python -m minihbt.check"
COMMANDS = {
    "batches": ("minihbt.check.batches", "check a batch log against HBT's batch rules"),
    "log": ("minihbt.check.log_cmd", "write minihbt's own batches as a batch log"),
    "metrics": ("minihbt.check.metrics_cmd", "score embeddings with minihbt's retrieval and metrics; "
                                             "write the text order or hand-made metric cases"),
    "export": ("minihbt.check.export_cmd", "write a golden bundle of one training step (every tensor of it)"),
    "step": ("minihbt.check.step_cmd", "compare another implementation's step with a bundle; name the first "
                                       "divergent tensor"),
}


def usage():
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {PROG} SUBCOMMAND [--help | ARGS]", "", "Check another HBT implementation against minihbt "
             "(docs/check-your-implementation.md).", "", "subcommands:"]
    lines += [f"  {name:{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


@cli.program(PROG)
def main(argv=None):
    """Dispatch to the subcommand named by argv[0]; returns its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    names = ", ".join(COMMANDS)
    if not argv:
        raise cli.Stop(cli.EXIT_USAGE, f"error: expected a subcommand, one of {names} (see --help)")
    if argv[0] not in COMMANDS:
        raise cli.Stop(cli.EXIT_USAGE, f"error: unknown subcommand {argv[0]!r}; expected one of {names}")
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main() or 0)
