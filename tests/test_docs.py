"""The documentation: every setting, option, metric and public name has an entry; generated parts are in
step with the code; the README stays short and its links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import pytest_saecheck
from pytest_saecheck import catalogue
from pytest_saecheck.metrics import metrics_from_sums
from pytest_saecheck.plugin import docs
from pytest_saecheck.plugin.settings import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def text(relative: str) -> str:
    return (DOCS / relative).read_text(encoding="utf-8")


def all_docs() -> str:
    return "\n".join(page.read_text(encoding="utf-8") for page in PAGES)


@pytest.mark.parametrize(
    "page", [p for p in PAGES if "generated from" in p.read_text(encoding="utf-8")], ids=str
)
def test_generated_blocks_are_in_step_with_the_code(page: Path) -> None:
    current = page.read_text(encoding="utf-8")
    assert docs.with_tables(current) == current, (
        f"run: python -m pytest_saecheck.plugin.docs {page.relative_to(ROOT)}"
    )


def test_every_setting_has_a_row_in_the_configuration_reference() -> None:
    page = text("reference/configuration.md")
    for setting in SETTINGS:
        assert f"| `{setting.name}` | `{setting.option}` | `{setting.ini}` |" in page, setting.name


def test_every_saecheck_option_is_documented(pytestconfig: pytest.Config) -> None:
    options = {
        name
        for group in pytestconfig._parser._groups  # every group's options, the plugin's among them
        for option in group.options
        for name in option.names()
        if name.startswith("--saecheck-")
    }
    assert "--saecheck-profile" in options and "--saecheck-saebench-json" in options
    documented = all_docs()
    missing = sorted(option for option in options if f"`{option}" not in documented)
    assert not missing, f"options without a docs entry: {missing}"


def test_every_metric_has_a_row_in_the_metric_reference() -> None:
    page = text("reference/metrics.md")
    for name in catalogue.METRICS:
        assert f"| `{name}` |" in page, name


def test_every_public_name_has_an_api_entry() -> None:
    page = text("reference/api.md")
    entries = set(re.findall(r"^::: pytest_saecheck\.(\w+)$", page, flags=re.MULTILINE))
    public = set(pytest_saecheck.__all__) - {"__version__"}
    assert public - entries == set(), f"public names without an API entry: {sorted(public - entries)}"
    assert entries - public == set(), f"API entries for names that are not public: {sorted(entries - public)}"


def test_every_page_is_in_the_navigation_and_every_entry_exists() -> None:
    nav = set(re.findall(r":\s+([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.MULTILINE))
    pages = {str(page.relative_to(DOCS)) for page in PAGES}
    assert nav - pages == set(), f"navigation entries without a page: {sorted(nav - pages)}"
    assert pages - nav == set(), f"pages missing from the navigation: {sorted(pages - nav)}"


def test_the_readme_is_short_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    for target in re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_no_metric_leaves_its_documented_range_when_the_splice_lowers_the_loss() -> None:
    """A splice can lower the loss (L_sae < L_orig): ce_loss_score is then above 1 (1.0045 in a reported case), and the
    catalogue must not claim a bound the number passes."""
    sums = {
        "n_ce": np.float64(100.0),
        "ce_sum_orig": np.float64(200.0),
        "ce_sum_sae": np.float64(199.0),
        "ce_sum_zero": np.float64(420.0),
        "ce_sum_mean": np.float64(380.0),
        "n_kl": np.float64(100.0),
        "kl_sum_sae": np.float64(0.5),
        "kl_sum_zero": np.float64(300.0),
    }
    values = {name: float(value) for name, value in metrics_from_sums(sums, None).items()}
    assert values["ce_loss_score"] > 1
    for name, value in values.items():
        info = catalogue.METRICS[name]
        assert info.upper_bound is None or value <= info.upper_bound, name
        assert info.lower_bound is None or value >= info.lower_bound, name
    assert "above 1" in catalogue.METRICS["ce_loss_score"].scale
