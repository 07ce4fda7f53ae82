"""character: distributed character training (RLAIF) on Ray, vLLM and DeepSpeed.

One direction of imports, enforced by `lint-imports` (pyproject [tool.importlinter]):
rayjobs -> pipeline -> stages -> execution -> training -> judging | reporting -> inference | data
-> review | tracking -> models -> core. A stage never imports another stage.

Imports go at the top of a module. The one exception: heavy optional packages (vllm, deepspeed, ray, mlflow,
wandb, peft) and the libraries only a worker needs are imported inside the function that uses them, where
import time matters (the CLI validates a config in a second; Ray ships functions to processes that never
touch vLLM).
"""
