"""The plugin's parameter parsing: every bad parameter is refused with a message naming it."""
import pytest

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
    ([("source", "/a"), ("tracker-mem", "0")], "must be > 0"),
    ([("source", "/a"), ("keepaside-spill", "1.5G")], "keepaside-spill='1.5G' is not a size"),
    ([("source", "/a"), ("stop-timeout", "0")], "stop-timeout='0' must be > 0 and at most 86400 seconds"),
    ([("source", "/a"), ("stop-timeout", "later")], "stop-timeout='later' is not a number of seconds"),
    ([("source", "/a"), ("resync", "maybe")], "resync='maybe': use auto or full"),
])
def test_bad_parameters_are_refused_with_a_clear_message(pairs, message):
    with pytest.raises(ParamError) as e:
        config(*pairs)
    assert message in str(e.value)


def test_sizes():
    assert parse_size("4096", "x") == 4096
    assert parse_size("64M", "x") == 64 << 20
    assert parse_size("1g", "x") == 1 << 30
