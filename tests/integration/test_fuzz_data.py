"""Issue 16, rule 8 for the training data-file reader: any JSONL/CSV file gives rows or a clear
``IapRtError``, never another exception. Deterministic and bounded.

The reader is ``train/rows.py`` (issue 13's streaming reader). The explicit examples below are
the inputs that once escaped as other exceptions (NUL / lone surrogates, deep JSON, a CSV field
past the csv module's 128 kB limit).
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from iap_rt.errors import IapRtError
from iap_rt.train.rows import read_rows as read_data

JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6,
)  # fmt: skip
ROW = st.fixed_dictionaries(
    {},
    optional={
        "image": st.one_of(st.text(max_size=12), JSON),
        "zh": st.one_of(st.text(max_size=12), JSON),
        "en": st.one_of(st.text(max_size=12), JSON),
        "extra": JSON,
    },
)
JSONL = st.lists(st.one_of(ROW.map(json.dumps), JSON.map(json.dumps), st.text(max_size=20)),
                 max_size=4).map("\n".join)  # fmt: skip
CSV = st.lists(st.lists(st.text(max_size=8), max_size=4).map(",".join), max_size=4).map(
    lambda rows: "\n".join(["image,zh,en", *rows])
)
KNOWN_ESCAPES = [  # what escapes today: NUL / lone surrogate in a path or caption, deep JSON,
    (".jsonl", '{"image": "a\\u0000b", "zh": "x", "en": "y"}'),  # a CSV field past 128 kB
    (".jsonl", '{"image": "\\ud800", "zh": "x", "en": "y"}'),
    (".jsonl", '{"image": "a", "zh": "\\ud800", "en": "y"}'),
    (".jsonl", "[" * 5000 + "]" * 5000),
    (".csv", 'image,zh,en\n"' + "x" * 200_000 + '",b,c'),
]


@settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    case=st.one_of(
        st.tuples(st.just(".jsonl"), JSONL),
        st.tuples(st.just(".csv"), CSV),
        st.tuples(st.sampled_from([".jsonl", ".csv"]), st.binary(max_size=100)),
    )
)
@example(case=KNOWN_ESCAPES[0])
@example(case=KNOWN_ESCAPES[1])
@example(case=KNOWN_ESCAPES[2])
@example(case=KNOWN_ESCAPES[3])
@example(case=KNOWN_ESCAPES[4])
def test_any_data_file_reads_or_is_an_iap_rt_error(tmp_path_factory, case):  # fmt: skip
    suffix, content = case
    path = tmp_path_factory.mktemp("data") / f"d{suffix}"
    if isinstance(content, str):
        content = content.encode("utf-8", "surrogatepass")
    path.write_bytes(content)
    try:
        read_data(path)
    except IapRtError:
        pass
