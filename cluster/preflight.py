"""Checks before `ray up`: no placeholder left in a cluster config, and the cluster's auth token.

    python -m cluster.preflight cluster/aws.yaml       # exit 2 naming each placeholder still there
    python -m cluster.preflight --new-token            # writes ~/.tsd-oid/ray_auth_token (mode 0600)

The shipped configs carry example values (an AMI id, an account id, a bucket) that AWS would
reject with an error far from their cause, or worse, accept; the token file is what every node and
every client (``RAY_AUTH_TOKEN_PATH``) authenticates with.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

PLACEHOLDERS = {
    "ami-0a2b3c4d5e6f7a8b9": "ImageId: the example AMI (a Deep Learning AMI of your region)",
    "123456789012": "IamInstanceProfile.Arn: the example AWS account id",
    "my-bucket": "s3://my-bucket: the example bucket",
    "my-registry/": "image: the example container registry",
}
TOKEN_PATH = Path("~/.tsd-oid/ray_auth_token").expanduser()


def placeholders_in(text: str) -> list[str]:
    """What each placeholder still in ``text`` stands for, with its first line number."""
    found = []
    for value, meaning in PLACEHOLDERS.items():
        for number, line in enumerate(text.splitlines(), start=1):
            if value in line and not line.lstrip().startswith("#"):
                found.append(f"line {number}: {meaning} ({value})")
                break
    return found


def new_token(path: Path = TOKEN_PATH) -> Path:
    """A random token in ``path``, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="a cluster config (cluster/aws.yaml)")
    parser.add_argument("--new-token", action="store_true", help=f"write a new random token to {TOKEN_PATH}")
    args = parser.parse_args(argv)
    if args.new_token:
        print(f"token written to {new_token()} (mode 0600)")
    if args.config:
        problems = [f"{args.config}: {p}" for p in placeholders_in(Path(args.config).read_text())]
        if "aws" in Path(args.config).name and not TOKEN_PATH.is_file():
            problems.append(f"{TOKEN_PATH}: no token (run python -m cluster.preflight --new-token)")
        for problem in problems:
            print(f"preflight: {problem}", file=sys.stderr)
        if problems:
            return 2
        print(f"{args.config}: no placeholder left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
