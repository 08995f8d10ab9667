"""Issue 16, rule 8: generated values through ``iap_rt.requests.resolve``, the workspace config
loader and the prompts-file reader give a clear ``IapRtError`` or success, never another
exception; and success means the value obeys the rule. Deterministic (derandomize) and bounded.
(The training data-file reader has its own property test in tests/integration/test_fuzz_data.py.)
"""

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iap_rt.commands import read_prompts_file
from iap_rt.config import SECTIONS, GenerateConfig, load_config
from iap_rt.errors import IapRtError
from iap_rt.modeldir import ModelDir, default_model_dir
from iap_rt.requests import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, PromptRequest, resolve

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

MODEL = ModelDir.open(default_model_dir())
MULTIPLE = MODEL.dims.pixel_multiple

# anything a caller could pass, plus the edges of each rule
ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=1100),
    st.sampled_from([MAX_SEED, MAX_SEED - 1, MAX_SEED + 1, 2**64, MULTIPLE, 512]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([np.float32("nan"), np.float16(7.5), np.float64(1e30), np.float32(-0.0)]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(np.int64),
    st.integers(min_value=0, max_value=2**64 - 1).map(np.uint64),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.sampled_from(["ddim", "euler", "dpm++", "plms", ""]),
)


VALID = {
    "prompt": st.text(max_size=30),
    "negative": st.text(max_size=10),
    "steps": st.integers(1, MAX_STEPS),
    "guidance": st.floats(0, MAX_GUIDANCE),
    "seed": st.integers(0, MAX_SEED),
    "height": st.integers(1, 256).map(lambda k: k * MULTIPLE),
    "width": st.integers(1, 256).map(lambda k: k * MULTIPLE),
    "batch": st.integers(1, 64),
    "scheduler": st.sampled_from(["ddim", "euler", "dpm++"]),
}


@st.composite
def calls(draw):
    """A valid call with up to three of its values replaced by anything (or an edge)."""
    call = {k: draw(v) for k, v in VALID.items()}
    for k in draw(st.sets(st.sampled_from(sorted(VALID)), max_size=3)):
        call[k] = draw(ANY)
    return call


@FUZZ
@given(call=calls())
def test_resolve_is_an_iap_rt_error_or_a_valid_request(call):
    prompt, negative, steps, guidance, seed, height, width, batch, scheduler = (
        call[k] for k in VALID
    )
    request = PromptRequest(prompt, negative, seed, guidance, batch, None, steps, height, width,
                            scheduler)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy overflow warning would be a silent wrap
        try:
            r = resolve(MODEL, request)
        except IapRtError:
            return
    # accepted: every rule holds, and what was given is what was resolved (None: the default)
    assert isinstance(r.prompt, str) and isinstance(r.negative_prompt, str)
    assert not isinstance(r.guidance, bool) and math.isfinite(r.guidance)
    assert 0 <= r.guidance <= MAX_GUIDANCE
    assert 1 <= r.steps <= MAX_STEPS and 1 <= r.batch_size
    assert 0 <= r.seed and r.seed + r.batch_size - 1 <= MAX_SEED
    for side in (r.height, r.width):
        assert side > 0 and side % MULTIPLE == 0
    assert r.scheduler in ("ddim", "euler", "dpm++")
    for asked, got in ((steps, r.steps), (guidance, r.guidance), (height, r.height),
                       (width, r.width), (seed, r.seed), (batch, r.batch_size)):  # fmt: skip
        assert asked is None or asked == got
    assert scheduler in (None, "", r.scheduler)


# ---- the workspace config loader ----------------------------------------------------------------


def _toml_key(k: str) -> str:
    return k if k and all(c.isascii() and (c.isalnum() or c in "-_") for c in k) else json.dumps(k)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return (
            "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        )
    if isinstance(v, (int, str)):
        return json.dumps(v, ensure_ascii=False) if isinstance(v, str) else str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return str(v)  # dates


def _document(doc: dict) -> str:
    """A TOML document: scalars first, then one [table] per dict value."""
    lines = [
        f"{_toml_key(k)} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)
    ]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{_toml_key(k)}]")
            lines += [f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


FIELDS = sorted({f for c in ("generate",) for f in GenerateConfig.__dataclass_fields__})
KEYS = st.one_of(
    st.sampled_from(FIELDS + ["ort_cpu_unet", "base", "fp16", "lr", "networks", "batch"]),
    st.text(min_size=1, max_size=6),
)
SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "12GB", "off", "ddim", "ort", "outputs", "a.png", "x.gif"]),
    st.dates(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(min_size=1, max_size=4), inner, max_size=2)),
    max_leaves=5,
)  # fmt: skip
TABLES = st.dictionaries(KEYS, VALUES, max_size=5)
DOCUMENTS = st.dictionaries(
    st.one_of(st.sampled_from(SECTIONS), st.text(min_size=1, max_size=5)),
    st.one_of(TABLES, VALUES),
    max_size=3,
)


