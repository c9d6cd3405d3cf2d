"""`python -m unicom_cli`: the same CLI; also the re-entry point of processes started by the launcher."""

from unicom_cli.cli.app import run

if __name__ == "__main__":
    run()
