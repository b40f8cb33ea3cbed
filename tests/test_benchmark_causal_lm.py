"""The causal-LM benchmark's genre mix (`+mix`), its setting parser and its table cells; no model, no assets."""

from __future__ import annotations

import types

import pytest
import torch

import benchmarks.assets as assets
from benchmarks.assets import SOTU_CALIBRATION_YEARS, SOTU_EVAL_YEARS, _detokenize
from benchmarks.causal_lm import (
    CHUNK_TOKENS,
    DEV_YEARS,
    EXTRA_SPEECH_YEARS,
    FIRST_TOKEN_INPUT,
    FIRST_TOKEN_OUTPUT,
    LARGE_MIX_CALIBRATION,
    LONG_LORA_EPOCHS,
    LORA_EPOCHS,
    LORA_FLAGS,
    MIX_MOBY_CHAPTERS,
    MOBY_CHAPTERS,
    SHORT_LORA_EPOCHS,
    SINK_DOWN_PROJ_LAYERS,
    UPDATES,
    StatisticsStore,
    _cells,
    chunk_ids,
    chunk_length,
    first_token_excluded,
    first_token_reweighed,
    genre_mix,
    genre_shares,
    joined_pairs,
    lora_flag,
    lora_recover,
    mix_texts,
    needed_statistics,
    parse_setting,
    prefetch,
    setting_data,
    setting_statistics,
    sink_modules_dense,
    split_halves,
    write_ranks,
)
from hf_fwsvd.report import CompressionReport, ModuleReport
from hf_fwsvd.statistics import Statistics


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
                                      "mix_calibration_large", "mix_train", "mix_train_large", "mix_train_xl",
                                      "mix_train_xxl", "mix_train_xxxl", "dev")}  # fmt: skip
    chosen = setting_data(parse_setting("fisher_whiten+alloc1+update+mix+lora"), data)
    assert chosen["calibration"] == ["mix_calibration"]
    assert chosen["train"] == ["mix_train"]
    assert chosen["train_large"] == ["mix_train_large"]
    assert chosen[LORA_FLAGS["lora128"]] == ["mix_train_xl"]
    assert chosen[LORA_FLAGS["lora256"]] == ["mix_train_xxl"]
    assert chosen[LORA_FLAGS["lora512"]] == ["mix_train_xxxl"]
    assert chosen["dev"] == ["dev"] and chosen["calibration_large"] == ["mix_calibration_large"]
    assert setting_data(parse_setting("fisher_whiten+alloc1+update"), data) is data


def test_f128_collects_every_statistic_on_the_128_chunk_set():
    data = {"calibration": _pool("c", 2), "calibration_large": _pool("L", 2)}
    store = RecordingStore()
    prefetch(store, ["fisher_whiten+alloc1+f128", "fisher_whiten+alloc1+f128+true"], [0.8], data)
    assert store.calls == [
        ("L0", ("gradient_second_moment", "row_fisher"), "empirical"),
        ("L0", ("gradient_second_moment", "row_fisher"), "true"),
    ]
    spec = parse_setting("fisher_whiten+alloc1+f128")
    store.calls.clear()
    setting_statistics(store, spec, 0.8, data)
    assert store.calls == [("L0", ("gradient_second_moment", "row_fisher"), "empirical")]
    with pytest.raises(ValueError, match=r"choose one of `\+c128` and `\+f128`"):
        parse_setting("whiten+c128+f128")
    with pytest.raises(ValueError, match=r"overlap the mix fine-tune chunks"):
        parse_setting("whiten+f128+mix+lora")
    with pytest.raises(ValueError, match=r"`\+f512` reads 512 chunks of the genre mix; add `\+mix`\.$"):
        parse_setting("whiten+f512")
    with pytest.raises(ValueError, match=r"`\+f1024` reads 1024 chunks of the genre mix; add `\+mix`\.$"):
        parse_setting("whiten+f1024")
    with pytest.raises(ValueError, match=r"`\+f1024` excludes `\+f128`, `\+f512`; choose one calibration size\.$"):
        parse_setting("whiten+mix+f512+f1024")
    data = {"mix_calibration": ["m"], "mix_calibration_large": ["m128"], "mix_calibration_xl": ["m512"]}
    data.update({"mix_calibration_xxl": ["m1024"]})
    data.update({f"mix_{chunks}": [] for chunks in LORA_FLAGS.values()})
    assert setting_data(parse_setting("whiten+mix+f512"), data)["calibration_large"] == ["m512"]
    assert setting_data(parse_setting("whiten+mix+f1024"), data)["calibration_large"] == ["m1024"]
    assert setting_data(parse_setting("whiten+mix+f128"), data)["calibration_large"] == ["m128"]
    assert parse_setting("whiten+mix+f512")["f128"]  # the +f128 plan on the larger set


