import os
import pickle

import pytest

from xsam.data import safe_pickle
from xsam.data.errors import SampleError, SourceError
from xsam.data.fixtures.refer import py2_pickle
from xsam.data.text import clean_text


class _TouchOnLoad:
    """Unpickling this runs `touch <path>` through os.system."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


PLAIN = {"ref_id": 3, "sentences": [{"sent": "the man", "sent_id": 7}], "bbox": (1.5, 2.0, 3.0, 4.0),
         "ok": True, "none": None, "big": 2**70, "neg": -5, "nested": [[1, [2, [3]]]]}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_containers_and_scalars_load_in_every_protocol(protocol):
    assert safe_pickle.loads(pickle.dumps(PLAIN, protocol=protocol), "refs.p") == PLAIN


def test_bytes_kept_or_decoded():
    data = pickle.dumps({"raw": b"caf\xc3\xa9"}, protocol=3)
    assert safe_pickle.loads(data, "x.p", decode_bytes=False) == {"raw": b"caf\xc3\xa9"}
    assert safe_pickle.loads(data, "x.p") == {"raw": "café"}


def test_python2_pickle_byte_strings_become_text_and_bad_bytes_are_caught_per_field():
    # what Python 2 wrote for REFER: keys and text as byte strings, protocol 2
    data = py2_pickle([{b"sent": b"the caf\xc3\xa9 sign", b"raw": "unicode \u00e9", b"id": 1},
                       {b"sent": b"caf\xe9 in latin-1", b"id": 2}])
    assert data[:2] == b"\x80\x02"
    refs = safe_pickle.loads(data, "refs(unc).p")
    assert refs[0] == {"sent": "the café sign", "raw": "unicode é", "id": 1}
    assert clean_text(refs[0]["sent"], "refs.0.sent") == "the café sign"
    with pytest.raises(SampleError) as err:  # invalid UTF-8 survives as surrogates until checked
        clean_text(refs[1]["sent"], "refs.1.sentences.0.sent", "refs(unc).p")
    assert err.value.field == "refs.1.sentences.0.sent"


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_malicious_reduce_is_refused_and_never_runs(tmp_path, protocol):
    target = tmp_path / "pwned"
    data = pickle.dumps({"refs": [_TouchOnLoad(target)]}, protocol=protocol)
    with pytest.raises(safe_pickle.UnsafePickleError) as err:
        safe_pickle.loads(data, "/data/refcoco/refs(unc).p")
    assert not target.exists()
    assert err.value.global_name == f"{os.system.__module__}.system"
    assert "/data/refcoco/refs(unc).p" in str(err.value) and "system" in str(err.value)
    assert isinstance(err.value, SourceError) and err.value.file == "/data/refcoco/refs(unc).p"


def test_the_malicious_pickle_really_runs_under_plain_pickle(tmp_path):
    """The control: the same bytes DO create the file with pickle.loads."""
    target = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_TouchOnLoad(target), protocol=2))
    assert target.exists()


@pytest.mark.parametrize("data, name", [
    (b"cos\nsystem\n(S'touch /tmp/x'\ntR.", "os.system"),  # protocol 0 GLOBAL + REDUCE
    (b"(S'touch /tmp/x'\nios\nsystem\n.", "os.system"),  # protocol 0 INST
    (b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94.", "builtins.eval"),  # protocol 4 STACK_GLOBAL
    (b"\x80\x02c__builtin__\nset\nq\x00]q\x01K\x01a\x85q\x02Rq\x03.", "__builtin__.set"),  # Python 2 set()
])
def test_every_global_opcode_is_refused(data, name):
    with pytest.raises(safe_pickle.UnsafePickleError) as err:
        safe_pickle.loads(data, "refs.p")
    assert err.value.global_name == name


@pytest.mark.parametrize("data", [b"", b"\x80\x02]q\x00(K\x01", b"\x80\x02\xff", b"not a pickle at all",
                                  b"\x80\x02Q."])  # Q = persistent id
def test_corrupt_pickles_fail_the_source_naming_the_file(data):
    with pytest.raises(SourceError) as err:
        safe_pickle.loads(data, "/data/refs.p")
    assert not isinstance(err.value, safe_pickle.UnsafePickleError)
    assert err.value.file == "/data/refs.p"


def test_shared_and_cyclic_structures_do_not_blow_up():
    leaf = ["x" * 10]
    for _ in range(60):  # 2**60 leaves if copies were expanded
        leaf = [leaf, leaf]
    out = safe_pickle.loads(pickle.dumps(leaf, protocol=2), "refs.p")
    assert out[0] is out[1]
    cyc: list = [1]
    cyc.append(cyc)
    loaded = safe_pickle.loads(pickle.dumps(cyc, protocol=2), "refs.p")
    assert loaded[0] == 1 and loaded[1] is loaded
