import json

import pytest
import torch

from sdfm.checkpoint import CheckpointManager
from sdfm.errors import UserError


def _save(m, step, value):
    return m.save(
        step, {"model": {"w": torch.full((3,), float(value))}}, {"optimizer": {"lr": value}}, {"note": value}
    )


def test_roundtrip_latest_and_prune(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    for s in (1, 2, 3):
        _save(m, s, s)
    assert m.steps() == [3, 2]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    c = m.load_latest()
    assert c.step == 3 and torch.equal(c.tensors("model")["w"], torch.full((3,), 3.0))
    assert c.object("optimizer") == {"lr": 3} and c.state["note"] == 3
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_state", "bad_json"])
def test_damaged_checkpoint_is_skipped(tmp_path, damage):
    m = CheckpointManager(tmp_path, keep_last=5)
    warnings = []
    m.warn = warnings.append
    _save(m, 1, 1)
    path = _save(m, 2, 2)
    f = path / "model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-5])
    elif damage == "flip":
        b = bytearray(f.read_bytes())
        b[-1] ^= 0xFF
        f.write_bytes(bytes(b))
    elif damage == "no_state":
        (path / "trainer_state.json").unlink()
    else:
        (path / "trainer_state.json").write_text("{not json")
    c = m.load_latest()
    assert c.step == 1
    assert warnings and "step-00000002" in warnings[0]


def test_all_damaged_fails_clearly_and_empty_is_none(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=5)
    assert m.load_latest() is None
    path = _save(m, 1, 1)
    (path / "trainer_state.json").write_text(json.dumps({"files": {"model.safetensors": "0" * 64}}))
    m.warn = lambda s: None
    with pytest.raises(UserError, match="no complete checkpoint"):
        m.load_latest()


def test_leftover_temp_folder_is_ignored(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=5)
    _save(m, 1, 1)
    (tmp_path / "checkpoints" / ".tmp-step-00000002-999999").mkdir()
    assert m.load_latest().step == 1
    _save(m, 3, 3)
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000002-999999").exists()
