"""What a run did, for people: evaluation intervals, figures, the comparison of runs, a run's metric files."""
