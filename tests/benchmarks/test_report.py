"""docs/benchmarks.md's tables are generated from benchmarks/results/*.json and committed up to date."""

from __future__ import annotations

import json

from benchmarks import report


def test_committed_page_matches_the_results():
    assert report.main(["--check"]) == 0, "run `python -m benchmarks.report --docs` and commit docs/benchmarks.md"


def test_every_result_file_has_a_renderer():
    assert report.unregistered() == []


def test_check_fails_on_a_stale_page(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    original = json.loads((report.RESULTS_DIR / "params.json").read_text())
    original["rows"][0][original["columns"][0]] = "a changed figure"
    (results / "params.json").write_text(json.dumps(original))
    assert "a changed figure" in report.markdown(results)
    assert report.main(["--check", str(results)]) == 1


def test_generator_keeps_the_prose():
    page = report.DOCS_PAGE.read_text()
    rebuilt = report.page_with_tables(page, "TABLES\n")
    before, after = page.split(report.BEGIN)[0], page.split(report.END)[1]
    assert rebuilt.startswith(before) and rebuilt.endswith(after) and "TABLES" in rebuilt
