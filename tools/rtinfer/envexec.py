"""``python -m rtinfer.envexec ENV_FILE LOG_FILE ARGV...``: exec ARGV in place (the caller's
pid becomes the program's) with exactly the environment in ENV_FILE (a JSON object) and its
stdout and stderr appended to LOG_FILE.

The stack's supervisor starts every service this way: its environment (settings as JSON,
secrets among them) stays out of supervisord's configuration files, and its output goes
straight to its log file instead of through supervisord, which would spend CPU on every line
(and stall a chatty service once its pipe is full).
"""

from __future__ import annotations

import json
import os
import sys


def main(args: list[str]) -> None:
    if len(args) < 3:
        sys.exit("usage: python -m rtinfer.envexec ENV_FILE LOG_FILE ARGV...")
    env_file, log_file, argv = args[0], args[1], args[2:]
    with open(env_file) as fh:
        env = json.load(fh)
    if not isinstance(env, dict):
        sys.exit(f"{env_file}: not a JSON object")
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.execvpe(argv[0], argv, {str(k): str(v) for k, v in env.items()})


if __name__ == "__main__":
    main(sys.argv[1:])
