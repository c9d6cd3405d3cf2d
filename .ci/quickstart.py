"""Print the README's quick-start commands, one per line: the shell lines of the first fenced
block after the `<!-- quickstart` marker, comments left out. .ci/run runs exactly these."""

import sys
from pathlib import Path

MARKER = "<!-- quickstart"


def quickstart_commands(readme: str) -> list[str]:
    after = readme[readme.index(MARKER):]
    block = after.split("```", 2)[1]  # "bash\n<lines>\n"
    lines = block.splitlines()[1:]
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


if __name__ == "__main__":
    commands = quickstart_commands((Path(__file__).resolve().parents[1] / "README.md").read_text())
    if len(commands) != 2:
        sys.exit(f"README quick start: expected two commands, found {len(commands)}: {commands}")
    print("\n".join(commands))
