"""Search spaces, the trial objective, and the Ray Tune + Optuna driver."""
