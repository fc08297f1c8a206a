"""The generic typed-config machinery (moelab.config): building, errors, overrides, round trips."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Literal

import pytest

from moelab.config import Config, ConfigError, apply_overrides, check, load_config, parse_override


@dataclasses.dataclass(kw_only=True)
class Inner(Config):
    k: int = 2
    n: int = 8
    mode: Literal["a", "b"] = "a"
    rate: float = 0.5
    tag: str | None = None

    def validate(self) -> None:
        check(self.k <= self.n, "k", f"must be <= n ({self.n}), got {self.k}")
        if self.rate < 0:
            raise ValueError("rate must be >= 0")  # a plain ValueError also gets the path


@dataclasses.dataclass(kw_only=True)
class Outer(Config):
    name: str
    flag: bool = False
    xs: list[int] = field(default_factory=list)
    pair: tuple[int, float] = (1, 2.0)
    layers: Literal["all", "middle"] | list[int] = "all"
    extra: dict[str, float] = field(default_factory=dict)
    anything: Any = None
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None


def build(data: dict, overrides=()) -> Outer:
    return load_config(Outer, data, overrides)


def error_of(data: dict, overrides=()) -> str:
    with pytest.raises(ValueError) as info:
        build(data, overrides)
    assert isinstance(info.value, ConfigError)
    return str(info.value)


# ---- building


def test_build_nested_with_defaults_and_widening():
    cfg = build({"name": "x", "inner": {"k": 3, "rate": 1}, "xs": [1, 2], "pair": [3, 4]})
    assert cfg.inner == Inner(k=3, rate=1.0)
    assert isinstance(cfg.inner.rate, float)  # int widened to float
    assert cfg.xs == [1, 2] and cfg.pair == (3, 4.0) and cfg.maybe is None


def test_unknown_key_names_path_allowed_keys_and_suggestion():
    msg = error_of({"name": "x", "inner": {"kk": 1}})
    assert msg.startswith("inner: unknown key 'kk'")
    assert "did you mean 'k'" in msg
    assert "allowed keys: k, mode, n, rate, tag" in msg


def test_unknown_top_level_key():
    msg = error_of({"name": "x", "zzz": 1})
    assert "unknown key 'zzz'" in msg and "allowed keys: anything, extra, flag" in msg


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"name": "x", "inner": {"k": "3"}}, "inner.k: expected int, got str '3'"),
        ({"name": "x", "inner": {"k": True}}, "inner.k: expected int, got bool True"),
        ({"name": "x", "flag": 1}, "flag: expected bool, got int 1"),
        ({"name": 5}, "name: expected str, got int 5"),
        ({"name": "x", "inner": {"rate": "fast"}}, "inner.rate: expected float"),
        ({"name": "x", "xs": [1, "b"]}, "xs[1]: expected int, got str 'b'"),
        ({"name": "x", "xs": 3}, "xs: expected a list"),
        ({"name": "x", "pair": [1]}, "pair: expected 2 items, got 1"),
        ({"name": "x", "inner": 3}, "inner: expected a mapping of Inner fields, got int 3"),
        ({"name": "x", "extra": {"a": "b"}}, "extra.a: expected float"),
        ({"name": "x", "inner": {"tag": 3}}, "inner.tag: expected str, got int 3"),
    ],
)
def test_wrong_types_name_the_dotted_field(data, expected):
    assert expected in error_of(data)


def test_literal_lists_allowed_values():
    msg = error_of({"name": "x", "inner": {"mode": "c"}})
    assert msg == "inner.mode: must be one of 'a', 'b', got 'c'"


def test_union_of_literal_and_list():
    assert build({"name": "x", "layers": [0, 2]}).layers == [0, 2]
    assert build({"name": "x", "layers": "middle"}).layers == "middle"
    msg = error_of({"name": "x", "layers": "first"})
    assert msg.startswith("layers: expected")


def test_missing_required_field():
    assert error_of({}) == "name: required field is missing"


def test_validate_hook_errors_are_prefixed():
    assert error_of({"name": "x", "inner": {"k": 9}}) == "inner.k: must be <= n (8), got 9"
    assert error_of({"name": "x", "maybe": {"rate": -1.0}}) == "maybe: rate must be >= 0"


def test_validate_runs_on_direct_construction():
    with pytest.raises(ConfigError, match="k: must be <= n"):
        Inner(k=10)


def test_non_mapping_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a YAML mapping"):
        Outer.from_yaml(path)


# ---- round trips


def test_dict_and_yaml_round_trip(tmp_path):
    cfg = build(
        {
            "name": "run",
            "flag": True,
            "xs": [3, 1],
            "pair": [2, 0.25],
            "layers": [1],
            "extra": {"lr": 1e-3},
            "anything": {"free": [1, "form"]},
            "inner": {"k": 1, "mode": "b", "tag": "t"},
            "maybe": {"n": 4},
        }
    )
    assert Outer.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "cfg.yaml"
    text = cfg.to_yaml(path)
    assert path.read_text() == text
    assert Outer.from_yaml(path) == cfg


# ---- overrides


def test_parse_override():
    assert parse_override("a.b.c= 2 ") == ("a.b.c", "2")
    assert parse_override("x=a=b") == ("x", "a=b")
    for bad in ("novalue", "=3", "a..b=1", "a.=1"):
        with pytest.raises(ConfigError, match="override must look like"):
            parse_override(bad)


@pytest.mark.parametrize(
    "override, attr, expected",
    [
        ("inner.k=4", ("inner", "k"), 4),
        ("inner.n=1e3", ("inner", "n"), 1000),
        ("inner.rate=1e-3", ("inner", "rate"), 1e-3),
        ("inner.rate=2", ("inner", "rate"), 2.0),
        ("inner.mode=b", ("inner", "mode"), "b"),
        ("inner.tag=null", ("inner", "tag"), None),
        ("inner.tag=1e6", ("inner", "tag"), "1e6"),  # str field: text stays text
        ("inner.tag='none'", ("inner", "tag"), "none"),  # quoted: the word, not None
        ("flag=true", ("flag",), True),
        ("flag=No", ("flag",), False),
        ("xs=[1, 2,3]", ("xs",), [1, 2, 3]),
        ("xs=4,5", ("xs",), [4, 5]),
        ("xs=[]", ("xs",), []),
        ("pair=[7, 0.5]", ("pair",), (7, 0.5)),
        ("layers=middle", ("layers",), "middle"),
        ("layers=[0,3]", ("layers",), [0, 3]),
        ("extra={lr: 0.1}", ("extra",), {"lr": 0.1}),
        ("anything=[1, two]", ("anything",), [1, "two"]),
        ("name=other", ("name",), "other"),
        ("name=null", ("name",), "null"),  # a plain str field cannot be None: text
    ],
)
def test_overrides_coerce_from_field_type(override, attr, expected):
    cfg = build({"name": "x"}, [override])
    value = cfg
    for a in attr:
        value = getattr(value, a)
    assert value == expected and type(value) is type(expected)


def test_override_creates_missing_optional_section():
    cfg = build({"name": "x"}, ["maybe.k=1"])
    assert cfg.maybe == Inner(k=1)
    cfg = build({"name": "x", "maybe": None}, ["maybe.n=3", "maybe.k=3"])
    assert cfg.maybe == Inner(k=3, n=3)


def test_override_sets_none_on_optional_section():
    assert build({"name": "x", "maybe": {"k": 1}}, ["maybe=null"]).maybe is None


@pytest.mark.parametrize(
    "override, expected",
    [
        ("inner.kk=1", "inner: unknown key 'kk' (did you mean 'k'?); allowed keys: k, mode, n"),
        ("zz.k=1", "unknown key 'zz'; allowed keys: anything"),
        ("inner.k.x=1", "inner.k: is a int, it has no field 'x'"),
        ("inner.k=two", "inner.k: expected int, got 'two'"),
        ("inner.n=1.5", "inner.n: expected int, got '1.5'"),
        ("inner.rate=fast", "inner.rate: expected float, got 'fast'"),
        ("inner.mode=c", "inner.mode: must be one of 'a', 'b', got 'c'"),
        ("flag=maybe", "flag: expected a bool (true/false), got 'maybe'"),
        ("xs=[1,b]", "xs[1]: expected int, got 'b'"),
        ("pair=[1]", "pair: expected 2 items"),
        ("inner.k=9", "inner.k: must be <= n (8), got 9"),  # validate hook after overriding
    ],
)
def test_override_errors_name_the_field(override, expected):
    assert expected in error_of({"name": "x"}, [override])


def test_overrides_apply_to_raw_data_in_order():
    data = {"name": "x", "inner": {"k": 1}}
    out = apply_overrides(Outer, data, ["inner.k=2", "inner.k=3"])
    assert out["inner"]["k"] == 3 and data["inner"]["k"] == 1  # input left untouched


def test_with_overrides_and_yaml_overrides(tmp_path):
    cfg = build({"name": "x"})
    assert cfg.with_overrides(["inner.n=3", "inner.k=3"]).inner == Inner(k=3, n=3)
    assert cfg.inner == Inner()  # unchanged
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    assert Outer.from_yaml(path, ["flag=yes"]).flag is True


# ---- tagged unions (a section whose ``kind`` picks its class, like model.ffn)


@dataclasses.dataclass(kw_only=True)
class Cat(Config):
    kind: Literal["cat"] = "cat"
    lives: int = 9
    name: str = "tom"


@dataclasses.dataclass(kw_only=True)
class Dog(Config):
    kind: Literal["dog"] = "dog"
    name: str = "rex"
    tricks: dict[str, int] = field(default_factory=dict)


@dataclasses.dataclass(kw_only=True)
class Home(Config):
    pet: Cat | Dog = field(default_factory=Cat)


def test_tagged_union_picks_the_class_by_kind():
    assert load_config(Home, {"pet": {"kind": "dog", "name": "fido"}}).pet == Dog(name="fido")
    assert load_config(Home, {"pet": {"lives": 3}}).pet == Cat(lives=3)  # no kind: the first
    assert Home(pet={"kind": "dog"}).pet == Dog()  # also from Python


def test_tagged_union_errors_name_kind_and_the_kind_that_has_the_key():
    with pytest.raises(ConfigError, match=r"pet.kind: must be one of 'cat', 'dog', got 'cow'"):
        load_config(Home, {"pet": {"kind": "cow"}})
    with pytest.raises(ConfigError, match=r"unknown key 'tricks' for kind 'cat' \(an option of"):
        load_config(Home, {"pet": {"tricks": {}}})
    with pytest.raises(ConfigError, match=r"unknown key 'lives' for kind 'dog'"):
        load_config(Home, {"pet": {"kind": "dog"}}, ["pet.lives=2"])


def test_kind_override_keeps_shared_keys_and_drops_the_others():
    home = load_config(Home, {"pet": {"lives": 3, "name": "kit"}}, ["pet.kind=dog"])
    assert home.pet == Dog(name="kit")
    home = load_config(Home, {}, ["pet.kind=dog", "pet.tricks.sit=2", "pet.tricks.roll=1"])
    assert home.pet.tricks == {"sit": 2, "roll": 1}
    with pytest.raises(ConfigError, match="pet.tricks.sit: expected int"):
        load_config(Home, {}, ["pet.kind=dog", "pet.tricks.sit=x"])


def test_float_fields_accept_yaml_exponent_text():
    # YAML 1.1 (PyYAML) reads `rate: 1e-3` as the string '1e-3'
    assert build({"name": "x", "inner": {"rate": "1e-3"}}).inner.rate == 1e-3


# ---- files and values that are not YAML: one line naming the file (or field) and the place


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("name: x\nxs: [1, 2\n", r"c\.yaml: not valid YAML \(.* at line 3, column 1\)"),
        ("name: x\n  flag: true\n", r"c\.yaml: not valid YAML \(.* at line 2, column 7\)"),
        ("", r"c\.yaml: the file is empty"),
        ("# only a comment\n", r"c\.yaml: the file is empty"),
    ],
)
def test_yaml_file_errors_are_one_line(tmp_path, text, want):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=want) as info:
        Outer.from_yaml(path)
    assert "\n" not in str(info.value)


def test_non_utf8_or_unreadable_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not UTF-8 text \(byte 6\)"):
        Outer.from_yaml(path)
    with pytest.raises(ConfigError, match=r": cannot read it \(Is a directory\)"):
        Outer.from_yaml(tmp_path)  # a directory


@pytest.mark.parametrize(
    ("override", "want"),
    [
        ("anything=[0.4", r"^anything: could not parse '\[0.4': .* \(column 5\)$"),
        ("anything={a: 1", r"^anything: could not parse '\{a: 1': .* \(column 6\)$"),
        ("extra={lr: [", r"^extra: could not parse '\{lr: \[' as a mapping: "),
    ],
)
def test_unparsable_override_values_name_the_field(override, want):
    with pytest.raises(ConfigError, match=want) as info:
        build({"name": "x"}, [override])
    assert "\n" not in str(info.value)
