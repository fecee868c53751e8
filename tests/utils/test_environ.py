"""vim.utils.environ_set: a variable set within a block, then restored (or removed) even when the block raises."""
import os

import pytest

from vim.utils import environ_set


def test_sets_then_removes(monkeypatch):
    monkeypatch.delenv('VIM_TEST_VAR', raising=False)
    with environ_set('VIM_TEST_VAR', 'a'):
        assert os.environ['VIM_TEST_VAR'] == 'a'
    assert 'VIM_TEST_VAR' not in os.environ


def test_restores_previous_value_after_an_error(monkeypatch):
    monkeypatch.setenv('VIM_TEST_VAR', 'before')
    with pytest.raises(KeyError), environ_set('VIM_TEST_VAR', 'inside'):
        assert os.environ['VIM_TEST_VAR'] == 'inside'
        raise KeyError
    assert os.environ['VIM_TEST_VAR'] == 'before'