def test_mix_with_c128_is_refused():
    with pytest.raises(ValueError, match=r"`\+mix` replaces the 32 calibration chunks; it has no 128-chunk set"):
        parse_setting("whiten+update+c128+mix")


def test_detokenize_joins_penn_tokens_back():
    words = "Mr. Vinken , 61 , said -LRB- it 's $ 5 -RRB- : `` no '' ; he does n't .".split()
    assert _detokenize(words) == "Mr. Vinken, 61, said (it's $5): \" no \"; he doesn't."


def test_write_ranks_appends_each_runs_ranks_with_dense_modules_as_zero(tmp_path):
    report = CompressionReport(
        method="kfac_whiten",
        modules=[ModuleReport("layers.0.q_proj", 4, 6, 2, 24, 20, 0.1, 0.1)],
        dense_modules=["layers.1.mlp.down_proj"],
    )
    path = tmp_path / "ranks.csv"
    write_ranks(path, "kfac_whiten+alloc1", 0.8, report)
    write_ranks(path, "kfac_whiten+alloc1", 0.6, report)
    assert path.read_text().splitlines() == [
        "setting,budget,module,rank",
        "kfac_whiten+alloc1,0.8,layers.0.q_proj,2",
        "kfac_whiten+alloc1,0.8,layers.1.mlp.down_proj,0",
        "kfac_whiten+alloc1,0.6,layers.0.q_proj,2",
        "kfac_whiten+alloc1,0.6,layers.1.mlp.down_proj,0",
    ]


def test_table_cells_leave_a_missing_column_empty():
    row = {"ppl_dev": "42.21", "ppl_sotu": "41.87", "ppl_moby": "183.7", "compress_s": "300.1", "peak_rss_mb": "3657"}
    assert _cells(row) == ["42.2", "41.9", "183.7", "", "300.1", "3657"]
    assert _cells({**row, "ppl_extra": "12345.6"}) == ["42.2", "41.9", "183.7", "1.2e+04", "300.1", "3657"]


def test_kd_needs_a_lora_recovery():
    assert parse_setting("fisher_whiten+alloc1+update+mix+lora64+kd")["kd"]
    with pytest.raises(
        ValueError,
        match=r"`\+kd` changes the recovery loss; add `\+lora`, `\+lora64`, `\+lora128`, `\+lora256` or "
        r"`\+lora512`\.$",
    ):
        parse_setting("fisher_whiten+alloc1+update+kd")


def test_lora128_needs_the_mix_and_one_lora_flag():
    with pytest.raises(ValueError, match=r"`\+lora128` needs 256 fine-tune chunks, which only `\+mix` has"):
        parse_setting("fisher_whiten+alloc1+update+lora128")
    with pytest.raises(ValueError, match=r"^Choose one of \+lora, \+lora64, \+lora128, \+lora256, \+lora512 in "):
        parse_setting("fisher_whiten+alloc1+update+mix+lora64+lora128")


def test_ep4_and_ep1_need_a_lora_recovery_and_scale_the_epochs():
    for flag in ("ep4", "ep1"):
        lora = r"`\+lora`, `\+lora64`, `\+lora128`, `\+lora256` or `\+lora512`"
        expected = rf"`\+{flag}` sets the recovery's epochs; add {lora}\.$"
        with pytest.raises(ValueError, match=expected):
            parse_setting(f"fisher_whiten+alloc1+update+mix+{flag}")
    with pytest.raises(ValueError, match=r"choose one of `\+ep1` and `\+ep4`\.$"):
        parse_setting("fisher_whiten+alloc1+update+mix+lora128+ep1+ep4")
    spec = parse_setting("fisher_whiten+alloc1+update+mix+lora128+ep4")
    assert spec["ep4"] and spec["lora128"] and not spec["kd"] and not spec["ep1"]
    assert parse_setting("fisher_whiten+alloc1+update+mix+lora128+ep1")["ep1"]
    assert LONG_LORA_EPOCHS == 2 * LORA_EPOCHS == 4 * SHORT_LORA_EPOCHS


