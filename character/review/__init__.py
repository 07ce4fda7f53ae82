"""A researcher's review of a run: the marks the stages honour (verdicts per trait, flags), the data behind the
pages, and the web app."""
