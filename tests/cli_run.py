"""Running the command line in-process, as the CLI tests do: one copy for every test module."""

from __future__ import annotations

from flax_resnet import cli


def run_main(argv: list[str]) -> int:
    """``cli.main`` in-process, with argparse's SystemExit turned into its exit code."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def one_error(err: str) -> str:
    """The stderr of a failed command: one ``error:`` message and no traceback; returned on one line."""
    assert "error:" in err and "Traceback" not in err, err
    return " ".join(err.split())
