"""model_overrides: a preset with nested fields replaced (a paper-width model of reduced depth)."""

import pytest

from xsam.model.config import paper, with_overrides


def test_override_replaces_only_the_named_fields():
    cfg = with_overrides(paper(), {"llm": {"num_hidden_layers": 4}, "num_prompt_points": 64})
    assert cfg.llm.num_hidden_layers == 4 and cfg.num_prompt_points == 64
    assert cfg.llm.hidden_size == paper().llm.hidden_size and cfg.sam == paper().sam


@pytest.mark.parametrize("bad,match", [({"lm": {}}, "unknown section 'lm'"),
                                       ({"llm": {"layers": 2}}, r"model_overrides.llm: unknown field\(s\) layers"),
                                       ({"sam": 3}, "expected a mapping")])
def test_unknown_override_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        with_overrides(paper(), bad)