def test_recovery_capacity_flags_set_rank_rate_and_full_training():
    spec = parse_setting("fisher_whiten+alloc1+update+mix+lora64+r64+lr1e-3")
    assert (spec["lora_rank"], spec["learning_rate"], spec["full"]) == (64, 1e-3, False)
    spec = parse_setting("fisher_whiten+alloc1+update+mix+lora64+full+lr1e-4")
    assert (spec["lora_rank"], spec["learning_rate"], spec["full"]) == (8, 1e-4, True)
    assert parse_setting("fisher_whiten+alloc1+update+mix+lora")["lora_rank"] == 8
    assert not parse_setting("svd")["full"]


def test_recovery_seed_flag_reaches_the_fine_tune(monkeypatch):
    import hf_fwsvd.finetune

    spec = parse_setting("fisher_whiten+alloc1+update+mix+lora512+seed2")
    assert (spec["seed"], spec["lora_rank"], lora_flag(spec)) == (2, 8, "lora512")
    assert parse_setting("fisher_whiten+alloc1+update+mix+lora512")["seed"] == 0
    seen = {}

    def fake_finetune(model, train, tokenizer, **options):
        seen.update(options)
        return types.SimpleNamespace(log_history=[], losses=[])

    monkeypatch.setattr(hf_fwsvd.finetune, "finetune", fake_finetune)
    lora_recover(None, [], None, seed=spec["seed"])
    assert seen["seed"] == 2 and seen["lora"].r == 8


def test_recovery_capacity_flags_need_a_recovery_and_no_rank_with_full():
    changes = r"`\+r<rank>`, `\+lr<rate>`, `\+full` and `\+seed<k>` change the recovery; add `\+lora`"
    for flag in ("r64", "seed1"):
        with pytest.raises(ValueError, match=changes):
            parse_setting(f"fisher_whiten+alloc1+update+{flag}")
    with pytest.raises(ValueError, match=r"`\+full` trains the factors themselves, it has no LoRA rank; drop"):
        parse_setting("fisher_whiten+alloc1+update+mix+lora64+full+r64")
    with pytest.raises(ValueError, match=r"the LoRA rank of `\+r0` must be at least 1"):
        parse_setting("fisher_whiten+alloc1+update+mix+lora64+r0")
    with pytest.raises(ValueError, match=r"Unknown setting flag\(s\) \['lrfast'\]"):
        parse_setting("fisher_whiten+alloc1+update+mix+lora64+lrfast")


def test_lora256_needs_the_mix():
    with pytest.raises(ValueError, match=r"`\+lora256` needs 512 fine-tune chunks, which only `\+mix` has; add"):
        parse_setting("fisher_whiten+alloc1+update+lora256")
    with pytest.raises(ValueError, match=r"^Choose one of \+lora, \+lora64, \+lora128, \+lora256, \+lora512 in "):
        parse_setting("fisher_whiten+alloc1+update+mix+lora128+lora256")
    spec = parse_setting("fisher_whiten+alloc1+update+mix+lora256+ep1")
    assert spec["lora256"] and spec["ep1"] and not spec["lora128"]
    with pytest.raises(ValueError, match=r"`\+lora512` needs 1024 fine-tune chunks, which only `\+mix` has; add"):
        parse_setting("fisher_whiten+alloc1+update+lora512+ep1")
    spec = parse_setting("fisher_whiten+alloc1+update+mix+lora512+ep1")
    assert lora_flag(spec) == "lora512" and spec["ep1"] and not spec["lora256"]


class _WordTokenizer:
    """Every whitespace-separated word is one token, its id the word itself (so a chunk names its source)."""

    def __call__(self, text: str, verbose: bool = False):
        return type("Encoding", (), {"input_ids": text.split()})()


def _words(prefix: str, chunks: int) -> str:
    return " ".join(f"{prefix}.{index}" for index in range(chunks * CHUNK_TOKENS))


