"""docs/configuration.md is generated from the settings table (fastlb/config/schema.py): this fails when
the committed file differs from what `python -m fastlb.config.docs` writes (then run `make docs`), and
checks that the table covers every flag and TOML key."""
import dataclasses
import re
from pathlib import Path

from fastlb.cli import make_parser
from fastlb.config import SETTINGS, Config, flag_name
from fastlb.config.docs import render
from fastlb.config.schema import SHAPED_FIELDS, toml_key

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_committed_reference_is_the_generated_one():
    assert DOC.read_text(encoding="utf-8") == render(), "docs/configuration.md is stale: run `make docs`"


def test_every_config_field_is_a_documented_setting():
    assert [f.name for f in dataclasses.fields(Config)] == list(SETTINGS)
    text = render()
    for name, setting in SETTINGS.items():
        assert setting.help and setting.metavar, name
        assert (setting.toml_form or f"`{toml_key(name)}`") in text, name
        if not setting.file_only:
            assert f"`{flag_name(name)}`" in text, name
        if name not in SHAPED_FIELDS:
            assert setting.parse is not None, name


def test_every_flag_comes_from_the_table():
    own = {"--help", "--version", "--config", "--check-config"}
    flags = {option for action in make_parser()._actions for option in action.option_strings
             if option.startswith("--")}
    assert flags - own == {flag_name(name) for name, s in SETTINGS.items() if not s.file_only}


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower case, punctuation out, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_topic_pages_link_to_sections_the_reference_has():
    """The topic pages (docs/*.md) point at the generated reference instead of repeating its flag tables;
    a link to a section it no longer has fails here."""
    anchors = {github_anchor(line.lstrip("#")) for line in DOC.read_text(encoding="utf-8").splitlines()
               if line.startswith("#")}
    assert {"http-mode", "health", "operations", "pool", "backend"} <= anchors
    linked = []
    for page in DOC.parent.glob("*.md"):
        for anchor in re.findall(r"\(configuration\.md#([\w-]+)\)", page.read_text(encoding="utf-8")):
            linked.append((page.name, anchor))
    assert linked, "no page links to the reference"
    assert [link for link in linked if link[1] not in anchors] == []
