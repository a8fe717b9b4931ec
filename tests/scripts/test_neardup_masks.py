"""scripts/neardup_masks.py: its two measures on cases whose answer is known."""

import importlib.util
import os

import helpers

SCRIPT = os.path.join(helpers.REPO, "scripts", "neardup_masks.py")


def load_script():
    spec = importlib.util.spec_from_file_location("neardup_masks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exact_copies_keep_every_hole_and_a_phrase_only_mask_has_one_fate(tmp_path):
    script = load_script()
    result = script.main(["--articles", "6", "--copies", "3", "--rates", "0,20", "--settings", "2:0,2:32",
                          "--vocab", "512", "--out", str(tmp_path)])
    plain, keyed = result["rows"]
    for row in result["rows"]:
        assert row["protected"]["0"] == 1.0  # an exact copy has exactly the original's holes
        assert row["protected"]["20"] < 1.0  # 20 edits per 100 words move some
        assert abs(row["drop_rate"] - 0.25) < 0.05
    # h=2 without a key: a 3-token phrase's last token has the same fate in every article.
    assert plain["same_fate"] == 1.0 and plain["phrase_pairs"] > 100
    assert keyed["same_fate"] < 0.9
    assert (tmp_path / "results.md").read_text().count("\n| 2 |") == 2
