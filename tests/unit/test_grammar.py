"""The method grammar's one table (`evaluation/grammar.py`) drives parsing, the CLI help and the docs."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from anomaly_diffusion.cli import app
from anomaly_diffusion.config import load_config
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.evaluation.grammar import GRID_KEYS, KEYS, grammar_help, parse_method
from anomaly_diffusion.residuals import RESIDUALS
from anomaly_diffusion.usecases.common import packaged_config

ROOT = Path(__file__).resolve().parents[2]


def test_every_key_is_in_the_cli_help_and_in_the_docs() -> None:
    result = CliRunner().invoke(app, ["evaluate", "--help"], env={"COLUMNS": "400", "NO_COLOR": "1"})
    assert result.exit_code == 0
    shown = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
    docs = (ROOT / "docs" / "evaluation.md").read_text()
    for key in KEYS:
        assert f"{key.name}= " in shown, key.name
        assert re.search(rf"`[^`]*\b{key.name}=", docs), f"docs/evaluation.md does not list {key.name}="
    assert set(GRID_KEYS) == {k.name for k in KEYS} - {"c"}


def test_a_registered_residual_is_a_value_of_r_in_the_help_and_the_parser() -> None:
    cfg = load_config(packaged_config("tiny"))
    with pytest.raises(ConfigError, match="r must be abs, pos or neg, got 'squared'"):
        parse_method("x:r=squared", cfg)
    RESIDUALS.register("squared", lambda d: d**2, "squared difference (for tests)")
    try:
        assert "(abs/pos/neg/squared)" in grammar_help()
        assert parse_method("x:r=squared", cfg).residual == "squared"
    finally:
        RESIDUALS.unregister("squared")


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("x:L=ten", "L='ten' is not a number"),
        ("x:q=1", "expected keys L, s, K, g, r, m, enc"),
        ("x:p=both", "p must be in or rec, got 'both'"),
        ("x:dec=film", "dec must be ddim, thor or masked, got 'film'"),
    ],
)
def test_a_bad_key_or_value_is_one_line_naming_it(spec: str, error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        parse_method(spec, load_config(packaged_config("tiny")))
