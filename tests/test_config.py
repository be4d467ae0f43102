import pytest

from sdfm import config as C
from sdfm.errors import UserError


def test_defaults_validate_and_roundtrip_through_toml(tmp_path):
    cfg = C.Config()
    cfg.eval.nfe = [1, 3]
    cfg.data.path = 'a "quoted" \\ path'
    p = tmp_path / "c.toml"
    p.write_text(C.dumps(cfg))
    assert C.load_config(p) == cfg


def test_unknown_key_names_the_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nstepz = 3\n")
    with pytest.raises(UserError, match="train.stepz"):
        C.load_config(p)
    p.write_text("[trian]\nsteps = 3\n")
    with pytest.raises(UserError, match="trian"):
        C.load_config(p)


@pytest.mark.parametrize(
    "text, key",
    [
        ("[coupling]\nkind = 'magic'\n", "coupling.kind"),
        ("[coupling]\nepsilon = 0.0\n", "coupling.epsilon"),
        ("[coupling]\nepsilon = -1.0\n", "coupling.epsilon"),
        ("[train]\nsteps = 'ten'\n", "train.steps"),
        ("[train]\nbatch_size = 1\n", "train.batch_size"),
        ("[eval]\nnfe = [1, 0]\n", "eval.nfe"),
        ("[data]\nname = 'file'\n", "data.path"),
        ("[model]\nema_decay = 1.5\n", "model.ema_decay"),
        ("[train]\ndist_timeout_s = 0.0\n", "train.dist_timeout_s"),
        ("[potential]\nshard_index = true\nepsilon = 0.1\n", "potential.shard_index"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        C.load_config(p)


def test_missing_and_invalid_toml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        C.load_config(tmp_path / "nope.toml")
    p = tmp_path / "bad.toml"
    p.write_text("[train\n")
    with pytest.raises(UserError, match="not valid TOML"):
        C.load_config(p)


def test_presets_load():
    from pathlib import Path

    presets = sorted((Path(__file__).parents[1] / "launch" / "configs").glob("*.toml"))
    assert presets
    for p in presets:
        C.load_config(p)


def test_readme_configuration_table_lists_every_field():
    """The README's table of config sections names every field of every section (docs stay in step)."""
    import dataclasses
    import re
    from pathlib import Path

    from sdfm.config import Config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", readme, flags=re.M))
    for section in dataclasses.fields(Config):
        assert section.name in rows, f"README configuration table has no row for [{section.name}]"
        named = set(re.findall(r"`(\w+)`", rows[section.name]))
        fields = {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
        assert fields <= named, (
            f"[{section.name}] fields missing from the README table: {sorted(fields - named)}"
        )