def _fake_mix(monkeypatch, news_chunks: int = 120, oanc_chunks: int = 240, oanc_prefix: str = "oanc"):
    """`mix_texts` on made-up sources: every SOTU year 1960-2021, WSJ and OANC lines, Moby chapters 1-135 (enough
    for the 1,024-chunk pool)."""
    years = {year: _words(f"sotu{year}", 11) for year in range(1960, 2022)}
    monkeypatch.setattr(assets, "sotu_texts", lambda: years)
    monkeypatch.setattr(assets, "news_lines", lambda: [_words("wsj", news_chunks)])
    monkeypatch.setattr(assets, "oanc_lines", lambda: [_words(oanc_prefix, oanc_chunks)])
    chapters = {chapter: _words(f"moby{chapter}", 4) for chapter in range(1, 136)}
    calibration = chunk_ids(_words("calib1990s", 128).split())
    train = chunk_ids(_words("train1990s", 128).split())
    return mix_texts(_WordTokenizer(), calibration, train, chapters)


def _source(chunk: dict) -> str:
    return chunk["input_ids"][0].split(".")[0]


def test_mix_pool_sizes_and_old_pools_are_a_prefix_of_the_512_chunk_pool(monkeypatch):
    data = _fake_mix(monkeypatch)
    sizes = {name: len(data[name]) for name in data}
    assert sizes == {"mix_calibration": 32, "mix_calibration_large": 128, "mix_calibration_xl": 512,
                     "mix_calibration_xxl": 1024, "mix_calibration_ctx512": 16, "mix_calibration_xl_ctx512": 256,
                     "mix_calibration_xxl_ctx512": 512, "mix_passage_pools": 3,
                     "mix_train": 32, "mix_train_large": 128, "mix_train_xl": 256, "mix_train_xxl": 512,
                     "mix_train_xxxl": 1024}  # fmt: skip
    # +mix+f128: the 32-chunk mix first, then more of the same three pools in equal shares (43 / 43 / 42)
    assert data["mix_calibration_large"][:32] == data["mix_calibration"]
    large = [_source(chunk) for chunk in data["mix_calibration_large"]]
    assert (large.count("calib1990s"), large.count("wsj"), sum(s.startswith("moby") for s in large)) == (43, 42, 43)
    # +mix+f512: the 128 first, then the addresses continue with 1960-1979, the news with OANC (171 / 171 / 170)
    assert data["mix_calibration_xl"][:128] == data["mix_calibration_large"]
    xl = [_source(chunk) for chunk in data["mix_calibration_xl"]]
    assert (xl.count("calib1990s"), sum(s.startswith("sotu") for s in xl)) == (128, 43)
    assert (xl.count("wsj"), xl.count("oanc"), sum(s.startswith("moby") for s in xl)) == (120, 50, 171)
    for name in ("mix_train", "mix_train_large", "mix_train_xl"):
        assert data["mix_train_xxl"][: len(data[name])] == data[name], name
    # the added sources do not change any older set: other OANC text, or none at all beyond what +lora256 needs
    other = _fake_mix(monkeypatch, oanc_prefix="other")
    continued = ("mix_train_xxl", "mix_train_xxxl", "mix_calibration_xl", "mix_calibration_xxl",
                 "mix_calibration_xl_ctx512", "mix_calibration_xxl_ctx512", "mix_passage_pools")  # fmt: skip
    assert all(other[name] == data[name] for name in data if name not in continued)
    sources = [_source(chunk) for chunk in data["mix_train_xxl"]]
    # equal shares 171 / 171 / 170: 128 1990s + 43 extra-speech chunks, 171 Moby, 110 WSJ + 60 OANC chunks
    assert sum(s == "train1990s" for s in sources) == 128
    assert sum(s.startswith("sotu") for s in sources) == 171 - 128
    assert sum(s.startswith("moby") for s in sources) == 171
    assert (sources.count("wsj"), sources.count("oanc")) == (110, 60)
    assert "oanc" not in {_source(chunk) for name in data if name not in continued for chunk in data[name]}


