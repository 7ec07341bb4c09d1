import pytest

from pipeline.config import PromoteConfig
from pipeline.promote import _redact, decide, flatten


def _evaluation(candidate, baseline_value, baseline="champion"):
    return {"baseline": baseline, "models": {"candidate": {"recall@10": candidate},
                                             baseline: {"recall@10": baseline_value}}}


def test_promotes_only_beyond_the_margin():
    cfg = PromoteConfig(margin=0.01)
    assert decide(_evaluation(0.30, 0.28), cfg)[0] is True
    assert decide(_evaluation(0.285, 0.28), cfg)[0] is False
    assert decide(_evaluation(0.28, 0.28), PromoteConfig())[0] is False  # a tie does not promote


def test_reason_names_the_numbers():
    _, reason = decide(_evaluation(0.3, 0.1, baseline="start"), PromoteConfig())
    assert "0.3000" in reason and "start 0.1000" in reason


def test_unknown_metric_is_an_error():
    with pytest.raises(KeyError, match="recall@7"):
        decide(_evaluation(0.3, 0.1), PromoteConfig(metric="recall@7"))


def test_flatten_and_redact():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    assert _redact("https://user:secret@mlflow.example:5000") == "https://***@mlflow.example:5000"
    assert _redact("sqlite:///tmp/x.db") == "sqlite:///tmp/x.db"
