"""The causal-LM benchmark's genre mix (`+mix`), its setting parser and its table cells; no model, no assets."""

from __future__ import annotations

import pytest

from benchmarks.assets import _detokenize
from benchmarks.causal_lm import (
    LONG_LORA_EPOCHS,
    LORA_EPOCHS,
    LORA_FLAGS,
    MIX_MOBY_CHAPTERS,
    MOBY_CHAPTERS,
    _cells,
    chunk_ids,
    genre_mix,
    genre_shares,
    parse_setting,
    setting_data,
)


def _pool(genre: str, count: int) -> list[dict]:
    return [{"input_ids": [f"{genre}{index}"]} for index in range(count)]


@pytest.mark.parametrize(
    ("total", "genres", "expected"),
    [(32, 3, [11, 11, 10]), (128, 3, [43, 43, 42]), (33, 3, [11, 11, 11]), (4, 3, [2, 1, 1])],
    ids=["32-chunks", "128-chunks", "even", "small"],
)
def test_genre_shares_split_evenly_first_genres_take_the_remainder(total, genres, expected):
    assert genre_shares(total, genres) == expected
    assert sum(genre_shares(total, genres)) == total


def test_genre_mix_takes_the_first_share_of_each_pool_interleaved():
    mixed = genre_mix([_pool("s", 5), _pool("m", 5), _pool("w", 5)], 7)
    assert [chunk["input_ids"][0] for chunk in mixed] == ["s0", "m0", "w0", "s1", "m1", "w1", "s2"]


def test_genre_mix_names_the_short_pool():
    with pytest.raises(ValueError, match=r"^Genre 2 has 9 chunks, the mix needs 10\.$"):
        genre_mix([_pool("s", 11), _pool("m", 11), _pool("w", 9)], 32)


def test_chunk_ids_are_consecutive_full_chunks():
    chunks = chunk_ids(list(range(256 * 2 + 255)))
    assert [c["input_ids"][0] for c in chunks] == [0, 256]
    assert all(len(c["input_ids"]) == 256 for c in chunks)
    assert [c["input_ids"][0] for c in chunk_ids(list(range(512)))] == [0, 256]


def test_mix_chapters_never_reach_the_evaluation_chapters():
    assert max(MIX_MOBY_CHAPTERS) < min(MOBY_CHAPTERS)


def test_mix_setting_swaps_calibration_and_training_chunks_only():
    data = {name: [name] for name in ("calibration", "calibration_large", "train", "train_large", "mix_calibration",
                                      "mix_train", "mix_train_large", "mix_train_xl", "dev")}  # fmt: skip
    chosen = setting_data(parse_setting("fisher_whiten+alloc1+update+mix+lora"), data)
    assert chosen["calibration"] == ["mix_calibration"]
    assert chosen["train"] == ["mix_train"]
    assert chosen["train_large"] == ["mix_train_large"]
    assert chosen[LORA_FLAGS["lora128"]] == ["mix_train_xl"]
    assert chosen["dev"] == ["dev"] and chosen["calibration_large"] == ["calibration_large"]
    assert setting_data(parse_setting("fisher_whiten+alloc1+update"), data) is data


def test_mix_with_c128_is_refused():
    with pytest.raises(ValueError, match=r"`\+mix` replaces the 32 calibration chunks; it has no 128-chunk set"):
        parse_setting("whiten+update+c128+mix")


def test_detokenize_joins_penn_tokens_back():
    words = "Mr. Vinken , 61 , said -LRB- it 's $ 5 -RRB- : `` no '' ; he does n't .".split()
    assert _detokenize(words) == "Mr. Vinken, 61, said (it's $5): \" no \"; he doesn't."


def test_table_cells_leave_a_missing_column_empty():
    row = {"ppl_dev": "42.21", "ppl_sotu": "41.87", "ppl_moby": "183.7", "compress_s": "300.1", "peak_rss_mb": "3657"}
    assert _cells(row) == ["42.2", "41.9", "183.7", "", "300.1", "3657"]
    assert _cells({**row, "ppl_extra": "12345.6"}) == ["42.2", "41.9", "183.7", "1.2e+04", "300.1", "3657"]


def test_kd_needs_a_lora_recovery():
    assert parse_setting("fisher_whiten+alloc1+update+mix+lora64+kd")["kd"]
    with pytest.raises(
        ValueError, match=r"`\+kd` changes the recovery loss; add `\+lora`, `\+lora64` or `\+lora128`\.$"
    ):
        parse_setting("fisher_whiten+alloc1+update+kd")


def test_lora128_needs_the_mix_and_one_lora_flag():
    with pytest.raises(ValueError, match=r"`\+lora128` needs 256 fine-tune chunks, which only `\+mix` has"):
        parse_setting("fisher_whiten+alloc1+update+lora128")
    with pytest.raises(ValueError, match=r"^Choose one of \+lora, \+lora64, \+lora128 in "):
        parse_setting("fisher_whiten+alloc1+update+mix+lora64+lora128")


def test_ep4_needs_a_lora_recovery_and_doubles_the_epochs():
    expected = r"`\+ep4` lengthens the recovery; add `\+lora`, `\+lora64` or `\+lora128`\.$"
    with pytest.raises(ValueError, match=expected):
        parse_setting("fisher_whiten+alloc1+update+mix+ep4")
    spec = parse_setting("fisher_whiten+alloc1+update+mix+lora128+ep4")
    assert spec["ep4"] and spec["lora128"] and not spec["kd"]
    assert LONG_LORA_EPOCHS == 2 * LORA_EPOCHS


def test_recovery_capacity_flags_set_rank_rate_and_full_training():
    spec = parse_setting("fisher_whiten+alloc1+update+mix+lora64+r64+lr1e-3")
    assert (spec["lora_rank"], spec["learning_rate"], spec["full"]) == (64, 1e-3, False)
    spec = parse_setting("fisher_whiten+alloc1+update+mix+lora64+full+lr1e-4")
    assert (spec["lora_rank"], spec["learning_rate"], spec["full"]) == (8, 1e-4, True)
    assert parse_setting("fisher_whiten+alloc1+update+mix+lora")["lora_rank"] == 8
    assert not parse_setting("svd")["full"]


def test_recovery_capacity_flags_need_a_recovery_and_no_rank_with_full():
    with pytest.raises(ValueError, match=r"`\+r<rank>`, `\+lr<rate>` and `\+full` change the recovery; add `\+lora`"):
        parse_setting("fisher_whiten+alloc1+update+r64")
    with pytest.raises(ValueError, match=r"`\+full` trains the factors themselves, it has no LoRA rank; drop"):
        parse_setting("fisher_whiten+alloc1+update+mix+lora64+full+r64")
    with pytest.raises(ValueError, match=r"the LoRA rank of `\+r0` must be at least 1"):
        parse_setting("fisher_whiten+alloc1+update+mix+lora64+r0")
    with pytest.raises(ValueError, match=r"Unknown setting flag\(s\) \['lrfast'\]"):
        parse_setting("fisher_whiten+alloc1+update+mix+lora64+lrfast")
