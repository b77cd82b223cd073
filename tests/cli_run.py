"""Run `lejepa ARGV` in this process, as the console script would, and capture what it printed."""

from __future__ import annotations


def invoke(argv: list, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lejepa ARGV` (arguments str()-ed); stdout and stderr are
    pytest's pipes, not a terminal."""
    from lejepa_cli.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    else:
        raise AssertionError("main() returned instead of exiting")
    captured = capsys.readouterr()
    return code, captured.out, captured.err
