"""The recommender's metrics: a gauge's series replaced as a whole (`set_series`)."""
from __future__ import annotations

from services.recommender.metrics import Metrics


def test_set_series_keeps_only_the_new_series():
    m = Metrics()
    m.set_series(m.model_info, {("served", "als", "v1"): 1, ("shadow", "als2", "s1"): 1}, gone=0)
    m.set_series(m.model_info, {("served", "als", "v2"): 1}, gone=0)
    text = m.exposition().decode()
    assert 'clickloop_recommender_model_info{name="als",role="served",version="v2"} 1.0' in text
    assert 'version="v1"' not in text and 'version="s1"' not in text


def test_set_series_to_nothing_empties_the_gauge():
    m = Metrics()
    m.set_series(m.posterior_version, {("exp-1",): 4}, gone=-1)
    assert 'experiment="exp-1"} 4.0' in m.exposition().decode()
    m.set_series(m.posterior_version, {}, gone=-1)
    assert 'experiment="exp-1"' not in m.exposition().decode()