def test_the_1024_chunk_pool_continues_the_512_chunk_pool(monkeypatch):
    data = _fake_mix(monkeypatch)
    # +mix+f1024: the 512 first; equal shares 342 / 341 / 341 (128 1990s + 214 extra-speech, 120 WSJ + 221 OANC)
    assert data["mix_calibration_xxl"][:512] == data["mix_calibration_xl"]
    xxl = [_source(chunk) for chunk in data["mix_calibration_xxl"]]
    assert (xxl.count("calib1990s"), sum(s.startswith("sotu") for s in xxl)) == (128, 214)
    assert (xxl.count("wsj"), xxl.count("oanc"), sum(s.startswith("moby") for s in xxl)) == (120, 221, 341)
    assert data["mix_train_xxxl"][:512] == data["mix_train_xxl"]
    sources = [_source(chunk) for chunk in data["mix_train_xxxl"]]
    # equal shares 342 / 341 / 341: 128 1990s + 214 extra-speech chunks, 341 Moby, 110 WSJ + 231 OANC chunks
    assert sum(s == "train1990s" for s in sources) == 128
    assert sum(s.startswith("sotu") for s in sources) == 342 - 128
    assert sum(s.startswith("moby") for s in sources) == 341
    assert (sources.count("wsj"), sources.count("oanc")) == (110, 231)
    assert len({tuple(chunk["input_ids"]) for chunk in data["mix_train_xxxl"]}) == 1024
    with pytest.raises(ValueError, match=r"^Genre 2 has 340 chunks, the mix needs 341\.$"):
        _fake_mix(monkeypatch, oanc_chunks=230)


def test_mix_fine_tune_chunks_stay_off_calibration_dev_and_evaluation_text(monkeypatch):
    data = _fake_mix(monkeypatch)
    train = data["mix_train_xxxl"]
    assert not {tuple(c["input_ids"]) for c in train} & {tuple(c["input_ids"]) for c in data["mix_calibration"]}
    words = {word for chunk in train for word in chunk["input_ids"]}
    speech_years = {int(word[4:8]) for word in words if word.startswith("sotu")}
    assert speech_years and speech_years <= set(EXTRA_SPEECH_YEARS)
    forbidden = set(DEV_YEARS) | set(SOTU_CALIBRATION_YEARS) | set(SOTU_EVAL_YEARS)
    assert not set(EXTRA_SPEECH_YEARS) & forbidden
    chapters = {int(word.split(".")[0][4:]) for word in words if word.startswith("moby")}
    assert chapters <= set(MIX_MOBY_CHAPTERS)


def test_mix_names_the_short_pool_when_the_news_runs_out(monkeypatch):
    # the 1,024-chunk calibration mix is the first set short of news: 120 WSJ + 59 OANC chunks, 341 needed
    with pytest.raises(ValueError, match=r"^Genre 2 has 179 chunks, the mix needs 341\.$"):
        _fake_mix(monkeypatch, oanc_chunks=59)


class RecordingStore:
    """Stands in for `StatisticsStore.get`: records which chunks, statistics and estimator each call asks for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...], str]] = []

    def get(self, chunks, names, estimator="empirical"):
        self.calls.append((chunks[0]["input_ids"][0], tuple(names), estimator))
        return {}, 1.0


def test_true_flag_collects_the_backward_statistics_with_the_true_fisher_only():
    data = {"calibration": _pool("c", 2), "calibration_large": _pool("L", 2)}
    store = RecordingStore()
    seconds = prefetch(store, ["fisher_whiten+alloc1", "fisher_whiten+alloc1+true", "whiten+c128"], [0.8], data)
    assert seconds == 3.0
    assert store.calls == [
        ("c0", ("gradient_second_moment", "row_fisher"), "empirical"),
        ("L0", ("activation_second_moment",), "empirical"),
        ("c0", ("gradient_second_moment", "row_fisher"), "true"),
    ]
    keys = StatisticsStore.__new__(StatisticsStore)
    keys.model_name = "m"
    assert keys.key(_pool("c", 2), "true") != keys.key(_pool("c", 2)) == keys.key(_pool("c", 2), "empirical")


def test_ctx512_joins_consecutive_speech_chunks_into_contiguous_passages():
    ids = list(range(256 * 4))
    chunks = chunk_ids(ids)
    data = {"calibration": chunks[:2], "calibration_large": chunks, "train": ["t"]}
    chosen = setting_data(parse_setting("kfac_whiten+alloc1+update+ctx512"), data)
    assert chosen["calibration"] == [{"input_ids": ids[:512]}]
    assert chosen["calibration_large"] == [{"input_ids": ids[:512]}, {"input_ids": ids[512:]}]
    assert chosen["train"] == ["t"]
    assert chunk_length(chosen["calibration"]) == 512 and chunk_length(chunks) == CHUNK_TOKENS
    with pytest.raises(ValueError, match="`\\+ctx512` joins chunks in pairs; 3 is odd."):
        joined_pairs(chunks[:3])


class FirstTokenStore(RecordingStore):
    """A `RecordingStore` that records each call's first token id and passage length."""

    def get(self, chunks, names, estimator="empirical"):
        self.calls.append((chunks[0]["input_ids"][0], len(chunks[0]["input_ids"]), tuple(names), estimator))
        return {}, 1.0


