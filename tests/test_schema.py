"""Argument schemas (sdeflow.components.schema): derived from signatures, coercion of YAML values, error messages."""

from __future__ import annotations

from typing import Any, Literal, Optional

import attrs
import pytest

from sdeflow.components.schema import TypeMismatch, check_arguments, coerce, signature_schema, type_name
from sdeflow.core.errors import ConfigError


class LinearVP:
    """A typed component class, as a plugin would write one."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0, t_eps: float = 1e-3):
        pass


class Net:
    def __init__(self, data_shape: tuple[int, ...], width: int, depth: int = 2, *args, extra=None, **kwargs):
        pass


def make_sampler(steps: int, lam: float = 0.0, method: Literal["em", "pc"] = "em") -> None:
    """A factory function works like a class."""


@attrs.define
class AttrsLoss:
    weighting: Literal["sigma2", "likelihood"] = "sigma2"
    channels: tuple[int, ...] = (64, 128)


def unresolvable(x: NoSuchType = 1) -> None:  # noqa: F821 - the annotation is broken on purpose
    """A factory whose annotation cannot be resolved."""


# --- signature_schema ---------------------------------------------------------------------------


def test_schema_of_a_class_has_defaults_and_types():
    schema = signature_schema(LinearVP)
    assert list(schema) == ["beta_min", "beta_max", "T", "t_eps"]
    assert schema["beta_max"].annotation is float
    assert schema["beta_max"].default == 20.0
    assert not any(a.required for a in schema.values())


def test_schema_leaves_out_injected_and_variadic_arguments():
    schema = signature_schema(Net, injected=("data_shape",))
    assert list(schema) == ["width", "depth", "extra"]
    assert schema["width"].required and not schema["depth"].required
    assert schema["extra"].annotation is Any  # unannotated


def test_schema_of_a_function():
    schema = signature_schema(make_sampler)
    assert schema["steps"].required
    assert schema["method"].annotation == Literal["em", "pc"]
    assert schema["lam"].default == 0.0


def test_schema_of_an_attrs_class():
    schema = signature_schema(AttrsLoss)
    assert schema["weighting"].annotation == Literal["sigma2", "likelihood"]
    assert schema["channels"].default == (64, 128)


def test_unresolvable_annotation_keeps_the_component_with_any_types():
    schema = signature_schema(unresolvable)
    assert schema["x"].annotation is Any and schema["x"].default == 1


def test_argument_describe_and_json():
    schema = signature_schema(Net, injected=("data_shape",))
    assert schema["width"].describe() == "width: int"
    assert schema["depth"].describe() == "depth: int = 2"
    channels = signature_schema(AttrsLoss)["channels"]
    assert channels.to_json() == {"name": "channels", "type": "tuple[int, ...]", "required": False,
                                  "default": [64, 128]}
    assert "default" not in schema["width"].to_json()


@pytest.mark.parametrize(
    "annotation, name",
    [
        (float, "float"),
        (Any, "any"),
        (tuple[int, ...], "tuple[int, ...]"),
        (Literal["a", "b"], "'a' | 'b'"),
        (Optional[int], "int | null"),  # noqa: UP045 - the typing spelling must work too
        (int | None, "int | null"),
    ],
)
def test_type_name(annotation, name):
    assert type_name(annotation) == name


# --- coerce -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, annotation, expected",
    [
        (3, int, 3),
        (3.0, int, 3),  # YAML's 1.0e5 for a step count
        ("1e5", int, 100000),  # ... and its 1e5, which PyYAML reads as a string
        (3, float, 3.0),
        ("1e-3", float, 1e-3),  # PyYAML reads 1e-3 (no dot) as a string
        (True, bool, True),
        ("em", Literal["em", "pc"], "em"),
        (None, Optional[int], None),  # noqa: UP045
        (4, Optional[int], 4),  # noqa: UP045
        (None, float | None, None),
        ([1, 2, 3], tuple[int, ...], (1, 2, 3)),
        ([1, 2.0], tuple[float, float], (1.0, 2.0)),
        ((1, 2), list[float], [1.0, 2.0]),
        ({"a": 1}, dict[str, int], {"a": 1}),
        (object, Any, object),
    ],
)
def test_coerce_accepts(value, annotation, expected):
    result = coerce(value, annotation)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    "value, annotation",
    [
        (True, int),  # a bool is not a count
        (1, bool),  # nor a count a flag
        (3.5, int),
        ("3", int),  # a quoted number is text; only YAML's unquoted 1e5 (read as a string) is a count
        ("1e-3", int),
        ("1.5e0", int),
        ("fast", float),
        (True, float),
        (1, str),
        ("ode", Literal["em", "pc"]),
        ("x", Optional[int]),  # noqa: UP045
        (5, tuple[int, ...]),
        ([1, 2, 3], tuple[int, int]),
        (["a"], list[int]),
        ([1], dict),
    ],
)
def test_coerce_rejects(value, annotation):
    with pytest.raises(TypeMismatch):
        coerce(value, annotation)


def test_float_from_int_is_a_float():
    assert isinstance(coerce(2, float), float)


def test_mismatch_says_what_was_expected():
    with pytest.raises(TypeMismatch) as info:
        coerce("ode", Literal["em", "pc"])
    assert info.value.expected == "'em' | 'pc'"


def test_literal_of_ints_rejects_a_bool():
    # Kernel bug: ``value in args`` is True for True in (0, 1), bypassing the int/bool strictness.
    with pytest.raises(TypeMismatch):
        coerce(True, Literal[0, 1])


# --- check_arguments ----------------------------------------------------------------------------

SDE_SCHEMA = signature_schema(LinearVP)
WHERE = "exp.yaml: sde"


def test_check_arguments_returns_coerced_values():
    checked = check_arguments({"beta_max": 10, "t_eps": "1e-5"}, SDE_SCHEMA, WHERE, "sde 'vp'")
    assert checked == {"beta_max": 10.0, "t_eps": 1e-5}
    assert isinstance(checked["beta_max"], float)


def test_unknown_argument_names_dotted_key_suggestion_and_accepted():
    with pytest.raises(ConfigError) as info:
        check_arguments({"beta_mx": 10}, SDE_SCHEMA, WHERE, "sde 'vp'")
    message = str(info.value)
    assert message.startswith("exp.yaml: sde.beta_mx:")
    assert "did you mean 'beta_max'" in message
    assert "accepted: beta_min: float = 0.1, beta_max: float = 20.0" in message
    assert "\n" not in message


def test_unknown_argument_of_a_component_without_arguments():
    with pytest.raises(ConfigError, match="accepted: no arguments"):
        check_arguments({"x": 1}, {}, WHERE, "sde 'plain'")


def test_wrong_type_names_key_expected_type_and_value():
    with pytest.raises(ConfigError) as info:
        check_arguments({"beta_max": "fast"}, SDE_SCHEMA, WHERE, "sde 'vp'")
    assert str(info.value) == "exp.yaml: sde.beta_max: expected float, got 'fast'"


def test_wrong_literal_lists_the_choices():
    schema = signature_schema(make_sampler)
    with pytest.raises(ConfigError, match=r"sampler\.method: expected 'em' \| 'pc', got 'ode'"):
        check_arguments({"steps": 10, "method": "ode"}, schema, "exp.yaml: sampler", "sampler 'em'")


def test_missing_required_argument():
    schema = signature_schema(Net, injected=("data_shape",))
    with pytest.raises(ConfigError) as info:
        check_arguments({"depth": 3}, schema, "exp.yaml: network", "network 'net'")
    message = str(info.value)
    assert message.startswith("exp.yaml: network: network 'net' needs argument(s) width")
    assert "accepted: width: int, depth: int = 2" in message


def test_non_string_key_is_a_config_error():
    # Kernel bug: PyYAML reads keys like `on:`/`yes:` as booleans and `3:` as an int;
    # did_you_mean(key, ...) then raises TypeError instead of the ConfigError naming the key.
    with pytest.raises(ConfigError, match=r"sde\.True: unknown argument"):
        check_arguments({True: 1}, SDE_SCHEMA, WHERE, "sde 'vp'")
