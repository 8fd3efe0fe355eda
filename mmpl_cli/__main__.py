"""`python -m mmpl_cli` and the `mmpl` command. The signal handlers come first, before anything is
imported (the stop flag's own module takes ~35 ms), so a SIGTERM or SIGUSR1 that arrives at once
still stops cleanly (exit code 3)."""

import signal

_early: list[int] = []  # signals that came before the real handlers were in place


def _remember(signum, frame) -> None:
    _early.append(signum)


for _sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
    signal.signal(_sig, _remember)


def main() -> None:
    from mmpl_cli import launch

    launch.install_signal_handlers()
    for signum in _early[:1]:  # the first one counts; the stop flag is checked at the first boundary
        launch.STOP.request(signal.Signals(signum).name)
    from mmpl_cli.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