def test_prefetch_collects_each_setting_on_its_own_passages_when_ctx512_reuses_a_set_name():
    ids = list(range(256 * 4))
    data = {"calibration": chunk_ids(ids)[:2], "calibration_large": chunk_ids(ids), "train": ["t"]}
    store = FirstTokenStore()
    prefetch(store, ["kfac_whiten+alloc1", "kfac_whiten+alloc1+f128+ctx512"], [0.8], data)
    names = ("gradient_second_moment", "output_gradient_second_moment", "row_fisher")
    assert store.calls == [(0, 256, names, "empirical"), (0, 512, names, "empirical")]


@pytest.mark.parametrize(
    "setting",
    ["kfac_whiten+alloc1+ctx512+mix", "kfac_whiten+alloc1+ctx512+mix+f128", "kfac_whiten+alloc1+update+ctx512+lora"],
)
def test_ctx512_refuses_other_mix_sets_and_a_recovery(setting):
    with pytest.raises(ValueError, match="`\\+ctx512` joins the calibration chunks in pairs for the speech sets and"):
        parse_setting(setting)


def test_update_bias_runs_the_update_with_an_intercept():
    spec = parse_setting("kfac_whiten+alloc1+update_bias")
    assert spec["update_bias"] and UPDATES["update_bias"] == {"intercept": True}
    with pytest.raises(ValueError, match="Choose one update flag"):
        parse_setting("kfac_whiten+alloc1+update+update_bias")


def test_mix_f512_ctx512_joins_consecutive_chunks_of_one_source(monkeypatch):
    data = _fake_mix(monkeypatch)
    passages = data["mix_calibration_xl_ctx512"]
    chunks = {tuple(chunk["input_ids"]) for chunk in data["mix_calibration_xxl"]}
    for passage in passages:  # two consecutive 256-token chunks of one source, each also a chunk of the mix pools
        ids = passage["input_ids"]
        assert len(ids) == 2 * CHUNK_TOKENS
        first, second = ids[:CHUNK_TOKENS], ids[CHUNK_TOKENS:]
        family = {token.split(".")[0].rstrip("0123456789") for token in ids}  # years and chapters run on
        assert len(family) == 1 and int(second[0].split(".")[1]) in (int(first[-1].split(".")[1]) + 1, 0)
        assert tuple(first) in chunks and tuple(second) in chunks
    sources = [_source(passage) for passage in passages]
    # 86 / 85 / 85 passages: 172 / 170 / 170 of the 256-token chunks (+mix+f512: 171 / 171 / 170)
    assert (sources.count("calib1990s"), sum(s.startswith("sotu") for s in sources)) == (64, 22)
    assert sum(s.startswith("moby") for s in sources) == 85
    assert (sources.count("wsj"), sources.count("oanc")) == (60, 25)
    assert data["mix_calibration_ctx512"] == passages[:16]
    chosen = setting_data(parse_setting("kfac_whiten+alloc1+update+mix+f512+ctx512"), data)
    assert chosen["calibration_large"] is passages and chosen["calibration"] == passages[:16]


def test_mix_f1024_ctx512_continues_the_f512_passages(monkeypatch):
    data = _fake_mix(monkeypatch)
    passages = data["mix_calibration_xxl_ctx512"]
    assert passages[:256] == data["mix_calibration_xl_ctx512"]
    assert all(len(passage["input_ids"]) == 2 * CHUNK_TOKENS for passage in passages)
    sources = [_source(passage) for passage in passages]
    # 171 / 171 / 170 passages: 342 / 342 / 340 of the 256-token chunks (+mix+f1024: 342 / 341 / 341)
    assert sources.count("calib1990s") + sum(s.startswith("sotu") for s in sources) == 171
    assert sum(s.startswith("moby") for s in sources) == 171
    assert sources.count("wsj") + sources.count("oanc") == 170
    chosen = setting_data(parse_setting("kfac_whiten+alloc1+update+mix+f1024+ctx512"), data)
    assert chosen["calibration_large"] is passages and chosen["calibration"] == passages[:16]


