"""Put on PYTHONPATH to import as on the lent GPU machine, which cannot carry vLLM, Ray, MLflow or math-verify: a None
in sys.modules makes `import vllm` fail and importlib.util.find_spec("vllm") answer None, as for a missing package."""

import sys

for name in ("vllm", "ray", "mlflow", "math_verify"):
    sys.modules[name] = None
