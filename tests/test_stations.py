"""The station list: parsing, bad lines, reloading when the file changes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from hisparc_datastore.stations import Station, StationList, parse_station_list


def test_parse_skips_blank_lines_and_strips_fields() -> None:
    stations = parse_station_list("501,Amsterdam,pw1\n\n 502 , Leiden , pw 2 \n")
    assert stations == {
        501: Station(501, "Amsterdam", "pw1"),
        502: Station(502, "Leiden", "pw 2"),
    }


def test_malformed_lines_are_reported_with_their_line_number(
    caplog: pytest.LogCaptureFixture,
) -> None:
    text = "501,Amsterdam,pw1\nfive-oh-two,Leiden,pw\n503,Leiden\n,Leiden,pw\n504,,pw\n505,x,y\n"
    with caplog.at_level(logging.ERROR):
        stations = parse_station_list(text, "stations.csv")
    assert sorted(stations) == [501, 505]
    messages = caplog.text
    for line in (2, 3, 4, 5):
        assert f"stations.csv line {line}:" in messages


def test_password_is_not_in_the_repr() -> None:
    assert "hunter2" not in repr(Station(501, "Amsterdam", "hunter2"))


def test_changed_file_is_picked_up_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "stations.csv"
    path.write_text("501,Amsterdam,old\n")
    stations = StationList(path)
    assert stations.get(501) == Station(501, "Amsterdam", "old")
    assert stations.get(502) is None
    path.write_text("501,Amsterdam,new\n502,Leiden,pw\n")
    os.utime(path, ns=(1, 1))  # a different mtime even within the clock's resolution
    assert stations.get(501) == Station(501, "Amsterdam", "new")
    assert stations.get(502) == Station(502, "Leiden", "pw")


def test_replaced_file_is_picked_up(tmp_path: Path) -> None:
    """Kubernetes updates a mounted secret by swapping a symlink: a new inode."""
    path = tmp_path / "stations.csv"
    path.write_text("501,Amsterdam,a\n")
    stations = StationList(path)
    assert stations.get(501) is not None
    replacement = tmp_path / "new.csv"
    replacement.write_text("601,Twente,b\n")
    replacement.replace(path)
    assert stations.get(601) == Station(601, "Twente", "b")
    assert stations.get(501) is None


def test_unreadable_or_missing_file_keeps_the_last_good_list(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "stations.csv"
    path.write_text("501,Amsterdam,a\n")
    stations = StationList(path)
    path.unlink()
    with caplog.at_level(logging.ERROR):
        assert stations.get(501) == Station(501, "Amsterdam", "a")
        assert stations.get(501) == Station(501, "Amsterdam", "a")
    assert caplog.text.count("is missing") == 1  # reported once, not per request
    path.write_bytes(b"\xff\xfe not utf-8")
    assert stations.get(501) == Station(501, "Amsterdam", "a")


def test_missing_file_at_start_gives_an_empty_list(tmp_path: Path) -> None:
    stations = StationList(tmp_path / "absent.csv")
    assert stations.get(501) is None
    assert len(stations) == 0


def test_station_numbers_beyond_uint32_are_refused(caplog) -> None:  # type: ignore[no-untyped-def]
    from hisparc_datastore.stations import MAX_STATION, parse_station_list

    parsed = parse_station_list(f"{MAX_STATION},Big,pw\n{MAX_STATION + 1},Too big,pw\n")
    assert list(parsed) == [MAX_STATION]
    assert "larger than" in caplog.text