@pytest.mark.parametrize("flag, passages", [("f512", 256), ("f1024", 512)])
def test_draw_takes_the_same_shares_of_other_passages_of_the_same_pools(monkeypatch, flag, passages):
    data = _fake_mix(monkeypatch)
    first = data[f"{LARGE_MIX_CALIBRATION[flag][0]}_ctx512"]
    drawn = setting_data(parse_setting(f"kfac_whiten+alloc1+mix+{flag}+ctx512+draw1"), data)["calibration_large"]
    again = setting_data(parse_setting(f"kfac_whiten+alloc1+update+mix+{flag}+ctx512+draw1"), data)
    other = setting_data(parse_setting(f"kfac_whiten+alloc1+mix+{flag}+ctx512+draw2"), data)["calibration_large"]
    assert len(drawn) == passages and again["calibration_large"] == drawn and again["calibration"] == drawn[:16]
    assert drawn != first and other != drawn  # seeded: the same draw twice, another seed another draw

    def genre(passage: dict) -> int:
        source = _source(passage)
        return 0 if source.startswith(("calib1990s", "sotu")) else 1 if source.startswith("moby") else 2

    assert [genre(p) for p in drawn] == [genre(p) for p in first]  # the same shares, interleaved the same way
    pools = [{tuple(p["input_ids"]) for p in pool} for pool in data["mix_passage_pools"]]
    assert all(tuple(p["input_ids"]) in pools[genre(p)] for p in drawn)
    assert len({tuple(p["input_ids"]) for p in drawn}) == passages


@pytest.mark.parametrize(
    "setting",
    ["kfac_whiten+alloc1+mix+f512+draw1", "kfac_whiten+alloc1+mix+ctx512+draw1", "kfac_whiten+alloc1+f128+draw1",
     "kfac_whiten+alloc1+mix+f512+ctx512+draw1+draw2"],
)  # fmt: skip
def test_draw_needs_the_large_mix_passages(setting):
    with pytest.raises(ValueError, match=r"one `\+draw<k>` \(k >= 1\) draws the passages of `\+mix\+f512\+ctx512`"):
        parse_setting(setting)
    with pytest.raises(ValueError, match=r"Unknown setting flag\(s\) \['draw0'\]"):
        parse_setting("kfac_whiten+alloc1+mix+f512+ctx512+draw0")


def test_ctx128_halves_each_speech_chunk():
    chunks = chunk_ids(list(range(256 * 2)))
    chosen = setting_data(
        parse_setting("kfac_whiten+alloc1+update+f128+ctx128"),
        {"calibration": chunks[:1], "calibration_large": chunks},
    )
    assert chosen["calibration"] == [{"input_ids": list(range(128))}, {"input_ids": list(range(128, 256))}]
    assert [c["input_ids"][0] for c in chosen["calibration_large"]] == [0, 128, 256, 384]
    assert chunk_length(chosen["calibration_large"]) == 128 and split_halves([]) == []
    for setting in ("kfac_whiten+alloc1+ctx128+ctx512", "kfac_whiten+alloc1+ctx128+mix", "kfac_whiten+ctx128+lora"):
        with pytest.raises(ValueError, match="`\\+ctx128` halves the speech calibration chunks; it takes neither"):
            parse_setting(setting)


def test_update_nosink_weighs_out_each_passages_first_token():
    loader = [{"input_ids": torch.zeros(2, 5, dtype=torch.long)}, {"input_ids": torch.zeros(1, 5, dtype=torch.long)}]
    weights = first_token_excluded(["a", "b"], loader)
    assert set(weights) == {"a", "b"} and len(weights["a"]) == 2
    assert torch.equal(weights["a"][0], torch.tensor([[0.0, 1, 1, 1, 1]] * 2))
    assert torch.equal(weights["b"][1], torch.tensor([[0.0, 1, 1, 1, 1]]))
    assert UPDATES["update_bias_nosink"] == {"intercept": True, "nosink": True}
    assert parse_setting("kfac_whiten+alloc1+update_nosink")["update_nosink"]
    assert UPDATES["update_bias_rest"] == {"intercept": True, "bias_nosink": True}
    assert parse_setting("kfac_whiten+alloc1+update_bias_rest+ctx512")["update_bias_rest"]


