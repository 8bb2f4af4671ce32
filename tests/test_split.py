from unclip.split import HELDOUT_FRACTION, heldout_score, is_heldout


def test_split_is_stable_and_about_the_right_size() -> None:
    ids = [f"{i:08d}" for i in range(20_000)]
    held = [i for i in ids if is_heldout(i)]
    assert abs(len(held) / len(ids) - HELDOUT_FRACTION) < 0.005
    assert held == [i for i in ids if is_heldout(i)]  # deterministic
    assert heldout_score("abc") == heldout_score("abc") and 0 <= heldout_score("abc") < 1
