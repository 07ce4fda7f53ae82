"""One module per stage (`run(config, force) -> StageResult` plus pure helpers), each declared once in
character/execution/registry.py. A stage imports only the library, never another stage."""
