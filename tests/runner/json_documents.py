"""Arbitrary JSON documents for the property tests of what reads messages off a queue."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st


def json_documents(*, text_size: int, key_size: int, leaves: int) -> st.SearchStrategy[Any]:
    """Any JSON value a sender could produce, including what strict JSON forbids but Python's
    ``json`` writes and reads (NaN, infinities) and integers far past 64 bits."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=text_size),
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=key_size), children, max_size=4)
        ),
        max_leaves=leaves,
    )
