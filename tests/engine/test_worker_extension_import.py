"""The worker extension needs its weight transport: a failed import is an error naming it, never a silent stand-in;
importing it registers the ngrpo_gloo backend in both of vLLM's weight-transfer registries."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_failed_weight_transport_import_is_an_error_that_names_it():
    # sys.modules[name] = None makes `import name` raise ImportError, as a broken module would
    code = ("import sys; sys.modules['ngrpo_ray.engine.gloo_transfer'] = None\n"
            "import ngrpo_ray.engine.worker_extension")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0
    assert "weight transport (ngrpo_ray.engine.gloo_transfer) failed to import" in out.stderr


def test_importing_the_extension_registers_ngrpo_gloo_with_vllm():
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    from ngrpo_ray.distributed.weight_sync import GLOO_BACKEND
    from ngrpo_ray.engine.gloo_transfer import GlooTrainerWeightTransferEngine, GlooWeightTransferEngine
    from ngrpo_ray.engine.worker_extension import NgrpoWorkerExtension

    assert WeightTransferEngineFactory._registry[GLOO_BACKEND]() is GlooWeightTransferEngine
    assert WeightTransferTrainerFactory._registry[GLOO_BACKEND]() is GlooTrainerWeightTransferEngine
    assert hasattr(NgrpoWorkerExtension, "ngrpo_weights_loaded")
