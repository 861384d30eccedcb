"""The worker extension needs its weight receiver: a failed import is an error naming it, never a silent stand-in."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_failed_weight_receiver_import_is_an_error_that_names_it():
    # sys.modules[name] = None makes `import name` raise ImportError, as a broken module would
    code = ("import sys; sys.modules['ngrpo_ray.engine.weight_receiver'] = None\n"
            "import ngrpo_ray.engine.worker_extension")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0
    assert "weight receiver (ngrpo_ray.engine.weight_receiver) failed to import" in out.stderr


def test_worker_extension_inherits_the_real_receiver():
    from ngrpo_ray.engine.weight_receiver import WeightReceiverMixin
    from ngrpo_ray.engine.worker_extension import NgrpoWorkerExtension

    assert issubclass(NgrpoWorkerExtension, WeightReceiverMixin)
    assert hasattr(NgrpoWorkerExtension, "ngrpo_init_weight_group")
