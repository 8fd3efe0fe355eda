"""`python -m mmpl_cli` and the `mmpl` command. The signal handlers come first, before anything heavy
is imported, so a SIGTERM or SIGUSR1 that arrives at once still stops cleanly (exit code 3)."""

from mmpl_cli.launch import install_signal_handlers


def main() -> None:
    install_signal_handlers()
    from mmpl_cli.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
