"""The model as a judge of its own answers (log-probability multiple choice, both orders) and the ranking of
candidates into soft-labelled pairs."""
