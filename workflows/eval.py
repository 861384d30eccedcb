"""Entrypoint for `ray job submit`: the same as `ngrpo eval` (Mean@n, unbiased Pass@k, bootstrap best@k)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ngrpo_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
