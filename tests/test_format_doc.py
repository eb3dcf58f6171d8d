"""docs/FORMAT.md's generated tables say what the schema says, and stay that way.

The tables of the day files are the contract with PyTables readers; the writer takes them
from ``format/schema.py`` and the document from ``hisparc_datastore_dev.format_doc``.
These tests fail when the committed document was not regenerated after a schema change,
and when the generator leaves out an event type, table, column or upload code, so the
document cannot quietly describe less than the writer does.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hisparc_datastore_dev import format_doc

from hisparc_datastore.format.schema import EVENT_TYPES, EventType

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"

#: A Markdown table cell separator: a ``|`` that is not escaped as ``\|``.
_CELL = re.compile(r"(?<!\\)\|")


def _cells(line: str) -> list[str]:
    """The cells of one Markdown table row, stripped, escapes of ``|`` undone."""
    return [cell.strip().replace("\\|", "|") for cell in _CELL.split(line.strip())[1:-1]]


def _column_rows(section: str) -> list[list[str]]:
    """The rows of the column table in one event type's section (after its header)."""
    rows = [_cells(line) for line in section.splitlines() if line.startswith("| ")]
    assert rows and rows[0][:2] == ["#", "column"], "no column table in the section"
    return rows[1:]


def test_format_md_generated_section_is_current() -> None:
    document = DOCUMENT.read_text(encoding="utf-8")
    assert format_doc.splice(document, format_doc.render_tables()) == document, (
        "docs/FORMAT.md's generated tables differ from format/schema.py: "
        "run `make format-doc` and commit the result"
    )


def test_module_default_is_this_checkout() -> None:
    """``make format-doc`` rewrites the file this test reads, not some other copy."""
    assert format_doc.DOCUMENT == DOCUMENT


@pytest.mark.parametrize("event_type", EVENT_TYPES.values(), ids=lambda t: t.upload_code)
def test_each_type_section_lists_every_column_in_order(event_type: EventType) -> None:
    section = format_doc.render_event_type(event_type)
    assert f"`{event_type.table}`" in section.splitlines()[0]
    assert f"`{event_type.upload_code}`" in section.splitlines()[0]
    assert event_type.title in section
    rows = _column_rows(section)
    assert [row[1] for row in rows] == [f"`{column.name}`" for column in event_type.columns]
    for position, (row, column) in enumerate(zip(rows, event_type.columns, strict=True)):
        assert row[0] == str(position)
        assert row[2].startswith(f"`{column.dtype}`"), (column.name, row[2])
        assert row[3] == ("scalar" if not column.shape else f"`{column.shape}`")
        assert row[4] == f"`{column.typed_fill.item()!r}`"


@pytest.mark.parametrize("event_type", EVENT_TYPES.values(), ids=lambda t: t.upload_code)
def test_each_upload_code_is_named_in_the_row_of_its_column(event_type: EventType) -> None:
    rows = {row[1].strip("`"): row for row in _column_rows(format_doc.render_event_type(
        event_type))}
    for code, field in event_type.fields.items():
        source = rows[field.column][5]
        expected = f"`{code}`" if field.element is None else f"`{code}` [{field.element}]"
        assert expected in source, (code, source)
        if field.blob:
            assert "index into `blobs`" in source
            assert ("base64" in source) == field.base64


def test_render_tables_names_every_type_table_and_column() -> None:
    text = format_doc.render_tables()
    for event_type in EVENT_TYPES.values():
        assert format_doc.render_event_type(event_type) in text
        assert f"| `{event_type.upload_code}` | `{event_type.table}` |" in text
        assert re.search(rf"^\s+{event_type.table}\s+Table\s+{event_type.title}$", text,
                         re.MULTILINE), event_type.table


def test_splice_replaces_only_between_the_markers() -> None:
    before = "# Title\n\nprose *kept* | as is\n\n"
    after = "\n\n## Later\n\nmore prose\n"
    document = f"{before}{format_doc.BEGIN}\nstale\n{format_doc.END}{after}"
    spliced = format_doc.splice(document, "fresh\n")
    assert spliced == f"{before}{format_doc.BEGIN}\n\nfresh\n\n{format_doc.END}{after}"
    assert format_doc.splice(spliced, "fresh\n") == spliced  # idempotent


@pytest.mark.parametrize(
    "document",
    [
        "no markers at all\n",
        f"{format_doc.BEGIN}\nonly the start\n",
        f"{format_doc.END}\n{format_doc.BEGIN}\n",
        f"{format_doc.BEGIN}\n{format_doc.BEGIN}\n{format_doc.END}\n",
    ],
    ids=["none", "no end", "reversed", "twice"],
)
def test_splice_refuses_documents_without_one_pair_of_markers(document: str) -> None:
    with pytest.raises(ValueError, match=r"marker|before"):
        format_doc.splice(document, "fresh\n")


def test_main_checks_and_rewrites_a_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    path = tmp_path / "FORMAT.md"
    path.write_text(f"prose\n{format_doc.BEGIN}\nstale\n{format_doc.END}\nmore\n", "utf-8")
    assert format_doc.main(["--check", str(path)]) == 1
    assert "make format-doc" in capsys.readouterr().err
    assert "stale" in path.read_text("utf-8")  # --check changes nothing
    assert format_doc.main([str(path)]) == 0
    assert format_doc.main(["--check", str(path)]) == 0
    text = path.read_text("utf-8")
    assert text.startswith("prose\n") and text.endswith(f"{format_doc.END}\nmore\n")
    assert "stale" not in text
    assert format_doc.main([str(tmp_path / "missing.md")]) == 2
