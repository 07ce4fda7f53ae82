"""How a stage runs: the stage registry, the preamble and commit every stage shares, the checks before compute, Ray
start-up and part writing, the pair-training driver, the work estimates."""
