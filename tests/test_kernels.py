"""nanochat/kernels.py: a choice that a timing makes is made once per machine and kept, so every process of a run
(and a resumed run) computes with the same kernels."""

from __future__ import annotations

import json

from nanochat import kernels


def test_a_timed_choice_is_made_once_and_kept(tmp_path, monkeypatch):
    cache = tmp_path / "kernels.json"
    monkeypatch.setenv("NANOCHAT_KERNEL_CACHE", str(cache))
    assert kernels._timed_once("some path", lambda: True) is True
    assert kernels._timed_once("some path", lambda: False) is True  # a later, different timing does not flip it
    assert kernels._timed_once("another path", lambda: False) is False
    stored = json.loads(cache.read_text())
    assert sorted(key.split(" | ")[0] for key in stored) == ["another path", "some path"]
    assert all("threads" in key and "torch" in key for key in stored)  # per CPU, torch version and thread count


def test_a_corrupt_or_unwritable_cache_falls_back_to_the_timing(tmp_path, monkeypatch):
    cache = tmp_path / "kernels.json"
    cache.write_text("{not json")
    monkeypatch.setenv("NANOCHAT_KERNEL_CACHE", str(cache))
    assert kernels._timed_once("some path", lambda: True) is True
    assert json.loads(cache.read_text())  # rewritten whole
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("NANOCHAT_KERNEL_CACHE", str(blocked / "kernels.json"))  # its parent is a file
    assert kernels._timed_once("some path", lambda: False) is False
