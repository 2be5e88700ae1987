"""The plugin's parameter parsing: every bad parameter is refused with a message naming it."""
import os
import subprocess
import sys

import pytest

import tracker
from copier.sizes import format_size
from nbd_plugin.params import Config, ParamError, parse_size, split_named


def config(*pairs):
    cfg = Config()
    for key, value in pairs:
        cfg.add(key, value)
    cfg.complete()
    return cfg


def test_single_source_is_the_default_export():
    cfg = config(("source", "/tmp/a.img"))
    assert [(s.name, s.path, s.dev) for s in cfg.sources] == [("", "/tmp/a.img", 0)]


def test_named_sources_get_device_ids_in_order():
    cfg = config(("source", "/d/a"), ("source", "db=/d/b"), ("source", "logs=/d/c"))
    assert [(s.name, s.dev) for s in cfg.sources] == [("", 0), ("db", 1), ("logs", 2)]


def test_uri_with_equals_is_not_split_as_a_name():
    assert split_named("nbd+unix:///?socket=/run/r.sock", "replica") == ("", "nbd+unix:///?socket=/run/r.sock")
    assert split_named("db=nbd+unix:///?socket=/r", "replica") == ("db", "nbd+unix:///?socket=/r")


def test_replicas_attach_to_their_sources():
    cfg = config(("source", "/a"), ("source", "db=/b"), ("replica", "nbd://h/a"), ("replica", "db=nbd://h/b"))
    assert [s.replica for s in cfg.sources] == ["nbd://h/a", "nbd://h/b"]


@pytest.mark.parametrize("pairs, message", [
    ([], "no source given"),
    ([("sauce", "/a")], "unknown parameter 'sauce'"),
    ([("source", "/a"), ("source", "/b")], "two sources for export '(default)'"),
    ([("source", "/a"), ("replica", "db=nbd://h/")], "names no source"),
    ([("source", "/a"), ("source", "db=/b"), ("replica", "nbd://h/")], "needs a replica; missing for ['db']"),
    ([("source", "/a"), ("cycle", "-1")], "must be > 0"),
    ([("source", "/a"), ("cycle", "nan")], "must be > 0"),
    ([("source", "/a"), ("cycle", "soon")], "is not a number"),
    ([("source", "/a"), ("tracking", "maybe")], "use on or off"),
    ([("source", "/a"), ("tracking", "off"), ("replica", "nbd://h/")], "replication needs tracking"),
    ([("source", "/a"), ("keepaside-mem", "lots")], "is not a size"),
    ([("source", "/a"), ("tracker-mem", "0")], "tracker-mem='0' must be at least"),
    ([("source", "/a"), ("tracker-mem", "1")], "tracker-mem='1' must be at least"),
    ([("source", "/a"), ("keepaside-mem", "0")], "keepaside-mem='0' must be at least 1 B"),
    ([("source", "/a"), ("keepaside-mem", "4MB")], "keepaside-mem='4MB' is not a size"),
    ([("source", "/a"), ("keepaside-spill", "1.5G")], "keepaside-spill='1.5G' is not a size"),
    ([("source", "/a"), ("stop-timeout", "0")], "stop-timeout='0' must be > 0 and at most 86400 seconds"),
    ([("source", "/a"), ("stop-timeout", "later")], "stop-timeout='later' is not a number of seconds"),
    ([("source", "/a"), ("resync", "maybe")], "resync='maybe': use auto or full"),
    ([("source", "/a"), ("dirty-region", "3M")], "dirty-region='3M' must be 0 (off) or a power of two from 4K to 1G"),
    ([("source", "/a"), ("dirty-region", "2K")], "dirty-region='2K' must be 0 (off) or a power of two"),
    ([("source", "/a"), ("dirty-region", "2G")], "dirty-region='2G' must be 0 (off) or a power of two"),
    ([("source", "/a"), ("dirty-region", "big")], "dirty-region='big' is not a size"),
])
def test_bad_parameters_are_refused_with_a_clear_message(pairs, message):
    with pytest.raises(ParamError) as e:
        config(*pairs)
    assert message in str(e.value)


def test_dirty_region_takes_powers_of_two_from_4k_or_0_for_off():
    assert config(("source", "/a")).dirty_region == 64 << 10
    assert config(("source", "/a"), ("dirty-region", "4K")).dirty_region == 4096
    assert config(("source", "/a"), ("dirty-region", "0")).dirty_region == 0


def test_sizes_have_one_grammar():
    """Every size (parameters, verify --chunk) goes through copier.sizes: binary units, with or
    without 'iB', any case; no fractions, no decimal MB."""
    assert parse_size("4096", "x") == 4096
    assert parse_size("64M", "x") == 64 << 20
    assert parse_size("1g", "x") == 1 << 30
    assert parse_size("512 KiB", "x") == 512 << 10
    assert parse_size("2T", "x") == 2 << 40
    assert parse_size("0", "x", minimum=0) == 0
    for bad in ("1.5G", "4MB", "-1", "", "lots", "4X"):
        with pytest.raises(ParamError, match="is not a size"):
            parse_size(bad, "x")


def test_the_smallest_tracker_mem_is_one_the_tracker_takes():
    smallest = tracker.min_bytes()
    assert config(("source", "/a"), ("tracker-mem", str(smallest))).tracker_mem == smallest
    tracker.Tracker(max_bytes=smallest)
    with pytest.raises(ParamError, match=f"must be at least {format_size(smallest)}"):
        config(("source", "/a"), ("tracker-mem", str(smallest - 1)))


def test_sizes_are_formatted_in_binary_units():
    assert [format_size(n) for n in (0, 5, 1023, 1024, 1536, 64 << 20, 3 << 30, 1 << 62)] == [
        "0 B", "5 B", "1023 B", "1.0 KiB", "1.5 KiB", "64.0 MiB", "3.0 GiB", "4.0 EiB"]


def test_a_control_group_the_user_is_not_in_is_refused_before_serving():
    """Giving the socket to a group takes root or membership; found only after nbdkit's fork,
    the chown would fail once the record and the dirty-region log were written."""
    probe = ("from nbd_plugin.params import Config, ParamError\n"
             "try:\n    Config().add('control-group', '0')\nexcept ParamError as e:\n    print(e)\n")
    run = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.stdout.strip() == "control-group='0': this user is not in that group", run.stderr
    assert config(("source", "/a"), ("control-group", "0")).control_group == 0   # root may
