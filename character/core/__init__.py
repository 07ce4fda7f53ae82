"""The bottom layer: the typed config (pydantic, from YAML with dotted overrides), the Parquet schemas, the run
store (stage outputs, local or object storage) and the constitution of traits."""
