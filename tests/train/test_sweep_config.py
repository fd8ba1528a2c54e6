"""The profile's `sweep:` section (the workflow's S3 candidates from a Ray Tune grid): parsed and checked,
and invisible to the training settings."""

import pytest

from xsam.train.config import load_profile, load_sweep, profile_path


def _profile(tmp_path, sweep: str) -> str:
    text = profile_path("local").read_text() + sweep
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_sweep_section_parses_and_training_ignores_it(tmp_path):
    path = _profile(tmp_path, "sweep:\n  grid: {lr: [2.0e-5, 4.0e-5], balance_t: [0.1, 0.2]}\n"
                              "  max_concurrent_trials: 2\n")
    assert load_sweep(path) == {"grid": {"lr": [2.0e-5, 4.0e-5], "balance_t": [0.1, 0.2]},
                                "max_concurrent_trials": 2}
    assert load_profile(path, "s3").lr == load_profile(profile_path("local"), "s3").lr
    assert load_sweep(profile_path("local")) is None


@pytest.mark.parametrize("sweep, message", [
    ("sweep:\n  grid: {learning_rate: [1]}\n", "sweep.grid: learning_rate: unknown setting"),
    ("sweep:\n  grid: {lr: 1.0e-4}\n", "grid.lr: 0.0001 is not a non-empty list"),
    ("sweep:\n  grid: {}\n", "grid: {} is not a non-empty mapping"),
    ("sweep:\n  grid: {lr: [1.0e-4]}\n  trials: 3\n", "sweep.trials: unknown key"),
    ("sweep:\n  grid: {lr: [-1]}\n", "grid.lr: -1 is not a number > 0"),
])
def test_bad_sweep_sections_name_the_problem(tmp_path, sweep, message):
    with pytest.raises(ValueError, match=message):
        load_sweep(_profile(tmp_path, sweep))
