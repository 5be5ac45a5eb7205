"""The registry's refusals name the thing and the fix (torch-free; no model)."""

import dataclasses

import pytest

from pipeline.methods import (
    DDIMParams,
    InversionConfig,
    MethodInfo,
    UnknownMethodError,
    get_method,
    register,
    unregister,
)


def test_register_takes_dataclass_params_only_and_get_method_returns_what_was_registered():
    with pytest.raises(
        TypeError, match=r"method 'not_a_dataclass': params must be a dataclass, got <class 'int'>"
    ):
        register(MethodInfo("not_a_dataclass", int, "tests.nowhere", "bad"))

    @dataclasses.dataclass(frozen=True)
    class Params:
        steps: int = 1

    info = MethodInfo("registered_here", Params, "tests.nowhere", "test method")
    try:
        assert register(info) is info and get_method("registered_here") is info
    finally:
        unregister("registered_here")


def test_an_unknown_setting_is_named_with_every_allowed_one():
    with pytest.raises(TypeError) as raised:
        InversionConfig.of("ddim", num_steps=5, magic=1, zebra=2)
    allowed = sorted(set(InversionConfig.common_keys()) | {f.name for f in dataclasses.fields(DDIMParams)})
    assert str(raised.value) == (
        f"'magic' is not a setting of inversion method 'ddim'; allowed: {allowed}"
    ), str(raised.value)


def test_an_unimportable_method_module_says_how_to_fix_it():
    with pytest.raises(UnknownMethodError) as raised:
        get_method("no_such_package.methods:mine")
    message = str(raised.value)
    assert "module 'no_such_package.methods' cannot be imported" in message
    assert message.endswith(
        "make it importable (PYTHONPATH or an installed package) or choose a registered method."
    ), message
