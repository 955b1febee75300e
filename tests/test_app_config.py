"""Configuration of the server extension: traits are validated when they are set."""

import pytest
from traitlets import TraitError

from mlx_jupyter.app import MlxApp


@pytest.mark.parametrize("value", ["8GB", "75%", 0.5, 4 * 1024**3, ""])
def test_memory_budget_accepts_sizes_fractions_and_percentages(value):
    app = MlxApp()
    app.memory_budget = value
    assert app.memory_budget == value


@pytest.mark.parametrize("value", ["lots", "-3GB", 1.5, 0, "150%"])
def test_a_bad_memory_budget_is_refused_naming_the_trait(value):
    with pytest.raises(TraitError, match="c.MlxApp.memory_budget"):
        MlxApp().memory_budget = value


def test_blas_threads_must_not_be_negative():
    app = MlxApp()
    app.blas_threads = 3
    assert app.blas_threads == 3
    with pytest.raises(TraitError, match="'blas_threads'.*should not be less than 0"):
        app.blas_threads = -1


def test_memory_overheads_are_factors_of_at_least_1_also_from_the_command_line():
    app = MlxApp()
    app.parse_command_line(["--MlxApp.memory_overheads=text=3.0"])
    assert app.memory_overheads["text"] == 3.0  # a number, not the text "3.0"
    for wrong in ({"text": "3.0"}, {"text": 0.5}):
        with pytest.raises(TraitError, match="memory_overheads"):
            MlxApp().memory_overheads = wrong