def test_sinkdense_keeps_the_sink_down_projs_and_the_share_of_all_block_weights():
    targets = {}
    for layer in range(30):
        targets[f"model.layers.{layer}.self_attn.q_proj"] = torch.nn.Linear(8, 8, bias=False)
        targets[f"model.layers.{layer}.mlp.down_proj"] = torch.nn.Linear(16, 8, bias=False)
    base, rest_budget = sink_modules_dense(targets, 0.8, {"batch_size": 4})
    sinks = [f"model.layers.{layer}.mlp.down_proj" for layer in SINK_DOWN_PROJ_LAYERS]
    assert base["batch_size"] == 4 and base["modules_to_not_convert"][-6:] == sinks
    assert "lm_head" in base["modules_to_not_convert"]
    total = 30 * (64 + 128)
    assert rest_budget * (total - 6 * 128) + 6 * 128 == pytest.approx(0.8 * total)
    del targets["model.layers.11.mlp.down_proj"]
    with pytest.raises(ValueError, match="`\\+sinkdense` expects 6 sink `down_proj` modules, found"):
        sink_modules_dense(targets, 0.8, {})


def test_first_token_weight_flags_add_their_parts_to_the_statistics():
    spec = parse_setting("kfac_whiten+alloc1+firstboth0.1")
    assert spec["first_alpha"] == 0.1 and spec["first_parts"] == (FIRST_TOKEN_INPUT, FIRST_TOKEN_OUTPUT)
    assert needed_statistics(spec, 0.8)[-2:] == [FIRST_TOKEN_INPUT, FIRST_TOKEN_OUTPUT]
    spec = parse_setting("fisher_whiten+alloc1+firstin0")
    assert spec["first_alpha"] == 0.0 and spec["first_parts"] == (FIRST_TOKEN_INPUT,)
    plain = parse_setting("kfac_whiten+alloc1")
    assert plain["first_parts"] == () and FIRST_TOKEN_INPUT not in needed_statistics(plain, 0.8)


def test_first_token_weight_flags_are_checked():
    with pytest.raises(ValueError, match=r"reweighs gradient_second_moment and output_gradient_second_moment, which"):
        parse_setting("fisher_whiten+alloc1+firstboth0")
    with pytest.raises(ValueError, match=r"choose one `\+firstin<alpha>` / `\+firstboth<alpha>` flag"):
        parse_setting("kfac_whiten+alloc1+firstin0+firstboth0")
    with pytest.raises(ValueError, match=r"Unknown setting flag\(s\) \['firstin2'\]"):
        parse_setting("kfac_whiten+alloc1+firstin2")


def test_firstin_reweighs_only_the_input_moment_and_firstboth_both():
    eye = {"m": torch.eye(2)}
    stats = Statistics({"gradient_second_moment": eye, "output_gradient_second_moment": eye,
                        FIRST_TOKEN_INPUT: {"m": torch.eye(2) / 2}, "row_fisher": {"m": torch.ones(2)}})  # fmt: skip
    only_input = first_token_reweighed(stats, parse_setting("kfac_whiten+alloc1+firstin0"))
    assert torch.equal(only_input["gradient_second_moment"]["m"], torch.eye(2) / 2)
    assert only_input["output_gradient_second_moment"] is eye and "row_fisher" in only_input
    assert FIRST_TOKEN_INPUT not in only_input
    stats[FIRST_TOKEN_OUTPUT] = {"m": torch.eye(2) / 4}
    both = first_token_reweighed(stats, parse_setting("kfac_whiten+alloc1+firstboth0.5"))
    assert torch.equal(both["output_gradient_second_moment"]["m"], torch.eye(2) * 7 / 8)
    assert first_token_reweighed(stats, parse_setting("kfac_whiten+alloc1")) is stats


def test_plot_labels_drop_the_flags_every_setting_shares_and_keep_notes():
    from benchmarks.causal_lm import plot_labels

    settings = ["whiten+mix+draw3", "kfac_whiten+alloc1+mix+draw3 [power 0.75]", "svd+draw3+mix"]
    assert plot_labels(settings) == (["whiten", "kfac_whiten+alloc1 [power 0.75]", "svd"], "+mix+draw3")
    assert plot_labels(["whiten+update", "whiten"]) == (["whiten+update", "whiten"], "")
    assert plot_labels(["whiten+update"]) == (["whiten+update"], "")
