"""``TermFlag``: the stop flag of the fits, the worker and the trainer, with real signals sent to this
process."""

from __future__ import annotations

import os
import signal

import pytest

from sdfm.signals import TermFlag


def test_a_signal_sets_the_flag_and_restore_puts_the_previous_handler_back():
    seen = []
    before = signal.signal(signal.SIGTERM, lambda *a: seen.append("previous"))
    try:
        flag = TermFlag((signal.SIGTERM, signal.SIGINT))
        assert not flag.requested and flag.name == ""
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.name == "SIGTERM" and seen == []
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt without repeat_interrupt
        assert flag.name == "SIGINT"
        flag.restore()
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == ["previous"]
        flag.restore()  # twice: nothing left to restore
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_second_ctrl_c_raises_and_with_installs_for_a_block():
    previous = signal.getsignal(signal.SIGINT)
    with TermFlag((signal.SIGINT,), install=False, repeat_interrupt=True) as flag:
        assert signal.getsignal(signal.SIGINT) == flag._handle
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) == previous


def test_a_handler_python_did_not_set_is_left_alone():
    flag = TermFlag((signal.SIGTERM,), install=False)
    flag.previous = {signal.SIGTERM: None}  # what signal.signal returns for a handler set outside Python
    current = signal.getsignal(signal.SIGTERM)
    flag.restore()
    assert signal.getsignal(signal.SIGTERM) == current