def _valid_value(hint):
    """A strategy for values of a config field's annotation (what resolve should accept)."""
    from iap_rt.config import _allowed

    types_, optional = _allowed(hint)
    options = [st.none()] if optional else []
    for t in types_:
        origin = getattr(t, "__origin__", t)
        options.append({int: st.integers(-(2**63), 2**63 - 1), float: st.floats(-1e6, 1e6),
                        str: st.text(max_size=8), bool: st.booleans(),
                        tuple: st.lists(st.text(max_size=4), max_size=3)}[origin])  # fmt: skip
    return st.one_of(options)


@st.composite
def documents(draw, section: str):
    """A document whose [section] holds valid values for some fields, then up to two random
    changes (a value replaced by anything, an unknown key, the table made a scalar)."""
    import typing

    hints = typing.get_type_hints(CONFIGS[section])
    fields = draw(st.sets(st.sampled_from(sorted(hints)), max_size=4))
    table = {f: draw(_valid_value(hints[f])) for f in fields}
    table = {k: (list(v) if isinstance(v, tuple) else v) for k, v in table.items() if v is not None}
    doc = {section: table}
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["value", "key", "scalar", "other"]))
        if kind == "value" and table:
            table[draw(st.sampled_from(sorted(table)))] = draw(VALUES)
        elif kind == "key":
            table[draw(KEYS)] = draw(VALUES)
        elif kind == "scalar":
            doc[section] = draw(SCALARS)
        else:
            doc.update(draw(DOCUMENTS))
    return doc


def _configs():
    from iap_rt.config import ServeConfig
    from iap_rt.engines.config import EngineConfig
    from iap_rt.export.config import ExportConfig
    from iap_rt.train.config import TrainConfig

    return {"generate": GenerateConfig, "export": ExportConfig, "engines": EngineConfig,
            "train": TrainConfig, "serve": ServeConfig}  # fmt: skip


CONFIGS = _configs()


@settings(FUZZ, max_examples=120)  # each example writes and parses a file
@given(data=st.data(), section=st.sampled_from(SECTIONS))
def test_any_toml_document_loads_or_is_a_config_error(tmp_path_factory, data, section):
    doc = data.draw(st.one_of(documents(section), DOCUMENTS))
    path = tmp_path_factory.mktemp("toml") / "iap-rt.toml"
    path.write_text(_document(doc), "utf-8")
    try:
        cfg = load_config(CONFIGS[section], section, path)
    except IapRtError as e:
        assert "<class" not in str(e) and "NoneType" not in str(e), str(e)
        return
    table = doc.get(section, {})
    assert isinstance(table, dict)
    for k, v in table.items():  # accepted: every value has its field's type, floats finite
        got = getattr(cfg, k)
        if isinstance(got, float):
            assert math.isfinite(got)
        assert type(got) in (int, float, str, bool, tuple, type(None)), (k, v, got)


@FUZZ
@given(data=st.binary(max_size=200))
def test_any_bytes_as_a_workspace_file_load_or_are_a_config_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("toml") / "iap-rt.toml"
    path.write_bytes(data)
    try:
        load_config(GenerateConfig, "generate", path)
    except IapRtError:
        pass


# ---- the prompts file ---------------------------------------------------------------------------


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=60).map(
    lambda t: t.encode("utf-8", "surrogatepass"))))  # fmt: skip
def test_any_prompts_file_reads_or_is_an_input_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("prompts") / "p.txt"
    path.write_bytes(data)
    try:
        prompts = read_prompts_file(str(path))
    except IapRtError:
        return
    assert prompts and all(isinstance(p, str) and p.strip() == p and p for p in prompts)
    for p in prompts:
        p.encode("utf-8")  # every prompt is valid text the tokenizer can take


@pytest.mark.parametrize("seed", [np.int64(MAX_SEED), np.uint64(MAX_SEED)])
def test_numpy_seeds_do_not_wrap_past_the_range(seed):
    with pytest.raises(IapRtError, match="would use seed 9223372036854775808"):
        resolve(MODEL, PromptRequest("x", "", seed, 3.0, 2, None, 2, 32, 32, "ddim"))
