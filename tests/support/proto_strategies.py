"""Hypothesis strategies for any protobuf message, built from its descriptor:
every field may be absent or set to anything its type allows — the extremes
of each integer type, NaN and infinities, unknown enum values, empty, huge
and non-printable strings, long repeated fields and maps — nested messages
to a bounded depth. Used to fuzz the balancer's API with what a hostile or
broken client could send."""

from __future__ import annotations

from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    # The extremes and their neighbours are where overflows live.
    edges = sorted(e for e in {low, low + 1, -1, 0, 1, high - 1, high} if low <= e <= high)
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _text(big: bool) -> st.SearchStrategy[str]:
    small = st.one_of(
        st.text(max_size=24),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz-.:0123456789", min_size=1, max_size=64),
        st.sampled_from(["", " ", "oap", "127.0.0.1", "169.254.169.254", "::1", "\x00", "é" * 40]),
    )
    if not big:
        return small
    # ~60,000 characters: only where it cannot be multiplied by a long list.
    return st.one_of(small, st.text(min_size=30, max_size=30).map(lambda t: t * 2000))


def _scalar(field: FieldDescriptor, big: bool = False) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        return _integers(*_INT_RANGES[kind])
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        if kind == FieldDescriptor.TYPE_FLOAT:
            return st.floats(width=32, allow_nan=True, allow_infinity=True)
        return st.floats(allow_nan=True, allow_infinity=True)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return _text(big)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _integers(-(2**31), 2**31 - 1))
    raise TypeError(f"no strategy for field {field.full_name} of type {kind}")


def _field(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        return st.dictionaries(_scalar(key_field), _single(value_field, depth + 1), max_size=40)
    single = _single(field, depth)
    if field.is_repeated:
        return st.one_of(
            st.lists(single, max_size=8), st.lists(single, min_size=500, max_size=3000)
        )
    return single


def _single(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None:
        return message(field.message_type, depth + 1)
    return _scalar(field)


def message(
    descriptor: Descriptor, depth: int = 0, *, big: bool = True
) -> st.SearchStrategy[Message]:
    """Any message of this type (fields beyond depth 3 are left unset; huge
    strings only outside repeated fields, so a message stays under a few MB)."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    optional = {field.name: _field(field, depth) for field in descriptor.fields}

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        values = draw(st.fixed_dictionaries({}, optional=optional))
        built = cls()
        for name, value in values.items():
            field = descriptor.fields_by_name[name]
            target = getattr(built, name)
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for key, item in value.items():
                    if field.message_type.fields_by_name["value"].message_type is not None:
                        target[key].CopyFrom(item)
                    else:
                        target[key] = item
            elif field.is_repeated:
                target.extend(value)
            elif field.message_type is not None:
                target.CopyFrom(value)
            else:
                setattr(built, name, value)
        return built

    return build()


def payload(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    """A serialized message of this type, or bytes that may not decode at all."""
    return st.one_of(
        message(descriptor).map(lambda m: m.SerializeToString()),
        st.binary(max_size=256),
        st.sampled_from([b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 10]),
    )
