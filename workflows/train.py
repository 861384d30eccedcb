"""Entrypoint for `ray job submit`: the same as `ngrpo train`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python workflows/train.py --config r1_distill_1p5b_ngrpo trainer.iterations=100

Inside a Ray job the driver attaches to the job's cluster (RAY_ADDRESS is set by Ray); run locally it starts one.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds the package when uploaded

from ngrpo_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
